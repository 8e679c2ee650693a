//! Token estimates for calls whose response reports no usage (a stream without
//! `include_usage`, an interrupted stream, a server that omits it), with the
//! tokenizer of the model's family. Encoders load lazily, on first use.
//!
//! Exact for OpenAI models (o200k_base for the GPT-4o/4.1/5 and o-series families,
//! cl100k_base for GPT-4 and GPT-3.5); for other providers' models cl100k_base is an
//! approximation, which is why such counts carry `source="estimated"`.

use tiktoken_rs::CoreBPE;

/// The encoding of a model family.
pub fn encoding_for(model: &str) -> &'static CoreBPE {
    let m = model.to_ascii_lowercase();
    let o200k = ["gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o", "gpt-oss"]
        .iter()
        .any(|prefix| m.starts_with(prefix));
    if o200k { tiktoken_rs::o200k_base_singleton() } else { tiktoken_rs::cl100k_base_singleton() }
}

/// Tokens of `text` for `model`.
pub fn count(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    encoding_for(model).encode_ordinary(text).len() as u64
}

/// The text of a request's prompt: every string under the fields that carry it
/// (`messages`, `system`, `input`, `instructions`, `prompt`, `contents`, `tools`).
pub fn request_text(body: &serde_json::Value) -> String {
    let mut text = String::new();
    if let serde_json::Value::Object(fields) = body {
        for key in ["system", "instructions", "messages", "input", "prompt", "contents", "tools"] {
            if let Some(value) = fields.get(key) {
                strings(value, &mut text);
            }
        }
    }
    text
}

fn strings(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::String(s) => {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(s);
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        serde_json::Value::Object(fields) => {
            // Keys such as "role" and "type" are structure, not prompt text.
            for (key, v) in fields {
                if !matches!(key.as_str(), "role" | "type" | "id" | "tool_call_id" | "cache_control" | "mime_type" | "mimeType") {
                    strings(v, out);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_families_get_their_encoding() {
        // "hello world" is two tokens in both encodings; the encodings differ elsewhere.
        assert_eq!(count("gpt-4o-mini", "hello world"), 2);
        assert_eq!(count("gpt-4", "hello world"), 2);
        let text = "日本語のテキスト and some emoji 🙂 with code fn main() {}";
        assert_ne!(count("gpt-4o", text), count("gpt-3.5-turbo", text), "o200k and cl100k differ");
        assert_eq!(count("anything", ""), 0);
    }

    #[test]
    fn prompt_text_is_gathered_from_every_provider_shape() {
        let openai: serde_json::Value = serde_json::from_str(
            r#"{"model":"gpt-4o","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi there"}]}]}"#,
        ).expect("json");
        assert_eq!(request_text(&openai), "Be brief.\nHi there");
        let gemini: serde_json::Value =
            serde_json::from_str(r#"{"contents":[{"role":"user","parts":[{"text":"Why is the sky blue?"}]}]}"#).expect("json");
        assert_eq!(request_text(&gemini), "Why is the sky blue?");
    }
}
