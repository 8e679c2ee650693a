//! The TOML configuration: typed, with defaults in one place (`default.toml`, which
//! is also the embedded configuration) and errors that name the file, line and key.

use std::{net::SocketAddr, path::{Path, PathBuf}};

use serde::Deserialize;

use crate::{
    anomaly::config::AnomalyConfig,
    attribution::{AttributionConfig, rules::AgentRule},
    metering::{cardinality::LabelLimits, outcomes::OutcomesConfig, prices::PriceEntry},
    policy::config::{EnforcementConfig, PolicyConfig},
    reassembly::Limits,
    source::{hazards::ReturnProbes, kernel::LoadOptions, runtime::{CaptureOptions, PlainHttp}},
};

/// The configuration used when no `--config` is given.
pub const DEFAULT_TOML: &str = include_str!("../default.toml");

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub capture: Capture,
    #[serde(default)]
    pub http: Http,
    #[serde(default)]
    pub attribution: AttributionConfig,
    /// `[[agents]]`: first match wins.
    #[serde(default)]
    pub agents: Vec<AgentRule>,
    /// `[[prices]]`: add to or override the embedded price table.
    #[serde(default)]
    pub prices: Vec<PriceEntry>,
    #[serde(default)]
    pub outcomes: OutcomesConfig,
    /// `[labels]`: most distinct values per label.
    #[serde(default)]
    pub labels: LabelLimits,
    /// `[[policies]]`: guardrails, checked in order.
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
    #[serde(default)]
    pub enforcement: EnforcementConfig,
    #[serde(default)]
    pub anomaly: AnomalyConfig,
    /// `[otlp]`: export of each LLM call as an OpenTelemetry span and GenAI metrics; off when absent.
    #[serde(default)]
    pub otlp: Option<crate::export::otlp::OtlpConfig>,
}

/// Deserializes a duration written like "500ms", "60s", "1h" or "30d", so that a bad
/// one is reported with its line and key.
pub fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration like \"500ms\", \"60s\", \"1h\" or \"30d\": {e}")))
}

/// A regular expression, compiled (and so checked) while the config is read, so
/// that a bad one is reported with its line and key.
#[derive(Debug, Clone)]
pub struct Pattern(regex::Regex);

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        regex::Regex::new(&text)
            .map(Pattern)
            .map_err(|e| serde::de::Error::custom(format!("invalid regular expression {text:?}: {e}")))
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl std::ops::Deref for Pattern {
    type Target = regex::Regex;

    fn deref(&self) -> &regex::Regex {
        &self.0
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    pub max_connections: usize,
    pub idle_timeout_secs: u64,
    pub max_buffered_bytes: usize,
}

impl Default for Http {
    fn default() -> Self {
        let limits = Limits::default();
        Self { max_connections: limits.max_connections, idle_timeout_secs: 300, max_buffered_bytes: limits.max_buffered_bytes }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    pub listen: SocketAddr,
    /// A file holding the bearer token that `POST /v1/outcomes` requires (required
    /// for it beyond loopback).
    pub token_file: Option<PathBuf>,
    /// A file holding the bearer token that `/metrics` and `/targets` then require.
    pub metrics_token_file: Option<PathBuf>,
    /// `[server.tls]`: HTTPS (and mTLS with `client_ca_file`) instead of plain HTTP.
    pub tls: Option<crate::export::server::TlsFiles>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Capture {
    pub ring_buffer_bytes: u32,
    pub max_call_bytes: u32,
    pub queue_events: usize,
    pub queue_bytes: usize,
    pub extra_targets: Vec<PathBuf>,
    /// Ports of local model servers spoken to in plain HTTP (Ollama's 11434...),
    /// captured from syscall tracepoints.
    pub plain_http_ports: Vec<u16>,
    /// Whether those tracepoints are attached: "auto" once a process on the host
    /// listens on one of the ports.
    pub plain_http: PlainHttp,
    /// How often every process is looked at again for TLS libraries it loaded late
    /// (`dlopen`) and for hooked libraries replaced at their path.
    #[serde(deserialize_with = "duration")]
    pub rescan_interval: std::time::Duration,
    /// Whether uretprobes are attached; "auto" asks the start-up canary.
    pub return_probes: ReturnProbes,
}

impl Default for Server {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 9977)), token_file: None, metrics_token_file: None, tls: None }
    }
}

impl Default for Capture {
    fn default() -> Self {
        Self { ring_buffer_bytes: 16 << 20, max_call_bytes: gauge_common::tls::MAX_CALL_BYTES, queue_events: 65536, queue_bytes: 16 << 20, extra_targets: Vec::new(), plain_http_ports: vec![11434], plain_http: PlainHttp::Auto, rescan_interval: std::time::Duration::from_secs(60), return_probes: ReturnProbes::Auto }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config {path} is writable by other users, who could then turn off policies or steer actions: chmod o-w {path}")]
    WorldWritable { path: PathBuf },
    #[error("config {path}: {key} = {value}: {reason}")]
    Invalid { path: String, key: String, value: String, reason: &'static str },
}

impl Config {
    /// Loads `path`, or the embedded default when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(path) => {
                use std::os::unix::fs::PermissionsExt as _;
                let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                if meta.permissions().mode() & 0o002 != 0 {
                    return Err(ConfigError::WorldWritable { path: path.to_owned() });
                }
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                Self::parse(&text, &path.display().to_string())
            }
            None => Self::parse(DEFAULT_TOML, "<embedded default>"),
        }
    }

    /// Parses and validates; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        // toml's message carries the line, column and key of the problem.
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.into(), message: e.to_string() })?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, value: String, reason| ConfigError::Invalid { path: origin.into(), key: key.into(), value, reason };
        let c = &self.capture;
        if !c.ring_buffer_bytes.is_power_of_two() || c.ring_buffer_bytes < 4096 {
            return Err(invalid("capture.ring_buffer_bytes", c.ring_buffer_bytes.to_string(), "must be a power of two, at least 4096"));
        }
        if c.max_call_bytes == 0 || c.max_call_bytes > gauge_common::tls::MAX_CALL_BYTES {
            return Err(invalid("capture.max_call_bytes", c.max_call_bytes.to_string(), "must be between 1 and 4194304"));
        }
        if c.plain_http_ports.len() > 64 || c.plain_http_ports.contains(&0) {
            return Err(invalid("capture.plain_http_ports", format!("{:?}", c.plain_http_ports), "at most 64 ports, none of them 0"));
        }
        if c.rescan_interval < std::time::Duration::from_secs(1) {
            return Err(invalid("capture.rescan_interval", format!("{:?}", c.rescan_interval), "must be at least \"1s\""));
        }
        if self.http.max_connections == 0 {
            return Err(invalid("http.max_connections", "0".into(), "must be at least 1"));
        }
        if c.queue_events == 0 {
            return Err(invalid("capture.queue_events", "0".into(), "must be at least 1"));
        }
        if c.queue_bytes < 1 << 20 {
            return Err(invalid("capture.queue_bytes", c.queue_bytes.to_string(), "must be at least 1048576 (1 MiB)"));
        }
        if self.http.max_buffered_bytes < 1 << 20 {
            return Err(invalid("http.max_buffered_bytes", self.http.max_buffered_bytes.to_string(), "must be at least 1048576 (1 MiB)"));
        }
        if let Some(label) = self.labels.zero() {
            return Err(invalid(&format!("labels.{label}"), "0".into(), "must be at least 1"));
        }
        if self.outcomes.window_secs < 60 {
            return Err(invalid("outcomes.window_secs", self.outcomes.window_secs.to_string(), "must be at least 60"));
        }
        if self.attribution.max_processes == 0 {
            return Err(invalid("attribution.max_processes", "0".into(), "must be at least 1"));
        }
        for (i, rule) in self.agents.iter().enumerate() {
            if rule.name.trim().is_empty() {
                return Err(invalid(&format!("agents[{i}].name"), format!("{:?}", rule.name), "must name the agent"));
            }
        }
        if let Err((key, reason)) = self.anomaly.validate() {
            return Err(invalid(key, String::new(), reason));
        }
        if let Some(Err((key, reason))) = self.otlp.as_ref().map(crate::export::otlp::OtlpConfig::validate) {
            return Err(invalid(key, String::new(), reason));
        }
        let mut names = std::collections::HashSet::new();
        for (i, policy) in self.policies.iter().enumerate() {
            if let Err(reason) = policy.validate() {
                return Err(invalid(&format!("policies[{i}]"), format!("{:?}", policy.name), reason));
            }
            if !names.insert(policy.name.as_str()) {
                return Err(invalid(&format!("policies[{i}].name"), format!("{:?}", policy.name), "names a policy already defined: names must be unique"));
            }
        }
        for (i, entry) in self.prices.iter().enumerate() {
            if let Err(reason) = entry.validate() {
                let model = entry.model.clone().unwrap_or_default();
                return Err(invalid(&format!("prices[{i}]"), format!("{model:?}"), reason));
            }
        }
        Ok(())
    }

    pub fn reassembly_limits(&self) -> Limits {
        Limits {
            max_connections: self.http.max_connections,
            idle_timeout_ns: self.http.idle_timeout_secs.saturating_mul(1_000_000_000),
            max_buffered_bytes: self.http.max_buffered_bytes,
        }
    }

    pub fn capture_options(&self) -> CaptureOptions {
        CaptureOptions {
            load: LoadOptions {
                ring_buffer_bytes: self.capture.ring_buffer_bytes,
                max_call_bytes: self.capture.max_call_bytes,
                // Auto is settled by the canary when the capture starts.
                return_probes: self.capture.return_probes != ReturnProbes::Off,
            },
            queue_events: self.capture.queue_events,
            queue_bytes: self.capture.queue_bytes,
            extra_targets: self.capture.extra_targets.clone(),
            plain_http_ports: self.capture.plain_http_ports.clone(),
            plain_http: self.capture.plain_http,
            rescan_interval: self.capture.rescan_interval,
            return_probes: self.capture.return_probes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_equals_built_in_defaults() {
        let config = Config::load(None).expect("embedded default parses");
        assert_eq!(config, Config::parse("", "empty").expect("empty parses"));
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:9977");
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = Config::parse("[capture]\nring_bufer_bytes = 4096\n", "gauge.toml").expect_err("typo").to_string();
        assert!(err.contains("gauge.toml") && err.contains("ring_bufer_bytes") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn invalid_values_say_what_is_allowed() {
        let err = Config::parse("[capture]\nring_buffer_bytes = 5000\n", "g.toml").expect_err("not a power of two").to_string();
        assert!(err.contains("capture.ring_buffer_bytes = 5000") && err.contains("power of two"), "{err}");
        let err = Config::parse("[capture]\nmax_call_bytes = 0\n", "g.toml").expect_err("zero").to_string();
        assert!(err.contains("capture.max_call_bytes"), "{err}");
    }

    /// Checks that `toml` is refused with an error naming the file, `line` and `key`.
    fn refused(toml: &str, line: usize, key: &str) {
        let err = Config::parse(toml, "gauge.toml").expect_err("must be refused").to_string();
        let line = format!("line {line}");
        assert!(err.contains("gauge.toml") && err.contains(&line) && err.contains(key), "want {line} and {key} in: {err}");
    }

    #[test]
    fn bad_agent_rules_and_prices_name_file_line_and_key() {
        refused("[[agents]]\nname = \"a\"\nmatch = { cmdline = \"(unclosed\" }\n", 3, "cmdline");
        refused("[[agents]]\nname = \"a\"\nmatch = { comand = \"x\" }\n", 3, "comand");
        refused("[[agents]]\nname = \"a\"\nmatch = {}\n", 3, "at least one of");
        refused("[[prices]]\nmodel = \"m\"\ninput = -1\noutput = 1\n", 3, "input");
        refused("[[prices]]\nmodel = \"m\"\ninput = 1\noutput = 1\ncache_reed = 1\n", 5, "cache_reed");
        refused("[attribution.workflow]\nrules = [{ match = \"[\", name = \"x\" }]\n", 2, "match");
        let err = Config::parse("[[prices]]\ninput = 1\noutput = 1\n", "gauge.toml").expect_err("no model").to_string();
        assert!(err.contains("prices[0]") && err.contains("model"), "{err}");
        let err = Config::parse("[[agents]]\nname = \"\"\nmatch = { comm = \"x\" }\n", "g.toml").expect_err("no name").to_string();
        assert!(err.contains("agents[0].name"), "{err}");
    }

    #[test]
    fn a_config_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gauge.toml");
        std::fs::write(&path, "").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let err = Config::load(Some(&path)).expect_err("world-writable").to_string();
        assert!(err.contains("writable by other users") && err.contains("chmod o-w"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(Config::load(Some(&path)).is_ok());
    }

    #[test]
    fn a_full_attribution_config_parses() {
        let config = Config::parse(
            r#"
            [attribution]
            agent_env = ""
            [attribution.customer]
            enabled = true
            rules = [{ match = '^(acme)-', name = '$1' }]
            [[agents]]
            name = "support-bot"
            [agents.match]
            cmdline = 'support_bot\.py'
            env = "GAUGE_TEAM=support"
            [[prices]]
            model_regex = "house-.*"
            input = 0.1
            output = 0.2
            long_context = { above_input_tokens = 100000, input = 0.2, output = 0.4 }
            [outcomes]
            window_secs = 3600
            [labels]
            model = 50
            "#,
            "full.toml",
        )
        .expect("parses");
        assert_eq!(config.agents.len(), 1);
        assert!(config.attribution.customer.enabled && config.attribution.agent_env.is_empty());
        assert_eq!(config.labels.model, 50);
    }

    #[test]
    fn plain_http_is_auto_on_or_off() {
        assert_eq!(Config::load(None).expect("default").capture.plain_http, PlainHttp::Auto);
        let config = Config::parse("[capture]\nplain_http = \"on\"\n", "g.toml").expect("on parses");
        assert_eq!(config.capture_options().plain_http, PlainHttp::On);
        let err = Config::parse("[capture]\nplain_http = \"always\"\n", "g.toml").expect_err("not a mode").to_string();
        assert!(err.contains("plain_http") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn return_probes_are_auto_on_or_off() {
        assert_eq!(Config::load(None).expect("default").capture.return_probes, ReturnProbes::Auto);
        let config = Config::parse("[capture]\nreturn_probes = \"off\"\n", "g.toml").expect("off parses");
        assert_eq!(config.capture.return_probes, ReturnProbes::Off);
        let options = config.capture_options();
        assert!(!options.load.return_probes && options.return_probes == ReturnProbes::Off);
        assert!(Config::parse("[capture]\nreturn_probes = \"on\"\n", "g.toml").expect("on").capture_options().load.return_probes);
        let err = Config::parse("[capture]\nreturn_probes = \"maybe\"\n", "g.toml").expect_err("not a mode").to_string();
        assert!(err.contains("return_probes") && err.contains("line 2"), "{err}");
    }
}
