//! Enforcement on a whole cgroup: freeze/thaw and CPU throttle/restore.
//!
//! Hosts come in three layouts, told apart by looking at the mount root rather
//! than the kernel version (distros backport, containers hide mounts):
//! - pure v2: the root itself holds `cgroup.controllers`;
//! - hybrid: v2 lives at `<root>/unified`, v1 controllers at `<root>/<list>`;
//! - v1 only: no `cgroup.controllers` anywhere.
//!
//! v2 is preferred because its freezer is atomic and reports completion in
//! `cgroup.events`. On hybrid hosts, though, systemd often leaves v2 without
//! controllers (no `cpu.max`), and docker's cgroupfs driver places containers
//! only in v1, so when the v2 directory lacks the control file we fall back to
//! the v1 hierarchy. Root cgroups are never touched: freezing or throttling
//! `/` would stop the host (or the whole container we run in), Gauge included.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FREEZE_WAIT: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(10);
const PERIOD_US: u64 = 100_000;
/// Below 1 ms the kernel rejects the quota.
const MIN_QUOTA_US: u64 = 1_000;

/// Where cgroup hierarchies are mounted.
#[derive(Debug, Clone)]
pub struct CgroupFs {
    root: PathBuf,
}

/// A process's cgroup paths as written in `/proc/PID/cgroup`; `None` when the
/// hierarchy is absent from that file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub v2: Option<String>,
    pub freezer: Option<String>,
    pub cpu: Option<String>,
}

/// A cgroup this module froze; hand it back to [`CgroupFs::thaw`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Frozen {
    pub dir: PathBuf,
    pub v2: bool,
}

/// A cgroup this module throttled, with what to put back on [`CgroupFs::restore`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Throttled {
    pub dir: PathBuf,
    pub v2: bool,
    /// v2: the `cpu.max` content; v1: "quota period".
    previous: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "refusing to act on a root cgroup (it holds the whole host or container); target a process in its own cgroup"
    )]
    Root,
    #[error(
        "no usable cgroup for the {0} controller: neither a cgroup v2 path under a mounted unified hierarchy nor a mounted v1 {0} hierarchy; mount it or check the mount root"
    )]
    NoController(&'static str),
    #[error("cgroup file {path}: {source} (has the cgroup gone away, or are we not root?)")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cgroup {0} did not report frozen within 1 s, so it was thawed again; a task may be stuck in the kernel, retry or signal the processes"
    )]
    Timeout(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_err(path))
}

fn is_root(path: &str) -> bool {
    path.trim_matches('/').is_empty()
}

/// Joins a `/proc/PID/cgroup` path under a mount, refusing `..` so a forged
/// path cannot reach files outside the hierarchy.
fn join(mount: &Path, cgroup: &str) -> Result<PathBuf, CgroupError> {
    let mut dir = mount.to_path_buf();
    for part in cgroup.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(CgroupError::Io {
                path: dir.join(cgroup.trim_start_matches('/')),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "cgroup path contains '..'; refusing to leave the cgroup mount",
                ),
            });
        }
        dir.push(part);
    }
    Ok(dir)
}

impl CgroupFs {
    /// `"/sys/fs/cgroup"` in production, a temp dir in tests.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The process's cgroup paths from the text of `/proc/PID/cgroup`.
    pub fn of_process(&self, proc_cgroup: &str) -> Placement {
        let mut p = Placement {
            v2: None,
            freezer: None,
            cpu: None,
        };
        for line in proc_cgroup.lines() {
            // Paths may contain ':', so only the first two split.
            let mut fields = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let path = path.trim_end().to_string();
            if id == "0" && controllers.is_empty() {
                p.v2 = Some(path);
                continue;
            }
            for c in controllers.split(',') {
                match c {
                    "freezer" => p.freezer = Some(path.clone()),
                    "cpu" => p.cpu = Some(path.clone()),
                    _ => {}
                }
            }
        }
        p
    }

    fn v2_mount(&self) -> Option<PathBuf> {
        [self.root.clone(), self.root.join("unified")]
            .into_iter()
            .find(|m| m.join("cgroup.controllers").is_file())
    }

    fn v1_mount(&self, controller: &str) -> Option<PathBuf> {
        // A pure v2 root may hold a child cgroup that happens to be named "cpu".
        if self.root.join("cgroup.controllers").exists() {
            return None;
        }
        let exact = self.root.join(controller);
        if exact.is_dir() {
            return Some(exact);
        }
        std::fs::read_dir(&self.root)
            .ok()?
            .filter_map(Result::ok)
            .find(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.split(',').any(|c| c == controller))
            })
            .map(|e| e.path())
            .filter(|p| p.is_dir())
    }

    /// The directory to act on and whether it is v2. `v2_file` is the control
    /// file whose absence means v2 lacks the controller there.
    fn target(
        &self,
        p: &Placement,
        controller: &'static str,
        v2_file: &str,
    ) -> Result<(PathBuf, bool), CgroupError> {
        let mut saw_root = false;
        let v1_path = if controller == "cpu" {
            &p.cpu
        } else {
            &p.freezer
        };
        let v1_dir = match v1_path.as_deref() {
            Some(path) if is_root(path) => {
                saw_root = true;
                None
            }
            Some(path) => match self.v1_mount(controller) {
                Some(mount) => Some(join(&mount, path)?),
                None => None,
            },
            None => None,
        };
        if let Some(path) = p.v2.as_deref() {
            if is_root(path) {
                saw_root = true;
            } else if let Some(mount) = self.v2_mount() {
                let dir = join(&mount, path)?;
                if v1_dir.is_none() || dir.join(v2_file).exists() {
                    return Ok((dir, true));
                }
            }
        }
        match v1_dir {
            Some(dir) => Ok((dir, false)),
            None if saw_root => Err(CgroupError::Root),
            None => Err(CgroupError::NoController(controller)),
        }
    }

    /// Freezes the cgroup and waits until the kernel says every task stopped.
    pub fn freeze(&self, p: &Placement) -> Result<Frozen, CgroupError> {
        let frozen = self.to_freeze(p)?;
        self.freeze_now(&frozen)?;
        Ok(frozen)
    }

    /// The cgroup [`freeze`](Self::freeze) would freeze, not touched yet: a caller
    /// can note it down (the undo file) before acting.
    pub fn to_freeze(&self, p: &Placement) -> Result<Frozen, CgroupError> {
        let (dir, v2) = self.target(p, "freezer", "cgroup.freeze")?;
        Ok(Frozen { dir, v2 })
    }

    /// Freezes a cgroup from [`to_freeze`](Self::to_freeze) and waits until the
    /// kernel says every task stopped.
    pub fn freeze_now(&self, frozen: &Frozen) -> Result<(), CgroupError> {
        let (file, value) = control(frozen, true);
        write(&frozen.dir.join(file), value)?;
        let deadline = Instant::now() + FREEZE_WAIT;
        loop {
            if is_frozen(frozen)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                // A half-frozen cgroup the caller holds no handle to would stay
                // stuck forever; better to leave it as we found it.
                let _ = self.thaw(frozen);
                return Err(CgroupError::Timeout(frozen.dir.clone()));
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn thaw(&self, f: &Frozen) -> Result<(), CgroupError> {
        let (file, value) = control(f, false);
        write(&f.dir.join(file), value)
    }

    /// Caps the cgroup at `cpu_fraction` of one CPU. Out-of-range values are
    /// clamped (NaN to the minimum) since throttling is itself the safe side.
    pub fn throttle(&self, p: &Placement, cpu_fraction: f64) -> Result<Throttled, CgroupError> {
        let throttled = self.to_throttle(p)?;
        self.throttle_now(&throttled, cpu_fraction)?;
        Ok(throttled)
    }

    /// The cgroup [`throttle`](Self::throttle) would limit, with its limit as it
    /// is now, not touched yet: a caller can note it down before acting.
    pub fn to_throttle(&self, p: &Placement) -> Result<Throttled, CgroupError> {
        let (dir, v2) = self.target(p, "cpu", "cpu.max")?;
        let previous = if v2 {
            read(&dir.join("cpu.max"))?.trim().to_string()
        } else {
            let (qf, pf) = (dir.join("cpu.cfs_quota_us"), dir.join("cpu.cfs_period_us"));
            format!("{} {}", read(&qf)?.trim(), read(&pf)?.trim())
        };
        Ok(Throttled { dir, v2, previous })
    }

    /// Limits a cgroup from [`to_throttle`](Self::to_throttle).
    pub fn throttle_now(&self, t: &Throttled, cpu_fraction: f64) -> Result<(), CgroupError> {
        let fraction = if cpu_fraction.is_nan() {
            0.0
        } else {
            cpu_fraction.clamp(0.0, 1.0)
        };
        // Exact after the clamp: at most PERIOD_US.
        let quota = ((fraction * PERIOD_US as f64) as u64).max(MIN_QUOTA_US);
        if t.v2 {
            return write(&t.dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"));
        }
        // Quota first: from the usual unlimited or larger quota this only lowers
        // the quota/period ratio, which the kernel checks against the parent's
        // limit on every write, so no intermediate state is rejected.
        write(&t.dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
        write(&t.dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())
    }

    /// Puts back exactly what [`throttle`](Self::throttle) found.
    pub fn restore(&self, t: &Throttled) -> Result<(), CgroupError> {
        if t.v2 {
            return write(&t.dir.join("cpu.max"), &t.previous);
        }
        let (quota, period) = t.previous.split_once(' ').unwrap_or((&t.previous, ""));
        // Period first, mirroring throttle: the 1 ms-ish quota still in place
        // keeps the intermediate ratio low whatever period comes back.
        if !period.is_empty() {
            write(&t.dir.join("cpu.cfs_period_us"), period)?;
        }
        write(&t.dir.join("cpu.cfs_quota_us"), quota)
    }

    /// Pids in the cgroup that [`freeze`](Self::freeze) would act on, including
    /// its descendants, since a container's processes may sit in child cgroups.
    pub fn pids(&self, p: &Placement) -> Result<Vec<u32>, CgroupError> {
        let (dir, _) = self.target(p, "freezer", "cgroup.freeze")?;
        let mut pids = Vec::new();
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            let procs = dir.join("cgroup.procs");
            for line in read(&procs)?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
            {
                let pid = line.parse().map_err(|_| CgroupError::Io {
                    path: procs.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("not a pid: {line:?}"),
                    ),
                })?;
                pids.push(pid);
            }
            // Unreadable children are skipped: they may vanish while we walk.
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .filter_map(Result::ok)
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }
}

fn control(f: &Frozen, freeze: bool) -> (&'static str, &'static str) {
    match (f.v2, freeze) {
        (true, true) => ("cgroup.freeze", "1"),
        (true, false) => ("cgroup.freeze", "0"),
        (false, true) => ("freezer.state", "FROZEN"),
        (false, false) => ("freezer.state", "THAWED"),
    }
}

fn is_frozen(f: &Frozen) -> Result<bool, CgroupError> {
    if f.v2 {
        let events = read(&f.dir.join("cgroup.events"))?;
        Ok(events.lines().any(|l| l.trim() == "frozen 1"))
    } else {
        Ok(read(&f.dir.join("freezer.state"))?.trim() == "FROZEN")
    }
}

#[cfg(test)]
#[path = "cgroup_tests.rs"]
mod tests;
