//! Incremental HTTP/1.1 decoder for one direction of a connection.
//!
//! Feed it bytes as they are captured; it yields message heads, body bytes (with
//! chunked transfer coding removed) and message ends. Heads are parsed with
//! `httparse`; bodies are framed by `Content-Length`, chunked coding, or the end of
//! the connection. Memory is bounded: at most `MAX_HEAD` bytes are buffered while a
//! head is incomplete, and body bytes are passed through (as ranges of the input),
//! never copied or accumulated.

use super::{Headers, RequestHead, ResponseHead};

/// Largest head accepted (request line or status line plus headers).
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;

/// What one direction carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Request(RequestHead),
    Response(ResponseHead),
    /// Body bytes of the current message, transfer coding removed: this range of
    /// the bytes given to the [`Decoder::feed`] call that produced the event (they
    /// are not copied; take them before feeding more).
    Body(std::ops::Range<usize>),
    /// The current message is complete.
    End,
}

/// Why the decoder gave up on this direction (it then ignores the rest).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum H1Error {
    #[error("not HTTP/1.x: {0}")]
    Malformed(String),
    #[error("message head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("bad chunked body: {0}")]
    Chunked(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Head,
    Fixed(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    UntilClose,
    Failed,
}

/// Decoder of one direction. For responses, tell it which requests were `HEAD`
/// (their responses have no body) through [`Decoder::expect_head_response`].
#[derive(Debug)]
pub struct Decoder {
    side: Side,
    state: State,
    buf: Vec<u8>,
    head_responses: std::collections::VecDeque<bool>,
}

impl Decoder {
    pub fn new(side: Side) -> Self {
        Self { side, state: State::Head, buf: Vec::new(), head_responses: Default::default() }
    }

    /// Records, in request order, whether each request was a `HEAD`.
    pub fn expect_head_response(&mut self, is_head: bool) {
        self.head_responses.push_back(is_head);
    }

    pub fn failed(&self) -> bool {
        self.state == State::Failed
    }

    /// No message is in progress: the next bytes begin one.
    pub fn between_messages(&self) -> bool {
        self.state == State::Head && self.buf.is_empty()
    }

    /// Bytes held while a head is incomplete (at most [`MAX_HEAD`]).
    pub fn buffered(&self) -> usize {
        self.buf.capacity()
    }

    /// Decodes `bytes`, appending events to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), H1Error> {
        if self.state == State::Failed {
            return Ok(());
        }
        let mut input = bytes;
        while !input.is_empty() || (self.state == State::Head && !self.buf.is_empty()) {
            let before = input.len();
            let at = bytes.len() - input.len();
            let progressed = match self.step(&mut input, at, out) {
                Ok(progressed) => progressed,
                Err(error) => {
                    self.state = State::Failed;
                    self.buf = Vec::new();
                    return Err(error);
                }
            };
            if !progressed && input.len() == before {
                break;
            }
        }
        Ok(())
    }

    /// The connection closed: a body framed by the close ends here.
    pub fn close(&mut self, out: &mut Vec<Event>) {
        if self.state == State::UntilClose {
            out.push(Event::End);
            self.state = State::Head;
        }
    }

    /// One state transition; returns whether anything happened besides consuming
    /// input. `input` begins at `at` in the bytes being fed.
    fn step(&mut self, input: &mut &[u8], at: usize, out: &mut Vec<Event>) -> Result<bool, H1Error> {
        match self.state {
            State::Head => self.head(input, out),
            State::Fixed(left) => {
                let n = (left.min(input.len() as u64)) as usize;
                out.push(Event::Body(at..at + n));
                *input = &input[n..];
                if left == n as u64 {
                    out.push(Event::End);
                    self.state = State::Head;
                } else {
                    self.state = State::Fixed(left - n as u64);
                }
                Ok(true)
            }
            State::UntilClose => {
                out.push(Event::Body(at..at + input.len()));
                *input = &[];
                Ok(true)
            }
            State::ChunkSize => {
                let Some(size) = self.line(input, |line| {
                    std::str::from_utf8(line).ok().and_then(|l| l.split(';').next()).and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                })?
                else {
                    return Ok(false);
                };
                let size = size.ok_or(H1Error::Chunked("chunk size is not hexadecimal"))?;
                self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                Ok(true)
            }
            State::ChunkData(left) => {
                let n = (left.min(input.len() as u64)) as usize;
                out.push(Event::Body(at..at + n));
                *input = &input[n..];
                self.state = if left == n as u64 { State::ChunkDataEnd } else { State::ChunkData(left - n as u64) };
                Ok(true)
            }
            State::ChunkDataEnd => {
                let Some(empty) = self.line(input, <[u8]>::is_empty)? else { return Ok(false) };
                if !empty {
                    return Err(H1Error::Chunked("chunk data not followed by CRLF"));
                }
                self.state = State::ChunkSize;
                Ok(true)
            }
            State::Trailers => {
                let Some(empty) = self.line(input, <[u8]>::is_empty)? else { return Ok(false) };
                if empty {
                    out.push(Event::End);
                    self.state = State::Head;
                }
                Ok(true)
            }
            State::Failed => Ok(false),
        }
    }

    /// Takes one CRLF-terminated line and gives it (without the CRLF) to `read`,
    /// buffering partial lines. A line wholly in `input` is read in place: chunk
    /// framing has two lines per chunk, and this runs for every chunk of a stream.
    fn line<R>(&mut self, input: &mut &[u8], read: impl FnOnce(&[u8]) -> R) -> Result<Option<R>, H1Error> {
        fn strip_cr(line: &[u8]) -> &[u8] {
            line.strip_suffix(b"\r").unwrap_or(line)
        }
        match memchr::memchr(b'\n', input) {
            Some(i) if self.buf.is_empty() => {
                let result = read(strip_cr(&input[..i]));
                *input = &input[i + 1..];
                Ok(Some(result))
            }
            Some(i) => {
                self.buf.extend_from_slice(&input[..i]);
                *input = &input[i + 1..];
                let result = read(strip_cr(&self.buf));
                self.buf.clear();
                Ok(Some(result))
            }
            None => {
                if self.buf.len() + input.len() > MAX_HEAD {
                    return Err(H1Error::Chunked("line too long"));
                }
                self.buf.extend_from_slice(input);
                *input = &[];
                Ok(None)
            }
        }
    }

    fn head(&mut self, input: &mut &[u8], out: &mut Vec<Event>) -> Result<bool, H1Error> {
        // Only look for the end of the head in what is new, plus 3 bytes of overlap.
        let scan_from = self.buf.len().saturating_sub(3);
        let take = input.len().min(MAX_HEAD + 1 - self.buf.len().min(MAX_HEAD));
        self.buf.extend_from_slice(&input[..take]);
        let end = find(&self.buf[scan_from..], b"\r\n\r\n").map(|i| scan_from + i + 4);
        let Some(end) = end else {
            if self.buf.len() > MAX_HEAD {
                return Err(H1Error::HeadTooLarge);
            }
            *input = &input[take..];
            return Ok(false);
        };
        // Bytes past the head's end go back to the input.
        let consumed_from_input = take - (self.buf.len() - end);
        *input = &input[consumed_from_input..];
        let head = std::mem::take(&mut self.buf);
        let head = &head[..end];
        match self.side {
            Side::Request => self.request_head(head, out),
            Side::Response => self.response_head(head, out),
        }
    }

    fn request_head(&mut self, head: &[u8], out: &mut Vec<Event>) -> Result<bool, H1Error> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut fields);
        match request.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(H1Error::Malformed("incomplete request head".into())),
            Err(e) => return Err(H1Error::Malformed(e.to_string())),
        }
        let headers = headers(request.headers);
        let method = request.method.unwrap_or_default().to_owned();
        let path = request.path.unwrap_or_default().to_owned();
        self.state = body_state(&headers, false, Side::Request)?;
        out.push(Event::Request(RequestHead { method, path, headers }));
        if self.state == State::Head {
            out.push(Event::End);
        }
        Ok(true)
    }

    fn response_head(&mut self, head: &[u8], out: &mut Vec<Event>) -> Result<bool, H1Error> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut fields);
        match response.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(H1Error::Malformed("incomplete response head".into())),
            Err(e) => return Err(H1Error::Malformed(e.to_string())),
        }
        let status = response.code.unwrap_or_default();
        let headers = headers(response.headers);
        if (100..200).contains(&status) && status != 101 {
            // Interim response: the final one follows; it answers no request alone.
            return Ok(true);
        }
        let is_head = self.head_responses.pop_front().unwrap_or(false);
        let bodiless = is_head || status == 204 || status == 304 || status == 101;
        self.state = body_state(&headers, bodiless, Side::Response)?;
        out.push(Event::Response(ResponseHead { status, headers }));
        if self.state == State::Head {
            out.push(Event::End);
        }
        Ok(true)
    }
}

fn headers(fields: &[httparse::Header<'_>]) -> Headers {
    Headers(fields.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect())
}

fn body_state(headers: &Headers, bodiless: bool, side: Side) -> Result<State, H1Error> {
    if bodiless {
        return Ok(State::Head);
    }
    if headers.get("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked")) {
        return Ok(State::ChunkSize);
    }
    match headers.get("content-length") {
        Some(len) => {
            let len: u64 = len.parse().map_err(|_| H1Error::Malformed(format!("content-length {len:?}")))?;
            Ok(if len == 0 { State::Head } else { State::Fixed(len) })
        }
        // A request without framing has no body; a response runs until close.
        None if side == Side::Request => Ok(State::Head),
        None => Ok(State::UntilClose),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event with its body bytes taken out of the input.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Head(Event),
        Body(Vec<u8>),
    }

    fn body(bytes: &[u8]) -> Seen {
        Seen::Body(bytes.to_vec())
    }

    /// Consecutive bodies joined, so tests are independent of piece size.
    fn decode_in_pieces(side: Side, bytes: &[u8], piece: usize) -> Vec<Seen> {
        let mut decoder = Decoder::new(side);
        let mut seen: Vec<Seen> = Vec::new();
        let mut out = Vec::new();
        for chunk in bytes.chunks(piece) {
            decoder.feed(chunk, &mut out).expect("valid");
            for event in out.drain(..) {
                match (seen.last_mut(), event) {
                    (Some(Seen::Body(acc)), Event::Body(range)) => acc.extend_from_slice(&chunk[range]),
                    (_, Event::Body(range)) => seen.push(Seen::Body(chunk[range].to_vec())),
                    (_, event) => seen.push(Seen::Head(event)),
                }
            }
        }
        decoder.close(&mut out);
        seen.extend(out.into_iter().map(Seen::Head));
        seen.retain(|e| !matches!(e, Seen::Body(b) if b.is_empty()));
        seen
    }

    #[test]
    fn pipelined_requests_split_anywhere_decode_the_same() {
        let bytes = b"POST /v1/chat/completions HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n\r\nhelloGET /a HTTP/1.1\r\nHost: api\r\n\r\n";
        let whole = decode_in_pieces(Side::Request, bytes, bytes.len());
        for piece in [1, 2, 3, 7, 16] {
            assert_eq!(decode_in_pieces(Side::Request, bytes, piece), whole, "piece {piece}");
        }
        assert!(matches!(&whole[0], Seen::Head(Event::Request(h)) if h.method == "POST" && h.path == "/v1/chat/completions"));
        assert_eq!(whole[1], body(b"hello"));
        assert_eq!(whole[2], Seen::Head(Event::End));
        assert!(matches!(&whole[3], Seen::Head(Event::Request(h)) if h.path == "/a"));
        assert_eq!(whole[4], Seen::Head(Event::End));
    }

    #[test]
    fn chunked_responses_lose_their_coding() {
        let bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n";
        for piece in [1, 4, bytes.len()] {
            let events = decode_in_pieces(Side::Response, bytes, piece);
            assert!(matches!(&events[0], Seen::Head(Event::Response(h)) if h.status == 200));
            assert_eq!(events[1], body(b"hello world"));
            assert_eq!(events[2], Seen::Head(Event::End));
            assert_eq!(events.len(), 3);
        }
    }

    #[test]
    fn interim_and_bodiless_responses_are_framed_right() {
        let mut decoder = Decoder::new(Side::Response);
        decoder.expect_head_response(false);
        decoder.expect_head_response(true);
        let mut out = Vec::new();
        let bytes = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        decoder.feed(bytes, &mut out).expect("valid");
        let statuses: Vec<u16> = out.iter().filter_map(|e| if let Event::Response(h) = e { Some(h.status) } else { None }).collect();
        assert_eq!(statuses, vec![204, 200]);
        assert_eq!(out.iter().filter(|e| **e == Event::End).count(), 2, "HEAD's response has no body");
    }

    #[test]
    fn a_body_framed_by_close_ends_at_close() {
        let events = decode_in_pieces(Side::Response, b"HTTP/1.0 200 OK\r\n\r\nstream until close", 5);
        assert_eq!(events[1], body(b"stream until close"));
        assert_eq!(events[2], Seen::Head(Event::End));
    }

    #[test]
    fn garbage_and_oversized_heads_are_errors_not_panics() {
        let mut decoder = Decoder::new(Side::Request);
        let mut out = Vec::new();
        assert!(decoder.feed(b"\x16\x03\x01 binary\r\n\r\n", &mut out).is_err());
        assert!(decoder.failed());
        assert!(decoder.feed(b"GET / HTTP/1.1\r\n\r\n", &mut out).is_ok(), "a failed decoder ignores input");
        let mut decoder = Decoder::new(Side::Request);
        let huge = vec![b'a'; MAX_HEAD + 10];
        assert_eq!(decoder.feed(&huge, &mut out), Err(H1Error::HeadTooLarge));
        let mut decoder = Decoder::new(Side::Response);
        assert!(decoder.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", &mut out).is_err());
    }
}
