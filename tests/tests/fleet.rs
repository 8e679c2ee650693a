//! Fleet budgets end to end: a policy's spend is the answer of a (fake) Prometheus,
//! served by the test itself so that its answer, its silence and its count of
//! queries are the test's to set and read. Real python clients against the mock
//! provider, which counts what reaches it: a stopped request never arrives there.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    os::unix::process::ExitStatusExt as _,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use gauge_tests::{
    agent::wait_timeout,
    kernel_tests_enabled,
    world::{World, sum},
};

/// What the fake Prometheus answers, and what it was asked.
#[derive(Default)]
struct FakeState {
    body: String,
    /// Accept, read, and never answer (a hung Prometheus).
    hang: bool,
    /// Each request's head.
    requests: Vec<String>,
}

/// `/api/v1/query` on a loopback port, one thread per connection.
struct FakePrometheus {
    url: String,
    state: Arc<Mutex<FakeState>>,
}

impl FakePrometheus {
    fn start(body: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(FakeState { body, ..Default::default() }));
        let shared = state.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let shared = shared.clone();
                thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut reader = BufReader::new(stream);
                    let mut head = Vec::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        head.push(line.trim_end().to_owned());
                    }
                    let body = {
                        let mut state = shared.lock().expect("lock");
                        state.requests.push(head.join("\n"));
                        (!state.hang).then(|| state.body.clone())
                    };
                    let Some(body) = body else {
                        // Hold the connection open, unanswered, well past any timeout.
                        thread::sleep(Duration::from_secs(10));
                        return;
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = reader.get_mut().write_all(answer.as_bytes());
                });
            }
        });
        Self { url, state }
    }

    fn answer(&self, body: String) {
        self.state.lock().expect("lock").body = body;
    }

    fn hang(&self, hang: bool) {
        self.state.lock().expect("lock").hang = hang;
    }

    /// Requests whose head contains `needle` (a policy's agent, in its query).
    fn requests(&self, needle: &str) -> Vec<String> {
        self.state.lock().expect("lock").requests.iter().filter(|r| r.contains(needle)).cloned().collect()
    }
}

/// An instant-vector answer, one sample per host.
fn vector(per_host: &[f64]) -> String {
    let samples: Vec<String> =
        per_host.iter().enumerate().map(|(i, usd)| format!(r#"{{"metric":{{"host":"h{i}"}},"value":[1700000000.5,"{usd}"]}}"#)).collect();
    format!(r#"{{"status":"success","data":{{"resultType":"vector","result":[{}]}}}}"#, samples.join(","))
}

/// An agent (by a marker in its command line) under a gated fleet budget of $1.
fn fleet_config(agent: &str, url: &str, refresh: &str, timeout: &str, on_error: &str, token_file: Option<&str>) -> String {
    let token = token_file.map(|t| format!("token_file = \"{t}\"\n")).unwrap_or_default();
    format!(
        r#"
[[agents]]
name = "{agent}"
match = {{ cmdline = "{agent}-marker" }}

[[policies]]
name = "{agent}"
agent = "{agent}"
scope = "agent"
max_cost_usd = 1.0
window = "24h"
action = "kill"
gate = true
spend_source = "prometheus"
[policies.prometheus]
url = "{url}"
query = 'sum(increase(gauge_llm_cost_usd_total{{agent="{agent}"}}[24h]))'
refresh = "{refresh}"
timeout = "{timeout}"
on_error = "{on_error}"
{token}
"#
    )
}

/// One python http.client request for `model` as agent `agent`; its exit status.
fn request(world: &World, agent: &str, model: &str) -> std::process::ExitStatus {
    let script = format!(
        "import ssl, http.client\n\
         ctx = ssl.create_default_context(cafile='{ca}')\n\
         c = http.client.HTTPSConnection('127.0.0.1', {port}, context=ctx)\n\
         c.request('POST', '/v1/chat/completions', body='{{\"model\":\"{model}\",\"messages\":[]}}', headers={{'content-type': 'application/json'}})\n\
         c.getresponse().read()\n",
        ca = world.cert.display(),
        port = world.mock.port,
    );
    let mut child = Command::new("python3")
        .args(["-c", &script, &format!("{agent}-marker")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start python");
    wait_timeout(&mut child, Duration::from_secs(30)).unwrap_or_else(|| panic!("the client did not end:\n{}", world.daemon.log.text()))
}

fn metrics(world: &World) -> String {
    world.daemon.get("/metrics").expect("scrape").1
}

/// Waits (at most 20 s) until the scrape satisfies `done`; returns it.
fn wait_metrics(world: &World, what: &str, done: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let m = metrics(world);
        if done(&m) {
            return m;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{what}: not seen in 20 s\n{m}\n{}", world.daemon.log.text());
        thread::sleep(Duration::from_millis(100));
    }
}

fn has(m: &str, metric: &str, policy: &str) -> bool {
    m.lines().any(|l| l.starts_with(&format!("{metric}{{policy=\"{policy}\"}}")))
}

#[test]
fn a_fleet_that_has_spent_the_budget_stops_the_next_request_here() {
    if !kernel_tests_enabled("fleet budget end to end") {
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let agent = "fleet-stop";
    let prometheus = FakePrometheus::start(vector(&[0.0]));
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("prometheus-token");
    std::fs::write(&token, "fleet-secret-token-42\n").expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let config = fleet_config(agent, &prometheus.url, "1s", "500ms", "open", Some(&token.display().to_string()));
    let world = World::start(&config);
    wait_metrics(&world, "the first answer", |m| has(m, "gauge_policy_remote_spend_usd", agent));
    let status = request(&world, agent, "fleet-stop-model");
    assert!(status.success(), "nothing spent across the fleet: {status}\n{}", world.daemon.log.text());
    assert_eq!(world.mock.received("fleet-stop-model"), 1);
    // Other hosts have spent $5 of the $1 (two series, summed); this one nothing.
    prometheus.answer(vector(&[3.0, 2.0]));
    wait_metrics(&world, "the fleet's spend", |m| sum(m, "gauge_policy_remote_spend_usd", &[("policy", agent)]) == 5.0);
    let status = request(&world, agent, "fleet-stop-model");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}\n{}", world.daemon.log.text());
    assert_eq!(world.mock.received("fleet-stop-model"), 1, "the stopped request reached the provider");
    let m = metrics(&world);
    assert!(sum(&m, "gauge_policy_violations_total", &[("policy", agent), ("limit", "max_cost_usd")]) >= 1.0, "{m}");
    assert!(sum(&m, "gauge_llm_cost_usd_total", &[("agent", agent)]) < 0.01, "local spend alone is far below the budget\n{m}");
    let age = sum(&m, "gauge_policy_remote_spend_age_seconds", &[("policy", agent)]);
    assert!((0.0..3.0).contains(&age), "age {age}\n{m}");
    // Asked with the bearer token, which appears nowhere the agent writes.
    let asked = prometheus.requests(agent);
    assert!(asked.iter().all(|r| r.to_ascii_lowercase().contains("authorization: bearer fleet-secret-token-42")), "{asked:?}");
    assert!(!world.daemon.log.text().contains("fleet-secret-token-42") && !m.contains("fleet-secret-token-42"));
}

#[test]
fn decisions_use_the_cached_answer_between_refreshes() {
    if !kernel_tests_enabled("fleet budget cache end to end") {
        return;
    }
    let agent = "fleet-cache";
    let prometheus = FakePrometheus::start(r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#.into());
    let world = World::start(&fleet_config(agent, &prometheus.url, "2s", "1s", "closed", None));
    wait_metrics(&world, "the first answer", |m| has(m, "gauge_policy_remote_spend_usd", agent));
    let (start, before) = (Instant::now(), prometheus.requests(agent).len());
    // Each request is held and decided against the fleet's spend (an empty vector:
    // nothing spent); none of them asks Prometheus.
    for _ in 0..6 {
        assert!(request(&world, agent, "fleet-cache-model").success(), "{}", world.daemon.log.text());
    }
    let elapsed = start.elapsed();
    let asked = prometheus.requests(agent).len() - before;
    assert_eq!(world.mock.received("fleet-cache-model"), 6);
    let most = (elapsed.as_secs_f64() / 2.0).ceil() as usize + 1;
    assert!(asked <= most, "{asked} queries for 6 requests in {elapsed:?} with refresh = 2s (at most {most})");
    let held = sum(&metrics(&world), "gauge_policy_held_requests_total", &[("agent", agent), ("decision", "released")]);
    assert!(held >= 6.0, "the requests were held and decided: {held}");
    // And it does refresh.
    thread::sleep(Duration::from_millis(4500));
    assert!(prometheus.requests(agent).len() - before > asked, "no query in 4.5 s with refresh = 2s");
    // A reload that changes the query stops the old fetcher and starts a new one.
    let config = fleet_config(agent, &prometheus.url, "2s", "1s", "closed", None).replace("[24h]", "[1h]");
    std::fs::write(&world.daemon.config, config).expect("rewrite config");
    world.daemon.log.wait_for(&["config reloaded"], Duration::from_secs(20));
    let start = Instant::now();
    while prometheus.requests("%5B1h%5D").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "the changed query is not asked:\n{}", world.daemon.log.text());
        thread::sleep(Duration::from_millis(100));
    }
    let old = prometheus.requests("%5B24h%5D").len();
    thread::sleep(Duration::from_millis(4500));
    assert_eq!(prometheus.requests("%5B24h%5D").len(), old, "the old query is still asked after the reload");
    assert!(request(&world, agent, "fleet-cache-model").success(), "{}", world.daemon.log.text());
}

#[test]
fn a_silent_prometheus_fails_open_or_closed_as_configured() {
    if !kernel_tests_enabled("fleet budget failure end to end") {
        return;
    }
    let prometheus = FakePrometheus::start(vector(&[0.1]));
    // Nothing listens here: connection refused.
    let down = format!("http://{}", TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr"));
    let config = [
        fleet_config("fleet-open", &prometheus.url, "1s", "300ms", "open", None),
        fleet_config("fleet-closed", &prometheus.url, "1s", "300ms", "closed", None),
        fleet_config("fleet-down", &down, "1s", "300ms", "closed", None),
    ]
    .concat();
    let world = World::start(&config);
    wait_metrics(&world, "the first answers", |m| {
        has(m, "gauge_policy_remote_spend_usd", "fleet-open") && has(m, "gauge_policy_remote_spend_usd", "fleet-closed")
    });
    assert!(request(&world, "fleet-closed", "fleet-closed-model").success(), "fresh and under the budget");
    assert_eq!(world.mock.received("fleet-closed-model"), 1);
    // Down from the start: closed means no request goes.
    assert_eq!(request(&world, "fleet-down", "fleet-down-model").signal(), Some(libc::SIGKILL), "{}", world.daemon.log.text());
    assert_eq!(world.mock.received("fleet-down-model"), 0);
    // Prometheus hangs: each query times out, and after 3 refreshes the answer is stale.
    prometheus.hang(true);
    let m = wait_metrics(&world, "a stale answer", |m| {
        ["fleet-open", "fleet-closed"].iter().all(|p| {
            sum(m, "gauge_policy_remote_spend_age_seconds", &[("policy", p)]) > 3.5
                && sum(m, "gauge_policy_remote_query_errors_total", &[("policy", p), ("reason", "timeout")]) >= 2.0
        })
    });
    assert!(sum(&m, "gauge_policy_remote_query_errors_total", &[("policy", "fleet-down"), ("reason", "connect")]) >= 1.0, "{m}");
    assert!(request(&world, "fleet-open", "fleet-open-model").success(), "open: the local count only\n{}", world.daemon.log.text());
    assert_eq!(world.mock.received("fleet-open-model"), 1);
    assert_eq!(request(&world, "fleet-closed", "fleet-closed-model").signal(), Some(libc::SIGKILL), "{}", world.daemon.log.text());
    assert_eq!(world.mock.received("fleet-closed-model"), 1, "closed: the request never left");
    // Prometheus answers again: requests flow.
    prometheus.hang(false);
    wait_metrics(&world, "a fresh answer", |m| {
        let age = sum(m, "gauge_policy_remote_spend_age_seconds", &[("policy", "fleet-closed")]);
        age < 1.5
    });
    assert!(request(&world, "fleet-closed", "fleet-closed-model").success(), "{}", world.daemon.log.text());
    assert_eq!(world.mock.received("fleet-closed-model"), 2);
    let log = world.daemon.log.text();
    assert!(log.contains("fleet-closed") && log.contains("the budget counts as spent"), "{log}");
}
