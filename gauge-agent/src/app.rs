//! Wiring of the commands: which stages run, connected how. No logic of its own.

use std::{
    io::BufWriter,
    os::unix::fs::OpenOptionsExt as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config_watch::ConfigWatch,
    attribution::{Attributor, container::MetadataRoots, process::ProcFs},
    policy::{cgroup::CgroupFs, executor::Executor},
    source::{CaptureEvent, Comm, Payload, discovery},
    config::Config,
    metering::outcomes::OutcomeReport,
    pipeline::Pipeline,
    export::{
        metrics::CaptureCollector,
        server::{self, ServerState, WriteAccess},
    },
    source::{discovery::Target, recording, runtime::{self, CaptureState}},
};

/// How often the config file is looked at for changes (policies hot-reload).
const RELOAD_POLL: Duration = Duration::from_secs(2);
/// Most capture events handled in one turn of the daemon's loop.
const EVENTS_PER_TURN: usize = 1024;

/// `gauge-agent run`.
pub async fn run(mut config: Config, config_path: Option<PathBuf>, listen: Option<SocketAddr>, dry_run: bool) -> anyhow::Result<()> {
    check_privileges(crate::privileges::Command::run(&config))?;
    config.enforcement.dry_run |= dry_run;
    let capture = CaptureState::new();
    let mut registry = Registry::default();
    CaptureCollector::register(&mut registry, capture.clone());
    let processes = ProcFs::new(
        config.attribution.host_root.join("proc"),
        MetadataRoots::under(&config.attribution.host_root),
        Attributor::env_names(&config.attribution, &config.agents),
    );
    let mut pipeline = Pipeline::new(&config, Box::new(processes), monotonic_ns, &mut registry)?;
    pipeline.start_fleet_budgets(monotonic_ns);
    let otlp = config.otlp.as_ref().map(|c| crate::export::otlp::OtlpExporter::start(c, realtime_offset_ns, &mut registry)).transpose()?;
    let proc_root = config.attribution.host_root.join("proc");
    let cgroups = CgroupFs::new(config.attribution.host_root.join("sys/fs/cgroup"));
    let hold_timeout = Duration::from_millis(config.enforcement.hold_timeout_ms);
    let mut executor = Executor::register(None, cgroups, proc_root.clone(), hold_timeout, &mut registry);
    // Before anything else: undo what an agent that died left stopped or frozen.
    executor.recover(config.enforcement.state_file.clone());
    let mut heart = crate::lifecycle::Heart::open(&config.enforcement.state_file, &mut registry);
    let reload_failures = prometheus_client::metrics::counter::Counter::<u64>::default();
    registry.register(
        "gauge_config_reload_failures",
        "Config reloads refused (the running config stays); the log names file, line and key.",
        reload_failures.clone(),
    );
    let listen = listen.unwrap_or(config.server.listen);
    let writes = WriteAccess { token: read_token(config.server.token_file.as_deref())?, loopback: listen.ip().is_loopback() };
    if writes.token.is_none() && !writes.loopback {
        tracing::warn!(%listen, "listening beyond loopback without server.token_file: POST /v1/outcomes is refused");
    }
    let reads = server::ReadAccess { token: read_token(config.server.metrics_token_file.as_deref())? };
    // Read now, so that a bad certificate or key stops the start with its file named.
    let tls = config.server.tls.as_ref().map(server::TlsFiles::load).transpose()?;
    let state = ServerState::new(registry, &capture, pipeline.outcomes(), writes).with_reads(reads);
    let serve = server::bind(listen, state.clone(), tls).await?;
    let mut serve = tokio::spawn(serve);

    // Off the runtime's one thread: the canary, loading the programs and the first
    // attach pass take seconds on a big host, while /healthz must answer (503
    // until ready) and /metrics must not hang.
    let start = {
        let (options, capture) = (config.capture_options(), capture.clone());
        tokio::task::spawn_blocking(move || runtime::start(options, capture))
    };
    let runtime::Capture { mut events, enforcement } = start.await.context("the capture start panicked")??;
    executor.set_maps(enforcement);
    if !config.policies.is_empty() {
        adopt_running(&mut pipeline, &proc_root);
        executor.run(pipeline.take_commands(), Instant::now());
        tracing::info!(policies = config.policies.len(), dry_run = config.enforcement.dry_run, "policies armed");
    }
    state.ready.store(true, Ordering::Release);
    heart.up();
    let mut watch = config_path.map(|path| ConfigWatch::new(path, dry_run));
    let mut poll = tokio::time::interval(RELOAD_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Created once, before the loop: a signal that arrives while no listener exists
    // would be lost.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => {
                    // What else is queued is taken too (up to a bound, so timers and
                    // signals are not kept waiting behind a flood).
                    let queued = std::iter::from_fn(|| events.try_recv()).take(EVENTS_PER_TURN);
                    for event in std::iter::once(event).chain(queued) {
                        report(pipeline.feed(&event), otlp.as_ref());
                        executor.run(pipeline.take_commands(), Instant::now());
                    }
                }
                None => {
                    executor.release_all();
                    bail!("the capture stopped unexpectedly");
                }
            },
            _ = sleep_until(executor.next_due()) => executor.due(Instant::now()),
            _ = poll.tick() => {
                heart.beat();
                executor.due(Instant::now());
                executor.forget_gone();
                report(pipeline.forget_gone(|pid| executor.alive(pid)), otlp.as_ref());
                // Fleet budgets change with other hosts' spend, not only with events here.
                pipeline.tick(monotonic_ns());
                executor.run(pipeline.take_commands(), Instant::now());
                if let Some(watch) = &mut watch
                    && let Some(reloaded) = watch.changed()
                {
                    // A config that needs a capability this daemon lacks (CAP_KILL for
                    // a first policy) is refused like a broken one.
                    let reloaded = reloaded.map_err(anyhow::Error::from).and_then(|new| {
                        crate::privileges::check(crate::privileges::Command::run(&new))?;
                        Ok(new)
                    });
                    match reloaded {
                        Ok(new) => {
                            // Whatever the old policies paused or froze is let go first.
                            executor.release_all();
                            executor.set_hold_timeout(Duration::from_millis(new.enforcement.hold_timeout_ms));
                            pipeline.reload(&new);
                            adopt_running(&mut pipeline, &proc_root);
                            executor.run(pipeline.take_commands(), Instant::now());
                            tracing::info!(policies = new.policies.len(), agents = new.agents.len(), "config reloaded (agents, policies, enforcement; other sections need a restart)");
                        }
                        Err(error) => {
                            reload_failures.inc();
                            tracing::error!(%error, "config reload refused: the running config stays");
                        }
                    }
                }
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            result = &mut serve => {
                executor.release_all();
                bail!("the HTTP listener stopped: {result:?}");
            }
        }
    }
    // Nothing stays paused, frozen or throttled after the agent.
    executor.release_all();
    heart.stop();
    // Spans and metrics still queued go out, within a bound.
    if let Some(otlp) = otlp {
        otlp.shutdown(Duration::from_secs(3));
    }
    // Each uprobe's detach waits for the kernel (~0.1 s, serialized on a global
    // lock), so exit takes a moment per hooked function; nothing is left behind.
    tracing::info!("stopping; probes detach as the agent exits");
    Ok(())
}

/// Puts the processes already running under the policies now, as if each had just
/// executed, rather than at its first captured byte (which may be the request to stop).
fn adopt_running(pipeline: &mut Pipeline, proc_root: &Path) {
    for pid in discovery::all_pids(proc_root) {
        let event = CaptureEvent { timestamp_ns: monotonic_ns(), tgid: pid, tid: pid, cgroup_id: 0, comm: Comm::default(), payload: Payload::Exec };
        pipeline.feed(&event);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// `gauge-agent record`: writes the preamble once the probes are attached (a caller
/// may wait for it as the sign that capture is live), then events until stopped.
pub async fn record(
    config: Config,
    output: &Path,
    mut filter: recording::Filter,
    duration: Option<Duration>,
    redact: bool,
) -> anyhow::Result<()> {
    check_privileges(crate::privileges::Command::Record)?;
    let capture = CaptureState::new();
    let mut events = runtime::start(config.capture_options(), capture.clone())?.events;
    // Owner-only: even redacted, a recording holds prompts and completions.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(output)
        .with_context(|| format!("cannot create {}", output.display()))?;
    let mut writer = recording::Writer::new(BufWriter::new(file), redact, realtime_offset_ns())?;
    if !redact {
        tracing::warn!("recording WITHOUT redaction: the file holds credentials and prompts; never share it");
    }
    // Created once, before the loop: a signal that arrives while no listener exists
    // would be lost.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let deadline = tokio::time::sleep(duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    let mut written = 0u64;
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { bail!("the capture stopped unexpectedly") };
                if filter.keeps(&event) {
                    writer.write(&event)?;
                    written += 1;
                }
                // Flush when caught up, so the file is current for whoever tails it.
                if events.is_empty() {
                    writer.flush()?;
                }
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = &mut deadline => break,
        }
    }
    writer.flush()?;
    let kernel = capture.kernel_stats();
    eprintln!(
        "gauge-agent record: {written} events written to {}; lost: {} in the kernel ring, {} over a process's share of it, {} undecodable; {} bytes truncated",
        output.display(),
        kernel.events_lost,
        kernel.events_throttled,
        capture.counters.decode_errors.load(Ordering::Relaxed),
        kernel.bytes_truncated,
    );
    Ok(())
}

/// `gauge-agent targets`: asks the running daemon (plain HTTP: with `[server.tls]`
/// on, use curl, as README.md says).
pub fn targets(listen: SocketAddr, json: bool, token_file: Option<&Path>) -> anyhow::Result<()> {
    let token = read_token(token_file)?;
    let url = format!("http://{listen}/targets");
    let mut request = ureq::get(&url).config().http_status_as_error(false).build();
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let mut response = request
        .call()
        .with_context(|| format!("cannot reach the daemon at {listen}: is `gauge-agent run` running? (use --listen if it listens elsewhere; with [server.tls] on, use curl --cacert)"))?;
    let status = response.status();
    let body = response.body_mut().read_to_string().context("reading the daemon's answer")?;
    if status == 401 {
        bail!("the daemon requires its read token (server.metrics_token_file): pass it with --token-file FILE");
    }
    if !status.is_success() {
        bail!("the daemon refused /targets ({status}): {}", body.trim());
    }
    if json {
        println!("{body}");
        return Ok(());
    }
    let targets: Vec<Target> = serde_json::from_str(&body).context("the daemon's /targets answer is not a target list")?;
    if targets.is_empty() {
        println!("no TLS library hooked yet");
    }
    for t in targets {
        let why = match &t.reason {
            crate::source::discovery::Reason::LinkerCache => "in the linker cache".to_owned(),
            crate::source::discovery::Reason::Config => "named in the config".to_owned(),
            crate::source::discovery::Reason::Mapped { pid, comm } => format!("mapped by pid {pid} ({comm})"),
            crate::source::discovery::Reason::Executable { pid, comm } => format!("executable of pid {pid} ({comm})"),
        };
        let symbols: Vec<&str> = t.symbols.iter().map(|(name, _)| name.as_str()).collect();
        println!("{}\n  why: {why}\n  probes: {} on {}", t.path, t.probes, symbols.join(", "));
        if let Some(error) = t.error {
            println!("  not fully hooked: {error}");
        }
    }
    Ok(())
}

/// Hands finished calls to OTLP (when on) and the debug log.
fn report(finished: &[crate::pipeline::Finished], otlp: Option<&crate::export::otlp::OtlpExporter>) {
    for done in finished {
        if let Some(otlp) = otlp {
            otlp.send(done);
        }
        let (c, who) = (&done.metered.call, &done.who);
        tracing::debug!(
            call_id = %done.call_id(), pid = who.pid, exe = %who.exe, agent = %who.agent, workflow = %who.workflow,
            provider = c.provider.label(), model = c.model(), status = ?c.status,
            usage = ?c.usage, cost_usd = done.cost.map(|c| c.usd()), incomplete = c.incomplete, "LLM call"
        );
    }
}

/// `gauge-agent __probe-floor`: the benchmark's counting-only probes on `file`.
pub fn probe_floor(file: &Path, exported: bool) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let mut symbols = crate::source::elf::inspect(file)?;
    if exported {
        symbols.offsets.clear();
        for name in ["SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex"] {
            if let Some(offset) = crate::source::elf::function_offset(file, name)? {
                symbols.offsets.insert(name, offset);
            }
        }
    }
    let mut probe = crate::source::kernel::FloorProbe::load()?;
    let attached = probe.attach(file, &symbols)?;
    if attached == 0 {
        anyhow::bail!("{} has no read or write function Gauge hooks", file.display());
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "attached {attached}")?;
    stdout.flush()?;
    // Counting goes on in the kernel until the bench closes our stdin.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    let (entries, returns) = probe.hits()?;
    writeln!(stdout, "entries={entries} returns={returns}")?;
    Ok(())
}

/// `gauge-agent check-config`.
pub fn check_config(file: &Path) -> anyhow::Result<()> {
    Config::load(Some(file))?;
    println!("{}: ok", file.display());
    Ok(())
}

pub fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(Config::load(path.map(PathBuf::as_path))?)
}

/// Refuses to start without a capability the command cannot work without (naming it,
/// its use and how to grant it); warns once per feature that will fail for want of
/// an optional one.
fn check_privileges(command: crate::privileges::Command) -> anyhow::Result<()> {
    for missing in crate::privileges::check(command)? {
        tracing::warn!(
            capability = missing.capability.name(),
            "{} is missing, so this will not work: {} (README.md, Requirements, says how to grant it)",
            missing.capability,
            missing.for_what
        );
    }
    Ok(())
}

/// A bearer token from a file (trimmed); refuses an empty file or one that other
/// users may read.
pub fn read_token(path: Option<&Path>) -> anyhow::Result<Option<String>> {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(path) = path else { return Ok(None) };
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read the token file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!("the token file {} is readable by other users: chmod 600 it", path.display());
    }
    let token = std::fs::read_to_string(path).with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    Ok(Some(token))
}

/// `gauge-agent outcome`: reports an outcome to the running daemon.
pub fn outcome(listen: SocketAddr, report: &OutcomeReport, token_file: Option<&Path>) -> anyhow::Result<()> {
    report.validate()?;
    let token = read_token(token_file)?;
    let url = format!("http://{listen}/v1/outcomes");
    let body = serde_json::json!({"agent": report.agent, "outcome": report.outcome, "count": report.count, "value": report.value});
    let mut request = ureq::post(&url).config().http_status_as_error(false).build().header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = request
        .send(body.to_string())
        .with_context(|| format!("cannot reach the daemon at {listen}: is `gauge-agent run` running? (use --listen if it listens elsewhere)"))?;
    let status = response.status();
    let text = response.into_body().read_to_string().unwrap_or_default();
    if !status.is_success() {
        bail!("the daemon refused the outcome ({status}): {}", text.trim());
    }
    Ok(())
}

/// `gauge-agent prices`.
pub fn prices(config: &Config, provider: &str, models: &[String]) -> anyhow::Result<()> {
    use crate::metering::prices::{EMBEDDED, PriceTable, Tokens};
    let table = PriceTable::with_overrides(config.prices.clone())?;
    if models.is_empty() {
        print!("{EMBEDDED}");
        println!("\n# {} [[prices]] entries from the config take precedence over these.", config.prices.len());
        return Ok(());
    }
    println!("prices as of {} (USD per million tokens; config entries first)", table.as_of());
    let million = 1_000_000;
    for model in models {
        let rate = |tokens: Tokens| table.cost(provider, model, tokens).map(|c| c.usd());
        match rate(Tokens { input: million, ..Tokens::default() }) {
            None => println!("{model}: no price (add a [[prices]] entry)"),
            Some(input) => {
                let [cache_read, cache_write, output] = [
                    Tokens { cache_read: million, ..Tokens::default() },
                    Tokens { cache_write: million, ..Tokens::default() },
                    Tokens { output: million, ..Tokens::default() },
                ]
                .map(|t| rate(t).unwrap_or_default());
                println!("{model}: input {input} cache_read {cache_read} cache_write {cache_write} output {output}");
            }
        }
    }
    Ok(())
}

/// CLOCK_MONOTONIC, the clock of captured events.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0).saturating_mul(1_000_000_000).saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

fn realtime_offset_ns() -> i128 {
    let now = |clock| {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC)
}
