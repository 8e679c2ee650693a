//! The real eBPF capture against real TLS clients (curl, python `ssl`, node's static
//! OpenSSL, GnuTLS's gnutls-cli), compared byte for byte with what a local TLS
//! server saw.

use gauge_agent::source::CaptureEvent;
use gauge_tests::{
    agent::{Daemon, Recorder, agent_binary, shared_recorder},
    clients::{self, Held},
    kernel_tests_enabled,
    mock::{Exchange, MockTls},
    streams::{Stream, streams},
};

/// Waits until process `pid` has captured streams matching every exchange, then
/// returns them.
fn captured_exchanges(recorder: &Recorder, pid: u32, expected: &[Exchange]) -> Vec<Stream> {
    let matches = |events: &[CaptureEvent]| {
        let got = streams(events, pid);
        expected.iter().all(|x| got.values().any(|s| s.written == x.received && s.read == x.sent))
    };
    let events = recorder.wait_until(&format!("{} exchanges of pid {pid}", expected.len()), matches);
    streams(&events, pid).into_values().collect()
}

/// The server's only connection was captured byte for byte from process `pid`.
fn assert_one_exchange_captured(recorder: &Recorder, server: &MockTls, pid: u32) {
    let exchanges = server.wait_exchanges(1);
    let captured = captured_exchanges(recorder, pid, &exchanges);
    assert_same(captured.iter().find(|s| s.written == exchanges[0].received).expect("stream"), &exchanges[0]);
}

fn assert_same(stream: &Stream, exchange: &Exchange) {
    assert_eq!(stream.written, exchange.received, "captured request differs from what the server received");
    assert_eq!(stream.read, exchange.sent, "captured response differs from what the server sent");
    assert_eq!(stream.missing, 0);
}

#[test]
fn curl_request_and_response_are_captured_byte_for_byte() {
    if !kernel_tests_enabled("curl") {
        return;
    }
    let server = MockTls::start();
    let recorder = shared_recorder();
    let (pid, out) = clients::run("curl", &mut clients::curl(&server.ca_file, &server.url("/size/2000"), &["-d", "{\"model\":\"gpt-4o-mini\"}"]));
    assert_eq!(out.stdout.len(), 2000);
    let exchanges = server.wait_exchanges(1);
    let captured = captured_exchanges(recorder, pid, &exchanges);
    let stream = captured.iter().find(|s| s.written == exchanges[0].received).expect("the connection");
    assert_same(stream, &exchanges[0]);
    assert!(String::from_utf8_lossy(&stream.written).starts_with("POST /size/2000 HTTP/1.1\r\n"));
    // curl frees its connection: the close is reported so state can be dropped.
    recorder.wait_until("close of curl's connection", |events| streams(events, pid).values().any(|s| s.closed));
}

const PYTHON_POST: &str = r#"
import http.client, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["GAUGE_TEST_CA"])
conn = http.client.HTTPSConnection("127.0.0.1", int(os.environ["GAUGE_TEST_PORT"]), context=ctx)
size = int(os.environ["GAUGE_TEST_BODY"])
body = bytes(range(256)) * (size // 256)
conn.request("POST", os.environ["GAUGE_TEST_PATH"], body=body, headers={"Content-Type": "application/octet-stream"})
data = conn.getresponse().read()
print(len(data))
"#;

#[test]
fn gnutls_record_send_and_recv_are_captured_byte_for_byte() {
    if !kernel_tests_enabled("gnutls-cli") {
        return;
    }
    let server = MockTls::start();
    let recorder = shared_recorder();
    let request = b"POST /size/3000 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 25\r\n\r\n{\"model\":\"gpt-4o-mini\"}\n\n";
    let (pid, out) = clients::gnutls_cli(&server.ca_file, server.addr.port(), request, &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("200 OK"), "{}", String::from_utf8_lossy(&out.stdout));
    let exchanges = server.wait_exchanges(1);
    let captured = captured_exchanges(recorder, pid, &exchanges);
    let stream = captured.iter().find(|s| s.written == exchanges[0].received).expect("the connection");
    assert_same(stream, &exchanges[0]);
    assert!(String::from_utf8_lossy(&stream.written).starts_with("POST /size/3000 HTTP/1.1\r\n"));
    // gnutls_bye / gnutls_deinit end the session.
    recorder.wait_until("close of gnutls-cli's session", |events| streams(events, pid).values().any(|s| s.closed));
}

fn python_post(server: &MockTls, path: &str, body: usize) -> u32 {
    let mut cmd = clients::python(&server.ca_file, PYTHON_POST);
    cmd.env("GAUGE_TEST_PORT", server.addr.port().to_string())
        .env("GAUGE_TEST_PATH", path)
        .env("GAUGE_TEST_BODY", body.to_string());
    clients::run("python http.client", &mut cmd).0
}

#[test]
fn python_ssl_ex_calls_are_captured_byte_for_byte() {
    if !kernel_tests_enabled("python") {
        return;
    }
    let server = MockTls::start();
    let recorder = shared_recorder();
    // A 300 KiB response arrives over many SSL_read_ex calls.
    let pid = python_post(&server, "/size/307200", 4096);
    assert_one_exchange_captured(recorder, &server, pid);
}

#[test]
fn a_one_mebibyte_request_body_is_captured_whole_in_chunks() {
    if !kernel_tests_enabled("1 MiB body") {
        return;
    }
    let server = MockTls::start();
    let recorder = shared_recorder();
    let pid = python_post(&server, "/size/100", 1 << 20);
    let exchanges = server.wait_exchanges(1);
    assert!(exchanges[0].received.len() > 1 << 20);
    let captured = captured_exchanges(recorder, pid, &exchanges);
    assert_same(captured.iter().find(|s| s.written == exchanges[0].received).expect("stream"), &exchanges[0]);
}

#[test]
fn calls_beyond_the_per_call_cap_are_cut_and_counted() {
    if !kernel_tests_enabled("per-call cap") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gauge.toml");
    std::fs::write(&config, "[capture]\nmax_call_bytes = 65536\n").expect("config");
    let server = MockTls::start();
    let recorder = Recorder::start(false, &["--config", config.to_str().expect("utf8 path")]);
    let pid = python_post(&server, "/size/100", 1 << 20);
    let exchanges = server.wait_exchanges(1);
    let events = recorder.wait_until("response of the capped call", |events| {
        streams(events, pid).values().any(|s| s.read == exchanges[0].sent)
    });
    let stream = streams(&events, pid).into_values().find(|s| s.read == exchanges[0].sent).expect("stream");
    // The request went out in one SSL_write_ex of headers+body or two calls; either
    // way, every call over 64 KiB is cut to its first 64 KiB and the rest is counted.
    assert!(stream.missing > 0, "the cap must cut the 1 MiB body");
    assert_eq!(stream.written.len() as u64 + stream.missing, exchanges[0].received.len() as u64);
    assert!(exchanges[0].received.starts_with(&stream.written[..65536]));
    let summary = recorder.stop();
    // The recorder's counter covers every process it saw (other tests run in parallel).
    let truncated: u64 = summary
        .split(" bytes truncated")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no truncation count in: {summary}"));
    assert!(truncated >= stream.missing, "{truncated} counted, {} cut from this call: {summary}", stream.missing);
}

const PYTHON_CONCURRENT: &str = r#"
import http.client, os, ssl, threading
ctx = ssl.create_default_context(cafile=os.environ["GAUGE_TEST_CA"])
port = int(os.environ["GAUGE_TEST_PORT"])
barrier = threading.Barrier(20)
def one(i):
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
    conn.connect()
    barrier.wait()
    conn.request("POST", "/size/%d" % (1000 + i), body=("conn-%02d;" % i) * 200)
    conn.getresponse().read()
threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
for t in threads: t.start()
for t in threads: t.join()
"#;

#[test]
fn twenty_concurrent_connections_of_one_process_stay_separate() {
    if !kernel_tests_enabled("concurrent connections") {
        return;
    }
    let server = MockTls::start();
    let recorder = shared_recorder();
    let mut cmd = clients::python(&server.ca_file, PYTHON_CONCURRENT);
    cmd.env("GAUGE_TEST_PORT", server.addr.port().to_string());
    let (pid, _) = clients::run("python threads", &mut cmd);
    let exchanges = server.wait_exchanges(20);
    let captured = captured_exchanges(recorder, pid, &exchanges);
    for exchange in &exchanges {
        let stream = captured.iter().find(|s| s.written == exchange.received).expect("each connection captured alone");
        assert_same(stream, exchange);
    }
}

const NODE_HELD: &str = r#"
const https = require('https');
process.stdin.once('data', () => {
  const req = https.request({host: '127.0.0.1', port: Number(process.env.GAUGE_TEST_PORT), path: '/size/5000',
    method: 'POST', headers: {'content-type': 'application/json'}, agent: false}, res => {
    let n = 0; res.on('data', d => n += d.length); res.on('end', () => { console.log(n); process.exit(0); });
  });
  req.end(JSON.stringify({model: 'claude-sonnet-4-5', messages: [{role: 'user', content: 'hi'}]}));
});
"#;

fn node_held(server: &MockTls) -> Held {
    let mut cmd = clients::node(&server.ca_file, NODE_HELD);
    cmd.env("GAUGE_TEST_PORT", server.addr.port().to_string());
    Held::start("node", &mut cmd)
}

#[test]
fn node_static_openssl_of_a_running_process_is_hooked() {
    if !kernel_tests_enabled("node (running)") {
        return;
    }
    let server = MockTls::start();
    let node = node_held(&server);
    let pid = node.pid();
    // node is running before the agent starts: found through /proc at start.
    let recorder = Recorder::start(false, &[]);
    recorder.log.wait_for(&["attached", "/usr/bin/node"], std::time::Duration::from_secs(10));
    let out = node.go("node https");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5000");
    assert_one_exchange_captured(&recorder, &server, pid);
    recorder.stop();
}

#[test]
fn node_started_after_the_agent_is_hooked_at_exec() {
    if !kernel_tests_enabled("node (started later)") {
        return;
    }
    let server = MockTls::start();
    let recorder = Recorder::start(false, &[]);
    let node = node_held(&server);
    let pid = node.pid();
    // The exec event leads discovery to node's executable.
    recorder.log.wait_for(&["attached", "/usr/bin/node"], std::time::Duration::from_secs(10));
    node.go("node https");
    assert_one_exchange_captured(&recorder, &server, pid);
    recorder.stop();
}

#[test]
fn recordings_redact_credentials_by_default() {
    if !kernel_tests_enabled("redaction") {
        return;
    }
    let server = MockTls::start();
    let recorder = Recorder::start(true, &[]);
    let secret = "sk-test-0123456789abcdefghijKLMN";
    let (pid, _) = clients::run(
        "curl",
        &mut clients::curl(
            &server.ca_file,
            &server.url("/size/10"),
            &["-H", &format!("Authorization: Bearer {secret}"), "-H", "x-api-key: hunter2hunter2"],
        ),
    );
    let exchanges = server.wait_exchanges(1);
    let events = recorder.wait_until("curl request", |events| {
        streams(events, pid).values().any(|s| s.written.len() == exchanges[0].received.len())
    });
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&recorder.output).expect("stat recording").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "recordings hold prompts: owner-only");
    recorder.stop();
    let written = streams(&events, pid).into_values().find(|s| !s.written.is_empty()).expect("stream").written;
    let text = String::from_utf8_lossy(&written);
    assert!(!text.contains("0123456789abcdef") && !text.contains("hunter2"), "secret leaked: {text}");
    assert!(text.contains("Authorization: ****** ") && text.contains("x-api-key: **************"), "{text}");
    assert_eq!(written.len(), exchanges[0].received.len(), "redaction keeps lengths");
}

#[test]
fn daemon_serves_health_metrics_and_targets() {
    if !kernel_tests_enabled("daemon") {
        return;
    }
    let server = MockTls::start();
    let mut daemon = Daemon::start("");
    daemon.wait_healthy();
    assert!(daemon.metric("gauge_probes_attached") >= 8.0, "libssl's read/write entry and return probes");
    let before = daemon.metric("gauge_capture_bytes_total{direction=\"write\"}");
    clients::run("curl", &mut clients::curl(&server.ca_file, &server.url("/size/10"), &[]));
    let request = server.wait_exchanges(1)[0].received.len() as f64;
    let start = std::time::Instant::now();
    while daemon.metric("gauge_capture_bytes_total{direction=\"write\"}") < before + request {
        assert!(start.elapsed().as_secs() < 20, "capture bytes did not grow by the request size");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(daemon.metric("gauge_capture_lost_events_total{reason=\"ring_full\"}"), 0.0);
    let (_, metrics) = daemon.get("/metrics").expect("scrape");
    for name in ["gauge_capture_events_total", "gauge_capture_truncated_bytes_total", "gauge_capture_lost_events_total"] {
        assert!(metrics.contains(name), "{name} missing");
    }
    let targets = std::process::Command::new(agent_binary())
        .args(["targets", "--listen", &daemon.addr])
        .output()
        .expect("gauge-agent targets");
    let listing = String::from_utf8_lossy(&targets.stdout);
    assert!(targets.status.success() && listing.contains("libssl.so.3") && listing.contains("ssl_write_internal"), "{listing}");
    assert!(daemon.stop().success(), "daemon exits cleanly on SIGTERM");
}

const PYTHON_HELD: &str = r#"
import http.client, os, ssl, sys
ctx = ssl.create_default_context(cafile=os.environ["GAUGE_TEST_CA"])
sys.stdin.readline()
conn = http.client.HTTPSConnection("127.0.0.1", int(os.environ["GAUGE_TEST_PORT"]), context=ctx)
conn.request("POST", "/size/777", body="from a container")
print(len(conn.getresponse().read()))
"#;

#[test]
fn a_private_libssl_copy_in_another_mount_namespace_is_found_and_hooked() {
    if !kernel_tests_enabled("mount namespace") {
        return;
    }
    // Like a container: the process sees its own libssl (another inode) at the usual
    // path, in a mount namespace of its own. The agent reaches it via /proc/PID/root.
    let dir = tempfile::tempdir().expect("tempdir");
    let system = "/usr/lib/x86_64-linux-gnu/libssl.so.3";
    let copy = dir.path().join("libssl.so.3");
    std::fs::copy(system, &copy).expect("copy libssl");
    let server = MockTls::start();
    let recorder = Recorder::start(false, &[]);
    let script = format!(
        "mount --bind {} {system} && exec python3 -c '{}'",
        copy.display(),
        PYTHON_HELD.replace('\'', "\"")
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("GAUGE_TEST_CA", &server.ca_file)
        .env("GAUGE_TEST_PORT", server.addr.port().to_string());
    let python = Held::start("python in its own mount namespace", &mut cmd);
    let pid = python.pid();
    recorder.log.wait_for(&["attached", "libssl.so.3", &format!("pid: {pid}")], std::time::Duration::from_secs(15));
    let out = python.go("python in its own mount namespace");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "777");
    assert_one_exchange_captured(&recorder, &server, pid);
    recorder.stop();
}
