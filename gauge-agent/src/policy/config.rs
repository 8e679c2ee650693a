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
    /// Where `max_cost_usd` takes its spend from: this host's count, or a
    /// Prometheus query over the fleet (`[policies.prometheus]`).
    #[serde(default)]
    pub spend_source: SpendSource,
    pub prometheus: Option<PrometheusSpend>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpendSource {
    /// What this agent metered itself, per scope key and window.
    #[default]
    Local,
    /// The fleet's spend from `[policies.prometheus]`, with the local count as a floor.
    Prometheus,
}

/// What a fleet budget does while Prometheus gives no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Keep enforcing the local count only (the default: a monitoring outage must
    /// not stop production agents).
    #[default]
    Open,
    /// The budget counts as spent: the agent's LLM requests are stopped until
    /// Prometheus answers again.
    Closed,
}

/// `[policies.prometheus]`: the fleet's spend, asked of Prometheus's HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawPrometheusSpend")]
pub struct PrometheusSpend {
    /// Base URL, `http://host:port[/prefix]`, without a trailing slash.
    pub url: String,
    /// A PromQL instant query whose samples add up to the spend in USD.
    pub query: String,
    /// How often it is asked; decisions in between use the cached answer.
    pub refresh: Duration,
    /// How long one query may take.
    pub timeout: Duration,
    pub on_error: OnError,
    /// A file holding a bearer token for Prometheus (re-read at each query, so it
    /// may be rotated).
    pub token_file: Option<std::path::PathBuf>,
}

impl PrometheusSpend {
    /// An answer older than this counts as no answer.
    pub fn stale_after(&self) -> Duration {
        self.refresh.saturating_mul(STALE_REFRESHES)
    }
}

/// Refreshes an answer may miss before it is stale (one slow or failed query must
/// not flip a fleet budget to its error behaviour).
pub const STALE_REFRESHES: u32 = 3;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrometheusSpend {
    url: PrometheusUrl,
    query: String,
    #[serde(default = "fifteen_seconds", deserialize_with = "crate::config::duration")]
    refresh: Duration,
    #[serde(default = "two_seconds", deserialize_with = "crate::config::duration")]
    timeout: Duration,
    #[serde(default)]
    on_error: OnError,
    token_file: Option<std::path::PathBuf>,
}

impl TryFrom<RawPrometheusSpend> for PrometheusSpend {
    type Error = String;

    // Checked here, while the table is read, so that errors carry its line.
    fn try_from(raw: RawPrometheusSpend) -> Result<Self, String> {
        if raw.query.trim().is_empty() {
            return Err("query must be a PromQL expression giving the fleet's spend in USD".into());
        }
        if raw.refresh < Duration::from_secs(1) {
            return Err(format!("refresh = {:?} is too often: at least \"1s\"", raw.refresh));
        }
        if raw.timeout.is_zero() || raw.timeout > raw.refresh {
            return Err(format!("timeout = {:?} must be longer than zero and at most refresh ({:?})", raw.timeout, raw.refresh));
        }
        Ok(Self { url: raw.url.0, query: raw.query, refresh: raw.refresh, timeout: raw.timeout, on_error: raw.on_error, token_file: raw.token_file })
    }
}

/// `http[s]://host[:port][/prefix]`, checked where written. https is verified against
/// Mozilla's root CAs, built in (as for `[otlp]`).
struct PrometheusUrl(String);

impl<'de> Deserialize<'de> for PrometheusUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let fail = |why: &str| serde::de::Error::custom(format!("url {text:?}: {why}"));
        let Some(rest) = text.strip_prefix("http://").or_else(|| text.strip_prefix("https://")) else {
            return Err(fail("must start with http:// or https://"));
        };
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty() {
            return Err(fail("names no host"));
        }
        // Credentials in a URL end up in logs: they belong in token_file.
        if host.contains('@') {
            return Err(fail("must not carry credentials: put a bearer token in token_file"));
        }
        if rest.contains(['?', '#']) {
            return Err(fail("must not carry a query or fragment: the query goes in `query`"));
        }
        Ok(Self(text.trim_end_matches('/').to_owned()))
    }
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
fn fifteen_seconds() -> Duration {
    Duration::from_secs(15)
}
fn two_seconds() -> Duration {
    Duration::from_secs(2)
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
        match (self.spend_source, &self.prometheus) {
            (SpendSource::Prometheus, None) => return Err("spend_source = \"prometheus\" needs a [policies.prometheus] table (url, query)"),
            (SpendSource::Prometheus, Some(_)) if self.max_cost_usd.is_none() => {
                return Err("spend_source = \"prometheus\" needs max_cost_usd: the fleet's spend is checked against it");
            }
            (SpendSource::Local, Some(_)) => return Err("[policies.prometheus] is read only with spend_source = \"prometheus\""),
            _ => {}
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

    const FLEET: &str = "[[policies]]\nname = \"f\"\nagent = \"*\"\nmax_cost_usd = 100\naction = \"kill\"\nspend_source = \"prometheus\"\n[policies.prometheus]\n";

    fn fleet(table: &str) -> Result<PolicyConfig, String> {
        toml::from_str::<File>(&format!("{FLEET}{table}")).map(|mut f| f.policies.remove(0)).map_err(|e| e.to_string())
    }

    #[test]
    fn a_fleet_budget_parses_with_its_defaults() {
        let p = fleet("url = \"http://prometheus:9090/\"\nquery = 'sum(x)'\n").expect("parses");
        let prom = p.prometheus.clone().expect("table");
        assert_eq!((p.spend_source, prom.url.as_str(), prom.refresh, prom.timeout, prom.on_error), (SpendSource::Prometheus, "http://prometheus:9090", Duration::from_secs(15), Duration::from_secs(2), OnError::Open));
        assert_eq!(prom.stale_after(), Duration::from_secs(45));
        assert_eq!(p.validate(), Ok(()));
        let p = fleet("url = \"http://10.0.0.1:9090/prom\"\nquery = 'sum(x)'\nrefresh = \"1m\"\ntimeout = \"5s\"\non_error = \"closed\"\ntoken_file = \"/etc/gauge/prom-token\"\n").expect("parses");
        assert_eq!(p.prometheus.map(|p| (p.on_error, p.token_file)), Some((OnError::Closed, Some("/etc/gauge/prom-token".into()))));
        let p = fleet("url = \"https://prom.example/\"\nquery = 'sum(x)'\n").expect("https parses");
        assert_eq!(p.prometheus.map(|p| p.url), Some("https://prom.example".into()));
    }

    #[test]
    fn fleet_budget_mistakes_are_named_where_written() {
        for (table, line, words) in [
            ("url = \"prom:9090\"\nquery = 'x'\n", 8, "must start with http:// or https://"),
            ("url = \"https://\"\nquery = 'x'\n", 8, "names no host"),
            ("url = \"http://user:pw@prom\"\nquery = 'x'\n", 8, "token_file"),
            ("url = \"http://prom\"\nquery = 'x'\non_error = \"maybe\"\n", 10, "open"),
            ("url = \"http://prom\"\nquery = 'x'\nrefresh = \"soon\"\n", 10, "not a duration"),
            ("url = \"http://prom\"\nquery = 'x'\nquery_typo = 1\n", 10, "query_typo"),
            ("url = \"http://prom\"\nquery = ' '\n", 7, "PromQL"),
            ("url = \"http://prom\"\nquery = 'x'\nrefresh = \"100ms\"\n", 7, "at least"),
            ("url = \"http://prom\"\nquery = 'x'\nrefresh = \"5s\"\ntimeout = \"10s\"\n", 7, "at most refresh"),
        ] {
            let err = fleet(table).err().unwrap_or_default();
            assert!(err.contains(&format!("line {line}")) && err.contains(words), "{table}: want line {line} and {words:?} in: {err}");
        }
        let no_table = toml::from_str::<File>(FLEET.trim_end_matches("[policies.prometheus]\n")).expect("parses");
        assert!(no_table.policies[0].validate().is_err_and(|e| e.contains("[policies.prometheus]")));
        let no_budget = fleet("url = \"http://prom\"\nquery = 'x'\n").map(|p| PolicyConfig { max_cost_usd: None, max_requests: Some(1), ..p }).expect("parses");
        assert!(no_budget.validate().is_err_and(|e| e.contains("max_cost_usd")));
        let local = fleet("url = \"http://prom\"\nquery = 'x'\n").map(|p| PolicyConfig { spend_source: SpendSource::Local, ..p }).expect("parses");
        assert!(local.validate().is_err_and(|e| e.contains("spend_source")));
    }
}
