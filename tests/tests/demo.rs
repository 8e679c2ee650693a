//! `cargo xtask demo --headless`, as a newcomer would run it (without the build the
//! suite has already done): the mock, the sample agent on the real openai SDK, the
//! daemon and `top --once`. The demo itself fails unless the daemon meters the
//! agent's spend, its retry storm and the retry-cap policy's pause; this test also
//! checks what it printed and that it leaves nothing behind.

use std::{path::Path, process::Command};

use gauge_tests::kernel_tests_enabled;

#[test]
fn the_demo_shows_spend_a_retry_storm_and_a_policy_acting() {
    if !kernel_tests_enabled("cargo xtask demo --headless") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["xtask", "demo", "--headless", "--no-build", "--seconds", "120"])
        .current_dir(root)
        .output()
        .expect("run cargo xtask demo");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the demo failed ({}):\n{stderr}\n{stdout}", out.status);
    let working = stderr.lines().find_map(|l| l.strip_prefix("==> demo: working in ")).expect("the demo names its dir");
    let dir = working.split(" (").next().expect("a path");
    assert!(stderr.contains("policy action(s)") && stderr.contains("retries"), "{stderr}");
    // `top --once` printed the agent's row, with its spend and the policy's action.
    let row = stdout.lines().find(|l| l.contains("demo-agent")).unwrap_or_else(|| panic!("no demo-agent row in top's table:\n{stdout}"));
    let spend: f64 = row.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no SPEND_USD in: {row}"));
    assert!(spend > 0.0, "no spend in the row: {row}");
    assert!(stdout.contains("demo-retry-cap"), "the policy's action is not shown:\n{stdout}");
    assert!(!Path::new(dir).exists(), "the demo left {dir} behind");
    let left = Command::new("pgrep").args(["-f", "demo_agent\\.py|llm_server\\.py .*gauge-demo-"]).output().expect("pgrep");
    assert!(left.stdout.is_empty(), "the demo left processes running: {}", String::from_utf8_lossy(&left.stdout));
}
