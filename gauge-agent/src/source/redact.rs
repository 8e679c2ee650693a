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
//! HTTP/2 header blocks are HPACK-compressed: Huffman-coded values are not plaintext,
//! and raw literal values are caught by the token pass.

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
    fn ordinary_text_is_untouched() {
        let input = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"task\":\"skim\"}";
        assert_eq!(redacted(&[input]), input);
    }
}
