//! Golden replay: recordings of real clients (made by `gauge-agent record`, redacted)
//! replayed through the user-space pipeline, no kernel needed. The LLM metrics they
//! produce must equal the golden files next to them.
//!
//! Re-record the fixtures (root, kernel): `cargo xtask test -- --ignored record_fixtures`.
//! Rewrite the golden files after an intended change: `GAUGE_UPDATE_GOLDEN=1`.

use std::{path::{Path, PathBuf}, process::Command, thread, time::Duration};

use gauge_agent::{
    attribution::process::NoProcesses,
    config::Config,
    pipeline::Pipeline,
    source::{CaptureEvent, Payload, recording},
};
use gauge_tests::{agent::Recorder, clients, mock::{MockLlm, write_certificate}, sdk};
use prometheus_client::registry::Registry;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The LLM counters a recording produces, one sample per line, sorted.
fn llm_counters(events: &[CaptureEvent]) -> String {
    let mut registry = Registry::default();
    let mut pipeline = Pipeline::new(&Config::default(), Box::new(NoProcesses), || 0, &mut registry).expect("pipeline");
    for event in events {
        pipeline.feed(event);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    let mut lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            ["gauge_llm_requests_total", "gauge_llm_tokens_total", "gauge_llm_reasoning_tokens_total", "gauge_llm_retries_total", "gauge_anomalies_total", "gauge_llm_cost_usd_total", "gauge_llm_unpriced_calls_total", "gauge_llm_unmetered_calls_total", "gauge_http_dropped_total", "gauge_http2_hpack_desyncs_total"]
                .iter()
                .any(|m| l.starts_with(m))
        })
        .collect();
    lines.sort_unstable();
    lines.join("\n") + "\n"
}

#[test]
fn recorded_clients_replay_to_their_golden_metrics() {
    let mut checked = 0;
    for entry in std::fs::read_dir(fixtures()).expect("fixtures dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "jsonl") {
            continue;
        }
        let file = std::fs::File::open(&path).expect("open fixture");
        let (preamble, events) = recording::read(std::io::BufReader::new(file)).expect("fixture parses");
        assert!(preamble.redacted, "{}: fixtures must be redacted recordings", path.display());
        let got = llm_counters(&events);
        // Real clients behaving normally: no detector may fire on them.
        assert!(!got.contains("gauge_anomalies_total"), "{}: false positive anomaly:\n{got}", path.display());
        let golden = path.with_extension("golden");
        if std::env::var("GAUGE_UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
            std::fs::write(&golden, &got).expect("write golden");
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if got != want {
            let diff: Vec<String> = want
                .lines()
                .filter(|l| !got.lines().any(|g| g == *l))
                .map(|l| format!("- {l}"))
                .chain(got.lines().filter(|l| !want.lines().any(|w| w == *l)).map(|l| format!("+ {l}")))
                .collect();
            panic!("{} replays differently from {}:\n{}\n(GAUGE_UPDATE_GOLDEN=1 rewrites it)", path.display(), golden.display(), diff.join("\n"));
        }
        checked += 1;
    }
    assert!(checked >= 3, "expected the recorded fixtures in {}", fixtures().display());
}

/// Records the fixtures from real clients (root, kernel). It rewrites files under
/// version control, so it runs only when asked for.
#[test]
#[ignore = "maintenance: re-records tests/fixtures; run with --ignored record_fixtures"]
fn record_fixtures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_certificate(dir.path());
    let mock = MockLlm::start(&cert, &key);
    let recorder = Recorder::start(true, &[]);
    let port = mock.port.to_string();
    let mut runs: Vec<(&str, u32)> = Vec::new();
    for (name, script) in [("sdk_http1", sdk::SDK_CALLS), ("sdk_http2", sdk::SDK_HTTP2), ("sdk_responses_embeddings_gemini", sdk::SDK_OTHER_APIS)] {
        let mut cmd = clients::python(&cert, script);
        cmd.env("GAUGE_TEST_PORT", &port).env("SSL_CERT_FILE", &cert);
        runs.push((name, clients::run(name, &mut cmd).0));
    }
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--fail", "--http2", "--compressed", "-H", "content-type: application/json", "--cacert"])
        .arg(&cert)
        .args(["-d", r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#])
        .arg(format!("https://127.0.0.1:{port}/v1/chat/completions"));
    runs.push(("curl_http2_stream", clients::run("curl", &mut curl).0));
    // node, with OpenSSL in its executable: held until the recorder has hooked it.
    let mut node = clients::node(&cert, sdk::NODE_ANTHROPIC_STREAM);
    node.env("GAUGE_TEST_PORT", &port);
    let node = clients::Held::start("node", &mut node);
    let node_pid = node.pid();
    recorder.log.wait_for(&["attached", "/usr/bin/node"], Duration::from_secs(20));
    node.go("node https");
    runs.push(("node_https_anthropic_stream", node_pid));
    thread::sleep(Duration::from_secs(1));
    let events = recorder.events();
    recorder.stop();
    for (name, pid) in runs {
        let mine: Vec<&CaptureEvent> = events.iter().filter(|e| e.tgid == pid && !matches!(e.payload, Payload::Exec)).collect();
        assert!(!mine.is_empty(), "{name}: nothing recorded for pid {pid}");
        let path = fixtures().join(format!("{name}.jsonl"));
        let file = std::fs::File::create(&path).expect("create fixture");
        let mut writer = recording::Writer::new(std::io::BufWriter::new(file), true, 0).expect("preamble");
        for e in mine {
            writer.write(e).expect("write");
        }
        writer.flush().expect("flush");
    }
    drop(mock);
}
