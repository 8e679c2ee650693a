//! Attach health: a library named in the config that cannot be opened is counted and
//! shown in `targets`; a hooked library replaced at its path (as an upgrade does) is
//! found by the periodic rescan, hooked anew and counted, and calls through the new
//! file are metered; one library shared by two overlay mounts (containers of one
//! image) is hooked through both paths and still seen once per call.

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
    // The targets are published once the sweep that found the new file has ended.
    let start = Instant::now();
    loop {
        let (_, targets) = world.daemon.get("/targets").expect("targets");
        if targets.matches(&*lib.display().to_string()).count() == 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "old and new file not both listed: {targets}");
        thread::sleep(Duration::from_millis(100));
    }

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

/// Unmounts an overlay when dropped.
struct Overlay(std::path::PathBuf);

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_library_shared_by_two_overlay_mounts_is_seen_once_per_call() {
    if !kernel_tests_enabled("overlayfs") {
        return;
    }
    // Two containers' root filesystems sharing one image layer: one real file, two
    // overlay mounts, each hooked on its own path.
    let dir = tempfile::tempdir().expect("tempdir");
    let lower = dir.path().join("lower");
    std::fs::create_dir_all(&lower).expect("lower");
    std::fs::copy("/usr/lib/x86_64-linux-gnu/libssl.so.3", lower.join("libssl.so.3")).expect("copy libssl");
    let mut mounts = Vec::new();
    for name in ["a", "b"] {
        let (upper, work, merged) = (dir.path().join(format!("{name}-up")), dir.path().join(format!("{name}-work")), dir.path().join(name));
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d).expect("overlay dirs");
        }
        let options = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
        let status = std::process::Command::new("mount").args(["-t", "overlay", "overlay", "-o", &options]).arg(&merged).status().expect("mount");
        assert!(status.success(), "mount -t overlay failed");
        mounts.push(Overlay(merged));
    }
    let world = World::start("");
    // A process holding the library through mount b, so b's file is hooked too.
    let mut holder = clients::python(&world.cert, "import ssl, sys; sys.stdin.read()");
    holder.env("LD_LIBRARY_PATH", &mounts[1].0);
    let holder = gauge_tests::clients::Held::start("python holding b", &mut holder);
    world.daemon.log.wait_for(&["attached", &format!("{}/libssl.so.3", mounts[1].0.display())], Duration::from_secs(20));
    // The call goes through mount a, once a is hooked as well.
    let mut python = clients::python(&world.cert, &format!("import ssl, sys; sys.stdin.read()\n{CHAT}"));
    python.env("GAUGE_TEST_PORT", world.mock.port.to_string()).env("LD_LIBRARY_PATH", &mounts[0].0).env("GAUGE_AGENT", "overlay-bot");
    let caller = gauge_tests::clients::Held::start("python through a", &mut python);
    world.daemon.log.wait_for(&["attached", &format!("{}/libssl.so.3", mounts[0].0.display())], Duration::from_secs(20));
    let out = caller.go("python through a");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let labels = [("agent", "overlay-bot")];
    world.scrape(&[(&labels, 1.0)]);
    // Time for a second copy of the call to arrive, were it seen twice.
    thread::sleep(Duration::from_secs(1));
    world.scrape(&[(&labels, 1.0)]).check("gauge_llm_requests_total", &labels, 1.0);
    drop(holder);
}
