//! HTTP stage: turns one direction of a connection's plaintext into messages.
//! `h1` for HTTP/1.1, `sse` for `text/event-stream` bodies.

pub mod encoding;
pub mod h1;
pub mod h2;
pub mod sse;

/// Header fields with lower-case names, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, Vec<u8>)>);

impl Headers {
    /// The first value of `name` (lower-case) as text, if it is UTF-8.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).and_then(|(_, v)| std::str::from_utf8(v).ok()).map(str::trim)
    }
}

/// Start of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub path: String,
    pub headers: Headers,
}

/// Start of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Headers,
}
