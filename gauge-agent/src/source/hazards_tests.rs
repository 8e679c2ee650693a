//! Tests of the hazard probe: the decision, the seccomp filter, finding the probed
//! function.

use super::*;

fn exited(code: i32) -> ExitStatus {
    ExitStatus::from_raw(code << 8)
}

fn killed(signal: i32) -> ExitStatus {
    ExitStatus::from_raw(signal)
}

const KERNEL_6_18: Option<KernelInfo> = Some(KernelInfo { major: 6, minor: 18, x86_64: true });

#[test]
fn the_child_is_judged_by_how_it_ended_and_what_it_said() {
    assert_eq!(classify(exited(0), b"ready\nok\n", b"", true), CanaryOutcome::Survived);
    assert_eq!(classify(killed(libc::SIGSYS), b"ready\n", b"", true), CanaryOutcome::Killed(libc::SIGSYS));
    assert_eq!(classify(killed(libc::SIGKILL), b"ready\n", b"", false), CanaryOutcome::Killed(libc::SIGKILL));
    // Surviving a probe that never fired, or exiting 0 without the call having
    // returned, is no proof of safety.
    assert!(matches!(classify(exited(0), b"ready\nok\n", b"", false), CanaryOutcome::Failed(_)));
    assert!(matches!(classify(exited(0), b"ready\n", b"", true), CanaryOutcome::Failed(_)));
    // Dying before confinement says nothing about return probes.
    assert!(matches!(classify(killed(libc::SIGKILL), b"", b"", false), CanaryOutcome::Failed(_)));
    let CanaryOutcome::Failed(why) = classify(exited(2), b"", b"cannot enter seccomp: EINVAL\n", false) else {
        panic!("a child that could not confine itself is a failed canary")
    };
    assert!(why.contains("code 2") && why.contains("cannot enter seccomp"), "{why}");
}

#[test]
fn config_decides_without_running_the_canary() {
    let never = || -> CanaryOutcome { panic!("the canary runs only in auto mode") };
    let on = decide(ReturnProbes::On, never, KERNEL_6_18);
    assert!(on.on && on.reason == Reason::Config);
    let off = decide(ReturnProbes::Off, never, KERNEL_6_18);
    assert!(!off.on && off.reason == Reason::Config && off.state_label() == "off");
    assert!(off.detail.contains("capture.return_probes = \"off\""), "{}", off.detail);
}

#[test]
fn auto_follows_the_canary() {
    let state = decide(ReturnProbes::Auto, || CanaryOutcome::Survived, KERNEL_6_18);
    assert!(state.on && state.reason == Reason::Canary && state.state_label() == "on");
    let state = decide(ReturnProbes::Auto, || CanaryOutcome::Killed(libc::SIGSYS), KERNEL_6_18);
    assert!(!state.on && state.reason == Reason::Canary);
    assert!(state.detail.contains("SIGSYS"), "{}", state.detail);
    let state = decide(ReturnProbes::Auto, || CanaryOutcome::TimedOut, KERNEL_6_18);
    assert!(!state.on && state.reason == Reason::Canary);
}

#[test]
fn a_canary_that_cannot_run_fails_safe_where_the_hazard_may_exist() {
    let failed = || CanaryOutcome::Failed("no symbol".into());
    let state = decide(ReturnProbes::Auto, failed, KERNEL_6_18);
    assert!(!state.on && state.detail.contains("no symbol") && state.detail.contains("return_probes = \"on\""), "{}", state.detail);
    assert!(!decide(ReturnProbes::Auto, failed, None).on, "unknown kernel: off");
    let old = Some(KernelInfo { major: 6, minor: 10, x86_64: true });
    assert!(decide(ReturnProbes::Auto, failed, old).on, "before 6.11 there is no uretprobe syscall");
    let arm = Some(KernelInfo { major: 6, minor: 18, x86_64: false });
    assert!(decide(ReturnProbes::Auto, failed, arm).on, "the syscall is x86_64's only");
}

#[test]
fn kernel_releases_parse() {
    assert_eq!(parse_release("6.18.0-1-amd64\n"), Some((6, 18)));
    assert_eq!(parse_release("6.11"), Some((6, 11)));
    assert_eq!(parse_release("5.15.0-105-generic"), Some((5, 15)));
    assert_eq!(parse_release("garbage"), None);
    assert!(KernelInfo::current().is_some());
}

#[test]
fn the_filter_allows_exactly_the_listed_syscalls() {
    let program = filter();
    // arch check (3), nr load, one comparison each, kill, allow.
    assert_eq!(program.len(), 4 + ALLOWED.len() + 2);
    for (i, insn) in program.iter().enumerate() {
        if insn.code == (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16 && i >= 4 {
            assert_eq!(i + 1 + insn.jt as usize, program.len() - 1, "comparison {i} jumps to the allow");
        }
    }
    assert_eq!(program[program.len() - 2].k, libc::SECCOMP_RET_KILL_PROCESS);
    assert_eq!(program[program.len() - 1].k, libc::SECCOMP_RET_ALLOW);
}

#[test]
fn the_probed_function_is_found_in_the_test_binary() {
    let offset = elf::function_offset(Path::new("/proc/self/exe"), CANARY_SYMBOL).expect("ELF reads");
    assert!(offset.is_some_and(|o| o > 0), "{CANARY_SYMBOL} has a file offset");
    // The mapping says the same, which is what a stripped binary relies on.
    assert_eq!(mapped_offset(gauge_uretprobe_canary as *const () as usize), offset);
    let maps = "55d0a0000000-55d0a0100000 r-xp 00002000 08:01 42 /usr/bin/gauge-agent\n";
    assert_eq!(parse_mapped_offset(maps, 0x55d0a0000010), Some(0x2010));
    assert_eq!(parse_mapped_offset(maps, 0x55d0a0100000), None);
    assert_eq!(gauge_uretprobe_canary(41), 42);
}

#[test]
fn return_probes_parse_from_config_words() {
    #[derive(Deserialize)]
    struct C {
        m: ReturnProbes,
    }
    for (text, want) in [("auto", ReturnProbes::Auto), ("on", ReturnProbes::On), ("off", ReturnProbes::Off)] {
        let c: C = toml::from_str(&format!("m = \"{text}\"")).expect("parses");
        assert_eq!(c.m, want);
    }
    assert!(toml::from_str::<C>("m = \"yes\"").is_err());
}
