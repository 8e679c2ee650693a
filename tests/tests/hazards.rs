//! Kernel hazards probed at start: the uretprobe/seccomp canary, and capture with
//! return probes off (writes at entry, no reads).

use std::{
    io::{Read as _, Write as _},
    os::unix::process::ExitStatusExt as _,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use gauge_tests::{
    agent::{Daemon, agent_binary, wait_timeout},
    clients, kernel_tests_enabled,
    mock::MockTls,
    world::{World, sum},
};

const OFF: &str = "[capture]\nreturn_probes = \"off\"\n";

/// Polls `/metrics` until `done` holds for the scrape, or fails after 20 s.
fn wait_metrics(daemon: &Daemon, what: &str, done: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let (_, text) = daemon.get("/metrics").expect("scrape");
        if done(&text) {
            return text;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{what} within 20 s:\n{text}\ndaemon log:\n{}", daemon.log.text());
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn by_default_the_canary_runs_and_this_kernel_keeps_return_probes() {
    if !kernel_tests_enabled("uretprobe canary") {
        return;
    }
    let mut daemon = Daemon::start("");
    daemon.wait_healthy();
    let log = daemon.log.text();
    // Kernel 6.18 lets the uretprobe syscall through seccomp: the confined canary lives.
    assert!(
        log.contains("return probes on: a seccomp-confined canary process survived returning through a uretprobe"),
        "{log}"
    );
    assert_eq!(daemon.metric("gauge_capture_return_probes{state=\"on\",reason=\"canary\"}"), 1.0);
    let (_, metrics) = daemon.get("/metrics").expect("scrape");
    assert!(!metrics.contains("state=\"off\""), "one decision only:\n{metrics}");
    assert!(daemon.metric("gauge_probes_attached") >= 8.0, "libssl's entry and return probes");
    // The canary's probe is gone once it has answered: its child was scoped alone,
    // and the agent itself (the same file) never runs into it.
    daemon.stop();
}

/// The canary child, run by hand as the agent runs it.
fn canary_child(extra: &[&str]) -> Command {
    let mut cmd = Command::new(agent_binary());
    cmd.arg("__uretprobe-canary").args(extra).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

#[test]
fn the_canary_child_is_really_confined() {
    // Confinement needs no privilege (no_new_privs): this runs as any user.
    let mut child = canary_child(&["--forbidden-syscall"]).spawn().expect("start the canary child");
    let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("the confined child ends");
    let mut said = String::new();
    child.stdout.take().expect("stdout").read_to_string(&mut said).expect("read stdout");
    assert_eq!(said, "ready\n", "confined first, then nothing more");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "getpid under the canary's filter must kill it: {status}");

    // The same filter lets the canary's own protocol through: without a probe
    // attached it reads its byte, calls, says ok and exits 0.
    let mut child = canary_child(&[]).spawn().expect("start the canary child");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut ready = [0u8; 6];
    stdout.read_exact(&mut ready).expect("ready");
    assert_eq!(&ready, b"ready\n");
    child.stdin.take().expect("stdin").write_all(b"x").expect("wake the child");
    let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("the child ends");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("read stdout");
    assert!(status.success() && rest == "ok\n", "{status}, said {rest:?}");
}

#[test]
fn with_return_probes_off_requests_are_captured_at_entry_and_responses_are_not() {
    if !kernel_tests_enabled("return probes off") {
        return;
    }
    let server = MockTls::start();
    let mut daemon = Daemon::start(OFF);
    daemon.wait_healthy();
    assert!(daemon.log.text().contains("return probes disabled: capture.return_probes = \"off\""), "{}", daemon.log.text());
    assert_eq!(daemon.metric("gauge_capture_return_probes{state=\"off\",reason=\"config\"}"), 1.0);
    let written = "gauge_capture_bytes_total{direction=\"write\"}";
    let before = daemon.metric(written);

    // curl (SSL_write) and python (SSL_write_ex), each a POST with a body.
    clients::run("curl", &mut clients::curl(&server.ca_file, &server.url("/size/3000"), &["-d", "{\"model\":\"gpt-4o-mini\"}"]));
    let mut python = clients::python(&server.ca_file, PYTHON_POST);
    python.env("GAUGE_TEST_PORT", server.addr.port().to_string());
    clients::run("python http.client", &mut python);
    let exchanges = server.wait_exchanges(2);
    let requests: usize = exchanges.iter().map(|x| x.received.len()).sum();
    assert!(exchanges.iter().all(|x| x.sent.len() > 3000), "both got their response");
    let want = before + requests as f64;
    wait_metrics(&daemon, "the request bytes captured at entry", |m| sum(m, "gauge_capture_bytes_total", &[("direction", "write")]) >= want);

    // Responses were read by both clients, and none of it was captured.
    assert_eq!(daemon.metric("gauge_capture_bytes_total{direction=\"read\"}"), 0.0);
    assert_eq!(daemon.metric("gauge_capture_events_total{kind=\"read\"}"), 0.0);
    // Entry probes only: SSL_write, SSL_write_ex, SSL_shutdown, SSL_free on libssl.
    let (_, metrics) = daemon.get("/metrics").expect("scrape");
    assert_eq!(sum(&metrics, "gauge_capture_return_probes", &[("state", "on")]), 0.0);
    daemon.stop();
}

const PYTHON_POST: &str = r#"
import http.client, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["GAUGE_TEST_CA"])
conn = http.client.HTTPSConnection("127.0.0.1", int(os.environ["GAUGE_TEST_PORT"]), context=ctx)
conn.request("POST", "/size/4000", body=b"x" * 5000, headers={"Content-Type": "application/octet-stream"})
print(len(conn.getresponse().read()))
conn.close()
"#;

#[test]
fn with_return_probes_off_an_llm_request_is_still_counted_as_a_call_without_a_response() {
    if !kernel_tests_enabled("return probes off, LLM call") {
        return;
    }
    let world = World::start(OFF);
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let url = format!("https://127.0.0.1:{}/v1/chat/completions", world.mock.port);
    // The workflow header tells this call from other tests' traffic, which the
    // daemon sees too (every process's libssl is probed).
    let headers = ["-H", "content-type: application/json", "-H", "x-gauge-workflow: return-probes-off", "-d", body];
    let mut curl = clients::curl(&world.cert, &url, &headers);
    clients::run("curl to the mock provider", &mut curl);
    // The response is never seen: the call ends when curl closes the connection
    // (SSL_shutdown/SSL_free are entry probes), as an error without usage.
    let call = [("process", "curl"), ("workflow", "return-probes-off"), ("model", "gpt-4o-mini")];
    let errors = [call.as_slice(), &[("status", "error")]].concat();
    let metrics = wait_metrics(&world.daemon, "the call ended without a response", |m| sum(m, "gauge_llm_requests_total", &errors) >= 1.0);
    assert_eq!(sum(&metrics, "gauge_llm_requests_total", &errors), 1.0, "{metrics}");
    assert_eq!(sum(&metrics, "gauge_llm_requests_total", &call), 1.0, "one call, with no other status: {metrics}");
    assert!(sum(&metrics, "gauge_llm_unmetered_calls_total", &[("reason", "incomplete")]) >= 1.0, "{metrics}");
    // No response is ever seen, so nothing at all is metered.
    assert_eq!(sum(&metrics, "gauge_llm_tokens_total", &[]), 0.0, "{metrics}");
    assert_eq!(world.mock.received("gpt-4o-mini"), 1, "the request itself went through untouched");
}
