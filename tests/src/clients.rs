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

pub fn node(ca: &Path, script: &str) -> Command {
    let mut cmd = Command::new("node");
    cmd.arg("-e").arg(script).env("NODE_EXTRA_CA_CERTS", ca);
    cmd
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
