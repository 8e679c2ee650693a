//! Scale: 10,000 TLS keep-alive connections open at once from 1,000 monitored
//! processes, each making LLM calls while all the others stay open. The daemon must
//! meter every call (`gauge_llm_requests_total` of our agent = calls made), lose no
//! capture event (`gauge_capture_lost_events_total` = 0) and keep its memory bounded.
//!
//! The clients are Python children forked from one parent (tests/bench/scale_clients.py),
//! speaking OpenSSL's libssl, which the daemon hooks. The server runs in this process,
//! on rustls and one epoll thread: no libssl, so the daemon sees the client side only,
//! and holding 10,000 sockets costs a few MB (hypercorn would need far more).

use std::{
    collections::HashMap,
    io::{self, BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use rustls::{ServerConfig, ServerConnection, pki_types::PrivateKeyDer};

use super::{Row, Scale, proc_stat};
use crate::{agent::Daemon, world::sum};

/// The mock's fixed usage per chat completion (as tests/mock/llm_server.py serves it).
const PROMPT_TOKENS: u64 = 21;
const CACHED_TOKENS: u64 = 5;
const COMPLETION_TOKENS: u64 = 7;
/// Calls each connection makes (the phases of scale_clients.py).
const CALLS_PER_CONNECTION: u64 = 2;
/// The bound we hold the daemon's peak memory to with 10,000 connections tracked.
const RSS_TARGET: u64 = 256 << 20;
/// How long the daemon may take to meter what was sent.
const METER_TIMEOUT: Duration = Duration::from_secs(30);

pub fn run(scale: Scale) -> anyhow::Result<Vec<Row>> {
    let (procs, conns) = scale.pick((20usize, 5usize), (1000, 10));
    let open = procs * conns;
    // The server holds every connection in this process; the clients' processes
    // hold 10 each and inherit the limit.
    raise_open_files(open as u64 + 4096)?;
    let dir = tempfile::tempdir().context("creating a temp dir")?;
    let server = Server::start(dir.path()).context("starting the TLS server")?;
    let daemon = start_daemon()?;
    let pid = daemon.pid();
    let agent = format!("bench-scale-{}", std::process::id());

    let initial = scrape(&daemon)?;
    let rss_before = proc_stat::status_bytes(pid, "VmRSS")?;
    let cpu_before = proc_stat::CpuMark::now(pid)?;
    // Start-up (reading ELF files, attaching) has its own peak: reset VmHWM so the
    // peak measured is the run's, and keep the start-up one beside it.
    let hwm_start = proc_stat::peak_rss(pid)?;
    let hwm_reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    let log_start = daemon.log.text().lines().count();
    let wall = Instant::now();

    let mut clients = Clients::start(server.port, &server.ca_file, procs, conns, &agent)?;
    let connect = clients.phase("connect")?;
    if connect.ok < open as u64 {
        bail!("only {} of {open} connections opened; client errors:\n{}", connect.ok, clients.errors());
    }
    clients.release()?;
    let call1 = clients.phase("call1")?;
    // Everything is open and each connection has spoken once: the daemon's tables are
    // at their fullest now.
    let (mid, metered_mid) = wait_metered(&daemon, &agent, call1.ok)?;
    let tracked = sum(&mid, "gauge_http_open_connections", &[]);
    let buffered = sum(&mid, "gauge_http_buffered_bytes", &[]);
    let rss_open = proc_stat::status_bytes(pid, "VmRSS")?;
    let server_peak = server.stats.peak.load(Relaxed);
    let answered_mid = server.stats.answered.load(Relaxed);
    clients.release()?;
    let call2 = clients.phase("call2")?;
    let (exited, failed) = clients.finish()?;
    let calls_s = call1.seconds + call2.seconds;
    let made = call1.ok + call2.ok;
    let answered = server.stats.answered.load(Relaxed);
    let (end, metered) = wait_metered(&daemon, &agent, made)?;
    let wall = wall.elapsed();
    // Every client has closed its connections and exited: the daemon should let go
    // of them, once it has read the closes (SSL_shutdown, SSL_free) behind the calls.
    let tracked_end = wait_released(&daemon, tracked - open as f64)?;
    let cpu = cpu_before.elapsed()?;
    let rss_after = proc_stat::status_bytes(pid, "VmRSS")?;
    let hwm = proc_stat::peak_rss(pid)?;
    let log = daemon.log.text();
    // Killed, not stopped: it holds nothing to undo, and detaching its probes on a
    // clean stop takes the kernel a while.
    drop(daemon);
    drop(server);

    let delta = |name: &str, labels: &[(&str, &str)]| sum(&end, name, labels) - sum(&initial, name, labels);
    let mine = ("agent", agent.as_str());
    let tokens = |kind: &str| delta("gauge_llm_tokens_total", &[mine, ("kind", kind)]);
    let (output_tokens, input_tokens) = (tokens("output"), tokens("input") + tokens("cache_read"));
    let ok_status = delta("gauge_llm_requests_total", &[mine, ("status", "200")]);
    let unassigned = delta("gauge_llm_requests_total", &[("agent", "unassigned")]);
    let lost: Vec<(String, f64)> = ["ring_full", "throttled", "decode_error"]
        .iter()
        .map(|r| ((*r).to_owned(), delta("gauge_capture_lost_events_total", &[("reason", r)])))
        .collect();
    let lost_total: f64 = lost.iter().map(|(_, n)| n).sum();
    let lost_bytes = delta("gauge_capture_lost_bytes_total", &[]) + delta("gauge_capture_throttled_bytes_total", &[]);
    let mut drops: Vec<(String, f64)> = ["not_http1", "evicted_capacity", "evicted_idle", "evicted_memory", "gap", "streams_over_limit", "broken_response", "unanswered_response"]
        .iter()
        .map(|r| (format!("http {r}"), delta("gauge_http_dropped_total", &[("reason", r)])))
        .collect();
    drops.push(("exec backlog".into(), delta("gauge_capture_exec_backlog_drops_total", &[])));
    drops.push(("unmetered".into(), delta("gauge_llm_unmetered_calls_total", &[])));
    drops.push(("read faults".into(), delta("gauge_capture_read_faults_total", &[])));
    let drops_total: f64 = drops.iter().map(|(_, n)| n).sum();
    let warnings: Vec<&str> = log.lines().skip(log_start).filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
    for warning in warnings.iter().take(10) {
        eprintln!("scale: daemon: {warning}");
    }

    let mib = |b: f64| format!("{:.0} MiB", b / f64::from(1u32 << 20));
    let list = |items: &[(String, f64)]| {
        let named: Vec<String> = items.iter().filter(|(_, n)| *n != 0.0).map(|(r, n)| format!("{r} {n}")).collect();
        if named.is_empty() { "none of any kind".to_owned() } else { named.join(", ") }
    };
    let made_f = made as f64;
    let rows = vec![
        Row::new("connections open at once", format!("{server_peak}"), format!("{procs} processes x {conns} TLS keep-alive connections, peak the server held"))
            .target(format!(">= {open}"), server_peak >= open),
        Row::new("connections the daemon tracked", format!("{tracked}"), format!("gauge_http_open_connections after one call on each ({} buffered); {tracked_end} still tracked once every process exited", mib(buffered)))
            .target(format!(">= {open}"), tracked >= open as f64),
        Row::new("LLM calls metered / made", format!("{metered} / {made}"), format!("gauge_llm_requests_total{{agent}}; {ok_status} with status 200, {metered_mid} of {} after the first round; the server answered {answered} ({answered_mid} in the first)", call1.ok))
            .target("metered = made", metered == made_f && made == CALLS_PER_CONNECTION * open as u64),
        Row::new("usage metered", format!("{output_tokens} / {} out", made * COMPLETION_TOKENS), format!("output tokens metered / served; input+cache_read {input_tokens} / {}", made * (PROMPT_TOKENS)))
            .target("= served", output_tokens == (made * COMPLETION_TOKENS) as f64 && input_tokens == (made * PROMPT_TOKENS) as f64),
        // Host-wide, so other programs' calls count too: a figure to read when metered
        // falls short of made, not a target.
        Row::new("calls attributed to no agent", format!("{unassigned}"), "gauge_llm_requests_total{agent=\"unassigned\"}, host-wide, during the run: where an attribution miss would land"),
        Row::new("capture events lost", format!("{lost_total}"), format!("gauge_capture_lost_events_total: {}; {lost_bytes} bytes lost or throttled", list(&lost)))
            .target("= 0", lost_total == 0.0),
        Row::new("other drops", format!("{drops_total}"), format!("host-wide during the run: {}", list(&drops))).target("= 0", drops_total == 0.0),
        Row::new("daemon RSS: idle, all open, after", format!("{} / {} / {}", mib(rss_before as f64), mib(rss_open as f64), mib(rss_after as f64)), "VmRSS before the clients, with every connection tracked, after they exited"),
        Row::new(
            "daemon peak RSS",
            mib(hwm as f64),
            if hwm_reset { format!("VmHWM from the first fork to the end (reset before; start-up peak {})", mib(hwm_start as f64)) } else { "VmHWM since start (could not reset it)".to_owned() },
        )
        .target(format!("< {}", mib(RSS_TARGET as f64)), hwm < RSS_TARGET),
        Row::new("daemon CPU", format!("{:.2} s", cpu.as_secs_f64()), format!("scheduled CPU over the run, {:.0} us per call (handshakes, forks and exits included)", cpu.as_secs_f64() * 1e6 / made_f.max(1.0))),
        Row::new("call rate", format!("{:.0} calls/s", made_f / calls_s.max(1e-9)), format!("{made} calls in {calls_s:.1} s, every connection open throughout; 2 cores shared with clients and server")),
        Row::new("connect", format!("{:.1} s", connect.seconds), format!("{open} TCP + TLS handshakes from {procs} forked processes")),
        Row::new("client processes", format!("{exited} ok, {failed} failed"), "exit status of each child").target(format!("{procs} ok"), exited == procs as u64),
        Row::new("daemon warnings", format!("{}", warnings.len()), warnings.first().map_or_else(|| "WARN/ERROR lines in its log during the run".to_owned(), |w| shorten(w.split_once(' ').map_or(*w, |(_, rest)| rest.trim_start()), 160))),
        Row::new("wall time", format!("{:.1} s", wall.as_secs_f64()), "from the first fork to everything metered"),
    ];
    Ok(rows)
}

/// The daemon with the embedded defaults, which attribute agents by GAUGE_AGENT.
fn start_daemon() -> anyhow::Result<Daemon> {
    // The harness panics on failure (it is written for tests): here that becomes an
    // error, after the panic message has named what went wrong.
    std::panic::catch_unwind(|| {
        let mut daemon = Daemon::start("");
        daemon.wait_healthy();
        daemon
    })
    .map_err(|_| anyhow!("the daemon did not start (see above); build it with `cargo build --release -p gauge-agent` and run as root"))
}

fn scrape(daemon: &Daemon) -> anyhow::Result<String> {
    daemon.get("/metrics").map(|(_, body)| body).ok_or_else(|| anyhow!("the daemon at {} did not answer GET /metrics", daemon.addr))
}

/// Scrapes until the daemon has metered `want` calls of `agent` (or METER_TIMEOUT):
/// (the last scrape, what it metered).
fn wait_metered(daemon: &Daemon, agent: &str, want: u64) -> anyhow::Result<(String, f64)> {
    let start = Instant::now();
    loop {
        let text = scrape(daemon)?;
        let metered = sum(&text, "gauge_llm_requests_total", &[("agent", agent)]);
        if metered >= want as f64 || start.elapsed() > METER_TIMEOUT {
            return Ok((text, metered));
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Polls the daemon's tracked connections until at most `want` (or 5 s); returns the last count.
fn wait_released(daemon: &Daemon, want: f64) -> anyhow::Result<f64> {
    let start = Instant::now();
    loop {
        let open = sum(&scrape(daemon)?, "gauge_http_open_connections", &[]);
        if open <= want || start.elapsed() > Duration::from_secs(5) {
            return Ok(open);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max { text.to_owned() } else { format!("{}...", text.chars().take(max).collect::<String>()) }
}

fn raise_open_files(want: u64) -> anyhow::Result<()> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!("getrlimit(RLIMIT_NOFILE): {}", io::Error::last_os_error());
    }
    if limit.rlim_cur >= want {
        return Ok(());
    }
    limit.rlim_cur = want;
    limit.rlim_max = limit.rlim_max.max(want);
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        bail!("cannot raise the open-file limit to {want} ({}): run as root, or `ulimit -n {want}` first", io::Error::last_os_error());
    }
    Ok(())
}

/// What one phase of the clients achieved.
struct Phase {
    /// Connections that succeeded (opened, or answered 200).
    ok: u64,
    /// From the phase's release to the last child's report.
    seconds: f64,
}

/// tests/bench/scale_clients.py and its children, in a process group of their own
/// that is killed whole on drop.
struct Clients {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Clients {
    fn start(port: u16, ca: &Path, procs: usize, conns: usize, agent: &str) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/scale_clients.py");
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .arg(port.to_string())
            .arg(ca)
            .arg(procs.to_string())
            .arg(conns.to_string())
            .env("GAUGE_AGENT", agent)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("starting python3 {}", script.display()))?;
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let errors = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let errors = errors.clone();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(mut errors) = errors.lock() {
                        // The first lines say what went wrong; 1,000 of the same say no more.
                        if errors.len() < 20 {
                            errors.push(line);
                        }
                    }
                }
            });
        }
        Ok(Self { child, stdin, lines, errors })
    }

    fn errors(&self) -> String {
        self.errors.lock().map(|e| e.join("\n")).unwrap_or_default()
    }

    fn line(&mut self, what: &str) -> anyhow::Result<String> {
        match self.lines.recv_timeout(Duration::from_secs(300)) {
            Ok(line) => Ok(line),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("the scale clients gave no {what} report within 300 s; their errors:\n{}", self.errors()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                bail!("the scale clients ended ({status}) before their {what} report; their errors:\n{}", self.errors())
            }
        }
    }

    /// Waits for `name`'s report: `<name> <ok> <seconds>`.
    fn phase(&mut self, name: &str) -> anyhow::Result<Phase> {
        let line = self.line(name)?;
        let mut fields = line.split(' ');
        let parsed = (fields.next() == Some(name))
            .then(|| Some(Phase { ok: fields.next()?.parse().ok()?, seconds: fields.next()?.parse().ok()? }))
            .flatten();
        parsed.ok_or_else(|| anyhow!("expected a {name} report from the scale clients, got {line:?}; their errors:\n{}", self.errors()))
    }

    /// Starts the next phase.
    fn release(&mut self) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().ok_or_else(|| anyhow!("the scale clients' stdin is closed"))?;
        stdin.write_all(b"go\n").and_then(|()| stdin.flush()).context("releasing the scale clients")
    }

    /// Waits for every child to exit: (exited ok, failed).
    fn finish(&mut self) -> anyhow::Result<(u64, u64)> {
        let line = self.line("exit")?;
        let fields: Vec<u64> = line.strip_prefix("exited ").unwrap_or("").split(' ').filter_map(|f| f.parse().ok()).collect();
        match fields[..] {
            [ok, failed] => Ok((ok, failed)),
            _ => bail!("expected `exited OK FAILED` from the scale clients, got {line:?}"),
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stdin = None;
        // SAFETY: signalling the process group we created (its leader is our child).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// An HTTPS server answering every request with one fixed chat completion, keeping
/// connections alive: rustls on one epoll thread.
struct Server {
    port: u16,
    ca_file: PathBuf,
    stats: Arc<ServerStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

#[derive(Default)]
struct ServerStats {
    open: AtomicUsize,
    peak: AtomicUsize,
    answered: AtomicU64,
}

impl Server {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
        let ca_file = dir.join("cert.pem");
        std::fs::write(&ca_file, certified.cert.pem()).with_context(|| format!("writing {}", ca_file.display()))?;
        let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der()).map_err(|e| anyhow!("the server key: {e}"))?;
        let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        // Rust's default backlog of 128 would drop SYNs when 1,000 processes connect
        // at once, each costing a 1 s retransmit.
        // SAFETY: listen on a socket we own; called again it only resizes the backlog.
        if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
            bail!("listen: {}", io::Error::last_os_error());
        }
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (stats, stop) = (Arc::new(ServerStats::default()), Arc::new(AtomicBool::new(false)));
        let (s, st, config) = (stats.clone(), stop.clone(), Arc::new(config));
        let thread = thread::Builder::new().name("scale-server".into()).spawn(move || serve(&listener, &config, &st, &s))?;
        Ok(Self { port, ca_file, stats, stop, thread: Some(thread) })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Err(error)) => eprintln!("scale: the TLS server failed: {error}"),
                Err(_) => eprintln!("scale: the TLS server panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// One connection's state: TLS, and request bytes not yet answered.
struct Conn {
    tls: ServerConnection,
    tcp: TcpStream,
    pending: Vec<u8>,
    /// Whether the socket was full, so epoll must also wake us when it drains.
    blocked: bool,
}

fn epoll_ctl(epoll: &OwnedFd, op: i32, fd: RawFd, events: u32) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: fd as u64 };
    // SAFETY: a valid epoll fd and event struct.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut event) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn serve(listener: &TcpListener, config: &Arc<ServerConfig>, stop: &AtomicBool, stats: &ServerStats) -> io::Result<()> {
    // SAFETY: no preconditions; the fd is checked, then owned.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
    let listen_fd = listener.as_raw_fd();
    epoll_ctl(&epoll, libc::EPOLL_CTL_ADD, listen_fd, libc::EPOLLIN as u32)?;
    let response = response();
    let mut conns: HashMap<RawFd, Conn> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    while !stop.load(Relaxed) {
        // SAFETY: the buffer holds events.len() entries.
        let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, 100) };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        for event in &events[..n as usize] {
            let fd = event.u64 as RawFd;
            if fd == listen_fd {
                accept(listener, &epoll, config, &mut conns, stats)?;
                continue;
            }
            let Some(conn) = conns.get_mut(&fd) else { continue };
            let was_blocked = conn.blocked;
            match conn.serve(&response, stats) {
                Ok(true) => {
                    if conn.blocked != was_blocked {
                        let out = if conn.blocked { libc::EPOLLOUT as u32 } else { 0 };
                        epoll_ctl(&epoll, libc::EPOLL_CTL_MOD, fd, libc::EPOLLIN as u32 | out)?;
                    }
                }
                // Closed by the client, or broken: closing the socket also takes it
                // out of the epoll set.
                Ok(false) | Err(_) => {
                    conns.remove(&fd);
                    stats.open.fetch_sub(1, Relaxed);
                }
            }
        }
    }
    Ok(())
}

fn accept(listener: &TcpListener, epoll: &OwnedFd, config: &Arc<ServerConfig>, conns: &mut HashMap<RawFd, Conn>, stats: &ServerStats) -> io::Result<()> {
    loop {
        let tcp = match listener.accept() {
            Ok((tcp, _)) => tcp,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE) => {
                return Err(io::Error::other(format!("out of file descriptors at {} connections: raise the open-file limit", conns.len())));
            }
            Err(e) => return Err(e),
        };
        tcp.set_nonblocking(true)?;
        tcp.set_nodelay(true)?;
        let tls = ServerConnection::new(config.clone()).map_err(io::Error::other)?;
        let fd = tcp.as_raw_fd();
        epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32)?;
        conns.insert(fd, Conn { tls, tcp, pending: Vec::new(), blocked: false });
        let open = stats.open.fetch_add(1, Relaxed) + 1;
        stats.peak.fetch_max(open, Relaxed);
    }
}

impl Conn {
    /// Reads what arrived and answers every complete request; false once closed.
    fn serve(&mut self, response: &[u8], stats: &ServerStats) -> io::Result<bool> {
        let mut open = true;
        loop {
            match self.tls.read_tls(&mut self.tcp) {
                Ok(0) => {
                    open = false;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let state = self.tls.process_new_packets().map_err(io::Error::other)?;
            let ready = state.plaintext_bytes_to_read();
            if ready > 0 {
                let start = self.pending.len();
                self.pending.resize(start + ready, 0);
                self.tls.reader().read_exact(&mut self.pending[start..])?;
            }
            while let Some(len) = request_len(&self.pending) {
                self.pending.drain(..len);
                self.tls.writer().write_all(response)?;
                stats.answered.fetch_add(1, Relaxed);
            }
        }
        if open {
            self.flush()?;
        }
        Ok(open)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.blocked = false;
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.blocked = true;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The length of the first complete request in `buf` (head and Content-Length body).
fn request_len(buf: &[u8]) -> Option<usize> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]);
    let body = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case("content-length")).map(|(_, v)| v.trim().parse::<usize>().ok()))
        .flatten()
        .unwrap_or(0);
    (buf.len() >= end + body).then_some(end + body)
}

/// A non-streamed chat completion with the mock's usage, kept alive.
fn response() -> Vec<u8> {
    let body = serde_json::json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS, "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
                  "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 0}},
    })
    .to_string();
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nx-request-id: req_scale\r\nConnection: keep-alive\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_split_by_content_length() {
        let one = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd";
        assert_eq!(request_len(one), Some(one.len()));
        assert_eq!(request_len(&one[..one.len() - 1]), None);
        assert_eq!(request_len(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET"), Some(27));
        assert_eq!(request_len(b"GET / HTTP/1.1\r\n"), None);
    }
}
