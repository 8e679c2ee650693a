//! Least privilege: which Linux capabilities each command needs, checked against the
//! effective set before anything is loaded, so a missing one is named up front
//! instead of surfacing as a bare EPERM from the kernel (or, worse, as processes that
//! are silently not seen, or stopped and never resumed).
//!
//! Found by running `gauge-agent run` as an unprivileged user under `setpriv` with
//! one capability dropped at a time (kernel 6.18; `tests/tests/privileges.rs`):
//! CAP_BPF loads the programs and maps and CAP_PERFMON lets them trace, but creating
//! a uprobe needs CAP_SYS_ADMIN again since the 2025 revert (ba677dbe77af, in 6.16
//! and the stable kernels), which the kernel is asked directly, since versions do not
//! tell (backports). CAP_SYS_PTRACE reads other users' `/proc/PID/{maps,exe,root}`
//! (`environ`, mode 0400, also takes CAP_DAC_READ_SEARCH), CAP_KILL signals other
//! users' processes, CAP_DAC_OVERRIDE writes root-owned cgroup files.

use std::{fmt, path::Path};

/// The capabilities Gauge may use, with their bit in the kernel's masks
/// (`linux/capability.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    DacOverride,
    DacReadSearch,
    Kill,
    SysPtrace,
    SysAdmin,
    Perfmon,
    Bpf,
}

impl Capability {
    const fn bit(self) -> u32 {
        match self {
            Self::DacOverride => 1,
            Self::DacReadSearch => 2,
            Self::Kill => 5,
            Self::SysPtrace => 19,
            Self::SysAdmin => 21,
            Self::Perfmon => 38,
            Self::Bpf => 39,
        }
    }

    /// The name as the kernel, `setcap` and systemd write it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::DacOverride => "CAP_DAC_OVERRIDE",
            Self::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Self::Kill => "CAP_KILL",
            Self::SysPtrace => "CAP_SYS_PTRACE",
            Self::SysAdmin => "CAP_SYS_ADMIN",
            Self::Perfmon => "CAP_PERFMON",
            Self::Bpf => "CAP_BPF",
        }
    }

    /// Capabilities accepted in its place: CAP_DAC_OVERRIDE covers reads too.
    /// CAP_SYS_ADMIN would cover CAP_BPF and CAP_PERFMON in the kernel, but they are
    /// asked for by name, so that the set stays right where uprobes need no
    /// CAP_SYS_ADMIN and it can be dropped.
    const fn alternatives(self) -> &'static [Capability] {
        match self {
            Self::DacReadSearch => &[Self::DacOverride],
            _ => &[],
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A capability mask, as in the `Cap*` lines of `/proc/PID/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSet(u64);

impl CapSet {
    /// Every capability (what root normally has).
    pub const ALL: Self = Self(u64::MAX);

    pub fn of(caps: &[Capability]) -> Self {
        Self(caps.iter().fold(0, |mask, c| mask | 1 << c.bit()))
    }

    /// The effective set of the calling process.
    pub fn effective() -> Result<Self, PrivilegeError> {
        // This thread's set: capabilities are per thread, and /proc/self shows the
        // thread-group leader.
        let path = Path::new("/proc/thread-self/status");
        let status = std::fs::read_to_string(path).map_err(PrivilegeError::Status)?;
        Self::from_status(&status)
    }

    /// The `CapEff` line of a `/proc/PID/status` text.
    pub fn from_status(status: &str) -> Result<Self, PrivilegeError> {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(str::trim)
            .ok_or(PrivilegeError::NoCapEff)?;
        u64::from_str_radix(hex, 16).map(Self).map_err(|_| PrivilegeError::BadCapEff(hex.to_owned()))
    }

    /// Whether `cap` itself is in the set.
    pub fn holds(self, cap: Capability) -> bool {
        self.0 & (1 << cap.bit()) != 0
    }

    /// Whether `cap`, or one the kernel accepts instead, is in the set.
    pub fn grants(self, cap: Capability) -> bool {
        std::iter::once(&cap).chain(cap.alternatives()).any(|c| self.holds(*c))
    }
}

/// A capability and what Gauge uses it for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub capability: Capability,
    pub for_what: &'static str,
}

const BPF: Need = Need { capability: Capability::Bpf, for_what: "loading the eBPF programs and maps" };
const PERFMON: Need = Need {
    capability: Capability::Perfmon,
    for_what: "attaching the uprobes (perf_event_open) and the exec tracepoint",
};
const PTRACE: Need = Need {
    capability: Capability::SysPtrace,
    for_what: "reading /proc/PID/maps, exe and root of other users' processes, to find and hook their TLS libraries \
               (node's static OpenSSL, containers) and name them",
};
const KILL: Need = Need {
    capability: Capability::Kill,
    for_what: "policies: signalling other users' processes (pause, terminate, kill) and resuming the requests they hold (SIGCONT)",
};
const DAC_OVERRIDE: Need = Need {
    capability: Capability::DacOverride,
    for_what: "freeze and throttle actions: writing the root-owned cgroup files (unless the cgroups are delegated to this user)",
};
const DAC_READ_SEARCH: Need = Need {
    capability: Capability::DacReadSearch,
    for_what: "attribution from other users' /proc/PID/environ (mode 0400: GAUGE_AGENT=name, `env` agent rules) and container \
               names from the runtimes' metadata (/var/lib/docker, /run/containerd...); without it those calls fall back \
               to other rules and containers are named by id",
};

const SYS_ADMIN: Need = Need {
    capability: Capability::SysAdmin,
    for_what: "creating uprobes: this kernel requires it for them (Linux 6.16+ and stable kernels since July 2025, \
               commit ba677dbe77af)",
};

/// What the running kernel asks for, beyond the documented capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    /// Creating a uprobe needs CAP_SYS_ADMIN (CAP_PERFMON was enough from 5.8 until
    /// the revert of 2025).
    pub uprobes_need_sys_admin: bool,
}

/// The commands that need privileges, with what in their configuration matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `gauge-agent run`; `policies`: the config has `[[policies]]`.
    Run { policies: bool },
    /// `gauge-agent record`.
    Record,
}

impl Command {
    pub fn run(config: &crate::config::Config) -> Self {
        Self::Run { policies: !config.policies.is_empty() }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Run { .. } => "run",
            Self::Record => "record",
        }
    }

    /// Without these the command refuses to start: the probes would not attach (the
    /// daemon would run blind) or, for policies, stopped processes could not be
    /// resumed.
    pub fn required(self, kernel: Kernel) -> Vec<Need> {
        let mut needs = vec![BPF, PERFMON];
        if kernel.uprobes_need_sys_admin {
            needs.push(SYS_ADMIN);
        }
        needs.push(PTRACE);
        // A policy without CAP_KILL would still stop processes in the kernel
        // (bpf_send_signal needs no permission) but could never resume them.
        if self == (Self::Run { policies: true }) {
            needs.push(KILL);
        }
        needs
    }

    /// Without these the command starts, and the feature each names fails.
    pub fn optional(self) -> Vec<Need> {
        match self {
            Self::Run { policies: true } => vec![DAC_OVERRIDE, DAC_READ_SEARCH],
            Self::Run { policies: false } => vec![KILL, DAC_OVERRIDE, DAC_READ_SEARCH],
            Self::Record => vec![],
        }
    }

    /// Checks `caps`: an error naming every missing required capability, else the
    /// optional ones missing (to warn about).
    pub fn check(self, caps: CapSet, kernel: Kernel) -> Result<Vec<Need>, PrivilegeError> {
        let missing = |needs: Vec<Need>| needs.into_iter().filter(|n| !caps.grants(n.capability)).collect::<Vec<_>>();
        let required = missing(self.required(kernel));
        if !required.is_empty() {
            return Err(PrivilegeError::Missing { command: self.label(), missing: required, all: self.required(kernel) });
        }
        Ok(missing(self.optional()))
    }
}

/// Checks the calling process for `command` on this kernel: an error naming each
/// missing required capability, else the optional ones missing.
pub fn check(command: Command) -> Result<Vec<Need>, PrivilegeError> {
    let caps = CapSet::effective()?;
    command.check(caps, Kernel { uprobes_need_sys_admin: uprobes_need_sys_admin(caps) })
}

/// Asked of the kernel even when CAP_SYS_ADMIN is held (lowered for the question on
/// this thread), so that the set a refusal lists is the whole one. Without
/// CAP_PERFMON the question cannot be told from its answer: assume the stricter rule.
fn uprobes_need_sys_admin(caps: CapSet) -> bool {
    if !caps.holds(Capability::Perfmon) {
        return true;
    }
    if !caps.holds(Capability::SysAdmin) {
        return uprobe_refused();
    }
    without_sys_admin(uprobe_refused).unwrap_or(true)
}

/// Runs `f` with CAP_SYS_ADMIN out of this thread's effective set (it stays
/// permitted, and is raised again after). None if the set cannot be changed.
fn without_sys_admin(f: impl FnOnce() -> bool) -> Option<bool> {
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = CapHeader { version: VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: a version-3 header and the two data words that version takes.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, data.as_mut_ptr()) } != 0 {
        return None;
    }
    let saved = data;
    let bit = Capability::SysAdmin.bit();
    data[(bit / 32) as usize].effective &= !(1 << (bit % 32));
    // SAFETY: as above; lowering an effective capability is always allowed.
    if unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) } != 0 {
        return None;
    }
    let answer = f();
    // SAFETY: as above; raising a capability that is still permitted is allowed.
    if unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, saved.as_ptr()) } != 0 {
        tracing::warn!("could not raise CAP_SYS_ADMIN again after checking uprobes; attaching may fail");
    }
    Some(answer)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Asks the kernel to create a uprobe on "/" (a directory, so none can be made):
/// the capability check comes first and fails with EACCES; any other answer means
/// it passed. Nothing is registered either way.
fn uprobe_refused() -> bool {
    let Some(pmu) = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
    else {
        // No uprobe PMU to ask: assume the stricter rule.
        return true;
    };
    let path = c"/";
    let attr = PerfEventAttr {
        kind: pmu,
        size: u32::try_from(std::mem::size_of::<PerfEventAttr>()).unwrap_or(u32::MAX),
        // exclude_kernel: a user-space-only event, which needs no kernel profiling right.
        flags: 1 << 5,
        config1: path.as_ptr() as u64,
        ..PerfEventAttr::default()
    };
    // SAFETY: a valid perf_event_attr of the size it states, with a NUL-terminated
    // path that outlives the call; pid 0 (this process), any cpu, no group, no flags.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, &attr as *const PerfEventAttr, 0, -1, -1, 0) };
    if fd >= 0 {
        // SAFETY: closing the fd the kernel just returned.
        unsafe { libc::close(fd as libc::c_int) };
        return false;
    }
    let errno = std::io::Error::last_os_error().raw_os_error();
    errno == Some(libc::EACCES) || errno == Some(libc::EPERM)
}

/// `struct perf_event_attr` up to `config2` (`PERF_ATTR_SIZE_VER1`): all a uprobe needs.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    /// uprobe_path
    config1: u64,
    /// probe_offset
    config2: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot read /proc/thread-self/status to check capabilities: {0} (is /proc mounted?)")]
    Status(std::io::Error),
    #[error("/proc/thread-self/status has no CapEff line: cannot check capabilities")]
    NoCapEff,
    #[error("/proc/thread-self/status: CapEff {0:?} is not a hexadecimal mask")]
    BadCapEff(String),
    #[error("{}", missing_message(command, missing, all))]
    Missing { command: &'static str, missing: Vec<Need>, all: Vec<Need> },
}

fn missing_message(command: &str, missing: &[Need], all: &[Need]) -> String {
    let lines: Vec<String> = missing.iter().map(|n| format!("  {}: {}", n.capability, n.for_what)).collect();
    let names: Vec<&str> = all.iter().map(|n| n.capability.name()).collect();
    let setcap: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
    let exe = std::env::current_exe().map_or_else(|_| "/path/to/gauge-agent".to_owned(), |p| p.display().to_string());
    format!(
        "gauge-agent {command} lacks {}:\n{}\nGrant the set {} in one of these ways: \
         `setcap {}+ep {exe}`; under systemd, `AmbientCapabilities={}` and `CapabilityBoundingSet=` the same; \
         or run it as root. (README.md, Requirements, lists what each is for.)",
        missing.iter().map(|n| n.capability.name()).collect::<Vec<_>>().join(", "),
        lines.join("\n"),
        names.join(" "),
        setcap.join(","),
        names.join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tgauge-agent\nCapInh:\t0000000000000000\nCapPrm:\t000000c000080000\n\
                          CapEff:\t000000c000080000\nCapBnd:\t000001ffffffffff\n";
    const NEW: Kernel = Kernel { uprobes_need_sys_admin: true };
    const OLD: Kernel = Kernel { uprobes_need_sys_admin: false };
    const ALL_COMMANDS: [Command; 3] = [Command::Run { policies: true }, Command::Run { policies: false }, Command::Record];

    fn without(caps: &[Capability], dropped: Capability) -> CapSet {
        CapSet::of(&caps.iter().copied().filter(|c| *c != dropped).collect::<Vec<_>>())
    }

    #[test]
    fn the_effective_mask_is_read_from_the_status_text() {
        let caps = CapSet::from_status(STATUS).expect("parses");
        assert_eq!(caps, CapSet::of(&[Capability::Bpf, Capability::Perfmon, Capability::SysPtrace]));
        assert!(matches!(CapSet::from_status("Name:\tx\n"), Err(PrivilegeError::NoCapEff)));
        assert!(matches!(CapSet::from_status("CapEff:\tzz\n"), Err(PrivilegeError::BadCapEff(_))));
    }

    #[test]
    fn a_full_set_passes_every_command_without_warnings() {
        for command in ALL_COMMANDS {
            for kernel in [NEW, OLD] {
                assert_eq!(command.check(CapSet::ALL, kernel).expect("root passes"), vec![]);
            }
        }
    }

    #[test]
    fn the_documented_minimum_starts_and_warns_about_each_feature_it_lacks() {
        let minimum = [Capability::Bpf, Capability::Perfmon, Capability::SysAdmin, Capability::SysPtrace];
        let warned = Command::Run { policies: false }.check(CapSet::of(&minimum), NEW).expect("starts");
        let names: Vec<_> = warned.iter().map(|n| n.capability).collect();
        assert_eq!(names, [Capability::Kill, Capability::DacOverride, Capability::DacReadSearch]);
        assert!(warned[0].for_what.contains("policies"));
        assert_eq!(Command::Record.check(CapSet::of(&minimum), NEW).expect("records"), vec![]);
        // Where uprobes need no CAP_SYS_ADMIN, it can be left out.
        assert!(Command::Record.check(without(&minimum, Capability::SysAdmin), OLD).is_ok());
    }

    #[test]
    fn each_missing_required_capability_is_named_with_its_use_and_how_to_grant_it() {
        let needed = [Capability::Bpf, Capability::Perfmon, Capability::SysPtrace, Capability::Kill];
        for dropped in needed {
            let error = Command::Run { policies: true }.check(without(&needed, dropped), OLD).expect_err("refused").to_string();
            assert!(error.contains(&format!("lacks {dropped}:")), "{error}");
            assert!(error.contains("setcap cap_bpf,cap_perfmon,cap_sys_ptrace,cap_kill+ep"), "{error}");
            assert!(error.contains("AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_SYS_PTRACE CAP_KILL"), "{error}");
        }
    }

    #[test]
    fn cap_sys_admin_is_required_where_the_kernel_wants_it_for_uprobes() {
        let caps = CapSet::of(&[Capability::Bpf, Capability::Perfmon, Capability::SysPtrace]);
        let error = Command::Record.check(caps, NEW).expect_err("refused").to_string();
        assert!(error.contains("lacks CAP_SYS_ADMIN:") && error.contains("uprobes"), "{error}");
        assert!(error.contains("setcap cap_bpf,cap_perfmon,cap_sys_admin,cap_sys_ptrace+ep"), "{error}");
    }

    #[test]
    fn policies_make_cap_kill_required_because_held_requests_must_be_resumed() {
        let caps = CapSet::of(&[Capability::Bpf, Capability::Perfmon, Capability::SysAdmin, Capability::SysPtrace]);
        let error = Command::Run { policies: true }.check(caps, NEW).expect_err("refused").to_string();
        assert!(error.contains("lacks CAP_KILL:") && error.contains("SIGCONT"), "{error}");
    }

    #[test]
    fn bpf_and_perfmon_are_asked_for_by_name_even_with_cap_sys_admin() {
        let caps = CapSet::of(&[Capability::SysAdmin, Capability::SysPtrace]);
        let error = Command::Record.check(caps, NEW).expect_err("refused").to_string();
        assert!(error.contains("lacks CAP_BPF, CAP_PERFMON:"), "{error}");
        assert!(CapSet::of(&[Capability::DacOverride]).grants(Capability::DacReadSearch));
        assert!(!CapSet::of(&[Capability::SysAdmin]).grants(Capability::SysPtrace));
    }

    #[test]
    fn the_uprobe_question_leaves_this_threads_capabilities_as_they_were() {
        let before = CapSet::effective().expect("status");
        let _ = uprobes_need_sys_admin(before);
        assert_eq!(CapSet::effective().expect("status"), before);
    }
}
