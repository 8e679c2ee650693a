//! Gauge's performance figures, each measured side by side in one run, as a table.
//! `cargo xtask bench` builds what it needs and runs this; docs/PERFORMANCE.md
//! explains each figure and how to reproduce it.

use anyhow::bail;
use clap::{Parser, ValueEnum};
use gauge_tests::bench::{self, Row, Scale};

#[derive(Parser)]
#[command(name = "gauge-bench", about = "Measure Gauge's costs side by side and print a table")]
struct Cli {
    /// Small counts: proves every measurement runs (the suite uses it); figures are rough.
    #[arg(long)]
    quick: bool,
    /// Fail (exit 1) when a target is missed, not only mark it in the table.
    #[arg(long)]
    check: bool,
    /// Measurements to run (default: all).
    #[arg(value_enum)]
    only: Vec<Measure>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Measure {
    /// Cost per probe hit in monitored processes vs a counting-only probe.
    Probes,
    /// Daemon CPU and memory per 1,000 streamed calls; client CPU with Gauge on vs off.
    Agent,
    /// Replay throughput of the user-space pipeline on one core.
    Pipeline,
    /// tiktoken-rs against Python tiktoken on the same text.
    Tokenizer,
    /// 10,000 open connections from 1,000 monitored processes.
    Scale,
    /// Added latency of a request held by `gate = true`.
    Gate,
}

impl Measure {
    fn title(self) -> &'static str {
        match self {
            Measure::Probes => "1. Overhead on monitored processes",
            Measure::Agent => "2. Agent cost",
            Measure::Pipeline => "3. Pipeline throughput",
            Measure::Tokenizer => "4. Tokenizer estimate path",
            Measure::Scale => "5. Scale",
            Measure::Gate => "6. Gate latency",
        }
    }

    fn run(self, scale: Scale) -> anyhow::Result<Vec<Row>> {
        match self {
            Measure::Probes => bench::probes::run(scale),
            Measure::Agent => bench::agent_cost::run(scale),
            Measure::Pipeline => bench::pipeline::run(scale),
            Measure::Tokenizer => bench::tokenizer::run(scale),
            Measure::Scale => bench::scale::run(scale),
            Measure::Gate => bench::gate::run(scale),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let scale = if cli.quick { Scale::Quick } else { Scale::Full };
    let measures = if cli.only.is_empty() { Measure::value_variants().to_vec() } else { cli.only };
    let mut sections = Vec::new();
    let mut failed = Vec::new();
    for measure in measures {
        eprintln!("==> bench: {}", measure.title());
        let start = std::time::Instant::now();
        match measure.run(scale) {
            Ok(rows) => sections.push((measure.title(), rows)),
            Err(error) => {
                eprintln!("==> bench: {} FAILED: {error:#}", measure.title());
                failed.push(measure.title());
                sections.push((measure.title(), vec![Row::new("could not measure", "-", format!("{error:#}"))]));
            }
        }
        eprintln!("==> bench: {} took {:.0} s", measure.title(), start.elapsed().as_secs_f64());
    }
    println!("{}", bench::table(&sections));
    if !failed.is_empty() {
        bail!("these measurements could not run: {}", failed.join(", "));
    }
    let missed: Vec<String> =
        sections.iter().flat_map(|(_, rows)| rows.iter().filter(|r| r.met == Some(false)).map(|r| r.name.clone())).collect();
    if cli.check && !missed.is_empty() {
        bail!("targets missed: {}", missed.join(", "));
    }
    Ok(())
}
