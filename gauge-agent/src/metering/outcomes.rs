//! Outcomes: what agents achieved, reported by the user's code or scripts
//! (`POST /v1/outcomes`, `gauge-agent outcome`), set against what they spent.
//!
//! `gauge_cost_per_outcome_usd{agent,outcome}` is the agent's LLM cost over the
//! window divided by its outcomes of that name over the same window, so "we spent $X
//! and resolved Y tickets" is one query. Spend and outcomes are kept in per-bucket
//! sums (a sixtieth of the window each), so memory is bounded by agents x buckets.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, atomic::AtomicU64},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::Counter, family::Family, gauge::ConstGauge},
    registry::Registry,
};
use serde::Deserialize;

use super::{cardinality::LabelCaps, prices::Cost};

const BUCKETS: u64 = 60;

/// `[outcomes]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutcomesConfig {
    /// The window of `gauge_cost_per_outcome_usd`, in seconds.
    pub window_secs: u64,
}

impl Default for OutcomesConfig {
    fn default() -> Self {
        Self { window_secs: 86400 }
    }
}

/// One report: `count` outcomes named `outcome` of `agent`, worth `value` in all
/// (in whatever unit the user chooses, e.g. USD of revenue).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeReport {
    pub agent: String,
    pub outcome: String,
    #[serde(default = "one")]
    pub count: u64,
    pub value: Option<f64>,
}

fn one() -> u64 {
    1
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OutcomeError {
    #[error("{field} must be 1 to 128 characters of letters, digits and _ . : / -, got {value:?}")]
    BadName { field: &'static str, value: String },
    #[error("count must be between 1 and 1000000, got {0}")]
    BadCount(u64),
    #[error("value must be a finite number, got {0}")]
    BadValue(f64),
}

impl OutcomeReport {
    pub fn validate(&self) -> Result<(), OutcomeError> {
        for (field, value) in [("agent", &self.agent), ("outcome", &self.outcome)] {
            let ok = (1..=128).contains(&value.len())
                && value.chars().all(|c| c.is_ascii_alphanumeric() || "_.:/-".contains(c));
            if !ok {
                return Err(OutcomeError::BadName { field, value: value.clone() });
            }
        }
        if !(1..=1_000_000).contains(&self.count) {
            return Err(OutcomeError::BadCount(self.count));
        }
        match self.value {
            Some(v) if !v.is_finite() => Err(OutcomeError::BadValue(v)),
            _ => Ok(()),
        }
    }
}

/// Sums per time bucket over the window; pure, times passed in (CLOCK_MONOTONIC ns).
#[derive(Debug)]
pub struct Ledger {
    bucket_ns: u64,
    spend: HashMap<String, VecDeque<(u64, u128)>>,
    outcomes: HashMap<(String, String), VecDeque<(u64, u64)>>,
}

impl Ledger {
    pub fn new(window_ns: u64) -> Self {
        Self { bucket_ns: (window_ns / BUCKETS).max(1), spend: HashMap::new(), outcomes: HashMap::new() }
    }

    pub fn add_cost(&mut self, agent: &str, at_ns: u64, cost: Cost) {
        let bucket = at_ns / self.bucket_ns;
        let series = self.spend.entry(agent.to_owned()).or_default();
        add(series, bucket, cost.pico_usd, |a, b| a.saturating_add(b));
    }

    pub fn add_outcome(&mut self, agent: &str, outcome: &str, at_ns: u64, count: u64) {
        let bucket = at_ns / self.bucket_ns;
        let series = self.outcomes.entry((agent.to_owned(), outcome.to_owned())).or_default();
        add(series, bucket, count, |a, b| a.saturating_add(b));
    }

    /// `(agent, outcome, USD per outcome)` over the window ending at `now_ns`, for
    /// each outcome seen in the window.
    pub fn cost_per_outcome(&mut self, now_ns: u64) -> Vec<(String, String, f64)> {
        let oldest = (now_ns / self.bucket_ns).saturating_sub(BUCKETS - 1);
        self.spend.retain(|_, s| prune(s, oldest));
        self.outcomes.retain(|_, s| prune(s, oldest));
        let mut rows = Vec::new();
        for ((agent, outcome), series) in &self.outcomes {
            let count: u64 = series.iter().map(|(_, c)| c).sum();
            let spent: u128 = self.spend.get(agent).map_or(0, |s| s.iter().map(|(_, p)| p).sum());
            if count > 0 {
                rows.push((agent.clone(), outcome.clone(), spent as f64 / 1e12 / count as f64));
            }
        }
        rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        rows
    }
}

fn add<T: Copy>(series: &mut VecDeque<(u64, T)>, bucket: u64, amount: T, plus: impl Fn(T, T) -> T) {
    match series.back_mut() {
        Some((b, sum)) if *b == bucket => *sum = plus(*sum, amount),
        // Late arrivals (events are time-ordered per CPU, not globally) join the
        // newest bucket rather than reorder the series.
        Some((b, sum)) if *b > bucket => *sum = plus(*sum, amount),
        _ => series.push_back((bucket, amount)),
    }
}

/// Drops buckets older than `oldest`; keeps the series while it has any.
fn prune<T>(series: &mut VecDeque<(u64, T)>, oldest: u64) -> bool {
    while series.front().is_some_and(|(b, _)| *b < oldest) {
        series.pop_front();
    }
    !series.is_empty()
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub agent: String,
    pub outcome: String,
}

/// The outcome stage, shared by the pipeline (spend) and the listener (reports).
#[derive(Clone)]
pub struct Outcomes {
    ledger: Arc<Mutex<Ledger>>,
    caps: LabelCaps,
    total: Family<OutcomeLabels, Counter>,
    value: Family<OutcomeLabels, Counter<f64, AtomicU64>>,
    clock: fn() -> u64,
}

impl std::fmt::Debug for Outcomes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outcomes")
    }
}

impl Outcomes {
    /// `clock` gives CLOCK_MONOTONIC ns, the clock of captured events.
    pub fn register(config: &OutcomesConfig, caps: LabelCaps, clock: fn() -> u64, registry: &mut Registry) -> Self {
        let outcomes = Self {
            ledger: Arc::new(Mutex::new(Ledger::new(config.window_secs.saturating_mul(1_000_000_000)))),
            caps,
            total: Family::default(),
            value: Family::default(),
            clock,
        };
        registry.register("gauge_outcomes", "Outcomes reported for agents (POST /v1/outcomes, gauge-agent outcome).", outcomes.total.clone());
        registry.register("gauge_outcome_value", "Sum of the values reported with outcomes.", outcomes.value.clone());
        registry.register_collector(Box::new(CostPerOutcome(outcomes.clone())));
        outcomes
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // A poisoned lock only means a panic elsewhere; the sums are still whole.
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spend of a call; `agent` is already capped.
    pub fn add_cost(&self, agent: &str, at_ns: u64, cost: Cost) {
        self.ledger().add_cost(agent, at_ns, cost);
    }

    pub fn report(&self, report: &OutcomeReport) -> Result<(), OutcomeError> {
        report.validate()?;
        let labels = OutcomeLabels {
            agent: self.caps.cap("agent", report.agent.clone()),
            outcome: self.caps.cap("outcome", report.outcome.clone()),
        };
        self.ledger().add_outcome(&labels.agent, &labels.outcome, (self.clock)(), report.count);
        self.total.get_or_create(&labels).inc_by(report.count);
        if let Some(value) = report.value {
            self.value.get_or_create(&labels).inc_by(value);
        }
        tracing::info!(agent = %labels.agent, outcome = %labels.outcome, count = report.count, "outcome reported");
        Ok(())
    }
}

struct CostPerOutcome(Outcomes);

impl std::fmt::Debug for CostPerOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CostPerOutcome")
    }
}

impl Collector for CostPerOutcome {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let rows = self.0.ledger().cost_per_outcome((self.0.clock)());
        let mut metric = encoder.encode_descriptor(
            "gauge_cost_per_outcome_usd",
            "The agent's LLM cost over the outcome window ([outcomes] window_secs) divided by its outcomes of this name in that window.",
            None,
            MetricType::Gauge,
        )?;
        for (agent, outcome, usd) in rows {
            let labels = OutcomeLabels { agent, outcome };
            ConstGauge::new(usd).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn usd(micro: u128) -> Cost {
        Cost { pico_usd: micro * 1_000_000 }
    }

    #[test]
    fn cost_per_outcome_divides_the_windows_spend() {
        let mut ledger = Ledger::new(3600 * S);
        ledger.add_cost("bot", 10 * S, usd(3_000_000));
        ledger.add_cost("bot", 20 * S, usd(1_500_000));
        ledger.add_cost("other", 20 * S, usd(9_000_000));
        ledger.add_outcome("bot", "resolved_ticket", 30 * S, 3);
        assert_eq!(ledger.cost_per_outcome(40 * S), vec![("bot".into(), "resolved_ticket".into(), 1.5)]);
    }

    #[test]
    fn spend_and_outcomes_leave_the_window() {
        let mut ledger = Ledger::new(600 * S);
        ledger.add_cost("bot", 0, usd(5_000_000));
        ledger.add_outcome("bot", "done", 0, 1);
        ledger.add_cost("bot", 700 * S, usd(2_000_000));
        ledger.add_outcome("bot", "done", 700 * S, 4);
        assert_eq!(ledger.cost_per_outcome(700 * S), vec![("bot".into(), "done".into(), 0.5)]);
        assert!(ledger.cost_per_outcome(2000 * S).is_empty());
        assert!(ledger.spend.is_empty() && ledger.outcomes.is_empty(), "old buckets are freed");
    }

    #[test]
    fn reports_are_validated() {
        let good = OutcomeReport { agent: "support-bot".into(), outcome: "resolved_ticket".into(), count: 1, value: None };
        assert_eq!(good.validate(), Ok(()));
        let bad_name = OutcomeReport { outcome: "a b".into(), ..good.clone() };
        assert!(matches!(bad_name.validate(), Err(OutcomeError::BadName { field: "outcome", .. })));
        assert_eq!(OutcomeReport { count: 0, ..good.clone() }.validate(), Err(OutcomeError::BadCount(0)));
        assert!(OutcomeReport { value: Some(f64::NAN), ..good }.validate().is_err());
    }

    #[test]
    fn outcomes_export_totals_and_cost_per_outcome() {
        let mut registry = Registry::default();
        let caps = LabelCaps::register(Default::default(), &mut registry);
        let outcomes = Outcomes::register(&OutcomesConfig::default(), caps, || 100 * S, &mut registry);
        outcomes.add_cost("bot", 50 * S, usd(250_000));
        let report = OutcomeReport { agent: "bot".into(), outcome: "resolved_ticket".into(), count: 2, value: Some(40.0) };
        outcomes.report(&report).expect("valid");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "gauge_outcomes_total{agent=\"bot\",outcome=\"resolved_ticket\"} 2",
            "gauge_outcome_value_total{agent=\"bot\",outcome=\"resolved_ticket\"} 40.0",
            "gauge_cost_per_outcome_usd{agent=\"bot\",outcome=\"resolved_ticket\"} 0.125",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
