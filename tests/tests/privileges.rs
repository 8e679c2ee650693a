//! Least privilege: the real daemon, run as an unprivileged user (65534) with exactly
//! the capabilities the README documents as ambient capabilities (`setpriv`),
//! attaches and meters a real curl call; with any one required capability taken
//! away it refuses to start and names that capability.

use std::{thread, time::{Duration, Instant}};

use gauge_tests::{
    agent::{Daemon, Refused},
    clients, kernel_tests_enabled,
    mock::{MockLlm, write_certificate},
    world::sum,
};

/// Not root, and in no group: whatever it reaches, it reaches by its capabilities.
const NOBODY: &str = "65534";

/// The set the README documents for `gauge-agent run` (setpriv's names). Kernels that
/// still let CAP_PERFMON create uprobes (before the 2025 revert) do without sys_admin.
const DOCUMENTED: [&str; 4] = ["bpf", "perfmon", "sys_admin", "sys_ptrace"];

/// `setpriv` running the next command as NOBODY with exactly `caps`: inheritable,
/// ambient (so they survive exec into a file without capabilities) and bounding.
fn as_nobody_with(caps: &[&str]) -> Vec<String> {
    let list: String = caps.iter().map(|c| format!(",+{c}")).collect();
    [
        "setpriv",
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        &format!("--inh-caps=-all{list}"),
        &format!("--ambient-caps=-all{list}"),
        &format!("--bounding-set=-all{list}"),
        // Changing user clears the parent-death signal the harness sets.
        "--pdeathsig=KILL",
        "--",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn without(caps: &[&'static str], dropped: &str) -> Vec<&'static str> {
    caps.iter().copied().filter(|c| *c != dropped).collect()
}

fn cap_name(setpriv: &str) -> String {
    format!("CAP_{}", setpriv.to_ascii_uppercase())
}

fn scrape(daemon: &Daemon) -> String {
    daemon.get("/metrics").expect("scrape").1
}

const POLICY: &str = "[[policies]]\nname = \"cap\"\nagent = \"*\"\nmax_requests = 100000\nwindow = \"60s\"\naction = \"alert\"\n";

#[test]
fn with_only_the_documented_capabilities_an_unprivileged_daemon_meters_a_real_call() {
    if !kernel_tests_enabled("least privilege: documented set") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_certificate(dir.path());
    let mock = MockLlm::start(&cert, &key);
    let mut daemon = Daemon::start_through(&as_nobody_with(&DOCUMENTED), "")
        .unwrap_or_else(|r| panic!("refused with the documented set ({}):\n{}", r.status, r.log));
    daemon.wait_healthy();
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).expect("daemon status");
    assert!(status.lines().any(|l| l.starts_with("Uid:") && l.contains(NOBODY)), "not running as {NOBODY}:\n{status}");
    let log = daemon.log.text();
    // What it cannot do without the optional capabilities is said at start.
    assert!(log.contains("CAP_KILL is missing") && log.contains("policies"), "{log}");
    assert!(log.contains("CAP_DAC_OVERRIDE is missing") && log.contains("freeze and throttle"), "{log}");
    let before = sum(&scrape(&daemon), "gauge_capture_bytes_total", &[("direction", "write")]);

    // curl runs as root: hooking and naming it takes the capabilities, not the uid.
    let url = format!("https://127.0.0.1:{}/v1/chat/completions", mock.port);
    let mut curl = clients::curl(&cert, &url, &["-H", "content-type: application/json", "-d", r#"{"model":"gpt-4o-mini-priv","messages":[]}"#]);
    clients::run("curl as root", &mut curl);
    let call = [("provider", "openai_compatible"), ("model", "gpt-4o-mini-priv-2024-07-18"), ("status", "200")];
    let start = Instant::now();
    let mut text = scrape(&daemon);
    while sum(&text, "gauge_llm_requests_total", &call) < 1.0 && start.elapsed() < Duration::from_secs(20) {
        thread::sleep(Duration::from_millis(100));
        text = scrape(&daemon);
    }
    assert_eq!(sum(&text, "gauge_llm_requests_total", &call), 1.0, "call not metered:\n{text}\nlog:\n{}", daemon.log.text());
    let after = sum(&text, "gauge_capture_bytes_total", &[("direction", "write")]);
    assert!(after > before, "no bytes captured ({before} -> {after})");
    assert!(sum(&text, "gauge_probes_attached", &[]) > 0.0, "{text}");
    assert!(daemon.stop().success(), "the unprivileged daemon must stop cleanly");
}

#[test]
fn each_required_capability_taken_away_alone_is_refused_by_name() {
    if !kernel_tests_enabled("least privilege: each capability") {
        return;
    }
    for dropped in DOCUMENTED {
        match Daemon::start_through(&as_nobody_with(&without(&DOCUMENTED, dropped)), "") {
            Err(Refused { status, log }) => {
                assert!(!status.success(), "without {dropped}: exit status {status}");
                assert!(log.contains(&format!("lacks {}", cap_name(dropped))), "without {dropped}, the refusal must name it:\n{log}");
                assert!(log.contains("setcap") && log.contains("AmbientCapabilities="), "the refusal must say how to grant it:\n{log}");
            }
            // Only a kernel that creates uprobes for CAP_PERFMON may do without
            // sys_admin; then the probes must really be attached, never a blind start.
            Ok(mut daemon) => {
                assert_eq!(dropped, "sys_admin", "started without {dropped}:\n{}", daemon.log.text());
                daemon.wait_healthy();
                let probes = sum(&scrape(&daemon), "gauge_probes_attached", &[]);
                assert!(probes > 0.0, "started without sys_admin and attached nothing:\n{}", daemon.log.text());
            }
        }
    }
}

#[test]
fn policies_need_cap_kill_to_start() {
    if !kernel_tests_enabled("least privilege: policies") {
        return;
    }
    let refused = Daemon::start_through(&as_nobody_with(&DOCUMENTED), POLICY).err().expect("policies without CAP_KILL must be refused");
    assert!(!refused.status.success());
    assert!(refused.log.contains("lacks CAP_KILL") && refused.log.contains("SIGCONT"), "{}", refused.log);

    let with_kill: Vec<&str> = DOCUMENTED.iter().copied().chain(["kill"]).collect();
    let mut daemon = Daemon::start_through(&as_nobody_with(&with_kill), POLICY)
        .unwrap_or_else(|r| panic!("refused with CAP_KILL added ({}):\n{}", r.status, r.log));
    daemon.wait_healthy();
    daemon.log.wait_for(&["policies armed"], Duration::from_secs(10));
    assert!(!daemon.log.text().contains("CAP_KILL is missing"), "{}", daemon.log.text());
}

#[test]
fn the_default_listener_is_loopback() {
    let config = gauge_agent::config::Config::load(None).expect("embedded default config");
    assert!(config.server.listen.ip().is_loopback(), "default listen {} is not loopback", config.server.listen);
}
