//! Pipeline throughput: recorded-style captures of streamed LLM calls replayed
//! through reassembly, HTTP, SSE, usage and metering on one thread, as the daemon
//! runs them.

use std::time::Instant;

use anyhow::bail;
use gauge_agent::{
    attribution::process::NoProcesses,
    config::Config,
    pipeline::Pipeline,
    source::{CaptureEvent, Direction, Payload},
};
use prometheus_client::registry::Registry;

use super::{Row, Scale, median};

/// `calls` streamed chat completions of `chunks` SSE events each on keep-alive
/// connections of 10 calls, one read per event as the capture delivers them.
pub fn capture(calls: usize, chunks: usize) -> (Vec<CaptureEvent>, usize) {
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
            payload: Payload::Data { direction, connection: conn, call_len: data.len() as u32, offset: 0, bytes: data.into() },
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

pub fn run(scale: Scale) -> anyhow::Result<Vec<Row>> {
    let calls = 100;
    let (events, bytes) = capture(calls, 300);
    let repeats = scale.pick(3, 15);
    let mut seconds = Vec::new();
    for _ in 0..repeats {
        let mut registry = Registry::default();
        let mut pipeline = Pipeline::new(&Config::default(), Box::new(NoProcesses), || 0, &mut registry)?;
        let start = Instant::now();
        let mut metered = 0;
        for event in &events {
            metered += pipeline.feed(event).len();
        }
        seconds.push(start.elapsed().as_secs_f64());
        if metered != calls {
            bail!("the replay metered {metered} of {calls} calls");
        }
    }
    let best = median(&mut seconds);
    let mb_per_s = bytes as f64 / best / 1e6;
    let how = format!("{calls} calls of 300 SSE chunks ({} KB each), one thread, median of {repeats}", bytes / calls / 1000);
    Ok(vec![
        Row::new("replay throughput", format!("{mb_per_s:.0} MB/s"), how.clone()).target(">= 500 MB/s", mb_per_s >= 500.0),
        Row::new("replay calls", format!("{:.0} calls/s", calls as f64 / best), how),
        Row::new("replay events", format!("{:.2} M events/s", events.len() as f64 / best / 1e6), "one capture event per SSE chunk"),
    ])
}
