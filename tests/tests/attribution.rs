//! Attribution end to end: real clients started under different agents by each kind
//! of `[[agents]]` matcher, in cgroups made here (v1 and v2, container-like paths),
//! one in its own mount namespace with its own copy of libssl (a container without
//! Docker). Cost is checked to the micro-dollar and outcomes through the CLI.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use gauge_tests::{
    agent::agent_binary,
    clients,
    kernel_tests_enabled,
    world::{Scrape, World, sum},
};

/// 64 hex digits, as runtimes name containers.
const _: () = assert!(DOCKER_ID.len() == 64 && POD_CONTAINER_ID.len() == 64 && NS_CONTAINER_ID.len() == 64);
const DOCKER_ID: &str = "d0c4e7000000000000000000000000000000000000000000000000000000aaaa";
const POD_CONTAINER_ID: &str = "c0417a1ae700000000000000000000000000000000000000000000000000bbbb";
const POD_UID: &str = "0f3e2a44-8d1b-4c5e-9a77-1234567890ab";
const NS_CONTAINER_ID: &str = "a5a5a5a5a500000000000000000000000000000000000000000000000000cccc";

fn config() -> String {
    format!(
        r#"
[attribution.customer]
enabled = true

[[agents]]
name = "by-cmdline"
match = {{ cmdline = 'support_bot\.py' }}
[[agents]]
name = "by-exe"
match = {{ exe = "gauge-exe-bot" }}
[[agents]]
name = "by-comm"
match = {{ comm = "gauge-comm-bot" }}
[[agents]]
name = "by-env"
match = {{ env = "TEAM=ml" }}
[[agents]]
name = "by-cgroup"
match = {{ cgroup = "^/gauge-test-v2/" }}
[[agents]]
name = "by-container"
match = {{ container = "{short}" }}
[[agents]]
name = "by-user-agent"
match = {{ user_agent = "^gauge-ua-bot/" }}
[[agents]]
name = "pipeline"
match = {{ cmdline = "gauge-parent-marker" }}

[[prices]]
model = "gpt-4o-mini"
input = 0.15
cache_read = 0.075
output = 0.6
"#,
        short = &DOCKER_ID[..12]
    )
}

/// A cgroup made for the test, removed (with its parents made here) at the end.
struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    fn make(root: &str, path: &str) -> Self {
        let mut dirs = Vec::new();
        let mut dir = PathBuf::from(root);
        for part in path.trim_matches('/').split('/') {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot make cgroup {}: {e}", dir.display()));
                dirs.push(dir.clone());
            }
        }
        Self { dirs }
    }

    fn procs(&self) -> PathBuf {
        self.dirs.last().expect("made at least one level").join("cgroup.procs")
    }

    /// `cmd` run from a shell that first moves itself into this cgroup.
    fn wrap(&self, cmd: &Command) -> Command {
        wrap_in_shell(cmd, &format!("echo $$ > {}", self.procs().display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            // The test's processes have exited; a cgroup may take a moment to empty.
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `cmd` as a shell command line.
fn shell_line(cmd: &Command) -> String {
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(quote).collect::<Vec<_>>().join(" ")
}

/// `sh -c '<prelude> && exec <cmd>'`, keeping `cmd`'s environment.
fn wrap_in_shell(cmd: &Command, prelude: &str) -> Command {
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(format!("{prelude} && exec {}", shell_line(cmd)));
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            sh.env(k, v);
        }
    }
    sh
}

fn chat(world: &World, extra: &[&str]) -> Command {
    let url = format!("https://127.0.0.1:{}/v1/chat/completions", world.mock.port);
    let mut args = vec!["-H", "content-type: application/json", "-d", r#"{"model":"gpt-4o-mini","messages":[]}"#];
    args.extend_from_slice(extra);
    clients::curl(&world.cert, &url, &args)
}

/// A copy of curl under another name, so its executable and thread name differ.
fn curl_named(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy("/usr/bin/curl", &path).expect("copy curl");
    path
}

fn retarget(cmd: &Command, program: &Path) -> Command {
    let mut out = Command::new(program);
    out.args(cmd.get_args());
    out
}

/// Scrapes once each agent has its number of calls (metering lags the client's exit
/// by up to the capture's read interval).
fn scrape_agents<'w>(world: &'w World, agents: &[(&str, f64)]) -> Scrape<'w> {
    let labels: Vec<[(&str, &str); 1]> = agents.iter().map(|(a, _)| [("agent", *a)]).collect();
    let wanted: Vec<(&[(&str, &str)], f64)> = labels.iter().zip(agents).map(|(l, (_, n))| (&l[..], *n)).collect();
    world.scrape(&wanted)
}

/// Per call the mock reports prompt 21 (5 cached) and completion 7: at the test's
/// gpt-4o-mini prices that is 16 x 0.15 + 5 x 0.075 + 7 x 0.6 = 6.975 micro-dollars.
const CALL_USD: f64 = 6.975e-6;

#[test]
fn each_matcher_kind_names_its_agent_and_costs_are_exact() {
    if !kernel_tests_enabled("attribution end to end") {
        return;
    }
    let world = World::start(&config());
    let bin = tempfile::tempdir().expect("tempdir");
    let run = |what: &str, mut cmd: Command| {
        clients::run(what, &mut cmd);
    };
    run("by cmdline", chat(&world, &["-w", " support_bot.py"]));
    run("by exe", retarget(&chat(&world, &[]), &curl_named(bin.path(), "gauge-exe-bot")));
    run("by comm", retarget(&chat(&world, &[]), &curl_named(bin.path(), "gauge-comm-bot")));
    let mut by_env = chat(&world, &[]);
    by_env.env("TEAM", "ml");
    run("by env", by_env);
    let mut agent_variable = chat(&world, &[]);
    agent_variable.env("GAUGE_AGENT", "named-by-variable");
    run("by GAUGE_AGENT", agent_variable);
    run("by user agent", chat(&world, &["-A", "gauge-ua-bot/1.0"]));
    run("known client", chat(&world, &["-H", "x-claude-code-session-id: 42"]));
    let v2 = Cgroup::make("/sys/fs/cgroup/unified", &format!("gauge-test-v2/{}", std::process::id()));
    run("by cgroup v2", v2.wrap(&chat(&world, &[])));
    let docker = Cgroup::make("/sys/fs/cgroup/unified", &format!("system.slice/docker-{DOCKER_ID}.scope"));
    run("by container (docker-like v2 path)", docker.wrap(&chat(&world, &["-H", "x-gauge-workflow: nightly-report"])));
    let pod = Cgroup::make("/sys/fs/cgroup/pids", &format!("kubepods/burstable/pod{POD_UID}/{POD_CONTAINER_ID}"));
    run("kubepods v1 path", pod.wrap(&chat(&world, &["-H", "x-gauge-customer: acme"])));
    // A child inherits its parent's agent: the shell matches, curl does not.
    let mut parent = Command::new("sh");
    parent.args(["-c", &format!("{}; true", shell_line(&chat(&world, &[]))), "sh", "gauge-parent-marker"]);
    run("child of a matched parent", parent);
    run("nobody's", chat(&world, &[]));

    let agents = [
        "by-cmdline", "by-exe", "by-comm", "by-env", "named-by-variable", "by-user-agent", "claude-code", "by-cgroup",
        "by-container", "pipeline", "unassigned",
    ];
    // The kubepods process is nobody's too.
    let calls_of = |agent: &str| if agent == "unassigned" { 2.0 } else { 1.0 };
    let wanted: Vec<(&str, f64)> = agents.iter().map(|a| (*a, calls_of(a))).collect();
    let m = scrape_agents(&world, &wanted);
    for agent in agents {
        let calls = calls_of(agent);
        m.check("gauge_llm_requests_total", &[("agent", agent), ("status", "200")], calls);
        m.check("gauge_llm_cost_usd_total", &[("agent", agent), ("source", "reported")], CALL_USD * calls);
    }
    m.check("gauge_llm_requests_total", &[("agent", "by-exe"), ("process", "gauge-exe-bot")], 1.0);
    m.check("gauge_llm_requests_total", &[("agent", "by-container"), ("container", &DOCKER_ID[..12]), ("workflow", "nightly-report")], 1.0);
    // The kubepods process: its container and pod are known from the v1 path alone.
    m.check("gauge_llm_requests_total", &[("agent", "unassigned"), ("container", &POD_CONTAINER_ID[..12]), ("customer", "acme")], 1.0);
    let info = [("container", &POD_CONTAINER_ID[..12]), ("pod_uid", POD_UID), ("qos", "burstable")];
    assert_eq!(sum(&m.text, "gauge_container_info", &info), 1.0, "{}", m.text);
    m.free_of("Bearer");

    // Outcomes through the CLI, set against the agent's spend.
    let out = Command::new(agent_binary())
        .args(["outcome", "--listen", &world.daemon.addr, "--agent", "by-env", "--name", "resolved_ticket", "--count", "2"])
        .output()
        .expect("run gauge-agent outcome");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, text) = world.daemon.get("/metrics").expect("scrape");
    let outcome = [("agent", "by-env"), ("outcome", "resolved_ticket")];
    assert_eq!(sum(&text, "gauge_outcomes_total", &outcome), 2.0, "{text}");
    assert_eq!(sum(&text, "gauge_cost_per_outcome_usd", &outcome), CALL_USD / 2.0, "{text}");
    let refused = Command::new(agent_binary())
        .args(["outcome", "--listen", &world.daemon.addr, "--agent", "by env", "--name", "x"])
        .output()
        .expect("run gauge-agent outcome");
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("agent must be"));
}

#[test]
fn a_process_in_its_own_mount_namespace_with_its_own_libssl_is_seen_and_attributed() {
    if !kernel_tests_enabled("mount namespace end to end") {
        return;
    }
    let world = World::start(&config());
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("libssl.so.3");
    std::fs::copy("/usr/lib/x86_64-linux-gnu/libssl.so.3", &copy).expect("copy libssl");
    let copy_inode = std::fs::metadata(&copy).expect("stat copy").ino();
    let container = Cgroup::make("/sys/fs/cgroup/unified", &format!("machine.slice/libpod-{NS_CONTAINER_ID}.scope"));
    // Python loads libssl on `import ssl`, then waits for the test's go-ahead.
    let script = format!(
        "import ssl, sys, http.client\n\
         sys.stdin.readline()\n\
         c = http.client.HTTPSConnection('127.0.0.1', {port}, context=ssl.create_default_context(cafile='{ca}'))\n\
         c.request('POST', '/v1/chat/completions', body='{{\"model\":\"gpt-4o-mini\",\"messages\":[]}}', headers={{'content-type': 'application/json'}})\n\
         r = c.getresponse()\n\
         r.read()\n\
         assert r.status == 200\n",
        port = world.mock.port,
        ca = world.cert.display(),
    );
    let mut python = Command::new("python3");
    python.args(["-c", &script]).env("GAUGE_AGENT", "namespaced-bot");
    let prelude = format!(
        "mount --bind {} /usr/lib/x86_64-linux-gnu/libssl.so.3 && echo $$ > {}",
        copy.display(),
        container.procs().display()
    );
    let inner = wrap_in_shell(&python, &prelude);
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private"]).arg(inner.get_program()).args(inner.get_args());
    cmd.envs(inner.get_envs().filter_map(|(k, v)| Some((k, v?))));
    let held = clients::Held::start("python in its own mount namespace", &mut cmd);
    // The copy is a file of its own (its inode), reached through /proc/PID/root.
    let start = Instant::now();
    while !world.daemon.get("/targets").is_some_and(|(_, body)| body.contains(&format!("\"ino\":{copy_inode}"))) {
        assert!(start.elapsed() < Duration::from_secs(20), "the namespace's libssl was never hooked:\n{}", world.daemon.log.text());
        thread::sleep(Duration::from_millis(50));
    }
    held.go("python in its own mount namespace");
    let m = scrape_agents(&world, &[("namespaced-bot", 1.0)]);
    let labels = [("agent", "namespaced-bot"), ("container", &NS_CONTAINER_ID[..12]), ("status", "200")];
    m.check("gauge_llm_requests_total", &labels, 1.0);
    m.check("gauge_llm_cost_usd_total", &[("agent", "namespaced-bot")], CALL_USD);
    assert_eq!(sum(&m.text, "gauge_container_info", &[("container", &NS_CONTAINER_ID[..12]), ("runtime", "podman")]), 1.0, "{}", m.text);
}

#[test]
fn outcomes_need_the_daemons_token_when_it_has_one() {
    if !kernel_tests_enabled("outcome token end to end") {
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken-for-outcomes\n").expect("write token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let world = World::start(&format!("[server]\ntoken_file = \"{}\"\n", token.display()));
    let report = |extra: &[&str]| {
        Command::new(agent_binary())
            .args(["outcome", "--listen", &world.daemon.addr, "--agent", "bot", "--name", "resolved_ticket"])
            .args(extra)
            .env_remove("GAUGE_TOKEN_FILE")
            .output()
            .expect("run gauge-agent outcome")
    };
    let refused = report(&[]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("401"), "{refused:?}");
    let accepted = report(&["--token-file", &token.display().to_string()]);
    assert!(accepted.status.success(), "{}", String::from_utf8_lossy(&accepted.stderr));
    let (_, text) = world.daemon.get("/metrics").expect("scrape");
    assert_eq!(sum(&text, "gauge_outcomes_total", &[("agent", "bot")]), 1.0, "{text}");
    assert!(!text.contains("t0ken-for-outcomes") && !world.daemon.log.text().contains("t0ken-for-outcomes"), "the token leaked");
}
