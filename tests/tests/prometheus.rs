//! Gauge where its users look: a real Prometheus scraping the real daemon while the
//! official openai SDK makes calls, and what `deploy/` ships (alerting and recording
//! rules, their promtool unit tests, the example scrape config, the Grafana
//! dashboard) checked against the tools and against a live scrape.

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use gauge_tests::{
    agent::agent_binary,
    clients,
    kernel_tests_enabled,
    prometheus::{Prometheus, Sample, deploy_dir, exported, families, metric_names, tool},
    world::{World, sum},
};
use serde_json::Value;

/// Per call the mock reports prompt 21 (5 cached) and completion 7: at the test's
/// gpt-4o-mini prices that is 16 x 0.15 + 5 x 0.075 + 7 x 0.6 = 6.975 micro-dollars.
const CALL_USD: f64 = 6.975e-6;

const CONFIG: &str = r#"
[[agents]]
name = "prom-rule-bot"
match = { cmdline = "gauge-prom-rule-marker" }

[[prices]]
model = "gpt-4o-mini"
input = 0.15
cache_read = 0.075
output = 0.6

[[policies]]
name = "prom-daily-budget"
agent = "prom-rule-bot"
max_cost_usd = 100
window = "24h"
action = "alert"

# Requests held at SSL_write and checked: the second one is over the limit.
[[policies]]
name = "prom-gate"
agent = "prom-gate-bot"
max_requests = 1
window = "60s"
action = "alert"
gate = true

# So that the families only findings, overflow and webhooks create are in the scrape.
[anomaly.loop]
repeats = 3

[anomaly.webhook]
url = "http://127.0.0.1:9/"
timeout = "1s"
retries = 0

[labels]
process = 1
"#;

/// Families no step of this test produces (they need a failing action or a call
/// without countable tokens): checked to be registered by the daemon's code instead.
const NOT_PRODUCED_HERE: [&str; 2] = ["gauge_policy_action_failures", "gauge_llm_unmetered_calls"];

/// The openai SDK: one chat call, and a streamed one (with usage) when STREAM=1.
const SDK_SCRIPT: &str = r#"
import os, openai
base = "https://127.0.0.1:%s" % os.environ["GAUGE_TEST_PORT"]
msgs = [{"role": "user", "content": "hi"}]
oa = openai.OpenAI(base_url=base + "/v1", api_key="sk-test-secret-0123456789abcdef",
                   default_headers={"x-gauge-workflow": os.environ["WORKFLOW"]})
oa.chat.completions.create(model=os.environ.get("MODEL", "gpt-4o-mini"), messages=msgs)
if os.environ.get("STREAM") == "1":
    for _ in oa.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True, stream_options={"include_usage": True}):
        pass
print("ok")
"#;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn dashboard() -> Value {
    let path = deploy_dir().join("grafana/gauge.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().map(Vec::as_slice).unwrap_or_default() {
        out.push(panel);
        out.extend(panel["panels"].as_array().map(Vec::as_slice).unwrap_or_default());
    }
    out
}

/// (panel title, expr) of every query target.
fn panel_exprs(dashboard: &Value) -> Vec<(String, String)> {
    panels(dashboard)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            p["targets"].as_array().cloned().unwrap_or_default().into_iter().map(move |t| {
                (title.clone(), t["expr"].as_str().unwrap_or_else(|| panic!("a target of {title} has no expr")).to_owned())
            })
        })
        .collect()
}

/// (variable name, the selector of its `label_values(SELECTOR, label)` query).
fn variable_selectors(dashboard: &Value) -> Vec<(String, String)> {
    let vars = dashboard["templating"]["list"].as_array().cloned().unwrap_or_default();
    vars.iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().unwrap_or_default().to_owned();
            let query = v["definition"].as_str().unwrap_or_default();
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .and_then(|q| q.rsplit_once(','))
                .map(|(selector, _label)| selector.trim().to_owned())
                .unwrap_or_else(|| panic!("variable {name}: not a label_values(SELECTOR, label) query: {query}"));
            (name, inner)
        })
        .collect()
}

/// Grafana's variables as a query against Prometheus sees them with "All" chosen.
fn substitute(expr: &str) -> String {
    let out = [("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "5m"), ("$agent", ".*"), ("$workflow", ".*"), ("$model", ".*")]
        .iter()
        .fold(expr.to_owned(), |e, (var, value)| e.replace(var, value));
    assert!(!out.contains('$'), "an unknown Grafana variable in {expr}");
    out
}

/// The daemon's source (gauge-agent/src), all files in one string.
fn daemon_source() -> String {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&read(&path));
            }
        }
    }
    let mut out = String::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../gauge-agent/src"), &mut out);
    out
}

/// Alert names of rules.yml, by its `- alert: NAME` lines.
fn alert_names(rules: &str) -> Vec<String> {
    rules.lines().filter_map(|l| l.trim().strip_prefix("- alert:")).map(|n| n.trim().to_owned()).collect()
}

#[test]
fn rules_pass_promtool_and_every_alert_is_tested_firing_and_quiet() {
    let Some(promtool) = tool("promtool", "promtool rules tests") else {
        return;
    };
    let dir = deploy_dir().join("prometheus");
    let run = |args: &[&str], cwd: &Path| {
        let out = Command::new(&promtool).args(args).current_dir(cwd).output().expect("run promtool");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
        text
    };
    let checked = run(&["check", "rules", "rules.yml"], &dir);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run(&["test", "rules", "rules_test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // The example scrape config, with the rules where it expects them.
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(dir.join("prometheus.yml"), tmp.path().join("prometheus.yml")).expect("copy prometheus.yml");
    std::fs::copy(dir.join("rules.yml"), tmp.path().join("gauge-rules.yml")).expect("copy rules.yml");
    run(&["check", "config", "prometheus.yml"], tmp.path());

    // Each alert is tested at least once firing and once quiet.
    let alerts = alert_names(&read(&dir.join("rules.yml")));
    assert!(alerts.len() >= 15, "{alerts:?}");
    let tests = read(&dir.join("rules_test.yml"));
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let mut cases: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("alertname:") {
            let next = lines[i + 1..].iter().find(|l| l.starts_with("exp_alerts:")).copied().unwrap_or_default();
            let case = cases.entry(name.trim()).or_default();
            if next == "exp_alerts: []" {
                case.1 = true;
            } else {
                case.0 = true;
            }
        }
    }
    for alert in &alerts {
        assert_eq!(cases.get(alert.as_str()), Some(&(true, true)), "{alert}: rules_test.yml must show it firing and quiet");
    }
    assert!(cases.keys().all(|k| alerts.iter().any(|a| a == k)), "rules_test.yml tests an alert rules.yml lacks: {cases:?}");
}

#[test]
fn the_dashboard_is_a_grafana_model_over_documented_metrics() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| (36..=41).contains(&v)), "schemaVersion {}", d["schemaVersion"]);
    assert_eq!(d["__inputs"][0]["name"], "DS_PROMETHEUS");
    let vars: Vec<&str> = d["templating"]["list"].as_array().expect("templating.list").iter().filter_map(|v| v["name"].as_str()).collect();
    for var in ["DS_PROMETHEUS", "agent", "workflow", "model"] {
        assert!(vars.contains(&var), "no ${var} variable: {vars:?}");
    }
    let readme = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"));
    let documented = |name: &str| {
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        readme.contains(&format!("`{base}"))
    };
    let exprs = panel_exprs(&d);
    assert!(exprs.len() >= 30, "{} queries", exprs.len());
    let mut ids = std::collections::BTreeSet::new();
    for panel in panels(&d) {
        assert!(ids.insert(panel["id"].as_u64().expect("panel id")), "duplicate panel id {}", panel["id"]);
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", panel["title"]);
            for target in panel["targets"].as_array().expect("targets") {
                assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", panel["title"]);
            }
        }
    }
    let selectors = variable_selectors(&d);
    for (title, expr) in exprs.iter().chain(&selectors) {
        let names = metric_names(expr);
        assert!(!names.is_empty() || expr.contains("up{"), "{title}: no gauge_ metric in {expr}");
        for name in names {
            assert!(documented(&name), "{title}: {name} is not in the README's metrics tables");
        }
    }
    // Each panel group the dashboard promises is there.
    let all: String = exprs.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>().join("\n");
    for needle in [
        "gauge_llm_cost_usd_total",
        "gauge_llm_tokens_total",
        "gauge_llm_retries_total",
        "gauge_policy_actions_total",
        "gauge_policy_violations_total",
        "gauge_spend_forecast_usd",
        "gauge_budget_exhaustion_seconds",
        "gauge_cost_per_outcome_usd",
        "gauge_capture_lost_events_total",
        "gauge_capture_throttled_bytes_total",
        "gauge_probes_attached",
        "gauge_agent_restarts_total",
        "gauge_agent_downtime_seconds_total",
    ] {
        assert!(all.contains(needle), "no panel queries {needle}");
    }
}

#[test]
fn prometheus_scrapes_the_daemon_and_every_shipped_query_holds() {
    if !kernel_tests_enabled("Prometheus end to end") {
        return;
    }
    let Some(binary) = tool("prometheus", "Prometheus end to end") else {
        return;
    };
    let world = World::start(CONFIG);
    let rules = deploy_dir().join("prometheus/rules.yml");
    let prom = Prometheus::start(&binary, &[&world.daemon.addr], &[rules]);

    // Two calls by an [[agents]] rule (the marker on its command line), one by
    // GAUGE_AGENT in its environment.
    let sdk = |what: &str, script: &str, env: &[(&str, &str)]| {
        let mut cmd = clients::python(&world.cert, script);
        cmd.env("GAUGE_TEST_PORT", world.mock.port.to_string()).env("SSL_CERT_FILE", &world.cert).envs(env.iter().copied());
        let (_, out) = clients::run(what, &mut cmd);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok", "{what}");
    };
    sdk("openai SDK under an [[agents]] rule", &format!("{SDK_SCRIPT}# gauge-prom-rule-marker\n"), &[("WORKFLOW", "triage"), ("STREAM", "1")]);
    sdk("openai SDK named by GAUGE_AGENT", SDK_SCRIPT, &[("WORKFLOW", "nightly"), ("GAUGE_AGENT", "prom-env-bot")]);
    // A 429 and the SDK's retry, of a model no price covers.
    let retry = [("GAUGE_AGENT", "prom-retry-bot"), ("WORKFLOW", "retry"), ("MODEL", "fail-once-prom")];
    sdk("openai SDK retrying", SDK_SCRIPT, &retry);
    // The same body three times: a loop finding (and a webhook that fails).
    let url = format!("https://127.0.0.1:{}/v1/chat/completions", world.mock.port);
    let body = ["-H", "content-type: application/json", "-d", r#"{"model":"gpt-4o-mini","messages":[]}"#];
    let mut looping = clients::curl(&world.cert, &url, &[&body[..], &[url.as_str(), url.as_str()]].concat());
    clients::run("curl looping", looping.env("GAUGE_AGENT", "prom-loop-bot"));
    // Two requests held by a gate, the second over its limit (how it ends is the
    // policy tests' business: here only the counts matter).
    let mut gated = clients::curl(&world.cert, &url, &[&body[..], &["--max-time", "10", url.as_str()]].concat());
    gated.env("GAUGE_AGENT", "prom-gate-bot").stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut gated = gated.spawn().expect("start curl under a gate");
    if gauge_tests::agent::wait_timeout(&mut gated, Duration::from_secs(20)).is_none() {
        // SAFETY: signalling our own child, which a policy may have left stopped.
        unsafe { libc::kill(gated.id() as i32, libc::SIGCONT) };
        let _ = gated.kill();
        let _ = gated.wait();
    }
    let rule_bot = [("agent", "prom-rule-bot")];
    let env_bot = [("agent", "prom-env-bot")];
    world.scrape(&[(&rule_bot, 2.0), (&env_bot, 1.0), (&[("agent", "prom-retry-bot")], 2.0), (&[("agent", "prom-loop-bot")], 3.0)]);
    let out = Command::new(agent_binary())
        .args(["outcome", "--listen", &world.daemon.addr, "--agent", "prom-rule-bot", "--name", "resolved_ticket", "--count", "2"])
        .args(["--value", "30"])
        .output()
        .expect("run gauge-agent outcome");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The daemon's own figures, as the other end-to-end tests check them.
    let (_, text) = world.daemon.get("/metrics").expect("scrape");
    let daemon_cost = |agent: &str| sum(&text, "gauge_llm_cost_usd_total", &[("agent", agent)]);
    let outcome = [("agent", "prom-rule-bot"), ("outcome", "resolved_ticket")];
    let daemon_per_outcome = sum(&text, "gauge_cost_per_outcome_usd", &outcome);
    assert_eq!(daemon_cost("prom-rule-bot"), 2.0 * CALL_USD, "{text}");
    assert_eq!(daemon_cost("prom-env-bot"), CALL_USD, "{text}");
    assert_eq!(daemon_per_outcome, CALL_USD, "{text}");

    // What Prometheus scraped: the same numbers, exactly.
    let value = |samples: &[Sample], labels: &[(&str, &str)]| -> Option<f64> {
        samples.iter().find(|(l, _)| labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))).map(|(_, v)| *v)
    };
    let timeout = Duration::from_secs(20);
    let spend = "sum by (agent) (gauge_llm_cost_usd_total)";
    let wanted = [("prom-rule-bot", daemon_cost("prom-rule-bot")), ("prom-env-bot", daemon_cost("prom-env-bot"))];
    let samples = prom.query_until(spend, timeout, |s| wanted.iter().all(|(a, want)| value(s, &[("agent", a)]) == Some(*want)));
    for (agent, want) in wanted {
        assert_eq!(value(&samples, &[("agent", agent)]), Some(want), "{spend} for {agent}: {samples:?}\n{}", prom.log());
    }
    let per_outcome = "gauge_cost_per_outcome_usd";
    let samples = prom.query_until(per_outcome, timeout, |s| value(s, &outcome) == Some(daemon_per_outcome));
    assert_eq!(value(&samples, &outcome), Some(CALL_USD), "{per_outcome}: {samples:?}");
    let samples = prom.query("sum by (agent, workflow) (gauge_llm_cost_usd_total)");
    assert_eq!(value(&samples, &[("agent", "prom-env-bot"), ("workflow", "nightly")]), Some(CALL_USD), "{samples:?}");
    let samples = prom.query(r#"sum by (kind) (gauge_llm_tokens_total{agent="prom-rule-bot"})"#);
    for (kind, want) in [("input", 32.0), ("cache_read", 10.0), ("output", 14.0)] {
        assert_eq!(value(&samples, &[("kind", kind)]), Some(want), "{kind} tokens: {samples:?}");
    }

    // Every metric the dashboard and the rules name is a family of the live scrape,
    // of the kind the name implies (X_total of a counter X, X_bucket of a histogram).
    // A family without samples has no `# TYPE` line: the steps above make them.
    let start = std::time::Instant::now();
    let families = loop {
        let (_, text) = world.daemon.get("/metrics").expect("scrape");
        let families = families(&text);
        let wanted = ["gauge_anomalies", "gauge_anomaly_webhook", "gauge_policy_held_requests", "gauge_policy_violations"];
        if wanted.iter().all(|f| families.contains_key(*f)) || start.elapsed() > timeout {
            break families;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let source = daemon_source();
    for family in NOT_PRODUCED_HERE {
        assert!(source.contains(&format!("\"{family}\"")), "{family} is not registered by gauge-agent");
    }
    let check_names = |what: &str, expr: &str| {
        for name in metric_names(expr) {
            let unproduced = NOT_PRODUCED_HERE.iter().any(|f| name.strip_prefix(f).is_some_and(|s| s == "_total"));
            assert!(
                unproduced || exported(&families, &name),
                "{what}: {name} is no family of /metrics\n{expr}\n{families:?}\ndaemon log:\n{}",
                world.daemon.log.text()
            );
        }
    };

    // The dashboard: every query is accepted by Prometheus with its variables set to
    // "All", and the panels show this world's calls.
    let d = dashboard();
    let mut answered = 0;
    for (title, expr) in panel_exprs(&d).iter().chain(&variable_selectors(&d)) {
        check_names(title, expr);
        let samples = prom.try_query(&substitute(expr)).unwrap_or_else(|e| panic!("{title}: Prometheus refused {expr}: {e}"));
        answered += usize::from(!samples.is_empty());
    }
    let panel = |title: &str| {
        let (_, expr) = panel_exprs(&d).into_iter().find(|(t, _)| t == title).unwrap_or_else(|| panic!("no panel {title}"));
        substitute(&expr)
    };
    let samples = prom.query(&panel("Cost per outcome"));
    assert_eq!(value(&samples, &outcome), Some(CALL_USD), "Cost per outcome panel: {samples:?}");
    // A rate needs two scrapes of a series: wait for them.
    let samples = prom.query_until(&panel("Spend by agent"), timeout, |s| value(s, &rule_bot).is_some() && value(s, &env_bot).is_some());
    assert!(value(&samples, &rule_bot).is_some() && value(&samples, &env_bot).is_some(), "Spend by agent panel: {samples:?}");
    let samples = prom.query(&panel("Probes attached"));
    assert!(value(&samples, &[("instance", &world.daemon.addr)]).is_some_and(|n| n > 0.0), "Probes attached panel: {samples:?}");

    // The rules: loaded by this Prometheus, evaluated every second, all healthy.
    let start = std::time::Instant::now();
    let loaded = loop {
        let loaded = prom.rules();
        let evaluated = |r: &Value| r["lastEvaluation"].as_str().is_some_and(|t| !t.starts_with("0001-"));
        if (!loaded.is_empty() && loaded.iter().all(|(_, r)| evaluated(r))) || start.elapsed() > timeout {
            break loaded;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let alerts = alert_names(&read(&deploy_dir().join("prometheus/rules.yml")));
    assert_eq!(loaded.iter().filter(|(_, r)| r["type"] == "alerting").count(), alerts.len(), "{loaded:?}");
    for (group, rule) in &loaded {
        let name = rule["name"].as_str().unwrap_or_default();
        let query = rule["query"].as_str().unwrap_or_default();
        assert_eq!(rule["health"], "ok", "{group}/{name}: {}", rule["lastError"]);
        check_names(name, query);
        prom.try_query(query).unwrap_or_else(|e| panic!("{group}/{name}: {e}"));
    }
    // The recording rules see the spend (their 5m rate is exact only once a sample
    // before the calls is in the window, so only presence is asserted).
    let samples = prom.query_until("agent:gauge_llm_cost_usd:rate5m", timeout, |s| value(s, &rule_bot).is_some());
    assert!(value(&samples, &rule_bot).is_some(), "recording rule: {samples:?}");
    eprintln!(
        "{} dashboard queries ({answered} with data now) and {} rules checked against {} families",
        panel_exprs(&d).len(),
        loaded.len(),
        families.len()
    );
}
