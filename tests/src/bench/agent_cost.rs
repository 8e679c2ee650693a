//! Agent cost: the daemon's CPU time and peak memory per 1,000 LLM calls streamed
//! in 300 chunks each, and what it costs the monitored client (the official openai
//! SDK): the client's CPU with the daemon on against off, runs taking turns. The
//! server is `stream_server` (rustls, not hooked), so the daemon sees only the
//! client, as with a real provider. The per-call figure is the steady state: it
//! is counted from after the client's first call and the daemon's looks at the
//! new process (its libraries are read once per daemon), which are reported
//! apart as the cost of a client's start.

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
/// prints the CPU and wall seconds of the timed calls (all threads), then "ok".
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
cpu, wall = time.process_time(), time.perf_counter()
for _ in range(calls):
    call()
print(time.process_time() - cpu, time.perf_counter() - wall)
print("ok")
"#;

const AGENT: &str = "bench-agent-cost";

pub fn run(scale: Scale) -> anyhow::Result<Vec<Row>> {
    let server = StreamServer::start()?;
    let (cert, port) = (server.cert.clone(), server.port);
    let calls = scale.pick(20, 500);
    let rounds = scale.pick(1, 2);
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let (mut daemon_cpu, mut metered, mut tokens, mut made, mut wall_on) = (0.0, 0.0, 0.0, 0u64, 0.0);
    let mut peak_rss = 0;
    let mut start_costs = Vec::new();
    for _ in 0..rounds {
        off.push(client(&cert, port, calls, Duration::ZERO, || Ok(()))?.0);
        let mut daemon = Daemon::start("");
        daemon.wait_healthy();
        let pid = daemon.pid();
        let started = proc_stat::CpuMark::now(pid)?;
        let mut before = None;
        let (cpu, wall) = client(&cert, port, calls, SETTLE, || {
            start_costs.push(started.elapsed()?.as_secs_f64());
            before = Some(proc_stat::CpuMark::now(pid)?);
            Ok(())
        })?;
        let before = before.context("the client never finished its first call")?;
        on.push(cpu);
        wall_on += wall;
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
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        daemon_cpu += before.elapsed()?.as_secs_f64();
        peak_rss = peak_rss.max(proc_stat::peak_rss(pid)?);
        daemon.stop();
    }
    // The daemon's CPU is counted over the timed calls only (not the warm-up).
    let timed = calls * rounds;
    let per_thousand = daemon_cpu / timed as f64 * 1000.0;
    let rss_mib = peak_rss as f64 / (1024.0 * 1024.0);
    let (off_cpu, on_cpu) = (median(&mut off), median(&mut on));
    let ratio = on_cpu / off_cpu;
    let how = format!("openai SDK, {timed} timed streamed calls of {CHUNKS} chunks, {:.0} calls/s, one after another; schedstat", timed as f64 / wall_on);
    let served = made as f64 * COMPLETION_TOKENS as f64;
    Ok(vec![
        Row::new("calls metered / made", format!("{metered} / {made}"), "gauge_llm_requests_total of the client's agent").target("equal", metered == made as f64),
        Row::new("output tokens metered / served", format!("{tokens} / {served}"), "gauge_llm_tokens_total{kind=\"output\"}, usage as reported").target("equal", tokens == served),
        Row::new("daemon CPU per 1,000 calls", format!("{per_thousand:.3} CPU-s"), how.clone()).target("< 0.5 CPU-s", per_thousand < 0.5),
        Row::new("daemon CPU for a client's start", format!("{:.3} CPU-s", median(&mut start_costs)), "its libraries read (once per daemon) and its first call, median of the runs"),
        Row::new("daemon peak RSS", format!("{rss_mib:.1} MiB"), "VmHWM at the end, embedded default config").target("< 64 MiB", rss_mib < 64.0),
        Row::new("client CPU, Gauge off", format!("{off_cpu:.2} CPU-s"), format!("{calls} calls, median of {rounds} runs")),
        Row::new("client CPU, Gauge on", format!("{on_cpu:.2} CPU-s"), format!("{calls} calls, median of {rounds} runs, taking turns with off")),
        Row::new("client CPU, on / off", format!("{ratio:.3}x"), "the probes' cost to the monitored process").target("<= 1.03x", ratio <= 1.03),
    ])
}

/// How long after a client starts the daemon may still be looking at it: its last
/// look at a new process is 5 s after the exec (`source::runtime` `RESCAN_AFTER`).
const SETTLE: Duration = Duration::from_millis(5500);

/// Runs the SDK client: (CPU seconds, wall seconds) of its timed calls. `warm`
/// runs after its first call, and `settle` after its start, just before the
/// timed calls.
fn client(
    cert: &std::path::Path,
    port: u16,
    calls: u64,
    settle: Duration,
    warm: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64)> {
    let start = Instant::now();
    let mut cmd = clients::python(cert, CLIENT);
    cmd.arg(calls.to_string())
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
    match (numbers.next(), numbers.next()) {
        (Some(cpu), Some(wall)) if output.trim_end().ends_with("ok") => Ok((cpu, wall)),
        _ => bail!("the openai client printed no timings: {output}"),
    }
}
