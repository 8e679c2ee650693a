//! End to end with the official SDKs: the real agent, real `openai` and `anthropic`
//! Python clients, and a local HTTPS mock of both APIs with known usage. `/metrics`
//! must match what the mock served, token for token.

use std::{path::Path, process::Command, thread, time::{Duration, Instant}};

use gauge_tests::{
    agent::Daemon,
    clients,
    kernel_tests_enabled,
    mock::write_certificate,
};

/// Sum of the samples of `metric` whose labels include every `key="value"` pair.
fn sum(metrics: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct MockLlm {
    child: std::process::Child,
    port: u16,
}

impl MockLlm {
    fn start(cert: &Path, key: &Path, dir: &Path) -> Self {
        let port_file = dir.join("port");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("mock/llm_server.py");
        let mut child = Command::new("python3").arg(script).arg(cert).arg(key).arg(&port_file).spawn().expect("start mock");
        let start = Instant::now();
        loop {
            if let Some(port) = std::fs::read_to_string(&port_file).ok().and_then(|p| p.trim().parse().ok()) {
                return Self { child, port };
            }
            assert!(child.try_wait().expect("wait").is_none(), "mock LLM server exited");
            assert!(start.elapsed() < Duration::from_secs(20), "mock LLM server did not start");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SDK_CALLS: &str = r#"
import os, anthropic, openai
base = "https://127.0.0.1:%s" % os.environ["GAUGE_TEST_PORT"]
msgs = [{"role": "user", "content": "hi"}]
oa = openai.OpenAI(base_url=base + "/v1", api_key="sk-test-secret-0123456789abcdef")
oa.chat.completions.create(model="gpt-4o-mini", messages=msgs)
for _ in oa.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True, stream_options={"include_usage": True}):
    pass
oa.chat.completions.create(model="fail-once-a", messages=msgs)
an = anthropic.Anthropic(base_url=base, api_key="sk-ant-test-secret-0123456789abcdef")
an.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=msgs)
for _ in an.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=msgs, stream=True):
    pass
print("ok")
"#;

const CHAT_MODEL: &str = "gpt-4o-mini-2024-07-18";
const MESSAGES_MODEL: &str = "claude-sonnet-4-5-20250929";

#[test]
fn official_sdks_over_http1_are_metered_exactly() {
    if !kernel_tests_enabled("SDK end to end") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_certificate(dir.path());
    let mock = MockLlm::start(&cert, &key, dir.path());
    let mut daemon = Daemon::start("");
    daemon.wait_healthy();

    let mut sdk = clients::python(&cert, SDK_CALLS);
    sdk.env("GAUGE_TEST_PORT", mock.port.to_string()).env("SSL_CERT_FILE", &cert);
    let (_, out) = clients::run("openai + anthropic SDKs", &mut sdk);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    let openai = [("provider", "openai_compatible"), ("model", CHAT_MODEL)];
    let anthropic = [("provider", "anthropic"), ("model", MESSAGES_MODEL)];
    let start = Instant::now();
    let metrics = loop {
        let (_, metrics) = daemon.get("/metrics").expect("scrape");
        let done = sum(&metrics, "gauge_llm_requests_total", &openai) >= 3.0
            && sum(&metrics, "gauge_llm_requests_total", &anthropic) >= 2.0;
        if done || start.elapsed() > Duration::from_secs(20) {
            break metrics;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let check = |metric: &str, labels: &[(&str, &str)], want: f64| {
        let got = sum(&metrics, metric, labels);
        assert_eq!(got, want, "{metric} {labels:?}\n{metrics}\ndaemon log:\n{}", daemon.log.text());
    };
    let with = |base: &[(&'static str, &'static str)], extra: &[(&'static str, &'static str)]| {
        base.iter().chain(extra).copied().collect::<Vec<_>>()
    };
    // OpenAI chat: 3 successful calls (plain, streamed with include_usage, the retry),
    // each prompt 21 (5 cached), completion 7 (2 reasoning).
    check("gauge_llm_requests_total", &with(&openai, &[("status", "200")]), 3.0);
    check("gauge_llm_requests_total", &[("model", "fail-once-a"), ("status", "429")], 1.0);
    check("gauge_llm_tokens_total", &with(&openai, &[("kind", "input"), ("source", "reported")]), 48.0);
    check("gauge_llm_tokens_total", &with(&openai, &[("kind", "cache_read")]), 15.0);
    check("gauge_llm_tokens_total", &with(&openai, &[("kind", "output")]), 21.0);
    check("gauge_llm_reasoning_tokens_total", &openai, 6.0);
    check("gauge_llm_retries_total", &openai, 1.0);
    // Anthropic: plain and streamed, input 9, cache write 3, cache read 4, output 11.
    check("gauge_llm_requests_total", &with(&anthropic, &[("status", "200")]), 2.0);
    check("gauge_llm_tokens_total", &with(&anthropic, &[("kind", "input")]), 18.0);
    check("gauge_llm_tokens_total", &with(&anthropic, &[("kind", "cache_write")]), 6.0);
    check("gauge_llm_tokens_total", &with(&anthropic, &[("kind", "cache_read")]), 8.0);
    check("gauge_llm_tokens_total", &with(&anthropic, &[("kind", "output")]), 22.0);
    check("gauge_llm_time_to_first_token_seconds_count", &anthropic, 2.0);
    // The API keys the SDKs sent never reach metrics or logs.
    assert!(!metrics.contains("0123456789abcdef") && !daemon.log.text().contains("0123456789abcdef"));
    drop(mock);
}
