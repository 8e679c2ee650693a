//! Kernel hazards probed at start, by trying them rather than reading version numbers.
//!
//! Return probes: since Linux 6.11, x86_64 uretprobes return through a dedicated
//! `uretprobe` syscall. Seccomp filters that do not allow it (a container's
//! default-deny profile, e.g. Docker's) got the probed process killed; later kernels
//! (and stable backports) let that syscall pass seccomp unfiltered. Which one a host
//! runs cannot be told from its version, so the agent starts a canary: a child of
//! its own binary that confines itself with a default-kill seccomp filter and calls a
//! function carrying a return probe scoped to it. If the child dies, return probes
//! would kill confined processes here, and they are turned off: writes are then
//! captured at entry and reads not at all.

use std::{
    io::{Read as _, Write as _},
    os::{fd::AsRawFd as _, unix::process::ExitStatusExt as _},
    path::Path,
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde::Deserialize;

use super::{elf, kernel::CanaryProbe};

/// The hidden subcommand that runs the canary child.
pub const CANARY_COMMAND: &str = "__uretprobe-canary";

/// The function the canary's return probe is attached to.
pub const CANARY_SYMBOL: &str = "gauge_uretprobe_canary";

/// How long the canary may take before it counts as hung.
pub const CANARY_TIMEOUT: Duration = Duration::from_secs(5);

/// `capture.return_probes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReturnProbes {
    /// Run the canary and follow what it finds.
    #[default]
    Auto,
    On,
    Off,
}

/// Where the decision about return probes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Canary,
    Config,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Canary => "canary",
            Reason::Config => "config",
        }
    }
}

/// Whether return probes are attached, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnProbeState {
    pub on: bool,
    pub reason: Reason,
    /// Said in the start-up log.
    pub detail: String,
}

impl ReturnProbeState {
    pub fn state_label(&self) -> &'static str {
        if self.on { "on" } else { "off" }
    }

    /// Logs the decision; off is a warning, since responses then go unseen.
    pub fn log(&self) {
        let (state, reason, detail) = (self.state_label(), self.reason.label(), &self.detail);
        if self.on {
            tracing::info!(state, reason, "return probes on: {detail}");
        } else {
            tracing::warn!(
                state,
                reason,
                "return probes disabled: {detail}; requests are captured at entry, responses are not, so LLM calls \
                 are counted without usage (status \"error\", gauge_llm_unmetered_calls_total{{reason=\"incomplete\"}}) \
                 and a write that fails is counted all the same"
            );
        }
    }
}

/// What the canary child did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CanaryOutcome {
    /// Confined, it returned through the probe and exited cleanly.
    Survived,
    /// Confined, it was killed by this signal: returning through a return probe is
    /// fatal under seccomp on this kernel.
    Killed(i32),
    /// Confined, it neither finished nor died in time, and was killed.
    TimedOut,
    /// The canary could not be run: nothing was learnt about the kernel.
    Failed(String),
}

/// The kernel the agent runs on, for when the canary cannot tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelInfo {
    pub major: u32,
    pub minor: u32,
    pub x86_64: bool,
}

impl KernelInfo {
    /// `uname` of the running kernel; None when it cannot be read.
    pub fn current() -> Option<Self> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        let (major, minor) = parse_release(&release)?;
        Some(Self { major, minor, x86_64: cfg!(target_arch = "x86_64") })
    }

    /// Whether return probes may go back through the `uretprobe` syscall (x86_64,
    /// 6.11 and later), the path some seccomp filters refuse.
    pub fn may_use_uretprobe_syscall(self) -> bool {
        self.x86_64 && (self.major, self.minor) >= (6, 11)
    }
}

/// "6.18.0-1-amd64" -> (6, 18).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Decides whether return probes are attached. `canary` runs only in `auto` mode;
/// `kernel` is consulted only when the canary could not run, and then errs on the
/// side of the monitored processes.
pub fn decide(mode: ReturnProbes, canary: impl FnOnce() -> CanaryOutcome, kernel: Option<KernelInfo>) -> ReturnProbeState {
    let config = |on: bool| ReturnProbeState {
        on,
        reason: Reason::Config,
        detail: format!("capture.return_probes = \"{}\"", if on { "on" } else { "off" }),
    };
    let canary_says = |on: bool, detail: String| ReturnProbeState { on, reason: Reason::Canary, detail };
    match mode {
        ReturnProbes::On => config(true),
        ReturnProbes::Off => config(false),
        ReturnProbes::Auto => match canary() {
            CanaryOutcome::Survived => {
                canary_says(true, "a seccomp-confined canary process survived returning through a uretprobe".into())
            }
            CanaryOutcome::Killed(signal) => canary_says(
                false,
                format!(
                    "a seccomp-confined canary process was killed ({}) returning through a uretprobe: this kernel \
                     does not let its uretprobe syscall through seccomp, so return probes would kill confined \
                     processes (e.g. in containers); upgrade the kernel to one that lets it pass (6.14, or a stable \
                     backport) to capture responses",
                    signal_name(signal)
                ),
            ),
            CanaryOutcome::TimedOut => canary_says(
                false,
                format!(
                    "a seccomp-confined canary process with a uretprobe did not finish within {}s",
                    CANARY_TIMEOUT.as_secs()
                ),
            ),
            CanaryOutcome::Failed(why) => match kernel {
                Some(k) if !k.may_use_uretprobe_syscall() => canary_says(
                    true,
                    format!("the canary could not run ({why}), but kernel {}.{} has no uretprobe syscall", k.major, k.minor),
                ),
                _ => canary_says(
                    false,
                    format!(
                        "the canary could not run ({why}) and this kernel may return from uretprobes through a \
                         syscall that seccomp filters can refuse; set capture.return_probes = \"on\" if no process \
                         here runs under seccomp"
                    ),
                ),
            },
        },
    }
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGSYS => "SIGSYS",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGBUS => "SIGBUS",
        _ => return format!("signal {signal}"),
    };
    name.to_owned()
}

/// What the child writes on stdout once confined, and once the probed call returned.
const READY: &[u8] = b"ready\n";
const OK: &[u8] = b"ok\n";

/// The canary child's end, as seen by the parent; `fired` is whether the return
/// probe ran, without which surviving proves nothing.
pub fn classify(status: ExitStatus, stdout: &[u8], stderr: &[u8], fired: bool) -> CanaryOutcome {
    let said = |what: &[u8]| stdout.windows(what.len()).any(|w| w == what);
    let confined = said(READY);
    match (status.code(), status.signal()) {
        (Some(0), _) if confined && said(OK) && fired => CanaryOutcome::Survived,
        (Some(0), _) if confined && said(OK) => {
            CanaryOutcome::Failed("the canary's return probe never fired: its attach point is wrong".into())
        }
        (_, Some(signal)) if confined => CanaryOutcome::Killed(signal),
        (_, Some(signal)) => CanaryOutcome::Failed(format!("the canary child died of {} before it was confined", signal_name(signal))),
        (code, _) => {
            let stderr = String::from_utf8_lossy(stderr);
            let stderr = stderr.trim();
            CanaryOutcome::Failed(format!(
                "the canary child exited with {}{}{}",
                code.map_or_else(|| "no code".to_owned(), |c| format!("code {c}")),
                if stderr.is_empty() { "" } else { ": " },
                stderr
            ))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    #[error("{0}")]
    Elf(#[from] elf::ElfError),
    #[error("the agent's binary has no symbol {CANARY_SYMBOL} (stripped?): keep its symbol table, or set capture.return_probes")]
    NoSymbol,
    #[error("{0}")]
    Kernel(#[from] super::kernel::KernelError),
    #[error("cannot run the canary child: {0}")]
    Io(#[from] std::io::Error),
}

/// The file offset of code at `address` in this process, from `/proc/self/maps`.
fn mapped_offset(address: usize) -> Option<u64> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    parse_mapped_offset(&maps, address as u64)
}

/// From a maps text: `start-end perms offset dev inode path`.
fn parse_mapped_offset(maps: &str, address: u64) -> Option<u64> {
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let (start, end) = (u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?);
        let offset = u64::from_str_radix(fields.nth(1)?, 16).ok()?;
        (start <= address && address < end).then(|| address - start + offset)
    })
}

/// Runs the canary: the child of `exe` (this binary, `/proc/self/exe`) confines
/// itself, then calls [`gauge_uretprobe_canary`] under a return probe scoped to it.
pub fn run_canary(timeout: Duration) -> CanaryOutcome {
    let exe = Path::new("/proc/self/exe");
    match try_canary(exe, timeout) {
        Ok(outcome) => outcome,
        Err(error) => CanaryOutcome::Failed(error.to_string()),
    }
}

fn try_canary(exe: &Path, timeout: Duration) -> Result<CanaryOutcome, CanaryError> {
    // Where this process has the function mapped says its file offset even in a
    // stripped binary; the symbol table is the fallback.
    let offset = match mapped_offset(gauge_uretprobe_canary as *const () as usize) {
        Some(offset) => offset,
        None => elf::function_offset(exe, CANARY_SYMBOL)?.ok_or(CanaryError::NoSymbol)?,
    };
    let mut probe = CanaryProbe::load()?;
    let deadline = Instant::now() + timeout;
    let mut child = Reaped(
        Command::new(exe)
            .arg(CANARY_COMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let mut stdout = child.0.stdout.take().ok_or_else(|| std::io::Error::other("no stdout pipe"))?;
    let mut said = Vec::new();
    let confined = read_until(&mut stdout, &mut said, READY, deadline)?;
    if confined {
        probe.attach(exe, offset, child.0.id())?;
        child.0.stdin.take().ok_or_else(|| std::io::Error::other("no stdin pipe"))?.write_all(b"x")?;
        read_until(&mut stdout, &mut said, OK, deadline)?;
    }
    let status = child.wait_until(deadline)?;
    let fired = probe.hits()? > 0;
    probe.detach()?;
    let Some(status) = status else {
        return Ok(if confined {
            CanaryOutcome::TimedOut
        } else {
            CanaryOutcome::Failed(format!("the canary child did not confine itself within {}s", timeout.as_secs()))
        });
    };
    let mut stderr = Vec::new();
    if let Some(mut pipe) = child.0.stderr.take() {
        // The child has exited: its end is closed, so this cannot block.
        let _ = pipe.read_to_end(&mut stderr);
    }
    Ok(classify(status, &said, &stderr, fired))
}

/// A child that is killed and reaped whatever happens to the canary.
struct Reaped(Child);

impl Reaped {
    /// Its exit status, or None (and killed) at the deadline.
    fn wait_until(&mut self, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                self.0.kill()?;
                self.0.wait()?;
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads the child's stdout into `said` until it holds `needle`, the pipe closes or
/// the deadline passes; true when the needle came.
fn read_until(pipe: &mut ChildStdout, said: &mut Vec<u8>, needle: &[u8], deadline: Instant) -> std::io::Result<bool> {
    let mut buf = [0u8; 64];
    while !said.windows(needle.len()).any(|w| w == needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut poll = libc::pollfd { fd: pipe.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let millis = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, millis) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if ready == 0 {
            return Ok(false);
        }
        let n = pipe.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        said.extend_from_slice(&buf[..n]);
    }
    Ok(true)
}

/// The function the canary's return probe is attached to. Not inlined and not
/// mangled, so it has one address and a symbol to find it by.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn gauge_uretprobe_canary(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_add(1)
}

/// What the canary child does after confining itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildMode {
    /// Wait for a byte, call the probed function, say "ok", exit 0.
    Canary,
    /// Make a syscall the filter forbids (getpid): the kernel must kill the child.
    /// Proves the confinement is real, so a surviving canary is no false green.
    ForbiddenSyscall,
}

/// The canary child (`gauge-agent __uretprobe-canary`). Must run before any thread
/// is started: the filter confines only the calling thread.
pub fn canary_child(mode: ChildMode) -> ! {
    if let Err(error) = confine() {
        eprintln!("cannot enter seccomp: {error}");
        std::process::exit(2);
    }
    // From here on only read, write, exit and sigreturn are allowed: no allocation
    // (which may mmap), no std I/O (which may lock), no destructors.
    raw_write(READY);
    if mode == ChildMode::ForbiddenSyscall {
        // SAFETY: getpid has no preconditions; the filter kills the process here.
        unsafe { libc::syscall(libc::SYS_getpid) };
        raw_write(b"not confined\n");
        raw_exit(3);
    }
    let mut byte = 0u8;
    // SAFETY: reads one byte into a live local.
    if unsafe { libc::read(0, (&raw mut byte).cast(), 1) } != 1 {
        raw_exit(4);
    }
    let probed: extern "C" fn(u64) -> u64 = std::hint::black_box(gauge_uretprobe_canary);
    if probed(std::hint::black_box(41)) != 42 {
        raw_exit(5);
    }
    raw_write(OK);
    raw_exit(0)
}

fn raw_write(bytes: &[u8]) {
    // SAFETY: writes from a live slice; a short or failed write shows as a failed canary.
    let _ = unsafe { libc::write(1, bytes.as_ptr().cast(), bytes.len()) };
}

fn raw_exit(code: i32) -> ! {
    // exit_group, not exit, in case anything ever started a thread; both are allowed.
    // SAFETY: ends the process; nothing runs after it.
    unsafe { libc::syscall(libc::SYS_exit_group, code) };
    // Unreachable unless the syscall failed; the filter kills anything else.
    loop {
        std::hint::spin_loop();
    }
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Syscalls the confined child may make: strict mode's set (plus exit_group). A
/// filter rather than strict mode, to mirror a container's default-deny profile.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const ALLOWED: [libc::c_long; 5] = [libc::SYS_read, libc::SYS_write, libc::SYS_exit, libc::SYS_exit_group, libc::SYS_rt_sigreturn];

/// The classic-BPF seccomp filter: native arch only, [`ALLOWED`] only, else kill.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn filter() -> Vec<libc::sock_filter> {
    let stmt = |code: u32, k: u32| libc::sock_filter { code: code as u16, jt: 0, jf: 0, k };
    let jump = |k: u32, jt: u8| libc::sock_filter { code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16, jt, jf: 0, k };
    // struct seccomp_data: int nr; __u32 arch; ...
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let mut program = vec![
        stmt(load, ARCH),
        jump(AUDIT_ARCH, 1),
        stmt(ret, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(load, NR),
    ];
    for (i, nr) in ALLOWED.iter().enumerate() {
        // Past the remaining comparisons and the kill, to the allow.
        let skip = (ALLOWED.len() - i) as u8;
        program.push(jump(*nr as u32, skip));
    }
    program.push(stmt(ret, libc::SECCOMP_RET_KILL_PROCESS));
    program.push(stmt(ret, libc::SECCOMP_RET_ALLOW));
    program
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn confine() -> std::io::Result<()> {
    let mut program = filter();
    let prog = libc::sock_fprog { len: program.len() as u16, filter: program.as_mut_ptr() };
    // SAFETY: plain prctl calls; `prog` points at a filter that outlives them.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &raw const prog) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // The filter lives in the kernel now; forgetting the copy avoids a free (and a
    // possible munmap) after confinement.
    std::mem::forget(program);
    Ok(())
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn confine() -> std::io::Result<()> {
    Err(std::io::Error::other("the canary's seccomp filter is written for x86_64 and aarch64 only"))
}

#[cfg(test)]
#[path = "hazards_tests.rs"]
mod tests;
