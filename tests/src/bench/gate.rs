//! Gate latency: what `gate = true` adds to each LLM request (held at `SSL_write`
//! by SIGSTOP, checked by the daemon, released by SIGCONT), measured side by side
//! with an ungated client of the same daemon, runs taking turns.

use std::{
    io::Read as _,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::{Row, Scale, median};
use crate::{
    agent::wait_timeout,
    world::{World, sum},
};

const AGENTS: &str = "[[agents]]\nname = \"gated-bench\"\nmatch = { cmdline = \"gated-marker\" }\n";
const POLICY: &str = "[[policies]]\nname = \"bench\"\nagent = \"gated-bench\"\nmax_requests = 100000000\naction = \"alert\"\ngate = true\n";

pub fn run(scale: Scale) -> anyhow::Result<Vec<Row>> {
    let world = World::start(&format!("{AGENTS}{POLICY}"));
    let requests = scale.pick(60, 300);
    let warmup = requests / 6;
    // http.client over one keep-alive connection: the request's own time is small,
    // so the gate's share shows. Prints the median request time in microseconds.
    let script = format!(
        "import ssl, sys, time, http.client, statistics\n\
         ctx = ssl.create_default_context(cafile='{ca}')\n\
         c = http.client.HTTPSConnection('127.0.0.1', {port}, context=ctx)\n\
         times = []\n\
         for i in range({requests}):\n\
         \x20   t = time.perf_counter()\n\
         \x20   c.request('POST', '/v1/chat/completions', body='{{\"model\":\"bench\",\"messages\":[]}}', headers={{'content-type': 'application/json'}})\n\
         \x20   c.getresponse().read()\n\
         \x20   times.append(time.perf_counter() - t)\n\
         print(int(statistics.median(times[{warmup}:]) * 1e6))\n",
        ca = world.cert.display(),
        port = world.mock.port,
    );
    let median_us = |marker: &str| -> anyhow::Result<f64> {
        let mut child = Command::new("python3")
            .args(["-c", &script, marker])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run python3")?;
        // A gated client is stopped at each write until the daemon releases it: if
        // the daemon died, it would wait for ever.
        let Some(status) = wait_timeout(&mut child, Duration::from_secs(120)) else {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
            let _ = child.kill();
            let _ = child.wait();
            bail!("the {marker} client did not finish in 120 s (held and never released?)");
        };
        let (mut out, mut err) = (String::new(), String::new());
        child.stdout.take().map(|mut o| o.read_to_string(&mut out));
        child.stderr.take().map(|mut e| e.read_to_string(&mut err));
        if !status.success() {
            bail!("the {marker} client failed: {err}");
        }
        out.trim().parse::<f64>().context("the client printed no median")
    };
    let rounds = scale.pick(1, 3);
    let (mut plain, mut gated) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain.push(median_us("plain-marker")?);
        gated.push(median_us("gated-marker")?);
    }
    let (p, g) = (median(&mut plain), median(&mut gated));
    let (_, metrics) = world.daemon.get("/metrics").context("scrape")?;
    let held = sum(&metrics, "gauge_policy_held_requests_total", &[("agent", "gated-bench")]);
    let sent = (requests * rounds) as f64;
    let how = format!("python http.client, one keep-alive connection, median of {} requests, {rounds} rounds taking turns", requests - warmup);
    Ok(vec![
        Row::new("held writes / gated requests", format!("{held} / {sent}"), "gauge_policy_held_requests_total; http.client writes head and body apart, each held")
            .target(">= 1 per request", held >= sent),
        Row::new("request, ungated", format!("{p:.0} us"), how.clone()),
        Row::new("request, gated", format!("{g:.0} us"), how),
        Row::new("added by the gate", format!("{:.0} us", g - p), "per request: each write held at SSL_write (SIGSTOP), decided, released (SIGCONT)"),
    ])
}
