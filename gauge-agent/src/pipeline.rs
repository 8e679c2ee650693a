//! The synchronous pipeline after capture: reassembly -> LLM calls -> attribution ->
//! metering (cost, outcomes). Fed one [`CaptureEvent`] at a time by the daemon, or
//! by a replayed recording.

use prometheus_client::registry::Registry;

use crate::{
    attribution::{Attribution, Attributor, process::ProcessSource},
    config::Config,
    metering::{
        LlmMetrics, ReassemblyMetrics, RetryDetector,
        cardinality::LabelCaps,
        outcomes::Outcomes,
        prices::{Cost, PriceError, PriceTable},
    },
    reassembly::{Metered, Reassembler},
    source::CaptureEvent,
};

/// How long after a failed call a repeat of its body counts as a retry.
const RETRY_WINDOW_NS: u64 = 120 * 1_000_000_000;
const RETRY_MEMORY: usize = 65536;

/// A call the pipeline finished, with whom it was for and what it cost.
#[derive(Debug, Clone)]
pub struct Finished {
    pub metered: Metered,
    pub who: Attribution,
    pub cost: Option<Cost>,
}

pub struct Pipeline {
    reassembler: Reassembler,
    attributor: Attributor,
    retries: RetryDetector,
    llm: LlmMetrics,
    reassembly: ReassemblyMetrics,
    outcomes: Outcomes,
    metered: Vec<Metered>,
    finished: Vec<Finished>,
}

impl Pipeline {
    /// `processes` tells who a pid is (`/proc` live; nothing on replay); `clock`
    /// gives CLOCK_MONOTONIC ns for the outcome window at scrape time.
    pub fn new(
        config: &Config,
        processes: Box<dyn ProcessSource>,
        clock: fn() -> u64,
        registry: &mut Registry,
    ) -> Result<Self, PriceError> {
        let caps = LabelCaps::register(config.labels.clone(), registry);
        let prices = PriceTable::with_overrides(config.prices.clone())?;
        Ok(Self {
            reassembler: Reassembler::new(config.reassembly_limits()),
            attributor: Attributor::new(config.attribution.clone(), config.agents.clone(), processes),
            retries: RetryDetector::new(RETRY_WINDOW_NS, RETRY_MEMORY),
            llm: LlmMetrics::register(registry, prices, caps.clone()),
            reassembly: ReassemblyMetrics::register(registry),
            outcomes: Outcomes::register(&config.outcomes, caps, clock, registry),
            metered: Vec::new(),
            finished: Vec::new(),
        })
    }

    /// Where outcome reports go (the listener's `POST /v1/outcomes`).
    pub fn outcomes(&self) -> Outcomes {
        self.outcomes.clone()
    }

    /// Feeds one event; returns the calls it finished (for logs and tests).
    pub fn feed(&mut self, event: &CaptureEvent) -> &[Finished] {
        self.attributor.observe(event);
        self.metered.clear();
        self.finished.clear();
        self.reassembler.feed(event, &mut self.metered);
        for metered in self.metered.drain(..) {
            let who = self.attributor.attribute(&metered);
            let labels = self.llm.labels(&metered.call, &who);
            self.llm.describe_container(&labels, &who);
            let retry = self.retries.observe(&metered);
            let cost = self.llm.record(&metered, &labels, retry);
            if let Some(cost) = cost {
                self.outcomes.add_cost(&labels.agent, metered.call.end_ns, cost);
            }
            self.finished.push(Finished { metered, who, cost });
        }
        self.reassembly.update(self.reassembler.drops(), self.reassembler.open_connections());
        &self.finished
    }
}
