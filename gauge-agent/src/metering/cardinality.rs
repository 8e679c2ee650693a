//! Label caps: each label keeps at most a configured number of distinct values;
//! later values fold into `other`, counted in `gauge_label_overflow_total{label}`,
//! so that a hostile or buggy client cannot grow /metrics without bound.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::Deserialize;

/// What overflowing values become.
pub const OTHER: &str = "other";

/// `[labels]`: most distinct values per label.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabelLimits {
    pub agent: usize,
    pub process: usize,
    pub container: usize,
    pub workflow: usize,
    pub customer: usize,
    pub model: usize,
    pub outcome: usize,
}

impl Default for LabelLimits {
    fn default() -> Self {
        Self { agent: 200, process: 200, container: 500, workflow: 200, customer: 1000, model: 200, outcome: 100 }
    }
}

impl LabelLimits {
    fn of(&self, label: &str) -> usize {
        match label {
            "agent" => self.agent,
            "process" => self.process,
            "container" => self.container,
            "workflow" => self.workflow,
            "customer" => self.customer,
            "model" => self.model,
            "outcome" => self.outcome,
            _ => usize::MAX,
        }
    }

    /// The first limit that is zero, for config validation.
    pub fn zero(&self) -> Option<&'static str> {
        ["agent", "process", "container", "workflow", "customer", "model", "outcome"].into_iter().find(|l| self.of(l) == 0)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LabelName {
    label: &'static str,
}

/// Shared by every stage that exports labels (calls, outcomes).
#[derive(Clone)]
pub struct LabelCaps {
    limits: LabelLimits,
    seen: Arc<Mutex<HashMap<&'static str, HashSet<String>>>>,
    overflow: Family<LabelName, Counter>,
}

impl LabelCaps {
    pub fn register(limits: LabelLimits, registry: &mut Registry) -> Self {
        let overflow = Family::default();
        registry.register(
            "gauge_label_overflow",
            "Label values folded into \"other\" because the label reached its cap (config [labels]).",
            overflow.clone(),
        );
        Self { limits, seen: Arc::default(), overflow }
    }

    /// `value`, or `other` once `label` holds its cap of distinct values. The empty
    /// value (label not set) is always allowed.
    pub fn cap(&self, label: &'static str, value: String) -> String {
        if value.is_empty() || value == OTHER {
            return value;
        }
        // A poisoned lock only means a panic elsewhere; the set is still usable.
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let values = seen.entry(label).or_default();
        if values.contains(&value) {
            return value;
        }
        if values.len() < self.limits.of(label) {
            values.insert(value.clone());
            return value;
        }
        self.overflow.get_or_create(&LabelName { label }).inc();
        OTHER.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_past_the_cap_fold_into_other_and_are_counted() {
        let mut registry = Registry::default();
        let caps = LabelCaps::register(LabelLimits { model: 2, ..Default::default() }, &mut registry);
        assert_eq!(caps.cap("model", "a".into()), "a");
        assert_eq!(caps.cap("model", "b".into()), "b");
        assert_eq!(caps.cap("model", "c".into()), OTHER);
        assert_eq!(caps.cap("model", "a".into()), "a", "known values stay");
        assert_eq!(caps.cap("model", String::new()), "");
        assert_eq!(caps.cap("agent", "c".into()), "c", "caps are per label");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("gauge_label_overflow_total{label=\"model\"} 1"), "{text}");
    }
}
