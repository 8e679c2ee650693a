//! Replays synthetic captures through reassembly and checks the calls that come out.

use super::*;
use crate::llm::{Endpoint, Exchange, Provider, Usage};

struct Capture {
    events: Vec<CaptureEvent>,
    t: u64,
}

impl Capture {
    fn new() -> Self {
        Self { events: Vec::new(), t: 1_000_000_000 }
    }

    /// One call's bytes, split into reads/writes of `piece` bytes.
    fn data(&mut self, conn: u64, direction: Direction, bytes: &[u8], piece: usize) -> &mut Self {
        for chunk in bytes.chunks(piece) {
            self.t += 1_000_000;
            self.events.push(CaptureEvent {
                timestamp_ns: self.t,
                tgid: 42,
                tid: 42,
                cgroup_id: 7,
                comm: "python3".into(),
                payload: Payload::Data { direction, connection: conn, call_len: chunk.len() as u32, offset: 0, bytes: chunk.to_vec().into() },
            });
        }
        self
    }

    fn close(&mut self, conn: u64) -> &mut Self {
        self.t += 1_000_000;
        self.events.push(CaptureEvent {
            timestamp_ns: self.t,
            tgid: 42,
            tid: 42,
            cgroup_id: 7,
            comm: "python3".into(),
            payload: Payload::Close { connection: conn },
        });
        self
    }

    fn replay(&self, limits: Limits) -> (Vec<Metered>, Reassembler) {
        let mut r = Reassembler::new(limits);
        let mut out = Vec::new();
        for e in &self.events {
            r.feed(e, &mut out);
        }
        (out, r)
    }
}

fn request(path: &str, host: &str, body: &str, extra: &str) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

fn json_response(status: u16, body: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nx-request-id: req_1\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

fn sse_response(events: &[&str]) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for e in events {
        out.extend_from_slice(format!("{:x}\r\n{e}\r\n", e.len()).as_bytes());
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Each call's exchange, status and whether it is incomplete.
fn outcomes(calls: &[Metered]) -> Vec<(Exchange, Option<u16>, bool)> {
    calls.iter().map(|m| (m.call.exchange, m.call.status, m.call.incomplete)).collect()
}

const CHAT_BODY: &str = r#"{"id":"c1","object":"chat.completion","model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":25,"completion_tokens":9,"total_tokens":34,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#;

#[test]
fn openai_chat_on_a_keep_alive_connection_is_metered_exactly() {
    let req = request("/v1/chat/completions", "api.openai.com", r#"{"model":"gpt-4o-mini","messages":[]}"#, "x-stainless-retry-count: 0\r\n");
    let mut cap = Capture::new();
    for piece in [7, 1000] {
        cap.data(1, Direction::Write, &req, piece).data(1, Direction::Read, &json_response(200, CHAT_BODY), piece);
    }
    let (calls, r) = cap.replay(Limits::default());
    assert_eq!(calls.len(), 2);
    for m in &calls {
        let c = &m.call;
        assert_eq!((c.provider, c.endpoint, c.status), (Provider::OpenAi, Endpoint::ChatCompletions, Some(200)));
        assert_eq!(c.request_model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(c.model(), "gpt-4o-mini-2024-07-18");
        assert_eq!(c.usage, Some(Usage { input: 25, cache_read: 0, cache_write: 0, output: 9, reasoning: 0 }));
        assert_eq!((c.retry_count, c.request_id.as_deref(), c.stream, c.incomplete), (Some(0), Some("req_1"), false, false));
        assert_eq!(m.origin.tgid, 42);
    }
    assert_eq!(calls[0].call.body_hash, calls[1].call.body_hash, "same body, however it was split");
    assert_eq!(r.open_connections(), 1);
}

#[test]
fn a_response_recorded_before_its_request_is_paired_with_it() {
    // Go reads on a goroutine of its own: a response's record can come before that
    // of the write that sent its request (emitted when the write returns).
    let req = request("/v1/chat/completions", "api.openai.com", r#"{"model":"gpt-4o-mini","messages":[]}"#, "");
    let resp = json_response(200, CHAT_BODY);
    let mut cap = Capture::new();
    cap.data(1, Direction::Write, &req, 4096).data(1, Direction::Read, &resp, 4096);
    // The request in several writes (Go's are at most 4 KiB): held until it is whole.
    cap.data(1, Direction::Read, &resp, 60).data(1, Direction::Write, &req, 40);
    cap.data(1, Direction::Write, &req, 4096).data(1, Direction::Read, &resp, 4096);
    let (calls, r) = cap.replay(Limits::default());
    let whole = |request| (Exchange::Http1 { request }, Some(200), false);
    assert_eq!(outcomes(&calls), [whole(1), whole(2), whole(3)]);
    assert!(calls.iter().all(|m| m.call.usage.map(|u| (u.input, u.output)) == Some((25, 9))));
    assert!(calls.iter().all(|m| m.call.request_model.as_deref() == Some("gpt-4o-mini")), "each request read whole: {calls:#?}");
    assert_eq!(r.drops().unanswered_responses, 0);

    // A response no request follows soon (a server's 408 before it closes) is not
    // taken for the next call's.
    let mut cap = Capture::new();
    cap.data(2, Direction::Write, &req, 4096).data(2, Direction::Read, &resp, 4096);
    cap.data(2, Direction::Read, b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n", 4096);
    cap.t += 5_000_000_000;
    cap.data(2, Direction::Write, &req, 4096).data(2, Direction::Read, &resp, 4096);
    let (calls, r) = cap.replay(Limits::default());
    assert_eq!(outcomes(&calls), [whole(1), whole(2)]);
    assert_eq!(r.drops().unanswered_responses, 1);
}

#[test]
fn streamed_chat_usage_comes_from_the_final_chunk() {
    let req = request(
        "/v1/chat/completions",
        "127.0.0.1:8443",
        r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        "",
    );
    let resp = sse_response(&[
        "data: {\"id\":\"c\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\ndata: [DONE]\n\n",
    ]);
    for piece in [1, 3, 64, 4096] {
        let mut cap = Capture::new();
        cap.data(3, Direction::Write, &req, 4096).data(3, Direction::Read, &resp, piece);
        let (calls, _) = cap.replay(Limits::default());
        assert_eq!(calls.len(), 1, "piece {piece}");
        let c = &calls[0].call;
        assert_eq!(c.provider, Provider::OpenAiCompatible);
        assert!(c.stream);
        assert_eq!(c.usage, Some(Usage { input: 3, cache_read: 8, cache_write: 0, output: 2, reasoning: 0 }));
        assert!(c.first_token_ns.is_some() && c.first_token_ns <= Some(c.end_ns));
    }
}

#[test]
fn a_stream_without_usage_is_estimated_with_the_model_tokenizer() {
    let req = request(
        "/v1/chat/completions",
        "api.openai.com",
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hello world"}]}"#,
        "",
    );
    let resp = sse_response(&[
        "data: {\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\n",
        "data: {\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\" there, friend\"}}]}\n\n",
        "data: [DONE]\n\n",
    ]);
    let mut cap = Capture::new();
    cap.data(3, Direction::Write, &req, 4096).data(3, Direction::Read, &resp, 9);
    let (calls, _) = cap.replay(Limits::default());
    let c = &calls[0].call;
    assert_eq!(c.usage_source, crate::llm::UsageSource::Estimated);
    let expected_output = crate::llm::estimate::count("gpt-4o-mini", "Hello there, friend");
    assert_eq!(c.usage, Some(Usage { input: 2, output: expected_output, ..Usage::default() }));
    assert!(!c.incomplete);
}

/// Text-only stream events are kept unparsed until an estimate needs them: what is
/// estimated must be all the text, in order, however many events there were, cut
/// or not, and whatever events in between were parsed.
#[test]
fn estimates_count_all_the_text_of_long_and_cut_streams() {
    let req = request(
        "/v1/chat/completions",
        "api.openai.com",
        r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        "",
    );
    // Past the unparsed events' cap (256 KiB), with a parsed event now and then.
    let mut events = Vec::new();
    let mut text = String::new();
    for i in 0..4000 {
        let model = if i % 997 == 5 { "gpt-4o-mini-other" } else { "gpt-4o-mini" };
        let token = format!(" tok{i}é");
        text.push_str(&token);
        events.push(format!("data: {{\"model\":\"{model}\",\"choices\":[{{\"delta\":{{\"content\":\"{token}\"}}}}],\"usage\":null}}\n\n"));
    }
    let expected = crate::llm::estimate::count("gpt-4o-mini", &text);
    let refs: Vec<&str> = events.iter().map(String::as_str).collect();
    let whole = sse_response(&refs);
    // Cut: the connection closes before the usage event (and the stream's end).
    let cut = &whole[..whole.len() - 5];
    for (resp, complete) in [(&whole[..], true), (cut, false)] {
        let mut cap = Capture::new();
        cap.data(3, Direction::Write, &req, 4096).data(3, Direction::Read, resp, 1500).close(3);
        let (calls, _) = cap.replay(Limits::default());
        let c = &calls[0].call;
        assert_eq!(c.usage_source, crate::llm::UsageSource::Estimated);
        assert_eq!(c.usage.map(|u| u.output), Some(expected), "complete: {complete}");
        assert_eq!(c.incomplete, !complete);
    }
}

#[test]
fn anthropic_stream_cache_tokens_are_exact() {
    let req = request("/v1/messages", "api.anthropic.com", r#"{"model":"claude-sonnet-4-5","stream":true,"max_tokens":100,"messages":[]}"#, "x-stainless-retry-count: 2\r\n");
    let resp = sse_response(&[
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5-20250929\",\"usage\":{\"input_tokens\":5,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":200,\"output_tokens\":1}}}\n\n",
        "event: ping\ndata: {\"type\":\"ping\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":33}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ]);
    let mut cap = Capture::new();
    cap.data(9, Direction::Write, &req, 50).data(9, Direction::Read, &resp, 17);
    let (calls, _) = cap.replay(Limits::default());
    let c = &calls[0].call;
    assert_eq!((c.provider, c.model()), (Provider::Anthropic, "claude-sonnet-4-5-20250929"));
    assert_eq!(c.usage, Some(Usage { input: 5, cache_read: 200, cache_write: 100, output: 33, reasoning: 0 }));
    assert_eq!(c.retry_count, Some(2));
}

#[test]
fn errors_and_cut_streams_are_reported_not_lost() {
    let req = request("/v1/messages", "api.anthropic.com", r#"{"model":"claude-haiku-4-5","messages":[{"role":"user","content":"hello world"}]}"#, "");
    let err = json_response(429, r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}"#);
    let mut cap = Capture::new();
    cap.data(5, Direction::Write, &req, 4096).data(5, Direction::Read, &err, 4096);
    // A second request whose streamed response is cut by the connection closing.
    cap.data(5, Direction::Write, &req, 4096).data(5, Direction::Read, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n10\r\ndata: {\"type\":\"", 4096).close(5);
    let (calls, r) = cap.replay(Limits::default());
    assert_eq!(calls.len(), 2);
    assert_eq!((calls[0].call.status, calls[0].call.error_type.as_deref()), (Some(429), Some("rate_limit_error")));
    // The cut stream is never billed as zero: its prompt is estimated.
    let cut = &calls[1].call;
    assert!(cut.incomplete);
    assert_eq!(cut.usage_source, crate::llm::UsageSource::Estimated);
    assert_eq!(cut.usage.map(|u| u.input), Some(2), "\"hello world\" is two tokens");
    assert_eq!(r.open_connections(), 0, "close frees the connection");
}

#[test]
fn other_protocols_and_server_sides_are_counted_and_ignored() {
    let mut cap = Capture::new();
    cap.data(1, Direction::Write, b"\x00\x01binary protocol\r\n\r\n", 4096);
    cap.data(2, Direction::Write, b"GET /index.html HTTP/1.1\r\nHost: example.com\r\n\r\n", 4096)
        .data(2, Direction::Read, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 4096);
    // A local TLS server: it reads requests and writes responses.
    cap.data(3, Direction::Read, &request("/v1/chat/completions", "127.0.0.1", "{}", ""), 4096)
        .data(3, Direction::Write, &json_response(200, CHAT_BODY), 4096);
    let (calls, r) = cap.replay(Limits::default());
    assert!(calls.is_empty());
    assert_eq!((r.drops().not_http1, r.drops().server_side), (1, 1));
}

#[test]
fn connections_are_bounded_by_count_and_idleness() {
    let req = request("/v1/chat/completions", "api.openai.com", "{}", "");
    let mut cap = Capture::new();
    for conn in 0..10 {
        cap.data(conn, Direction::Write, &req, 4096);
    }
    let (calls, r) = cap.replay(Limits { max_connections: 4, idle_timeout_ns: u64::MAX, ..Limits::default() });
    assert_eq!(r.open_connections(), 4);
    assert_eq!(r.drops().evicted_capacity, 6);
    assert_eq!(calls.len(), 6, "evicted calls end as incomplete, never vanish");
    assert!(calls.iter().all(|m| m.call.incomplete && m.call.status.is_none()));

    let mut cap = Capture::new();
    cap.data(1, Direction::Write, &req, 4096);
    cap.t += 301 * 1_000_000_000;
    cap.data(2, Direction::Write, &req, 4096);
    let (calls, r) = cap.replay(Limits::default());
    assert_eq!((r.drops().evicted_idle, calls.len(), r.open_connections()), (1, 1, 1));
}

#[test]
fn connections_of_a_gone_process_end_once_their_last_events_are_old() {
    let req = request("/v1/chat/completions", "api.openai.com", "{}", "");
    let mut cap = Capture::new();
    cap.data(1, Direction::Write, &req, 4096);
    let (calls, mut r) = cap.replay(Limits::default());
    assert!(calls.is_empty());
    let mut out = Vec::new();
    // Just seen: its last events may still be on their way, so it stays.
    assert_eq!(r.end_gone(|_| false, &mut out), 0);
    // Seconds later (another process's event moves the clock), it ends, incomplete.
    let mut later = Capture::new();
    later.t = cap.t + 6_000_000_000;
    later.data(9, Direction::Write, b"not http at all\r\n\r\n", 4096);
    for event in &later.events {
        r.feed(event, &mut out);
    }
    assert_eq!(r.end_gone(|tgid| tgid == 42, &mut out), 0, "a live process keeps its connections");
    assert_eq!(r.end_gone(|_| false, &mut out), 1);
    assert_eq!(out.len(), 1);
    assert!(out[0].call.incomplete && out[0].call.status.is_none());
    assert_eq!(out[0].call.end_ns, cap.t, "ends at its last event");
}

#[test]
fn gzip_and_brotli_responses_are_decoded_before_reading_usage() {
    use std::io::Write as _;
    let req = request("/v1/chat/completions", "api.openai.com", r#"{"model":"gpt-4o-mini"}"#, "");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(CHAT_BODY.as_bytes()).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let mut br = Vec::new();
    {
        let mut e = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
        e.write_all(CHAT_BODY.as_bytes()).expect("br");
    }
    let mut cap = Capture::new();
    for (encoding, body) in [("gzip", gz), ("br", br)] {
        let mut resp = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: {encoding}\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        resp.extend_from_slice(&body);
        cap.data(4, Direction::Write, &req, 4096).data(4, Direction::Read, &resp, 5);
    }
    let (calls, _) = cap.replay(Limits::default());
    assert_eq!(calls.len(), 2);
    for m in calls {
        assert_eq!(m.call.usage, Some(Usage { input: 25, cache_read: 0, cache_write: 0, output: 9, reasoning: 0 }));
        assert!(!m.call.incomplete);
    }
}

pub(super) mod http2 {
    use super::*;
    use crate::http::h2::PREFACE;

    /// One HTTP/2 frame.
    pub(in crate::reassembly) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn headers(enc: &mut loona_hpack::Encoder<'_>, fields: &[(&str, &str)]) -> Vec<u8> {
        enc.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn concurrent_streams_on_one_connection_are_metered_separately() {
        let (mut client, mut server) = (loona_hpack::Encoder::new(), loona_hpack::Encoder::new());
        let mut writes = PREFACE.to_vec();
        writes.extend(frame(4, 0, 0, &[]));
        let mut reads = frame(4, 0, 0, &[]);
        for stream in [1u32, 3] {
            let h = headers(&mut client, &[(":method", "POST"), (":scheme", "https"), (":path", "/v1/chat/completions"), (":authority", "api.openai.com"), ("content-type", "application/json")]);
            writes.extend(frame(1, 0x4, stream, &h));
        }
        for stream in [1u32, 3] {
            writes.extend(frame(0, 0x1, stream, br#"{"model":"gpt-4o-mini","stream":true}"#));
        }
        // Responses interleave: stream 3's events arrive between stream 1's.
        for stream in [1u32, 3] {
            let h = headers(&mut server, &[(":status", "200"), ("content-type", "text/event-stream")]);
            reads.extend(frame(1, 0x4, stream, &h));
        }
        reads.extend(frame(0, 0, 1, b"data: {\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"));
        reads.extend(frame(0, 0, 3, b"data: {\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":3}}\n\n"));
        reads.extend(frame(0, 0x1, 3, b"data: [DONE]\n\n"));
        reads.extend(frame(0, 0, 1, b"data: {\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":1}}\n\n"));
        reads.extend(frame(0, 0x1, 1, b"data: [DONE]\n\n"));
        for piece in [3, 4096] {
            let mut cap = Capture::new();
            cap.data(8, Direction::Write, &writes, piece).data(8, Direction::Read, &reads, piece);
            let (calls, r) = cap.replay(Limits::default());
            assert_eq!(calls.len(), 2, "piece {piece}");
            let inputs: Vec<u64> = calls.iter().map(|m| m.call.usage.expect("usage").input).collect();
            assert_eq!(inputs, vec![30, 10], "stream 3 ends first");
            assert!(calls.iter().all(|m| m.call.provider == Provider::OpenAi && m.call.stream && !m.call.incomplete));
            assert_eq!(r.drops().hpack_desyncs, 0);
        }
    }

    #[test]
    fn a_streams_response_recorded_before_its_request_is_paired_with_it() {
        // Go's transport reads on a goroutine of its own: a stream's response frames
        // can be recorded before the write that opened the stream.
        let (mut client, mut server) = (loona_hpack::Encoder::new(), loona_hpack::Encoder::new());
        let mut cap = Capture::new();
        let mut preface = PREFACE.to_vec();
        preface.extend(frame(4, 0, 0, &[]));
        cap.data(9, Direction::Write, &preface, 4096);
        for stream in [1u32, 3] {
            let h = headers(&mut client, &[(":method", "POST"), (":scheme", "https"), (":path", "/v1/chat/completions"), (":authority", "api.openai.com")]);
            let mut writes = frame(1, 0x4, stream, &h);
            writes.extend(frame(0, 0x1, stream, br#"{"model":"gpt-4o-mini"}"#));
            let mut reads = frame(1, 0x4, stream, &headers(&mut server, &[(":status", "200"), ("content-type", "application/json")]));
            reads.extend(frame(0, 0x1, stream, CHAT_BODY.as_bytes()));
            cap.data(9, Direction::Read, &reads, 4096).data(9, Direction::Write, &writes, 4096);
        }
        let (calls, r) = cap.replay(Limits::default());
        assert_eq!(outcomes(&calls), [(Exchange::Http2 { stream: 1 }, Some(200), false), (Exchange::Http2 { stream: 3 }, Some(200), false)]);
        assert!(calls.iter().all(|m| m.call.usage.map(|u| (u.input, u.output)) == Some((25, 9))));
        assert_eq!(r.drops().unanswered_responses, 0);
    }

    #[test]
    fn a_reset_stream_ends_its_call_as_incomplete_and_a_late_attach_counts_desyncs() {
        let mut client = loona_hpack::Encoder::new();
        let mut writes = PREFACE.to_vec();
        let h = headers(&mut client, &[(":method", "POST"), (":path", "/v1/messages"), (":authority", "api.anthropic.com")]);
        writes.extend(frame(1, 0x4 | 0x1, 1, &h));
        let mut cap = Capture::new();
        cap.data(2, Direction::Write, &writes, 4096).data(2, Direction::Read, &frame(3, 0, 1, &[0, 0, 0, 8]), 4096);
        // Another connection seen only from its middle: frames, no preface.
        let later = headers(&mut client, &[(":method", "POST"), (":path", "/v1/messages"), (":authority", "api.anthropic.com")]);
        cap.data(6, Direction::Write, &frame(1, 0x4, 7, &later), 4096);
        let (calls, r) = cap.replay(Limits::default());
        assert_eq!(calls.len(), 1);
        assert!(calls[0].call.incomplete && calls[0].call.status.is_none());
        assert_eq!(r.drops().hpack_desyncs, 1);
    }

    #[test]
    fn after_a_late_attach_calls_are_still_metered_from_their_bodies() {
        // Encoders that have already indexed headers the agent never saw.
        let (mut client, mut server) = (loona_hpack::Encoder::new(), loona_hpack::Encoder::new());
        let fields = [(":method", "POST"), (":path", "/v1/messages"), (":authority", "api.anthropic.com")];
        let _ = headers(&mut client, &fields);
        let _ = headers(&mut server, &[(":status", "200"), ("content-type", "text/event-stream")]);
        let mut writes = frame(1, 0x4, 9, &headers(&mut client, &fields));
        writes.extend(frame(0, 0x1, 9, br#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#));
        let mut reads = frame(1, 0x4, 9, &headers(&mut server, &[(":status", "200"), ("content-type", "text/event-stream")]));
        reads.extend(frame(0, 0, 9, b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":7,\"cache_read_input_tokens\":3,\"output_tokens\":1}}}\n\n"));
        reads.extend(frame(0, 0x1, 9, b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":12}}\n\n"));
        let mut cap = Capture::new();
        cap.data(4, Direction::Write, &writes, 4096).data(4, Direction::Read, &reads, 7);
        let (calls, r) = cap.replay(Limits::default());
        assert_eq!(r.drops().hpack_desyncs, 2);
        assert_eq!(calls.len(), 1);
        let c = &calls[0].call;
        assert!(c.by_shape && c.status.is_none());
        assert_eq!((c.provider, c.endpoint), (Provider::Anthropic, Endpoint::Messages), "told apart by the response envelope");
        assert_eq!(c.usage, Some(Usage { input: 7, cache_read: 3, cache_write: 0, output: 12, reasoning: 0 }));
        assert_eq!(c.usage_source, crate::llm::UsageSource::Reported);
    }
}

#[test]
fn what_all_connections_hold_together_stays_within_the_budget() {
    // Ten connections each send 3 MiB of an LLM request body that never ends: 30 MiB
    // kept without the budget, each under the per-call cap.
    let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 100000000\r\n\r\n";
    let body = vec![b'x'; 3 << 20];
    let mut cap = Capture::new();
    for conn in 0..10 {
        cap.data(conn, Direction::Write, head, 4096).data(conn, Direction::Write, &body, 16384);
    }
    // A normal call afterwards on a connection of its own.
    let req = request("/v1/chat/completions", "api.openai.com", r#"{"model":"gpt-4o-mini","messages":[]}"#, "");
    cap.data(99, Direction::Write, &req, 4096).data(99, Direction::Read, &json_response(200, CHAT_BODY), 4096);
    let budget = 8 << 20;
    let mut r = Reassembler::new(Limits { max_buffered_bytes: budget, ..Limits::default() });
    let mut out = Vec::new();
    let mut peak = 0;
    for e in &cap.events {
        r.feed(e, &mut out);
        peak = peak.max(r.buffered_bytes());
    }
    assert!(peak <= budget, "held {peak} bytes, budget {budget}");
    assert!(r.drops().evicted_memory >= 6, "{:?}", r.drops());
    let evicted: Vec<_> = out.iter().filter(|m| m.origin.connection != 99).collect();
    assert_eq!(evicted.len() as u64, r.drops().evicted_memory, "evicted calls end as incomplete, never vanish");
    assert!(evicted.iter().all(|m| m.call.incomplete));
    let normal = out.iter().find(|m| m.origin.connection == 99).expect("the normal call is metered");
    assert!(!normal.call.incomplete);
    assert_eq!(normal.call.usage.map(|u| u.output), Some(9));
    // Closing everything gives every byte back.
    for conn in (0..10).chain([99]) {
        cap.close(conn);
    }
    let (_, r) = cap.replay(Limits { max_buffered_bytes: budget, ..Limits::default() });
    assert_eq!(r.buffered_bytes(), 0);
}

#[test]
fn the_process_holding_the_most_is_evicted_first() {
    // Process 42 has one large call in progress; process 43 then opens many
    // medium connections. The budget is crossed by 43, and 43 pays.
    let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 100000000\r\n\r\n";
    let mut cap = Capture::new();
    cap.data(1, Direction::Write, head, 4096).data(1, Direction::Write, &vec![b'x'; 3 << 20], 16384);
    let hostile_from = cap.events.len();
    for conn in 100..112 {
        cap.data(conn, Direction::Write, head, 4096).data(conn, Direction::Write, &vec![b'y'; 600 << 10], 16384);
    }
    for event in &mut cap.events[hostile_from..] {
        event.tgid = 43;
    }
    let (out, r) = cap.replay(Limits { max_buffered_bytes: 8 << 20, ..Limits::default() });
    assert!(r.drops().evicted_memory >= 1, "{:?}", r.drops());
    assert!(out.iter().all(|m| m.origin.tgid == 43), "only the flooding process loses calls: {:?}", out.iter().map(|m| m.origin.tgid).collect::<Vec<_>>());
    assert!(r.buffered_bytes() <= 8 << 20);
}

#[test]
fn an_endless_chunked_body_holds_no_more_than_the_per_call_cap() {
    let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut chunk = b"4000\r\n".to_vec();
    chunk.extend(vec![b'y'; 16384]);
    chunk.extend(b"\r\n");
    let mut cap = Capture::new();
    cap.data(1, Direction::Write, head, 4096);
    for _ in 0..1024 {
        cap.data(1, Direction::Write, &chunk, 16384);
    }
    let (_, r) = cap.replay(Limits::default());
    let held = r.buffered_bytes();
    assert!(held <= crate::llm::call::MAX_REQUEST_BODY, "16 MiB of body holds {held} bytes");
}
