//! Agent cost: the daemon's CPU time and peak memory per 1,000 LLM calls streamed
//! in 300 chunks each, and what it costs the monitored client (the official openai
//! SDK): the client's CPU with the daemon on against off, runs taking turns. The
//! server is `stream_server` (rustls, not hooked), so the daemon sees only the
//! client, as with a real provider. The per-call figure is the steady state: it
//! is counted from after the client's first call and the daemon's looks at the
//! new process (its libraries are read once per daemon), which are reported
//! apart as the cost of a client's start.
//!
//! The client's CPU differs by more than the probes cost from run to run on a VM
//! (its vCPUs need not run alike, and Python's hash seed moves its memory layout),
//! so the client runs alone on one CPU (the server, the daemon and the thread that
//! starts them on the others), with a fixed hash seed, its on and off runs are
//! paired within a round, the order alternating, and the figure is the median of
//! the rounds' ratios.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{Row, Scale, median, proc_stat};
use super::stream_server::{CHUNKS, COMPLETION_TOKENS, StreamServer};
use crate::{agent::Daemon, clients, world::sum};

/// Streamed chat completions (300 content chunks each, plus the usage chunk);
/// prints the user and system CPU and wall seconds of the timed calls (all
/// threads), then "ok".
const CLIENT: &str = r#"
import os, sys, time, openai
base = "https://127.0.0.1:%s/v1" % os.environ["GAUGE_TEST_PORT"]
calls = int(sys.argv[1])
oa = openai.OpenAI(base_url=base, api_key="sk-test-secret-0123456789abcdef")
msgs = [{"role": "user", "content": "Summarise the ticket history for the customer."}]
def call():
    for _ in oa.chat.completions.create(model="chunks-300-bench", messages=msgs, stream=True, stream_options={"include_usage": True}):
        pass
call()  # connect and warm up, untimed
print("warm", flush=True)
sys.stdin.readline()  # the bench starts counting
before, wall = os.times(), time.perf_counter()
for _ in range(calls):
    call()
after = os.times()
print(after.user - before.user, after.system - before.system, time.perf_counter() - wall)
print("ok")
"#;

const AGENT: &str = "bench-agent-cost";

pub fn run(scale: Scale) -> anyhow::Result<Vec<Row>> {
    // The client alone on one CPU; this thread, and so the server's threads and
    // the daemon it starts, on the others, for the whole section.
    let split = split_cpus();
    let client_cpu = split.as_ref().map(|(cpu, _)| *cpu);
    let _restore = split.map(|(_, before)| Restore(before));
    let server = StreamServer::start()?;
    let (cert, port) = (server.cert.clone(), server.port);
    let calls = scale.pick(20, 250);
    let rounds = scale.pick(1, 4);
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let (mut off_system, mut on_system) = (Vec::new(), Vec::new());
    let mut records = 0.0;
    let (mut daemon_cpu, mut metered, mut tokens, mut made, mut wall_on) = (0.0, 0.0, 0.0, 0u64, 0.0);
    let mut peak_rss = 0;
    let mut start_costs = Vec::new();
    let unwatched = || client(client_cpu, &cert, port, calls, Duration::ZERO, || Ok(()));
    for round in 0..rounds {
        // Off first in even rounds, on first in odd ones: a drift within rounds
        // falls on both.
        let first = if round % 2 == 0 { Some(unwatched()?) } else { None };
        let mut daemon = Daemon::start("");
        daemon.wait_healthy();
        let pid = daemon.pid();
        let started = proc_stat::CpuMark::now(pid)?;
        let mut before = None;
        let watched = client(client_cpu, &cert, port, calls, SETTLE, || {
            start_costs.push(started.elapsed()?.as_secs_f64());
            before = Some(proc_stat::CpuMark::now(pid)?);
            Ok(())
        })?;
        let before = before.context("the client never finished its first call")?;
        on.push(watched.user + watched.system);
        on_system.push(watched.system);
        wall_on += watched.wall;
        // +1: the untimed warm-up call is metered too.
        made += calls + 1;
        let want = (calls + 1) as f64;
        let start = Instant::now();
        loop {
            let (_, text) = daemon.get("/metrics").context("scrape")?;
            let seen = sum(&text, "gauge_llm_requests_total", &[("agent", AGENT)]);
            if seen >= want || start.elapsed().as_secs() > 30 {
                metered += seen;
                tokens += sum(&text, "gauge_llm_tokens_total", &[("agent", AGENT), ("kind", "output")]);
                records += sum(&text, "gauge_capture_events_total", &[("kind", "read")])
                    + sum(&text, "gauge_capture_events_total", &[("kind", "write")]);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        daemon_cpu += before.elapsed()?.as_secs_f64();
        peak_rss = peak_rss.max(proc_stat::peak_rss(pid)?);
        daemon.stop();
        let quiet = match first {
            Some(quiet) => quiet,
            None => unwatched()?,
        };
        off.push(quiet.user + quiet.system);
        off_system.push(quiet.system);
    }
    // The daemon's CPU is counted over the timed calls only (not the warm-up).
    let timed = calls * rounds;
    let per_thousand = daemon_cpu / timed as f64 * 1000.0;
    let rss_mib = peak_rss as f64 / (1024.0 * 1024.0);
    let mut ratios: Vec<f64> = on.iter().zip(&off).map(|(on, off)| on / off).collect();
    let (low, high) = ratios.iter().fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    let ratio = median(&mut ratios);
    let (off_cpu, on_cpu) = (median(&mut off), median(&mut on));
    let (off_system, on_system) = (median(&mut off_system), median(&mut on_system));
    let records_per_call = records / made as f64;
    let placement = match client_cpu {
        Some(cpu) => format!("alone on CPU {cpu}, the server and daemon on the others"),
        None => "one CPU: not pinned".to_owned(),
    };
    let how = format!("openai SDK, {timed} timed streamed calls of {CHUNKS} chunks, {:.0} calls/s, one after another; schedstat", timed as f64 / wall_on);
    let served = made as f64 * COMPLETION_TOKENS as f64;
    Ok(vec![
        Row::new("calls metered / made", format!("{metered} / {made}"), "gauge_llm_requests_total of the client's agent").target("equal", metered == made as f64),
        Row::new("output tokens metered / served", format!("{tokens} / {served}"), "gauge_llm_tokens_total{kind=\"output\"}, usage as reported").target("equal", tokens == served),
        Row::new("daemon CPU per 1,000 calls", format!("{per_thousand:.3} CPU-s"), how.clone()).target("< 0.5 CPU-s", per_thousand < 0.5),
        Row::new("daemon CPU for a client's start", format!("{:.3} CPU-s", median(&mut start_costs)), "its libraries read (once per daemon) and its first call, median of the runs"),
        Row::new("daemon peak RSS", format!("{rss_mib:.1} MiB"), "VmHWM at the end, embedded default config").target("< 64 MiB", rss_mib < 64.0),
        Row::new("client CPU, Gauge off", format!("{off_cpu:.2} CPU-s"), format!("{calls} calls, median of {rounds} runs; {placement}")),
        Row::new("client CPU, Gauge on", format!("{on_cpu:.2} CPU-s"), format!("{calls} calls, median of {rounds} runs, each paired with an off run, the order alternating")),
        Row::new("client system CPU, off / on", format!("{off_system:.2} / {on_system:.2} CPU-s"), "of the above: where the probes' traps and programs are counted"),
        Row::new("capture records per LLM call", format!("{records_per_call:.0}"), "gauge_capture_events_total (read, write) of every process over the client's calls: a record is a probed SSL call that moved data"),
        Row::new("client CPU, on / off", format!("{ratio:.3}x"), format!("median of the {rounds} rounds' ratios ({low:.3}-{high:.3}): the probes' cost to the monitored process"))
            .target("<= 1.03x", ratio <= 1.03),
    ])
}

/// How long after a client starts the daemon may still be looking at it: its last
/// look at a new process is 5 s after the exec (`source::runtime` `RESCAN_AFTER`).
const SETTLE: Duration = Duration::from_millis(5500);

/// Seconds the client's timed calls took.
struct Timed {
    user: f64,
    system: f64,
    wall: f64,
}

/// Runs the SDK client: what its timed calls took. `warm`
/// runs after its first call, and `settle` after its start, just before the
/// timed calls.
fn client(
    client_cpu: Option<usize>,
    cert: &std::path::Path,
    port: u16,
    calls: u64,
    settle: Duration,
    warm: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Timed> {
    let start = Instant::now();
    let mut cmd = clients::python(cert, CLIENT);
    if let Some(cpu) = client_cpu {
        pin(&mut cmd, cpu);
    }
    cmd.arg(calls.to_string())
        .env("PYTHONHASHSEED", "0")
        .env("GAUGE_TEST_PORT", port.to_string())
        .env("SSL_CERT_FILE", cert)
        .env("GAUGE_AGENT", AGENT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("cannot run python3 (the openai SDK client)")?;
    let mut stdout = BufReader::new(child.stdout.take().context("client stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line).context("reading the openai client")?;
    if line.trim() == "warm" {
        std::thread::sleep(settle.saturating_sub(start.elapsed()));
        warm()?;
        // A client that died meanwhile shows in its output below.
        let _ = child.stdin.take().context("client stdin")?.write_all(b"go\n");
        line.clear();
    }
    let mut output = line;
    std::io::Read::read_to_string(&mut stdout, &mut output).context("reading the openai client")?;
    let result = child.wait_with_output().context("waiting for the openai client")?;
    if !result.status.success() {
        bail!("the openai client failed: {output}{}", String::from_utf8_lossy(&result.stderr));
    }
    let mut numbers = output.split_whitespace().filter_map(|w| w.parse::<f64>().ok());
    match (numbers.next(), numbers.next(), numbers.next()) {
        (Some(user), Some(system), Some(wall)) if output.trim_end().ends_with("ok") => Ok(Timed { user, system, wall }),
        _ => bail!("the openai client printed no timings: {output}"),
    }
}

/// Moves this thread (and so the server's threads and the daemon, started from it)
/// off the last CPU it may use; returns that CPU, for the client, and the set the
/// thread had, for [`Restore`]. `None` on a one-CPU machine, where nothing is pinned.
fn split_cpus() -> Option<(usize, Affinity)> {
    let before = Affinity::current()?;
    let cpus: Vec<usize> = before.cpus().collect();
    let (&client, rest) = cpus.split_last()?;
    if rest.is_empty() {
        return None;
    }
    let others = Affinity::of(rest);
    others.apply_to_this_thread().then_some((client, before))
}

/// A CPU set.
struct Affinity(libc::cpu_set_t);

impl Affinity {
    fn current() -> Option<Self> {
        // SAFETY: a zeroed cpu_set_t is the empty set, filled in by the kernel.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: the set is ours and of the size passed.
        (unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } == 0).then_some(Self(set))
    }

    fn of(cpus: &[usize]) -> Self {
        // SAFETY: as in `current`.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in cpus {
            // SAFETY: `cpu` came from a set of the same size.
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        Self(set)
    }

    fn cpus(&self) -> impl Iterator<Item = usize> + '_ {
        // SAFETY: CPU_ISSET reads the set within its size.
        (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &self.0) })
    }

    fn apply_to_this_thread(&self) -> bool {
        // SAFETY: the set is valid and of the size passed.
        unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &self.0) == 0 }
    }
}

/// Restores the CPUs this thread had before [`split_cpus`].
struct Restore(Affinity);

impl Drop for Restore {
    fn drop(&mut self) {
        self.0.apply_to_this_thread();
    }
}

/// Makes the client run on `cpu` only (set before its exec, so every thread it
/// starts inherits it).
fn pin(cmd: &mut std::process::Command, cpu: usize) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: between fork and exec only sched_setaffinity, a plain syscall, runs;
    // the set is built on the stack.
    unsafe {
        cmd.pre_exec(move || {
            if Affinity::of(&[cpu]).apply_to_this_thread() {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}
