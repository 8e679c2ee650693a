//! `[[policies]]` and `[enforcement]`: what limits hold for which agents, and what
//! happens when one is crossed. Checked while the config is read, so that errors
//! name their line and key.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::config::Pattern;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    /// An agent name, or "*" for every agent.
    pub agent: String,
    #[serde(default)]
    pub scope: Scope,
    /// Limits per window (each optional).
    pub max_retries: Option<u64>,
    pub max_requests: Option<u64>,
    pub max_errors: Option<u64>,
    /// Loop breaker: the same request body this many times.
    pub max_identical_requests: Option<u64>,
    pub max_cost_usd: Option<NonNegative>,
    /// Per request: the prompt's tokens (context ceiling).
    pub max_input_tokens: Option<u64>,
    /// Per request: models allowed (exact names, or one regex).
    pub allowed_models: Option<AllowedModels>,
    /// Trigger on an anomaly of this kind (spend_spike, retry_storm, loop,
    /// context_growth, model_escalation) for the agent.
    pub on_anomaly: Option<String>,
    #[serde(default = "minute", deserialize_with = "crate::config::duration")]
    pub window: Duration,
    pub action: Action,
    /// How long pause, freeze and throttle last.
    #[serde(default = "half_minute", deserialize_with = "crate::config::duration")]
    pub cooldown: Duration,
    /// terminate: SIGKILL this long after SIGTERM if the process still lives.
    #[serde(default = "ten_seconds", deserialize_with = "crate::config::duration")]
    pub grace: Duration,
    /// throttle: the CPU share left to the cgroup (0 < share <= 1).
    #[serde(default = "tenth")]
    pub cpu_share: f64,
    /// Hold every LLM request of the agent in the kernel until it is checked.
    #[serde(default)]
    pub gate: bool,
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Limits count per process.
    #[default]
    Process,
    /// Per cgroup: the whole container.
    Cgroup,
    /// Per agent, across all its processes.
    Agent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Alert,
    Pause,
    Terminate,
    Kill,
    Freeze,
    Throttle,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Self::Alert => "alert",
            Self::Pause => "pause",
            Self::Terminate => "terminate",
            Self::Kill => "kill",
            Self::Freeze => "freeze",
            Self::Throttle => "throttle",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum AllowedModels {
    List(Vec<String>),
    Regex(Pattern),
}

impl AllowedModels {
    /// Dated variants of a listed model are allowed too (gpt-4o-mini-2024-07-18).
    pub fn allows(&self, model: &str) -> bool {
        match self {
            Self::List(names) => names.iter().any(|n| {
                model == n || model.strip_prefix(n.as_str()).is_some_and(|rest| rest.starts_with('-') || rest.starts_with('@'))
            }),
            Self::Regex(re) => re.is_match(model),
        }
    }
}

/// USD, checked non-negative at parse time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonNegative(pub f64);

impl<'de> Deserialize<'de> for NonNegative {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if v.is_finite() && v >= 0.0 {
            Ok(Self(v))
        } else {
            Err(serde::de::Error::custom(format!("must be a non-negative number of USD, got {v}")))
        }
    }
}


fn minute() -> Duration {
    Duration::from_secs(60)
}
fn half_minute() -> Duration {
    Duration::from_secs(30)
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
fn tenth() -> f64 {
    0.1
}

impl PolicyConfig {
    /// Post-parse checks; the reason says what to change.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.name.trim().is_empty() {
            return Err("a policy needs a name");
        }
        let limits = [self.max_retries, self.max_requests, self.max_errors, self.max_identical_requests, self.max_input_tokens];
        if limits.iter().all(Option::is_none) && self.max_cost_usd.is_none() && self.allowed_models.is_none() && self.on_anomaly.is_none() {
            return Err("a policy needs at least one limit: max_retries, max_requests, max_errors, max_identical_requests, max_cost_usd, max_input_tokens, allowed_models or on_anomaly");
        }
        if self.on_anomaly.as_deref().is_some_and(|k| crate::anomaly::detectors::Kind::from_label(k).is_none()) {
            return Err("on_anomaly must be one of spend_spike, retry_storm, loop, context_growth, model_escalation");
        }
        if self.window.is_zero() {
            return Err("window must be longer than zero");
        }
        if !(self.cpu_share > 0.0 && self.cpu_share <= 1.0) {
            return Err("cpu_share must be in (0, 1]");
        }
        if self.gate && self.scope != Scope::Process && matches!(self.action, Action::Pause) {
            return Err("a gated pause acts on the requesting process: use scope = \"process\"");
        }
        Ok(())
    }

    pub fn applies_to(&self, agent: &str) -> bool {
        self.agent == "*" || self.agent == agent
    }
}

/// `[enforcement]`: switches and protections over every policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnforcementConfig {
    /// Count violations but act on nothing (also `gauge-agent run --dry-run`).
    pub dry_run: bool,
    /// A held request not decided within this many milliseconds is released (the
    /// agent fails open rather than leave a process stopped).
    pub hold_timeout_ms: u64,
    /// What must be undone if the agent dies (processes it stopped, cgroups it froze
    /// or throttled), kept current here; the next start undoes it.
    pub state_file: std::path::PathBuf,
    pub protect: Protect,
}

impl Default for EnforcementConfig {
    fn default() -> Self {
        Self { dry_run: false, hold_timeout_ms: 2000, state_file: "/run/gauge-agent/undo.json".into(), protect: Protect::default() }
    }
}

/// Processes never acted on, beyond those always protected (PID 1, kernel threads,
/// the agent itself and its parent).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Protect {
    /// Thread names, exactly.
    pub comm: Vec<String>,
    /// Executable paths, exactly.
    pub exe: Vec<String>,
    /// Regexes searched in the cgroup path.
    pub cgroup: Vec<Pattern>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct File {
        policies: Vec<PolicyConfig>,
    }

    #[test]
    fn a_policy_parses_with_its_defaults() {
        let file: File = toml::from_str(
            "[[policies]]\nname = \"cap\"\nagent = \"support-bot\"\nmax_retries = 2\nwindow = \"60s\"\naction = \"kill\"\ngate = true\n",
        )
        .expect("parses");
        let p = &file.policies[0];
        assert_eq!((p.scope, p.action, p.cooldown, p.window), (Scope::Process, Action::Kill, Duration::from_secs(30), Duration::from_secs(60)));
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn durations_models_and_budgets_are_checked_where_written() {
        let err = toml::from_str::<File>("[[policies]]\nname = \"a\"\nagent = \"*\"\nmax_requests = 1\nwindow = \"often\"\naction = \"alert\"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("line 5") && err.contains("not a duration"), "{err}");
        let err = toml::from_str::<File>("[[policies]]\nname = \"a\"\nagent = \"*\"\nmax_cost_usd = -3\naction = \"alert\"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("line 4") && err.contains("non-negative"), "{err}");
        let list = AllowedModels::List(vec!["gpt-4o-mini".into()]);
        assert!(list.allows("gpt-4o-mini-2024-07-18") && !list.allows("gpt-4o") && !list.allows("gpt-4o-minix"));
    }
}
