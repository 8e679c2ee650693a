//! Bounded under attack: a hostile local process pushes, through real OpenSSL
//! connections, what a well-behaved client never would: request bodies held open on
//! many connections, an endless chunked body, thousands of connections that never
//! finish a request, and a flood of garbage bytes. The daemon's memory stays within
//! its configured budgets, each kind of drop is counted under its own reason, and a
//! normal SDK client calling at the same time as the flood is metered exactly.
//!
//! The hostile process speaks TLS to itself through memory BIOs (`ssl.SSLObject`):
//! every byte passes through `SSL_write_ex` like a real client's, with no network
//! and at the speed of the cipher, which is what makes it a flood.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use gauge_tests::{
    kernel_tests_enabled,
    mock::write_certificate,
    world::{World, sum, with},
};

/// Processes flooding at once: each may take an eighth of the ring past the
/// half-full mark, so three still leave room for everyone else (see `gauge-ebpf`
/// `emit::admitted`).
const FLOODERS: usize = 3;

/// The agent name of the well-behaved client.
const VICTIM: &str = "flood-bystander";

/// Small budgets, so that the bounds are crossed quickly and measurably.
const CONFIG: &str = "\
[capture]
ring_buffer_bytes = 1048576
queue_bytes = 8388608
[http]
max_connections = 1024
max_buffered_bytes = 16777216
";
const BUFFER_BUDGET: f64 = 16.0 * 1048576.0;

/// `python3 -c HOSTILE MODE ARG CERT KEY`: prints "ready" once its connections are
/// open and written, then waits for stdin to close (connections stay open). Modes:
/// bodies N (N connections, each 6 MiB into an LLM request body that never ends),
/// chunked MIB (one endless chunked LLM request body), tiny N (N connections with a
/// half-written request head each), garbage SECONDS (random 200-byte writes, as fast
/// as the cipher goes, for that long).
const HOSTILE: &str = r#"
import os, ssl, sys, time
mode, arg, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
client_ctx = ssl.create_default_context(cafile=cert)
server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server_ctx.load_cert_chain(cert, key)

def connect():
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (c, s):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        try:
            c.do_handshake(); s.do_handshake()
            break
        except ssl.SSLWantReadError:
            continue
    return (c, c_out, s)

def send(conn, data):
    c, c_out, _ = conn
    for i in range(0, len(data), 16384):
        c.write(data[i:i + 16384])
        c_out.read()  # the ciphertext goes nowhere

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\n"
conns = []
if mode == "bodies":
    piece = b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + b"x" * 65536
    for _ in range(arg):
        conn = connect()
        send(conn, HEAD + b"Content-Length: 1000000000\r\n\r\n")
        for _ in range(96):
            send(conn, piece)
        conns.append(conn)
elif mode == "chunked":
    conn = connect()
    send(conn, HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"4000\r\n" + b"y" * 16384 + b"\r\n"
    for _ in range(arg * 64):
        send(conn, chunk)
    conns.append(conn)
elif mode == "tiny":
    for _ in range(arg):
        conn = connect()
        send(conn, HEAD[:40])
        conns.append(conn)
elif mode == "garbage":
    # Small writes: they fill every byte of the ring, where large ones leave gaps
    # that small records of other processes still fit in.
    c, c_out, _ = connect()
    noise = [os.urandom(200) for _ in range(64)]
    end = time.monotonic() + arg
    while time.monotonic() < end:
        for piece in noise:
            c.write(piece)
        c_out.read()
    conns.append((c, c_out, None))
print("ready", flush=True)
sys.stdin.read()
"#;

struct Hostile {
    child: Child,
}

impl Hostile {
    /// Starts the hostile process and waits until it has done its worst.
    fn run(mode: &str, arg: u32, cert: &std::path::Path, key: &std::path::Path, timeout: Duration) -> Self {
        let mut child = Command::new("python3")
            .args(["-c", HOSTILE, mode, &arg.to_string()])
            .arg(cert)
            .arg(key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the hostile process");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(timeout).unwrap_or_else(|_| panic!("hostile {mode} did not finish within {timeout:?}"));
        assert_eq!(line.trim(), "ready", "hostile {mode} failed");
        Self { child }
    }

    /// Lets it exit: its connections are freed (SSL_free), which the daemon sees.
    fn end(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident set size of a process, in bytes (0 once it is gone).
fn rss(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib * 1024.0
}

/// The largest resident set a process had while this lived, sampled every 5 ms.
/// (The kernel's own VmHWM misses peaks that `munmap` gave back, and large
/// buffers are mapped and unmapped.)
struct PeakRss {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl PeakRss {
    fn watch(pid: u32) -> Self {
        use std::sync::{Arc, atomic::{AtomicBool, AtomicU64, Ordering}};
        let (peak, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, s) = (peak.clone(), stop.clone());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss(pid) as u64, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(5));
            }
        });
        Self { peak, stop }
    }

    fn peak(&self) -> f64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed) as f64
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Scrapes until `done` holds for the metrics text (or 20 s), and returns the text.
fn metrics_when(world: &World, what: &str, done: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let (_, text) = world.daemon.get("/metrics").expect("scrape");
        if done(&text) {
            return text;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{what} not seen within 20 s:\n{text}\ndaemon log:\n{}", world.daemon.log.text());
        thread::sleep(Duration::from_millis(100));
    }
}

fn dropped(text: &str, reason: &str) -> f64 {
    sum(text, "gauge_http_dropped_total", &[("reason", reason)])
}

/// The tests of this file, one at a time: every daemon sees every process's
/// traffic, so one test's flood would be the other's.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn hostile_input_stays_within_the_memory_budget() {
    if !kernel_tests_enabled("hostile input end to end") {
        return;
    }
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let world = World::start(CONFIG);
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_certificate(dir.path());
    let pid = world.daemon.pid();
    let baseline = rss(pid);
    let peak = PeakRss::watch(pid);

    // 24 connections x 6 MiB of request body = 144 MiB the daemon would keep
    // without its budget (each body alone is under the 8 MiB per-call cap).
    let before = world.daemon.get("/metrics").expect("scrape").1;
    let bodies = Hostile::run("bodies", 24, &cert, &key, Duration::from_secs(60));
    let text = metrics_when(&world, "memory evictions", |t| dropped(t, "evicted_memory") > dropped(&before, "evicted_memory"));
    let buffered = sum(&text, "gauge_http_buffered_bytes", &[]);
    assert!(buffered <= BUFFER_BUDGET, "buffered {buffered} over the budget:\n{text}");
    bodies.end();

    // One request whose chunked body never ends (64 MiB): the per-call cap holds
    // it under the budget, so nothing is evicted for memory.
    let before = metrics_when(&world, "the bodies' connections closed", |t| sum(t, "gauge_http_buffered_bytes", &[]) < 1048576.0);
    let chunked = Hostile::run("chunked", 64, &cert, &key, Duration::from_secs(60));
    let seen = |t: &str| {
        let bytes = |t: &str| {
            sum(t, "gauge_capture_bytes_total", &[("direction", "write")])
                + sum(t, "gauge_capture_throttled_bytes_total", &[])
                + sum(t, "gauge_capture_lost_bytes_total", &[])
        };
        bytes(t) - bytes(&before)
    };
    let text = metrics_when(&world, "the chunked body", |t| seen(t) >= 64.0 * 1048576.0);
    assert_eq!(dropped(&text, "evicted_memory"), dropped(&before, "evicted_memory"), "{text}");
    let held = sum(&text, "gauge_http_buffered_bytes", &[]);
    assert!(held <= 9.0 * 1048576.0, "one endless body holds {held} bytes, past the 8 MiB per-call cap");
    chunked.end();

    // 3000 connections that never finish a request: at most max_connections kept.
    let before = world.daemon.get("/metrics").expect("scrape").1;
    let tiny = Hostile::run("tiny", 3000, &cert, &key, Duration::from_secs(120));
    let evicted = |t: &str| dropped(t, "evicted_capacity") - dropped(&before, "evicted_capacity");
    let text = metrics_when(&world, "connection evictions", |t| evicted(t) >= 1900.0);
    assert!(sum(&text, "gauge_http_open_connections", &[]) <= 1024.0, "{text}");
    tiny.end();

    // Whatever the attack, the daemon's memory grew by less than its budgets
    // (connections, queue, ring) plus room for the allocator: far less than the
    // 144 MiB the bodies alone would have taken.
    let grown = peak.peak() - baseline;
    let allowance = BUFFER_BUDGET + 8.0 * 1048576.0 + 1048576.0 + 32.0 * 1048576.0;
    eprintln!("peak RSS {:.1} MiB over a baseline of {:.1} MiB", grown / 1048576.0, baseline / 1048576.0);
    assert!(grown < allowance, "peak RSS grew by {} MiB (allowance {} MiB)", grown / 1048576.0, allowance / 1048576.0);
    assert_eq!(world.daemon.get("/healthz").map(|(code, _)| code), Some(200));
}

/// A small ring, so that flooders fill it: without fair shares the bystander's
/// records are lost with theirs (checked by hand with the shares turned off: in
/// two runs of three the bystander's calls were not all metered).
const FLOOD_CONFIG: &str = "[capture]\nring_buffer_bytes = 131072\nqueue_bytes = 8388608\n";

#[test]
fn flooding_processes_do_not_starve_the_capture_of_others() {
    if !kernel_tests_enabled("flood fairness end to end") {
        return;
    }
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let world = World::start(FLOOD_CONFIG);
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_certificate(dir.path());
    // Garbage as fast as the cipher goes, while a normal client makes its calls:
    // the flooder is throttled to its share of the ring, the client is not.
    let mut flooders: Vec<Child> = (0..FLOODERS)
        .map(|_| {
            let mut flood = Command::new("python3");
            flood.args(["-c", HOSTILE, "garbage", "12"]).arg(&cert).arg(&key).stdin(Stdio::piped()).stdout(Stdio::piped());
            flood.spawn().expect("start a flooder")
        })
        .collect();
    thread::sleep(Duration::from_secs(2));
    world.python_as("the SDKs during the flood", gauge_tests::sdk::SDK_CALLS, VICTIM);
    let openai = [("agent", VICTIM), ("provider", "openai_compatible"), ("model", "gpt-4o-mini-2024-07-18")];
    let anthropic = [("agent", VICTIM), ("provider", "anthropic"), ("model", "claude-sonnet-4-5-20250929")];
    let during = world.scrape(&[(&openai, 2.0), (&anthropic, 2.0)]);
    for flooder in &mut flooders {
        let _ = flooder.kill();
        let _ = flooder.wait();
    }
    during.check("gauge_llm_requests_total", &with(&openai, &[("status", "200")]), 2.0);
    during.tokens(&openai, &[("output", 14.0)]);
    during.check("gauge_llm_requests_total", &with(&anthropic, &[("status", "200")]), 2.0);
    during.check("gauge_llm_requests_total", &[("agent", VICTIM), ("model", "fail-once-a"), ("status", "429")], 1.0);
    let text = &during.text;
    let throttled = sum(text, "gauge_capture_lost_events_total", &[("reason", "throttled")]);
    eprintln!("throttled {throttled} records, {:.1} MiB", sum(text, "gauge_capture_throttled_bytes_total", &[]) / 1048576.0);
    assert!(throttled > 0.0, "the flood was never throttled:\n{text}");
    assert!(dropped(text, "not_http1") >= 1.0, "{text}");
    assert_eq!(world.daemon.get("/healthz").map(|(code, _)| code), Some(200));

}
