//! End to end with real clients: the real agent, the official `openai`, `anthropic`
//! and `google-genai` Python SDKs, curl and node, against a local HTTPS mock of the
//! APIs with known usage. `/metrics` must match what the mock served, token for token.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use gauge_tests::{
    clients,
    kernel_tests_enabled,
    sdk::{NODE_ANTHROPIC_STREAM, SDK_CALLS, SDK_HTTP2, SDK_OTHER_APIS},
    world::{World, sum, with},
};

const CHAT_MODEL: &str = "gpt-4o-mini-2024-07-18";
const MESSAGES_MODEL: &str = "claude-sonnet-4-5-20250929";

#[test]
fn official_sdks_over_http1_are_metered_exactly() {
    if !kernel_tests_enabled("SDK end to end") {
        return;
    }
    let world = World::start("");
    world.python("openai + anthropic SDKs", SDK_CALLS);
    let openai = [("provider", "openai_compatible"), ("model", CHAT_MODEL)];
    let retried = [("provider", "openai_compatible"), ("model", "fail-once-a-2024-07-18")];
    let anthropic = [("provider", "anthropic"), ("model", MESSAGES_MODEL)];
    let estimated = [("provider", "openai_compatible"), ("model", "gpt-4o-mini-est-2024-07-18")];
    let m = world.scrape(&[(&openai, 2.0), (&retried, 1.0), (&anthropic, 2.0), (&estimated, 1.0)]);
    // OpenAI chat, plain (gzip-compressed JSON) and streamed with include_usage: each
    // prompt 21 (5 cached), completion 7 (2 reasoning).
    m.check("gauge_llm_requests_total", &with(&openai, &[("status", "200")]), 2.0);
    m.check("gauge_llm_tokens_total", &with(&openai, &[("kind", "input"), ("source", "reported")]), 32.0);
    m.tokens(&openai, &[("cache_read", 10.0), ("output", 14.0)]);
    m.check("gauge_llm_reasoning_tokens_total", &openai, 4.0);
    m.check("gauge_llm_retries_total", &openai, 0.0);
    // 429 first, then the SDK's own retry (x-stainless-retry-count: 1) succeeds.
    m.check("gauge_llm_requests_total", &[("model", "fail-once-a"), ("status", "429")], 1.0);
    m.check("gauge_llm_requests_total", &with(&retried, &[("status", "200")]), 1.0);
    m.check("gauge_llm_retries_total", &retried, 1.0);
    // A stream without include_usage: counted with the model's tokenizer, marked so.
    let count = |text: &str| gauge_agent::llm::estimate::count("gpt-4o-mini-est-2024-07-18", text) as f64;
    m.check("gauge_llm_tokens_total", &with(&estimated, &[("kind", "input"), ("source", "estimated")]), count("hi"));
    m.check("gauge_llm_tokens_total", &with(&estimated, &[("kind", "output"), ("source", "estimated")]), count("Hello!"));
    // Anthropic: plain and streamed, input 9, cache write 3, cache read 4, output 11.
    m.check("gauge_llm_requests_total", &with(&anthropic, &[("status", "200")]), 2.0);
    m.tokens(&anthropic, &[("input", 18.0), ("cache_write", 6.0), ("cache_read", 8.0), ("output", 22.0)]);
    m.check("gauge_llm_time_to_first_token_seconds_count", &anthropic, 2.0);
    m.free_of("0123456789abcdef");
}

#[test]
fn curl_and_sdks_over_http2_are_metered_exactly() {
    if !kernel_tests_enabled("HTTP/2 end to end") {
        return;
    }
    let world = World::start("");
    let url = format!("https://127.0.0.1:{}/v1/chat/completions", world.mock.port);
    for body in [
        r#"{"model":"gpt-4o-mini-h2","messages":[]}"#,
        r#"{"model":"gpt-4o-mini-h2","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
    ] {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--fail", "--http2", "--compressed", "-H", "content-type: application/json", "--cacert"])
            .arg(&world.cert)
            .args(["-d", body, &url]);
        clients::run("curl --http2", &mut curl);
    }
    world.python("SDKs over HTTP/2", SDK_HTTP2);
    let openai = [("provider", "openai_compatible"), ("model", "gpt-4o-mini-h2-2024-07-18")];
    let anthropic = [("provider", "anthropic"), ("model", "claude-h2-20250929")];
    let m = world.scrape(&[(&openai, 4.0), (&anthropic, 1.0)]);
    m.check("gauge_llm_requests_total", &with(&openai, &[("status", "200")]), 4.0);
    m.tokens(&openai, &[("input", 64.0), ("cache_read", 20.0), ("output", 28.0)]);
    m.check("gauge_llm_reasoning_tokens_total", &openai, 8.0);
    m.tokens(&anthropic, &[("cache_read", 4.0), ("output", 11.0)]);
    assert_eq!(sum(&m.text, "gauge_http2_hpack_desyncs_total", &[]), 0.0);
}

#[test]
fn responses_embeddings_and_gemini_are_metered_exactly() {
    if !kernel_tests_enabled("Responses, Embeddings, Gemini end to end") {
        return;
    }
    let world = World::start("");
    world.python("openai responses/embeddings + google-genai", SDK_OTHER_APIS);
    let responses = [("provider", "openai_compatible"), ("model", "gpt-5-mini-2024-07-18")];
    let embeddings = [("provider", "openai_compatible"), ("model", "text-embedding-3-small-2024-07-18")];
    let gemini = [("provider", "gemini"), ("model", "gemini-2.5-flash-001")];
    let m = world.scrape(&[(&responses, 2.0), (&embeddings, 1.0), (&gemini, 2.0)]);
    // Responses: input 20 of which 10 cached, output 12 of which 5 reasoning; twice.
    m.check("gauge_llm_requests_total", &with(&responses, &[("status", "200")]), 2.0);
    m.check("gauge_llm_tokens_total", &with(&responses, &[("kind", "input"), ("source", "reported")]), 20.0);
    m.tokens(&responses, &[("cache_read", 20.0), ("output", 24.0)]);
    m.check("gauge_llm_reasoning_tokens_total", &responses, 10.0);
    // Embeddings: 8 prompt tokens, no output.
    m.tokens(&embeddings, &[("input", 8.0), ("output", 0.0)]);
    // Gemini: prompt 12 with 2 cached; 4 candidates + 6 thoughts billed as output; twice
    // (the stream's last usageMetadata counts, not the partial first one).
    m.check("gauge_llm_requests_total", &with(&gemini, &[("status", "200")]), 2.0);
    m.tokens(&gemini, &[("input", 20.0), ("cache_read", 4.0), ("output", 20.0)]);
    m.check("gauge_llm_reasoning_tokens_total", &gemini, 12.0);
    m.free_of("AIzaTestSecret");
}

#[test]
fn node_with_its_static_openssl_is_metered_exactly() {
    if !kernel_tests_enabled("node end to end") {
        return;
    }
    let world = World::start("");
    let mut cmd = clients::node(&world.cert, NODE_ANTHROPIC_STREAM);
    cmd.env("GAUGE_TEST_PORT", world.mock.port.to_string());
    let node = clients::Held::start("node", &mut cmd);
    // node carries OpenSSL in its executable: wait until the daemon has hooked it.
    let start = Instant::now();
    while !world.daemon.get("/targets").is_some_and(|(_, body)| body.contains("/usr/bin/node")) {
        assert!(start.elapsed() < Duration::from_secs(20), "node was never hooked:\n{}", world.daemon.log.text());
        thread::sleep(Duration::from_millis(50));
    }
    let out = node.go("node https");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let anthropic = [("provider", "anthropic"), ("model", "claude-node-20250929")];
    let m = world.scrape(&[(&anthropic, 1.0)]);
    m.tokens(&anthropic, &[("input", 9.0), ("cache_write", 3.0), ("cache_read", 4.0), ("output", 11.0)]);
}
