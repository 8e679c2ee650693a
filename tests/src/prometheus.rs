//! A real Prometheus server (Debian's `prometheus` package) scraping the daemon, and
//! queries through its HTTP API; plus what the checks of `deploy/` share: finding
//! `promtool`, the metric families of a scrape, the metric names in an expression.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::agent::{http_get, wait_timeout};

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// An executable on `PATH` (or in `/usr/bin`), e.g. `prometheus` or `promtool`.
/// None when missing, which under `CI=true` is a failure: a skip would hide untested
/// rules. `cargo xtask setup` installs Debian's `prometheus` package (both tools).
pub fn tool(name: &str, test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file());
    if found.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: `{name}` is missing; in CI (CI=true) it must be installed (`cargo xtask setup` installs Debian's prometheus package)");
        }
        eprintln!("skipping {test}: `{name}` not found (apt-get install prometheus, or `cargo xtask setup`)");
    }
    found
}

/// One sample of a query result: its labels (`__name__` included when kept) and value.
pub type Sample = (BTreeMap<String, String>, f64);

/// `prometheus` on a free loopback port, with its own config and storage in a temp
/// directory, scraping `targets` every second; killed when dropped (and when the
/// test process dies, by its parent-death signal).
pub struct Prometheus {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`, job `gauge`, path
    /// `/metrics`) every second, evaluating `rule_files` every second, and returns
    /// once it is ready. Panics when the binary is missing or does not come up.
    pub fn start(binary: &Path, targets: &[&str], rule_files: &[PathBuf]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        let quoted = |items: &mut dyn Iterator<Item = String>| items.map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
        let text = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{rules}]\n\
             scrape_configs:\n  - job_name: gauge\n    metrics_path: /metrics\n    static_configs:\n      - targets: [{targets}]\n",
            rules = quoted(&mut rule_files.iter().map(|p| p.display().to_string())),
            targets = quoted(&mut targets.iter().map(|t| (*t).to_owned())),
        );
        std::fs::write(&config, text).expect("write prometheus.yml");
        // A free port is taken by binding :0 and letting it go; should Prometheus
        // lose the race for it, another is tried.
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            let addr = format!("127.0.0.1:{port}");
            let log_path = dir.path().join("prometheus.log");
            let log = std::fs::File::create(&log_path).expect("create prometheus.log");
            let mut cmd = Command::new(binary);
            cmd.arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log));
            {
                use std::os::unix::process::CommandExt as _;
                // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        Ok(())
                    });
                }
            }
            let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            let start = Instant::now();
            loop {
                if http_get(&addr, "/-/ready").is_some_and(|(code, _)| code == 200) {
                    return Self { child, addr, dir };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if start.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("prometheus not ready in 30 s:\n{}", std::fs::read_to_string(&log_path).unwrap_or_default());
                }
                thread::sleep(Duration::from_millis(50));
            }
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
        }
        panic!("prometheus exited before it was ready (three tries):\n{last_log}");
    }

    /// What Prometheus logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET an API path; the JSON body, whatever the status (errors carry JSON too).
    pub fn api(&self, path_and_query: &str) -> Result<Value, String> {
        let (code, body) = http_get(&self.addr, path_and_query).ok_or_else(|| format!("GET {path_and_query}: no response"))?;
        serde_json::from_str(&body).map_err(|e| format!("GET {path_and_query}: HTTP {code}, not JSON ({e}): {body}"))
    }

    /// An instant query at the current time: its samples, or Prometheus's error
    /// (`errorType: error`, e.g. a parse error).
    pub fn try_query(&self, expr: &str) -> Result<Vec<Sample>, String> {
        let response = self.api(&format!("/api/v1/query?query={}", percent_encode(expr)))?;
        if response["status"] != "success" {
            return Err(format!("{}: {}", response["errorType"], response["error"]));
        }
        let data = &response["data"];
        let value = |pair: &Value| -> Result<f64, String> {
            let text = pair.get(1).and_then(Value::as_str).ok_or_else(|| format!("no value in {pair}"))?;
            text.parse().map_err(|e| format!("value {text:?}: {e}"))
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|sample| {
                    let labels = sample["metric"]
                        .as_object()
                        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect())
                        .unwrap_or_default();
                    Ok((labels, value(&sample["value"])?))
                })
                .collect(),
            Some("scalar") => Ok(vec![(BTreeMap::new(), value(&data["result"])?)]),
            other => Err(format!("result type {other:?} of {expr}: {data}")),
        }
    }

    /// An instant query that must succeed.
    pub fn query(&self, expr: &str) -> Vec<Sample> {
        self.try_query(expr).unwrap_or_else(|e| panic!("query {expr}: {e}\nprometheus log:\n{}", self.log()))
    }

    /// Queries `expr` until `done` holds for its samples (or `timeout` passes: then
    /// the last samples are returned, for the caller's assertion to show them).
    pub fn query_until(&self, expr: &str, timeout: Duration, done: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
        let start = Instant::now();
        loop {
            let samples = self.query(expr);
            if done(&samples) || start.elapsed() > timeout {
                return samples;
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `/api/v1/rules`: every rule loaded, as `(group, rule)` JSON objects.
    pub fn rules(&self) -> Vec<(String, Value)> {
        let response = self.api("/api/v1/rules").unwrap_or_else(|e| panic!("{e}"));
        let groups = response["data"]["groups"].as_array().cloned().unwrap_or_default();
        groups
            .iter()
            .flat_map(|g| {
                let name = g["name"].as_str().unwrap_or_default().to_owned();
                g["rules"].as_array().cloned().unwrap_or_default().into_iter().map(move |r| (name.clone(), r))
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = wait_timeout(&mut self.child, Duration::from_secs(10));
    }
}

/// `application/x-www-form-urlencoded`-safe encoding of a query parameter.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The metric families of a scrape by their `# TYPE` lines: name -> type
/// (`counter`, `gauge`, `histogram`, `info`, ...). OpenMetrics names counters
/// without `_total` and histograms without `_bucket`/`_sum`/`_count`.
pub fn families(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

/// Whether a series name used in a query is one a family of the scrape exports:
/// `X_total` of a counter `X`, `X_bucket`/`X_sum`/`X_count` of a histogram `X`,
/// `X_info` of an info `X`, or `X` itself when `X` is a gauge (or untyped).
pub fn exported(families: &BTreeMap<String, String>, name: &str) -> bool {
    let family = |suffix: &str, kinds: &[&str]| {
        name.strip_suffix(suffix).and_then(|base| families.get(base)).is_some_and(|kind| kinds.contains(&kind.as_str()))
    };
    family("_total", &["counter"])
        || family("_bucket", &["histogram"])
        || family("_sum", &["histogram", "summary"])
        || family("_count", &["histogram", "summary"])
        || family("_info", &["info"])
        || families.get(name).is_some_and(|kind| ["gauge", "unknown", "untyped"].contains(&kind.as_str()))
}

/// The metric names beginning `gauge_` in a PromQL expression: identifiers not
/// preceded by an identifier character or `:` (so the recording rule
/// `agent:gauge_llm_cost_usd:rate5m` is not one), and not inside a quoted string.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut quote: Option<char> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if let Some(q) = quote {
            if c == '\\' {
                i += 1;
            } else if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        if c == '"' || c == '\'' || c == '`' {
            quote = Some(c);
            i += 1;
            continue;
        }
        if is_ident(c) && (i == 0 || !is_ident(chars[i - 1])) {
            let end = (i..chars.len()).find(|&j| !is_ident(chars[j])).unwrap_or(chars.len());
            let word: String = chars[i..end].iter().collect();
            if word.starts_with("gauge_") && !word.contains(':') {
                names.insert(word);
            }
            i = end;
            continue;
        }
        i += 1;
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_outside_strings_and_recording_rules() {
        let expr = r#"sum by (agent) (rate(gauge_llm_cost_usd_total{agent=~"gauge_x"}[5m])) / agent:gauge_llm_requests:rate5m + gauge_probes_attached"#;
        let names: Vec<_> = metric_names(expr).into_iter().collect();
        assert_eq!(names, ["gauge_llm_cost_usd_total", "gauge_probes_attached"]);
    }

    #[test]
    fn series_names_map_to_their_families() {
        let scrape = "# TYPE gauge_llm_requests counter\n# TYPE gauge_llm_request_duration_seconds histogram\n# TYPE gauge_probes_attached gauge\n";
        let f = families(scrape);
        assert!(exported(&f, "gauge_llm_requests_total"));
        assert!(exported(&f, "gauge_llm_request_duration_seconds_bucket"));
        assert!(exported(&f, "gauge_probes_attached"));
        assert!(!exported(&f, "gauge_llm_requests"));
        assert!(!exported(&f, "gauge_probes_attached_total"));
        assert!(!exported(&f, "gauge_nothing_total"));
    }

    #[test]
    fn query_parameters_are_encoded() {
        assert_eq!(percent_encode(r#"a{b="c"}[5m] +"#), "a%7Bb%3D%22c%22%7D%5B5m%5D%20%2B");
    }
}
