//! The synchronous pipeline after capture: reassembly -> LLM calls -> metering.
//! Fed one [`CaptureEvent`] at a time by the daemon, or by a replayed recording.

use prometheus_client::registry::Registry;

use crate::{
    metering::{LlmMetrics, ReassemblyMetrics, RetryDetector},
    reassembly::{Limits, Metered, Reassembler},
    source::CaptureEvent,
};

/// How long after a failed call a repeat of its body counts as a retry.
const RETRY_WINDOW_NS: u64 = 120 * 1_000_000_000;
const RETRY_MEMORY: usize = 65536;

pub struct Pipeline {
    reassembler: Reassembler,
    retries: RetryDetector,
    llm: LlmMetrics,
    reassembly: ReassemblyMetrics,
    finished: Vec<Metered>,
}

impl Pipeline {
    pub fn new(limits: Limits, registry: &mut Registry) -> Self {
        Self {
            reassembler: Reassembler::new(limits),
            retries: RetryDetector::new(RETRY_WINDOW_NS, RETRY_MEMORY),
            llm: LlmMetrics::register(registry),
            reassembly: ReassemblyMetrics::register(registry),
            finished: Vec::new(),
        }
    }

    /// Feeds one event; returns the calls it finished (for logs and tests).
    pub fn feed(&mut self, event: &CaptureEvent) -> &[Metered] {
        self.finished.clear();
        self.reassembler.feed(event, &mut self.finished);
        for metered in &self.finished {
            let retry = self.retries.observe(metered);
            self.llm.record(metered, retry);
        }
        self.reassembly.update(self.reassembler.drops(), self.reassembler.open_connections());
        &self.finished
    }
}
