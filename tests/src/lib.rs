//! Test harness: a TLS mock server, the real agent binary, and real clients.
//!
//! Kernel tests run the real eBPF programs against real processes. They need root;
//! with `CI=true` a test that cannot attach fails, it never skips.

pub mod agent;
pub mod bench;
pub mod clients;
pub mod mock;
pub mod prometheus;
pub mod sdk;
pub mod streams;
pub mod world;

/// Whether kernel tests can run here. Outside CI, a non-root run skips them with a
/// note; in CI (`CI=true`) not being root is a failure.
pub fn kernel_tests_enabled(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: kernel tests must run as root in CI (CI=true); a skip would hide a broken capture path");
    }
    eprintln!("skipping {test}: kernel tests need root (run `cargo xtask test` as root)");
    false
}
