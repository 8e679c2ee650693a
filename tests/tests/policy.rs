//! Guardrails end to end: real clients (the official openai SDK, python, curl) under
//! policies of the real agent, against the mock provider, which counts what reaches
//! it. A stopped request must never arrive there.

use std::{
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use gauge_tests::{
    agent::wait_timeout,
    clients, kernel_tests_enabled,
    world::{World, sum},
};

/// Agents named by a marker in their command line (or their thread name).
const AGENTS: &str = r#"
[[agents]]
name = "retry-bot"
match = { cmdline = "retry-kill-marker" }
[[agents]]
name = "pause-bot"
match = { cmdline = "retry-pause-marker" }
[[agents]]
name = "budget-bot"
match = { cmdline = "budget-marker" }
[[agents]]
name = "context-bot"
match = { cmdline = "context-marker" }
[[agents]]
name = "context-h2-bot"
match = { cmdline = "context-h2-marker" }
[[agents]]
name = "guarded"
match = { comm = "gauge-guarded" }
[[agents]]
name = "dry"
match = { comm = "gauge-dry-bot" }
[[agents]]
name = "ns-init"
match = { comm = "gauge-ns-init" }

[[prices]]
model = "budget-model"
input = 1000
output = 1000

"#;

/// Each test's daemon loads only its own policies: daemons of tests running at the
/// same time all see every process, and must not act on each other's clients.
const RETRY_CAP: &str = r#"
[[policies]]
name = "retry-cap"
agent = "retry-bot"
max_retries = 2
window = "60s"
action = "kill"
gate = true

"#;

const RETRY_PAUSE: &str = r#"
[[policies]]
name = "retry-pause"
agent = "pause-bot"
max_retries = 2
window = "60s"
action = "pause"
cooldown = "2s"
gate = true

"#;

const BUDGET: &str = r#"
[[policies]]
name = "budget"
agent = "budget-bot"
scope = "agent"
max_cost_usd = 0.05
window = "30d"
action = "kill"
gate = true

"#;

const CONTEXT_CEILING: &str = r#"
[[policies]]
name = "context-ceiling"
agent = "context-bot"
max_input_tokens = 1000
action = "kill"
gate = true

"#;

const GUARDED: &str = r#"
[[policies]]
name = "never-guarded"
agent = "guarded"
allowed_models = ["nothing"]
action = "kill"
gate = true

"#;

/// A container's PID 1 is protected like the host's.
const NS_INIT: &str = r#"
[[policies]]
name = "never-ns-init"
agent = "ns-init"
allowed_models = ["nothing"]
action = "kill"
gate = true
"#;

const DRY: &str = r#"
[[policies]]
name = "dry"
agent = "dry"
allowed_models = ["nothing"]
action = "kill"
gate = true
dry_run = true
[enforcement]
protect = { comm = ["gauge-guarded"] }
"#;

fn config(policies: &[&str]) -> String {
    std::iter::once(AGENTS).chain(policies.iter().copied()).collect()
}

/// The openai SDK, `max_retries` retries, against model `model` (argv: marker).
fn sdk_calls(model: &str, calls: usize, max_retries: u32, prompt_words: usize) -> String {
    sdk_script(model, calls, max_retries, prompt_words, false)
}

fn sdk_script(model: &str, calls: usize, max_retries: u32, prompt_words: usize, http2: bool) -> String {
    let client = if http2 { "http_client=httpx2.Client(http2=True)" } else { "http_client=None" };
    format!(
        r#"
import os, sys, httpx2, openai
base = "https://127.0.0.1:%s/v1" % os.environ["GAUGE_TEST_PORT"]
oa = openai.OpenAI(base_url=base, api_key="sk-test-secret-0123456789abcdef", max_retries={max_retries}, {client})
prompt = "word " * {prompt_words}
for i in range({calls}):
    try:
        oa.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": prompt if i > 0 else "hi"}}])
    except openai.RateLimitError:
        print("gave up", flush=True)
print("done", flush=True)
"#
    )
}

fn spawn(world: &World, script: &str, marker: &str) -> Child {
    let mut cmd = clients::python(&world.cert, script);
    cmd.arg(marker)
        .env("GAUGE_TEST_PORT", world.mock.port.to_string())
        .env("SSL_CERT_FILE", &world.cert)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("start python")
}

fn wait(child: &mut Child, what: &str, world: &World) -> std::process::ExitStatus {
    wait_timeout(child, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("{what} did not end in 60 s:\n{}", world.daemon.log.text()))
}

fn metrics(world: &World) -> String {
    world.daemon.get("/metrics").expect("scrape").1
}

#[test]
fn a_retry_storm_is_killed_at_the_cap_before_the_next_attempt_leaves() {
    if !kernel_tests_enabled("retry cap end to end") {
        return;
    }
    let world = World::start(&config(&[RETRY_CAP]));
    let mut client = spawn(&world, &sdk_calls("always-429-kill", 1, 10, 0), "retry-kill-marker");
    let status = wait(&mut client, "the retrying client", &world);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the client must be killed:\n{}", world.daemon.log.text());
    // The first attempt and two retries; the third retry never left the process.
    assert_eq!(world.mock.received("always-429-kill"), 3, "{}", world.daemon.log.text());
    let m = metrics(&world);
    assert_eq!(sum(&m, "gauge_policy_actions_total", &[("policy", "retry-cap"), ("action", "kill")]), 1.0, "{m}");
    assert_eq!(sum(&m, "gauge_policy_violations_total", &[("agent", "retry-bot"), ("limit", "max_retries")]), 1.0, "{m}");
}

#[test]
fn a_paused_retry_storm_resumes_after_the_cooldown() {
    if !kernel_tests_enabled("retry pause end to end") {
        return;
    }
    let world = World::start(&config(&[RETRY_PAUSE]));
    let start = Instant::now();
    let mut client = spawn(&world, &sdk_calls("always-429-pause", 1, 3, 0), "retry-pause-marker");
    let pid = client.id();
    let mut seen_stopped = false;
    while client.try_wait().expect("wait").is_none() && start.elapsed() < Duration::from_secs(60) {
        seen_stopped |= state(pid) == Some('T');
        thread::sleep(Duration::from_millis(20));
    }
    let output = client.wait_with_output().expect("output");
    assert!(output.status.success(), "{}", world.daemon.log.text());
    assert!(seen_stopped, "the client was never seen paused");
    assert!(start.elapsed() >= Duration::from_secs(2), "resumed before the cooldown");
    // The held third retry went out after the pause; the SDK then gave up.
    assert_eq!(world.mock.received("always-429-pause"), 4);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "gave up\ndone");
    let m = metrics(&world);
    assert_eq!(sum(&m, "gauge_policy_actions_total", &[("policy", "retry-pause"), ("action", "pause")]), 1.0, "{m}");
}

#[test]
fn the_first_request_past_the_budget_never_reaches_the_provider() {
    if !kernel_tests_enabled("budget end to end") {
        return;
    }
    let world = World::start(&config(&[BUDGET]));
    // Each call costs (21 + 7) tokens x $1000 per million = $0.028: the budget of
    // $0.05 is spent by the second, so the third is stopped.
    let mut client = spawn(&world, &sdk_calls("budget-model", 5, 0, 1), "budget-marker");
    let status = wait(&mut client, "the spending client", &world);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{}", world.daemon.log.text());
    assert_eq!(world.mock.received("budget-model"), 2, "{}", world.daemon.log.text());
    let m = metrics(&world);
    let spent = sum(&m, "gauge_llm_cost_usd_total", &[("agent", "budget-bot")]);
    assert!((spent - 0.056).abs() < 1e-12, "spent {spent}\n{m}");
    // Seen when the second response arrives, and again if the third request was held
    // before the kernel was armed: either way it never left.
    assert!(sum(&m, "gauge_policy_violations_total", &[("policy", "budget"), ("limit", "max_cost_usd")]) >= 1.0, "{m}");
}

#[test]
fn an_oversized_prompt_is_held_and_never_sent_while_a_small_one_passes() {
    if !kernel_tests_enabled("context ceiling end to end") {
        return;
    }
    let world = World::start(&config(&[CONTEXT_CEILING]));
    // The first call says "hi"; the second carries 5000 words.
    let mut client = spawn(&world, &sdk_calls("context-model", 2, 0, 5000), "context-marker");
    let status = wait(&mut client, "the long-prompt client", &world);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{}", world.daemon.log.text());
    assert_eq!(world.mock.received("context-model"), 1, "{}", world.daemon.log.text());
    let m = metrics(&world);
    assert_eq!(sum(&m, "gauge_policy_violations_total", &[("policy", "context-ceiling"), ("limit", "max_input_tokens")]), 1.0, "{m}");
    assert!(sum(&m, "gauge_policy_held_requests_total", &[("agent", "context-bot"), ("decision", "released")]) >= 1.0, "{m}");
}

#[test]
fn an_oversized_prompt_over_http2_is_held_once_the_connection_is_known() {
    if !kernel_tests_enabled("context ceiling over HTTP/2 end to end") {
        return;
    }
    let policy = CONTEXT_CEILING.replace("\"context-bot\"", "\"context-h2-bot\"");
    let world = World::start(&config(&[&policy]));
    // The first call ("hi") marks the HTTP/2 connection as LLM traffic; the second,
    // 5000 words on the same connection, is held frame by frame and stopped.
    let mut client = spawn(&world, &sdk_script("context-h2-model", 2, 0, 5000, true), "context-h2-marker");
    let status = wait(&mut client, "the HTTP/2 long-prompt client", &world);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{}", world.daemon.log.text());
    assert_eq!(world.mock.received("context-h2-model"), 1, "{}", world.daemon.log.text());
    let m = metrics(&world);
    assert_eq!(sum(&m, "gauge_policy_violations_total", &[("policy", "context-ceiling"), ("limit", "max_input_tokens")]), 1.0, "{m}");
}

#[test]
fn protected_processes_are_never_touched_and_dry_run_only_counts() {
    if !kernel_tests_enabled("protection and dry-run end to end") {
        return;
    }
    let world = World::start(&config(&[GUARDED, DRY, NS_INIT]));
    let bin = tempfile::tempdir().expect("tempdir");
    let url = format!("https://127.0.0.1:{}/v1/chat/completions", world.mock.port);
    for (name, model) in [("gauge-guarded", "guarded-model"), ("gauge-dry-bot", "dry-model"), ("gauge-ns-init", "ns-init-model")] {
        let copy = bin.path().join(name);
        std::fs::copy("/usr/bin/curl", &copy).expect("copy curl");
        // The last runs as PID 1 of a pid namespace of its own, as in a container.
        let mut curl = if name == "gauge-ns-init" {
            let mut unshare = Command::new("unshare");
            unshare.args(["--pid", "--fork"]).arg(&copy);
            unshare
        } else {
            Command::new(&copy)
        };
        curl.args(["-sS", "--fail", "--http1.1", "--cacert"])
            .arg(&world.cert)
            .args(["-H", "content-type: application/json", "-d", &format!(r#"{{"model":"{model}","messages":[]}}"#), &url]);
        clients::run(name, &mut curl);
        assert_eq!(world.mock.received(model), 1, "{name}:\n{}", world.daemon.log.text());
    }
    let m = metrics(&world);
    assert_eq!(sum(&m, "gauge_policy_violations_total", &[("policy", "never-guarded")]), 0.0, "{m}");
    assert_eq!(sum(&m, "gauge_policy_violations_total", &[("policy", "never-ns-init")]), 0.0, "{m}");
    assert_eq!(sum(&m, "gauge_policy_violations_total", &[("policy", "dry"), ("limit", "allowed_models")]), 1.0, "{m}");
    assert_eq!(sum(&m, "gauge_policy_actions_total", &[]), 0.0, "{m}");
}

#[test]
fn freeze_and_throttle_act_on_cgroups_and_are_released_when_the_agent_stops() {
    if !kernel_tests_enabled("freeze and throttle end to end") {
        return;
    }
    let id = std::process::id();
    let cases = [
        ("freeze-v2", "freeze", PathBuf::from(format!("/sys/fs/cgroup/unified/gauge-policy-v2-{id}")), "cgroup.events", "frozen 1", "frozen 0"),
        ("freeze-v1", "freeze", PathBuf::from(format!("/sys/fs/cgroup/freezer/gauge-policy-v1-{id}")), "freezer.state", "FROZEN", "THAWED"),
        ("throttle-v1", "throttle", PathBuf::from(format!("/sys/fs/cgroup/cpu/gauge-policy-cpu-{id}")), "cpu.cfs_quota_us", "10000", "-1"),
    ];
    let mut config = String::new();
    for (agent, action, ..) in &cases {
        config.push_str(&format!(
            "[[agents]]\nname = \"{agent}\"\nmatch = {{ cmdline = \"{agent}-marker\" }}\n\
             [[policies]]\nname = \"{agent}\"\nagent = \"{agent}\"\nmax_requests = 1\nwindow = \"60s\"\naction = \"{action}\"\ncooldown = \"10m\"\n"
        ));
    }
    let mut world = World::start(&config);
    let mut running = Vec::new();
    for (agent, _, dir, ..) in &cases {
        std::fs::create_dir_all(dir).expect("make cgroup");
        running.push(cgroup_client(&world, dir, agent, &format!("{agent}-marker")));
    }
    for (agent, _, dir, file, acted, _) in &cases {
        wait_for_file(&dir.join(file), acted, &world, agent);
    }
    assert_eq!(sum(&metrics(&world), "gauge_policy_actions_total", &[]), 3.0, "{}", world.daemon.log.text());
    world.daemon.terminate();
    for ((agent, _, dir, file, _, released), mut child) in cases.iter().zip(running) {
        let content = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(content.contains(released), "{agent}: {file} still says {content:?} after the agent stopped");
        let status = wait_timeout(&mut child, Duration::from_secs(30)).expect("client resumes and ends");
        assert!(status.success(), "{agent}: client failed");
        let _ = std::fs::remove_dir(dir);
    }
}

/// A client started in the cgroup at `dir` making three requests for `model`: under
/// a `max_requests = 1` policy, the second crosses it and the third is stopped in the
/// kernel and the cgroup acted on; the client then waits in it. (The mock may drop a
/// connection frozen past its idle timeout: not what is tested.)
fn cgroup_client(world: &World, dir: &Path, model: &str, marker: &str) -> Child {
    let script = format!(
        "import ssl, http.client, time\n\
         ctx = ssl.create_default_context(cafile='{ca}')\n\
         for i in range(3):\n\
         \x20   try:\n\
         \x20       c = http.client.HTTPSConnection('127.0.0.1', {port}, context=ctx)\n\
         \x20       c.request('POST', '/v1/chat/completions', body='{{\"model\":\"{model}\",\"messages\":[]}}', headers={{'content-type': 'application/json'}})\n\
         \x20       c.getresponse().read()\n\
         \x20   except OSError as e:\n\
         \x20       print('connection lost while frozen:', e, flush=True)\n\
         \x20   time.sleep(0.3)\n",
        ca = world.cert.display(),
        port = world.mock.port,
    );
    let line = format!("echo $$ > {}/cgroup.procs && exec python3 -c \"$0\" {marker}", dir.display());
    Command::new("sh").args(["-c", &line, &script]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("client")
}

fn wait_for_file(path: &Path, wanted: &str, world: &World, what: &str) {
    let start = Instant::now();
    while !std::fs::read_to_string(path).unwrap_or_default().contains(wanted) {
        assert!(start.elapsed() < Duration::from_secs(30), "{what}: {} never said {wanted}:\n{}", path.display(), world.daemon.log.text());
        thread::sleep(Duration::from_millis(50));
    }
}

fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rfind(')').and_then(|i| stat[i + 2..].chars().next())
}

#[test]
fn policies_reload_from_the_config_file_and_a_broken_file_keeps_the_running_ones() {
    if !kernel_tests_enabled("policy reload end to end") {
        return;
    }
    let agent = "[[agents]]\nname = \"reloaded\"\nmatch = { comm = \"gauge-reload\" }\n";
    // Its own agent and policy: other tests' daemons run at the same time.
    let policy = "[[policies]]\nname = \"reloaded\"\nagent = \"reloaded\"\nallowed_models = [\"nothing\"]\naction = \"kill\"\ngate = true\ndry_run = true\n";
    let world = World::start(agent);
    let bin = tempfile::tempdir().expect("tempdir");
    let copy = bin.path().join("gauge-reload");
    std::fs::copy("/usr/bin/curl", &copy).expect("copy curl");
    let url = format!("https://127.0.0.1:{}/v1/chat/completions", world.mock.port);
    let call = || {
        let mut curl = Command::new(&copy);
        curl.args(["-sS", "--fail", "--http1.1", "--cacert"])
            .arg(&world.cert)
            .args(["-H", "content-type: application/json", "-d", r#"{"model":"reload-model","messages":[]}"#, &url]);
        clients::run("curl", &mut curl);
    };
    let violations = || sum(&metrics(&world), "gauge_policy_violations_total", &[("policy", "reloaded")]);
    call();
    assert_eq!(violations(), 0.0, "no policy yet");
    std::fs::write(&world.daemon.config, format!("{agent}{policy}")).expect("rewrite config");
    world.daemon.log.wait_for(&["config reloaded"], Duration::from_secs(20));
    call();
    assert_eq!(violations(), 1.0, "the reloaded policy counts:\n{}", world.daemon.log.text());
    std::fs::write(&world.daemon.config, format!("{agent}{policy}\n[[policies]]\nname = \"x\"\nagent = \"*\"\nmax_requests = -1\n"))
        .expect("break config");
    let start = Instant::now();
    while sum(&metrics(&world), "gauge_config_reload_failures_total", &[]) < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(20), "the broken config was not noticed:\n{}", world.daemon.log.text());
        thread::sleep(Duration::from_millis(100));
    }
    let log = world.daemon.log.text();
    assert!(log.contains("config reload refused") && log.contains("max_requests") && log.contains("line"), "{log}");
    call();
    assert_eq!(violations(), 2.0, "the running policies stay");
}

#[test]
fn a_cgroup_frozen_by_an_agent_that_was_killed_is_thawed_by_the_next_start() {
    if !kernel_tests_enabled("crash and restart end to end") {
        return;
    }
    let id = std::process::id();
    let dir = PathBuf::from(format!("/sys/fs/cgroup/unified/gauge-policy-crash-{id}"));
    std::fs::create_dir_all(&dir).expect("make cgroup");
    let config = "[[agents]]\nname = \"crash-bot\"\nmatch = { cmdline = \"crash-marker\" }\n\
                  [[policies]]\nname = \"crash\"\nagent = \"crash-bot\"\nmax_requests = 1\nwindow = \"60s\"\naction = \"freeze\"\ncooldown = \"10m\"\n";
    let undo_dir = tempfile::tempdir().expect("tempdir");
    let undo = undo_dir.path().join("undo.json");
    let mut world = World::start(config);
    // World's own daemon has its own undo file: replace it with one on a known file.
    world.daemon.kill();
    world.daemon = gauge_tests::agent::Daemon::start_with_undo(config, &undo);
    world.daemon.wait_healthy();
    let mut client = cgroup_client(&world, &dir, "crash", "crash-marker");
    wait_for_file(&dir.join("cgroup.events"), "frozen 1", &world, "crash-bot");
    // The agent dies without undoing anything: the cgroup stays frozen...
    world.daemon.kill();
    thread::sleep(Duration::from_millis(300));
    assert!(std::fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default().contains("frozen 1"));
    // ...until the next start, which thaws it first thing.
    let mut next = gauge_tests::agent::Daemon::start_with_undo(config, &undo);
    next.wait_healthy();
    assert!(next.log.text().contains("thawing a cgroup a previous agent left frozen"), "{}", next.log.text());
    let status = wait_timeout(&mut client, Duration::from_secs(30)).expect("the client resumes and ends");
    assert!(status.success(), "the client ended with {status}");
    assert!(std::fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default().contains("frozen 0"));
    next.terminate();
    let _ = std::fs::remove_dir(&dir);
}
