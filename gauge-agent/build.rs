//! Builds `gauge-ebpf` for the BPF target and leaves it in `OUT_DIR/gauge-ebpf`, where
//! `src/source/kernel.rs` embeds it.
//!
//! Only Debian's rustc 1.96 (linked as the `debian-bpf` rustup toolchain by
//! `cargo xtask setup`) ships a prebuilt `core` for bpfel-unknown-none, so aya-build
//! runs that toolchain. `GAUGE_EBPF_STUB=1` embeds an empty object instead, for
//! `cargo check`/`clippy`/unit tests on a host without the BPF toolchain: such a
//! binary refuses to start capture and says why.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

const TOOLCHAIN: &str = "debian-bpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=GAUGE_EBPF_STUB");
    println!("cargo:rerun-if-changed=../gauge-common/src");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    if env::var("GAUGE_EBPF_STUB").is_ok_and(|v| v == "1" || v == "true") {
        println!("cargo:warning=GAUGE_EBPF_STUB set: embedding an empty eBPF object");
        fs::write(out_dir.join("gauge-ebpf"), b"").context("writing the stub eBPF object")?;
        return Ok(());
    }
    let toolchain_ok = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--print", "target-libdir", "--target", "bpfel-unknown-none"])
        .output()
        .is_ok_and(|out| out.status.success());
    let linker_ok = Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| o.status.success());
    if !toolchain_ok || !linker_ok {
        bail!(
            "the eBPF toolchain is missing (rustup toolchain `{TOOLCHAIN}`: {}, bpf-linker: {}). \
             Run `cargo xtask setup` once, or set GAUGE_EBPF_STUB=1 to build without capture",
            if toolchain_ok { "ok" } else { "missing" },
            if linker_ok { "ok" } else { "missing" },
        );
    }
    let ebpf = aya_build::Package { name: "gauge-ebpf", root_dir: "../gauge-ebpf", ..Default::default() };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(TOOLCHAIN))
}
