//! One end-to-end test's world: a mock provider with its certificate, and a daemon
//! watching; and reading `/metrics` by label.

use std::{
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use crate::{
    agent::Daemon,
    clients,
    mock::{MockLlm, write_certificate},
};

pub type Labels<'a> = [(&'a str, &'a str)];

pub fn with<'a>(base: &Labels<'a>, extra: &Labels<'a>) -> Vec<(&'a str, &'a str)> {
    base.iter().chain(extra).copied().collect()
}

/// Sum of the samples of `metric` whose labels include every `key="value"` pair.
pub fn sum(metrics: &str, metric: &str, labels: &Labels<'_>) -> f64 {
    metrics
        .lines()
        .filter(|l| l.strip_prefix(metric).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One test's world: a mock provider with its certificate, and a daemon watching.
pub struct World {
    pub cert: PathBuf,
    pub mock: MockLlm,
    pub daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl World {
    /// `config` is the daemon's TOML config.
    pub fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = write_certificate(dir.path());
        let mock = MockLlm::start(&cert, &key);
        let mut daemon = Daemon::start(config);
        daemon.wait_healthy();
        Self { cert, mock, daemon, _dir: dir }
    }

    /// Runs an SDK script (see `gauge_tests::sdk`) against the mock; it must print "ok".
    pub fn python(&self, what: &str, script: &str) {
        self.python_with(what, script, &[]);
    }

    /// The same as agent `agent` (by `GAUGE_AGENT`, which the default config
    /// honours), so that other tests' clients on the host never count with it.
    pub fn python_as(&self, what: &str, script: &str, agent: &str) {
        self.python_with(what, script, &[("GAUGE_AGENT", agent)]);
    }

    fn python_with(&self, what: &str, script: &str, env: &[(&str, &str)]) {
        let mut sdk = clients::python(&self.cert, script);
        sdk.env("GAUGE_TEST_PORT", self.mock.port.to_string()).env("SSL_CERT_FILE", &self.cert);
        sdk.envs(env.iter().copied());
        let (_, out) = clients::run(what, &mut sdk);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok", "{what}");
    }

    /// Scrapes once every label set has at least its number of requests (or after 20 s).
    pub fn scrape(&self, wanted: &[(&Labels<'_>, f64)]) -> Scrape<'_> {
        scrape(&self.daemon, wanted)
    }
}

/// [`World::scrape`] of any daemon.
pub fn scrape<'a>(daemon: &'a Daemon, wanted: &[(&Labels<'_>, f64)]) -> Scrape<'a> {
    let start = Instant::now();
    loop {
        let (_, text) = daemon.get("/metrics").expect("scrape");
        let done = wanted.iter().all(|(labels, n)| sum(&text, "gauge_llm_requests_total", labels) >= *n);
        if done || start.elapsed() > Duration::from_secs(20) {
            return Scrape { text, daemon };
        }
        thread::sleep(Duration::from_millis(100));
    }
}

pub struct Scrape<'a> {
    pub text: String,
    daemon: &'a Daemon,
}

impl Scrape<'_> {
    pub fn check(&self, metric: &str, labels: &Labels<'_>, want: f64) {
        let got = sum(&self.text, metric, labels);
        assert_eq!(got, want, "{metric} {labels:?}\n{}\ndaemon log:\n{}", self.text, self.daemon.log.text());
    }

    /// Checks the token kinds of one label set.
    pub fn tokens(&self, labels: &Labels<'_>, kinds: &[(&str, f64)]) {
        for (kind, want) in kinds {
            self.check("gauge_llm_tokens_total", &with(labels, &[("kind", kind)]), *want);
        }
    }

    pub fn free_of(&self, secret: &str) {
        assert!(!self.text.contains(secret) && !self.daemon.log.text().contains(secret), "{secret} leaked");
    }
}

