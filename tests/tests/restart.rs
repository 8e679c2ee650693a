//! Crash and restart under load: a real client makes LLM calls on one kept-alive
//! connection without pause while the daemon is SIGKILLed and started again on the
//! same state file, three times. The client never notices; no probe of a dead daemon
//! stays in the kernel; each daemon meters every call it saw whole, and none twice
//! (no call is counted by two daemons, nor a call whose request went out before the
//! daemon existed); the last one tells how often it crashed and for how long nothing
//! was metering.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use gauge_tests::{
    agent::{Daemon, wait_timeout},
    clients, kernel_tests_enabled,
    mock::{MockLlm, write_certificate},
    world::sum,
};

const CONFIG: &str = "[[agents]]\nname = \"restart-bot\"\nmatch = { cmdline = \"restart-marker\" }\n";
/// Every metered call is logged (with its call_id); the rest stays at info.
const LOG_LEVEL: &str = "info,gauge_agent::app=debug";
const KILLS: usize = 3;
/// Events reach the log within this of the response (ring buffer, pipeline): the
/// last records of a call are found by the ring reader's 200 ms fallback.
const LAG_NS: u64 = 500_000_000;

/// Python's http.client, one connection, one call after another with a pause, each
/// numbered in a header (the workflow, logged by the daemon) and timed on
/// CLOCK_MONOTONIC, the clock of the daemon's events. Any failure ends it with an error.
const CLIENT: &str = r#"# restart-marker
import http.client, json, os, ssl, sys, time
ctx = ssl.create_default_context(cafile=os.environ["GAUGE_TEST_CA"])
conn = http.client.HTTPSConnection("127.0.0.1", int(os.environ["GAUGE_TEST_PORT"]), context=ctx)
log = open(os.environ["CALL_LOG"], "w", buffering=1)
stop = os.environ["STOP_FILE"]
body = json.dumps({"model": "restart-model", "messages": [{"role": "user", "content": "hi"}]})
n = 0
while not os.path.exists(stop):
    n += 1
    start = time.monotonic_ns()
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json", "x-gauge-workflow": "call-%d" % n})
    response = conn.getresponse()
    response.read()
    end = time.monotonic_ns()
    if response.status != 200:
        sys.exit("call %d: status %d" % (n, response.status))
    log.write("%d %d %d\n" % (n, start, end))
    time.sleep(float(os.environ["PAUSE"]))
print("ok")
"#;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The client's calls so far: number -> (start, end).
fn calls(log: &Path) -> HashMap<u32, (u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ').map(|x| x.parse::<u64>().ok());
            Some((u32::try_from(f.next()??).ok()?, (f.next()??, f.next()??)))
        })
        .collect()
}

/// Every BPF object of a kind on the system (BPF_PROG_GET_NEXT_ID = 11,
/// BPF_LINK_GET_NEXT_ID = 31), by id. Ids are not reused soon, so an id that is gone
/// stays gone.
fn bpf_ids(cmd: libc::c_long) -> HashSet<u32> {
    #[repr(C)]
    struct NextId {
        start_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut ids = HashSet::new();
    let mut attr = NextId { start_id: 0, next_id: 0, open_flags: 0 };
    // SAFETY: bpf(2) with a pointer to an attr of the size given; the kernel writes next_id.
    while unsafe { libc::syscall(libc::SYS_bpf, cmd, &mut attr as *mut NextId, size_of::<NextId>() as u32) } == 0 {
        ids.insert(attr.next_id);
        attr.start_id = attr.next_id;
    }
    ids
}

/// The BPF programs and links a process holds, from its fds' fdinfo.
fn held_bpf(pid: u32) -> (HashSet<u32>, HashSet<u32>) {
    let (mut progs, mut links) = (HashSet::new(), HashSet::new());
    let entries = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo");
    for entry in entries.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            let id = |key: &str| line.strip_prefix(key).and_then(|v| v.trim().parse::<u32>().ok());
            progs.extend(id("prog_id:"));
            links.extend(id("link_id:"));
        }
    }
    (progs, links)
}

/// One daemon's life, in CLOCK_MONOTONIC ns.
struct Run {
    spawned: u64,
    healthy: u64,
    scraped: u64,
    killed: Option<u64>,
    /// `gauge_llm_requests_total` of the clients' agent at `scraped`.
    requests: f64,
    lost: f64,
    log: String,
}

/// The calls of `client` a daemon logged: (workflow number, call_id).
fn logged_calls(log: &str, client: u32) -> Vec<(u32, String)> {
    let pid = format!(" pid={client} ");
    log.lines()
        .filter(|l| l.contains("LLM call") && l.contains(&pid))
        .map(|l| {
            let field = |key: &str| l.split(key).nth(1).and_then(|r| r.split_whitespace().next()).map(str::to_owned);
            let n = field(" workflow=call-").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no call number in {l}"));
            (n, field(" call_id=").unwrap_or_else(|| panic!("no call_id in {l}")))
        })
        .collect()
}

/// A client making calls until the stop file appears.
struct Client {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Client {
    fn start(name: &'static str, pause: &str, cert: &Path, port: u16, dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let child = clients::python(cert, CLIENT)
            .env("GAUGE_TEST_PORT", port.to_string())
            .env("CALL_LOG", &log)
            .env("STOP_FILE", dir.join("stop"))
            .env("PAUSE", pause)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a client");
        Self { name, child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self, when: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
            }
            panic!("the {} client ended ({status}) {when}:\n{stderr}", self.name);
        }
    }

    /// Waits for it to end after the stop file; it must print "ok".
    fn finish(&mut self) {
        let status = wait_timeout(&mut self.child, Duration::from_secs(30)).expect("the client ends");
        let (mut out, mut err) = (String::new(), String::new());
        if let (Some(mut o), Some(mut e)) = (self.child.stdout.take(), self.child.stderr.take()) {
            let _ = std::io::Read::read_to_string(&mut o, &mut out);
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        assert!(status.success() && out.trim() == "ok", "the {} client failed ({status}): {out}{err}", self.name);
    }

    /// Under load the pipeline may lag behind the kernel (its queue waits rather
    /// than drops): waits until the daemon has logged this client's last call that
    /// ended well before `before`, or a later one. Calls are handled in order, so
    /// every call before it has been handled too; what is still missing then is
    /// reported by `check`.
    fn wait_metered_up_to(&self, daemon: &Daemon, before: u64) {
        let made = calls(&self.log);
        let Some(last) = made.iter().filter(|(_, (_, end))| *end + LAG_NS < before).map(|(n, _)| *n).max() else { return };
        let start = Instant::now();
        while !logged_calls(&daemon.log.text(), self.pid()).iter().any(|(n, _)| *n >= last) && start.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_for_calls_after(&self, after: u64, count: usize) {
        let start = Instant::now();
        while calls(&self.log).values().filter(|(s, _)| *s > after).count() < count {
            assert!(start.elapsed() < Duration::from_secs(15), "the {} client made fewer than {count} calls in 15 s", self.name);
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Checks what each daemon metered of this client's calls against what it made;
    /// returns the connections (`SSL*`) its calls were metered on, by daemon.
    fn check(&self, runs: &[Run]) -> Vec<HashSet<String>> {
        let made = calls(&self.log);
        let pid = self.pid();
        let mut counted_by: HashMap<u32, usize> = HashMap::new();
        let mut connections = Vec::new();
        for (i, run) in runs.iter().enumerate() {
            let metered = logged_calls(&run.log, pid);
            let numbers: HashSet<u32> = metered.iter().map(|(n, _)| *n).collect();
            assert_eq!(numbers.len(), metered.len(), "daemon {i} metered a call of the {} client twice", self.name);
            let mut seen_on = HashSet::new();
            for (n, id) in &metered {
                let what = format!("daemon {i}, {} client's call {n}", self.name);
                let (start, end) = *made.get(n).unwrap_or_else(|| panic!("{what}: metered, never finished by the client"));
                // A call whose request went out before this daemon existed was seen
                // only from its middle: it must not be metered as a call of its own.
                assert!(start > run.spawned, "{what}: metered, but sent before the daemon started");
                let parts: Vec<&str> = id.split(':').collect();
                assert!(parts.len() == 4 && parts[0].starts_with(&format!("{pid}.")) && parts[2].starts_with("h1-"), "{what}: call_id {id}");
                let at: u64 = parts[3].parse().expect("call_id start");
                assert!(at >= start && at <= end, "{what}: call_id {id} does not start within the call ({start}..{end})");
                seen_on.insert(parts[1].to_owned());
                if let Some(other) = counted_by.insert(*n, i) {
                    panic!("{what}: counted by daemon {other} too");
                }
            }
            // Every call made while it watched is there, unless it counted a loss.
            let missing: Vec<u32> = made
                .iter()
                .filter(|(_, (s, e))| *s > run.healthy && *e + LAG_NS < run.scraped)
                .map(|(n, _)| *n)
                .filter(|n| !numbers.contains(n))
                .collect();
            assert!(missing.is_empty() || run.lost > 0.0, "daemon {i} missed the {} client's calls {missing:?} and counted no loss", self.name);
            println!("daemon {i}: {} calls of the {} client metered, {} missed", metered.len(), self.name, missing.len());
            connections.push(seen_on);
        }
        println!("{} client: {} calls made, {} metered once", self.name, made.len(), counted_by.len());
        connections
    }
}

#[test]
fn sigkill_under_load_leaves_clients_working_no_probe_behind_and_no_call_counted_twice() {
    if !kernel_tests_enabled("crash and restart under load") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_certificate(dir.path());
    let mock = MockLlm::start(&cert, &key);
    let undo = dir.path().join("state/undo.json");

    let mut spawned = monotonic_ns();
    let mut daemon = Daemon::start_with_undo_logging(CONFIG, &undo, LOG_LEVEL);
    daemon.wait_healthy();
    // Load, so that every kill lands in the middle of a call; and a steadier client
    // whose connection stays open throughout (the mock closes one after 1000 requests).
    let mut clients = [
        Client::start("busy", "0.0005", &cert, mock.port, dir.path()),
        Client::start("steady", "0.03", &cert, mock.port, dir.path()),
    ];

    let mut runs: Vec<Run> = Vec::new();
    for i in 0..=KILLS {
        let healthy = monotonic_ns();
        clients[0].wait_for_calls_after(healthy, 100);
        clients[1].wait_for_calls_after(healthy, 3);
        let (_, metrics) = daemon.get("/metrics").expect("scrape");
        let scraped = monotonic_ns();
        for client in &clients {
            client.wait_metered_up_to(&daemon, scraped);
        }
        let requests = sum(&metrics, "gauge_llm_requests_total", &[("agent", "restart-bot")]);
        let lost = sum(&metrics, "gauge_capture_lost_events_total", &[]);
        if i == KILLS {
            // The last daemon knows what happened before it. Each gap runs from the
            // last heartbeat (at most one 2 s poll before the kill) to the next
            // daemon's attach (between its spawn and when it was seen healthy).
            let crash = sum(&metrics, "gauge_agent_restarts_total", &[("reason", "crash")]);
            let clean = sum(&metrics, "gauge_agent_restarts_total", &[("reason", "clean")]);
            assert_eq!((crash, clean), (KILLS as f64, 0.0), "{metrics}");
            let seconds = |ns: u64| ns as f64 / 1e9;
            let next = runs.iter().skip(1).map(|r| (r.spawned, r.healthy)).chain([(spawned, healthy)]);
            let gaps: Vec<(f64, f64)> = runs
                .iter()
                .filter_map(|r| r.killed)
                .zip(next)
                .map(|(killed, (up, seen_up))| (seconds(up - killed), seconds(seen_up - killed) + 2.5))
                .collect();
            let (low, high) = gaps.iter().fold((0.0, 0.0), |(l, h), (a, b)| (l + a, h + b));
            let last = sum(&metrics, "gauge_agent_last_downtime_seconds", &[]);
            let total = sum(&metrics, "gauge_agent_downtime_seconds_total", &[]);
            let last_gap = gaps[KILLS - 1];
            assert!(last >= last_gap.0 && last <= last_gap.1, "last downtime {last} s not in {last_gap:?}");
            assert!(total >= low && total <= high, "downtime {total} s not in [{low}, {high}]");
            let started = sum(&metrics, "gauge_agent_start_time_seconds", &[]);
            let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64();
            assert!(started <= now && started > now - 60.0, "start time {started}, now {now}");
            assert!(Path::new(&format!("{}.heartbeat", undo.display())).exists());
        }
        let (progs, links) = held_bpf(daemon.pid());
        assert!(!progs.is_empty(), "the daemon holds no BPF program");
        let killed = if i < KILLS {
            let at = monotonic_ns();
            daemon.kill();
            println!("daemon {i}: exited {:.2} s after SIGKILL", seconds_since(at));
            Some(at)
        } else {
            let status = daemon.terminate();
            assert!(status.success(), "{status}");
            None
        };
        for client in &mut clients {
            client.alive("when the daemon died");
        }
        // The dead daemon's programs and links leave the kernel with it.
        let start = Instant::now();
        loop {
            let left_progs: Vec<u32> = bpf_ids(11).intersection(&progs).copied().collect();
            let left_links: Vec<u32> = bpf_ids(31).intersection(&links).copied().collect();
            if left_progs.is_empty() && left_links.is_empty() {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "programs {left_progs:?} and links {left_links:?} outlived daemon {i}");
            thread::sleep(Duration::from_millis(50));
        }
        runs.push(Run { spawned, healthy, scraped, killed, requests, lost, log: daemon.log.text() });
        if i < KILLS {
            spawned = monotonic_ns();
            daemon = Daemon::start_with_undo_logging(CONFIG, &undo, LOG_LEVEL);
            daemon.wait_healthy();
        }
    }
    // A clean stop is told apart from the crashes.
    let mut after = Daemon::start_with_undo_logging(CONFIG, &undo, LOG_LEVEL);
    after.wait_healthy();
    let (_, metrics) = after.get("/metrics").expect("scrape");
    assert_eq!(sum(&metrics, "gauge_agent_restarts_total", &[("reason", "clean")]), 1.0, "{metrics}");
    assert_eq!(sum(&metrics, "gauge_agent_restarts_total", &[("reason", "crash")]), KILLS as f64, "{metrics}");

    std::fs::write(dir.path().join("stop"), "").expect("stop the clients");
    for client in &mut clients {
        client.finish();
    }
    after.terminate();

    let busy = clients[0].check(&runs);
    let steady = clients[1].check(&runs);
    // Counting resumed on the connection already open when each daemon started.
    let all: HashSet<&String> = steady.iter().flatten().collect();
    assert!(all.len() == 1 && steady.iter().all(|c| c.len() == 1), "the steady client's calls were metered on {steady:?}");
    // What each daemon exported by its scrape: whole calls it saw, never more.
    for (i, run) in runs.iter().enumerate() {
        let possible: usize = clients
            .iter()
            .map(|c| calls(&c.log).values().filter(|(s, _)| *s > run.spawned && *s < run.scraped).count())
            .sum();
        assert!(run.requests >= 1.0 && run.requests <= possible as f64, "daemon {i}: {} calls metered, {possible} possible", run.requests);
    }
    let made = calls(&clients[0].log);
    let in_flight = runs.iter().filter_map(|r| r.killed).filter(|&k| made.values().any(|&(s, e)| s < k && k < e)).count();
    println!("{in_flight} of {KILLS} kills hit a call of the busy client in flight; busy client on {} connections", busy.iter().flatten().collect::<HashSet<_>>().len());
}

fn seconds_since(at: u64) -> f64 {
    (monotonic_ns() - at) as f64 / 1e9
}
