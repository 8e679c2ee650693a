//! `[otlp]`: the endpoint, headers (never logged) and intervals, checked at load.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::OtlpError;

/// `[otlp]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's base URL; `/v1/traces` and `/v1/metrics` are appended.
    #[serde(deserialize_with = "endpoint")]
    pub endpoint: String,
    /// Extra request headers (e.g. an API key); values are never logged.
    #[serde(default)]
    pub headers: Headers,
    /// A file (mode 600) of `Name: value` lines, added to `headers`; read at start.
    #[serde(default)]
    pub headers_file: Option<PathBuf>,
    /// Per POST.
    #[serde(default = "ten_seconds", deserialize_with = "crate::config::duration")]
    pub timeout: Duration,
    #[serde(default = "service_name")]
    pub service_name: String,
    /// How often metrics are sent (each holds the calls since the last: delta).
    #[serde(default = "ten_seconds", deserialize_with = "crate::config::duration")]
    pub export_interval: Duration,
    /// Calls waiting for the export thread; beyond, they are dropped and counted.
    #[serde(default = "queue")]
    pub queue: usize,
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
fn service_name() -> String {
    "gauge-agent".into()
}
fn queue() -> usize {
    4096
}

impl OtlpConfig {
    /// Checks what serde cannot: `(key, reason)` on failure.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.queue == 0 {
            return Err(("otlp.queue", "must be at least 1"));
        }
        if self.timeout.is_zero() {
            return Err(("otlp.timeout", "must be more than 0"));
        }
        if self.export_interval < Duration::from_secs(1) {
            return Err(("otlp.export_interval", "must be at least \"1s\""));
        }
        if self.service_name.trim().is_empty() {
            return Err(("otlp.service_name", "must not be empty"));
        }
        Ok(())
    }
}

/// Header names and values; `Debug` shows the names only, so a logged config never
/// carries a key.
#[derive(Clone, Default, PartialEq)]
pub struct Headers(pub BTreeMap<String, String>);

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, String>::deserialize(d)?;
        for (name, value) in &map {
            check_header(name, value).map_err(serde::de::Error::custom)?;
        }
        Ok(Self(map))
    }
}

/// A header a request may carry: a token name, a value without line breaks. The
/// message names the header, never its value.
fn check_header(name: &str, value: &str) -> Result<(), String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!("header name {name:?} is not a valid HTTP header name"));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(format!("the value of header {name:?} holds a control character (a line break?)"));
    }
    Ok(())
}

/// An `http://` or `https://` URL without credentials in it, so that a bad one is
/// reported with its line and key.
fn endpoint<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = String::deserialize(d)?;
    let rest = text.strip_prefix("http://").or_else(|| text.strip_prefix("https://"));
    let Some(rest) = rest else {
        return Err(serde::de::Error::custom(format!("{text:?} is not an http:// or https:// URL (OTLP/HTTP, e.g. \"http://127.0.0.1:4318\")")));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        return Err(serde::de::Error::custom("the endpoint must not hold credentials (user:pass@): put them in headers or headers_file"));
    }
    if authority.is_empty() {
        return Err(serde::de::Error::custom(format!("{text:?} names no host")));
    }
    Ok(text.trim_end_matches('/').to_owned())
}

/// Reads `Name: value` lines (blank lines and `#` comments skipped); the file must
/// be private to its owner, as it holds secrets.
pub fn read_headers_file(path: &Path) -> Result<BTreeMap<String, String>, OtlpError> {
    use std::os::unix::fs::PermissionsExt as _;
    let read = |source| OtlpError::Read { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(read)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(OtlpError::Readable { path: path.to_owned() });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    let mut headers = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: String| OtlpError::Line { path: path.to_owned(), line: i + 1, reason };
        let (name, value) = line.split_once(':').ok_or_else(|| bad("not `Name: value`".into()))?;
        let (name, value) = (name.trim(), value.trim());
        check_header(name, value).map_err(bad)?;
        headers.insert(name.to_owned(), value.to_owned());
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn config_checks_endpoint_and_headers_and_hides_values() {
        let parse = |text: &str| toml::from_str::<OtlpConfig>(text);
        let config = parse("endpoint = \"http://127.0.0.1:4318/\"\nheaders = { \"x-api-key\" = \"s3cret\" }\n").expect("parses");
        assert_eq!(config.endpoint, "http://127.0.0.1:4318");
        assert_eq!((config.timeout, config.export_interval, config.queue), (Duration::from_secs(10), Duration::from_secs(10), 4096));
        assert!(!format!("{config:?}").contains("s3cret"));
        let err = parse("endpoint = \"grpc://x\"\n").expect_err("scheme").to_string();
        assert!(err.contains("http://") && err.contains("line 1"), "{err}");
        let err = parse("endpoint = \"http://u:p@x\"\n").expect_err("credentials").to_string();
        assert!(err.contains("credentials"), "{err}");
        let err = parse("endpoint = \"http://x\"\nheaders = { \"bad header\" = \"v\" }\n").expect_err("name").to_string();
        assert!(err.contains("line 2") && err.contains("bad header"), "{err}");
    }

    #[test]
    fn the_otlp_section_is_checked_with_file_line_and_key() {
        use crate::config::Config;
        assert!(Config::load(None).expect("default").otlp.is_none(), "off by default");
        let err = Config::parse("[otlp]\nendpoint = \"ftp://x\"\n", "g.toml").expect_err("scheme").to_string();
        assert!(err.contains("g.toml") && err.contains("line 2") && err.contains("endpoint"), "{err}");
        let err = Config::parse("[otlp]\nendpoint = \"http://x\"\nqueue = 0\n", "g.toml").expect_err("queue").to_string();
        assert!(err.contains("g.toml") && err.contains("otlp.queue"), "{err}");
        let err = Config::parse("[otlp]\nendpoint = \"http://x\"\nexport_interval = \"10ms\"\n", "g.toml").expect_err("interval").to_string();
        assert!(err.contains("otlp.export_interval"), "{err}");
        let err = Config::parse("[otlp]\nendpoint = \"http://x\"\ntimeuot = \"1s\"\n", "g.toml").expect_err("typo").to_string();
        assert!(err.contains("line 3") && err.contains("timeuot"), "{err}");
        let config = Config::parse("[otlp]\nendpoint = \"https://otlp.example:4318\"\n", "g.toml").expect("https parses");
        assert_eq!(config.otlp.map(|o| o.service_name).as_deref(), Some("gauge-agent"));
    }

    #[test]
    fn a_headers_file_is_read_and_must_be_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("headers");
        std::fs::write(&path, "# key\nx-api-key: s3cret\n\nauthorization: Bearer t\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(read_headers_file(&path), Err(OtlpError::Readable { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let headers = read_headers_file(&path).expect("reads");
        assert_eq!(headers.get("x-api-key").map(String::as_str), Some("s3cret"));
        std::fs::write(&path, "no colon here\n").expect("write");
        let err = read_headers_file(&path).expect_err("bad line").to_string();
        assert!(err.contains("line 1") && !err.contains("no colon"), "{err}");
    }

}
