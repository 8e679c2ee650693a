//! Fleet budgets: a budget (`spend_source = "prometheus"`) whose spend is the answer
//! of a PromQL instant query, so that one budget holds across many hosts.
//!
//! Each such policy has a thread of its own that asks Prometheus every `refresh`
//! (with a `timeout`) and publishes the latest answer, with when it came, in a shared
//! cell. Decisions never wait for Prometheus: they read the cell ([`judge`]). An
//! answer older than [`super::config::STALE_REFRESHES`] refreshes, or none at all, is no answer, and
//! the policy's `on_error` says what then holds (see `PolicyStage::refresh_fleet`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, PoisonError,
        mpsc::{RecvTimeoutError, Sender, TryRecvError},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::Counter, family::Family, gauge::ConstGauge},
    registry::Registry,
};
use serde::Deserialize;

use super::config::{PolicyConfig, PrometheusSpend, SpendSource};

/// The largest answer read: one sample per series of a mistaken query is small.
const MAX_ANSWER_BYTES: u64 = 1 << 20;

/// Why a query gave no spend; `reason()` is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("no answer within the timeout")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("Prometheus refused the query ({kind}): {message}")]
    Query { kind: String, message: String },
    #[error("unexpected answer: {0}")]
    Parse(String),
    #[error("bearer token file {path}: {why}")]
    Token { path: String, why: String },
}

impl QueryError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect(_) => "connect",
            Self::Status(_) | Self::Http(_) => "http",
            Self::Query { .. } => "query",
            Self::Parse(_) => "parse",
            Self::Token { .. } => "token",
        }
    }

    fn from_ureq(error: ureq::Error) -> Self {
        use std::io::ErrorKind;
        match error {
            ureq::Error::Timeout(_) => Self::Timeout,
            ureq::Error::Io(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => Self::Timeout,
            ureq::Error::Io(e) => Self::Connect(e.to_string()),
            ureq::Error::HostNotFound => Self::Connect("host not found".into()),
            ureq::Error::ConnectionFailed => Self::Connect("connection failed".into()),
            ureq::Error::StatusCode(code) => Self::Status(code),
            other => Self::Http(other.to_string()),
        }
    }
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    data: Option<Data>,
    #[serde(rename = "errorType", default)]
    error_type: String,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum Data {
    Vector(Vec<Sample>),
    Scalar((f64, String)),
    Matrix(serde_json::Value),
    String(serde_json::Value),
}

#[derive(Deserialize)]
struct Sample {
    value: (f64, String),
}

/// The spend in USD a `/api/v1/query` answer gives: a scalar, or the sum of an
/// instant vector's samples (none is 0: no series, no spend). NaN, infinities and
/// negative spend are refused, as are range results.
pub fn parse_answer(body: &str) -> Result<f64, QueryError> {
    let answer: Answer = serde_json::from_str(body).map_err(|e| QueryError::Parse(format!("not a Prometheus API answer: {e}")))?;
    if answer.status != "success" {
        return Err(QueryError::Query { kind: answer.error_type, message: answer.error });
    }
    let values: Vec<String> = match answer.data {
        Some(Data::Vector(samples)) => samples.into_iter().map(|s| s.value.1).collect(),
        Some(Data::Scalar((_, value))) => vec![value],
        Some(Data::Matrix(series)) => {
            let n = series.as_array().map_or(0, Vec::len);
            return Err(QueryError::Parse(format!("a range vector ({n} series): the query must be an instant vector or a scalar")));
        }
        Some(Data::String(text)) => {
            return Err(QueryError::Parse(format!("a string ({text}): the query must be an instant vector or a scalar")));
        }
        None => return Err(QueryError::Parse("no data".into())),
    };
    let mut sum = 0.0;
    for value in values {
        let usd: f64 = value.parse().map_err(|_| QueryError::Parse(format!("{value:?} is not a number")))?;
        if !usd.is_finite() || usd < 0.0 {
            return Err(QueryError::Parse(format!("{value:?} is not a spend in USD")));
        }
        sum += usd;
    }
    Ok(sum)
}

/// What an HTTP answer with `status` and `body` says.
fn answer(status: u16, body: &str) -> Result<f64, QueryError> {
    let ok = (200..300).contains(&status);
    match parse_answer(body) {
        Ok(usd) if ok => Ok(usd),
        Ok(_) => Err(QueryError::Status(status)),
        // Prometheus answers a bad query with 400 and its reason in JSON.
        Err(e @ QueryError::Query { .. }) => Err(e),
        Err(_) if !ok => Err(QueryError::Status(status)),
        Err(e) => Err(e),
    }
}

/// The latest answer of a fleet budget's fetcher.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    /// The last spend Prometheus gave, and when (the decision clock, ns).
    pub answer: Option<(f64, u64)>,
    /// When the last spend came, for the age metric.
    pub answered: Option<Instant>,
    /// Why the latest query failed, if it did.
    pub error: Option<&'static str>,
    /// Whether any query has finished, answered or not.
    pub asked: bool,
}

/// What a reading is worth at `now_ns`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Judged {
    /// A spend no older than the staleness bound.
    Fresh(f64),
    /// The first query has not finished yet (at most `timeout` after the fetcher
    /// started): there is nothing to fail over from yet.
    Pending,
    /// No usable answer: the latest error's reason, or "stale".
    Unusable(&'static str),
}

/// The reading as the next decision should see it.
pub fn judge(reading: &Reading, now_ns: u64, stale_after: Duration) -> Judged {
    let stale_ns = u64::try_from(stale_after.as_nanos()).unwrap_or(u64::MAX);
    match reading.answer {
        Some((usd, at_ns)) if now_ns.saturating_sub(at_ns) <= stale_ns => Judged::Fresh(usd),
        Some(_) => Judged::Unusable(reading.error.unwrap_or("stale")),
        None if !reading.asked => Judged::Pending,
        None => Judged::Unusable(reading.error.unwrap_or("no answer")),
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    policy: String,
    reason: &'static str,
}

type Cell = Arc<Mutex<Reading>>;
type Cells = Arc<Mutex<BTreeMap<String, Cell>>>;

fn read(cell: &Mutex<Reading>) -> Reading {
    *cell.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Fetcher {
    config: PrometheusSpend,
    cell: Cell,
    /// Dropped to stop the thread: it wakes at once from its wait between queries,
    /// or ends after the query in flight without publishing it.
    _stop: Sender<()>,
}

/// The fetchers of the fleet budgets, one thread per policy, and their metrics.
pub struct FleetBudgets {
    /// Set once the daemon starts them; until then (replay, unit tests) no thread
    /// runs and fleet budgets count locally.
    clock: Option<fn() -> u64>,
    fetchers: HashMap<String, Fetcher>,
    /// The cells, by policy, as the metrics collector reads them.
    cells: Cells,
    errors: Family<ErrorLabels, Counter>,
}

impl FleetBudgets {
    pub fn register(registry: &mut Registry) -> Self {
        let cells = Cells::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "gauge_policy_remote_query_errors",
            "Fleet budget queries to Prometheus that gave no spend, by policy and reason (timeout, connect, http, query, parse, token).",
            errors.clone(),
        );
        registry.register_collector(Box::new(FleetCollector(cells.clone())));
        Self { clock: None, fetchers: HashMap::new(), cells, errors }
    }

    /// Starts asking for the fleet budgets of `policies`; `clock` is the decision
    /// clock (CLOCK_MONOTONIC ns, the events' clock).
    pub fn start(&mut self, clock: fn() -> u64, policies: &[PolicyConfig]) {
        self.clock = Some(clock);
        self.sync(policies);
    }

    /// Brings the fetchers in line with `policies` (a reload): a policy kept as it
    /// was keeps its fetcher and cached answer; removed or changed ones are stopped.
    pub fn sync(&mut self, policies: &[PolicyConfig]) {
        let Some(clock) = self.clock else { return };
        let wanted: HashMap<&str, &PrometheusSpend> = policies
            .iter()
            .filter(|p| p.spend_source == SpendSource::Prometheus)
            .filter_map(|p| Some((p.name.as_str(), p.prometheus.as_ref()?)))
            .collect();
        self.fetchers.retain(|name, f| {
            let keep = wanted.get(name.as_str()).is_some_and(|c| **c == f.config);
            if !keep {
                tracing::info!(policy = %name, "fleet budget: stopped asking Prometheus");
            }
            keep
        });
        for (name, config) in wanted {
            if !self.fetchers.contains_key(name) {
                let fetcher = self.spawn(name, config.clone(), clock);
                self.fetchers.insert(name.to_owned(), fetcher);
            }
        }
        let cells = self.fetchers.iter().map(|(name, f)| (name.clone(), f.cell.clone())).collect();
        *self.cells.lock().unwrap_or_else(PoisonError::into_inner) = cells;
    }

    fn spawn(&self, name: &str, config: PrometheusSpend, clock: fn() -> u64) -> Fetcher {
        let cell = Cell::default();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (thread_cell, errors, policy, thread_config) = (cell.clone(), self.errors.clone(), name.to_owned(), config.clone());
        let spawned = std::thread::Builder::new()
            .name("gauge-fleet".into())
            .spawn(move || fetch_loop(&policy, &thread_config, &thread_cell, &stopped, &errors, clock));
        match spawned {
            Ok(_) => tracing::info!(policy = name, url = %config.url, refresh = ?config.refresh, "fleet budget: asking Prometheus"),
            Err(error) => {
                // Never answered: on_error applies, as if Prometheus were down.
                tracing::error!(policy = name, %error, "fleet budget: cannot start its fetcher thread");
                let mut reading = cell.lock().unwrap_or_else(PoisonError::into_inner);
                (reading.asked, reading.error) = (true, Some("thread"));
            }
        }
        Fetcher { config, cell, _stop: stop }
    }

    /// What policy `name`'s fetcher has at `now_ns`; None when no fetcher runs for it.
    pub fn judge(&self, name: &str, now_ns: u64) -> Option<Judged> {
        let f = self.fetchers.get(name)?;
        Some(judge(&read(&f.cell), now_ns, f.config.stale_after()))
    }

    /// A fetcher without a thread whose cell the test sets.
    #[cfg(test)]
    pub fn fake(&mut self, policies: &[PolicyConfig], name: &str) -> Cell {
        self.clock = Some(|| 0);
        let config = policies.iter().find(|p| p.name == name).and_then(|p| p.prometheus.clone()).expect("a fleet policy");
        let cell = Cell::default();
        let (stop, _) = std::sync::mpsc::channel();
        self.fetchers.insert(name.to_owned(), Fetcher { config, cell: cell.clone(), _stop: stop });
        cell
    }
}

/// Asks every `refresh` until stopped.
fn fetch_loop(
    policy: &str,
    config: &PrometheusSpend,
    cell: &Mutex<Reading>,
    stop: &std::sync::mpsc::Receiver<()>,
    errors: &Family<ErrorLabels, Counter>,
    clock: fn() -> u64,
) {
    // No redirects: a bearer token must not follow one to another host.
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(config.timeout)).http_status_as_error(false).max_redirects(0).build().into();
    let endpoint = format!("{}/api/v1/query", config.url);
    let mut failing: Option<&'static str> = None;
    loop {
        let result = query(&agent, &endpoint, config);
        if let Err(TryRecvError::Disconnected) = stop.try_recv() {
            return;
        }
        let mut reading = cell.lock().unwrap_or_else(PoisonError::into_inner);
        reading.asked = true;
        match result {
            Ok(usd) => {
                (reading.answer, reading.answered, reading.error) = (Some((usd, clock())), Some(Instant::now()), None);
                if failing.take().is_some() {
                    tracing::info!(policy, fleet_usd = usd, "fleet budget: Prometheus answers again");
                }
            }
            Err(error) => {
                let reason = error.reason();
                reading.error = Some(reason);
                errors.get_or_create(&ErrorLabels { policy: policy.to_owned(), reason }).inc();
                // Once per kind of failure, not once per refresh; the counter has them all.
                if failing != Some(reason) {
                    tracing::warn!(policy, reason, %error, url = %config.url, "fleet budget: the Prometheus query failed");
                } else {
                    tracing::debug!(policy, reason, %error, "fleet budget: the Prometheus query failed again");
                }
                failing = Some(reason);
            }
        }
        drop(reading);
        match stop.recv_timeout(config.refresh) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn query(agent: &ureq::Agent, endpoint: &str, config: &PrometheusSpend) -> Result<f64, QueryError> {
    let mut request = agent.get(endpoint).query("query", &config.query).header("accept", "application/json");
    if let Some(path) = &config.token_file {
        request = request.header("authorization", format!("Bearer {}", read_token(path)?));
    }
    let mut response = request.call().map_err(QueryError::from_ureq)?;
    let status = response.status().as_u16();
    let body = response.body_mut().with_config().limit(MAX_ANSWER_BYTES).read_to_string().map_err(QueryError::from_ureq)?;
    answer(status, &body)
}

/// The bearer token, trimmed; refused if others may read the file (it is a secret).
fn read_token(path: &std::path::Path) -> Result<String, QueryError> {
    use std::os::unix::fs::PermissionsExt as _;
    let fail = |why: String| QueryError::Token { path: path.display().to_string(), why };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(fail("readable by other users: chmod 600 it".into()));
    }
    let token = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(fail("empty".into()));
    }
    Ok(token.to_owned())
}

/// The latest spend and its age per fleet budget, read at scrape time (the age grows
/// while Prometheus is silent, which a gauge set by the fetcher would not show).
#[derive(Debug)]
struct FleetCollector(Cells);

impl Collector for FleetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let readings: Vec<(String, Reading)> =
            self.0.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(name, cell)| (name.clone(), read(cell))).collect();
        {
            let mut spend = encoder.encode_descriptor(
                "gauge_policy_remote_spend_usd",
                "The fleet's spend in USD per fleet budget, as Prometheus last gave it.",
                None,
                MetricType::Gauge,
            )?;
            for (policy, reading) in &readings {
                if let Some((usd, _)) = reading.answer {
                    ConstGauge::new(usd).encode(spend.encode_family(&[("policy", policy.as_str())])?)?;
                }
            }
        }
        let mut age = encoder.encode_descriptor(
            "gauge_policy_remote_spend_age_seconds",
            "Seconds since Prometheus last gave a fleet budget's spend (past 3 refreshes it is no answer: on_error applies).",
            None,
            MetricType::Gauge,
        )?;
        for (policy, reading) in &readings {
            if let Some(answered) = reading.answered {
                ConstGauge::new(answered.elapsed().as_secs_f64()).encode(age.encode_family(&[("policy", policy.as_str())])?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn vectors_are_summed_scalars_read_and_empty_is_nothing_spent() {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"agent":"a","host":"h1"},"value":[1700000000.1,"0.25"]},
            {"metric":{"agent":"a","host":"h2"},"value":[1700000000.1,"1.5"]}]}}"#;
        assert_eq!(parse_answer(vector).ok(), Some(1.75));
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1700000000.1,"3.5"]}}"#;
        assert_eq!(parse_answer(scalar).ok(), Some(3.5));
        let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_answer(empty).ok(), Some(0.0));
    }

    #[test]
    fn errors_nan_and_other_shapes_are_no_spend() {
        let error = r#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#;
        let e = parse_answer(error).err();
        assert!(matches!(&e, Some(QueryError::Query { kind, .. }) if kind == "bad_data"), "{e:?}");
        assert_eq!(e.map(|e| e.reason()), Some("query"));
        for value in ["NaN", "+Inf", "-Inf", "-1", "lots"] {
            let body =
                format!(r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{}},"value":[1,"{value}"]}}]}}}}"#);
            assert_eq!(parse_answer(&body).err().map(|e| e.reason()), Some("parse"), "{value}");
        }
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1,"1"]]}]}}"#;
        assert_eq!(parse_answer(matrix).err().map(|e| e.reason()), Some("parse"));
        assert_eq!(parse_answer("<html>bad gateway</html>").err().map(|e| e.reason()), Some("parse"));
        assert_eq!(answer(502, "<html>bad gateway</html>").err().map(|e| e.reason()), Some("http"));
        assert_eq!(answer(400, error).err().map(|e| e.reason()), Some("query"), "Prometheus's own reason wins");
        assert_eq!(answer(200, r#"{"status":"success","data":{"resultType":"scalar","result":[1,"2"]}}"#).ok(), Some(2.0));
    }

    #[test]
    fn an_answer_is_fresh_until_three_refreshes_old() {
        let stale_after = Duration::from_secs(45);
        assert_eq!(judge(&Reading::default(), 10 * S, stale_after), Judged::Pending);
        let failed = Reading { asked: true, error: Some("timeout"), ..Default::default() };
        assert_eq!(judge(&failed, 10 * S, stale_after), Judged::Unusable("timeout"));
        let answered = Reading { answer: Some((2.0, 10 * S)), asked: true, ..Default::default() };
        assert_eq!(judge(&answered, 10 * S, stale_after), Judged::Fresh(2.0));
        // A failed query since does not discard a recent answer...
        let then_failed = Reading { error: Some("connect"), ..answered };
        assert_eq!(judge(&then_failed, 50 * S, stale_after), Judged::Fresh(2.0));
        // ...but one older than the bound is no answer, with the failure as its reason.
        assert_eq!(judge(&then_failed, 56 * S, stale_after), Judged::Unusable("connect"));
        assert_eq!(judge(&answered, 56 * S, stale_after), Judged::Unusable("stale"));
        assert_eq!(judge(&answered, 5 * S, stale_after), Judged::Fresh(2.0), "events queued before the answer");
    }

    /// A one-connection-at-a-time fake of `/api/v1/query`; returns its URL and the
    /// request lines it saw.
    fn fake_prometheus(body: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
        use std::io::{BufRead as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = std::io::BufReader::new(stream);
                let mut lines = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    lines.push(line.trim_end().to_owned());
                }
                log.lock().expect("lock").push(lines.join("\n"));
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = reader.get_mut().write_all(answer.as_bytes());
            }
        });
        (url, seen)
    }

    fn fleet_policy(url: &str, token_file: Option<&std::path::Path>) -> Vec<PolicyConfig> {
        #[derive(Deserialize)]
        struct File {
            policies: Vec<PolicyConfig>,
        }
        let token = token_file.map(|p| format!("token_file = {:?}\n", p.display().to_string())).unwrap_or_default();
        let toml = format!(
            "[[policies]]\nname = \"fleet\"\nagent = \"*\"\nmax_cost_usd = 1\naction = \"alert\"\nspend_source = \"prometheus\"\n\
             [policies.prometheus]\nurl = \"{url}\"\nquery = 'sum(increase(gauge_llm_cost_usd_total{{agent=\"a b\"}}[24h]))'\nrefresh = \"10s\"\ntimeout = \"1s\"\n{token}"
        );
        toml::from_str::<File>(&toml).expect("policy").policies
    }

    fn wait_for(fleet: &FleetBudgets, wanted: impl Fn(Judged) -> bool) -> Judged {
        let start = Instant::now();
        loop {
            let judged = fleet.judge("fleet", 0).expect("a fetcher");
            if wanted(judged) || start.elapsed() > Duration::from_secs(10) {
                return judged;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_fetcher_asks_with_the_token_publishes_and_stops_on_reload() {
        use std::os::unix::fs::PermissionsExt as _;
        let (url, seen) =
            fake_prometheus(r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"0.75"]}]}}"#);
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret-token\n").expect("write");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut registry = Registry::default();
        let mut fleet = FleetBudgets::register(&mut registry);
        let policies = fleet_policy(&url, Some(&token));
        fleet.start(|| 0, &policies);
        assert_eq!(wait_for(&fleet, |j| j != Judged::Pending), Judged::Fresh(0.75));
        let request = seen.lock().expect("lock").first().cloned().unwrap_or_default();
        assert!(
            request.starts_with("GET /api/v1/query?query=sum(increase(gauge_llm_cost_usd_total%7Bagent%3D%22a%20b%22%7D%5B24h%5D))"),
            "{request}"
        );
        assert!(request.to_ascii_lowercase().contains("authorization: bearer s3cret-token"), "{request}");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("gauge_policy_remote_spend_usd{policy=\"fleet\"} 0.75"), "{text}");
        assert!(text.contains("gauge_policy_remote_spend_age_seconds{policy=\"fleet\"}"), "{text}");
        // Cached: one query per refresh (10 s), however often it is read.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(seen.lock().expect("lock").len(), 1);
        fleet.sync(&[]);
        assert_eq!(fleet.judge("fleet", 0), None, "stopped with its policy");
        assert!(
            !{
                let mut text = String::new();
                prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
                text
            }
            .contains("remote_spend_usd{")
        );
    }

    #[test]
    fn an_unreachable_prometheus_is_counted_by_reason() {
        // A port with nothing listening: refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let mut registry = Registry::default();
        let mut fleet = FleetBudgets::register(&mut registry);
        fleet.start(|| 0, &fleet_policy(&format!("http://127.0.0.1:{port}"), None));
        assert_eq!(wait_for(&fleet, |j| j != Judged::Pending), Judged::Unusable("connect"));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("gauge_policy_remote_query_errors_total{policy=\"fleet\",reason=\"connect\"} 1"), "{text}");
    }
}
