//! `gauge-agent`: only wiring; see `app` for the commands.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use gauge_agent::{
    app,
    cli::{Cli, Command},
    telemetry,
};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::UretprobeCanary { forbidden_syscall } = cli.command {
        // Before logging or the runtime start threads: seccomp confines one thread.
        use gauge_agent::source::hazards::{ChildMode, canary_child};
        canary_child(if forbidden_syscall { ChildMode::ForbiddenSyscall } else { ChildMode::Canary });
    }
    telemetry::init();
    // One thread: the ring reader hands each batch to the pipeline without waking
    // another (with worker threads every batch woke a second thread, and the
    // switches were a large part of the daemon's CPU; docs/PERFORMANCE.md).
    // Long blocking work has threads of its own (capture start, discovery,
    // webhook, OTLP delivery, fleet budgets); what still runs here blocks the
    // reader too, so keep it short (a cgroup freeze waits up to a second).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Run { config: path, listen, dry_run, state_file } => {
            let mut config = app::load_config(path.as_ref())?;
            if let Some(state_file) = state_file {
                config.enforcement.state_file = state_file;
            }
            runtime.block_on(app::run(config, path, listen, dry_run))
        }
        Command::Record { output, pid, comm, duration, no_redact, config } => {
            let config = app::load_config(config.as_ref())?;
            let filter = gauge_agent::source::recording::Filter::new(pid, comm);
            runtime.block_on(app::record(config, &output, filter, duration.map(Duration::from_secs), !no_redact))
        }
        Command::Top { listen, interval, token_file, once } => {
            gauge_agent::top::run(listen, Duration::from_secs_f64(interval), token_file.as_deref(), once)
        }
        Command::Targets { listen, json, token_file } => app::targets(listen, json, token_file.as_deref()),
        Command::Outcome { agent, name, count, value, listen, token_file } => {
            let report = gauge_agent::metering::outcomes::OutcomeReport { agent, outcome: name, count, value };
            app::outcome(listen, &report, token_file.as_deref())
        }
        Command::Prices { models, provider, config } => app::prices(&app::load_config(config.as_ref())?, &provider, &models),
        Command::CheckConfig { file } => app::check_config(&file),
        // Ran (and exited) above.
        Command::UretprobeCanary { .. } => Ok(()),
        Command::ProbeFloor { file, exported } => app::probe_floor(&file, exported),
    }
}
