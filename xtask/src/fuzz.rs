//! `cargo xtask fuzz`: every cargo-fuzz target for a bounded time.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

const TARGETS: [&str; 8] = ["h1", "h2", "sse", "usage", "pipeline", "config", "attribution", "binaries"];
const CARGO_FUZZ: &str = "0.13.2";

pub fn run(seconds: u64, only: &[String]) -> anyhow::Result<()> {
    let nightly = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("nightly")));
    if !nightly {
        bail!("fuzzing needs a nightly toolchain (cargo-fuzz uses -Zsanitizer): none is installed");
    }
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ));
    if !installed {
        eprintln!("==> fuzz: installing cargo-fuzz {CARGO_FUZZ}");
        let status = Command::new("cargo")
            .env_remove("RUSTC_BOOTSTRAP")
            .args(["install", &format!("cargo-fuzz@{CARGO_FUZZ}"), "--locked"])
            .status()
            .context("cannot run cargo install")?;
        if !status.success() {
            bail!("installing cargo-fuzz failed ({status})");
        }
    }
    let targets: Vec<&str> = if only.is_empty() { TARGETS.to_vec() } else { only.iter().map(String::as_str).collect() };
    if let Some(unknown) = targets.iter().find(|t| !TARGETS.contains(t)) {
        bail!("unknown fuzz target `{unknown}`; targets: {}", TARGETS.join(", "));
    }
    // Build every target first, in one go, so that a build that fails (a full disk,
    // a compile error) is reported as that and not as a crash the fuzzer found.
    eprintln!("==> fuzz: building {} target(s)", targets.len());
    crate::disk::warn_if_low(Path::new("fuzz"), crate::disk::FUZZ_NEEDS_GIB);
    // `cargo fuzz build` takes one target or, with none, builds them all.
    let builds: Vec<Option<&str>> = if only.is_empty() { vec![None] } else { targets.iter().copied().map(Some).collect() };
    for build in builds {
        let status = Command::new("cargo")
            .env("GAUGE_EBPF_STUB", "1")
            .args(["+nightly", "fuzz", "build"])
            .args(build)
            .status()
            .context("cannot run cargo fuzz build")?;
        if !status.success() {
            bail!("building the fuzz targets failed ({status}): see the compiler's message above");
        }
    }
    for target in targets {
        // New inputs go to a scratch corpus; the committed seeds stay as they are.
        let scratch = Path::new("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
        let seeds = Path::new("fuzz/corpus").join(target);
        eprintln!("==> fuzz: {target} for {seconds} s");
        let status = Command::new("cargo")
            // The fuzz build needs no eBPF object: an empty one is embedded.
            .env("GAUGE_EBPF_STUB", "1")
            .args(["+nightly", "fuzz", "run", target])
            .arg(&scratch)
            .arg(&seeds)
            .args(["--", &format!("-max_total_time={seconds}"), "-print_final_stats=1"])
            .status()
            .context("cannot run cargo fuzz")?;
        if !status.success() {
            bail!("fuzz target `{target}` found a crash ({status}); the input is in fuzz/artifacts/{target}/: add it as a regression test");
        }
    }
    Ok(())
}
