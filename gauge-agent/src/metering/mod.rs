//! Metering: turns finished LLM calls into Prometheus metrics (names are a contract,
//! see the README) and decides which calls are retries.

pub mod cardinality;
pub mod outcomes;
pub mod prices;
mod retries;

use std::{collections::HashSet, sync::atomic::AtomicU64};

use prometheus_client::{
    encoding::{EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

pub use retries::RetryDetector;

use self::{
    cardinality::LabelCaps,
    prices::{Cost, PriceTable, Tokens},
};
use crate::{
    attribution::Attribution,
    llm::LlmCall,
    reassembly::{Drops, Metered},
};

/// The labels every per-call metric carries. `customer` is left out entirely when
/// the customer label is off.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct CallLabels {
    pub agent: String,
    pub process: String,
    pub container: String,
    pub workflow: String,
    pub customer: Option<String>,
    pub provider: String,
    pub model: String,
}

impl EncodeLabelSet for CallLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        let mut pairs = vec![
            ("agent", self.agent.as_str()),
            ("process", &self.process),
            ("container", &self.container),
            ("workflow", &self.workflow),
        ];
        if let Some(customer) = &self.customer {
            pairs.push(("customer", customer));
        }
        pairs.extend([("provider", self.provider.as_str()), ("model", &self.model)]);
        pairs.encode(encoder)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub call: CallLabels,
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    #[prometheus(flatten)]
    pub call: CallLabels,
    pub kind: &'static str,
    pub source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    #[prometheus(flatten)]
    pub call: CallLabels,
    pub source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub agent: String,
    pub workflow: String,
    pub provider: String,
    pub model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnmeteredLabels {
    pub provider: String,
    pub reason: &'static str,
}

/// `gauge_container_info`: joins a `container` label to its runtime, id and pod.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ContainerInfoLabels {
    pub container: String,
    pub runtime: &'static str,
    pub id: String,
    pub pod: String,
    pub namespace: String,
    pub pod_uid: String,
    pub qos: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

fn latency_buckets() -> Histogram {
    Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0])
}

/// The LLM-call metrics.
pub struct LlmMetrics {
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    reasoning: Family<SourceLabels, Counter>,
    cost: Family<SourceLabels, Counter<f64, AtomicU64>>,
    unpriced: Family<ModelLabels, Counter>,
    retries: Family<CallLabels, Counter>,
    duration: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    ttft: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    unmetered: Family<UnmeteredLabels, Counter>,
    containers: Family<ContainerInfoLabels, Gauge>,
    /// Container labels already described in `containers`.
    described: HashSet<String>,
    prices: PriceTable,
    caps: LabelCaps,
    /// Unpriced models already logged: each is logged once.
    logged_unpriced: HashSet<String>,
}

impl LlmMetrics {
    pub fn register(registry: &mut Registry, prices: PriceTable, caps: LabelCaps) -> Self {
        let metrics = Self {
            requests: Family::default(),
            tokens: Family::default(),
            reasoning: Family::default(),
            cost: Family::default(),
            unpriced: Family::default(),
            retries: Family::default(),
            duration: Family::new_with_constructor(latency_buckets),
            ttft: Family::new_with_constructor(latency_buckets),
            unmetered: Family::default(),
            containers: Family::default(),
            described: HashSet::new(),
            prices,
            caps,
            logged_unpriced: HashSet::new(),
        };
        registry.register("gauge_llm_requests", "LLM API calls, by HTTP status (\"error\" when no response came).", metrics.requests.clone());
        registry.register("gauge_llm_tokens", "Tokens by kind (input = uncached input, cache_read, cache_write, output incl. reasoning).", metrics.tokens.clone());
        registry.register("gauge_llm_reasoning_tokens", "Reasoning tokens (a subset of output tokens).", metrics.reasoning.clone());
        registry.register("gauge_llm_cost_usd", "What the calls cost at list price (embedded table and [[prices]]), by where their token counts came from.", metrics.cost.clone());
        registry.register("gauge_llm_unpriced_calls", "Calls of models no price entry covers (add a [[prices]] entry).", metrics.unpriced.clone());
        registry.register("gauge_llm_retries", "Calls that retry an earlier one (SDK retry header, or the same body after a failure).", metrics.retries.clone());
        registry.register("gauge_llm_request_duration_seconds", "From the request's first byte to the response's end.", metrics.duration.clone());
        registry.register("gauge_llm_time_to_first_token_seconds", "From the request to the first content (streams) or first byte.", metrics.ttft.clone());
        registry.register("gauge_llm_unmetered_calls", "Calls whose tokens could not be counted, by reason.", metrics.unmetered.clone());
        registry.register(
            "gauge_container_info",
            "1 for each container that made LLM calls: its runtime, full id and Kubernetes pod (joins on `container`).",
            metrics.containers.clone(),
        );
        metrics
    }

    /// The capped labels of a call.
    pub fn labels(&self, call: &LlmCall, who: &Attribution) -> CallLabels {
        let caps = &self.caps;
        CallLabels {
            agent: caps.cap("agent", who.agent.clone()),
            process: caps.cap("process", who.process.clone()),
            container: caps.cap("container", who.container.clone()),
            workflow: caps.cap("workflow", who.workflow.clone()),
            customer: who.customer.clone().map(|c| caps.cap("customer", c)),
            provider: call.provider.label().to_owned(),
            model: caps.cap("model", call.model().to_owned()),
        }
    }

    /// Describes the call's container once, unless its label was capped.
    pub fn describe_container(&mut self, base: &CallLabels, who: &Attribution) {
        let Some(c) = &who.container_info else { return };
        if base.container == cardinality::OTHER || !self.described.insert(base.container.clone()) {
            return;
        }
        let pod = c.pod.as_ref();
        let text = |f: Option<&String>| f.cloned().unwrap_or_default();
        self.containers
            .get_or_create(&ContainerInfoLabels {
                container: base.container.clone(),
                runtime: c.runtime,
                id: c.id.clone(),
                pod: text(pod.and_then(|p| p.name.as_ref())),
                namespace: text(pod.and_then(|p| p.namespace.as_ref())),
                pod_uid: pod.map(|p| p.uid.clone()).unwrap_or_default(),
                qos: pod.map_or("", |p| p.qos),
            })
            .set(1);
    }

    /// Records one finished call; `retry` says whether it repeats an earlier one.
    /// Returns its cost, when its model is priced and its usage known.
    pub fn record(&mut self, metered: &Metered, base: &CallLabels, retry: bool) -> Option<Cost> {
        let call: &LlmCall = &metered.call;
        let status = match call.status {
            Some(s) => s.to_string(),
            // Headers were not decodable: a response may well have come.
            None if call.by_shape => "unknown".to_owned(),
            None => "error".to_owned(),
        };
        self.requests.get_or_create(&RequestLabels { call: base.clone(), status }).inc();
        if retry {
            self.retries.get_or_create(base).inc();
        }
        let mut cost = None;
        match &call.usage {
            Some(usage) => {
                let source = call.usage_source.label();
                for (kind, value) in [
                    ("input", usage.input),
                    ("cache_read", usage.cache_read),
                    ("cache_write", usage.cache_write),
                    ("output", usage.output),
                ] {
                    self.tokens.get_or_create(&TokenLabels { call: base.clone(), kind, source }).inc_by(value);
                }
                let labels = SourceLabels { call: base.clone(), source };
                self.reasoning.get_or_create(&labels).inc_by(usage.reasoning);
                let tokens = Tokens { input: usage.input, cache_read: usage.cache_read, cache_write: usage.cache_write, output: usage.output };
                // Price by the full model name, not the capped label.
                cost = self.prices.cost(&base.provider, call.model(), tokens);
                match cost {
                    Some(cost) => {
                        self.cost.get_or_create(&labels).inc_by(cost.usd());
                    }
                    None => self.unpriced(call.model(), &base.model),
                }
            }
            // An error answer (429, 500...) bills nothing: there is nothing to miss.
            None if call.status.is_some_and(|s| s >= 300) => {}
            None => {
                let reason = if call.incomplete { "incomplete" } else { "no_usage" };
                self.unmetered.get_or_create(&UnmeteredLabels { provider: base.provider.clone(), reason }).inc();
            }
        }
        let latency = LatencyLabels {
            agent: base.agent.clone(),
            workflow: base.workflow.clone(),
            provider: base.provider.clone(),
            model: base.model.clone(),
        };
        let seconds = |ns: u64| ns as f64 / 1e9;
        self.duration.get_or_create(&latency).observe(seconds(call.end_ns.saturating_sub(call.start_ns)));
        if let Some(first) = call.first_token_ns {
            self.ttft.get_or_create(&latency).observe(seconds(first.saturating_sub(call.start_ns)));
        }
        cost
    }

    fn unpriced(&mut self, model: &str, label: &str) {
        self.unpriced.get_or_create(&ModelLabels { model: label.to_owned() }).inc();
        // Bounded like the label: past the cap, models are not remembered (nor logged).
        if self.logged_unpriced.len() < 1000 && self.logged_unpriced.insert(model.to_owned()) {
            tracing::warn!(model, "no price for this model: its calls are counted in gauge_llm_unpriced_calls_total; add a [[prices]] entry to price them");
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// What reassembly dropped, exported as counters from its running totals.
pub struct ReassemblyMetrics {
    dropped: Family<ReasonLabels, Counter>,
    hpack_desyncs: Counter,
    open: Gauge,
    buffered: Gauge,
    last: Drops,
}

impl ReassemblyMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let dropped = Family::default();
        let open = Gauge::default();
        registry.register(
            "gauge_http_dropped",
            "Connections or calls reassembly could not fully use: not_http1 (not HTTP), server_side (the process serves HTTPS), evicted_capacity (http.max_connections), evicted_idle, evicted_memory (http.max_buffered_bytes), gap (bytes lost), streams_over_limit, broken_response (an HTTP/1 response not parsed after its request was: its call ends incomplete, the connection is read on from its next response), unanswered_response (a response, HTTP/1 or an HTTP/2 stream's, with no request seen for it within a second)",
            dropped.clone(),
        );
        registry.register("gauge_http_open_connections", "Connections with reassembly state.", open.clone());
        let buffered = Gauge::default();
        registry.register(
            "gauge_http_buffered_bytes",
            "Bytes all connections hold (buffers, kept bodies, decoder state); kept under http.max_buffered_bytes.",
            buffered.clone(),
        );
        let hpack_desyncs = Counter::default();
        registry.register(
            "gauge_http2_hpack_desyncs",
            "HTTP/2 header blocks not decoded because the HPACK table is unknown (attached mid-connection) or corrupt; their streams' bodies are still read.",
            hpack_desyncs.clone(),
        );
        Self { dropped, hpack_desyncs, open, buffered, last: Drops::default() }
    }

    pub fn update(&mut self, drops: Drops, open: usize, buffered: usize) {
        // Called for every capture event; drops are rare.
        let last = std::mem::replace(&mut self.last, drops);
        if drops != last {
            self.count_drops(drops, last);
        }
        self.open.set(open as i64);
        self.buffered.set(i64::try_from(buffered).unwrap_or(i64::MAX));
    }

    fn count_drops(&mut self, drops: Drops, last: Drops) {
        for (reason, now, before) in [
            ("not_http1", drops.not_http1, last.not_http1),
            ("server_side", drops.server_side, last.server_side),
            ("evicted_capacity", drops.evicted_capacity, last.evicted_capacity),
            ("evicted_idle", drops.evicted_idle, last.evicted_idle),
            ("evicted_memory", drops.evicted_memory, last.evicted_memory),
            ("gap", drops.gaps, last.gaps),
            ("streams_over_limit", drops.streams_over_limit, last.streams_over_limit),
            ("broken_response", drops.broken_responses, last.broken_responses),
            ("unanswered_response", drops.unanswered_responses, last.unanswered_responses),
        ] {
            if now > before {
                self.dropped.get_or_create(&ReasonLabels { reason }).inc_by(now - before);
            }
        }
        if drops.hpack_desyncs > last.hpack_desyncs {
            self.hpack_desyncs.inc_by(drops.hpack_desyncs - last.hpack_desyncs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        llm::{Endpoint, Provider, Usage},
        reassembly::Origin,
    };
    use prometheus_client::encoding::text::encode;

    fn test_prices() -> PriceTable {
        #[derive(serde::Deserialize)]
        struct File {
            prices: Vec<prices::PriceEntry>,
        }
        // Odd rates, so that any rounding shows in the micro-dollars.
        let file: File = toml::from_str(
            "[[prices]]\nmodel = \"claude-sonnet-4-5\"\ninput = 2.5\ncache_read = 0.125\ncache_write = 3.75\noutput = 12.5\n",
        )
        .expect("test prices parse");
        PriceTable::with_overrides(file.prices).expect("table")
    }

    fn call(usage: Usage) -> LlmCall {
        LlmCall {
            provider: Provider::Anthropic,
            endpoint: Endpoint::Messages,
            request_model: Some("claude-sonnet-4-5".into()),
            response_model: Some("claude-sonnet-4-5-20250929".into()),
            status: Some(200),
            stream: true,
            start_ns: 1_000_000_000,
            first_byte_ns: Some(1_200_000_000),
            first_token_ns: Some(1_300_000_000),
            end_ns: 3_000_000_000,
            error_type: None,
            request_id: None,
            usage: Some(usage),
            usage_source: crate::llm::UsageSource::Reported,
            retry_count: Some(1),
            body_hash: 0,
            incomplete: false,
            by_shape: false,
            request: Default::default(),
            exchange: Default::default(),
        }
    }

    fn who() -> Attribution {
        Attribution {
            agent: "support-bot".into(),
            process: "python3.11".into(),
            container: "web".into(),
            workflow: "triage".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_call_becomes_exact_counters_with_the_contract_names() {
        let mut registry = Registry::default();
        let caps = LabelCaps::register(Default::default(), &mut registry);
        let mut metrics = LlmMetrics::register(&mut registry, test_prices(), caps);
        let usage = Usage { input: 1_234_567, cache_read: 200, cache_write: 100, output: 33, reasoning: 0 };
        let metered = Metered { origin: Origin { tgid: 1, comm: "bot".into(), cgroup_id: 0, connection: 1 }, call: call(usage) };
        let labels = metrics.labels(&metered.call, &who());
        let cost = metrics.record(&metered, &labels, true).expect("priced");
        // 1234567 x 2.5 + 200 x 0.125 + 100 x 3.75 + 33 x 12.5 micro-dollars.
        assert_eq!(cost.pico_usd, 3_087_230_000_000);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        let labels = "agent=\"support-bot\",process=\"python3.11\",container=\"web\",workflow=\"triage\",provider=\"anthropic\",model=\"claude-sonnet-4-5-20250929\"";
        for line in [
            format!("gauge_llm_requests_total{{{labels},status=\"200\"}} 1"),
            format!("gauge_llm_tokens_total{{{labels},kind=\"cache_read\",source=\"reported\"}} 200"),
            format!("gauge_llm_tokens_total{{{labels},kind=\"output\",source=\"reported\"}} 33"),
            format!("gauge_llm_cost_usd_total{{{labels},source=\"reported\"}} 3.08723"),
            format!("gauge_llm_retries_total{{{labels}}} 1"),
            "gauge_llm_time_to_first_token_seconds_sum{agent=\"support-bot\",workflow=\"triage\",provider=\"anthropic\",model=\"claude-sonnet-4-5-20250929\"} 0.3".to_owned(),
        ] {
            assert!(text.contains(&line), "missing `{line}` in\n{text}");
        }
    }

    #[test]
    fn each_token_kind_is_priced_at_its_own_rate() {
        let mut registry = Registry::default();
        let caps = LabelCaps::register(Default::default(), &mut registry);
        let mut metrics = LlmMetrics::register(&mut registry, test_prices(), caps);
        for (usage, micro_usd) in [
            (Usage { input: 1, ..Default::default() }, 2.5),
            (Usage { cache_read: 1, ..Default::default() }, 0.125),
            (Usage { cache_write: 1, ..Default::default() }, 3.75),
            (Usage { output: 1, ..Default::default() }, 12.5),
            // Reasoning is part of output: not billed twice.
            (Usage { output: 2, reasoning: 2, ..Default::default() }, 25.0),
        ] {
            let metered = Metered { origin: Origin { tgid: 1, comm: "bot".into(), cgroup_id: 0, connection: 1 }, call: call(usage) };
            let labels = metrics.labels(&metered.call, &who());
            let cost = metrics.record(&metered, &labels, false).expect("priced");
            assert_eq!(cost.pico_usd as f64 / 1e6, micro_usd, "{usage:?}");
        }
    }

    #[test]
    fn customer_label_appears_only_when_enabled_and_unpriced_models_are_counted() {
        let mut registry = Registry::default();
        let caps = LabelCaps::register(Default::default(), &mut registry);
        let mut metrics = LlmMetrics::register(&mut registry, test_prices(), caps);
        let mut unpriced = call(Usage { input: 10, ..Default::default() });
        unpriced.response_model = Some("house-model-7b".into());
        let metered = Metered { origin: Origin { tgid: 1, comm: "bot".into(), cgroup_id: 0, connection: 1 }, call: unpriced };
        let who = Attribution { customer: Some("acme".into()), ..who() };
        let labels = metrics.labels(&metered.call, &who);
        assert_eq!(metrics.record(&metered, &labels, false), None);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        assert!(text.contains("gauge_llm_unpriced_calls_total{model=\"house-model-7b\"} 1"), "{text}");
        assert!(text.contains("workflow=\"triage\",customer=\"acme\",provider="), "{text}");
        assert!(!text.contains("gauge_llm_cost_usd_total{"), "{text}");
    }
}
