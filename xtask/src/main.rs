//! `cargo xtask`: set-up, build, run and test. Orchestration only.

mod demo;
mod disk;
mod fuzz;
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Gauge's developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building the eBPF programs needs (idempotent; Debian/Ubuntu, root).
    Setup,
    /// Set up if needed, build release, and run `gauge-agent run` with the embedded
    /// default config.
    Run {
        /// Arguments for `gauge-agent run`, after `--` (e.g. `-- --config FILE --dry-run`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run every fuzz target (cargo-fuzz) for a while each.
    ///
    /// Seeded from fuzz/corpus; a crash fails the run and leaves its input in
    /// fuzz/artifacts.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Gauge end to end with no API key: spend, a retry storm and a policy acting.
    ///
    /// A local mock provider, a sample agent loop on the real openai SDK (normal
    /// calls, then a retry storm), the daemon with a retry-cap policy that pauses it,
    /// and `gauge-agent top` until you quit (q). Needs root; stops everything and
    /// removes its temp dir on exit.
    Demo {
        /// Run without `top`: wait until the daemon has metered the sample agent's
        /// spend, its retry storm and the policy's pause, print `gauge-agent top
        /// --once`, stop. Fails if any is not seen in time (a check for CI).
        #[arg(long)]
        headless: bool,
        /// With --headless: the most seconds to wait for all three.
        #[arg(long, default_value_t = 60, requires = "headless")]
        seconds: u64,
        /// Use the agent already built in target/release (skip set-up and the build).
        #[arg(long)]
        no_build: bool,
    },
    /// Measure Gauge's costs side by side and print a table (docs/PERFORMANCE.md).
    ///
    /// Sets up what the measurements need, builds the release agent and
    /// `gauge-bench`, and runs it as root: probe overhead per SSL_write/SSL_read,
    /// daemon CPU and memory per 1,000 streamed calls, pipeline throughput, the
    /// tokenizer against Python tiktoken, 10,000 connections from 1,000 processes,
    /// and gate latency. About five minutes.
    Bench {
        /// Small counts: only proves that every measurement runs.
        #[arg(long)]
        quick: bool,
        /// Fail when a target is missed, not only mark it in the table.
        #[arg(long)]
        check: bool,
        /// Measurements to run: probes, agent, pipeline, tokenizer, scale, gate
        /// (default: all).
        only: Vec<String>,
    },
    /// Set up if needed, build, and run every test, the kernel tests included.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Run { args } => {
            if !setup::is_root() {
                bail!("`cargo xtask run` starts the daemon, which loads eBPF probes and needs root: run it as root (e.g. `sudo -E cargo xtask run`)");
            }
            setup::run()?;
            cargo(&["build", "--release", "-p", "gauge-agent"])?;
            let status = Command::new("target/release/gauge-agent")
                .arg("run")
                .args(&args)
                .status()
                .context("cannot start target/release/gauge-agent")?;
            exit_with(status)
        }
        Cmd::Fuzz { seconds, targets } => fuzz::run(seconds, &targets),
        Cmd::Demo { headless, seconds, no_build } => demo::run(headless, seconds, no_build),
        Cmd::Bench { quick, check, only } => {
            if !setup::is_root() {
                bail!("`cargo xtask bench` attaches eBPF probes and needs root: run it as root (e.g. `sudo -E cargo xtask bench`)");
            }
            setup::run()?;
            setup::test_dependencies()?;
            step("building the agent and gauge-bench (release)", || {
                cargo(&["build", "--release", "-p", "gauge-agent", "-p", "gauge-tests", "--bin", "gauge-agent", "--bin", "gauge-bench"])
            })?;
            let mut bench = Command::new("target/release/gauge-bench");
            bench.args(quick.then_some("--quick")).args(check.then_some("--check")).args(&only);
            exit_with(bench.status().context("cannot start target/release/gauge-bench")?)
        }
        Cmd::Test { args } => {
            disk::warn_if_low(std::path::Path::new("."), disk::TEST_NEEDS_GIB);
            setup::run()?;
            setup::test_dependencies()?;
            step("building the agent (release, eBPF object embedded)", || cargo(&["build", "--release", "-p", "gauge-agent"]))?;
            step("lints (clippy, warnings are errors)", || {
                cargo(&["clippy", "--release", "--workspace", "--exclude", "gauge-ebpf", "--all-targets", "--", "-D", "warnings"])
            })?;
            let mut test = vec!["test", "--release", "--workspace", "--exclude", "gauge-ebpf"];
            test.extend(args.iter().map(String::as_str));
            step("running the test suite", || cargo(&test))
        }
    }
}

/// Runs one long step, saying what it is before and how long it took after: a
/// fresh machine spends minutes in each, and silence looks like a hang.
fn step(what: &str, run: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    eprintln!("==> {what}");
    let start = std::time::Instant::now();
    let result = run();
    let outcome = if result.is_ok() { "done" } else { "FAILED" };
    eprintln!("==> {what}: {outcome} in {:.0} s", start.elapsed().as_secs_f64());
    result
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo).args(args).status().with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn exit_with(status: std::process::ExitStatus) -> anyhow::Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("gauge-agent exited with {status}")
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    /// `--help` explains every command and every flag.
    #[test]
    fn every_command_and_flag_has_help() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        for command in cli.get_subcommands() {
            assert!(command.get_about().is_some(), "`{}` has no help", command.get_name());
            for arg in command.get_arguments() {
                assert!(arg.get_help().is_some(), "`{} {}` has no help", command.get_name(), arg.get_id());
            }
        }
    }
}
