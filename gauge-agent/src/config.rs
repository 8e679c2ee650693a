//! The TOML configuration: typed, with defaults in one place (`default.toml`, which
//! is also the embedded configuration) and errors that name the file, line and key.

use std::{net::SocketAddr, path::{Path, PathBuf}};

use serde::Deserialize;

use crate::{
    reassembly::Limits,
    source::{kernel::LoadOptions, runtime::CaptureOptions},
};

/// The configuration used when no `--config` is given.
pub const DEFAULT_TOML: &str = include_str!("../default.toml");

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub capture: Capture,
    #[serde(default)]
    pub http: Http,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    pub max_connections: usize,
    pub idle_timeout_secs: u64,
}

impl Default for Http {
    fn default() -> Self {
        Self { max_connections: 16384, idle_timeout_secs: 300 }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Capture {
    pub ring_buffer_bytes: u32,
    pub max_call_bytes: u32,
    pub queue_events: usize,
    pub extra_targets: Vec<PathBuf>,
}

impl Default for Server {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 9977)) }
    }
}

impl Default for Capture {
    fn default() -> Self {
        Self { ring_buffer_bytes: 16 << 20, max_call_bytes: gauge_common::tls::MAX_CALL_BYTES, queue_events: 65536, extra_targets: Vec::new() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config {path}: {key} = {value}: {reason}")]
    Invalid { path: String, key: &'static str, value: String, reason: &'static str },
}

impl Config {
    /// Loads `path`, or the embedded default when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(path) => {
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
        let invalid = |key, value: String, reason| ConfigError::Invalid { path: origin.into(), key, value, reason };
        let c = &self.capture;
        if !c.ring_buffer_bytes.is_power_of_two() || c.ring_buffer_bytes < 4096 {
            return Err(invalid("capture.ring_buffer_bytes", c.ring_buffer_bytes.to_string(), "must be a power of two, at least 4096"));
        }
        if c.max_call_bytes == 0 || c.max_call_bytes > gauge_common::tls::MAX_CALL_BYTES {
            return Err(invalid("capture.max_call_bytes", c.max_call_bytes.to_string(), "must be between 1 and 4194304"));
        }
        if self.http.max_connections == 0 {
            return Err(invalid("http.max_connections", "0".into(), "must be at least 1"));
        }
        if c.queue_events == 0 {
            return Err(invalid("capture.queue_events", "0".into(), "must be at least 1"));
        }
        Ok(())
    }

    pub fn reassembly_limits(&self) -> Limits {
        Limits {
            max_connections: self.http.max_connections,
            idle_timeout_ns: self.http.idle_timeout_secs.saturating_mul(1_000_000_000),
        }
    }

    pub fn capture_options(&self) -> CaptureOptions {
        CaptureOptions {
            load: LoadOptions { ring_buffer_bytes: self.capture.ring_buffer_bytes, max_call_bytes: self.capture.max_call_bytes },
            queue_events: self.capture.queue_events,
            extra_targets: self.capture.extra_targets.clone(),
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
}
