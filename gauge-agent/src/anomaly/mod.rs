//! Anomalies and forecasts: after metering, each finished call feeds the detectors
//! (`detectors`: spend spike, retry storm, loop, context growth, model escalation)
//! and the per-agent spend model (`forecast`). Findings are logged, counted in
//! `gauge_anomalies_total{agent,kind}`, sent to the webhook, and handed to the policy
//! stage (a policy may name an anomaly kind as its trigger). Forecasts and budget
//! exhaustion times are computed at scrape time.

pub mod config;
pub mod detectors;
pub mod forecast;
pub mod webhook;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::Counter, family::Family, gauge::ConstGauge},
    registry::Registry,
};

use self::{
    config::AnomalyConfig,
    detectors::{Detectors, Finding, Observation},
    forecast::Forecaster,
    webhook::WebhookSender,
};
use crate::{
    metering::prices::{PriceTable, Tokens},
    pipeline::Finished,
};

/// Forecast horizons exported, in minutes.
const HORIZONS: [(&str, u64); 3] = [("1h", 60), ("24h", 1440), ("30d", 43200)];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnomalyLabels {
    agent: String,
    kind: &'static str,
}

/// A budget policy's state for one agent: spent so far in its window, its limit,
/// and the window's length in minutes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetState {
    pub spent: f64,
    pub max: f64,
    pub window_minutes: u64,
}

#[derive(Default)]
struct Shared {
    forecaster: Forecaster,
    budgets: HashMap<(String, String), BudgetState>,
}

pub struct AnomalyStage {
    detectors: Detectors,
    shared: Arc<Mutex<Shared>>,
    findings: Family<AnomalyLabels, Counter>,
    webhook: Option<WebhookSender>,
    session_headers: Vec<String>,
    prices: PriceTable,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A poisoned lock only means a panic elsewhere; the sums are still whole.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl AnomalyStage {
    /// `clock` gives CLOCK_MONOTONIC ns at scrape time.
    pub fn register(config: &AnomalyConfig, prices: PriceTable, clock: fn() -> u64, registry: &mut Registry) -> Self {
        let findings = Family::default();
        registry.register("gauge_anomalies", "Behaviour anomalies found, by agent and kind.", findings.clone());
        let webhook = config.webhook.clone().and_then(|w| match WebhookSender::start(w, registry) {
            Ok(sender) => Some(sender),
            Err(error) => {
                tracing::error!(%error, "cannot start the anomaly webhook thread: findings are logged and counted only");
                None
            }
        });
        let shared = Arc::new(Mutex::new(Shared::default()));
        registry.register_collector(Box::new(ForecastCollector { shared: shared.clone(), clock }));
        Self {
            detectors: Detectors::new(config.clone()),
            shared,
            findings,
            webhook,
            session_headers: config.context_growth.session_headers.clone(),
            prices,
        }
    }

    /// One finished call of `agent` (the capped label); returns its findings.
    pub fn observe(&mut self, done: &Finished, agent: &str) -> Vec<Finding> {
        let call = &done.metered.call;
        let usd = done.cost.map_or(0.0, |c| c.usd());
        lock(&self.shared).forecaster.add(agent, call.end_ns, usd);
        let usage = call.usage.unwrap_or_default();
        let million = Tokens { input: 1_000_000, ..Tokens::default() };
        let observation = Observation {
            agent: agent.to_owned(),
            tgid: done.who.pid,
            at_ns: call.end_ns,
            cost_usd: usd,
            retry: call.retry_count.is_some_and(|n| n > 0),
            status: call.status,
            model: call.model().to_owned(),
            prompt_tokens: usage.input + usage.cache_read + usage.cache_write,
            body_hash: call.body_hash,
            tool_calls: call.request.last_tool_calls,
            session: self.session_headers.iter().find_map(|h| call.request.header(h)).map(str::to_owned),
            input_price: self.prices.cost(call.provider.label(), call.model(), million).map(|c| c.usd()),
        };
        let findings = self.detectors.observe(&observation);
        for f in &findings {
            self.findings.get_or_create(&AnomalyLabels { agent: f.agent.clone(), kind: f.kind.label() }).inc();
            tracing::warn!(
                agent = %f.agent, kind = f.kind.label(), pid = f.tgid, observed = f.observed, threshold = f.threshold,
                detail = %f.detail, "anomaly"
            );
            if let Some(webhook) = &self.webhook {
                webhook.send(f.clone());
            }
        }
        findings
    }

    /// The latest state of a budget policy for an agent, for its exhaustion time.
    pub fn set_budget(&self, agent: &str, policy: &str, state: BudgetState) {
        lock(&self.shared).budgets.insert((agent.to_owned(), policy.to_owned()), state);
    }
}

struct ForecastCollector {
    shared: Arc<Mutex<Shared>>,
    clock: fn() -> u64,
}

impl std::fmt::Debug for ForecastCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForecastCollector")
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForecastLabels {
    agent: String,
    horizon: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    agent: String,
    policy: String,
}

impl Collector for ForecastCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut shared = lock(&self.shared);
        let models = shared.forecaster.models((self.clock)());
        let mut metric = encoder.encode_descriptor(
            "gauge_spend_forecast_usd",
            "Forecast spend over the horizon, from the agent's call-rate and cost-per-call trends (damped).",
            None,
            MetricType::Gauge,
        )?;
        for (agent, model) in &models {
            for (horizon, minutes) in HORIZONS {
                let labels = ForecastLabels { agent: agent.clone(), horizon };
                ConstGauge::new(model.spend(minutes)).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "gauge_budget_exhaustion_seconds",
            "When a budget policy (max_cost_usd) will trip at the forecast spend; absent when not within its window.",
            None,
            MetricType::Gauge,
        )?;
        for ((agent, policy), budget) in &shared.budgets {
            let Some((_, model)) = models.iter().find(|(a, _)| a == agent) else { continue };
            if let Some(minutes) = model.minutes_to(budget.max - budget.spent, budget.window_minutes) {
                let labels = BudgetLabels { agent: agent.clone(), policy: policy.clone() };
                ConstGauge::new(minutes as f64 * 60.0).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
