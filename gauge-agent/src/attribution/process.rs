//! Who a process is: executable, command line, parent, cgroup and container, and the
//! few environment variables agent rules ask for. Read from `/proc` as early as the
//! pipeline sees a process (its exec event, or its first captured byte), because a
//! short-lived client may be gone by the time its call ends.

use std::{
    collections::HashMap,
    io::Read as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::container::{self, Container, MetadataRoots};

/// Most bytes read from one `/proc` file: command lines and environments can be
/// large, and nothing here needs more.
const MAX_PROC_FILE: u64 = 256 << 10;

/// What attribution knows of one process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessInfo {
    pub tgid: u32,
    pub ppid: u32,
    /// Kernel start time (clock ticks since boot): with `tgid`, names the process
    /// even after its pid is reused.
    pub start_time: u64,
    pub comm: String,
    /// The executable's path, as the process sees it; empty when unknown.
    pub exe: String,
    /// The command line, arguments joined by spaces.
    pub cmdline: String,
    /// The cgroup path (v2, else the most telling v1 hierarchy); empty when unknown.
    pub cgroup: String,
    pub container: Option<Container>,
    /// PID 1 of its own pid namespace (a container's init): never acted on, since
    /// its end ends the container.
    pub namespace_init: bool,
    /// Only the variables attribution was asked to read; never logged or exported.
    pub env: Vec<(String, String)>,
}

impl ProcessInfo {
    /// What is known of a process that is gone before it could be read.
    pub fn from_comm(tgid: u32, comm: &str) -> Self {
        Self { tgid, comm: comm.to_owned(), ..Self::default() }
    }

    /// The `process` label: the executable's file name, else the thread name.
    pub fn name(&self) -> &str {
        match self.exe.rsplit('/').next() {
            Some(name) if !name.is_empty() => name.strip_suffix(" (deleted)").unwrap_or(name),
            _ => &self.comm,
        }
    }

    pub fn env(&self, name: &str) -> Option<&str> {
        self.env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Where process facts come from: `/proc` on a live host; nothing on replay (the
/// pipeline then knows a process by its thread name only).
pub trait ProcessSource: Send {
    /// Reads a live process; `None` when it is gone or unreadable.
    fn read(&mut self, tgid: u32) -> Option<ProcessInfo>;
    /// The start time of the process now holding `tgid`, to tell pid reuse.
    fn start_time(&mut self, tgid: u32) -> Option<u64>;
}

/// No process facts: used by replay and tests.
#[derive(Debug, Default)]
pub struct NoProcesses;

impl ProcessSource for NoProcesses {
    fn read(&mut self, _: u32) -> Option<ProcessInfo> {
        None
    }
    fn start_time(&mut self, _: u32) -> Option<u64> {
        None
    }
}

/// Containers described, by cgroup path: their metadata files are read once, not
/// at every exec inside them. Cleared when full.
const MAX_CONTAINERS: usize = 4096;

/// How long a start time read from `/proc` is taken as still true. Every metered
/// call asks whether its pid was reused, and reading `/proc/PID/stat` for it was
/// 6% of the daemon's CPU under a steady stream of calls; for a pid to be reused
/// within a second the host would have to fork through the whole pid space
/// (`pid_max`, 4,194,304 by default) in it, and a reused pid that executes a
/// program is re-read at its exec event anyway.
const START_TIME_FRESH: Duration = Duration::from_secs(1);
/// Start times remembered; cleared when full.
const MAX_START_TIMES: usize = 4096;

/// Reads processes from a procfs.
#[derive(Debug)]
pub struct ProcFs {
    root: PathBuf,
    metadata: MetadataRoots,
    /// Environment variables to keep (the rest of the environment is not kept).
    env_names: Vec<String>,
    containers: HashMap<String, Option<Container>>,
    /// Start times read lately, and when.
    start_times: HashMap<u32, (u64, Instant)>,
    fresh_for: Duration,
}

impl ProcFs {
    pub fn new(root: impl Into<PathBuf>, metadata: MetadataRoots, env_names: Vec<String>) -> Self {
        Self {
            root: root.into(),
            metadata,
            env_names,
            containers: HashMap::new(),
            start_times: HashMap::new(),
            fresh_for: START_TIME_FRESH,
        }
    }

    fn note_start_time(&mut self, tgid: u32, start: u64) {
        if self.start_times.len() >= MAX_START_TIMES {
            self.start_times.clear();
        }
        self.start_times.insert(tgid, (start, Instant::now()));
    }

    fn container(&mut self, cgroup: &str) -> Option<Container> {
        if let Some(known) = self.containers.get(cgroup) {
            return known.clone();
        }
        if self.containers.len() >= MAX_CONTAINERS {
            self.containers.clear();
        }
        let container = container::parse(cgroup).map(|r| container::describe(&self.metadata, &r));
        self.containers.insert(cgroup.to_owned(), container.clone());
        container
    }
}

impl ProcessSource for ProcFs {
    fn read(&mut self, tgid: u32) -> Option<ProcessInfo> {
        let dir = self.root.join(tgid.to_string());
        let stat = read_text(&dir.join("stat"))?;
        let (comm, ppid, start_time) = parse_stat(&stat)?;
        let exe = std::fs::read_link(dir.join("exe")).map(|p| p.display().to_string()).unwrap_or_default();
        let cmdline = read_bytes(&dir.join("cmdline")).map(|b| join_nul(&b)).unwrap_or_default();
        let cgroup = read_text(&dir.join("cgroup")).and_then(|text| container::cgroup_path(&text)).unwrap_or_default();
        let container = if cgroup.is_empty() { None } else { self.container(&cgroup) };
        let env = if self.env_names.is_empty() {
            Vec::new()
        } else {
            read_bytes(&dir.join("environ")).map(|b| pick_env(&b, &self.env_names)).unwrap_or_default()
        };
        let namespace_init = read_text(&dir.join("status")).is_some_and(|s| is_namespace_init(&s));
        self.note_start_time(tgid, start_time);
        Some(ProcessInfo { tgid, ppid, start_time, comm, exe, cmdline, cgroup, container, namespace_init, env })
    }

    fn start_time(&mut self, tgid: u32) -> Option<u64> {
        if let Some(&(start, at)) = self.start_times.get(&tgid)
            && at.elapsed() < self.fresh_for
        {
            return Some(start);
        }
        let stat = read_text(&self.root.join(tgid.to_string()).join("stat"));
        let Some((_, _, start)) = stat.as_deref().and_then(parse_stat) else {
            self.start_times.remove(&tgid);
            return None;
        };
        self.note_start_time(tgid, start);
        Some(start)
    }
}

/// `(comm, ppid, starttime)` from `/proc/PID/stat`. The comm is in parentheses and
/// may itself hold spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(stat: &str) -> Option<(String, u32, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    // After ") ": state(3) ppid(4) ... starttime(22): indexes 0, 1, ..., 19.
    let rest: Vec<&str> = stat.get(close + 1..)?.split_ascii_whitespace().collect();
    let ppid = rest.get(1)?.parse().ok()?;
    let start = rest.get(19)?.parse().ok()?;
    Some((comm, ppid, start))
}

/// Whether `/proc/PID/status` says the process is PID 1 of a nested pid namespace
/// (`NSpid:` lists its pid in each namespace, outermost first).
pub fn is_namespace_init(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .is_some_and(|pids| {
            let pids: Vec<&str> = pids.split_whitespace().collect();
            pids.len() > 1 && pids.last() == Some(&"1")
        })
}

fn join_nul(bytes: &[u8]) -> String {
    let parts: Vec<String> =
        bytes.split(|&b| b == 0).filter(|p| !p.is_empty()).map(|p| String::from_utf8_lossy(p).into_owned()).collect();
    parts.join(" ")
}

fn pick_env(environ: &[u8], names: &[String]) -> Vec<(String, String)> {
    environ
        .split(|&b| b == 0)
        .filter_map(|entry| {
            let entry = std::str::from_utf8(entry).ok()?;
            let (name, value) = entry.split_once('=')?;
            names.iter().any(|n| n == name).then(|| (name.to_owned(), value.to_owned()))
        })
        .collect()
}

fn read_bytes(path: &Path) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path).ok()?.take(MAX_PROC_FILE).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

fn read_text(path: &Path) -> Option<String> {
    read_bytes(path).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Processes seen, by tgid, bounded: when full, entries of processes that are gone
/// go first, then the oldest.
#[derive(Debug, Default)]
pub struct ProcessTable {
    entries: HashMap<u32, (u64, ProcessInfo), foldhash::fast::RandomState>,
    next_seq: u64,
    capacity: usize,
}

impl ProcessTable {
    pub fn new(capacity: usize) -> Self {
        Self { entries: HashMap::default(), next_seq: 0, capacity: capacity.max(16) }
    }

    pub fn get(&self, tgid: u32) -> Option<&ProcessInfo> {
        self.entries.get(&tgid).map(|(_, info)| info)
    }

    pub fn contains(&self, tgid: u32) -> bool {
        self.entries.contains_key(&tgid)
    }

    pub fn insert(&mut self, info: ProcessInfo, mut alive: impl FnMut(u32) -> bool) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&info.tgid) {
            self.entries.retain(|&tgid, _| alive(tgid));
            if self.entries.len() >= self.capacity {
                let oldest = self.entries.iter().min_by_key(|(_, (seq, _))| *seq).map(|(&tgid, _)| tgid);
                if let Some(tgid) = oldest {
                    self.entries.remove(&tgid);
                }
            }
        }
        self.next_seq += 1;
        self.entries.insert(info.tgid, (self.next_seq, info));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = "4242 (my (odd) prog) S 17 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1000 1 1";
        assert_eq!(parse_stat(stat), Some(("my (odd) prog".to_owned(), 17, 987654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_containers_init_is_told_by_its_namespace_pids() {
        assert!(is_namespace_init("Name:\tsh\nNSpid:\t4242\t1\n"));
        assert!(!is_namespace_init("NSpid:\t1\n"), "the host's own init is pid 1 already");
        assert!(!is_namespace_init("NSpid:\t4242\t17\n"));
        assert!(!is_namespace_init("Name:\tsh\n"));
    }

    #[test]
    fn only_the_asked_environment_variables_are_kept() {
        let environ = b"OPENAI_API_KEY=sk-secret\0GAUGE_AGENT=support-bot\0PATH=/bin\0";
        assert_eq!(pick_env(environ, &["GAUGE_AGENT".to_owned()]), vec![("GAUGE_AGENT".to_owned(), "support-bot".to_owned())]);
    }

    #[test]
    fn this_process_reads_whole() {
        let mut procfs = ProcFs::new("/proc", MetadataRoots::default(), vec!["PATH".to_owned()]);
        let info = procfs.read(std::process::id()).expect("this process is alive");
        assert!(!info.exe.is_empty() && !info.cmdline.is_empty() && info.start_time > 0, "{info:?}");
        assert!(info.env("PATH").is_some() && info.env.len() == 1);
        assert_eq!(procfs.start_time(std::process::id()), Some(info.start_time));
    }

    #[test]
    fn a_start_time_is_read_again_only_once_it_is_a_second_old() {
        let root = tempfile::tempdir().expect("tempdir");
        let stat = |start: u64| format!("77 (agent) S 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 1000 1 1");
        std::fs::create_dir(root.path().join("77")).expect("mkdir");
        std::fs::write(root.path().join("77/stat"), stat(500)).expect("write");
        let mut procfs = ProcFs::new(root.path(), MetadataRoots::default(), Vec::new());
        assert_eq!(procfs.start_time(77), Some(500));
        std::fs::write(root.path().join("77/stat"), stat(900)).expect("write");
        assert_eq!(procfs.start_time(77), Some(500), "read a moment ago: not read again");
        procfs.fresh_for = Duration::ZERO;
        assert_eq!(procfs.start_time(77), Some(900), "stale: read again, and the reuse is seen");
        std::fs::remove_dir_all(root.path().join("77")).expect("rm");
        assert_eq!(procfs.start_time(77), None, "gone");
        procfs.fresh_for = START_TIME_FRESH;
        assert_eq!(procfs.start_time(77), None, "a gone process is not remembered");
    }

    #[test]
    fn the_process_label_is_the_executable_name() {
        let info = ProcessInfo { exe: "/usr/bin/python3.11".into(), comm: "python3".into(), ..Default::default() };
        assert_eq!(info.name(), "python3.11");
        assert_eq!(ProcessInfo::from_comm(1, "curl").name(), "curl");
    }

    #[test]
    fn a_full_table_forgets_dead_processes_first() {
        let mut table = ProcessTable::new(16);
        for tgid in 0..16 {
            table.insert(ProcessInfo::from_comm(tgid, "p"), |_| true);
        }
        table.insert(ProcessInfo::from_comm(100, "new"), |tgid| tgid != 3);
        assert!(!table.contains(3) && table.contains(100) && table.len() == 16);
        table.insert(ProcessInfo::from_comm(101, "newer"), |_| true);
        assert!(!table.contains(0) && table.contains(101), "the oldest goes when all are alive");
    }
}
