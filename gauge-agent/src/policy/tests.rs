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
