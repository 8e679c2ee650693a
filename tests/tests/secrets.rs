//! Secrets never leave: credentials planted in real clients' requests (the official
//! SDKs' API keys, `authorization`, `x-api-key`, `api-key`, `x-goog-api-key`) and a
//! planted prompt must not appear in anything Gauge writes: the daemon's log at debug
//! level, /metrics, /targets, or an anomaly webhook. A (redacted) recording keeps the
//! prompt, which is what it is for, but no credential.

use std::{
    io::Read as _,
    net::TcpListener,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use gauge_agent::source::Payload;
use gauge_tests::{
    agent::{Daemon, Recorder},
    clients, kernel_tests_enabled,
    mock::{MockLlm, write_certificate},
    world::sum,
};

const SECRETS: [&str; 5] = [
    "sk-planted-openai-0123456789abcdefXYZ",
    "sk-ant-planted-anthropic-0123456789abcdef",
    "planted-azure-api-key-0123456789abcdef",
    "AIzaPlantedGoogleKey0123456789abcdef",
    "Bearer planted-bearer-0123456789abcdef",
];
const PROMPT: &str = "PLANTED-PROMPT-never-log-me";

#[test]
fn planted_credentials_and_prompts_appear_in_no_output() {
    if !kernel_tests_enabled("secrets end to end") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_certificate(dir.path());
    let mock = MockLlm::start(&cert, &key);
    // A webhook that keeps whatever it is sent; the loop detector fires on repeats.
    let hook = TcpListener::bind("127.0.0.1:0").expect("bind");
    let hook_url = format!("http://{}/", hook.local_addr().expect("addr"));
    let received = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = received.clone();
    thread::spawn(move || {
        for stream in hook.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text);
            sink.lock().expect("lock").push_str(&text);
        }
    });
    let config = format!("[anomaly.loop]\nrepeats = 2\n[anomaly.webhook]\nurl = \"{hook_url}\"\nretries = 0\ntimeout = \"1s\"\n");
    let mut daemon = Daemon::start_logging(&config, "debug");
    daemon.wait_healthy();
    let recorder = Recorder::start(true, &[]);
    let port = mock.port.to_string();
    let base = format!("https://127.0.0.1:{port}");
    let body = format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{PROMPT}"}}]}}"#);
    // curl with every credential header at once, twice (a loop for the webhook).
    for _ in 0..2 {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--fail", "--http1.1", "--cacert"])
            .arg(&cert)
            .args(["-H", "content-type: application/json"])
            .args(["-H", &format!("authorization: {}", SECRETS[4])])
            .args(["-H", &format!("x-api-key: {}", SECRETS[1])])
            .args(["-H", &format!("api-key: {}", SECRETS[2])])
            .args(["-H", &format!("x-goog-api-key: {}", SECRETS[3])])
            .args(["-d", &body, &format!("{base}/v1/chat/completions")]);
        clients::run("curl with credentials", &mut curl);
    }
    // The official SDK, carrying its key its own way.
    let script = format!(
        "import os, openai\noa = openai.OpenAI(base_url='{base}/v1', api_key='{}')\noa.chat.completions.create(model='gpt-4o-mini', messages=[{{'role': 'user', 'content': '{PROMPT}'}}])\nprint('ok')\n",
        SECRETS[0]
    );
    let mut sdk = clients::python(&cert, &script);
    sdk.env("SSL_CERT_FILE", &cert);
    clients::run("openai SDK", &mut sdk);

    let start = Instant::now();
    let metrics = loop {
        let (_, text) = daemon.get("/metrics").expect("scrape");
        if sum(&text, "gauge_llm_requests_total", &[("model", "gpt-4o-mini-2024-07-18")]) >= 3.0 || start.elapsed() > Duration::from_secs(20) {
            break text;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(sum(&metrics, "gauge_llm_requests_total", &[("model", "gpt-4o-mini-2024-07-18")]), 3.0, "{metrics}");
    thread::sleep(Duration::from_millis(1500));
    let (_, targets) = daemon.get("/targets").expect("targets");
    // Recorded bytes are base64 in the file: check what they decode to.
    let recording: String = recorder
        .events()
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::Data { bytes, .. } => Some(String::from_utf8_lossy(bytes).into_owned()),
            _ => None,
        })
        .collect();
    assert!(recording.contains("POST /v1/chat/completions") && recording.contains(PROMPT), "the recording missed the calls");
    let webhook = received.lock().expect("lock").clone();
    assert!(webhook.contains("\"kind\":\"loop\""), "the webhook got nothing to check:\n{webhook}\n{}", daemon.log.text());
    let log = daemon.log.text();
    assert!(log.contains("LLM call"), "debug logging was not on:\n{log}");
    for (what, text) in [("daemon log", &log), ("/metrics", &metrics), ("/targets", &targets), ("recording", &recording), ("webhook", &webhook)] {
        for secret in SECRETS {
            let core = secret.trim_start_matches("Bearer ");
            assert!(!text.contains(core), "{secret} leaked into the {what}");
        }
    }
    for (what, text) in [("daemon log", &log), ("/metrics", &metrics), ("webhook", &webhook)] {
        assert!(!text.contains(PROMPT), "the prompt leaked into the {what}");
    }
    recorder.stop();
}
