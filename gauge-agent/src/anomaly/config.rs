//! `[anomaly]`: detector thresholds (sensible defaults; every key optional) and the
//! webhook that findings are sent to.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    pub enabled: bool,
    /// A finding of one kind for one agent is reported again only after this long.
    #[serde(deserialize_with = "crate::config::duration")]
    pub repeat_after: Duration,
    pub spend_spike: SpendSpike,
    pub retry_storm: RetryStorm,
    #[serde(rename = "loop")]
    pub loops: Loop,
    pub context_growth: ContextGrowth,
    pub model_escalation: ModelEscalation,
    pub webhook: Option<Webhook>,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            repeat_after: Duration::from_secs(600),
            spend_spike: SpendSpike::default(),
            retry_storm: RetryStorm::default(),
            loops: Loop::default(),
            context_growth: ContextGrowth::default(),
            model_escalation: ModelEscalation::default(),
            webhook: None,
        }
    }
}

/// Spend per minute far above the agent's own baseline: above the baseline's median
/// by `mads` robust deviations (MAD x 1.4826), and `min_ratio` times the median.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpendSpike {
    /// Minutes of history the baseline is taken from.
    pub baseline_minutes: u32,
    /// Minutes of history needed before the detector speaks.
    pub warmup_minutes: u32,
    pub mads: f64,
    pub min_ratio: f64,
    /// Spend per minute below this never counts as a spike (USD).
    pub min_usd_per_minute: f64,
}

impl Default for SpendSpike {
    fn default() -> Self {
        Self { baseline_minutes: 60, warmup_minutes: 10, mads: 6.0, min_ratio: 3.0, min_usd_per_minute: 0.01 }
    }
}

/// Retries, 429s and 5xx answers as a share of an agent's calls over a window.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryStorm {
    #[serde(deserialize_with = "crate::config::duration")]
    pub window: Duration,
    pub min_calls: u32,
    pub ratio: f64,
}

impl Default for RetryStorm {
    fn default() -> Self {
        Self { window: Duration::from_secs(300), min_calls: 6, ratio: 0.5 }
    }
}

/// The same request body sent `repeats` times within `window`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Loop {
    #[serde(deserialize_with = "crate::config::duration")]
    pub window: Duration,
    pub repeats: u32,
}

impl Default for Loop {
    fn default() -> Self {
        Self { window: Duration::from_secs(600), repeats: 5 }
    }
}

/// Prompt tokens per call growing across one conversation (a process's calls that
/// share a session header, else all its calls to one model): a slope over the last
/// `calls` calls, or a ceiling.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextGrowth {
    pub calls: u32,
    /// Tokens added per call (least-squares slope) that count as runaway growth.
    pub slope_tokens: f64,
    /// Prompt tokens of one call that count as runaway on their own.
    pub ceiling_tokens: u64,
    /// Request headers naming a conversation.
    pub session_headers: Vec<String>,
}

impl Default for ContextGrowth {
    fn default() -> Self {
        Self {
            calls: 5,
            slope_tokens: 2000.0,
            ceiling_tokens: 150_000,
            session_headers: vec!["x-claude-code-session-id".into(), "x-session-id".into(), "x-gauge-session".into()],
        }
    }
}

/// A model pricier than any the agent used in its first `baseline_calls` calls.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelEscalation {
    pub baseline_calls: u32,
    /// How much pricier (input price ratio) counts.
    pub price_ratio: f64,
}

impl Default for ModelEscalation {
    fn default() -> Self {
        Self { baseline_calls: 20, price_ratio: 1.5 }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    /// "json" (the finding), "alertmanager" (POST /api/v2/alerts body) or "slack".
    #[serde(default = "json_format")]
    pub format: WebhookFormat,
    #[serde(default = "five_seconds", deserialize_with = "crate::config::duration")]
    pub timeout: Duration,
    #[serde(default = "three")]
    pub retries: u32,
    /// Findings waiting to be sent; more are dropped and counted.
    #[serde(default = "thousand")]
    pub queue: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    Json,
    Alertmanager,
    Slack,
}

fn json_format() -> WebhookFormat {
    WebhookFormat::Json
}
fn five_seconds() -> Duration {
    Duration::from_secs(5)
}
fn three() -> u32 {
    3
}
fn thousand() -> usize {
    1000
}


impl AnomalyConfig {
    /// Post-parse checks; the reason says what to change.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.spend_spike.warmup_minutes == 0 || self.spend_spike.baseline_minutes < self.spend_spike.warmup_minutes {
            return Err(("anomaly.spend_spike.baseline_minutes", "must be at least warmup_minutes, which must be at least 1"));
        }
        if !(self.retry_storm.ratio > 0.0 && self.retry_storm.ratio <= 1.0) {
            return Err(("anomaly.retry_storm.ratio", "must be in (0, 1]"));
        }
        if self.loops.repeats < 2 {
            return Err(("anomaly.loop.repeats", "must be at least 2"));
        }
        if self.context_growth.calls < 3 {
            return Err(("anomaly.context_growth.calls", "must be at least 3 (a slope needs points)"));
        }
        if self.webhook.as_ref().is_some_and(|w| !w.url.starts_with("http://") && !w.url.starts_with("https://")) {
            return Err(("anomaly.webhook.url", "must be an http:// or https:// URL"));
        }
        Ok(())
    }
}
