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
    Command, SIGCONT,
    cgroup::{CgroupFs, Frozen, Throttled},
};
use crate::source::kernel::EnforcementMaps;

#[derive(Debug, Clone, PartialEq)]
enum Later {
    Signal { pid: u32, signal: u32 },
    Thaw(Frozen),
    Restore(Throttled),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    what: &'static str,
}

pub struct Executor {
    maps: Option<EnforcementMaps>,
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
                    }
                    self.later.push((now + after, Later::Signal { pid, signal }));
                }
                Command::Freeze { pid, cooldown } => match self.placement(pid).map(|p| self.cgroups.freeze(&p)) {
                    Some(Ok(frozen)) => {
                        tracing::warn!(pid, cgroup = %frozen.dir.display(), ?cooldown, "cgroup frozen");
                        self.later.push((now + cooldown, Later::Thaw(frozen)));
                    }
                    Some(Err(e)) => self.fail("freeze", &e),
                    None => self.fail("freeze", &format!("pid {pid}: its cgroup is unknown (process gone?)")),
                },
                Command::Throttle { pid, share, cooldown } => match self.placement(pid).map(|p| self.cgroups.throttle(&p, share)) {
                    Some(Ok(throttled)) => {
                        tracing::warn!(pid, cgroup = %throttled.dir.display(), share, ?cooldown, "cgroup CPU throttled");
                        self.later.push((now + cooldown, Later::Restore(throttled)));
                    }
                    Some(Err(e)) => self.fail("throttle", &e),
                    None => self.fail("throttle", &format!("pid {pid}: its cgroup is unknown (process gone?)")),
                },
            }
        }
    }

    fn placement(&self, pid: u32) -> Option<super::cgroup::Placement> {
        let text = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup")).ok()?;
        Some(self.cgroups.of_process(&text))
    }

    fn enforce(&mut self, tgid: u32, e: Enforcement) {
        if self.never(tgid) {
            return;
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
        if let Some(maps) = &mut self.maps {
            maps.clear(tgid);
        }
    }

    fn never(&self, pid: u32) -> bool {
        pid <= 1 || pid == self.self_pid || pid == self.parent_pid
    }

    fn signal(&mut self, pid: u32, signal: u32) {
        if self.never(pid) {
            tracing::error!(pid, signal, "refused to signal a protected process");
            return;
        }
        if signal == SIGCONT {
            self.paused.remove(&pid);
            self.stuck.remove(&pid);
        }
        // SAFETY: kill(2) with a checked positive pid.
        if unsafe { libc::kill(pid as i32, signal as i32) } != 0 {
            let error = std::io::Error::last_os_error();
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

    /// Runs the delayed commands that are due, and lets go of stuck held processes.
    pub fn due(&mut self, now: Instant) {
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.later).into_iter().partition(|(at, _)| *at <= now);
        self.later = rest;
        for (_, later) in due {
            self.undo(later);
        }
        self.watchdog(now);
    }

    fn undo(&mut self, later: Later) {
        match later {
            Later::Signal { pid, signal } => self.signal(pid, signal),
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
            if self.stopped(tgid) {
                self.signal(tgid, SIGCONT);
            }
        }
        self.stuck.clear();
    }

    /// What is enforced now (for tests and logs).
    pub fn enforced(&self, tgid: u32) -> Option<Enforcement> {
        self.enforced.get(&tgid).copied()
    }
}
