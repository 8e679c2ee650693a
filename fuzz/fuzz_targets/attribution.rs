//! What attribution parses from `/proc` and runtime paths: `/proc/PID/cgroup`, cgroup
//! paths (container layouts), and `/proc/PID/stat`.
#![no_main]
use gauge_agent::attribution::{container, process};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(path) = container::cgroup_path(&text) {
        let _ = container::parse(&path);
    }
    let _ = container::parse(&text);
    let _ = container::systemd_unit(&text);
    let _ = process::parse_stat(&text);
});
