//! Reading token usage from provider responses, whole bodies and streamed events.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::Endpoint;

/// Exact token counts of one call; the kinds do not overlap (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    /// Output tokens, reasoning included.
    pub output: u64,
    /// Reasoning tokens, a subset of `output`.
    pub reasoning: u64,
}

/// The fields of every provider's response envelope that Gauge reads; the rest is
/// ignored. One struct serves whole bodies and stream events of all providers.
///
/// It borrows from the JSON it is read from, and keeps the fields that carry text
/// unparsed (`RawValue`): this runs for every chunk of every stream, and the text is
/// looked at only to estimate tokens a response does not report.
#[derive(Debug, Default, Deserialize)]
pub struct Envelope<'a> {
    #[serde(borrow)]
    pub model: Option<Cow<'a, str>>,
    #[serde(rename = "modelVersion", borrow)]
    pub model_version: Option<Cow<'a, str>>,
    pub usage: Option<RawUsage>,
    #[serde(rename = "usageMetadata")]
    pub usage_metadata: Option<GeminiUsage>,
    #[serde(rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
    /// OpenAI Responses stream events wrap the response.
    #[serde(borrow)]
    pub response: Option<Box<Envelope<'a>>>,
    /// Anthropic `message_start` wraps the message.
    #[serde(borrow)]
    pub message: Option<Box<Envelope<'a>>>,
    pub error: Option<ErrorBody>,
    /// OpenAI chat: `choices[].delta.content` (streams) or `.message.content`.
    #[serde(borrow)]
    pub choices: Option<Vec<Choice<'a>>>,
    /// Anthropic `content_block_delta` (an object) or Responses `*.delta` (a string).
    #[serde(borrow)]
    pub delta: Option<&'a RawValue>,
    /// Anthropic whole messages: `content[].text`.
    #[serde(borrow)]
    pub content: Option<&'a RawValue>,
    /// Gemini: `candidates[].content.parts[].text`.
    #[serde(borrow)]
    pub candidates: Option<&'a RawValue>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Choice<'a> {
    #[serde(borrow)]
    pub delta: Option<Message<'a>>,
    #[serde(borrow)]
    pub message: Option<Message<'a>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Message<'a> {
    #[serde(borrow)]
    pub content: Option<&'a RawValue>,
    #[serde(borrow)]
    pub reasoning_content: Option<Cow<'a, str>>,
}

impl Envelope<'_> {
    /// Whether token usage is in this envelope or one it wraps.
    pub fn carries_usage(&self) -> bool {
        self.usage.is_some()
            || self.usage_metadata.is_some()
            || [&self.response, &self.message].into_iter().flatten().any(|inner| inner.carries_usage())
    }

    /// Generated text this envelope carries, for estimates when usage is missing.
    pub fn output_text(&self, out: &mut String) {
        for choice in self.choices.iter().flatten() {
            for message in [&choice.delta, &choice.message].into_iter().flatten() {
                if let Some(content) = message.content {
                    raw_text(content, out);
                }
                if let Some(reasoning) = &message.reasoning_content {
                    out.push_str(reasoning);
                }
            }
        }
        for raw in [self.delta, self.content, self.candidates].into_iter().flatten() {
            raw_text(raw, out);
        }
    }
}

/// The text in a raw JSON value: a string as it is (borrowed when it has no
/// escapes), anything else through [`text_of`].
fn raw_text(raw: &RawValue, out: &mut String) {
    let json = raw.get();
    if json.starts_with('"') {
        if let Ok(text) = serde_json::from_str::<&str>(json) {
            out.push_str(text);
        } else if let Ok(text) = serde_json::from_str::<String>(json) {
            out.push_str(&text);
        }
    } else if let Ok(value) = serde_json::from_str::<serde_json::Value>(json) {
        text_of(&value, out);
    }
}

/// Strings under `text`/`thinking` keys, or a bare string.
fn text_of(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::String(s) => out.push_str(s),
        serde_json::Value::Array(items) => items.iter().for_each(|v| text_of(v, out)),
        serde_json::Value::Object(fields) => {
            for (key, v) in fields {
                match key.as_str() {
                    "text" | "thinking" | "partial_json" => text_of(v, out),
                    "content" | "parts" => text_of(v, out),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// Whether a stream event can hold nothing Gauge reads but generated text: no
/// usage (or `"usage":null`), no error, no wrapped response or message, and no model
/// other than `known_model`. Such an event needs no JSON parse unless its text is
/// wanted for an estimate, and most events of a stream are such.
///
/// Conservative by construction: it looks for the keys' bytes anywhere, so a key
/// that shows up inside a string, or anything it cannot rule out (a `\u` escape,
/// which could spell a key), answers false and the event is parsed.
pub fn only_text(data: &[u8], known_model: Option<&str>) -> bool {
    // An envelope written as an array (serde reads a struct from its fields in
    // order) has no keys to look for: only objects are judged.
    if data.trim_ascii_start().first() != Some(&b'{') {
        return false;
    }
    // One pass over the quotes and backslashes, looking at what each quote opens:
    // this runs for nearly every event of every stream. Eight bytes at a time, each
    // word's quotes and backslashes found at once as a bit mask; most quotes open
    // or close a name that starts with none of the keys' first letters, and are
    // passed over inline. A byte-by-byte loop was a quarter of the replay's time
    // (it had beaten one memmem search per key, a SIMD search for both bytes
    // restarted at every hit, and aho-corasick's multi-pattern search on chunks of
    // a hundred-odd bytes with dozens of quotes). Masking the quotes by the letter
    // after them as well, branch-free, measured no faster: the extra masks cost
    // what the branches had.
    let allowed = |at: usize| match data.get(at + 1) {
        Some(b'u' | b'm' | b'e' | b'r') => allowed_at(data, at, known_model),
        _ => true,
    };
    for (i, word) in data.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
        let mut hits = bytes_equal(word, b'"') | bytes_equal(word, b'\\');
        while hits != 0 {
            // The lowest set bit is the first hit (little-endian: byte 0 is lowest).
            if !allowed(8 * i + (hits.trailing_zeros() / 8) as usize) {
                return false;
            }
            hits &= hits - 1;
        }
    }
    (data.len() / 8 * 8..data.len()).filter(|&at| matches!(data[at], b'"' | b'\\')).all(allowed)
}

/// The high bit of each byte of `word` that equals `byte`, and no other bit. Exact:
/// adding 0x7f to each byte's low seven bits cannot carry into the next byte.
fn bytes_equal(word: u64, byte: u8) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let zero_where_equal = word ^ (u64::from(byte) * 0x0101_0101_0101_0101);
    !(((zero_where_equal & LOW7) + LOW7) | zero_where_equal | LOW7)
}

/// Whether the quote or backslash at `at` leaves the event text-only (see [`only_text`]).
#[inline(never)]
fn allowed_at(data: &[u8], at: usize, known_model: Option<&str>) -> bool {
    let (opened, rest) = (&data[at..], &data[at + 1..]);
    if data[at] == b'\\' {
        return rest.first() != Some(&b'u');
    }
    match rest.first() {
        // `"usage"` may only be null; `"usageMetadata"` (Gemini) is never skipped.
        Some(b'u') if rest.starts_with(b"usage") => {
            value_after_key(opened, b"\"usage\"").is_some_and(|v| v.starts_with(b"null"))
        }
        // `"model"` may only name the model already known; `"modelVersion"` never.
        Some(b'm') if rest.starts_with(b"model") => {
            let (Some(model), Some(value)) = (known_model, value_after_key(opened, b"\"model\"")) else { return false };
            value.strip_prefix(b"\"").and_then(|v| v.strip_prefix(model.as_bytes())).is_some_and(|v| v.starts_with(b"\""))
        }
        Some(b'm') => !rest.starts_with(b"message\""),
        Some(b'e') => !rest.starts_with(b"error\""),
        Some(b'r') => !rest.starts_with(b"response\""),
        _ => true,
    }
}

/// What follows `key` and its colon in `json` (which starts with `key`), or None when
/// `json` does not hold exactly that key there.
fn value_after_key<'a>(json: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    json.strip_prefix(key)?.trim_ascii_start().strip_prefix(b":").map(<[u8]>::trim_ascii_start)
}

#[derive(Debug, Default, Deserialize)]
pub struct ErrorBody {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Gemini's error status (`RESOURCE_EXHAUSTED`).
    pub status: Option<String>,
    pub code: Option<serde_json::Value>,
}

impl ErrorBody {
    pub fn label(&self) -> Option<String> {
        self.kind.clone().or_else(|| self.status.clone()).or_else(|| match &self.code {
            Some(serde_json::Value::String(code)) => Some(code.clone()),
            _ => None,
        })
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Details {
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
}

/// OpenAI (chat, responses, embeddings) and Anthropic usage objects, merged.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawUsage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub prompt_tokens_details: Option<Details>,
    pub completion_tokens_details: Option<Details>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub input_tokens_details: Option<Details>,
    pub output_tokens_details: Option<Details>,
    pub cache_creation_input_tokens: Option<u64>,
    pub cache_read_input_tokens: Option<u64>,
}

impl RawUsage {
    /// Anthropic streams: `message_delta` carries cumulative counts that replace
    /// those of `message_start`, field by field.
    pub fn merge(&mut self, newer: &RawUsage) {
        macro_rules! take {
            ($($f:ident),*) => { $( if newer.$f.is_some() { self.$f = newer.$f.clone(); } )* };
        }
        take!(
            prompt_tokens, completion_tokens, prompt_tokens_details, completion_tokens_details, input_tokens,
            output_tokens, input_tokens_details, output_tokens_details, cache_creation_input_tokens,
            cache_read_input_tokens
        );
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GeminiUsage {
    pub prompt_token_count: Option<u64>,
    pub candidates_token_count: Option<u64>,
    pub cached_content_token_count: Option<u64>,
    pub thoughts_token_count: Option<u64>,
    pub tool_use_prompt_token_count: Option<u64>,
}

/// Converts a provider's usage to Gauge's non-overlapping kinds.
pub fn from_raw(endpoint: Endpoint, raw: &RawUsage) -> Usage {
    let cached = |d: &Option<Details>| d.as_ref().and_then(|d| d.cached_tokens).unwrap_or(0);
    let reasoning = |d: &Option<Details>| d.as_ref().and_then(|d| d.reasoning_tokens).unwrap_or(0);
    match endpoint {
        // OpenAI's cached_tokens is a subset of prompt_tokens.
        Endpoint::ChatCompletions | Endpoint::Embeddings => {
            let prompt = raw.prompt_tokens.or(raw.input_tokens).unwrap_or(0);
            let cache_read = cached(&raw.prompt_tokens_details).min(prompt);
            Usage {
                input: prompt - cache_read,
                cache_read,
                cache_write: 0,
                output: raw.completion_tokens.or(raw.output_tokens).unwrap_or(0),
                reasoning: reasoning(&raw.completion_tokens_details),
            }
        }
        Endpoint::Responses => {
            let input = raw.input_tokens.unwrap_or(0);
            let cache_read = cached(&raw.input_tokens_details).min(input);
            Usage {
                input: input - cache_read,
                cache_read,
                cache_write: 0,
                output: raw.output_tokens.unwrap_or(0),
                reasoning: reasoning(&raw.output_tokens_details),
            }
        }
        // Anthropic's cache counts come on top of input_tokens.
        Endpoint::Messages | Endpoint::GenerateContent => Usage {
            input: raw.input_tokens.unwrap_or(0),
            cache_read: raw.cache_read_input_tokens.unwrap_or(0),
            cache_write: raw.cache_creation_input_tokens.unwrap_or(0),
            output: raw.output_tokens.unwrap_or(0),
            reasoning: 0,
        },
    }
}

/// Gemini: cachedContentTokenCount is inside promptTokenCount; thoughtsTokenCount is
/// billed as output and is not inside candidatesTokenCount.
pub fn from_gemini(raw: &GeminiUsage) -> Usage {
    let prompt = raw.prompt_token_count.unwrap_or(0) + raw.tool_use_prompt_token_count.unwrap_or(0);
    let cache_read = raw.cached_content_token_count.unwrap_or(0).min(prompt);
    let thoughts = raw.thoughts_token_count.unwrap_or(0);
    Usage {
        input: prompt - cache_read,
        cache_read,
        cache_write: 0,
        output: raw.candidates_token_count.unwrap_or(0) + thoughts,
        reasoning: thoughts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(json: &str) -> Envelope<'_> {
        serde_json::from_str(json).expect("json")
    }

    /// What the stream path may leave unparsed: text-only events, never one that
    /// carries usage, an error, a wrapped envelope or a new model.
    #[test]
    fn only_text_events_are_told_apart_without_parsing() {
        let known = Some("gpt-4o-mini-2024-07-18");
        let skipped = [
            r#"{"id":"c","model":"gpt-4o-mini-2024-07-18","choices":[{"delta":{"content":"Hi"}}],"usage":null}"#,
            r#"{"id":"c", "model" : "gpt-4o-mini-2024-07-18", "usage" :	null}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            r#"{"type":"response.output_text.delta","item_id":"m","delta":"Hi","sequence_number":5}"#,
            r#"{"type":"ping"}"#,
            // A key's name inside a string is escaped, so never taken for the key.
            r#"{"choices":[{"delta":{"content":"say \"hello\""}}]}"#,
        ];
        for json in skipped {
            assert!(only_text(json.as_bytes(), known), "{json}");
        }
        let parsed = [
            r#"{"model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#,
            r#"{"model":"gpt-4o","choices":[{"delta":{"content":"Hi"}}]}"#,
            r#"{"candidates":[],"usageMetadata":{"promptTokenCount":1},"modelVersion":"gemini-2.5-flash"}"#,
            r#"{"type":"message_start","message":{"model":"claude","usage":{"input_tokens":5}}}"#,
            r#"{"type":"response.completed","response":{"usage":{"input_tokens":1}}}"#,
            r#"{"type":"error","error":{"type":"overloaded_error"}}"#,
            r#"{"choices":[{"delta":{"content":"the \"usage\" field"}}]}"#,
            r#"{"\u0075sage":{"prompt_tokens":1}}"#,
            // serde reads a struct from an array too, its fields in order.
            r#"[null,null,{"prompt_tokens":3,"completion_tokens":2},null,null,null,null,null,null,null,null,null]"#,
            r#" ["gpt-4o",null,null,null,null,null,null,null,null,null,null,null]"#,
        ];
        for json in parsed {
            assert!(!only_text(json.as_bytes(), known), "{json}");
        }
        assert!(!only_text(br#"{"model":"gpt-4o-mini-2024-07-18"}"#, None), "a first model is read");
    }

    #[test]
    fn the_word_mask_marks_exactly_the_bytes_looked_for() {
        for word in [*b"\"a\\\"\x80\xff\"\x22", *b"\xa2\x5c\xdc\x21\x23\x00\"\"", [0x22; 8], [0; 8], [0xff; 8]] {
            let mask = bytes_equal(u64::from_le_bytes(word), b'"');
            let expected: u64 = word.iter().enumerate().filter(|(_, b)| **b == b'"').map(|(i, _)| 0x80 << (8 * i)).sum();
            assert_eq!(mask, expected, "{word:x?}");
        }
        // Hits in every position of a word and in the tail.
        for at in 0..20 {
            let mut json = br#"{"a":"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}"#.to_vec();
            json.splice(at + 2..at + 2, br#"","usage":{"x":1},"b":""#.iter().copied());
            assert!(!only_text(&json, None), "{}", String::from_utf8_lossy(&json));
        }
    }

    /// The word-at-a-time scan answers as a plain loop over every quote and
    /// backslash does, on strings made of the pieces that matter.
    #[test]
    fn the_word_scan_agrees_with_a_byte_loop() {
        let reference = |data: &[u8], known: Option<&str>| {
            data.trim_ascii_start().first() == Some(&b'{')
                && (0..data.len()).filter(|&at| matches!(data[at], b'"' | b'\\')).all(|at| allowed_at(data, at, known))
        };
        let pieces: [&[u8]; 14] =
            [b"{", b"\"", b"\\", b"u", b"usage", b"model", b"m", b"e", b"r", b":", b"null", b"gpt", b" ", b"x"];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..200_000 {
            let mut json = b"{".to_vec();
            // xorshift: the same strings every run.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut bits = seed;
            for _ in 0..(seed % 24) {
                json.extend_from_slice(pieces[(bits % 14) as usize]);
                bits = bits.rotate_right(5);
            }
            for known in [None, Some("gpt")] {
                assert_eq!(only_text(&json, known), reference(&json, known), "{:?}", String::from_utf8_lossy(&json));
            }
        }
    }

    #[test]
    fn openai_cached_tokens_are_taken_out_of_input() {
        let e = envelope(
            r#"{"model":"gpt-4o-2024-08-06","usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,
            "prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":64}}}"#,
        );
        let usage = from_raw(Endpoint::ChatCompletions, e.usage.as_ref().expect("usage"));
        assert_eq!(usage, Usage { input: 86, cache_read: 1920, cache_write: 0, output: 300, reasoning: 64 });
    }

    #[test]
    fn responses_api_usage_is_read_from_its_own_names() {
        let e = envelope(
            r#"{"type":"response.completed","response":{"model":"o4-mini","usage":{"input_tokens":100,"input_tokens_details":{"cached_tokens":40},
            "output_tokens":50,"output_tokens_details":{"reasoning_tokens":30},"total_tokens":150}}}"#,
        );
        let inner = e.response.expect("response");
        let usage = from_raw(Endpoint::Responses, inner.usage.as_ref().expect("usage"));
        assert_eq!(usage, Usage { input: 60, cache_read: 40, cache_write: 0, output: 50, reasoning: 30 });
    }

    #[test]
    fn anthropic_cache_counts_are_on_top_and_deltas_are_cumulative() {
        let start = envelope(
            r#"{"type":"message_start","message":{"model":"claude-sonnet-4-5","usage":{"input_tokens":12,
            "cache_creation_input_tokens":1000,"cache_read_input_tokens":2000,"output_tokens":1}}}"#,
        );
        let mut raw = start.message.expect("message").usage.expect("usage");
        raw.merge(&envelope(r#"{"type":"message_delta","usage":{"output_tokens":40}}"#).usage.expect("usage"));
        raw.merge(&envelope(r#"{"type":"message_delta","usage":{"output_tokens":77}}"#).usage.expect("usage"));
        assert_eq!(from_raw(Endpoint::Messages, &raw), Usage { input: 12, cache_read: 2000, cache_write: 1000, output: 77, reasoning: 0 });
    }

    #[test]
    fn gemini_thoughts_are_output_and_cache_is_inside_prompt() {
        let e = envelope(
            r#"{"modelVersion":"gemini-2.5-flash","usageMetadata":{"promptTokenCount":1000,"cachedContentTokenCount":600,
            "candidatesTokenCount":200,"thoughtsTokenCount":300,"totalTokenCount":1500}}"#,
        );
        let usage = from_gemini(e.usage_metadata.as_ref().expect("usage"));
        assert_eq!(usage, Usage { input: 400, cache_read: 600, cache_write: 0, output: 500, reasoning: 300 });
    }

    #[test]
    fn errors_have_a_label() {
        let openai = envelope(r#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#);
        assert_eq!(openai.error.expect("error").label().as_deref(), Some("requests"));
        let anthropic = envelope(r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#);
        assert_eq!(anthropic.error.expect("error").label().as_deref(), Some("overloaded_error"));
        let gemini = envelope(r#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED"}}"#);
        assert_eq!(gemini.error.expect("error").label().as_deref(), Some("RESOURCE_EXHAUSTED"));
    }
}
