//! Requests held at `SSL_write` entry, read back into what a policy checks: is it an
//! LLM request, which model, how many prompt tokens, which body, is it a retry. A
//! request may span several writes (head, then body): each write is decided on its
//! own, with the body seen so far. HTTP/2 writes (on connections already known as LLM
//! traffic) are read frame by frame: a HEADERS frame starts a request (its HPACK
//! block is left to reassembly), DATA frames are its body.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hasher as _},
};

use crate::{
    http::{Headers, RequestHead},
    llm::{estimate, providers},
};

/// Body bytes kept per held request: enough for any context ceiling worth checking.
const MAX_BODY: usize = 8 << 20;
/// Chunks of one call are at most this long; a shorter one is the call's last.
const CHUNK: usize = 16 * 1024;
/// Requests being assembled, per process; beyond this the oldest is dropped.
const MAX_PENDING: usize = 4096;

/// One held write, as far as it can be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldWrite {
    pub tgid: u32,
    pub connection: u64,
    /// The write begins a request (its head): it counts as a new request.
    pub new_request: bool,
    /// The request is to a known LLM API.
    pub llm: bool,
    pub model: Option<String>,
    /// Prompt tokens in the body seen so far.
    pub input_tokens: u64,
    /// Hash of the whole body, once complete (same hash as `LlmCall::body_hash`).
    pub body_hash: Option<u64>,
    /// The SDK says it is a retry (`x-stainless-retry-count` > 0).
    pub retry: bool,
}

#[derive(Debug, Default)]
struct Pending {
    body: Vec<u8>,
    content_length: Option<usize>,
    /// Bytes of the current write collected over its chunks.
    write: Vec<u8>,
    seq: u64,
    /// HTTP/2: request bodies by stream.
    streams: HashMap<u32, Vec<u8>>,
}

#[derive(Debug, Default)]
pub struct HeldRequests {
    pending: HashMap<(u32, u64), Pending>,
    seq: u64,
}

impl HeldRequests {
    /// Feeds one chunk of a held write; returns the write once its last chunk came.
    pub fn feed(&mut self, tgid: u32, connection: u64, call_len: u32, offset: u32, bytes: &[u8]) -> Option<HeldWrite> {
        if self.pending.len() >= MAX_PENDING && !self.pending.contains_key(&(tgid, connection)) {
            let oldest = self.pending.iter().min_by_key(|(_, p)| p.seq).map(|(k, _)| *k);
            if let Some(key) = oldest {
                self.pending.remove(&key);
            }
        }
        self.seq += 1;
        let pending = self.pending.entry((tgid, connection)).or_default();
        pending.seq = self.seq;
        let room = MAX_BODY.saturating_sub(pending.write.len());
        pending.write.extend_from_slice(&bytes[..bytes.len().min(room)]);
        let last = bytes.len() < CHUNK || offset as usize + bytes.len() >= call_len as usize;
        if !last {
            return None;
        }
        let write = std::mem::take(&mut pending.write);
        Some(read_write(pending, tgid, connection, &write))
    }

    /// The connection closed or the process ended: forget it.
    pub fn forget(&mut self, tgid: u32, connection: u64) {
        self.pending.remove(&(tgid, connection));
    }
}

/// One HTTP/2 frame: type, flags, stream, payload.
type Frame<'a> = (u8, u8, u32, &'a [u8]);

/// HTTP/2 frames of one write, if that is what it holds: the client preface and
/// whole frames only.
fn h2_frames(write: &[u8]) -> Option<Vec<Frame<'_>>> {
    let mut rest = write.strip_prefix(crate::http::h2::PREFACE).unwrap_or(write);
    let mut frames = Vec::new();
    while rest.len() >= 9 {
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
        let payload = rest.get(9..9 + len)?;
        frames.push((kind, flags, stream, payload));
        rest = &rest[9 + len..];
    }
    (rest.is_empty() && !frames.is_empty() && frames.iter().all(|(kind, ..)| *kind <= 9)).then_some(frames)
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const END_STREAM: u8 = 0x1;
const PADDED: u8 = 0x8;

fn read_h2(pending: &mut Pending, held: &mut HeldWrite, frames: &[Frame<'_>]) {
    let mut last = None;
    let mut ended = false;
    for &(kind, flags, stream, payload) in frames {
        match kind {
            HEADERS => {
                // Known LLM connection: every request on it is one.
                held.new_request = true;
                held.llm = true;
                pending.streams.insert(stream, Vec::new());
            }
            DATA => {
                let data = if flags & PADDED != 0 {
                    let pad = usize::from(payload.first().copied().unwrap_or(0));
                    payload.get(1..payload.len().saturating_sub(pad)).unwrap_or_default()
                } else {
                    payload
                };
                let body = pending.streams.entry(stream).or_default();
                let room = MAX_BODY.saturating_sub(body.len());
                body.extend_from_slice(&data[..data.len().min(room)]);
                last = Some(stream);
                ended = flags & END_STREAM != 0;
            }
            _ => {}
        }
    }
    if pending.streams.len() > 256 {
        pending.streams.clear();
    }
    let Some(stream) = last else { return };
    let body = if ended { pending.streams.remove(&stream).unwrap_or_default() } else { pending.streams.get(&stream).cloned().unwrap_or_default() };
    read_body(held, &body, ended);
}

fn read_write(pending: &mut Pending, tgid: u32, connection: u64, write: &[u8]) -> HeldWrite {
    let mut held = HeldWrite { tgid, connection, ..HeldWrite::default() };
    if !write.starts_with(b"POST ")
        && let Some(frames) = h2_frames(write)
    {
        read_h2(pending, &mut held, &frames);
        return held;
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let body = match request.parse(write) {
        Ok(httparse::Status::Complete(head_len)) => {
            let head = RequestHead {
                method: request.method.unwrap_or_default().to_owned(),
                path: request.path.unwrap_or_default().to_owned(),
                headers: Headers(request.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect()),
            };
            held.new_request = true;
            held.llm = providers::recognize(&head).is_some();
            held.retry = head.headers.get("x-stainless-retry-count").and_then(|v| v.parse::<u32>().ok()).is_some_and(|n| n > 0);
            pending.body.clear();
            pending.content_length = head.headers.get("content-length").and_then(|v| v.parse().ok());
            &write[head_len..]
        }
        // Not a head: the body of the request this connection began earlier.
        _ => write,
    };
    let room = MAX_BODY.saturating_sub(pending.body.len());
    pending.body.extend_from_slice(&body[..body.len().min(room)]);
    let complete = pending.content_length.is_none_or(|n| pending.body.len() >= n);
    read_body(&mut held, &pending.body, complete);
    held
}

/// Model, prompt tokens and (once complete) the body hash of a request body.
fn read_body(held: &mut HeldWrite, body: &[u8], complete: bool) {
    if body.is_empty() {
        return;
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(json) => {
            held.model = json.get("model").and_then(|m| m.as_str()).map(str::to_owned);
            let model = held.model.as_deref().unwrap_or("");
            held.input_tokens = estimate::count(model, &estimate::request_text(&json));
        }
        // An unfinished body: its raw text bounds the prompt's tokens from above.
        Err(_) => held.input_tokens = estimate::count("", &String::from_utf8_lossy(body)),
    }
    if complete {
        let mut hasher = DefaultHasher::new();
        hasher.write(body);
        held.body_hash = Some(hasher.finish());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\nx-stainless-retry-count: 1\r\ncontent-type: application/json\r\ncontent-length: ";

    #[test]
    fn a_request_in_one_write_is_read_whole() {
        let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello there"}]}"#;
        let write = format!("{HEAD}{}\r\n\r\n{body}", body.len());
        let held = HeldRequests::default().feed(1, 2, write.len() as u32, 0, write.as_bytes()).expect("one chunk");
        assert!(held.new_request && held.llm && held.retry);
        assert_eq!(held.model.as_deref(), Some("gpt-4o-mini"));
        assert!(held.input_tokens >= 2 && held.body_hash.is_some(), "{held:?}");
    }

    #[test]
    fn head_and_body_in_two_writes_are_decided_each() {
        let body = r#"{"model":"gpt-4o","messages":[]}"#;
        let head = format!("{HEAD}{}\r\n\r\n", body.len());
        let mut held = HeldRequests::default();
        let first = held.feed(1, 2, head.len() as u32, 0, head.as_bytes()).expect("head");
        assert!(first.new_request && first.llm && first.model.is_none() && first.body_hash.is_none());
        let second = held.feed(1, 2, body.len() as u32, 0, body.as_bytes()).expect("body");
        assert!(!second.new_request && second.body_hash.is_some());
        assert_eq!(second.model.as_deref(), Some("gpt-4o"));
    }

    #[test]
    fn http2_frames_give_the_stream_body() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
        let frame = |kind: u8, flags: u8, payload: &[u8]| {
            let mut f = vec![0, (payload.len() >> 8) as u8, payload.len() as u8, kind, flags, 0, 0, 0, 3];
            f.extend_from_slice(payload);
            f
        };
        let mut write = frame(HEADERS, 0x4, b"\x83\x86");
        write.extend(frame(DATA, END_STREAM, body));
        let held = HeldRequests::default().feed(1, 2, write.len() as u32, 0, &write).expect("one chunk");
        assert!(held.new_request && held.llm && held.body_hash.is_some());
        assert_eq!(held.model.as_deref(), Some("gpt-4o"));
    }

    #[test]
    fn a_large_write_is_decided_after_its_last_chunk() {
        let body = format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{}"}}]}}"#, "word ".repeat(8000));
        let write = format!("{HEAD}{}\r\n\r\n{body}", body.len());
        let mut held = HeldRequests::default();
        let bytes = write.as_bytes();
        assert!(held.feed(1, 2, bytes.len() as u32, 0, &bytes[..CHUNK]).is_none());
        let done = held.feed(1, 2, bytes.len() as u32, CHUNK as u32, &bytes[CHUNK..2 * CHUNK]).or_else(|| {
            held.feed(1, 2, bytes.len() as u32, 2 * CHUNK as u32, &bytes[2 * CHUNK..])
        });
        let done = done.expect("decided at the last chunk");
        assert!(done.input_tokens > 7000, "{}", done.input_tokens);
    }
}
