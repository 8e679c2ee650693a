//! Redaction of credentials in captured plaintext, so that recordings can be shared
//! and committed as test fixtures.
//!
//! Two passes, both length-preserving (so offsets and `Content-Length` stay true and
//! a redacted recording still parses):
//! - HTTP/1 header values of credential headers are replaced by `*`, with the state
//!   carried across chunks of one stream (a header may straddle two writes).
//! - Key-shaped tokens anywhere (`sk-...`, `AIza...`) are replaced too. A token split
//!   across two chunks is only caught in the chunk holding its prefix.
//!
//! HTTP/2 header blocks are HPACK-compressed: credentials in them are Huffman-coded,
//! invisible to both passes but decodable by anyone. So on HTTP/2 connections every
//! header block is blanked whole ([`H2HeaderBlanker`]), keeping frame lengths, padding
//! and priority fields. A replay then sees undecodable header blocks and meters those
//! streams from their bodies, as after a mid-connection attach.

use std::sync::LazyLock;

use regex::bytes::Regex;

/// Headers whose values are credentials (compared case-insensitively).
pub const SECRET_HEADERS: [&str; 7] =
    ["authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie", "set-cookie"];

const LONGEST_NAME: usize = 19;

static KEY_TOKENS: LazyLock<Option<Regex>> = LazyLock::new(|| {
    // OpenAI/Anthropic/OpenRouter/Groq (`sk-...`, `gsk_...`) and Google (`AIza...`) keys.
    Regex::new(r"(?:\bsk-|\bgsk_|\bAIza)[A-Za-z0-9_\-]{16,}").ok()
});

#[derive(Debug, Clone, Default)]
enum Line {
    /// At the start of a line, collecting what may be a header name.
    #[default]
    Name,
    /// Inside a credential header's value.
    Secret,
    /// Elsewhere on a line that needs no redaction.
    Other,
}

/// Redaction state of one direction of one connection.
#[derive(Debug, Clone, Default)]
pub struct StreamRedactor {
    line: Line,
    name: Vec<u8>,
}

impl StreamRedactor {
    /// Redacts `bytes`, the next chunk of this stream, in place.
    pub fn redact(&mut self, bytes: &mut [u8]) {
        for byte in bytes.iter_mut() {
            match self.line {
                Line::Name => match *byte {
                    b'\n' => self.name.clear(),
                    b':' => {
                        let secret = SECRET_HEADERS.iter().any(|h| h.as_bytes().eq_ignore_ascii_case(&self.name));
                        self.line = if secret { Line::Secret } else { Line::Other };
                        self.name.clear();
                    }
                    b if self.name.len() < LONGEST_NAME && (b.is_ascii_alphanumeric() || b == b'-') => self.name.push(b),
                    _ => {
                        self.line = Line::Other;
                        self.name.clear();
                    }
                },
                Line::Secret => match *byte {
                    b'\n' => self.line = Line::Name,
                    b'\r' | b' ' | b'\t' => {}
                    _ => *byte = b'*',
                },
                Line::Other => {
                    if *byte == b'\n' {
                        self.line = Line::Name;
                    }
                }
            }
        }
        redact_tokens(bytes);
    }
}

/// Blanks the header blocks of one direction of an HTTP/2 connection, fed in chunks.
#[derive(Debug, Clone)]
pub struct H2HeaderBlanker {
    /// Bytes of the client preface still to pass untouched.
    preface_left: usize,
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u32,
    /// Payload bytes at the frame's start to keep (pad length, priority, promised id).
    keep: u32,
    blank: bool,
}

impl H2HeaderBlanker {
    /// `client`: the direction starts with the connection preface.
    pub fn new(client: bool) -> Self {
        let preface_left = if client { crate::http::h2::PREFACE.len() } else { 0 };
        Self { preface_left, header: [0; 9], header_len: 0, payload_left: 0, keep: 0, blank: false }
    }

    pub fn redact(&mut self, bytes: &mut [u8]) {
        for byte in bytes.iter_mut() {
            if self.preface_left > 0 {
                self.preface_left -= 1;
            } else if self.payload_left > 0 {
                self.payload_left -= 1;
                if self.keep > 0 {
                    self.keep -= 1;
                } else if self.blank {
                    // 0xFF starts an HPACK integer that never ends: the block cannot decode.
                    *byte = 0xff;
                }
            } else {
                self.header[self.header_len] = *byte;
                self.header_len += 1;
                if self.header_len == 9 {
                    self.header_len = 0;
                    let h = self.header;
                    self.payload_left = (u32::from(h[0]) << 16) | (u32::from(h[1]) << 8) | u32::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    let padded = u32::from(flags & 0x8 != 0);
                    (self.blank, self.keep) = match kind {
                        1 => (true, padded + if flags & 0x20 != 0 { 5 } else { 0 }),
                        5 => (true, padded + 4),
                        9 => (true, 0),
                        _ => (false, 0),
                    };
                }
            }
        }
    }
}

/// Replaces key-shaped tokens with `*`, keeping their prefix so a reader sees what
/// kind of key was there.
pub fn redact_tokens(bytes: &mut [u8]) {
    let Some(regex) = KEY_TOKENS.as_ref() else { return };
    let ranges: Vec<(usize, usize)> = regex.find_iter(bytes).map(|m| (m.start(), m.end())).collect();
    for (start, end) in ranges {
        let keep = if bytes[start..].starts_with(b"AIza") { 4 } else { 3 };
        bytes[start + keep..end].fill(b'*');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redacted(chunks: &[&str]) -> String {
        let mut r = StreamRedactor::default();
        let mut out = String::new();
        for chunk in chunks {
            let mut bytes = chunk.as_bytes().to_vec();
            r.redact(&mut bytes);
            out.push_str(std::str::from_utf8(&bytes).expect("utf8"));
        }
        out
    }

    #[test]
    fn credential_headers_are_blanked_with_length_kept() {
        let input = "POST /v1/chat HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer abc.def\r\nX-Api-Key: k1\r\n\r\n{}";
        let out = redacted(&[input]);
        assert_eq!(out.len(), input.len());
        assert!(out.contains("Authorization: ****** *******\r\n"));
        assert!(out.contains("X-Api-Key: **\r\n"));
        assert!(out.contains("Host: api\r\n"));
        assert!(out.ends_with("\r\n\r\n{}"));
    }

    #[test]
    fn a_header_split_across_chunks_is_still_redacted() {
        let out = redacted(&["GET / HTTP/1.1\r\nx-goog-ap", "i-key: sec", "ret\r\nAccept: */*\r\n\r\n"]);
        assert!(out.contains("x-goog-api-key: ******\r\n"), "{out}");
        assert!(out.contains("Accept: */*"));
    }

    #[test]
    fn key_shaped_tokens_are_blanked_anywhere() {
        let out = redacted(&["{\"api_key\": \"sk-proj-ABCDEFGHIJKLMNOPQRST\", \"g\": \"AIzaSyA1234567890123456789\"}"]);
        assert!(!out.contains("ABCDEFGHIJ"), "{out}");
        assert!(out.contains("sk-*******"));
        assert!(out.contains("AIza*****"));
    }

    #[test]
    fn http2_header_blocks_are_blanked_and_frames_kept() {
        use crate::http::h2::{Decoder, Event, PREFACE};
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([(&b":method"[..], &b"POST"[..]), (b":path", b"/v1/messages"), (b"authorization", b"Bearer sk-secret-value")]);
        let frame = |kind: u8, flags: u8, payload: &[u8]| {
            let mut f = vec![0, (payload.len() >> 8) as u8, payload.len() as u8, kind, flags, 0, 0, 0, 1];
            f.extend_from_slice(payload);
            f
        };
        let mut padded = vec![2u8];
        padded.extend_from_slice(&block);
        padded.extend_from_slice(&[0, 0]);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(1, 0x4 | 0x8, &padded));
        bytes.extend(frame(0, 0x1, b"{\"model\":\"m\"}"));
        let original = bytes.clone();
        let mut blanker = H2HeaderBlanker::new(true);
        for chunk in bytes.chunks_mut(5) {
            blanker.redact(chunk);
        }
        assert_eq!(bytes.len(), original.len());
        assert!(!bytes.windows(block.len()).any(|w| w == block.as_slice()), "the header block is gone");
        let mut decoder = Decoder::new(true, true);
        let mut events = Vec::new();
        decoder.feed(&bytes, &mut events).expect("frames still parse");
        assert_eq!(events[0], Event::HpackDesync { stream: 1 });
        assert!(matches!(&events[1], Event::Data { bytes, .. } if bytes.as_slice() == b"{\"model\":\"m\"}"));
    }

    #[test]
    fn ordinary_text_is_untouched() {
        let input = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"task\":\"skim\"}";
        assert_eq!(redacted(&[input]), input);
    }
}
