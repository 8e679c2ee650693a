//! End to end with the official SDKs: the real agent, real `openai` and `anthropic`
//! Python clients, and a local HTTPS mock of both APIs with known usage. `/metrics`
//! must match what the mock served, token for token.

use std::{process::Command, thread, time::{Duration, Instant}};

use gauge_tests::{
    agent::Daemon,
    clients,
    kernel_tests_enabled,
    mock::{MockLlm, write_certificate},
    sdk::{NODE_ANTHROPIC_STREAM, SDK_CALLS, SDK_HTTP2, SDK_OTHER_APIS},
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



const CHAT_MODEL: &str = "gpt-4o-mini-2024-07-18";

fn with<'a>(base: &[(&'a str, &'a str)], extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    base.iter().chain(extra).copied().collect()
}

/// Scrapes until each label set has at least the given number of requests (20 s).
fn wait_for(daemon: &Daemon, wanted: &[(&[(&str, &str)], f64)]) -> String {
    let start = Instant::now();
    loop {
        let (_, metrics) = daemon.get("/metrics").expect("scrape");
        let done = wanted.iter().all(|(labels, n)| sum(&metrics, "gauge_llm_requests_total", labels) >= *n);
        if done || start.elapsed() > Duration::from_secs(20) {
            return metrics;
        }
        thread::sleep(Duration::from_millis(100));
    }
}
const MESSAGES_MODEL: &str = "claude-sonnet-4-5-20250929";

#[test]
fn official_sdks_over_http1_are_metered_exactly() {
    if !kernel_tests_enabled("SDK end to end") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_certificate(dir.path());
    let mock = MockLlm::start(&cert, &key);
    let mut daemon = Daemon::start("");
    daemon.wait_healthy();

    let mut sdk = clients::python(&cert, SDK_CALLS);
    sdk.env("GAUGE_TEST_PORT", mock.port.to_string()).env("SSL_CERT_FILE", &cert);
    let (_, out) = clients::run("openai + anthropic SDKs", &mut sdk);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    let openai = [("provider", "openai_compatible"), ("model", CHAT_MODEL)];
    let retried = [("provider", "openai_compatible"), ("model", "fail-once-a-2024-07-18")];
    let anthropic = [("provider", "anthropic"), ("model", MESSAGES_MODEL)];
    let estimated = [("provider", "openai_compatible"), ("model", "gpt-4o-mini-est-2024-07-18")];
    let metrics = wait_for(&daemon, &[(&openai, 2.0), (&retried, 1.0), (&anthropic, 2.0), (&estimated, 1.0)]);
    let check = |metric: &str, labels: &[(&str, &str)], want: f64| {
        let got = sum(&metrics, metric, labels);
        assert_eq!(got, want, "{metric} {labels:?}\n{metrics}\ndaemon log:\n{}", daemon.log.text());
    };
    // OpenAI chat, plain (gzip-compressed JSON) and streamed with include_usage: each
    // prompt 21 (5 cached), completion 7 (2 reasoning).
    check("gauge_llm_requests_total", &with(&openai, &[("status", "200")]), 2.0);
    check("gauge_llm_tokens_total", &with(&openai, &[("kind", "input"), ("source", "reported")]), 32.0);
    check("gauge_llm_tokens_total", &with(&openai, &[("kind", "cache_read")]), 10.0);
    check("gauge_llm_tokens_total", &with(&openai, &[("kind", "output")]), 14.0);
    check("gauge_llm_reasoning_tokens_total", &openai, 4.0);
    check("gauge_llm_retries_total", &openai, 0.0);
    // 429 first, then the SDK's own retry (x-stainless-retry-count: 1) succeeds.
    check("gauge_llm_requests_total", &[("model", "fail-once-a"), ("status", "429")], 1.0);
    check("gauge_llm_requests_total", &with(&retried, &[("status", "200")]), 1.0);
    check("gauge_llm_retries_total", &retried, 1.0);
    // A stream without include_usage: counted with the model's tokenizer, marked so.
    let count = |text: &str| gauge_agent::llm::estimate::count("gpt-4o-mini-est-2024-07-18", text) as f64;
    check("gauge_llm_tokens_total", &with(&estimated, &[("kind", "input"), ("source", "estimated")]), count("hi"));
    check("gauge_llm_tokens_total", &with(&estimated, &[("kind", "output"), ("source", "estimated")]), count("Hello!"));
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



#[test]
fn curl_and_sdks_over_http2_are_metered_exactly() {
    if !kernel_tests_enabled("HTTP/2 end to end") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_certificate(dir.path());
    let mock = MockLlm::start(&cert, &key);
    let mut daemon = Daemon::start("");
    daemon.wait_healthy();
    let url = format!("https://127.0.0.1:{}/v1/chat/completions", mock.port);
    for body in [
        r#"{"model":"gpt-4o-mini-h2","messages":[]}"#,
        r#"{"model":"gpt-4o-mini-h2","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
    ] {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--fail", "--http2", "--compressed", "-H", "content-type: application/json", "--cacert"])
            .arg(&cert)
            .args(["-d", body, &url]);
        clients::run("curl --http2", &mut curl);
    }
    let mut sdk = clients::python(&cert, SDK_HTTP2);
    sdk.env("GAUGE_TEST_PORT", mock.port.to_string()).env("SSL_CERT_FILE", &cert);
    let (_, out) = clients::run("SDKs over HTTP/2", &mut sdk);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    let openai = [("provider", "openai_compatible"), ("model", "gpt-4o-mini-h2-2024-07-18")];
    let anthropic = [("provider", "anthropic"), ("model", "claude-h2-20250929")];
    let metrics = wait_for(&daemon, &[(&openai, 4.0), (&anthropic, 1.0)]);
    let check = |metric: &str, labels: &[(&str, &str)], want: f64| {
        let got = sum(&metrics, metric, labels);
        assert_eq!(got, want, "{metric} {labels:?}\n{metrics}\ndaemon log:\n{}", daemon.log.text());
    };
    check("gauge_llm_requests_total", &with(&openai, &[("status", "200")]), 4.0);
    check("gauge_llm_tokens_total", &with(&openai, &[("kind", "input")]), 64.0);
    check("gauge_llm_tokens_total", &with(&openai, &[("kind", "cache_read")]), 20.0);
    check("gauge_llm_tokens_total", &with(&openai, &[("kind", "output")]), 28.0);
    check("gauge_llm_reasoning_tokens_total", &openai, 8.0);
    check("gauge_llm_tokens_total", &with(&anthropic, &[("kind", "cache_read")]), 4.0);
    check("gauge_llm_tokens_total", &with(&anthropic, &[("kind", "output")]), 11.0);
    assert_eq!(sum(&metrics, "gauge_http2_hpack_desyncs_total", &[]), 0.0);
    drop(mock);
}



#[test]
fn responses_embeddings_and_gemini_are_metered_exactly() {
    if !kernel_tests_enabled("Responses, Embeddings, Gemini end to end") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_certificate(dir.path());
    let mock = MockLlm::start(&cert, &key);
    let mut daemon = Daemon::start("");
    daemon.wait_healthy();
    let mut sdk = clients::python(&cert, SDK_OTHER_APIS);
    sdk.env("GAUGE_TEST_PORT", mock.port.to_string()).env("SSL_CERT_FILE", &cert);
    let (_, out) = clients::run("openai responses/embeddings + google-genai", &mut sdk);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    let responses = [("provider", "openai_compatible"), ("model", "gpt-5-mini-2024-07-18")];
    let embeddings = [("provider", "openai_compatible"), ("model", "text-embedding-3-small-2024-07-18")];
    let gemini = [("provider", "gemini"), ("model", "gemini-2.5-flash-001")];
    let metrics = wait_for(&daemon, &[(&responses, 2.0), (&embeddings, 1.0), (&gemini, 2.0)]);
    let check = |metric: &str, labels: &[(&str, &str)], want: f64| {
        let got = sum(&metrics, metric, labels);
        assert_eq!(got, want, "{metric} {labels:?}\n{metrics}\ndaemon log:\n{}", daemon.log.text());
    };
    // Responses: input 20 of which 10 cached, output 12 of which 5 reasoning; twice.
    check("gauge_llm_requests_total", &with(&responses, &[("status", "200")]), 2.0);
    check("gauge_llm_tokens_total", &with(&responses, &[("kind", "input"), ("source", "reported")]), 20.0);
    check("gauge_llm_tokens_total", &with(&responses, &[("kind", "cache_read")]), 20.0);
    check("gauge_llm_tokens_total", &with(&responses, &[("kind", "output")]), 24.0);
    check("gauge_llm_reasoning_tokens_total", &responses, 10.0);
    // Embeddings: 8 prompt tokens, no output.
    check("gauge_llm_tokens_total", &with(&embeddings, &[("kind", "input")]), 8.0);
    check("gauge_llm_tokens_total", &with(&embeddings, &[("kind", "output")]), 0.0);
    // Gemini: prompt 12 with 2 cached; 4 candidates + 6 thoughts billed as output; twice
    // (the stream's last usageMetadata counts, not the partial first one).
    check("gauge_llm_requests_total", &with(&gemini, &[("status", "200")]), 2.0);
    check("gauge_llm_tokens_total", &with(&gemini, &[("kind", "input")]), 20.0);
    check("gauge_llm_tokens_total", &with(&gemini, &[("kind", "cache_read")]), 4.0);
    check("gauge_llm_tokens_total", &with(&gemini, &[("kind", "output")]), 20.0);
    check("gauge_llm_reasoning_tokens_total", &gemini, 12.0);
    assert!(!metrics.contains("AIzaTestSecret") && !daemon.log.text().contains("AIzaTestSecret"));
    drop(mock);
}



#[test]
fn node_with_its_static_openssl_is_metered_exactly() {
    if !kernel_tests_enabled("node end to end") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_certificate(dir.path());
    let mock = MockLlm::start(&cert, &key);
    let mut daemon = Daemon::start("");
    daemon.wait_healthy();
    let mut cmd = clients::node(&cert, NODE_ANTHROPIC_STREAM);
    cmd.env("GAUGE_TEST_PORT", mock.port.to_string());
    let node = clients::Held::start("node", &mut cmd);
    // node carries OpenSSL in its executable: wait until the daemon has hooked it.
    let start = Instant::now();
    while !daemon.get("/targets").is_some_and(|(_, body)| body.contains("/usr/bin/node")) {
        assert!(start.elapsed() < Duration::from_secs(20), "node was never hooked:\n{}", daemon.log.text());
        thread::sleep(Duration::from_millis(50));
    }
    let out = node.go("node https");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let anthropic = [("provider", "anthropic"), ("model", "claude-node-20250929")];
    let metrics = wait_for(&daemon, &[(&anthropic, 1.0)]);
    for (kind, want) in [("input", 9.0), ("cache_write", 3.0), ("cache_read", 4.0), ("output", 11.0)] {
        assert_eq!(sum(&metrics, "gauge_llm_tokens_total", &with(&anthropic, &[("kind", kind)])), want, "{kind}\n{metrics}");
    }
    drop(mock);
}
