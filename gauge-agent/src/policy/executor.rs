//! Carries out the policy stage's [`Command`]s: the kernel's enforcement maps,
//! signals and cgroups, with delayed undo (SIGCONT after a pause, thaw, restore),
//! and undoes everything when the agent stops or reloads its config.
//!
//! Last line of safety: whatever a command says, PID 1, the agent and its parent
//! are never signalled, and a gated process found stopped with no decision pending
//! for longer than the hold timeout is let go (fail open, counted).

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use gauge_common::enforce::{Enforcement, flag};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::{
    Command, SIGCONT, SIGSTOP,
    cgroup::{CgroupFs, Frozen, Throttled},
};
use crate::source::kernel::EnforcementMaps;

#[derive(Debug)]
enum Later {
    /// `process` was opened when the signal was decided: a pid reused in the
    /// meantime is never signalled.
    Signal { pid: u32, signal: u32, process: Option<Pidfd> },
    Thaw(Frozen),
    Restore(Throttled),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    what: &'static str,
}

/// What must be undone if the agent dies, as kept in `[enforcement] state_file`.
#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Undo {
    /// Processes that may be stopped by us (held or paused): (pid, start time).
    stopped: Vec<(u32, u64)>,
    frozen: Vec<Frozen>,
    throttled: Vec<Throttled>,
}

pub struct Executor {
    maps: Option<EnforcementMaps>,
    state_file: Option<PathBuf>,
    /// Start times of the processes enforced or paused, for the undo file.
    start_times: HashMap<u32, u64>,
    /// The undo file last written.
    written: Option<Undo>,
    cgroups: CgroupFs,
    proc_root: PathBuf,
    self_pid: u32,
    parent_pid: u32,
    hold_timeout: Duration,
    later: Vec<(Instant, Later)>,
    enforced: HashMap<u32, Enforcement>,
    /// Processes we stopped and will continue later (a pause).
    paused: HashSet<u32>,
    /// Gated processes seen stopped with no decision pending, since when.
    stuck: HashMap<u32, Instant>,
    failures: Family<FailureLabels, Counter>,
    hold_timeouts: Counter,
}

impl Executor {
    /// `maps` is `None` where there is no kernel (tests, replay): map commands are
    /// then only remembered.
    pub fn register(
        maps: Option<EnforcementMaps>,
        cgroups: CgroupFs,
        proc_root: PathBuf,
        hold_timeout: Duration,
        registry: &mut Registry,
    ) -> Self {
        let failures = Family::default();
        let hold_timeouts = Counter::default();
        registry.register("gauge_policy_action_failures", "Policy actions that could not be carried out, by what.", failures.clone());
        registry.register(
            "gauge_policy_hold_timeouts",
            "Held processes let go because no decision came in time (events lost): the agent fails open.",
            hold_timeouts.clone(),
        );
        // SAFETY: getpid/getppid have no preconditions.
        let (self_pid, parent_pid) = unsafe { (libc::getpid() as u32, libc::getppid() as u32) };
        Self {
            maps,
            state_file: None,
            start_times: HashMap::new(),
            written: None,
            cgroups,
            proc_root,
            self_pid,
            parent_pid,
            hold_timeout,
            later: Vec::new(),
            enforced: HashMap::new(),
            paused: HashSet::new(),
            stuck: HashMap::new(),
            failures,
            hold_timeouts,
        }
    }

    /// Keeps what must be undone in `path`; first undoes what a previous agent that
    /// died left there.
    pub fn recover(&mut self, path: PathBuf) {
        if let Ok(text) = std::fs::read_to_string(&path) {
            match serde_json::from_str::<Undo>(&text) {
                Ok(undo) => self.undo_left(undo),
                Err(error) => tracing::error!(path = %path.display(), %error, "unreadable undo file: nothing undone from it"),
            }
        }
        self.state_file = Some(path);
        self.written = None;
        self.persist();
    }

    fn undo_left(&mut self, undo: Undo) {
        for (pid, start) in undo.stopped {
            // Only the very process: a reused pid is someone else's.
            if self.start_time(pid) == Some(start) && self.stopped_or_stopping(pid) {
                tracing::warn!(pid, "continuing a process a previous agent left stopped");
                self.signal(pid, SIGCONT);
            }
        }
        for frozen in undo.frozen {
            tracing::warn!(cgroup = %frozen.dir.display(), "thawing a cgroup a previous agent left frozen");
            self.undo(Later::Thaw(frozen));
        }
        for throttled in undo.throttled {
            tracing::warn!(cgroup = %throttled.dir.display(), "restoring the CPU limit a previous agent left");
            self.undo(Later::Restore(throttled));
        }
    }

    fn start_time(&self, pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("stat")).ok()?;
        crate::attribution::process::parse_stat(&stat).map(|(_, _, start)| start)
    }

    /// Writes the undo file when what must be undone changed.
    fn persist(&mut self) {
        let Some(path) = self.state_file.clone() else { return };
        let mut stopped: Vec<(u32, u64)> = self
            .enforced
            .keys()
            .chain(self.paused.iter())
            .filter_map(|pid| self.start_times.get(pid).map(|start| (*pid, *start)))
            .collect();
        stopped.sort_unstable();
        stopped.dedup();
        let mut undo = Undo { stopped, ..Undo::default() };
        for (_, later) in &self.later {
            match later {
                Later::Thaw(f) => undo.frozen.push(f.clone()),
                Later::Restore(t) => undo.throttled.push(t.clone()),
                Later::Signal { .. } => {}
            }
        }
        if self.written.as_ref() == Some(&undo) {
            return;
        }
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec(&undo).unwrap_or_default())?;
            std::fs::rename(&tmp, &path)
        };
        match write() {
            Ok(()) => self.written = Some(undo),
            Err(error) => self.fail("undo_file", &format!("{}: {error}", path.display())),
        }
    }

    /// The kernel's maps, once the capture has started.
    pub fn set_maps(&mut self, maps: EnforcementMaps) {
        self.maps = Some(maps);
    }

    pub fn set_hold_timeout(&mut self, timeout: Duration) {
        self.hold_timeout = timeout;
    }

    fn fail(&self, what: &'static str, detail: &dyn std::fmt::Display) {
        self.failures.get_or_create(&FailureLabels { what }).inc();
        tracing::error!(what, %detail, "policy action failed");
    }

    pub fn run(&mut self, commands: Vec<Command>, now: Instant) {
        if commands.is_empty() {
            return;
        }
        self.apply(commands, now);
        self.persist();
    }

    fn apply(&mut self, commands: Vec<Command>, now: Instant) {
        for command in commands {
            match command {
                Command::Gate { tgid } => self.enforce(tgid, Enforcement { flags: flag::GATE, signal: 0 }),
                Command::Block { tgid, signal, gate } => {
                    let flags = flag::BLOCK | if gate { flag::GATE } else { 0 };
                    self.enforce(tgid, Enforcement { flags, signal });
                }
                Command::Unblock { tgid, gate } if gate => self.enforce(tgid, Enforcement { flags: flag::GATE, signal: 0 }),
                Command::Unblock { tgid, .. } => self.unenforce(tgid),
                Command::MarkLlm { tgid, connection } => {
                    if let Some(maps) = &mut self.maps
                        && let Err(e) = maps.mark_llm(tgid, connection)
                    {
                        self.fail("mark_llm", &e);
                    }
                }
                Command::Signal { pid, signal, after } if after.is_zero() => self.signal(pid, signal),
                Command::Signal { pid, signal, after } => {
                    if signal == SIGCONT {
                        self.paused.insert(pid);
                        if let Some(start) = self.start_time(pid) {
                            self.start_times.insert(pid, start);
                        }
                    }
                    let process = Pidfd::open(pid).ok();
                    self.later.push((now + after, Later::Signal { pid, signal, process }));
                }
                // The undo is noted down (undo file) before the cgroup is touched:
                // an agent killed mid-action must still leave the thaw behind.
                Command::Freeze { pid, cooldown } => match self.placement(pid).map(|p| self.cgroups.to_freeze(&p)) {
                    Some(Ok(frozen)) => {
                        let undo = Later::Thaw(frozen.clone());
                        self.ahead(now + cooldown, undo);
                        match self.cgroups.freeze_now(&frozen) {
                            Ok(()) => tracing::warn!(pid, cgroup = %frozen.dir.display(), ?cooldown, "cgroup frozen"),
                            Err(e) => {
                                self.later.retain(|(_, l)| !matches!(l, Later::Thaw(f) if *f == frozen));
                                self.fail("freeze", &e);
                            }
                        }
                    }
                    Some(Err(e)) => self.fail("freeze", &e),
                    None => self.fail("freeze", &format!("pid {pid}: its cgroup is unknown (process gone?)")),
                },
                Command::Throttle { pid, share, cooldown } => match self.placement(pid).map(|p| self.cgroups.to_throttle(&p)) {
                    Some(Ok(throttled)) => {
                        self.ahead(now + cooldown, Later::Restore(throttled.clone()));
                        match self.cgroups.throttle_now(&throttled, share) {
                            Ok(()) => tracing::warn!(pid, cgroup = %throttled.dir.display(), share, ?cooldown, "cgroup CPU throttled"),
                            Err(e) => {
                                // Nothing or only the quota was written: putting back
                                // what was there is right either way.
                                self.later.retain(|(_, l)| !matches!(l, Later::Restore(t) if *t == throttled));
                                if let Err(undo) = self.cgroups.restore(&throttled) {
                                    tracing::debug!(%undo, "restoring after a failed throttle");
                                }
                                self.fail("throttle", &e);
                            }
                        }
                    }
                    Some(Err(e)) => self.fail("throttle", &e),
                    None => self.fail("throttle", &format!("pid {pid}: its cgroup is unknown (process gone?)")),
                },
            }
        }
    }

    /// Schedules an undo and writes it to the undo file at once, before the action
    /// it undoes.
    fn ahead(&mut self, at: Instant, undo: Later) {
        self.later.push((at, undo));
        self.persist();
    }

    fn placement(&self, pid: u32) -> Option<super::cgroup::Placement> {
        let text = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup")).ok()?;
        Some(self.cgroups.of_process(&text))
    }

    fn enforce(&mut self, tgid: u32, e: Enforcement) {
        if self.never(tgid) {
            return;
        }
        if !self.start_times.contains_key(&tgid)
            && let Some(start) = self.start_time(tgid)
        {
            self.start_times.insert(tgid, start);
        }
        self.enforced.insert(tgid, e);
        if let Some(maps) = &mut self.maps
            && let Err(error) = maps.set(tgid, e)
        {
            self.fail("enforce_map", &error);
        }
    }

    fn unenforce(&mut self, tgid: u32) {
        self.enforced.remove(&tgid);
        if !self.paused.contains(&tgid) {
            self.start_times.remove(&tgid);
        }
        if let Some(maps) = &mut self.maps {
            maps.clear(tgid);
        }
    }

    fn never(&self, pid: u32) -> bool {
        pid <= 1 || pid == self.self_pid || pid == self.parent_pid
    }

    fn signal(&mut self, pid: u32, signal: u32) {
        self.signal_process(pid, signal, None);
    }

    /// Signals through a pidfd: the one opened when the signal was decided, else one
    /// opened now.
    fn signal_process(&mut self, pid: u32, signal: u32, process: Option<Pidfd>) {
        if self.never(pid) {
            tracing::error!(pid, signal, "refused to signal a protected process");
            return;
        }
        if signal == SIGCONT {
            self.paused.remove(&pid);
            self.stuck.remove(&pid);
        }
        let result = match process {
            Some(process) => process.send(signal),
            None => Pidfd::open(pid).and_then(|p| p.send(signal)),
        };
        if let Err(error) = result {
            // A process that is gone needs nothing more.
            if error.raw_os_error() != Some(libc::ESRCH) {
                self.fail("signal", &format!("pid {pid} signal {signal}: {error}"));
            }
            self.unenforce(pid);
        }
    }

    /// When the next delayed command is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.later.iter().map(|(at, _)| *at).min()
    }

    /// Whether a process is still there.
    pub fn alive(&self, pid: u32) -> bool {
        self.proc_root.join(pid.to_string()).exists()
    }

    /// Drops the kernel's enforcement entries of processes that are gone, so that the
    /// map never fills with the dead.
    pub fn forget_gone(&mut self) {
        let gone: Vec<u32> = self.enforced.keys().copied().filter(|pid| !self.alive(*pid)).collect();
        for pid in gone {
            self.unenforce(pid);
            self.paused.remove(&pid);
            self.stuck.remove(&pid);
            self.start_times.remove(&pid);
        }
        self.persist();
    }

    /// Runs the delayed commands that are due, and lets go of stuck held processes.
    pub fn due(&mut self, now: Instant) {
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.later).into_iter().partition(|(at, _)| *at <= now);
        self.later = rest;
        for (_, later) in due {
            self.undo(later);
        }
        self.watchdog(now);
        self.persist();
    }

    fn undo(&mut self, later: Later) {
        match later {
            Later::Signal { pid, signal, process } => self.signal_process(pid, signal, process),
            Later::Thaw(frozen) => match self.cgroups.thaw(&frozen) {
                Ok(()) => tracing::info!(cgroup = %frozen.dir.display(), "cgroup thawed"),
                Err(e) => self.fail("thaw", &e),
            },
            Later::Restore(throttled) => match self.cgroups.restore(&throttled) {
                Ok(()) => tracing::info!(cgroup = %throttled.dir.display(), "cgroup CPU limit restored"),
                Err(e) => self.fail("restore", &e),
            },
        }
    }

    /// A gated process stopped by its probe waits for a decision; if the HELD record
    /// was lost (ring full), none comes. Let it go after the hold timeout.
    fn watchdog(&mut self, now: Instant) {
        let gated: Vec<u32> = self.enforced.iter().filter(|(_, e)| e.flags & flag::GATE != 0).map(|(t, _)| *t).collect();
        for tgid in gated {
            if self.paused.contains(&tgid) || !self.stopped(tgid) {
                self.stuck.remove(&tgid);
                continue;
            }
            let since = *self.stuck.entry(tgid).or_insert(now);
            if now.duration_since(since) >= self.hold_timeout {
                tracing::warn!(pid = tgid, "held request had no decision in time: released");
                self.hold_timeouts.inc();
                self.signal(tgid, SIGCONT);
            }
        }
    }

    /// Stopped, or about to be: the kernel's SIGSTOP at a request may still be
    /// pending, as in a frozen cgroup, whose tasks take it only once thawed, just
    /// after a check of the state alone. A SIGCONT discards a pending stop, so
    /// either way the process is due one.
    fn stopped_or_stopping(&self, pid: u32) -> bool {
        if self.stopped(pid) {
            return true;
        }
        let Ok(status) = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("status")) else { return false };
        stop_pending(&status)
    }

    fn stopped(&self, pid: u32) -> bool {
        let Ok(stat) = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("stat")) else { return false };
        stat.rfind(')').and_then(|i| stat.get(i + 2..i + 3)).is_some_and(|state| state == "T")
    }

    /// Undoes everything: paused processes continue, cgroups thaw and get their CPU
    /// back, the kernel's maps are emptied. Called on stop and on config reload.
    pub fn release_all(&mut self) {
        let pending = std::mem::take(&mut self.later);
        for (_, later) in pending {
            match later {
                // A delayed SIGKILL (terminate's grace) is dropped, not hastened.
                Later::Signal { signal, .. } if signal != SIGCONT => {}
                later => self.undo(later),
            }
        }
        for pid in std::mem::take(&mut self.paused) {
            self.signal(pid, SIGCONT);
        }
        let enforced: Vec<u32> = self.enforced.keys().copied().collect();
        for tgid in enforced {
            self.unenforce(tgid);
            // A process held at this instant would otherwise stay stopped.
            if self.stopped_or_stopping(tgid) {
                self.signal(tgid, SIGCONT);
            }
        }
        self.stuck.clear();
        self.persist();
    }
}

/// Whether a `/proc/PID/status` shows a SIGSTOP pending, for the thread or the
/// process (`SigPnd`, `ShdPnd`: hexadecimal masks, bit N-1 for signal N).
fn stop_pending(status: &str) -> bool {
    let stop = 1u64 << (SIGSTOP - 1);
    status
        .lines()
        .filter_map(|line| line.strip_prefix("SigPnd:").or_else(|| line.strip_prefix("ShdPnd:")))
        .filter_map(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .any(|mask| mask & stop != 0)
}

#[cfg(test)]
#[test]
fn a_pending_stop_is_read_from_either_mask() {
    let status = |sig, shd| format!("Name:\tpython3\nState:\tD (disk sleep)\nSigPnd:\t{sig}\nShdPnd:\t{shd}\nSigBlk:\t0000000000000000\n");
    assert!(stop_pending(&status("0000000000000000", "0000000000040000")));
    assert!(stop_pending(&status("0000000000040100", "0000000000000000")));
    assert!(!stop_pending(&status("0000000000020000", "0000000000000000")), "SIGCONT pending is not a stop");
    assert!(!stop_pending("garbage"));
}

/// A process handle (`pidfd_open(2)`): signals sent through it reach that process or
/// fail with ESRCH once it is gone, never a process that reused its pid.
#[derive(Debug)]
pub struct Pidfd(std::os::fd::OwnedFd);

impl Pidfd {
    pub fn open(pid: u32) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the fd was just returned by the kernel and is owned by nothing else.
        Ok(Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }))
    }

    pub fn send(&self, signal: u32) -> std::io::Result<()> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.0.as_raw_fd(), signal as i32, std::ptr::null::<libc::siginfo_t>(), 0)
        };
        if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_never_reaches_a_process_after_its_end() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
        let pidfd = Pidfd::open(child.id()).expect("pidfd_open");
        pidfd.send(0).expect("alive");
        pidfd.send(9).expect("kill");
        let _ = child.wait();
        assert_eq!(pidfd.send(0).err().and_then(|e| e.raw_os_error()), Some(libc::ESRCH));
    }
}
