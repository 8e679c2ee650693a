//! A daemon that starts (or restarts) while calls are in flight sees connections from
//! their middle. It must meter no call it saw only part of, as if it were a whole one
//! (the previous daemon may have counted its start, and its request is unknown), and
//! it must meter the next calls on the same connection, which SDKs keep alive.

use super::*;
use crate::llm::{Exchange, Usage};

const CHAT_REQUEST: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_BODY: &str = r#"{"id":"c1","object":"chat.completion","model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":25,"completion_tokens":9,"total_tokens":34}}"#;

/// A live capture of one process, one write or read call per event.
struct Live {
    reassembler: Reassembler,
    out: Vec<Metered>,
    t: u64,
}

impl Live {
    fn new() -> Self {
        Self { reassembler: Reassembler::new(Limits::default()), out: Vec::new(), t: 1_000_000_000 }
    }

    fn call(&mut self, conn: u64, direction: Direction, bytes: &[u8]) -> &mut Self {
        self.t += 1_000_000;
        let payload = Payload::Data { direction, connection: conn, call_len: bytes.len() as u32, offset: 0, bytes: bytes.to_vec().into() };
        let event = CaptureEvent { timestamp_ns: self.t, tgid: 42, tid: 42, cgroup_id: 7, comm: "python3".into(), payload };
        self.reassembler.feed(&event, &mut self.out);
        self
    }

    fn write(&mut self, conn: u64, bytes: &[u8]) -> &mut Self {
        self.call(conn, Direction::Write, bytes)
    }

    fn read(&mut self, conn: u64, bytes: &[u8]) -> &mut Self {
        self.call(conn, Direction::Read, bytes)
    }

    /// An HTTP/1.1 chat call as python's http.client makes it: head and body in two
    /// writes, the response in two reads.
    fn h1_call(&mut self, conn: u64) -> &mut Self {
        let (head, body) = h1_request();
        let (response_head, response_body) = h1_response();
        self.write(conn, &head).write(conn, &body).read(conn, &response_head).read(conn, &response_body)
    }
}

fn h1_request() -> (Vec<u8>, Vec<u8>) {
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        CHAT_REQUEST.len()
    );
    (head.into_bytes(), CHAT_REQUEST.as_bytes().to_vec())
}

fn h1_response() -> (Vec<u8>, Vec<u8>) {
    let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", CHAT_BODY.len());
    (head.into_bytes(), CHAT_BODY.as_bytes().to_vec())
}

/// Each call's exchange and whether it is incomplete.
fn exchanges(calls: &[Metered]) -> Vec<(Exchange, bool)> {
    calls.iter().map(|m| (m.call.exchange, m.call.incomplete)).collect()
}

fn assert_one_whole_call(calls: &[Metered], exchange: Exchange) {
    assert_eq!(calls.len(), 1, "{calls:#?}");
    let c = &calls[0].call;
    assert!(!c.incomplete && c.status == Some(200), "{c:?}");
    assert_eq!(c.usage, Some(Usage { input: 25, output: 9, ..Usage::default() }));
    assert_eq!(c.exchange, exchange);
}

#[test]
fn a_response_whose_request_came_before_the_attach_is_not_metered() {
    let (response_head, response_body) = h1_response();
    // Attached after the request: the whole response, then only the tail of another.
    let mut live = Live::new();
    live.read(1, &response_head).read(1, &response_body);
    live.read(2, &response_body);
    assert!(live.out.is_empty(), "{:#?}", live.out);
    // The next calls on the same kept-alive connections are whole, and metered.
    live.h1_call(1);
    assert_one_whole_call(&live.out, Exchange::Http1 { request: 1 });
    live.out.clear();
    live.h1_call(2).h1_call(2);
    assert_eq!(live.out.len(), 2);
    assert_eq!(live.out[1].call.exchange, Exchange::Http1 { request: 2 }, "numbered in the order seen");
}

#[test]
fn a_request_body_whose_head_came_before_the_attach_is_not_metered() {
    let (_, body) = h1_request();
    let (response_head, response_body) = h1_response();
    let mut live = Live::new();
    live.write(1, &body).read(1, &response_head).read(1, &response_body);
    assert!(live.out.is_empty(), "{:#?}", live.out);
    live.h1_call(1);
    assert_one_whole_call(&live.out, Exchange::Http1 { request: 1 });
}

#[test]
fn a_response_seen_from_its_body_ends_its_call_and_the_next_response_is_read() {
    // The probes went live between a request and its response's first read: the
    // response is seen from its body on (bytes no head parse makes sense of).
    let (head, body) = h1_request();
    let (_, response_body) = h1_response();
    let mut live = Live::new();
    live.write(1, &head).write(1, &body).read(1, &response_body);
    live.h1_call(1).h1_call(1);
    assert_eq!(
        exchanges(&live.out),
        [(Exchange::Http1 { request: 1 }, true), (Exchange::Http1 { request: 2 }, false), (Exchange::Http1 { request: 3 }, false)],
        "{:#?}",
        live.out
    );
    assert_eq!(live.out[1].call.usage, Some(Usage { input: 25, output: 9, ..Usage::default() }));
    assert_eq!((live.reassembler.drops().broken_responses, live.reassembler.drops().not_http1), (1, 0));

    // A broken response in a read that does not begin the next one: reads are
    // skipped until one does, and what follows pairs up again.
    let mut live = Live::new();
    live.h1_call(2).write(2, &head).write(2, &body).read(2, b"garbage\r\n\r\n").read(2, &response_body[..10]);
    live.read(2, &response_body[10..]).h1_call(2);
    assert_eq!(
        exchanges(&live.out),
        [(Exchange::Http1 { request: 1 }, false), (Exchange::Http1 { request: 2 }, true), (Exchange::Http1 { request: 3 }, false)],
        "{:#?}",
        live.out
    );
}

#[test]
fn bytes_that_never_become_http_are_still_given_up_on() {
    let mut live = Live::new();
    for _ in 0..20 {
        live.write(1, b"\x00\x01binary protocol\r\n\r\n").read(1, b"\x02\x03reply");
    }
    assert!(live.out.is_empty());
    assert_eq!(live.reassembler.drops().not_http1, 1);
}

mod http2 {
    use super::*;
    use crate::{http::h2::PREFACE, reassembly::tests::http2::frame};

    const HEADERS: u8 = 1;
    const DATA: u8 = 0;
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;

    /// One chat call on `stream`, request and response, with encoders that share the
    /// connection's HPACK state.
    fn call(client: &mut loona_hpack::Encoder<'_>, server: &mut loona_hpack::Encoder<'_>, stream: u32) -> (Vec<u8>, Vec<u8>) {
        let fields: [(&[u8], &[u8]); 4] =
            [(b":method", b"POST"), (b":path", b"/v1/chat/completions"), (b":authority", b"api.openai.com"), (b":scheme", b"https")];
        let mut writes = frame(HEADERS, END_HEADERS, stream, &client.encode(fields));
        writes.extend(frame(DATA, END_STREAM, stream, CHAT_REQUEST.as_bytes()));
        let status: [(&[u8], &[u8]); 2] = [(b":status", b"200"), (b"content-type", b"application/json")];
        let mut reads = frame(HEADERS, END_HEADERS, stream, &server.encode(status));
        reads.extend(frame(DATA, END_STREAM, stream, CHAT_BODY.as_bytes()));
        (writes, reads)
    }

    #[test]
    fn a_connection_first_seen_by_a_read_is_metered_from_its_next_call() {
        let (mut client, mut server) = (loona_hpack::Encoder::new(), loona_hpack::Encoder::new());
        // What the previous daemon saw: the preface and stream 1's request.
        let (mut before, _) = call(&mut client, &mut server, 1);
        before.splice(0..0, PREFACE.iter().copied());
        // What this one sees first: the tail of stream 1's response.
        let tail = frame(DATA, END_STREAM, 1, CHAT_BODY.as_bytes());
        let (writes, reads) = call(&mut client, &mut server, 3);
        let mut live = Live::new();
        live.read(5, &tail).write(5, &writes).read(5, &reads);
        assert_eq!(live.out.len(), 1, "stream 3 only: {:#?}", live.out);
        let c = &live.out[0].call;
        assert_eq!(c.exchange, Exchange::Http2 { stream: 3 });
        assert!(!c.incomplete, "{c:?}");
        assert_eq!(c.usage.map(|u| (u.input, u.output)), Some((25, 9)));
    }

    #[test]
    fn streams_are_named_by_their_number() {
        let (mut client, mut server) = (loona_hpack::Encoder::new(), loona_hpack::Encoder::new());
        let (mut writes, reads) = call(&mut client, &mut server, 1);
        writes.splice(0..0, PREFACE.iter().copied());
        let (writes_3, reads_3) = call(&mut client, &mut server, 3);
        let mut live = Live::new();
        live.write(6, &writes).write(6, &writes_3).read(6, &reads_3).read(6, &reads);
        let streams: Vec<Exchange> = live.out.iter().map(|m| m.call.exchange).collect();
        assert_eq!(streams, [Exchange::Http2 { stream: 3 }, Exchange::Http2 { stream: 1 }]);
    }
}
