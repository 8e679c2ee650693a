//! Every kind of TLS client is metered exactly, end to end: the real daemon and its
//! probes, the mock provider (fixed usage), and clients that do not use the system
//! libssl. A Go agent built here (Debian's golang-go, `tests/go/llm_client.go`)
//! through `crypto/tls` over HTTP/1.1 and HTTP/2, plain and streamed, with and
//! without its symbol table; GnuTLS's own client, gnutls-cli; Bun, whose BoringSSL
//! has no symbols (found by its known bytes); and clients of a local model server in
//! plain HTTP (python, curl, node, Go), seen from syscalls.

use std::{path::PathBuf, process::Command, sync::OnceLock, time::Duration};

use gauge_tests::{
    agent::Daemon,
    clients::{self, Held},
    kernel_tests_enabled,
    mock::MockLlm,
    world::{World, scrape, with},
};

/// The mock's usage per chat call: 21 prompt tokens of which 5 cached, 7 completion.
const INPUT: f64 = 16.0;
const CACHE_READ: f64 = 5.0;
const OUTPUT: f64 = 7.0;

/// The Go client, built once per test run: with its symbol table, and stripped of
/// it (`-ldflags=-s -w`, as images often ship), found then by Go's function table.
fn go_client(stripped: bool) -> &'static PathBuf {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    let (full, bare) = BUILT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("gauge-go-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the build dir");
        let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("go/llm_client.go");
        let build = |out: &PathBuf, flags: &[&str]| {
            let mut go = Command::new("go");
            go.arg("build").args(flags).arg("-o").arg(out).arg(&source).env("CGO_ENABLED", "0");
            clients::run("go build (apt-get install golang-go)", &mut go);
        };
        let (full, bare) = (dir.join("llm_client"), dir.join("llm_client_stripped"));
        build(&full, &[]);
        build(&bare, &["-ldflags=-s -w"]);
        (full, bare)
    });
    if stripped { bare } else { full }
}

fn run_go(world: &World, mode: &str, calls: u32, agent: &str) {
    run_go_binary(world, go_client(false), mode, calls, agent);
}

fn run_go_binary(world: &World, binary: &PathBuf, mode: &str, calls: u32, agent: &str) {
    let cert = world.cert.display().to_string();
    run_go_on(&world.daemon, binary, &[("SSL_CERT_FILE", &cert)], world.mock.port, mode, calls, agent);
}

fn run_go_on(daemon: &Daemon, binary: &PathBuf, env: &[(&str, &str)], port: u16, mode: &str, calls: u32, agent: &str) {
    let mut cmd = Command::new(binary);
    cmd.args([mode, &calls.to_string()]).env("GAUGE_TEST_PORT", port.to_string()).env("GAUGE_AGENT", agent).envs(env.iter().copied());
    let client = Held::start("go client", &mut cmd);
    // Found at exec: it calls once the daemon says the file is hooked.
    daemon.log.wait_for(&["attached", &binary.display().to_string()], Duration::from_secs(20));
    let out = client.go(&format!("go client ({mode})"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn go_crypto_tls_calls_are_metered_exactly_over_http1_and_http2() {
    if !kernel_tests_enabled("Go crypto/tls") {
        return;
    }
    let world = World::start("");
    run_go(&world, "h1", 4, "go-h1-bot");
    run_go(&world, "h2", 4, "go-h2-bot");
    let (h1, h2) = ([("agent", "go-h1-bot")], [("agent", "go-h2-bot")]);
    let m = world.scrape(&[(&h1, 4.0), (&h2, 4.0)]);
    for labels in [&h1, &h2] {
        m.check("gauge_llm_requests_total", labels, 4.0);
        m.check("gauge_llm_requests_total", &[labels[0], ("status", "200"), ("model", "gpt-4o-mini-2024-07-18")], 4.0);
        m.tokens(labels, &[("input", 4.0 * INPUT), ("cache_read", 4.0 * CACHE_READ), ("output", 4.0 * OUTPUT)]);
    }
    m.free_of("sk-go-test-secret");
    let stripped = go_client(true);
    let elf = std::fs::read(stripped).expect("read the stripped client");
    assert!(!elf.windows(8).any(|w| w == b".symtab\0"), "the stripped client still has a .symtab");
    run_go_binary(&world, stripped, "h1", 2, "go-stripped-bot");
    let bare = [("agent", "go-stripped-bot")];
    let m = world.scrape(&[(&bare, 2.0)]);
    m.check("gauge_llm_requests_total", &[bare[0], ("status", "200")], 2.0);
    m.tokens(&bare, &[("input", 2.0 * INPUT), ("cache_read", 2.0 * CACHE_READ), ("output", 2.0 * OUTPUT)]);
    // `targets` names the Go binary with its entry and RET probes.
    let (_, targets) = world.daemon.get("/targets").expect("targets");
    let go = targets.split("},{").find(|t| t.contains("llm_client")).unwrap_or_else(|| panic!("no Go target in {targets}"));
    assert!(go.contains("crypto/tls.(*Conn).Write") && go.contains("crypto/tls.(*Conn).Read"), "{go}");
}

#[test]
fn a_go_agent_over_its_budget_is_stopped_before_the_next_request_leaves() {
    if !kernel_tests_enabled("Go under a budget") {
        return;
    }
    let config = "[[prices]]\nmodel = \"budget-model\"\ninput = 1000\noutput = 1000\n\n\
        [[policies]]\nname = \"go-budget\"\nagent = \"go-budget-bot\"\nscope = \"agent\"\nmax_cost_usd = 0.05\nwindow = \"30d\"\naction = \"kill\"\ngate = true\n";
    let world = World::start(config);
    let binary = go_client(false);
    let mut cmd = Command::new(binary);
    cmd.args(["h1", "5"])
        .env("GAUGE_TEST_PORT", world.mock.port.to_string())
        .env("GAUGE_TEST_MODEL", "budget-model")
        .env("SSL_CERT_FILE", &world.cert)
        .env("GAUGE_AGENT", "go-budget-bot")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("start the Go client");
    world.daemon.log.wait_for(&["attached", &binary.display().to_string()], Duration::from_secs(20));
    drop(child.stdin.take());
    // Each call costs (21 + 7) tokens x $1000 per million = $0.028: the second spends
    // the $0.05, so the third is held at crypto/tls.(*Conn).Write and the agent killed.
    let status = gauge_tests::agent::wait_timeout(&mut child, Duration::from_secs(30)).expect("the Go client ends");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "{}", world.daemon.log.text());
    assert_eq!(world.mock.received("budget-model"), 2, "{}", world.daemon.log.text());
}

#[test]
fn gnutls_calls_are_metered_exactly() {
    if !kernel_tests_enabled("GnuTLS") {
        return;
    }
    let world = World::start("");
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi from gnutls"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-gnutls-secret\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    for _ in 0..2 {
        let (_, out) = clients::gnutls_cli(&world.cert, world.mock.port, request.as_bytes(), &[("GAUGE_AGENT", "gnutls-bot")]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out.stdout));
    }
    let labels = [("agent", "gnutls-bot")];
    let m = world.scrape(&[(&labels, 2.0)]);
    m.check("gauge_llm_requests_total", &[labels[0], ("status", "200"), ("model", "gpt-4o-mini-2024-07-18")], 2.0);
    m.tokens(&labels, &[("input", 2.0 * INPUT), ("cache_read", 2.0 * CACHE_READ), ("output", 2.0 * OUTPUT)]);
    m.free_of("sk-gnutls-secret");
}

/// Bun's fetch: two chat calls, one streamed, once stdin ends (the daemon has hooked it).
const BUN_FETCH: &str = r#"
await Bun.stdin.text();
const url = `https://127.0.0.1:${process.env.GAUGE_TEST_PORT}/v1/chat/completions`;
for (const stream of [false, true]) {
  const body = {model: "gpt-4o-mini", messages: [{role: "user", content: "hi from bun"}], stream};
  if (stream) body.stream_options = {include_usage: true};
  const res = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json", "Authorization": "Bearer sk-bun-secret"}, body: JSON.stringify(body)});
  if (res.status !== 200) { console.error(res.status); process.exit(1); }
  await res.text();
}
console.log("ok");
"#;

#[test]
fn bun_with_its_hidden_boringssl_is_metered_exactly() {
    if !kernel_tests_enabled("Bun (BoringSSL)") {
        return;
    }
    assert!(std::path::Path::new(clients::BUN).exists(), "{} is missing: `cargo xtask test` installs it", clients::BUN);
    let world = World::start("");
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("fetch.mjs");
    std::fs::write(&script, BUN_FETCH).expect("write the script");
    let mut bun = Command::new(clients::BUN);
    bun.arg(&script)
        .env("GAUGE_TEST_PORT", world.mock.port.to_string())
        .env("NODE_EXTRA_CA_CERTS", &world.cert)
        .env("GAUGE_AGENT", "bun-bot");
    let client = Held::start("bun", &mut bun);
    // Found at exec, by scanning its 100 MB for the known bytes.
    world.daemon.log.wait_for(&["attached", clients::BUN], Duration::from_secs(30));
    let out = client.go("bun fetch");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let labels = [("agent", "bun-bot")];
    let m = world.scrape(&[(&labels, 2.0)]);
    m.check("gauge_llm_requests_total", &[labels[0], ("status", "200")], 2.0);
    m.tokens(&labels, &[("input", 2.0 * INPUT), ("cache_read", 2.0 * CACHE_READ), ("output", 2.0 * OUTPUT)]);
    m.free_of("sk-bun-secret");
    let (_, targets) = world.daemon.get("/targets").expect("targets");
    assert!(targets.contains("bun-1.4.5/bun"), "{targets}");

    // A build whose SSL_write does not begin with the known bytes is not hooked, but
    // said to be: counted, and listed in targets with the reason.
    let unknown = dir.path().join("bun-unknown-build");
    let mut bytes = std::fs::read(clients::BUN).expect("read bun");
    // SSL_write's known first 32 bytes (source/boringssl.rs), found once.
    let known = b"\x55\x48\x89\xe5\x41\x57\x41\x56\x41\x55\x41\x54\x53\x48\x83\xec\x18\x41\x89\xd7\x49\x89\xf6\x48\x89\xfb\x48\x8b\x47\x30\xc7\x80";
    let at: Vec<usize> = bytes.windows(known.len()).enumerate().filter(|(_, w)| *w == known).map(|(i, _)| i).collect();
    assert_eq!(at.len(), 1, "SSL_write's bytes are in bun once");
    bytes[at[0] + known.len() - 1] ^= 0xff; // inside SSL_write, which this copy never runs
    std::fs::write(&unknown, bytes).expect("write the copy");
    std::fs::set_permissions(&unknown, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let mut idle = Command::new(&unknown);
    idle.args(["-e", "await Bun.stdin.text()"]);
    let held = Held::start("bun (unknown build)", &mut idle);
    world.daemon.log.wait_for(&["cannot be hooked", "bun-unknown-build"], Duration::from_secs(30));
    held.go("bun (unknown build)");
    assert_eq!(world.daemon.metric("gauge_probe_attach_failures_total{reason=\"unhookable\"}"), 1.0);
    let (_, targets) = world.daemon.get("/targets").expect("targets");
    assert!(targets.contains("bun-unknown-build") && targets.contains("BoringSSL without symbols"), "{targets}");
}

/// One chat call over plain HTTP/1.1, plain or streamed (with its usage), by python's
/// http.client (send/recv: the sendto/recvfrom syscalls).
const PYTHON_PLAIN: &str = r#"
import http.client, json, os, sys
port = int(os.environ["GAUGE_TEST_PORT"])
for stream in (False, True):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.status
    response.read()
    conn.close()
print("ok")
"#;

/// Two calls on one kept-alive connection, the second once stdin says so.
const PYTHON_KEEP_ALIVE: &str = r#"
import http.client, json, os, sys
conn = http.client.HTTPConnection("127.0.0.1", int(os.environ["GAUGE_TEST_PORT"]))
body = json.dumps({"model": "gpt-4o-mini-before", "messages": [{"role": "user", "content": "hi"}]})
for turn in range(2):
    if turn == 1:
        sys.stdin.readline()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.status
    response.read()
print("ok")
"#;

/// node's http module (libuv: writev and read).
const NODE_PLAIN: &str = r#"
const http = require("http");
const body = JSON.stringify({model: "gpt-4o-mini", messages: [{role: "user", content: "hi"}]});
const req = http.request({host: "127.0.0.1", port: Number(process.env.GAUGE_TEST_PORT), path: "/v1/chat/completions",
  method: "POST", headers: {"Content-Type": "application/json", "Content-Length": Buffer.byteLength(body)}}, (res) => {
  res.resume();
  res.on("end", () => { if (res.statusCode !== 200) process.exit(1); console.log("ok"); });
});
req.end(body);
"#;

#[test]
fn plain_http_to_a_local_model_server_is_metered_exactly() {
    if !kernel_tests_enabled("plain HTTP") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let mock = MockLlm::start_plain(dir.path(), port);
    // A keep-alive client whose connection is older than the daemon: its first call
    // is before the daemon starts (not metered), its second after (metered).
    let mut before = Command::new("python3");
    before.arg("-c").arg(PYTHON_KEEP_ALIVE).env("GAUGE_TEST_PORT", port.to_string()).env("GAUGE_AGENT", "plain-before");
    let before = Held::start("python keep-alive", &mut before);
    let start = std::time::Instant::now();
    while mock.received("gpt-4o-mini-before") < 1 {
        assert!(start.elapsed() < Duration::from_secs(20), "the keep-alive client's first call did not arrive");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut daemon = Daemon::start(&format!("[capture]\nplain_http_ports = [{port}]\n"));
    daemon.wait_healthy();
    let out = before.go("python keep-alive");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let plain_port = port.to_string();
    let env = [("GAUGE_TEST_PORT", plain_port.as_str())];
    let run = |what: &str, cmd: &mut Command, agent: &str| {
        let (_, out) = clients::run(what, cmd.envs(env).env("GAUGE_AGENT", agent));
        assert!(!out.stdout.is_empty(), "{what} printed nothing");
        out
    };
    let out = run("python over plain http", Command::new("python3").arg("-c").arg(PYTHON_PLAIN), "plain-python");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    run("curl over plain http", Command::new("curl").args(["-sS", "--fail", "-H", "Content-Type: application/json", "-d", body, &url]), "plain-curl");
    let out = run("node over plain http", Command::new("node").arg("-e").arg(NODE_PLAIN), "plain-node");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    run_go_on(&daemon, go_client(false), &[], port, "plain", 2, "plain-go");

    let agents = [("plain-python", 2.0), ("plain-curl", 1.0), ("plain-node", 1.0), ("plain-go", 2.0), ("plain-before", 1.0)];
    let labels: Vec<[(&str, &str); 1]> = agents.iter().map(|(agent, _)| [("agent", *agent)]).collect();
    let wanted: Vec<(&[(&str, &str)], f64)> = labels.iter().zip(&agents).map(|(l, (_, n))| (&l[..], *n)).collect();
    let m = scrape(&daemon, &wanted);
    for (labels, calls) in wanted {
        m.check("gauge_llm_requests_total", &with(labels, &[("status", "200")]), calls);
        m.tokens(labels, &[("input", calls * INPUT), ("cache_read", calls * CACHE_READ), ("output", calls * OUTPUT)]);
    }
    drop(mock);
}

/// `capture.plain_http = "auto"` (the default): with no local model server the
/// syscall tracepoints are not attached (every process's reads and writes would
/// pay for them); once one listens (a listen(2) the kernel counts), the next check
/// attaches them and its calls are metered.
#[test]
fn plain_http_capture_starts_when_a_local_model_server_appears() {
    if !kernel_tests_enabled("plain HTTP auto") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let mut daemon = Daemon::start(&format!("[capture]\nplain_http_ports = [{port}]\n"));
    daemon.wait_healthy();
    assert!(daemon.log.text().contains("plain-HTTP capture waits for a local model server"), "{}", daemon.log.text());
    // It waits by counting listen(2) calls in the kernel, not by reading every
    // namespace's sockets tables every few seconds.
    assert!(!daemon.log.text().contains("listen(2) calls cannot be counted"), "{}", daemon.log.text());
    let mock = MockLlm::start_plain(dir.path(), port);
    daemon.log.wait_for(&["following plain-HTTP connections"], Duration::from_secs(20));
    let (_, out) = clients::run(
        "python over plain http",
        Command::new("python3").arg("-c").arg(PYTHON_PLAIN).env("GAUGE_TEST_PORT", port.to_string()).env("GAUGE_AGENT", "plain-auto"),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let labels = [("agent", "plain-auto")];
    let m = scrape(&daemon, &[(&labels[..], 2.0)]);
    m.check("gauge_llm_requests_total", &with(&labels, &[("status", "200")]), 2.0);
    drop(mock);
}
