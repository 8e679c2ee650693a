//! Throughput of the user-space pipeline (reassembly, HTTP, SSE, usage, metering) on
//! synthetic captures of streamed LLM calls: `cargo bench -p gauge-agent`.
//! Criterion reports bytes/s; calls/s = bytes/s / (bytes per call, printed first).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gauge_agent::{
    attribution::process::NoProcesses,
    config::Config,
    pipeline::Pipeline,
    source::{CaptureEvent, Direction, Payload},
};
use prometheus_client::registry::Registry;

/// `calls` streamed chat completions of `chunks` SSE events each, on keep-alive
/// connections of 10 calls, as the capture would deliver them (one read per event).
fn capture(calls: usize, chunks: usize) -> (Vec<CaptureEvent>, usize) {
    let mut events = Vec::new();
    let mut t = 0u64;
    let mut bytes = 0;
    let mut push = |conn: u64, direction, data: Vec<u8>, t: &mut u64| {
        *t += 1000;
        bytes += data.len();
        events.push(CaptureEvent {
            timestamp_ns: *t,
            tgid: 7,
            tid: 7,
            cgroup_id: 1,
            comm: "agent".into(),
            payload: Payload::Data { direction, connection: conn, call_len: data.len() as u32, offset: 0, bytes: data },
        });
    };
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Summarise the attached ticket history for the customer."}]}"#;
    for call in 0..calls {
        let conn = (call / 10) as u64;
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\nx-stainless-retry-count: 0\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        push(conn, Direction::Write, request.into_bytes(), &mut t);
        push(conn, Direction::Read, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(), &mut t);
        for i in 0..chunks {
            let event = format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{i} \"}}}}],\"usage\":null}}\n\n"
            );
            push(conn, Direction::Read, format!("{:x}\r\n{event}\r\n", event.len()).into_bytes(), &mut t);
        }
        let last = "data: {\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":40,\"completion_tokens\":300}}\n\ndata: [DONE]\n\n";
        push(conn, Direction::Read, format!("{:x}\r\n{last}\r\n0\r\n\r\n", last.len()).into_bytes(), &mut t);
    }
    (events, bytes)
}

#[allow(clippy::expect_used, reason = "a benchmark whose set-up fails must stop, not measure nothing")]
fn pipeline(c: &mut Criterion) {
    let (events, bytes) = capture(100, 300);
    println!("{bytes} bytes in 100 calls: {} bytes per call", bytes / 100);
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("http1_sse_chat_100_calls_of_300_chunks", |b| {
        b.iter(|| {
            let mut registry = Registry::default();
            let mut p = Pipeline::new(&Config::default(), Box::new(NoProcesses), || 0, &mut registry).expect("pipeline");
            let mut calls = 0;
            for e in &events {
                calls += p.feed(e).len();
            }
            assert_eq!(calls, 100);
        })
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
