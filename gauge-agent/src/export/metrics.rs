//! Capture metrics, read at scrape time from the capture's counters (user space) and
//! from the eBPF counter map (kernel), so the hot path only bumps atomics.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType,
        counter::ConstCounter,
        gauge::ConstGauge,
    },
    registry::Registry,
};

use crate::source::{
    hazards::ReturnProbeState,
    kernel::KernelStats,
    runtime::{CaptureCounters, CaptureState},
};

/// Where the collector reads capture figures at scrape time.
pub trait CaptureStats: Send + Sync + 'static {
    fn counters(&self) -> &CaptureCounters;
    fn kernel(&self) -> KernelStats;
    fn probes_attached(&self) -> usize;
    /// Whether return probes are attached; None before the capture starts.
    fn return_probes(&self) -> Option<ReturnProbeState> {
        None
    }
}

impl CaptureStats for CaptureState {
    fn counters(&self) -> &CaptureCounters {
        &self.counters
    }
    fn kernel(&self) -> KernelStats {
        self.kernel_stats()
    }
    fn probes_attached(&self) -> usize {
        CaptureState::probes_attached(self)
    }
    fn return_probes(&self) -> Option<ReturnProbeState> {
        CaptureState::return_probes(self).cloned()
    }
}

/// Everything the capture stage exports.
pub struct CaptureCollector<S>(pub Arc<S>);

impl<S> std::fmt::Debug for CaptureCollector<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaptureCollector")
    }
}

impl<S: CaptureStats> CaptureCollector<S> {
    pub fn register(registry: &mut Registry, stats: Arc<S>) {
        registry.register_collector(Box::new(Self(stats)));
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, label: &str, values: &[(&str, u64)]) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, count) in values {
        let labels = [(label, *value)];
        ConstCounter::new(*count).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn plain_counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

impl<S: CaptureStats> Collector for CaptureCollector<S> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let c = self.0.counters();
        let k = self.0.kernel();
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
        counter(
            &mut encoder,
            "gauge_capture_events",
            "Capture records received by the agent, by kind.",
            "kind",
            &[
                ("write", get(&c.writes)),
                ("read", get(&c.reads)),
                ("close", get(&c.closes)),
                ("exec", get(&c.execs)),
                ("held", get(&c.held)),
                ("stopped", get(&c.stopped)),
            ],
        )?;
        counter(
            &mut encoder,
            "gauge_capture_bytes",
            "Plaintext bytes received by the agent, by direction (write = sent by the process).",
            "direction",
            &[("write", get(&c.bytes_written)), ("read", get(&c.bytes_read))],
        )?;
        counter(
            &mut encoder,
            "gauge_capture_lost_events",
            "Capture records lost, by reason: ring_full (kernel ring buffer), throttled (a process over its share of a filling ring), decode_error. The agent's queue never drops: while it is full the ring fills instead.",
            "reason",
            &[("ring_full", k.events_lost), ("throttled", k.events_throttled), ("decode_error", get(&c.decode_errors))],
        )?;
        plain_counter(&mut encoder, "gauge_capture_lost_bytes", "Plaintext bytes in records lost to a full ring buffer.", k.bytes_lost)?;
        plain_counter(
            &mut encoder,
            "gauge_capture_throttled_bytes",
            "Plaintext bytes not captured because their process took more than its share of a filling ring (one process cannot blind the capture of the others).",
            k.bytes_throttled,
        )?;
        plain_counter(
            &mut encoder,
            "gauge_capture_truncated_bytes",
            "Plaintext bytes beyond capture.max_call_bytes in one call, never captured.",
            k.bytes_truncated,
        )?;
        plain_counter(&mut encoder, "gauge_capture_read_faults", "Chunks whose user memory the probe could not read.", k.read_faults)?;
        plain_counter(
            &mut encoder,
            "gauge_capture_kernel_events",
            "Capture records the kernel put on the ring buffer (compare with gauge_capture_events_total).",
            k.events_submitted,
        )?;
        plain_counter(
            &mut encoder,
            "gauge_capture_exec_backlog_drops",
            "Exec events not examined for new TLS libraries because discovery was behind.",
            get(&c.exec_queue_full),
        )?;
        counter(
            &mut encoder,
            "gauge_probe_attach_failures",
            "TLS hooks that failed: attach (the kernel refused a probe), unreadable (a library named by the linker cache or capture.extra_targets could not be opened; counted once per path), unhookable (an executable with a TLS library compiled in that Gauge cannot hook, e.g. BoringSSL without symbols in an unknown build). `gauge-agent targets` names the files.",
            "reason",
            &[("attach", get(&c.attach_refused)), ("unreadable", get(&c.attach_unreadable)), ("unhookable", get(&c.attach_unhookable))],
        )?;
        plain_counter(
            &mut encoder,
            "gauge_probe_files_replaced",
            "Hooked libraries found replaced at their path (an upgrade) and hooked anew; processes still running the old file keep its probes.",
            get(&c.files_replaced),
        )?;
        let probes = self.0.probes_attached() as i64;
        ConstGauge::new(probes).encode(encoder.encode_descriptor(
            "gauge_probes_attached",
            "Uprobes currently attached to TLS libraries.",
            None,
            MetricType::Gauge,
        )?)?;
        if let Some(state) = self.0.return_probes() {
            let mut metric = encoder.encode_descriptor(
                "gauge_capture_return_probes",
                "1 for whether return probes are attached (state on/off) and what decided it (reason canary: the start-up seccomp canary; config: capture.return_probes). Off, responses are not captured.",
                None,
                MetricType::Gauge,
            )?;
            let labels = [("state", state.state_label()), ("reason", state.reason.label())];
            ConstGauge::new(1i64).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    struct Fixed(CaptureCounters, KernelStats);

    impl CaptureStats for Fixed {
        fn counters(&self) -> &CaptureCounters {
            &self.0
        }
        fn kernel(&self) -> KernelStats {
            self.1
        }
        fn probes_attached(&self) -> usize {
            10
        }
    }

    #[test]
    fn capture_metrics_encode_with_their_contract_names() {
        let counters = CaptureCounters::default();
        counters.writes.store(3, Relaxed);
        counters.bytes_read.store(1000, Relaxed);
        let mut registry = Registry::default();
        let kernel = KernelStats { events_lost: 2, bytes_truncated: 77, ..Default::default() };
        CaptureCollector::register(&mut registry, Arc::new(Fixed(counters, kernel)));
        let mut text = String::new();
        encode(&mut text, &registry).expect("encodes");
        for line in [
            "gauge_capture_events_total{kind=\"write\"} 3",
            "gauge_capture_bytes_total{direction=\"read\"} 1000",
            "gauge_capture_lost_events_total{reason=\"ring_full\"} 2",
            "gauge_capture_truncated_bytes_total 77",
            "gauge_probes_attached 10",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
    }

    struct Off(CaptureCounters);

    impl CaptureStats for Off {
        fn counters(&self) -> &CaptureCounters {
            &self.0
        }
        fn kernel(&self) -> KernelStats {
            KernelStats::default()
        }
        fn probes_attached(&self) -> usize {
            4
        }
        fn return_probes(&self) -> Option<ReturnProbeState> {
            let reason = crate::source::hazards::Reason::Config;
            Some(ReturnProbeState { on: false, reason, detail: String::new() })
        }
    }

    #[test]
    fn the_return_probe_decision_is_one_labelled_gauge() {
        let mut registry = Registry::default();
        CaptureCollector::register(&mut registry, Arc::new(Off(CaptureCounters::default())));
        let mut text = String::new();
        encode(&mut text, &registry).expect("encodes");
        assert!(text.contains("gauge_capture_return_probes{state=\"off\",reason=\"config\"} 1"), "{text}");
        // Before the capture starts there is no decision, and no sample.
        let mut registry = Registry::default();
        CaptureCollector::register(&mut registry, Arc::new(Fixed(CaptureCounters::default(), KernelStats::default())));
        let mut text = String::new();
        encode(&mut text, &registry).expect("encodes");
        assert!(!text.contains("gauge_capture_return_probes{"), "{text}");
    }
}
