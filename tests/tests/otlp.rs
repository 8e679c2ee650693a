//! OTLP export end to end: the real daemon with `[otlp]` pointed at a receiver in this
//! test, real SDK calls (openai, anthropic) captured by the kernel probes; the spans
//! and GenAI metrics that arrive (OTLP/HTTP protobuf) must carry exact token counts,
//! models and operation names, and never an API key, a prompt or a completion.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use gauge_tests::{kernel_tests_enabled, sdk::SDK_CALLS, world::World};
use opentelemetry_proto::tonic::{
    collector::{metrics::v1::ExportMetricsServiceRequest, trace::v1::ExportTraceServiceRequest},
    common::v1::{KeyValue, any_value::Value},
    metrics::v1::metric::Data,
    trace::v1::{Span, status::StatusCode},
};
use prost::Message as _;

/// One POST: path, lower-cased head, body.
#[derive(Clone)]
struct Post {
    path: String,
    head: String,
    body: Vec<u8>,
}

/// A minimal OTLP/HTTP receiver: every POST (keep-alive connections included) is
/// kept and answered 200.
fn receiver() -> (String, Arc<Mutex<Vec<Post>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let posts = Arc::new(Mutex::new(Vec::new()));
    let kept = posts.clone();
    thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let kept = kept.clone();
            thread::spawn(move || serve(stream, &kept));
        }
    });
    (endpoint, posts)
}

fn serve(stream: TcpStream, posts: &Mutex<Vec<Post>>) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line.to_lowercase());
        }
        let length = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let path = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
        posts.lock().expect("lock").push(Post { path, head, body });
        if writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n").is_err() {
            return;
        }
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()?.value.as_ref())
}

fn text<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attrs, key) {
        Some(Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn number(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key) {
        Some(Value::IntValue(n)) => Some(*n),
        _ => None,
    }
}

fn spans(posts: &[Post], agent: &str) -> Vec<Span> {
    posts
        .iter()
        .filter(|p| p.path == "/v1/traces")
        .flat_map(|p| ExportTraceServiceRequest::decode(p.body.as_slice()).expect("traces decode").resource_spans)
        .flat_map(|r| r.scope_spans)
        .flat_map(|s| s.spans)
        .filter(|s| text(&s.attributes, "gauge.agent") == Some(agent))
        .collect()
}

/// (count, sum) of `gen_ai.client.token.usage` per (request model, token type), over
/// every delta export for `agent`.
fn token_usage(posts: &[Post], agent: &str) -> HashMap<(String, String), (u64, f64)> {
    let mut totals = HashMap::new();
    let requests = posts
        .iter()
        .filter(|p| p.path == "/v1/metrics")
        .map(|p| ExportMetricsServiceRequest::decode(p.body.as_slice()).expect("metrics decode"));
    for metric in requests.flat_map(|r| r.resource_metrics).flat_map(|r| r.scope_metrics).flat_map(|s| s.metrics) {
        if metric.name != "gen_ai.client.token.usage" {
            continue;
        }
        let Some(Data::Histogram(h)) = metric.data else { panic!("token usage is a histogram") };
        for p in h.data_points.iter().filter(|p| text(&p.attributes, "gauge.agent") == Some(agent)) {
            let key = (
                text(&p.attributes, "gen_ai.request.model").unwrap_or_default().to_owned(),
                text(&p.attributes, "gen_ai.token.type").unwrap_or_default().to_owned(),
            );
            let entry = totals.entry(key).or_insert((0, 0.0));
            entry.0 += p.count;
            entry.1 += p.sum.unwrap_or_default();
        }
    }
    totals
}

#[test]
fn llm_calls_are_exported_as_genai_spans_and_metrics() {
    if !kernel_tests_enabled("OTLP export end to end") {
        return;
    }
    let (endpoint, posts) = receiver();
    let config = format!(
        "[otlp]\nendpoint = \"{endpoint}\"\nheaders = {{ \"x-otlp-test\" = \"otlp-header-value\" }}\nexport_interval = \"1s\"\nservice_name = \"gauge-e2e\"\n"
    );
    let world = World::start(&config);
    world.python_as("openai + anthropic SDKs", SDK_CALLS, "otlp-bot");
    let agent = "otlp-bot";
    // Seven calls: chat plain and streamed, a 429 and its retry, an estimated stream,
    // anthropic plain and streamed. Metrics follow each second.
    let start = Instant::now();
    let snapshot = loop {
        let snapshot = posts.lock().expect("lock").clone();
        let anthropic_metrics = token_usage(&snapshot, agent).get(&("claude-sonnet-4-5".into(), "input".into())).map(|t| t.0);
        if (spans(&snapshot, agent).len() >= 7 && anthropic_metrics == Some(2)) || start.elapsed() > Duration::from_secs(20) {
            break snapshot;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let log = world.daemon.log.text();
    let got = spans(&snapshot, agent);
    assert_eq!(got.len(), 7, "spans for {agent}: {:?}\nlog:\n{log}", got.iter().map(|s| &s.name).collect::<Vec<_>>());
    let named = |name: &str| got.iter().filter(|s| s.name == name).collect::<Vec<_>>();

    // OpenAI chat (plain and streamed): prompt 21 (5 of them cached), completion 7.
    let chat = named("chat gpt-4o-mini");
    assert_eq!(chat.len(), 2, "{log}");
    for s in &chat {
        assert_eq!(text(&s.attributes, "gen_ai.operation.name"), Some("chat"));
        assert_eq!(text(&s.attributes, "gen_ai.request.model"), Some("gpt-4o-mini"));
        assert_eq!(text(&s.attributes, "gen_ai.response.model"), Some("gpt-4o-mini-2024-07-18"));
        assert_eq!(number(&s.attributes, "gen_ai.usage.input_tokens"), Some(21));
        assert_eq!(number(&s.attributes, "gen_ai.usage.output_tokens"), Some(7));
        assert_eq!(number(&s.attributes, "http.response.status_code"), Some(200));
        assert_eq!(text(&s.attributes, "gauge.usage_source"), Some("reported"));
        assert!(s.status.is_none() && s.end_time_unix_nano >= s.start_time_unix_nano);
    }
    assert!(chat.iter().any(|s| text(&s.attributes, "gen_ai.response.id") == Some("req_mock")), "the plain call's x-request-id");
    // Span times are Unix time: within a minute of now.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as u64;
    assert!(chat.iter().all(|s| now.abs_diff(s.start_time_unix_nano) < 60_000_000_000), "{:?}", chat[0].start_time_unix_nano);

    // The 429 is an error span; the SDK's retry a success with usage.
    let retried = named("chat fail-once-a");
    assert_eq!(retried.len(), 2, "{log}");
    let failed = retried.iter().find(|s| number(&s.attributes, "http.response.status_code") == Some(429)).expect("the 429");
    assert_eq!(failed.status.as_ref().map(|s| s.code), Some(StatusCode::Error as i32));
    assert!(text(&failed.attributes, "error.type").is_some());
    let retry = retried.iter().find(|s| number(&s.attributes, "http.response.status_code") == Some(200)).expect("the retry");
    assert_eq!(number(&retry.attributes, "gen_ai.usage.input_tokens"), Some(21));
    assert!(text(&retry.attributes, "error.type").is_none());

    // A stream without usage: estimated with the model's tokenizer, marked so.
    let count = |t: &str| gauge_agent::llm::estimate::count("gpt-4o-mini-est-2024-07-18", t) as i64;
    let estimated = named("chat gpt-4o-mini-est");
    assert_eq!(estimated.len(), 1, "{log}");
    assert_eq!(number(&estimated[0].attributes, "gen_ai.usage.input_tokens"), Some(count("hi")));
    assert_eq!(number(&estimated[0].attributes, "gen_ai.usage.output_tokens"), Some(count("Hello!")));
    assert_eq!(text(&estimated[0].attributes, "gauge.usage_source"), Some("estimated"));

    // Anthropic: input 9 + cache write 3 + cache read 4 = 16, output 11.
    let messages = named("chat claude-sonnet-4-5");
    assert_eq!(messages.len(), 2, "{log}");
    for s in &messages {
        assert_eq!(text(&s.attributes, "gen_ai.provider.name"), Some("anthropic"));
        assert_eq!(text(&s.attributes, "gen_ai.response.model"), Some("claude-sonnet-4-5-20250929"));
        assert_eq!(number(&s.attributes, "gen_ai.usage.input_tokens"), Some(16));
        assert_eq!(number(&s.attributes, "gen_ai.usage.output_tokens"), Some(11));
        assert!(matches!(attr(&s.attributes, "gauge.cost_usd"), Some(Value::DoubleValue(usd)) if *usd > 0.0));
    }

    // Metrics: the token histograms add up to the same counts.
    let usage = token_usage(&snapshot, agent);
    assert_eq!(usage.get(&("gpt-4o-mini".into(), "input".into())), Some(&(2, 42.0)), "{usage:?}");
    assert_eq!(usage.get(&("gpt-4o-mini".into(), "output".into())), Some(&(2, 14.0)), "{usage:?}");
    assert_eq!(usage.get(&("claude-sonnet-4-5".into(), "input".into())), Some(&(2, 32.0)), "{usage:?}");
    assert_eq!(usage.get(&("claude-sonnet-4-5".into(), "output".into())), Some(&(2, 22.0)), "{usage:?}");

    // Every POST was protobuf, carried the configured header and named the service;
    // none carried a key, a prompt or a completion.
    for post in &snapshot {
        assert!(post.head.starts_with("post ") && post.head.contains("content-type: application/x-protobuf"), "{}", post.head);
        assert!(post.head.contains("x-otlp-test: otlp-header-value"), "{}", post.head);
        let raw = String::from_utf8_lossy(&post.body);
        assert!(raw.contains("gauge-e2e"), "service.name");
        for secret in ["sk-test-secret", "sk-ant-test-secret", "Hello!", "\"role\"", "\"messages\"", "authorization"] {
            assert!(!raw.contains(secret) && !post.head.contains(&secret.to_lowercase()), "{secret} exported");
        }
    }
    assert!(snapshot.iter().any(|p| p.path == "/v1/metrics"));
    assert!(!log.contains("otlp-header-value"), "a header value was logged");
    let exported = world.daemon.metric("gauge_otlp_exported_total{signal=\"traces\"}");
    assert!(exported >= 7.0, "{exported}");
}
