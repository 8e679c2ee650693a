//! Overhead on monitored processes: what one `SSL_write`/`SSL_read` costs a process
//! with nothing attached, with counting-only probes (the floor, where Gauge probes
//! and at the exported entry points), and with the real daemon attached; and what
//! the plain-HTTP syscall tracepoints add to every process's `write`/`read`.
//!
//! The loop is `tests/bench/ssl_loop.c`: client and server in one process over an
//! in-memory BIO pair, so only the library's work and the probes are timed. Modes
//! take turns, round after round, and each figure is the median over rounds: the
//! machine's noise falls on all of them alike.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{Row, Scale, median};
use crate::{
    agent::{Daemon, agent_binary},
    mock::write_certificate,
};

/// The system OpenSSL the loop links, which the daemon hooks.
pub const LIBSSL: &str = "/usr/lib/x86_64-linux-gnu/libssl.so.3";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Nothing,
    /// Counting probes at the exported functions' first instructions.
    FloorExported,
    /// Counting probes where the daemon probes.
    Floor,
    /// The daemon with the embedded defaults.
    Gauge,
    /// The same with the plain-HTTP tracepoints attached (`plain_http = "on"`).
    GaugePlainOn,
}

const MODES: [Mode; 5] = [Mode::Nothing, Mode::FloorExported, Mode::Floor, Mode::Gauge, Mode::GaugePlainOn];

/// One loop run: ns per call of each function.
#[derive(Default, Clone)]
struct Sample {
    write: Vec<f64>,
    read: Vec<f64>,
    write_ex: Vec<f64>,
    read_ex: Vec<f64>,
    sys_write: Vec<f64>,
    sys_read: Vec<f64>,
}

/// Builds the loop with the machine's C compiler against its OpenSSL.
pub fn build_loop(dir: &Path) -> anyhow::Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/ssl_loop.c");
    let binary = dir.join("ssl_loop");
    let status = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&binary)
        .arg(&source)
        .args(["-lssl", "-lcrypto"])
        .status()
        .context("cannot run cc: install gcc and libssl-dev (`cargo xtask bench` does)")?;
    if !status.success() {
        bail!("cannot build {}: install gcc and libssl-dev (`cargo xtask bench` does)", source.display());
    }
    Ok(binary)
}

/// Runs the loop once: (write ns, read ns) per call.
fn run_loop(binary: &Path, cert: &Path, key: &Path, calls: u64, form: &str) -> anyhow::Result<(f64, f64)> {
    let output = Command::new(binary).arg(cert).arg(key).arg(calls.to_string()).arg(form).output().context("cannot run ssl_loop")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("ssl_loop {form} failed: {}{}", text, String::from_utf8_lossy(&output.stderr));
    }
    let field = |name: &str| -> anyhow::Result<f64> {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .with_context(|| format!("no {name} in ssl_loop's output: {text}"))
    };
    Ok((field("write_ns")?, field("read_ns")?))
}

/// What is attached while a mode's loops run; dropping it detaches.
enum Attached {
    Nothing,
    Floor(Child, BufReader<std::process::ChildStdout>),
    Gauge(Box<Daemon>),
}

impl Attached {
    fn start(mode: Mode) -> anyhow::Result<Self> {
        match mode {
            Mode::Nothing => Ok(Self::Nothing),
            Mode::FloorExported | Mode::Floor => {
                let mut cmd = Command::new(agent_binary());
                cmd.arg("__probe-floor").arg(LIBSSL);
                if mode == Mode::FloorExported {
                    cmd.arg("--exported");
                }
                let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().context("cannot start gauge-agent __probe-floor")?;
                let mut line = String::new();
                let mut stdout = BufReader::new(child.stdout.take().context("floor stdout")?);
                stdout.read_line(&mut line).context("reading the floor's first line")?;
                if !line.starts_with("attached") {
                    let _ = child.kill();
                    bail!("gauge-agent __probe-floor did not attach: {line:?}");
                }
                Ok(Self::Floor(child, stdout))
            }
            Mode::Gauge | Mode::GaugePlainOn => {
                // The embedded defaults, as users run it (no local model server here,
                // so no plain-HTTP tracepoints), or with those forced on.
                let config = if mode == Mode::Gauge { "" } else { "[capture]\nplain_http = \"on\"\n" };
                let mut daemon = Daemon::start(config);
                daemon.wait_healthy();
                Ok(Self::Gauge(Box::new(daemon)))
            }
        }
    }

    /// Whether the probes see the loop's calls (the daemon attaches as it starts).
    fn seen(&self) -> bool {
        match self {
            Self::Gauge(daemon) => daemon.metric("gauge_capture_events_total{kind=\"write\"}") > 0.0,
            _ => true,
        }
    }

    /// Detaches; for the floor, the entries its probes counted.
    fn stop(self) -> Option<u64> {
        match self {
            Self::Nothing => None,
            Self::Floor(mut child, mut stdout) => {
                drop(child.stdin.take());
                let mut line = String::new();
                let _ = stdout.read_line(&mut line);
                let _ = child.wait();
                line.split_whitespace().find_map(|w| w.strip_prefix("entries=")?.parse().ok())
            }
            Self::Gauge(daemon) => {
                daemon.stop();
                None
            }
        }
    }
}

pub fn run(scale: Scale) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let binary = build_loop(dir.path())?;
    let (cert, key) = write_certificate(dir.path());
    let calls = scale.pick(2_000, 20_000);
    let rounds = scale.pick(1, 5);
    let mut samples: Vec<Sample> = vec![Sample::default(); MODES.len()];
    for _ in 0..rounds {
        for (i, mode) in MODES.into_iter().enumerate() {
            let attached = Attached::start(mode)?;
            // Warm up (and, for the daemon, wait until its probes see the loop).
            let start = Instant::now();
            let mut warmups = 0;
            loop {
                run_loop(&binary, &cert, &key, 200, "plain")?;
                warmups += 1;
                if attached.seen() {
                    break;
                }
                if start.elapsed() > Duration::from_secs(30) {
                    bail!("the daemon saw no write of the loop within 30 s");
                }
            }
            let s = &mut samples[i];
            if mode == Mode::GaugePlainOn {
                let (w, r) = run_loop(&binary, &cert, &key, calls * 10, "sys")?;
                s.sys_write.push(w);
                s.sys_read.push(r);
                let _ = attached.stop();
                continue;
            }
            let (w, r) = run_loop(&binary, &cert, &key, calls, "plain")?;
            s.write.push(w);
            s.read.push(r);
            let (w, r) = run_loop(&binary, &cert, &key, calls, "ex")?;
            s.write_ex.push(w);
            s.read_ex.push(r);
            let (w, r) = run_loop(&binary, &cert, &key, calls * 10, "sys")?;
            s.sys_write.push(w);
            s.sys_read.push(r);
            // Each loop call hits one read or write function once (the 200-call
            // warm-ups included); other processes' TLS adds to it, never takes away.
            if let Some(entries) = attached.stop() {
                let made = 2 * (2 * calls + 200 * warmups);
                if entries < made {
                    bail!("the counting probes saw {entries} calls of at least {made}: they missed some");
                }
            }
        }
    }
    Ok(rows(&mut samples, calls, rounds))
}

fn rows(samples: &mut [Sample], calls: u64, rounds: u64) -> Vec<Row> {
    let how = format!("ssl_loop, {calls} calls of 64 B over a BIO pair, median of {rounds} interleaved rounds");
    let mut out = Vec::new();
    type Pick = fn(&mut Sample) -> &mut Vec<f64>;
    let functions: [(&str, Pick); 4] = [
        ("SSL_write", |s| &mut s.write),
        ("SSL_read", |s| &mut s.read),
        ("SSL_write_ex", |s| &mut s.write_ex),
        ("SSL_read_ex", |s| &mut s.read_ex),
    ];
    for (name, pick) in functions {
        let [nothing, exported, floor, gauge] = [0, 1, 2, 3].map(|i| median(pick(&mut samples[i])));
        let (floor_added, exported_added, gauge_added) = (floor - nothing, exported - nothing, gauge - nothing);
        out.push(Row::new(format!("{name}: no probe"), format!("{:.2} us", nothing / 1e3), how.clone()));
        out.push(Row::new(
            format!("{name}: counting probe, added"),
            format!("{:.2} us", floor_added / 1e3),
            "the floor: a probe that only counts, where Gauge probes",
        ));
        out.push(Row::new(
            format!("{name}: counting probe at export, added"),
            format!("{:.2} us", exported_added / 1e3),
            "the same at the exported entry point (single-stepped `sub rsp`)",
        ));
        out.push(Row::new(format!("{name}: Gauge, added"), format!("{:.2} us", gauge_added / 1e3), "the daemon attached (default config)"));
        let ratio = gauge_added / floor_added.max(1.0);
        out.push(
            Row::new(format!("{name}: Gauge / floor"), format!("{ratio:.2}x"), "added per hit, Gauge over the counting probe at the same points")
                .target("<= 1.3x", ratio <= 1.3),
        );
        let ratio = gauge_added / exported_added.max(1.0);
        out.push(
            Row::new(format!("{name}: Gauge / floor at export"), format!("{ratio:.2}x"), "added per hit, Gauge over a counting probe at the exported entry")
                .target("<= 1.3x", ratio <= 1.3),
        );
    }
    for (name, i) in [("write(2) to /dev/null", 0), ("read(2) from /dev/zero", 1)] {
        let pick = |s: &mut Sample| if i == 0 { s.sys_write.clone() } else { s.sys_read.clone() };
        let nothing = median(&mut pick(&mut samples[0]));
        let gauge = median(&mut pick(&mut samples[3]));
        let plain_on = median(&mut pick(&mut samples[4]));
        let how = format!("not TLS, {} calls of 64 B", calls * 10);
        out.push(Row::new(format!("{name}: no probe"), format!("{nothing:.0} ns"), how.clone()));
        out.push(
            Row::new(format!("{name}: Gauge, added"), format!("{:.0} ns", gauge - nothing), format!("{how}; defaults, no local model server (plain_http = \"auto\")"))
                .target("< 100 ns (not probed)", gauge - nothing < 100.0),
        );
        out.push(Row::new(
            format!("{name}: Gauge with plain_http = on, added"),
            format!("{:.0} ns", plain_on - nothing),
            format!("{how}; the syscall tracepoints' miss on a non-model socket"),
        ));
    }
    out
}
