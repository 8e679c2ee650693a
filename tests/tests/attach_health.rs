//! Attach health: a library named in the config that cannot be opened is counted and
//! shown in `targets`; a hooked library replaced at its path (as an upgrade does) is
//! found by the periodic rescan, hooked anew and counted, and calls through the new
//! file are metered.

use std::{
    thread,
    time::{Duration, Instant},
};

use gauge_tests::{clients, kernel_tests_enabled, world::World};

const CHAT: &str = r#"
import http.client, json, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["GAUGE_TEST_CA"])
conn = http.client.HTTPSConnection("127.0.0.1", int(os.environ["GAUGE_TEST_PORT"]), context=ctx)
body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
assert conn.getresponse().status == 200
print("ok")
"#;

fn wait_for_metric(world: &World, sample: &str, want: f64) {
    let start = Instant::now();
    loop {
        let got = world.daemon.metric(sample);
        if got == want {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{sample} is {got}, not {want}; log:\n{}", world.daemon.log.text());
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_replaced_library_is_hooked_anew_and_a_missing_one_is_counted() {
    if !kernel_tests_enabled("attach health") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = dir.path().join("libssl.so.3");
    std::fs::copy("/usr/lib/x86_64-linux-gnu/libssl.so.3", &lib).expect("copy libssl");
    let missing = dir.path().join("gone/libssl.so.3");
    let config = format!(
        "[capture]\nrescan_interval = \"1s\"\nextra_targets = [{:?}, {:?}]\n",
        lib.display().to_string(),
        missing.display().to_string()
    );
    let world = World::start(&config);
    wait_for_metric(&world, "gauge_probe_attach_failures_total{reason=\"unreadable\"}", 1.0);
    let (_, targets) = world.daemon.get("/targets").expect("targets");
    assert!(targets.contains("gone/libssl.so.3") && targets.contains("cannot open"), "{targets}");

    // An upgrade writes a new file and renames it over the old one: a new inode.
    let staged = dir.path().join("libssl.so.3.new");
    std::fs::copy("/usr/lib/x86_64-linux-gnu/libssl.so.3", &staged).expect("stage the new libssl");
    std::fs::rename(&staged, &lib).expect("replace libssl");
    wait_for_metric(&world, "gauge_probe_files_replaced_total", 1.0);
    let (_, targets) = world.daemon.get("/targets").expect("targets");
    assert_eq!(targets.matches(&*lib.display().to_string()).count(), 2, "old and new file both listed: {targets}");

    // A process loading the new file (ahead of the system's) is metered through it.
    let mut python = clients::python(&world.cert, CHAT);
    python
        .env("GAUGE_TEST_PORT", world.mock.port.to_string())
        .env("LD_LIBRARY_PATH", dir.path())
        .env("GAUGE_AGENT", "upgraded-bot");
    let (_, out) = clients::run("python through the new libssl", &mut python);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let labels = [("agent", "upgraded-bot")];
    let m = world.scrape(&[(&labels, 1.0)]);
    m.check("gauge_llm_requests_total", &[labels[0], ("status", "200")], 1.0);
    // The failures stay counted once, through every rescan since.
    assert_eq!(world.daemon.metric("gauge_probe_attach_failures_total{reason=\"unreadable\"}"), 1.0);
    assert_eq!(world.daemon.metric("gauge_probe_attach_failures_total{reason=\"attach\"}"), 0.0);
}
