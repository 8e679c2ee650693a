//! Metering: turns finished LLM calls into Prometheus metrics (names are a contract,
//! see the README) and decides which calls are retries.

mod retries;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

pub use retries::RetryDetector;

use crate::{
    llm::LlmCall,
    reassembly::{Drops, Metered},
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub agent: String,
    pub process: String,
    pub container: String,
    pub provider: String,
    pub model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub agent: String,
    pub process: String,
    pub container: String,
    pub provider: String,
    pub model: String,
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub agent: String,
    pub process: String,
    pub container: String,
    pub provider: String,
    pub model: String,
    pub kind: &'static str,
    pub source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasoningLabels {
    pub agent: String,
    pub process: String,
    pub container: String,
    pub provider: String,
    pub model: String,
    pub source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub agent: String,
    pub provider: String,
    pub model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnmeteredLabels {
    pub provider: String,
    pub reason: &'static str,
}

fn latency_buckets() -> Histogram {
    Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0])
}

/// The LLM-call metrics.
#[derive(Clone)]
pub struct LlmMetrics {
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    reasoning: Family<ReasoningLabels, Counter>,
    retries: Family<CallLabels, Counter>,
    duration: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    ttft: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    unmetered: Family<UnmeteredLabels, Counter>,
}

impl LlmMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            tokens: Family::default(),
            reasoning: Family::default(),
            retries: Family::default(),
            duration: Family::new_with_constructor(latency_buckets),
            ttft: Family::new_with_constructor(latency_buckets),
            unmetered: Family::default(),
        };
        registry.register("gauge_llm_requests", "LLM API calls, by HTTP status (\"error\" when no response came).", metrics.requests.clone());
        registry.register("gauge_llm_tokens", "Tokens by kind (input = uncached input, cache_read, cache_write, output incl. reasoning).", metrics.tokens.clone());
        registry.register("gauge_llm_reasoning_tokens", "Reasoning tokens (a subset of output tokens).", metrics.reasoning.clone());
        registry.register("gauge_llm_retries", "Calls that retry an earlier one (SDK retry header, or the same body after a failure).", metrics.retries.clone());
        registry.register("gauge_llm_request_duration_seconds", "From the request's first byte to the response's end.", metrics.duration.clone());
        registry.register("gauge_llm_time_to_first_token_seconds", "From the request to the first content (streams) or first byte.", metrics.ttft.clone());
        registry.register("gauge_llm_unmetered_calls", "Calls whose tokens could not be counted, by reason.", metrics.unmetered.clone());
        metrics
    }

    /// Records one finished call; `retry` says whether it repeats an earlier one.
    pub fn record(&self, metered: &Metered, retry: bool) {
        let call: &LlmCall = &metered.call;
        let process = metered.origin.comm.clone();
        // Until attribution lands, the agent is the process.
        let base = CallLabels {
            agent: process.clone(),
            process,
            container: String::new(),
            provider: call.provider.label().to_owned(),
            model: call.model().to_owned(),
        };
        let status = match call.status {
            Some(s) => s.to_string(),
            // Headers were not decodable: a response may well have come.
            None if call.by_shape => "unknown".to_owned(),
            None => "error".to_owned(),
        };
        self.requests.get_or_create(&request_labels(&base, status)).inc();
        if retry {
            self.retries.get_or_create(&base).inc();
        }
        match &call.usage {
            Some(usage) => {
                let source = call.usage_source.label();
                for (kind, value) in [
                    ("input", usage.input),
                    ("cache_read", usage.cache_read),
                    ("cache_write", usage.cache_write),
                    ("output", usage.output),
                ] {
                    self.tokens.get_or_create(&token_labels(&base, kind, source)).inc_by(value);
                }
                self.reasoning.get_or_create(&reasoning_labels(&base, source)).inc_by(usage.reasoning);
            }
            // An error answer (429, 500...) bills nothing: there is nothing to miss.
            None if call.status.is_some_and(|s| s >= 300) => {}
            None => {
                let reason = if call.incomplete { "incomplete" } else { "no_usage" };
                self.unmetered.get_or_create(&UnmeteredLabels { provider: base.provider.clone(), reason }).inc();
            }
        }
        let latency = LatencyLabels { agent: base.agent.clone(), provider: base.provider.clone(), model: base.model.clone() };
        let seconds = |ns: u64| ns as f64 / 1e9;
        self.duration.get_or_create(&latency).observe(seconds(call.end_ns.saturating_sub(call.start_ns)));
        if let Some(first) = call.first_token_ns {
            self.ttft.get_or_create(&latency).observe(seconds(first.saturating_sub(call.start_ns)));
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
    last: Drops,
}

impl ReassemblyMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let dropped = Family::default();
        let open = Gauge::default();
        registry.register(
            "gauge_http_dropped",
            "Connections or calls reassembly could not fully use: not_http1 (HTTP/2 until supported, other protocols), server_side (the process serves HTTPS), evicted_capacity, evicted_idle, gap (bytes lost).",
            dropped.clone(),
        );
        registry.register("gauge_http_open_connections", "Connections with reassembly state.", open.clone());
        let hpack_desyncs = Counter::default();
        registry.register(
            "gauge_http2_hpack_desyncs",
            "HTTP/2 header blocks not decoded because the HPACK table is unknown (attached mid-connection) or corrupt; their streams' bodies are still read.",
            hpack_desyncs.clone(),
        );
        Self { dropped, hpack_desyncs, open, last: Drops::default() }
    }

    pub fn update(&mut self, drops: Drops, open: usize) {
        let last = std::mem::replace(&mut self.last, drops);
        for (reason, now, before) in [
            ("not_http1", drops.not_http1, last.not_http1),
            ("server_side", drops.server_side, last.server_side),
            ("evicted_capacity", drops.evicted_capacity, last.evicted_capacity),
            ("evicted_idle", drops.evicted_idle, last.evicted_idle),
            ("gap", drops.gaps, last.gaps),
            ("streams_over_limit", drops.streams_over_limit, last.streams_over_limit),
        ] {
            if now > before {
                self.dropped.get_or_create(&ReasonLabels { reason }).inc_by(now - before);
            }
        }
        if drops.hpack_desyncs > last.hpack_desyncs {
            self.hpack_desyncs.inc_by(drops.hpack_desyncs - last.hpack_desyncs);
        }
        self.open.set(open as i64);
    }
}

fn request_labels(b: &CallLabels, status: String) -> RequestLabels {
    RequestLabels {
        agent: b.agent.clone(),
        process: b.process.clone(),
        container: b.container.clone(),
        provider: b.provider.clone(),
        model: b.model.clone(),
        status,
    }
}

fn token_labels(b: &CallLabels, kind: &'static str, source: &'static str) -> TokenLabels {
    TokenLabels {
        agent: b.agent.clone(),
        process: b.process.clone(),
        container: b.container.clone(),
        provider: b.provider.clone(),
        model: b.model.clone(),
        kind,
        source,
    }
}

fn reasoning_labels(b: &CallLabels, source: &'static str) -> ReasoningLabels {
    ReasoningLabels {
        agent: b.agent.clone(),
        process: b.process.clone(),
        container: b.container.clone(),
        provider: b.provider.clone(),
        model: b.model.clone(),
        source,
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

    #[test]
    fn a_call_becomes_exact_counters_with_the_contract_names() {
        let mut registry = Registry::default();
        let metrics = LlmMetrics::register(&mut registry);
        let call = LlmCall {
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
            usage: Some(Usage { input: 5, cache_read: 200, cache_write: 100, output: 33, reasoning: 0 }),
            usage_source: crate::llm::UsageSource::Reported,
            retry_count: Some(1),
            body_hash: 0,
            incomplete: false,
            by_shape: false,
        };
        metrics.record(&Metered { origin: Origin { tgid: 1, comm: "bot".into(), cgroup_id: 0 }, call }, true);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        let labels = "agent=\"bot\",process=\"bot\",container=\"\",provider=\"anthropic\",model=\"claude-sonnet-4-5-20250929\"";
        for line in [
            format!("gauge_llm_requests_total{{{labels},status=\"200\"}} 1"),
            format!("gauge_llm_tokens_total{{{labels},kind=\"cache_read\",source=\"reported\"}} 200"),
            format!("gauge_llm_tokens_total{{{labels},kind=\"output\",source=\"reported\"}} 33"),
            format!("gauge_llm_retries_total{{{labels}}} 1"),
            "gauge_llm_time_to_first_token_seconds_sum{agent=\"bot\",provider=\"anthropic\",model=\"claude-sonnet-4-5-20250929\"} 0.3".to_owned(),
        ] {
            assert!(text.contains(&line), "missing `{line}` in\n{text}");
        }
    }
}
