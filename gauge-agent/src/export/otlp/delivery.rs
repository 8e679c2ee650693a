//! The export thread: batches spans, closes metric intervals, POSTs with retries.

use std::{
    collections::BTreeMap,
    hash::{BuildHasher as _, Hasher as _},
    sync::mpsc::{Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{resource::v1::Resource, trace::v1::Span};
use prost::Message as _;

use super::{
    Counters, SignalLabels,
    metrics::Aggregate,
    spans::{CallRecord, span, traces_request, unix_ns},
};

/// Most spans in one POST.
pub(super) const MAX_BATCH: usize = 512;
/// Spans wait at most this long for a batch to fill.
pub(super) const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Retries of a failed POST (connection errors, 429, 502, 503, 504), with backoff.
const RETRIES: u32 = 2;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// Trace and span ids: random per process (std's hasher keys), then SplitMix64.
struct Ids(u64);

impl Ids {
    fn new() -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
        h.write_u32(std::process::id());
        Self(h.finish())
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)).max(1)
    }

    fn trace(&mut self) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.next().to_be_bytes());
        id[8..].copy_from_slice(&self.next().to_be_bytes());
        id
    }
}

enum Outcome {
    Sent,
    Rejected(u16),
    Failed(String),
}

pub(super) struct Worker {
    pub(super) traces_url: String,
    pub(super) metrics_url: String,
    pub(super) headers: BTreeMap<String, String>,
    pub(super) agent: ureq::Agent,
    pub(super) resource: Resource,
    pub(super) interval: Duration,
    pub(super) offset: fn() -> i128,
    pub(super) counters: Counters,
    /// Whether the last export failed: failures are logged when they start and end.
    pub(super) failing: bool,
}

impl Worker {
    pub(super) fn run(mut self, rx: &Receiver<CallRecord>) {
        let mut ids = Ids::new();
        let mut spans = Vec::new();
        let mut aggregate = Aggregate::new(unix_ns(crate::app::monotonic_ns(), (self.offset)()));
        let mut flush_at = Instant::now() + FLUSH_EVERY;
        let mut metrics_at = Instant::now() + self.interval;
        loop {
            let wait = flush_at.min(metrics_at).saturating_duration_since(Instant::now());
            let open = match rx.recv_timeout(wait) {
                Ok(record) => {
                    spans.push(span(&record, ids.trace(), ids.next().to_be_bytes(), (self.offset)()));
                    aggregate.add(&record);
                    true
                }
                Err(RecvTimeoutError::Timeout) => true,
                Err(RecvTimeoutError::Disconnected) => false,
            };
            let now = Instant::now();
            if spans.len() >= MAX_BATCH || (now >= flush_at && !spans.is_empty()) || (!open && !spans.is_empty()) {
                self.export_spans(std::mem::take(&mut spans));
            }
            if now >= flush_at {
                flush_at = now + FLUSH_EVERY;
            }
            if now >= metrics_at || !open {
                metrics_at = now + self.interval;
                let now_unix = unix_ns(crate::app::monotonic_ns(), (self.offset)());
                let done = std::mem::replace(&mut aggregate, Aggregate::new(now_unix));
                if done.over_limit > 0 {
                    self.counters.drop("metrics", "cardinality", done.over_limit);
                }
                if !done.is_empty() {
                    let body = done.request(&self.resource, now_unix).encode_to_vec();
                    let url = self.metrics_url.clone();
                    self.export("metrics", &url, body, done.points() as u64);
                }
            }
            if !open {
                return;
            }
        }
    }

    fn export_spans(&mut self, spans: Vec<Span>) {
        let n = spans.len() as u64;
        let body = traces_request(&self.resource, spans).encode_to_vec();
        let url = self.traces_url.clone();
        self.export("traces", &url, body, n);
    }

    fn export(&mut self, signal: &'static str, url: &str, body: Vec<u8>, items: u64) {
        match self.post(url, &body) {
            Outcome::Sent => {
                self.counters.exported.get_or_create(&SignalLabels { signal }).inc_by(items);
                if self.failing {
                    tracing::info!(url, "OTLP export works again");
                }
                self.failing = false;
            }
            Outcome::Rejected(status) => {
                self.counters.drop(signal, "rejected", items);
                if !self.failing {
                    tracing::warn!(url, status, "the OTLP endpoint refused an export (logged once until an export succeeds)");
                }
                self.failing = true;
            }
            Outcome::Failed(error) => {
                self.counters.drop(signal, "failed", items);
                if !self.failing {
                    tracing::warn!(url, %error, "OTLP export failed after retries (logged once until an export succeeds)");
                }
                self.failing = true;
            }
        }
    }

    /// POSTs with retries on what OTLP calls retryable: connection errors, 429, 502,
    /// 503, 504. Errors name the URL and status, never the headers.
    fn post(&self, url: &str, body: &[u8]) -> Outcome {
        let mut delay = FIRST_BACKOFF;
        let mut last = String::new();
        for attempt in 0..=RETRIES {
            if attempt > 0 {
                std::thread::sleep(delay);
                delay *= 2;
            }
            let mut request = self.agent.post(url).header("content-type", "application/x-protobuf");
            for (name, value) in &self.headers {
                request = request.header(name, value);
            }
            match request.send(body) {
                Ok(response) => {
                    let status = response.status().as_u16();
                    if (200..300).contains(&status) {
                        return Outcome::Sent;
                    }
                    if ![429, 502, 503, 504].contains(&status) {
                        return Outcome::Rejected(status);
                    }
                    last = format!("HTTP {status}");
                }
                Err(error) => last = error.to_string(),
            }
        }
        Outcome::Failed(last)
    }
}
