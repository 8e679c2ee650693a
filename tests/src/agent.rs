//! Driving the real `gauge-agent` binary.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use gauge_agent::source::{CaptureEvent, recording};

/// The release binary `cargo xtask test` builds (override with `GAUGE_AGENT_BIN`).
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("GAUGE_AGENT_BIN") {
        return path.into();
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/gauge-agent");
    assert!(path.exists(), "{} is missing: run the suite with `cargo xtask test`, which builds it", path.display());
    path
}

/// Lines a child printed on stderr, collected as they come.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn follow(&self, stderr: impl std::io::Read + Send + 'static) {
        let lines = self.0.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().expect("lock").push(line);
            }
        });
    }

    pub fn text(&self) -> String {
        self.0.lock().expect("lock").join("\n")
    }

    /// Waits for a line containing every needle.
    pub fn wait_for(&self, needles: &[&str], timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.0.lock().expect("lock").iter().any(|l| needles.iter().all(|n| l.contains(n))) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("no log line with {needles:?} within {timeout:?}; log:\n{}", self.text());
    }
}

/// One recorder (no redaction, default config) shared by the tests of a binary that
/// need nothing special: fewer agents attached means less kernel work for all.
pub fn shared_recorder() -> &'static Recorder {
    static SHARED: std::sync::OnceLock<Recorder> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| {
        // Started from a thread that lives as long as the test process, so the
        // recorder's parent-death signal fires when the test binary exits, not when
        // the first test using it ends.
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(Recorder::start(false, &[]));
            loop {
                thread::park();
            }
        });
        rx.recv().expect("the shared recorder failed to start (see the panic above)")
    })
}

/// The agent binary as a child that dies with its parent thread.
fn agent_command() -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(agent_binary());
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// `gauge-agent record` running in the background.
pub struct Recorder {
    child: Child,
    pub output: PathBuf,
    pub log: Log,
    _dir: tempfile::TempDir,
}

impl Recorder {
    /// Starts recording (no redaction unless `redact`) and returns once the probes are
    /// attached, which the recorder signals by writing the recording's preamble.
    pub fn start(redact: bool, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = dir.path().join("capture.jsonl");
        let mut cmd = agent_command();
        cmd.arg("record").arg("--output").arg(&output).args(extra);
        if !redact {
            cmd.arg("--no-redact");
        }
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gauge-agent record");
        let log = Log::default();
        log.follow(child.stderr.take().expect("stderr"));
        let start = Instant::now();
        while !std::fs::read_to_string(&output).is_ok_and(|t| t.contains('\n')) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("gauge-agent record exited ({status}) before attaching:\n{}", log.text());
            }
            assert!(start.elapsed() < Duration::from_secs(30), "recorder not ready in 30 s:\n{}", log.text());
            thread::sleep(Duration::from_millis(20));
        }
        Self { child, output, log, _dir: dir }
    }

    /// Events recorded so far (a partly written last line is left for later).
    pub fn events(&self) -> Vec<CaptureEvent> {
        let text = std::fs::read_to_string(&self.output).expect("read recording");
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        recording::read(complete.as_bytes()).expect("recording parses").1
    }

    /// Waits until `done` holds for the events recorded so far, and returns them.
    pub fn wait_until(&self, what: &str, done: impl Fn(&[CaptureEvent]) -> bool) -> Vec<CaptureEvent> {
        let start = Instant::now();
        loop {
            let events = self.events();
            if done(&events) {
                return events;
            }
            if start.elapsed() > Duration::from_secs(20) {
                panic!("{what}: not captured within 20 s ({} events recorded); log:\n{}", events.len(), self.log.text());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the recorder (SIGINT) and returns its stderr once it has printed its
    /// summary. The process then still detaches its probes, which the kernel does
    /// one at a time (~0.1 s each); that is left to finish in the background.
    pub fn stop(self) -> String {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.log.wait_for(&["gauge-agent record:", "events written"], Duration::from_secs(30));
        self.log.text()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        reap_in_background(&mut self.child);
    }
}

/// Waits for a child on another thread, so a test never blocks on the kernel's
/// probe detach at exit.
fn reap_in_background(child: &mut Child) {
    let placeholder = Command::new("true").spawn();
    if let Ok(placeholder) = placeholder {
        let mut child = std::mem::replace(child, placeholder);
        thread::spawn(move || child.wait());
    }
}

/// `gauge-agent run` on a free loopback port.
pub struct Daemon {
    child: Child,
    pub addr: String,
    pub log: Log,
    /// The config file it runs with (rewrite it to test reloads).
    pub config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts the daemon on a port of its own choosing (`--listen 127.0.0.1:0`, read
    /// back from its log), so concurrent tests never race for a port.
    pub fn start(config: &str) -> Self {
        Self::start_logging(config, "info")
    }

    /// The same, logging at `level` (e.g. "debug", which logs every LLM call).
    pub fn start_logging(config: &str, level: &str) -> Self {
        Self::spawn(config, level, None)
    }

    /// The same, keeping its undo file at `undo` (to start another daemon on it).
    pub fn start_with_undo(config: &str, undo: &Path) -> Self {
        Self::spawn(config, "info", Some(undo))
    }

    /// The same, logging at `level` (e.g. "info,gauge_agent::app=debug" for every call).
    pub fn start_with_undo_logging(config: &str, undo: &Path, level: &str) -> Self {
        Self::spawn(config, level, Some(undo))
    }

    fn spawn(config: &str, level: &str, undo: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("gauge.toml");
        std::fs::write(&config_path, config).expect("write config");
        // Each daemon keeps its own undo file: tests run side by side.
        let mut child = agent_command()
            .args(["run", "--listen", "127.0.0.1:0", "--state-file"])
            .arg(undo.map_or_else(|| dir.path().join("undo.json"), Path::to_path_buf))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gauge-agent run");
        let log = Log::default();
        log.follow(child.stderr.take().expect("stderr"));
        log.wait_for(&["serving /metrics"], Duration::from_secs(30));
        let addr = listen_address(&log.text());
        Self { child, addr, log, config: config_path, _dir: dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET `path` on the daemon's listener: (status, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.addr, path)
    }

    pub fn wait_healthy(&mut self) {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("gauge-agent run exited ({status}):\n{}", self.log.text());
            }
            if self.get("/healthz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "daemon not healthy in 30 s:\n{}", self.log.text());
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of an exported sample, e.g. `gauge_capture_bytes_total{direction="write"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.get("/metrics").expect("scrape");
        body.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{sample} not in /metrics:\n{body}"))
    }

    /// SIGKILL: the daemon dies without undoing anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    /// SIGTERM, and waits for the daemon to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        // Exit includes detaching every probe, serialized in the kernel with those of
        // other agents: allow for it.
        wait_timeout(&mut self.child, Duration::from_secs(90))
            .unwrap_or_else(|| panic!("daemon did not exit within 90 s of SIGTERM:\n{}", self.log.text()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        reap_in_background(&mut self.child);
    }
}

/// The address the daemon chose for `--listen 127.0.0.1:0`, from its log.
fn listen_address(log: &str) -> String {
    log.split("addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no listen address in the daemon log:\n{log}"))
        .to_owned()
}

/// A minimal HTTP/1.0 GET for loopback test use.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    tcp.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// Waits for a child to exit, at most `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(error) => panic!("waiting for child {}: {error}", child.id()),
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// How a daemon started through a command prefix ended before it served.
#[derive(Debug)]
pub struct Refused {
    pub status: std::process::ExitStatus,
    pub log: String,
}

impl Daemon {
    /// `gauge-agent run` on a free loopback port through `prefix` (e.g. `setpriv` with
    /// another user and capability set), so its config is readable, and its state
    /// directory writable, by any user. Err if it exits before serving.
    pub fn start_through(prefix: &[String], config: &str) -> Result<Self, Refused> {
        use std::os::unix::{fs::PermissionsExt as _, process::CommandExt as _};
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("gauge.toml");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("state dir");
        std::fs::write(&config_path, config).expect("write config");
        for (path, mode) in [(dir.path(), 0o755), (state.as_path(), 0o777), (config_path.as_path(), 0o644)] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        let (program, args) = prefix.split_first().expect("a command prefix");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .arg(agent_binary())
            .args(["run", "--listen", "127.0.0.1:0", "--state-file"])
            .arg(state.join("undo.json"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start gauge-agent run");
        let log = Log::default();
        log.follow(child.stderr.take().expect("stderr"));
        let start = Instant::now();
        while !log.text().contains("serving /metrics") {
            if let Ok(Some(status)) = child.try_wait() {
                // The reader thread may still hold the last lines: let it finish.
                thread::sleep(Duration::from_millis(200));
                return Err(Refused { status, log: log.text() });
            }
            assert!(start.elapsed() < Duration::from_secs(30), "daemon neither served nor exited in 30 s:\n{}", log.text());
            thread::sleep(Duration::from_millis(20));
        }
        let addr = listen_address(&log.text());
        Ok(Self { child, addr, log, config: config_path, _dir: dir })
    }
}
