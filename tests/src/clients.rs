//! Real TLS clients, started as separate processes.

use std::{
    io::Write,
    path::Path,
    process::{Child, Command, Output, Stdio},
};

fn checked(what: &str, output: std::io::Result<Output>) -> Output {
    let output = output.unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs a command to completion; returns (pid, output).
pub fn run(what: &str, cmd: &mut Command) -> (u32, Output) {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let child = child.unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let pid = child.id();
    (pid, checked(what, child.wait_with_output()))
}

pub fn curl(ca: &Path, url: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--http1.1", "--cacert"]).arg(ca).args(extra).arg(url);
    cmd
}

pub fn python(ca: &Path, script: &str) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(script).env("GAUGE_TEST_CA", ca);
    cmd
}

/// Bun's binary, as `cargo xtask test` installs it (xtask/src/setup.rs has the same
/// path): it carries BoringSSL without symbols.
pub const BUN: &str = "/usr/local/lib/gauge-tests/bun-1.4.5/bun";

pub fn node(ca: &Path, script: &str) -> Command {
    let mut cmd = Command::new("node");
    cmd.arg("-e").arg(script).env("NODE_EXTRA_CA_CERTS", ca);
    cmd
}

/// GnuTLS's own client (`gnutls-cli`, Debian's gnutls-bin) sending `request` as
/// typed on its stdin to `127.0.0.1:port`, trusting `ca`; returns (pid, output).
/// Its stdout holds the response. Its stdin stays open until it exits (the server
/// closes: send `Connection: close`), since at end of input it would quit at once,
/// before the response came.
pub fn gnutls_cli(ca: &Path, port: u16, request: &[u8], env: &[(&str, &str)]) -> (u32, Output) {
    let child = Command::new("gnutls-cli")
        .arg("--x509cafile")
        .arg(ca)
        .args(["-p", &port.to_string(), "127.0.0.1"])
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = child.unwrap_or_else(|e| panic!("cannot start gnutls-cli (apt-get install gnutls-bin): {e}"));
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(request).expect("write the request to gnutls-cli");
    let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let status = crate::agent::wait_timeout(&mut child, std::time::Duration::from_secs(30));
    drop(stdin);
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        child.wait().expect("reap gnutls-cli")
    });
    let output = Output { status, stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default() };
    (pid, checked("gnutls-cli", Ok(output)))
}

/// Reads a child's pipe to its end on a thread of its own.
fn drain<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// A started client that waits for a line on stdin before it connects, so a test
/// can make sure the agent is attached first.
pub struct Held {
    child: Child,
}

impl Held {
    pub fn start(what: &str, cmd: &mut Command) -> Self {
        let child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
        Self { child: child.unwrap_or_else(|e| panic!("cannot start {what}: {e}")) }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn go(mut self, what: &str) -> Output {
        let mut stdin = self.child.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("write go");
        drop(stdin);
        let child = std::mem::replace(&mut self.child, Command::new("true").spawn().expect("spawn `true`"));
        checked(what, child.wait_with_output())
    }
}

impl Drop for Held {
    /// A test that fails before `go` must not leave the client waiting forever.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
