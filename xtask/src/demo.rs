//! `cargo xtask demo`: Gauge end to end on this host with no API key. A local mock
//! provider (`tests/mock/llm_server.py`), a sample agent loop on the real openai SDK
//! calling it, the daemon metering and governing that agent, and `gauge-agent top`
//! showing it: spend, a retry storm, and the retry-cap policy pausing the agent.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cargo, setup, step};

const AGENT_BIN: &str = "target/release/gauge-agent";
const DAEMON: &str = "the daemon";

/// The daemon's config: the sample agent named by its script, a retry cap that
/// pauses it (gated, so the capped retry never leaves before the pause), and a budget
/// small enough for its exhaustion forecast to show within minutes; it only alerts.
const CONFIG: &str = r#"# Written by `cargo xtask demo`.
[[agents]]
name = "demo-agent"
match = { cmdline = "demo_agent\\.py" }

[[policies]]
name = "demo-retry-cap"
agent = "demo-agent"
max_retries = 3
window = "60s"
action = "pause"
cooldown = "3s"
gate = true

[[policies]]
name = "demo-budget"
agent = "demo-agent"
scope = "agent"
max_cost_usd = 0.01
window = "1h"
action = "alert"
"#;

/// The sample agent: the real openai SDK against the mock (trusting its certificate
/// through SSL_CERT_FILE). Normal calls, then every 15th turn a retry storm against
/// a model the mock always answers with 429, which the SDK retries.
const AGENT: &str = r#"# Written by `cargo xtask demo`: a sample agent loop on the official openai SDK.
import os, sys, time, openai
client = openai.OpenAI(base_url="https://127.0.0.1:%s/v1" % os.environ["DEMO_MOCK_PORT"],
                       api_key="sk-demo-no-real-key", max_retries=5)
turn = 0
while True:
    turn += 1
    if turn % 15 == 5:
        print("turn %d: calling a rate-limited model (the SDK retries: a retry storm)" % turn, flush=True)
        try:
            client.chat.completions.create(model="always-429-demo", messages=[{"role": "user", "content": "again"}])
        except openai.RateLimitError:
            print("turn %d: the SDK gave up after its retries" % turn, flush=True)
    else:
        reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "turn %d" % turn}])
        print("turn %d: %s" % (turn, reply.choices[0].message.content), flush=True)
    time.sleep(1)
"#;

/// `cargo xtask demo [--headless [--seconds N]] [--no-build]`.
pub fn run(headless: bool, seconds: u64, no_build: bool) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("`cargo xtask demo` runs the daemon, which loads eBPF probes and needs root: run it as root (e.g. `sudo -E cargo xtask demo`)");
    }
    if !no_build {
        setup::run()?;
        setup::test_dependencies()?;
        step("building the agent (release, eBPF object embedded)", || cargo(&["build", "--release", "-p", "gauge-agent"]))?;
    }
    let mut demo = Demo::new()?;
    say(&format!("working in {} (removed at the end)", demo.dir.display()));
    demo.certificate()?;
    let mock_port = demo.start_mock()?;
    say(&format!("mock provider (tests/mock/llm_server.py) on https://127.0.0.1:{mock_port}"));
    let addr = demo.start_daemon()?;
    say(&format!("daemon up: gauge-agent run --config {} --listen {addr}", demo.dir.join("gauge.toml").display()));
    demo.start_agent(mock_port)?;
    say(&format!("sample agent started: python3 {} (its output: {})", demo.dir.join("demo_agent.py").display(), demo.dir.join("agent.log").display()));
    if headless {
        say(&format!("running headless: waiting (at most {seconds} s) for spend, a retry storm and the policy's pause"));
        let seen = demo.wait("spend, retries and a policy action for demo-agent", Duration::from_secs(seconds), |_| {
            let text = get(&addr, "/metrics")?;
            let seen = Seen::read(&text);
            seen.all().then_some(seen)
        })?;
        say(&format!("seen: ${:.6} spent, {} retries, {} policy action(s)", seen.spend_usd, seen.retries, seen.actions));
        let out = Command::new(AGENT_BIN).args(["top", "--once", "--listen", &addr]).output().context("cannot run gauge-agent top --once")?;
        say("gauge-agent top --once:");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        say("the sample agent's last lines:");
        let log = std::fs::read_to_string(demo.dir.join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        for line in &lines[lines.len().saturating_sub(8)..] {
            eprintln!("    {line}");
        }
        if !out.status.success() {
            bail!("gauge-agent top --once failed ({})", out.status);
        }
    } else {
        say("starting gauge-agent top (q, Esc or Ctrl-C quits and stops the demo)");
        thread::sleep(Duration::from_secs(1));
        let status = Command::new(AGENT_BIN)
            .args(["top", "--interval", "1", "--listen", &addr])
            .status()
            .context("cannot run gauge-agent top")?;
        if !status.success() {
            bail!("gauge-agent top exited with {status}");
        }
    }
    say("stopping the sample agent, the daemon and the mock");
    demo.stop();
    say("done");
    Ok(())
}

fn say(what: &str) {
    eprintln!("==> demo: {what}");
}

/// The demo's temp dir and children; dropping it stops them all and removes the dir.
struct Demo {
    dir: PathBuf,
    /// (what, child), stopped in reverse order.
    children: Vec<(&'static str, Child)>,
}

impl Demo {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("gauge-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self { dir, children: Vec::new() })
    }

    /// Starts `cmd` so that it dies with this process (`setpriv --pdeathsig`): a
    /// Ctrl-C during the demo leaves nothing running.
    fn spawn(&mut self, what: &'static str, program: &str, args: &[&str], log: &str, env: &[(&str, String)]) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join(log)).context("cannot create a log file")?;
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", program])
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {what} ({program})"))?;
        self.children.push((what, child));
        Ok(())
    }

    /// A self-signed certificate for 127.0.0.1 (openssl CLI, which `cargo xtask setup`
    /// installs); the mock serves it and the agent trusts it.
    fn certificate(&self) -> anyhow::Result<()> {
        let status = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout"])
            .arg(self.dir.join("key.pem"))
            .arg("-out")
            .arg(self.dir.join("cert.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run openssl (apt-get install openssl)")?;
        if !status.success() {
            bail!("openssl could not make the demo's certificate ({status})");
        }
        say("self-signed certificate for 127.0.0.1 made");
        Ok(())
    }

    fn start_mock(&mut self) -> anyhow::Result<u16> {
        let script = Path::new("tests/mock/llm_server.py");
        if !script.exists() {
            bail!("{} is missing: run `cargo xtask demo` from the repository's root", script.display());
        }
        let (cert, key, port_file) = (self.path("cert.pem"), self.path("key.pem"), self.path("mock.port"));
        self.spawn("the mock provider", "python3", &["tests/mock/llm_server.py", &cert, &key, &port_file], "mock.log", &[])?;
        let port = self.wait("the mock provider to listen", Duration::from_secs(20), |_| {
            std::fs::read_to_string(&port_file).ok().and_then(|p| p.trim().parse::<u16>().ok())
        })?;
        Ok(port)
    }

    /// The daemon on a port of its choosing, read back from its log; returns once
    /// its probes are attached (`/healthz` answers 200).
    fn start_daemon(&mut self) -> anyhow::Result<String> {
        std::fs::write(self.dir.join("gauge.toml"), CONFIG).context("cannot write the demo config")?;
        let (config, undo) = (self.path("gauge.toml"), self.path("undo.json"));
        let bin = std::fs::canonicalize(AGENT_BIN).with_context(|| format!("{AGENT_BIN} is missing"))?;
        let bin = bin.display().to_string();
        let args = ["run", "--config", config.as_str(), "--listen", "127.0.0.1:0", "--state-file", undo.as_str()];
        self.spawn(DAEMON, &bin, &args, "daemon.log", &[("RUST_LOG", "info".to_owned())])?;
        let log = self.dir.join("daemon.log");
        let addr = self.wait("the daemon to serve /metrics", Duration::from_secs(60), |_| {
            let text = std::fs::read_to_string(&log).ok()?;
            let line = text.lines().find(|l| l.contains("serving /metrics"))?;
            Some(line.split("addr=").nth(1)?.split_whitespace().next()?.to_owned())
        })?;
        say("waiting for the TLS probes to attach");
        self.wait("the probes to attach (/healthz)", Duration::from_secs(60), |_| (status(&addr, "/healthz") == Some(200)).then_some(()))?;
        Ok(addr)
    }

    fn start_agent(&mut self, mock_port: u16) -> anyhow::Result<()> {
        let script = self.path("demo_agent.py");
        std::fs::write(&script, AGENT).context("cannot write the sample agent")?;
        let env = [("DEMO_MOCK_PORT", mock_port.to_string()), ("SSL_CERT_FILE", self.path("cert.pem"))];
        self.spawn("the sample agent", "python3", &[script.as_str()], "agent.log", &env)
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// Polls `ready` until it answers, failing when a child has died or time is up.
    fn wait<T>(&mut self, what: &str, timeout: Duration, ready: impl Fn(&Self) -> Option<T>) -> anyhow::Result<T> {
        let start = Instant::now();
        loop {
            if let Some(found) = ready(self) {
                return Ok(found);
            }
            self.check_alive()?;
            if start.elapsed() > timeout {
                bail!("timed out waiting for {what}; logs in {}", self.dir.display());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fails (with the child's log) when any child has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (what, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                let logs = ["mock.log", "daemon.log", "agent.log"]
                    .map(|f| format!("--- {f}\n{}", std::fs::read_to_string(self.dir.join(f)).unwrap_or_default()));
                bail!("{what} exited ({status}):\n{}", logs.join("\n"));
            }
        }
        Ok(())
    }

    /// Newest first: the agent and the mock are killed; the daemon gets SIGTERM, so
    /// it stops cleanly (releasing what its policies paused), and SIGKILL only if it
    /// has not exited within 30 s.
    fn stop(&mut self) {
        while let Some((what, mut child)) = self.children.pop() {
            if what == DAEMON {
                let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
                let start = Instant::now();
                while child.try_wait().ok().flatten().is_none() && start.elapsed() < Duration::from_secs(30) {
                    thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the headless demo waits for, read from the daemon's `/metrics`.
#[derive(Debug, Default, PartialEq)]
struct Seen {
    spend_usd: f64,
    retries: f64,
    actions: f64,
}

impl Seen {
    fn read(metrics: &str) -> Self {
        let mut seen = Self::default();
        for line in metrics.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let slot = match name {
                "gauge_llm_cost_usd_total" if labels.contains("agent=\"demo-agent\"") => &mut seen.spend_usd,
                "gauge_llm_retries_total" if labels.contains("agent=\"demo-agent\"") => &mut seen.retries,
                "gauge_policy_actions_total" if labels.contains("policy=\"demo-retry-cap\"") => &mut seen.actions,
                _ => continue,
            };
            *slot += value;
        }
        seen
    }

    fn all(&self) -> bool {
        self.spend_usd > 0.0 && self.retries > 0.0 && self.actions > 0.0
    }
}

/// The HTTP status of a plain GET on the daemon's loopback listener.
fn status(addr: &str, path: &str) -> Option<u16> {
    response(addr, path)?.split(' ').nth(1)?.parse().ok()
}

/// The body of a GET answered 200.
fn get(addr: &str, path: &str) -> Option<String> {
    let text = response(addr, path)?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    (head.split(' ').nth(1) == Some("200")).then(|| body.to_owned())
}

fn response(addr: &str, path: &str) -> Option<String> {
    let mut tcp = TcpStream::connect(addr).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    tcp.read_to_string(&mut response).ok()?;
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_headless_demo_reads_spend_retries_and_actions_of_its_agent_only() {
        let metrics = "# HELP x\n\
            gauge_llm_cost_usd_total{agent=\"demo-agent\",model=\"gpt-4o\"} 0.25\n\
            gauge_llm_cost_usd_total{agent=\"other\",model=\"gpt-4o\"} 9\n\
            gauge_llm_retries_total{agent=\"demo-agent\"} 4\n\
            gauge_policy_actions_total{agent=\"demo-agent\",policy=\"demo-retry-cap\",action=\"pause\"} 1\n";
        let seen = Seen::read(metrics);
        assert_eq!(seen, Seen { spend_usd: 0.25, retries: 4.0, actions: 1.0 });
        assert!(seen.all());
        assert!(!Seen::read("gauge_llm_cost_usd_total{agent=\"demo-agent\"} 1\n").all());
    }
}
