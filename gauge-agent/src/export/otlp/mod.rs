//! OpenTelemetry export (`[otlp]`): each finished LLM call as a span, and the GenAI
//! client metrics, POSTed as OTLP/HTTP protobuf to `/v1/traces` and `/v1/metrics`.
//!
//! The daemon's loop only turns a [`Finished`] into a small [`CallRecord`] (what is
//! exported, nothing else: never bodies, prompts, headers or credentials) and hands
//! it to a bounded queue; a full queue drops and counts. A thread of its own
//! ([`delivery`]) batches spans, aggregates metrics over `export_interval` (delta
//! temporality: each export holds only its interval), and POSTs with a timeout and a
//! couple of retries with backoff.
//!
//! The mappings ([`spans`]: record -> span, [`metrics`]: records -> metric points) are
//! pure, for tests; [`config`] reads and checks `[otlp]`.

mod config;
mod delivery;
mod metrics;
mod spans;

use std::{
    path::PathBuf,
    sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

pub use config::{Headers, OtlpConfig};
pub use spans::CallRecord;

use crate::pipeline::Finished;

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("cannot read the OTLP headers file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the OTLP headers file {path} is readable by other users: chmod 600 it")]
    Readable { path: PathBuf },
    #[error("the OTLP headers file {path}, line {line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
    #[error("cannot start the OTLP export thread: {0}")]
    Thread(std::io::Error),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct SignalLabels {
    pub(super) signal: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    signal: &'static str,
    reason: &'static str,
}

#[derive(Clone)]
pub(super) struct Counters {
    pub(super) exported: Family<SignalLabels, Counter>,
    dropped: Family<DropLabels, Counter>,
}

impl Counters {
    pub(super) fn drop(&self, signal: &'static str, reason: &'static str, n: u64) {
        self.dropped.get_or_create(&DropLabels { signal, reason }).inc_by(n);
    }
}

/// The exporter's handle in the daemon's loop.
pub struct OtlpExporter {
    queue: SyncSender<CallRecord>,
    counters: Counters,
    stopped: Receiver<()>,
}

impl OtlpExporter {
    /// Reads `headers_file`, registers the metrics and starts the thread.
    /// `realtime_offset` gives CLOCK_REALTIME - CLOCK_MONOTONIC in ns (asked per call,
    /// so a stepped clock is followed).
    pub fn start(config: &OtlpConfig, realtime_offset: fn() -> i128, registry: &mut Registry) -> Result<Self, OtlpError> {
        let mut headers = config.headers.0.clone();
        if let Some(path) = &config.headers_file {
            headers.extend(config::read_headers_file(path)?);
        }
        let counters = Counters { exported: Family::default(), dropped: Family::default() };
        registry.register("gauge_otlp_exported", "Items the OTLP endpoint accepted: spans (signal=traces), metric data points (signal=metrics).", counters.exported.clone());
        registry.register(
            "gauge_otlp_dropped",
            "Items not exported: queue_full (calls), cardinality (metric points over the series limit), rejected (the endpoint refused them), failed (after retries).",
            counters.dropped.clone(),
        );
        let (queue, rx) = sync_channel(config.queue.max(1));
        let (done, stopped) = sync_channel(1);
        let worker = delivery::Worker {
            traces_url: format!("{}/v1/traces", config.endpoint),
            metrics_url: format!("{}/v1/metrics", config.endpoint),
            headers,
            agent: ureq::Agent::new_with_config(
                ureq::Agent::config_builder().timeout_global(Some(config.timeout)).http_status_as_error(false).build(),
            ),
            resource: spans::resource(&config.service_name, &hostname()),
            interval: config.export_interval,
            offset: realtime_offset,
            counters: counters.clone(),
            failing: false,
        };
        std::thread::Builder::new()
            .name("gauge-otlp".into())
            .spawn(move || {
                worker.run(&rx);
                let _ = done.send(());
            })
            .map_err(OtlpError::Thread)?;
        tracing::info!(endpoint = %config.endpoint, headers = ?config.headers, "exporting LLM calls over OTLP");
        Ok(Self { queue, counters, stopped })
    }

    /// Hands a finished call over; never waits (a full queue drops and counts).
    pub fn send(&self, done: &Finished) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.queue.try_send(CallRecord::from_finished(done)) {
            self.counters.drop("traces", "queue_full", 1);
            self.counters.drop("metrics", "queue_full", 1);
        }
    }

    /// Sends what is pending and waits for it at most `wait`.
    pub fn shutdown(self, wait: Duration) {
        drop(self.queue);
        let _ = self.stopped.recv_timeout(wait);
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it
    // or truncates, and the last byte stays 0.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}


#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;

    use super::*;

    #[test]
    fn exports_reach_the_endpoint_as_protobuf() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let config = OtlpConfig {
            endpoint,
            headers: Headers(BTreeMap::from([("x-key".to_owned(), "v".to_owned())])),
            headers_file: None,
            timeout: Duration::from_secs(2),
            service_name: "svc".into(),
            export_interval: Duration::from_secs(1),
            queue: 8,
        };
        let mut registry = Registry::default();
        let exporter = OtlpExporter::start(&config, || 0, &mut registry).expect("start");
        exporter.queue.try_send(spans::tests::record()).expect("queued");
        let (mut stream, _) = listener.accept().expect("a POST comes");
        let mut request = Vec::new();
        let mut buf = [0u8; 65536];
        let (head_end, length) = loop {
            let n = std::io::Read::read(&mut stream, &mut buf).expect("read");
            assert!(n > 0, "connection closed early");
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request).to_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text.lines().find_map(|l| l.strip_prefix("content-length:")).map(|v| v.trim().parse::<usize>().expect("length"));
                if let Some(length) = length
                    && request.len() >= end + 4 + length
                {
                    break (end + 4, length);
                }
            }
        };
        std::io::Write::write_all(&mut stream, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").expect("answer");
        let head = String::from_utf8_lossy(&request[..head_end]).to_lowercase();
        assert!(head.starts_with("post /v1/traces") && head.contains("x-key: v") && head.contains("application/x-protobuf"), "{head}");
        let decoded = ExportTraceServiceRequest::decode(&request[head_end..head_end + length]).expect("protobuf");
        assert_eq!(decoded.resource_spans[0].scope_spans[0].spans[0].name, "chat claude-sonnet-4-5");
        drop(stream);
        exporter.shutdown(Duration::from_millis(100));
    }
}
