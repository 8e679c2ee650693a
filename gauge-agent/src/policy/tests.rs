//! The policy stage, fed by hand: decisions come out as commands.

use prometheus_client::registry::Registry;

use super::*;
use crate::policy::config::Protect;

fn stage(toml: &str, enforcement: EnforcementConfig) -> PolicyStage {
    #[derive(serde::Deserialize)]
    struct File {
        policies: Vec<PolicyConfig>,
    }
    let policies = toml::from_str::<File>(toml).expect("policies").policies;
    let guard = Guard { self_pid: 999_999, parent_pid: 999_998, config: enforcement };
    PolicyStage::register(policies, guard, &mut Registry::default())
}

fn bot(tgid: u32) -> (Subject, ProcessInfo) {
    let info = ProcessInfo { tgid, ppid: 100, comm: "python3".into(), exe: "/usr/bin/python3".into(), ..Default::default() };
    (Subject { tgid, agent: "bot".into(), cgroup: "/c".into() }, info)
}

fn request(model: &str, retry: u32) -> Vec<u8> {
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    format!("POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\nx-stainless-retry-count: {retry}\r\ncontent-length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

const GATED_KILL: &str = "[[policies]]\nname = \"cap\"\nagent = \"bot\"\nmax_retries = 1\nallowed_models = [\"gpt-4o-mini\"]\naction = \"kill\"\ngate = true\n";

#[test]
fn gated_processes_are_held_and_released_or_killed() {
    let mut s = stage(GATED_KILL, EnforcementConfig::default());
    let (subject, info) = bot(42);
    s.on_process(subject.clone(), &info);
    assert_eq!(s.take_commands(), vec![Command::Gate { tgid: 42 }]);
    let ok = request("gpt-4o-mini", 0);
    s.on_held(&subject, 1, 7, ok.len() as u32, 0, &ok);
    assert_eq!(
        s.take_commands(),
        vec![Command::MarkLlm { tgid: 42, connection: 7 }, Command::Signal { pid: 42, signal: SIGCONT, after: Duration::ZERO }]
    );
    let other = request("gpt-4o", 0);
    s.on_held(&subject, 2, 7, other.len() as u32, 0, &other);
    assert!(s.take_commands().contains(&Command::Signal { pid: 42, signal: SIGKILL, after: Duration::ZERO }));
}

#[test]
fn a_pause_continues_after_its_cooldown() {
    let mut s = stage(&GATED_KILL.replace("\"kill\"", "\"pause\"").replace("gate = true", "gate = true\ncooldown = \"2s\""), EnforcementConfig::default());
    let (subject, info) = bot(42);
    s.on_process(subject.clone(), &info);
    let other = request("gpt-4o", 0);
    s.on_held(&subject, 2, 7, other.len() as u32, 0, &other);
    let commands = s.take_commands();
    assert!(commands.contains(&Command::Signal { pid: 42, signal: SIGCONT, after: Duration::from_secs(2) }), "{commands:?}");
    assert!(!commands.iter().any(|c| matches!(c, Command::Signal { after, .. } if after.is_zero())), "{commands:?}");
}

#[test]
fn dry_run_counts_but_releases() {
    let mut s = stage(GATED_KILL, EnforcementConfig { dry_run: true, ..Default::default() });
    let (subject, info) = bot(42);
    s.on_process(subject.clone(), &info);
    assert_eq!(s.take_commands(), vec![Command::Gate { tgid: 42 }], "held to be counted, then released");
    let other = request("gpt-4o", 0);
    s.on_held(&subject, 2, 7, other.len() as u32, 0, &other);
    let commands = s.take_commands();
    assert!(!commands.iter().any(|c| matches!(c, Command::Signal { signal: SIGKILL, .. })), "{commands:?}");
    assert!(commands.contains(&Command::Signal { pid: 42, signal: SIGCONT, after: Duration::ZERO }), "{commands:?}");
}

#[test]
fn protected_processes_are_never_put_under_a_policy() {
    let protect = Protect { comm: vec!["python3".into()], ..Default::default() };
    let mut s = stage(GATED_KILL, EnforcementConfig { protect, ..Default::default() });
    let (subject, info) = bot(42);
    s.on_process(subject, &info);
    assert!(s.take_commands().is_empty());
    let guard = Guard { self_pid: 10, parent_pid: 9, config: EnforcementConfig::default() };
    for (tgid, ppid) in [(1, 0), (10, 1), (9, 1), (50, 2)] {
        assert!(guard.protects(&ProcessInfo { tgid, ppid, ..Default::default() }).is_some(), "pid {tgid}");
    }
    let container_init = ProcessInfo { tgid: 4242, ppid: 4000, namespace_init: true, ..Default::default() };
    assert_eq!(guard.protects(&container_init), Some("a container's PID 1 is never acted on"));
}

#[test]
fn an_ungated_limit_arms_the_kernel_and_clears_with_the_window() {
    let mut s = stage(
        "[[policies]]\nname = \"budget\"\nagent = \"bot\"\nmax_errors = 1\nwindow = \"10s\"\naction = \"terminate\"\ngrace = \"3s\"\n",
        EnforcementConfig::default(),
    );
    let (subject, info) = bot(42);
    s.on_process(subject.clone(), &info);
    assert!(s.take_commands().is_empty(), "not gated");
    let call = crate::llm::LlmCall::for_test(Some(500));
    let origin = crate::reassembly::Origin { tgid: 42, comm: "python3".into(), cgroup_id: 0, connection: 1 };
    let mut failed = Finished { metered: crate::reassembly::Metered { origin, call }, who: Default::default(), cost: None };
    for at in [1, 2] {
        failed.metered.call.end_ns = at * 1_000_000_000;
        s.on_finished(&failed, &subject);
    }
    assert_eq!(
        s.take_commands(),
        vec![Command::MarkLlm { tgid: 42, connection: 1 }, Command::Block { tgid: 42, signal: SIGSTOP, gate: false }],
        "its connection is marked as LLM traffic, then the process is armed"
    );
    s.on_stopped(42, 1, SIGSTOP);
    assert_eq!(
        s.take_commands(),
        vec![
            Command::Signal { pid: 42, signal: SIGTERM, after: Duration::ZERO },
            Command::Signal { pid: 42, signal: SIGCONT, after: Duration::ZERO },
            Command::Signal { pid: 42, signal: SIGKILL, after: Duration::from_secs(3) },
        ]
    );
    // The same request's body write is stopped too: it only continues.
    s.on_stopped(42, 1, SIGSTOP);
    assert_eq!(s.take_commands(), vec![Command::Signal { pid: 42, signal: SIGCONT, after: Duration::ZERO }]);
    s.tick(30 * 1_000_000_000);
    assert_eq!(s.take_commands(), vec![Command::Unblock { tgid: 42, gate: false }]);
}

#[test]
fn processes_that_are_gone_are_forgotten() {
    let mut s = stage(GATED_KILL, EnforcementConfig::default());
    for tgid in [42, 43] {
        let (subject, info) = bot(tgid);
        s.on_process(subject, &info);
    }
    s.forget_gone(|tgid| tgid == 43);
    assert!(!s.known.contains_key(&42) && s.known.contains_key(&43));
}

const S: u64 = 1_000_000_000;

fn fleet_policy(on_error: &str, gate: bool) -> String {
    format!(
        "[[policies]]\nname = \"fleet\"\nagent = \"bot\"\nscope = \"agent\"\nmax_cost_usd = 1.0\nwindow = \"24h\"\naction = \"kill\"\ngate = {gate}\n\
         spend_source = \"prometheus\"\n[policies.prometheus]\nurl = \"http://127.0.0.1:9\"\nquery = \"x\"\nrefresh = \"10s\"\ntimeout = \"1s\"\non_error = \"{on_error}\"\n"
    )
}

/// A stage whose fleet policy reads a cell the test sets, as the fetcher would.
fn fleet_stage(on_error: &str, gate: bool) -> (PolicyStage, std::sync::Arc<std::sync::Mutex<remote::Reading>>) {
    let mut s = stage(&fleet_policy(on_error, gate), EnforcementConfig::default());
    let cell = s.fleet.fake(s.engine.policies(), "fleet");
    (s, cell)
}

fn answered(usd: f64, at_ns: u64) -> remote::Reading {
    remote::Reading { answer: Some((usd, at_ns)), answered: None, error: None, asked: true }
}

/// Holds one whole request of process 42 at `at_ns`: whether it was released.
fn held(s: &mut PolicyStage, at_ns: u64) -> bool {
    let (subject, _) = bot(42);
    let write = request("gpt-4o-mini", 0);
    s.on_held(&subject, at_ns, 7, write.len() as u32, 0, &write);
    s.take_commands().contains(&Command::Signal { pid: 42, signal: SIGCONT, after: Duration::ZERO })
}

#[test]
fn a_fleet_budget_stops_requests_once_the_fleet_has_spent_it() {
    let (mut s, cell) = fleet_stage("closed", true);
    let (subject, info) = bot(42);
    s.on_process(subject, &info);
    s.take_commands();
    assert!(held(&mut s, S), "before the first answer: the local count, nothing spent");
    *cell.lock().expect("lock") = answered(0.5, S);
    assert!(held(&mut s, 2 * S), "the fleet has spent half");
    *cell.lock().expect("lock") = answered(1.2, 3 * S);
    assert!(!held(&mut s, 4 * S), "the fleet has spent it all, none of it here");
    *cell.lock().expect("lock") = answered(0.2, 5 * S);
    assert!(held(&mut s, 6 * S), "the window moved on across the fleet");
}

#[test]
fn a_fleet_budget_without_a_fresh_answer_fails_open_or_closed() {
    for (on_error, released) in [("open", true), ("closed", false)] {
        let (mut s, cell) = fleet_stage(on_error, true);
        let (subject, info) = bot(42);
        s.on_process(subject, &info);
        *cell.lock().expect("lock") = answered(0.5, S);
        assert!(held(&mut s, 2 * S), "{on_error}: fresh and under the budget");
        // A failed query since: the answer of 1 s is still good for 3 refreshes (30 s).
        cell.lock().expect("lock").error = Some("timeout");
        assert!(held(&mut s, 30 * S), "{on_error}: cached through one failure");
        assert_eq!(held(&mut s, 32 * S), released, "{on_error}: stale");
        // Never answered at all (Prometheus down from the start).
        *cell.lock().expect("lock") = remote::Reading { asked: true, error: Some("connect"), ..Default::default() };
        assert_eq!(held(&mut s, 33 * S), released, "{on_error}: down");
    }
}

#[test]
fn an_ungated_fleet_budget_arms_known_processes_on_the_tick_and_lets_them_go() {
    let (mut s, cell) = fleet_stage("closed", false);
    let (subject, info) = bot(42);
    s.on_process(subject, &info);
    assert!(s.take_commands().is_empty(), "not gated");
    *cell.lock().expect("lock") = answered(0.5, S);
    s.tick(2 * S);
    assert!(s.take_commands().is_empty(), "under the budget");
    *cell.lock().expect("lock") = answered(3.0, 3 * S);
    s.tick(4 * S);
    assert_eq!(s.take_commands(), vec![Command::Block { tgid: 42, signal: SIGKILL, gate: false }]);
    s.tick(5 * S);
    assert!(s.take_commands().is_empty(), "armed once");
    *cell.lock().expect("lock") = answered(0.1, 6 * S);
    s.tick(7 * S);
    assert_eq!(s.take_commands(), vec![Command::Unblock { tgid: 42, gate: false }]);
}
