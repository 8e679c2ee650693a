//! One call as an OTLP span with GenAI semantic-convention names.

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};

use crate::{
    llm::{Endpoint, Provider, usage::Usage},
    pipeline::Finished,
};

/// What one call exports: the span's and the metrics' inputs, nothing more.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRecord {
    pub operation: &'static str,
    /// `gen_ai.provider.name`.
    pub provider: &'static str,
    /// Gauge's provider label, as in Prometheus.
    pub gauge_provider: &'static str,
    pub request_model: Option<String>,
    pub response_model: Option<String>,
    /// CLOCK_MONOTONIC ns.
    pub start_ns: u64,
    pub end_ns: u64,
    pub status: Option<u16>,
    /// Set for failed calls.
    pub error_type: Option<String>,
    pub response_id: Option<String>,
    pub usage: Option<Usage>,
    pub usage_source: &'static str,
    pub cost_usd: Option<f64>,
    pub agent: String,
    pub workflow: String,
    pub process: String,
    pub container: String,
    pub stream: bool,
    pub incomplete: bool,
}

/// `gen_ai.operation.name` of an API.
pub fn operation(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Messages | Endpoint::Responses => "chat",
        Endpoint::Embeddings => "embeddings",
        Endpoint::GenerateContent => "generate_content",
    }
}

/// `gen_ai.provider.name`: the convention's well-known value where there is one,
/// else Gauge's own label.
pub fn provider_name(provider: Provider) -> &'static str {
    match provider {
        Provider::OpenAi => "openai",
        Provider::AzureOpenAi => "azure.ai.openai",
        Provider::Anthropic => "anthropic",
        Provider::Gemini => "gcp.gemini",
        Provider::Mistral => "mistral_ai",
        Provider::Groq => "groq",
        Provider::DeepSeek => "deepseek",
        other => other.label(),
    }
}

impl CallRecord {
    pub fn from_finished(done: &Finished) -> Self {
        let (c, who) = (&done.metered.call, &done.who);
        let failed = c.status.is_some_and(|s| s >= 400) || c.error_type.is_some();
        let error_type = failed.then(|| c.error_type.clone().or_else(|| c.status.map(|s| s.to_string())).unwrap_or_else(|| "_OTHER".into()));
        Self {
            operation: operation(c.endpoint),
            provider: provider_name(c.provider),
            gauge_provider: c.provider.label(),
            request_model: c.request_model.clone(),
            response_model: c.response_model.clone(),
            start_ns: c.start_ns,
            end_ns: c.end_ns.max(c.start_ns),
            status: c.status,
            error_type,
            response_id: c.request_id.clone(),
            usage: c.usage,
            usage_source: c.usage_source.label(),
            cost_usd: done.cost.map(|cost| cost.usd()),
            agent: who.agent.clone(),
            workflow: who.workflow.clone(),
            process: who.process.clone(),
            container: who.container.clone(),
            stream: c.stream,
            incomplete: c.incomplete,
        }
    }

    /// The model the span is named by: asked for, else answered.
    fn model(&self) -> &str {
        self.request_model.as_deref().or(self.response_model.as_deref()).unwrap_or("unknown")
    }

    /// `gen_ai.usage.input_tokens`: every prompt token, cached or not.
    pub fn input_tokens(&self) -> Option<u64> {
        self.usage.map(|u| u.input + u.cache_read + u.cache_write)
    }

    pub fn output_tokens(&self) -> Option<u64> {
        self.usage.map(|u| u.output)
    }

    /// Attributes metrics are split by (bounded: no ids, no times).
    pub(super) fn metric_attributes(&self) -> Vec<(&'static str, String)> {
        let mut attrs = vec![("gen_ai.operation.name", self.operation.to_owned()), ("gen_ai.provider.name", self.provider.to_owned())];
        if let Some(m) = &self.request_model {
            attrs.push(("gen_ai.request.model", m.clone()));
        }
        if let Some(m) = &self.response_model {
            attrs.push(("gen_ai.response.model", m.clone()));
        }
        attrs.push(("gauge.agent", self.agent.clone()));
        attrs
    }
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..KeyValue::default() }
}
pub(super) fn s(key: &str, value: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.into()))
}
fn int(key: &str, value: u64) -> KeyValue {
    kv(key, any_value::Value::IntValue(i64::try_from(value).unwrap_or(i64::MAX)))
}

/// CLOCK_MONOTONIC ns to Unix ns, given REALTIME - MONOTONIC.
pub fn unix_ns(monotonic_ns: u64, offset_ns: i128) -> u64 {
    u64::try_from((i128::from(monotonic_ns) + offset_ns).max(0)).unwrap_or(u64::MAX)
}

/// The span of one call (kind CLIENT), named `"{operation} {model}"`.
pub fn span(r: &CallRecord, trace_id: [u8; 16], span_id: [u8; 8], offset_ns: i128) -> Span {
    let mut attributes = vec![
        s("gen_ai.operation.name", r.operation),
        s("gen_ai.provider.name", r.provider),
    ];
    if let Some(m) = &r.request_model {
        attributes.push(s("gen_ai.request.model", m));
    }
    if let Some(m) = &r.response_model {
        attributes.push(s("gen_ai.response.model", m));
    }
    if let (Some(input), Some(output)) = (r.input_tokens(), r.output_tokens()) {
        attributes.push(int("gen_ai.usage.input_tokens", input));
        attributes.push(int("gen_ai.usage.output_tokens", output));
    }
    if let Some(id) = &r.response_id {
        attributes.push(s("gen_ai.response.id", id));
    }
    if let Some(status) = r.status {
        attributes.push(int("http.response.status_code", u64::from(status)));
    }
    if let Some(e) = &r.error_type {
        attributes.push(s("error.type", e));
    }
    attributes.push(s("gauge.provider", r.gauge_provider));
    attributes.push(s("gauge.agent", &r.agent));
    attributes.push(s("gauge.process", &r.process));
    if !r.workflow.is_empty() {
        attributes.push(s("gauge.workflow", &r.workflow));
    }
    if !r.container.is_empty() {
        attributes.push(s("gauge.container", &r.container));
    }
    if let Some(usd) = r.cost_usd {
        attributes.push(kv("gauge.cost_usd", any_value::Value::DoubleValue(usd)));
    }
    attributes.push(s("gauge.usage_source", r.usage_source));
    if let Some(u) = r.usage {
        attributes.push(int("gauge.usage.cache_read_tokens", u.cache_read));
        attributes.push(int("gauge.usage.cache_write_tokens", u.cache_write));
        attributes.push(int("gauge.usage.reasoning_tokens", u.reasoning));
    }
    attributes.push(kv("gauge.stream", any_value::Value::BoolValue(r.stream)));
    if r.incomplete {
        attributes.push(kv("gauge.incomplete", any_value::Value::BoolValue(true)));
    }
    let status = r.error_type.as_ref().map(|e| Status { message: e.clone(), code: StatusCode::Error as i32 });
    Span {
        trace_id: trace_id.to_vec(),
        span_id: span_id.to_vec(),
        name: format!("{} {}", r.operation, r.model()),
        kind: SpanKind::Client as i32,
        start_time_unix_nano: unix_ns(r.start_ns, offset_ns),
        end_time_unix_nano: unix_ns(r.end_ns, offset_ns),
        attributes,
        status,
        ..Span::default()
    }
}

/// The resource every export names: `service.name`, `service.version`, `host.name`.
pub fn resource(service_name: &str, host: &str) -> Resource {
    Resource {
        attributes: vec![s("service.name", service_name), s("service.version", env!("CARGO_PKG_VERSION")), s("host.name", host)],
        ..Resource::default()
    }
}

pub(super) fn scope() -> InstrumentationScope {
    InstrumentationScope { name: "gauge-agent".into(), version: env!("CARGO_PKG_VERSION").into(), ..InstrumentationScope::default() }
}

pub fn traces_request(resource: &Resource, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans { scope: Some(scope()), spans, ..ScopeSpans::default() }],
            ..ResourceSpans::default()
        }],
    }
}

#[cfg(test)]
pub(super) mod tests {
    use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};

    use super::*;

    pub(crate) fn record() -> CallRecord {
        CallRecord {
            operation: "chat",
            provider: "anthropic",
            gauge_provider: "anthropic",
            request_model: Some("claude-sonnet-4-5".into()),
            response_model: Some("claude-sonnet-4-5-20250929".into()),
            start_ns: 1_000_000_000,
            end_ns: 1_500_000_000,
            status: Some(200),
            error_type: None,
            response_id: Some("req_1".into()),
            usage: Some(Usage { input: 9, cache_read: 4, cache_write: 3, output: 11, reasoning: 0 }),
            usage_source: "reported",
            cost_usd: Some(0.25),
            agent: "bot".into(),
            workflow: "triage".into(),
            process: "python3".into(),
            container: String::new(),
            stream: false,
            incomplete: false,
        }
    }

    fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a any_value::Value> {
        span.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()?.value.as_ref())
    }

    #[test]
    fn a_call_becomes_a_genai_span() {
        let span = span(&record(), [1; 16], [2; 8], 10_000_000_000);
        assert_eq!(span.name, "chat claude-sonnet-4-5");
        assert_eq!(span.kind, SpanKind::Client as i32);
        assert_eq!((span.start_time_unix_nano, span.end_time_unix_nano), (11_000_000_000, 11_500_000_000));
        assert_eq!(attr(&span, "gen_ai.usage.input_tokens"), Some(&any_value::Value::IntValue(16)));
        assert_eq!(attr(&span, "gen_ai.usage.output_tokens"), Some(&any_value::Value::IntValue(11)));
        assert_eq!(attr(&span, "gen_ai.provider.name"), Some(&any_value::Value::StringValue("anthropic".into())));
        assert_eq!(attr(&span, "gen_ai.response.id"), Some(&any_value::Value::StringValue("req_1".into())));
        assert_eq!(attr(&span, "http.response.status_code"), Some(&any_value::Value::IntValue(200)));
        assert_eq!(attr(&span, "gauge.workflow"), Some(&any_value::Value::StringValue("triage".into())));
        assert_eq!(attr(&span, "gauge.cost_usd"), Some(&any_value::Value::DoubleValue(0.25)));
        assert!(attr(&span, "gauge.container").is_none() && attr(&span, "error.type").is_none() && span.status.is_none());
    }

    #[test]
    fn a_failed_call_has_error_status_and_type() {
        let r = CallRecord { status: Some(429), error_type: Some("http_429".into()), usage: None, cost_usd: None, ..record() };
        let span = span(&r, [1; 16], [2; 8], 0);
        assert_eq!(span.status.as_ref().map(|s| s.code), Some(StatusCode::Error as i32));
        assert_eq!(attr(&span, "error.type"), Some(&any_value::Value::StringValue("http_429".into())));
        assert!(attr(&span, "gen_ai.usage.input_tokens").is_none());
    }

}
