//! Command-line interface. The config file describes policy; flags set the runtime.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "gauge-agent", version, about = "See, meter and govern AI agents' LLM calls on this host, from the kernel")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: attach TLS probes and serve /metrics, /healthz and /targets.
    Run {
        /// TOML config file; without it the embedded default is used.
        #[arg(long, env = "GAUGE_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address, overriding `server.listen` (default 127.0.0.1:9977).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Policies count and log violations but act on nothing.
        #[arg(long)]
        dry_run: bool,
        /// Where to keep what must be undone if the agent dies, overriding
        /// `enforcement.state_file`.
        #[arg(long)]
        state_file: Option<PathBuf>,
    },
    /// List the files the running daemon has hooked, and why.
    Targets {
        /// Address of the running daemon.
        #[arg(long, default_value = "127.0.0.1:9977")]
        listen: SocketAddr,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// File holding the daemon's read token (its server.metrics_token_file), if set.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// A live view of the agents the running daemon meters (from its /metrics).
    ///
    /// Per agent: spend and its rate, tokens, retries, errors, policy actions,
    /// anomalies, forecasts; and the capture's health. Quit with q, Esc or Ctrl-C.
    Top {
        /// Address of the running daemon.
        #[arg(long, default_value = "127.0.0.1:9977")]
        listen: SocketAddr,
        /// Seconds between scrapes (the spend rate is the change between two).
        #[arg(long, default_value_t = 2.0, value_parser = parse_interval)]
        interval: f64,
        /// File holding the daemon's read token (its server.metrics_token_file), if set.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Print one plain-text table and exit (for scripts; no spend rate, which
        /// needs two scrapes). Exits non-zero when the daemon cannot be read.
        #[arg(long)]
        once: bool,
    },
    /// Capture events to a file (JSON Lines, credentials redacted) until Ctrl-C.
    Record {
        /// File to write.
        #[arg(long, short)]
        output: PathBuf,
        /// Only this process.
        #[arg(long, conflicts_with = "comm")]
        pid: Option<u32>,
        /// Only processes whose thread name (comm) is this.
        #[arg(long)]
        comm: Option<String>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
        /// Keep credentials in the recording (never share such a file).
        #[arg(long)]
        no_redact: bool,
        /// TOML config file for the capture settings.
        #[arg(long, env = "GAUGE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Report what an agent achieved, for gauge_outcomes_total and
    /// gauge_cost_per_outcome_usd (e.g. from a ticketing hook or a batch script).
    Outcome {
        /// The agent, as in the `agent` label.
        #[arg(long)]
        agent: String,
        /// The outcome's name, e.g. resolved_ticket.
        #[arg(long)]
        name: String,
        /// How many.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// What they were worth in all (any unit you choose, e.g. USD).
        #[arg(long)]
        value: Option<f64>,
        /// Address of the running daemon.
        #[arg(long, default_value = "127.0.0.1:9977")]
        listen: SocketAddr,
        /// File holding the daemon's bearer token (its server.token_file).
        #[arg(long, env = "GAUGE_TOKEN_FILE")]
        token_file: Option<PathBuf>,
    },
    /// Show the price table: the embedded one, or the rates that price each MODEL
    /// (config overrides included).
    Prices {
        /// Model names as providers report them, e.g. gpt-4o-mini-2024-07-18.
        models: Vec<String>,
        /// The provider label, for `[[prices]]` entries restricted to one.
        #[arg(long, default_value = "")]
        provider: String,
        /// TOML config file whose `[[prices]]` apply.
        #[arg(long, env = "GAUGE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print the effective configuration's errors, if any.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// The child of the start-up uretprobe canary (`source::hazards`), started by
    /// the agent itself.
    #[command(name = "__uretprobe-canary", hide = true)]
    UretprobeCanary {
        /// Once confined, make a syscall the filter forbids (proves the confinement).
        #[arg(long)]
        forbidden_syscall: bool,
    },
    /// Counting-only probes at the read and write functions of FILE, where the daemon
    /// would probe them (`cargo xtask bench`'s floor). Prints "attached N", counts
    /// until stdin closes, then prints "entries=E returns=R".
    #[command(name = "__probe-floor", hide = true)]
    ProbeFloor {
        /// A TLS library or executable.
        file: PathBuf,
        /// At the exported functions' first instructions (OpenSSL 3.0's
        /// `SSL_write` etc.), not the internal functions the daemon prefers.
        #[arg(long)]
        exported: bool,
    },
}

/// `--interval`: seconds, at least 0.1 (a tighter loop would only load the daemon).
fn parse_interval(text: &str) -> Result<f64, String> {
    let secs: f64 = text.parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(0.1..=3600.0).contains(&secs) {
        return Err("the interval must be between 0.1 and 3600 seconds".into());
    }
    Ok(secs)
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
        for command in cli.get_subcommands().filter(|c| !c.is_hide_set()) {
            assert!(command.get_about().is_some(), "`{}` has no help", command.get_name());
            for arg in command.get_arguments().filter(|a| !a.is_hide_set()) {
                assert!(arg.get_help().is_some(), "`{} --{}` has no help", command.get_name(), arg.get_id());
            }
        }
    }
}
