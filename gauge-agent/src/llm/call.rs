//! Following one recognised exchange from request to end, incrementally: request
//! body (for model and stream flags), response head, response body as a whole JSON
//! document or as a stream of server-sent events.

use std::hash::{DefaultHasher, Hasher as _};


use super::{
    Endpoint, Exchange, Provider, Recognized, estimate,
    request::RequestContext,
    usage::{self, Envelope, GeminiUsage, RawUsage, Usage},
};
use crate::http::{RequestHead, ResponseHead, encoding::ContentDecoder, sse};

/// Request bytes kept to read the model and stream flags from.
pub const MAX_REQUEST_BODY: usize = 8 << 20;
/// Bytes of a non-streamed response body kept to read usage from.
pub const MAX_RESPONSE_BODY: usize = 16 << 20;

/// A finished LLM call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmCall {
    pub provider: Provider,
    pub endpoint: Endpoint,
    pub request_model: Option<String>,
    pub response_model: Option<String>,
    /// HTTP status; `None` when no response came.
    pub status: Option<u16>,
    pub stream: bool,
    /// Event times, CLOCK_MONOTONIC ns.
    pub start_ns: u64,
    pub first_byte_ns: Option<u64>,
    pub first_token_ns: Option<u64>,
    pub end_ns: u64,
    pub error_type: Option<String>,
    pub request_id: Option<String>,
    /// Token usage: reported by the provider, else estimated from the text seen.
    pub usage: Option<Usage>,
    pub usage_source: UsageSource,
    /// `x-stainless-retry-count` of the official SDKs.
    pub retry_count: Option<u32>,
    /// Hash of the request body, to spot repeated requests.
    pub body_hash: u64,
    /// The exchange was cut short (connection closed, evicted, bytes lost).
    pub incomplete: bool,
    /// Recognised from bodies only (HTTP/2 headers not decodable): status unknown.
    pub by_shape: bool,
    /// Headers and body fields attribution reads (no credentials).
    pub request: RequestContext,
    /// Which exchange on its connection (for the call's identity in logs).
    pub exchange: Exchange,
}

#[cfg(test)]
impl LlmCall {
    /// A plain finished chat call with the given status, for tests.
    pub(crate) fn for_test(status: Option<u16>) -> Self {
        Self {
            provider: Provider::OpenAi,
            endpoint: Endpoint::ChatCompletions,
            request_model: Some("gpt-4o-mini".into()),
            response_model: None,
            status,
            stream: false,
            start_ns: 0,
            first_byte_ns: None,
            first_token_ns: None,
            end_ns: 0,
            error_type: None,
            request_id: None,
            usage: None,
            usage_source: UsageSource::None,
            retry_count: None,
            body_hash: 0,
            incomplete: false,
            by_shape: false,
            request: RequestContext::default(),
            exchange: Exchange::Unknown,
        }
    }
}

/// Where a call's token counts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The provider's response said so: exact.
    Reported,
    /// Counted by Gauge with the model family's tokenizer.
    Estimated,
    /// No usage and nothing to estimate from.
    None,
}

impl UsageSource {
    pub fn label(self) -> &'static str {
        match self {
            Self::Reported => "reported",
            Self::Estimated => "estimated",
            Self::None => "none",
        }
    }
}

/// Text kept per call for estimates (bytes).
const MAX_TEXT: usize = 4 << 20;
/// Stream events kept unparsed per call (bytes), for their text should an estimate
/// need it; past this they are parsed and their text kept instead.
const MAX_DEFERRED: usize = 256 << 10;

impl LlmCall {
    /// The model to report: what the provider answered, else what was asked.
    pub fn model(&self) -> &str {
        self.response_model.as_deref().or(self.request_model.as_deref()).unwrap_or("unknown")
    }
}


/// Appends what fits of `bytes` under `max`, growing the buffer (by doubling) never
/// past `max` itself: plain doubling near the cap would reserve up to twice it.
/// Returns whether bytes were cut.
fn append_capped(buf: &mut Vec<u8>, bytes: &[u8], max: usize) -> bool {
    let take = bytes.len().min(max.saturating_sub(buf.len()));
    let needed = buf.len() + take;
    if needed > buf.capacity() {
        let grown = buf.capacity().saturating_mul(2).max(needed).min(max);
        buf.reserve_exact(grown - buf.len());
    }
    buf.extend_from_slice(&bytes[..take]);
    take < bytes.len()
}

/// Usage as it accumulates over a stream.
#[derive(Debug, Default)]
enum Reported {
    #[default]
    None,
    Raw(RawUsage),
    Gemini(GeminiUsage),
}

#[derive(Debug)]
pub struct CallTracker {
    recognized: Recognized,
    start_ns: u64,
    retry_count: Option<u32>,
    request_body: Vec<u8>,
    request_body_cut: bool,
    hasher: DefaultHasher,
    request_model: Option<String>,
    stream_requested: bool,
    response: Option<ResponseHead>,
    first_byte_ns: Option<u64>,
    first_token_ns: Option<u64>,
    sse: Option<sse::Decoder>,
    encoding: Option<ContentDecoder>,
    /// The body could not be decoded (unknown or corrupt content encoding).
    undecodable: bool,
    body: Vec<u8>,
    body_cut: bool,
    reported: Reported,
    response_model: Option<String>,
    error_type: Option<String>,
    /// Prompt text, for an estimate if the response reports no usage.
    request_text: String,
    /// Generated text seen so far, for the same reason.
    output_text: String,
    /// The request makes the provider report usage at the end of a stream: only
    /// then are text-only events left unparsed (else their text is wanted anyway).
    usage_expected: bool,
    /// Stream events that carry only text, not parsed yet (each after its length as
    /// u32): their text is wanted only if no usage comes, so they are parsed then,
    /// or when this fills up, and dropped once usage is reported.
    deferred: Vec<u8>,
    /// Recognised from the request body, without headers.
    by_shape: bool,
    request: RequestContext,
    exchange: Exchange,
}

impl CallTracker {
    pub fn new(recognized: Recognized, head: &RequestHead, start_ns: u64) -> Self {
        let retry_count = head.headers.get("x-stainless-retry-count").and_then(|v| v.parse().ok());
        Self {
            stream_requested: recognized.path_stream,
            request_model: recognized.path_model.clone(),
            recognized,
            start_ns,
            retry_count,
            request_body: Vec::new(),
            request_body_cut: false,
            hasher: Default::default(),
            response: None,
            first_byte_ns: None,
            first_token_ns: None,
            sse: None,
            encoding: None,
            undecodable: false,
            body: Vec::new(),
            body_cut: false,
            reported: Reported::None,
            response_model: None,
            error_type: None,
            request_text: String::new(),
            output_text: String::new(),
            usage_expected: false,
            deferred: Vec::new(),
            by_shape: false,
            request: RequestContext::from_headers(&head.headers),
            exchange: Exchange::Unknown,
        }
    }

    /// Where on its connection this call is (reassembly knows, the tracker does not).
    pub fn set_exchange(&mut self, exchange: Exchange) {
        self.exchange = exchange;
    }

    /// A call recognised from its request body alone (see `providers::recognize_body`);
    /// the body has been read already.
    pub fn from_body(recognized: Recognized, body: &[u8], start_ns: u64) -> Self {
        let head = RequestHead { method: "POST".into(), path: String::new(), headers: Default::default() };
        let mut call = Self::new(recognized, &head, start_ns);
        call.by_shape = true;
        call.request_body(body);
        call.request_end();
        call
    }

    /// Bytes this call holds: bodies and texts kept (each capped), the SSE and
    /// decompression state.
    pub fn buffered(&self) -> usize {
        self.request_body.capacity()
            + self.body.capacity()
            + self.request_text.capacity()
            + self.output_text.capacity()
            + self.deferred.capacity()
            + self.sse.as_ref().map_or(0, sse::Decoder::buffered)
            + self.encoding.as_ref().map_or(0, ContentDecoder::state_bytes)
    }

    pub fn request_body(&mut self, bytes: &[u8]) {
        // Raw bytes, no length prefix: the hash must not depend on how reads split.
        self.hasher.write(bytes);
        self.request_body_cut |= append_capped(&mut self.request_body, bytes, MAX_REQUEST_BODY);
    }

    /// The request is complete: read the model and whether a stream was asked for.
    pub fn request_end(&mut self) {
        let body = std::mem::take(&mut self.request_body);
        if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) {
            if let Some(model) = json.get("model").and_then(|m| m.as_str()) {
                self.request_model = Some(model.to_owned());
            }
            self.stream_requested |= json.get("stream").and_then(|s| s.as_bool()).unwrap_or(false);
            // Chat completions stream usage only when asked; the other APIs always do.
            self.usage_expected = self.recognized.endpoint != Endpoint::ChatCompletions
                || json.pointer("/stream_options/include_usage").and_then(serde_json::Value::as_bool) == Some(true);
            self.request_text = estimate::request_text(&json);
            self.request.read_body(&json);
            self.request_text.truncate(floor_char_boundary(&self.request_text, MAX_TEXT));
        }
    }

    pub fn response_head(&mut self, head: ResponseHead) {
        let event_stream = head.headers.get("content-type").is_some_and(|t| t.starts_with("text/event-stream"));
        if event_stream {
            self.sse = Some(sse::Decoder::default());
        }
        match ContentDecoder::for_encoding(head.headers.get("content-encoding")) {
            Ok(decoder) => self.encoding = (!decoder.is_identity()).then_some(decoder),
            Err(_) => self.undecodable = true,
        }
        self.response = Some(head);
    }

    pub fn response_body(&mut self, bytes: &[u8], at_ns: u64) {
        if bytes.is_empty() || self.undecodable {
            return;
        }
        if self.first_byte_ns.is_none() && self.by_shape && self.response.is_none() {
            // No headers to name the encoding: recognise gzip and zstd by their magic.
            let encoding = match bytes {
                [0x1f, 0x8b, ..] => Some("gzip"),
                [0x28, 0xb5, 0x2f, 0xfd, ..] => Some("zstd"),
                _ => None,
            };
            self.encoding = encoding.and_then(|e| ContentDecoder::for_encoding(Some(e)).ok());
        }
        self.first_byte_ns.get_or_insert(at_ns);
        match self.encoding.as_mut().map(|d| d.decode(bytes)) {
            None => self.decoded_body(bytes, at_ns),
            Some(Ok(decoded)) => self.decoded_body(&decoded, at_ns),
            Some(Err(_)) => self.undecodable = true,
        }
    }

    fn decoded_body(&mut self, bytes: &[u8], at_ns: u64) {
        // Without a response head (headers not decodable), tell a stream by its bytes.
        if self.by_shape && self.response.is_none() && self.sse.is_none() && self.body.is_empty() {
            let start = bytes.trim_ascii_start();
            if start.starts_with(b"data:") || start.starts_with(b"event:") || start.starts_with(b":") {
                self.sse = Some(sse::Decoder::default());
            }
        }
        // Taken out while it hands over events, which borrow from it.
        if let Some(mut decoder) = self.sse.take() {
            decoder.feed(bytes, &mut |event| self.stream_event(event, at_ns));
            self.sse = Some(decoder);
            return;
        }
        self.body_cut |= append_capped(&mut self.body, bytes, MAX_RESPONSE_BODY);
    }

    fn stream_event(&mut self, event: &sse::SseEvent<'_>, at_ns: u64) {
        if event.data == "[DONE]" {
            return;
        }
        // Most events of a stream carry a token of text and nothing else: once the
        // first token is timed, and if usage is to come at the end, they are kept
        // unparsed, for an estimate that the usage will make needless (a
        // shape-recognised call still needs each event's type to tell the provider).
        if self.usage_expected
            && self.first_token_ns.is_some()
            && !self.by_shape
            && usage::only_text(event.data.as_bytes(), self.response_model.as_deref())
        {
            self.defer(event.data);
            return;
        }
        let Ok(envelope) = serde_json::from_str::<Envelope>(event.data) else { return };
        let kind = envelope.kind.as_deref().or(event.event).unwrap_or("");
        // The first event that carries content marks the first token.
        let content = match self.recognized.endpoint {
            Endpoint::Messages => kind == "content_block_delta",
            Endpoint::Responses => kind == "response.output_text.delta" || kind.ends_with(".delta"),
            _ => true,
        };
        if content {
            self.first_token_ns.get_or_insert(at_ns);
        }
        self.absorb(envelope);
    }

    /// Takes model, usage and error from one envelope (body or stream event).
    fn absorb(&mut self, envelope: Envelope<'_>) {
        // A call recognised by shape as chat may turn out to be Anthropic's Messages.
        if self.by_shape
            && self.recognized.endpoint == Endpoint::ChatCompletions
            && matches!(envelope.kind.as_deref(), Some("message" | "message_start" | "message_delta"))
        {
            self.recognized.endpoint = Endpoint::Messages;
            self.recognized.provider = Provider::Anthropic;
        }
        if self.output_text.len() < MAX_TEXT {
            // Earlier text first, unless usage is in this envelope: then no text is wanted.
            if !envelope.carries_usage() {
                self.parse_deferred();
            }
            envelope.output_text(&mut self.output_text);
        }
        let Envelope { model, model_version, usage, usage_metadata, response, message, error, .. } = envelope;
        if let Some(inner) = response.or(message) {
            self.absorb(*inner);
        }
        // Every chunk of a stream names the model: kept once, not copied each time.
        if let Some(model) = model.or(model_version)
            && self.response_model.as_deref() != Some(&*model)
        {
            self.response_model = Some(model.into_owned());
        }
        if let Some(raw) = usage {
            match &mut self.reported {
                Reported::Raw(acc) if self.recognized.endpoint == Endpoint::Messages => acc.merge(&raw),
                reported => *reported = Reported::Raw(raw),
            }
        }
        if let Some(gemini) = usage_metadata {
            self.reported = Reported::Gemini(gemini);
        }
        if let Some(error) = error {
            self.error_type = error.label();
        }
        if !matches!(self.reported, Reported::None) {
            self.deferred = Vec::new();
        }
    }

    /// Keeps a text-only stream event for [`Self::parse_deferred`].
    fn defer(&mut self, data: &str) {
        if !matches!(self.reported, Reported::None) || self.output_text.len() >= MAX_TEXT {
            return;
        }
        let Ok(len) = u32::try_from(data.len()) else { return };
        if self.deferred.len() + 4 + data.len() > MAX_DEFERRED {
            self.parse_deferred();
            if 4 + data.len() > MAX_DEFERRED {
                if let Ok(envelope) = serde_json::from_str::<Envelope>(data) {
                    envelope.output_text(&mut self.output_text);
                }
                return;
            }
        }
        self.deferred.extend_from_slice(&len.to_le_bytes());
        self.deferred.extend_from_slice(data.as_bytes());
    }

    /// The text of the deferred events, in order, into `output_text`.
    fn parse_deferred(&mut self) {
        let deferred = std::mem::take(&mut self.deferred);
        let mut rest = deferred.as_slice();
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let len = (u32::from_le_bytes(*len) as usize).min(tail.len());
            let (data, tail) = tail.split_at(len);
            if self.output_text.len() < MAX_TEXT
                && let Ok(envelope) = serde_json::from_slice::<Envelope>(data)
            {
                envelope.output_text(&mut self.output_text);
            }
            rest = tail;
        }
        // The buffer is kept for the stream's next events.
        self.deferred = deferred;
        self.deferred.clear();
    }

    /// The exchange is over; `complete` is false when it was cut short.
    pub fn finish(mut self, end_ns: u64, complete: bool) -> LlmCall {
        if let Some(mut decoder) = self.encoding.take() {
            match decoder.finish() {
                Ok(rest) if !self.undecodable => self.decoded_body(&rest, end_ns),
                Ok(_) => {}
                Err(_) => self.undecodable = true,
            }
        }
        let event_stream = self.sse.is_some();
        if let Some(mut decoder) = self.sse.take() {
            decoder.finish(&mut |event| self.stream_event(event, end_ns));
        } else if !self.body.is_empty() {
            let body = std::mem::take(&mut self.body);
            if let Ok(envelope) = serde_json::from_slice::<Envelope>(&body) {
                self.absorb(envelope);
            }
        }
        let status = self.response.as_ref().map(|r| r.status);
        if self.error_type.is_none() {
            self.error_type = match status {
                None if self.by_shape => None,
                None => Some("no_response".into()),
                Some(s) if s >= 400 => Some(format!("http_{s}")),
                _ => None,
            };
        }
        let endpoint = self.recognized.endpoint;
        if matches!(self.reported, Reported::None) {
            self.parse_deferred();
        }
        let (usage, usage_source) = match &self.reported {
            Reported::Raw(raw) => (Some(usage::from_raw(endpoint, raw)), UsageSource::Reported),
            Reported::Gemini(g) => (Some(usage::from_gemini(g)), UsageSource::Reported),
            // A provider bills the prompt of a call it answered, and what it streamed.
            Reported::None if status.is_some_and(|s| (200..300).contains(&s)) || (self.by_shape && status.is_none()) => {
                let model = self.response_model.as_deref().or(self.request_model.as_deref()).unwrap_or("");
                let input = estimate::count(model, &self.request_text);
                let output = estimate::count(model, &self.output_text);
                (Some(Usage { input, output, ..Usage::default() }), UsageSource::Estimated)
            }
            Reported::None => (None, UsageSource::None),
        };
        let request_id = self.response.as_ref().and_then(|r| {
            r.headers.get("x-request-id").or_else(|| r.headers.get("request-id")).map(str::to_owned)
        });
        LlmCall {
            provider: self.recognized.provider,
            endpoint,
            request_model: self.request_model,
            response_model: self.response_model,
            status,
            stream: self.stream_requested || event_stream,
            start_ns: self.start_ns,
            first_byte_ns: self.first_byte_ns,
            first_token_ns: self.first_token_ns.or(if self.stream_requested { None } else { self.first_byte_ns }),
            end_ns,
            error_type: self.error_type,
            request_id,
            usage,
            usage_source,
            retry_count: self.retry_count,
            body_hash: self.hasher.finish(),
            incomplete: !complete || self.body_cut || self.request_body_cut || self.undecodable,
            by_shape: self.by_shape,
            request: self.request,
            exchange: self.exchange,
        }
    }
}

/// The largest index <= `max` on a char boundary of `s`.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    (0..=max).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}
