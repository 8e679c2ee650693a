//! `cargo xtask setup`: the recipe of `shared/TOOLCHAIN.md` as idempotent steps.
//!
//! The eBPF crate needs Debian's rustc 1.96 (it ships a prebuilt `core` for
//! bpfel-unknown-none), linked into rustup as `debian-bpf`, and bpf-linker built
//! against the same LLVM (22).

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

const BUILD_PACKAGES: [&str; 4] = ["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf", "llvm-22-dev"];
/// Clients and tools the kernel tests drive (`prometheus`: the server and `promtool`
/// that `tests/tests/prometheus.rs` runs against `deploy/prometheus/`; `tmux`: the
/// terminal `tests/tests/top.rs` runs `gauge-agent top` in; `gnutls-bin`: GnuTLS's
/// own client; `golang-go`: the Go client built by the tests of Go's crypto/tls;
/// `gcc` and `libssl-dev`: the OpenSSL loop of `cargo xtask bench`, which the suite
/// runs in its quick form).
const TEST_PACKAGES: [&str; 9] =
    ["curl", "openssl", "ca-certificates", "prometheus", "tmux", "gnutls-bin", "golang-go", "gcc", "libssl-dev"];
const TOOLCHAIN: &str = "debian-bpf";
const BPF_LINKER: &str = "0.13.0";

pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

pub fn run() -> anyhow::Result<()> {
    let missing = missing_packages(&BUILD_PACKAGES);
    let toolchain = has_toolchain();
    let linker = has_bpf_linker();
    if missing.is_empty() && toolchain && linker {
        eprintln!("==> setup: eBPF toolchain ready (Debian rustc, `{TOOLCHAIN}` toolchain, bpf-linker {BPF_LINKER})");
        return Ok(());
    }
    check_host()?;
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    if !toolchain {
        eprintln!("==> setup: linking Debian's rustc as the rustup toolchain `{TOOLCHAIN}`");
        run_cmd(Command::new("rustup").args(["toolchain", "link", TOOLCHAIN, "/usr"]))?;
    }
    if !linker {
        eprintln!("==> setup: building bpf-linker {BPF_LINKER} against LLVM 22 (about two minutes, once)");
        run_cmd(
            Command::new("cargo")
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .env_remove("RUSTC_BOOTSTRAP")
                .args(["install", &format!("bpf-linker@{BPF_LINKER}"), "--locked", "--no-default-features", "--features", "llvm-22"]),
        )?;
    }
    eprintln!("==> setup: done");
    Ok(())
}

/// Official SDKs the end-to-end tests drive, from PyPI, pinned.
/// (hypercorn serves the mock provider over HTTP/1.1 and HTTP/2; h2 lets the SDKs'
/// HTTP client speak HTTP/2; tiktoken is what `cargo xtask bench` compares Gauge's
/// token counts with.)
const PYTHON_PACKAGES: [&str; 6] =
    ["openai==3.57.0", "anthropic==2.14.0", "google-genai==3.6.1", "hypercorn==0.17.3", "h2==4.4.1", "tiktoken==0.14.0"];

/// Clients the kernel tests run against the capture.
/// Bun, whose binary carries BoringSSL without symbols: `tests/tests/client_kinds.rs`
/// runs it (the same path is in `tests/src/clients.rs`).
const BUN: &str = "/usr/local/lib/gauge-tests/bun-1.4.5/bun";
const BUN_PACKAGE: &str = "@oven/bun-linux-x64@1.4.5";

/// Fetches Bun's binary as its npm package (the machine's npm) into [`BUN`].
fn install_bun() -> anyhow::Result<()> {
    if Path::new(BUN).exists() {
        return Ok(());
    }
    eprintln!("==> setup: fetching Bun ({BUN_PACKAGE}) with npm, for the BoringSSL test");
    let dir = Path::new(BUN).parent().context("BUN has a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    run_cmd(Command::new("npm").args(["pack", "--silent", BUN_PACKAGE, "--pack-destination"]).arg(dir))
        .context("npm pack of Bun failed: tests/tests/client_kinds.rs needs node's npm and the npm registry")?;
    run_cmd(Command::new("tar").args(["xzf", "oven-bun-linux-x64-1.4.5.tgz", "package/bin/bun"]).current_dir(dir))
        .context("cannot unpack Bun's package")?;
    std::fs::rename(dir.join("package/bin/bun"), BUN).context("cannot move Bun into place")?;
    let _ = std::fs::remove_dir_all(dir.join("package"));
    let _ = std::fs::remove_file(dir.join("oven-bun-linux-x64-1.4.5.tgz"));
    Ok(())
}

pub fn test_dependencies() -> anyhow::Result<()> {
    let missing = missing_packages(&TEST_PACKAGES);
    if !missing.is_empty() {
        check_host()?;
        apt_install(&missing)?;
    }
    let sdks_present = Command::new("python3")
        .args([
            "-c",
            "import openai, anthropic, hypercorn, h2, tiktoken, sys; from google import genai; \
             sys.exit(0 if (openai.__version__, anthropic.__version__, genai.__version__, tiktoken.__version__) == ('3.57.0', '2.14.0', '3.6.1', '0.14.0') else 1)",
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !sdks_present {
        eprintln!("==> setup: installing the Python SDKs the tests drive: {}", PYTHON_PACKAGES.join(" "));
        run_cmd(Command::new("python3").args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(PYTHON_PACKAGES))
            .context("pip install of the test SDKs failed: the end-to-end tests need python3 with pip")?;
    }
    // tests/tests/deploy.rs checks deploy/: `systemd-analyze verify` on the unit,
    // kubernetes-validate (offline schemas) on the manifests.
    let missing = missing_packages(&DEPLOY_PACKAGES);
    if !missing.is_empty() {
        check_host()?;
        apt_install(&missing)?;
    }
    install_bun()?;
    let validator_present = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !validator_present {
        eprintln!("==> setup: installing {KUBERNETES_VALIDATE} (checks deploy/kubernetes)");
        run_cmd(Command::new("python3").args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", KUBERNETES_VALIDATE]))
            .context("pip install of kubernetes-validate failed: tests/tests/deploy.rs needs it")?;
    }
    Ok(())
}

/// `systemd-analyze`, for the unit in deploy/systemd.
const DEPLOY_PACKAGES: [&str; 1] = ["systemd"];
/// Validates deploy/kubernetes against the Kubernetes schemas, offline.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.34.1";

fn check_host() -> anyhow::Result<()> {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let debian_like = os.lines().any(|l| {
        (l.starts_with("ID=") || l.starts_with("ID_LIKE=")) && (l.contains("debian") || l.contains("ubuntu"))
    });
    if !debian_like {
        bail!("cargo xtask setup installs Debian packages and supports Debian 12 / Ubuntu hosts only; elsewhere follow shared/TOOLCHAIN.md by hand");
    }
    if !is_root() {
        bail!("cargo xtask setup installs packages and needs root: run it as root (e.g. `sudo -E cargo xtask setup`)");
    }
    Ok(())
}

fn missing_packages<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    eprintln!("==> setup: installing Debian packages: {}", packages.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    run_cmd(Command::new("apt-get").env("DEBIAN_FRONTEND", "noninteractive").args(["install", "-y", "-q"]).args(packages))
        .context("apt-get install failed: the eBPF build needs Debian 12's rustc-web (1.96) and LLVM 22 packages")
}

fn has_toolchain() -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with(TOOLCHAIN)))
}

fn has_bpf_linker() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER))
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
