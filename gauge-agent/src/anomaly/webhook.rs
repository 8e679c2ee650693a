//! Sends findings to a webhook from a thread of its own: a bounded queue (a full
//! one drops and counts), a timeout and retries with backoff per finding. Shapes:
//! the finding as JSON, an Alertmanager `POST /api/v2/alerts` body, or a Slack
//! message.

use std::{
    sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::{
    config::{Webhook, WebhookFormat},
    detectors::Finding,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone)]
pub struct WebhookSender {
    queue: SyncSender<Finding>,
    results: Family<ResultLabels, Counter>,
}

impl WebhookSender {
    pub fn start(config: Webhook, registry: &mut Registry) -> std::io::Result<Self> {
        let results = Family::<ResultLabels, Counter>::default();
        registry.register("gauge_anomaly_webhook", "Findings sent to the webhook: sent, failed (after retries), dropped (queue full).", results.clone());
        let (queue, rx) = sync_channel(config.queue.max(1));
        let worker = results.clone();
        std::thread::Builder::new().name("gauge-webhook".into()).spawn(move || deliver(&config, &rx, &worker))?;
        Ok(Self { queue, results })
    }

    pub fn send(&self, finding: Finding) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.queue.try_send(finding) {
            self.results.get_or_create(&ResultLabels { result: "dropped" }).inc();
        }
    }
}

fn deliver(config: &Webhook, rx: &Receiver<Finding>, results: &Family<ResultLabels, Counter>) {
    let agent = ureq::Agent::new_with_config(ureq::Agent::config_builder().timeout_global(Some(config.timeout)).build());
    for finding in rx {
        let body = payload(config.format, &finding).to_string();
        let mut delay = Duration::from_millis(500);
        let mut sent = false;
        for attempt in 0..=config.retries {
            let result = agent.post(&config.url).header("content-type", "application/json").send(body.as_str());
            match result {
                Ok(_) => {
                    sent = true;
                    break;
                }
                Err(error) => {
                    tracing::warn!(url = %config.url, attempt, %error, "anomaly webhook failed");
                    if attempt < config.retries {
                        std::thread::sleep(delay);
                        delay *= 2;
                    }
                }
            }
        }
        results.get_or_create(&ResultLabels { result: if sent { "sent" } else { "failed" } }).inc();
    }
}

/// The webhook body for a finding.
pub fn payload(format: WebhookFormat, f: &Finding) -> serde_json::Value {
    let summary = format!("Gauge: {} for agent {}: {}", f.kind.label(), f.agent, f.detail);
    match format {
        WebhookFormat::Json => serde_json::json!({
            "agent": f.agent, "kind": f.kind.label(), "pid": f.tgid, "observed": f.observed,
            "threshold": f.threshold, "detail": f.detail,
        }),
        WebhookFormat::Alertmanager => serde_json::json!([{
            "labels": {"alertname": "GaugeAnomaly", "agent": f.agent, "kind": f.kind.label(), "severity": "warning"},
            "annotations": {"summary": summary, "observed": f.observed.to_string(), "threshold": f.threshold.to_string()},
            "startsAt": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        }]),
        WebhookFormat::Slack => serde_json::json!({ "text": summary }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anomaly::detectors::Kind;

    fn finding() -> Finding {
        Finding { agent: "bot".into(), kind: Kind::Loop, tgid: 7, at_ns: 0, observed: 5.0, threshold: 5.0, detail: "the same request".into() }
    }

    #[test]
    fn each_shape_carries_agent_and_kind() {
        let am = payload(WebhookFormat::Alertmanager, &finding());
        assert_eq!(am[0]["labels"]["kind"], "loop");
        assert!(am[0]["startsAt"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert!(payload(WebhookFormat::Slack, &finding())["text"].as_str().is_some_and(|t| t.contains("loop for agent bot")));
        assert_eq!(payload(WebhookFormat::Json, &finding())["pid"], 7);
    }

    #[test]
    fn findings_reach_the_hook_and_a_full_queue_drops() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let config = Webhook { url, format: WebhookFormat::Json, timeout: Duration::from_secs(2), retries: 0, queue: 1 };
        let sender = WebhookSender::start(config, &mut Registry::default()).expect("start");
        sender.send(finding());
        let (mut stream, _) = listener.accept().expect("a POST comes");
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&request).contains("\"kind\":\"loop\"") {
            let n = std::io::Read::read(&mut stream, &mut buf).expect("read");
            assert!(n > 0, "connection closed early");
            request.extend_from_slice(&buf[..n]);
        }
        std::io::Write::write_all(&mut stream, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").expect("answer");
        assert!(String::from_utf8_lossy(&request).starts_with("POST /hook"));
    }
}
