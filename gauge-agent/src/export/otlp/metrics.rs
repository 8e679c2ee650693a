//! GenAI client metrics of one export interval (delta temporality), bounded in series.

use std::collections::HashMap;

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    metrics::v1::{
        AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
        metric, number_data_point,
    },
    resource::v1::Resource,
};

use super::spans::{CallRecord, s, scope};

/// Distinct attribute sets per metric per interval; beyond, points are dropped and
/// counted (`reason="cardinality"`), so a process inventing models cannot grow memory.
const MAX_SERIES: usize = 2000;

/// GenAI semantic-convention bucket boundaries.
const TOKEN_BOUNDS: [f64; 14] =
    [1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0];
const DURATION_BOUNDS: [f64; 14] = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];

type Attrs = Vec<(&'static str, String)>;

#[derive(Debug, Clone)]
struct Hist {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    buckets: Vec<u64>,
}

impl Hist {
    fn new(bounds: &[f64]) -> Self {
        Self { count: 0, sum: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY, buckets: vec![0; bounds.len() + 1] }
    }

    fn record(&mut self, bounds: &[f64], value: f64) {
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        // Buckets are (previous, bound]: the first bound not below the value.
        let i = bounds.iter().position(|b| value <= *b).unwrap_or(bounds.len());
        if let Some(b) = self.buckets.get_mut(i) {
            *b += 1;
        }
    }
}

/// Measurements of one interval (delta temporality), bounded in series.
#[derive(Debug)]
pub struct Aggregate {
    start_unix_ns: u64,
    tokens: HashMap<Attrs, Hist>,
    durations: HashMap<Attrs, Hist>,
    cost: HashMap<Attrs, f64>,
    /// Points not kept for want of room (MAX_SERIES).
    pub over_limit: u64,
}

impl Aggregate {
    pub fn new(start_unix_ns: u64) -> Self {
        Self { start_unix_ns, tokens: HashMap::new(), durations: HashMap::new(), cost: HashMap::new(), over_limit: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty() && self.durations.is_empty() && self.cost.is_empty()
    }

    pub fn add(&mut self, r: &CallRecord) {
        let base = r.metric_attributes();
        if let (Some(input), Some(output)) = (r.input_tokens(), r.output_tokens()) {
            for (kind, n) in [("input", input), ("output", output)] {
                let mut attrs = base.clone();
                attrs.push(("gen_ai.token.type", kind.into()));
                match room(&mut self.tokens, attrs, || Hist::new(&TOKEN_BOUNDS)) {
                    Some(h) => h.record(&TOKEN_BOUNDS, n as f64),
                    None => self.over_limit += 1,
                }
            }
        }
        let mut attrs = base.clone();
        if let Some(e) = &r.error_type {
            attrs.push(("error.type", e.clone()));
        }
        let seconds = r.end_ns.saturating_sub(r.start_ns) as f64 / 1e9;
        match room(&mut self.durations, attrs, || Hist::new(&DURATION_BOUNDS)) {
            Some(h) => h.record(&DURATION_BOUNDS, seconds),
            None => self.over_limit += 1,
        }
        if let Some(usd) = r.cost_usd {
            match room(&mut self.cost, base, || 0.0) {
                Some(total) => *total += usd,
                None => self.over_limit += 1,
            }
        }
    }

    /// Data points in this interval.
    pub fn points(&self) -> usize {
        self.tokens.len() + self.durations.len() + self.cost.len()
    }

    /// The OTLP request for this interval, ending at `now_unix_ns`.
    pub fn request(&self, resource: &Resource, now_unix_ns: u64) -> ExportMetricsServiceRequest {
        let attributes = |attrs: &Attrs| attrs.iter().map(|(k, v)| s(k, v)).collect::<Vec<_>>();
        let histogram = |series: &HashMap<Attrs, Hist>, bounds: &[f64]| {
            let mut points: Vec<HistogramDataPoint> = series
                .iter()
                .map(|(attrs, h)| HistogramDataPoint {
                    attributes: attributes(attrs),
                    start_time_unix_nano: self.start_unix_ns,
                    time_unix_nano: now_unix_ns,
                    count: h.count,
                    sum: Some(h.sum),
                    bucket_counts: h.buckets.clone(),
                    explicit_bounds: bounds.to_vec(),
                    min: Some(h.min),
                    max: Some(h.max),
                    ..HistogramDataPoint::default()
                })
                .collect();
            points.sort_by(|a, b| format!("{:?}", a.attributes).cmp(&format!("{:?}", b.attributes)));
            metric::Data::Histogram(Histogram { data_points: points, aggregation_temporality: AggregationTemporality::Delta as i32 })
        };
        let mut metrics = Vec::new();
        if !self.tokens.is_empty() {
            metrics.push(Metric {
                name: "gen_ai.client.token.usage".into(),
                description: "Tokens per LLM call, by gen_ai.token.type (input includes cached prompt tokens).".into(),
                unit: "{token}".into(),
                data: Some(histogram(&self.tokens, &TOKEN_BOUNDS)),
                ..Metric::default()
            });
        }
        if !self.durations.is_empty() {
            metrics.push(Metric {
                name: "gen_ai.client.operation.duration".into(),
                description: "LLM call duration, request start to response end.".into(),
                unit: "s".into(),
                data: Some(histogram(&self.durations, &DURATION_BOUNDS)),
                ..Metric::default()
            });
        }
        if !self.cost.is_empty() {
            let data_points = self
                .cost
                .iter()
                .map(|(attrs, usd)| NumberDataPoint {
                    attributes: attributes(attrs),
                    start_time_unix_nano: self.start_unix_ns,
                    time_unix_nano: now_unix_ns,
                    value: Some(number_data_point::Value::AsDouble(*usd)),
                    ..NumberDataPoint::default()
                })
                .collect();
            metrics.push(Metric {
                name: "gauge.cost".into(),
                description: "Cost of LLM calls at list price.".into(),
                unit: "USD".into(),
                data: Some(metric::Data::Sum(Sum {
                    data_points,
                    aggregation_temporality: AggregationTemporality::Delta as i32,
                    is_monotonic: true,
                })),
                ..Metric::default()
            });
        }
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(resource.clone()),
                scope_metrics: vec![ScopeMetrics { scope: Some(scope()), metrics, ..ScopeMetrics::default() }],
                ..ResourceMetrics::default()
            }],
        }
    }
}

/// The series for `attrs`, created if there is room.
fn room<V>(map: &mut HashMap<Attrs, V>, attrs: Attrs, new: impl FnOnce() -> V) -> Option<&mut V> {
    if !map.contains_key(&attrs) && map.len() >= MAX_SERIES {
        return None;
    }
    Some(map.entry(attrs).or_insert_with(new))
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};

    use super::{super::spans::{resource, tests::record}, *};

    #[test]
    fn metrics_aggregate_tokens_durations_and_cost_per_interval() {
        let mut agg = Aggregate::new(5);
        agg.add(&record());
        agg.add(&record());
        let request = agg.request(&resource("gauge-agent", "h"), 9);
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        let names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["gen_ai.client.token.usage", "gen_ai.client.operation.duration", "gauge.cost"]);
        let Some(metric::Data::Histogram(tokens)) = &metrics[0].data else { panic!("histogram") };
        assert_eq!(tokens.aggregation_temporality, AggregationTemporality::Delta as i32);
        let input = tokens
            .data_points
            .iter()
            .find(|p| p.attributes.iter().any(|a| a.key == "gen_ai.token.type" && a.value == Some(AnyValue { value: Some(any_value::Value::StringValue("input".into())) })))
            .expect("input series");
        assert_eq!((input.count, input.sum, input.start_time_unix_nano, input.time_unix_nano), (2, Some(32.0), 5, 9));
        assert_eq!(input.bucket_counts.iter().sum::<u64>(), 2);
        let Some(metric::Data::Histogram(durations)) = &metrics[1].data else { panic!("histogram") };
        assert_eq!(durations.data_points[0].sum, Some(1.0));
        let Some(metric::Data::Sum(cost)) = &metrics[2].data else { panic!("sum") };
        assert_eq!(cost.data_points[0].value, Some(number_data_point::Value::AsDouble(0.5)));
        assert!(cost.is_monotonic);
    }

    #[test]
    fn series_are_bounded() {
        let mut agg = Aggregate::new(0);
        for i in 0..MAX_SERIES + 10 {
            agg.add(&CallRecord { request_model: Some(format!("m{i}")), usage: None, cost_usd: None, ..record() });
        }
        assert_eq!((agg.durations.len(), agg.over_limit), (MAX_SERIES, 10));
    }

}
