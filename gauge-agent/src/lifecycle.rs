//! The daemon's own life across restarts: how often it restarted, whether the run
//! before ended cleanly, and how long nothing was metering.
//!
//! A running daemon rewrites a small heartbeat file every few seconds and marks it on
//! a clean stop (SIGTERM, SIGINT). The next start reads it: a marked file means a
//! clean restart; an unmarked one a crash (SIGKILL, OOM kill, panic, a fatal error).
//! The time from the last beat (or the stop) to the moment the new daemon's probes
//! are attached is a gap in which no call was metered: calls made then are missing
//! from the counters, and the gap metrics say so. Counts and downtime are carried in
//! the file, so they add up across restarts. The file lives next to
//! `[enforcement] state_file` (on `/run` by default): a reboot starts the record afresh.
//!
//! [`Lifecycle`] is the pure part (the clock is passed in); [`Heart`] does the file
//! and the metrics for `app`.

use std::{
    path::{Path, PathBuf},
    sync::atomic::AtomicU64,
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};

/// What the heartbeat file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Wall-clock time (Unix seconds) of the last beat, or of the clean stop.
    pub at: f64,
    /// The run ended through its normal exit path (SIGTERM or SIGINT).
    pub clean: bool,
    /// When that run started (Unix seconds).
    pub started: f64,
    /// Restarts so far, carried from run to run.
    pub clean_restarts: u64,
    pub crash_restarts: u64,
    /// Seconds without a running daemon so far, carried from run to run.
    pub downtime_seconds: f64,
}

/// How the run before this one ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous {
    /// No record: the first run (or the record was lost, e.g. by a reboot).
    None,
    Clean,
    Crash,
}

impl Previous {
    pub fn label(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Clean => "clean",
            Self::Crash => "crash",
        }
    }
}

/// This run's record of the runs before.
#[derive(Debug, Clone, PartialEq)]
pub struct Lifecycle {
    pub started: f64,
    pub previous: Previous,
    /// Seconds between the previous run's last sign of life and this run's start
    /// of capture; 0 on a first run. After a crash it exceeds the real gap by at
    /// most one heartbeat interval.
    pub last_downtime: f64,
    pub clean_restarts: u64,
    pub crash_restarts: u64,
    pub downtime_total: f64,
}

impl Lifecycle {
    /// The record of a run that started at `started` and began capturing at `now`
    /// (Unix seconds), after the run whose file said `previous`.
    pub fn resume(previous: Option<&Heartbeat>, started: f64, now: f64) -> Self {
        let Some(previous) = previous else {
            return Self { started, previous: Previous::None, last_downtime: 0.0, clean_restarts: 0, crash_restarts: 0, downtime_total: 0.0 };
        };
        // A wall clock stepped back (NTP, a restored VM) would make a negative gap.
        let gap = if (now - previous.at).is_finite() { (now - previous.at).max(0.0) } else { 0.0 };
        let carried = if previous.downtime_seconds.is_finite() { previous.downtime_seconds.max(0.0) } else { 0.0 };
        let (kind, clean, crash) = if previous.clean {
            (Previous::Clean, previous.clean_restarts.saturating_add(1), previous.crash_restarts)
        } else {
            (Previous::Crash, previous.clean_restarts, previous.crash_restarts.saturating_add(1))
        };
        Self { started, previous: kind, last_downtime: gap, clean_restarts: clean, crash_restarts: crash, downtime_total: carried + gap }
    }

    /// The file's content while this run lives, as of `now`.
    pub fn beat(&self, now: f64) -> Heartbeat {
        self.record(now, false)
    }

    /// The file's content when this run stops cleanly at `now`.
    pub fn stopped(&self, now: f64) -> Heartbeat {
        self.record(now, true)
    }

    fn record(&self, at: f64, clean: bool) -> Heartbeat {
        Heartbeat {
            at,
            clean,
            started: self.started,
            clean_restarts: self.clean_restarts,
            crash_restarts: self.crash_restarts,
            downtime_seconds: self.downtime_total,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a heartbeat record: {source}")]
    Format { path: PathBuf, source: serde_json::Error },
}

/// The heartbeat file that goes with an undo file (`undo.json` ->
/// `undo.json.heartbeat`): daemons with their own undo files never share one.
pub fn path_for(state_file: &Path) -> PathBuf {
    let mut name = state_file.file_name().map(std::ffi::OsStr::to_os_string).unwrap_or_else(|| "gauge-agent".into());
    name.push(".heartbeat");
    state_file.with_file_name(name)
}

/// The record at `path`; `None` when there is none.
pub fn read(path: &Path) -> Result<Option<Heartbeat>, HeartbeatError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(HeartbeatError::Io { path: path.to_owned(), source }),
    };
    serde_json::from_str(&text).map(Some).map_err(|source| HeartbeatError::Format { path: path.to_owned(), source })
}

/// Replaces the record at `path` whole (a temporary file renamed over it), so a crash
/// mid-write leaves the previous record, never a torn one.
pub fn write(path: &Path, heartbeat: &Heartbeat) -> Result<(), HeartbeatError> {
    let io = |source| HeartbeatError::Io { path: path.to_owned(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let text = serde_json::to_vec(heartbeat).map_err(|source| HeartbeatError::Format { path: path.to_owned(), source })?;
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The gap metrics, as exported.
struct Metrics {
    restarts: Family<ReasonLabels, Counter>,
    downtime_total: Counter<f64, AtomicU64>,
    last_downtime: Gauge<f64, AtomicU64>,
    start_time: Gauge<f64, AtomicU64>,
    write_failures: Counter,
}

/// The daemon's heartbeat: opened at start, [`Heart::up`] once capturing, beaten on
/// the poll tick, [`Heart::stop`]ped on a clean exit.
pub struct Heart {
    path: PathBuf,
    previous: Option<Heartbeat>,
    started: f64,
    life: Option<Lifecycle>,
    metrics: Metrics,
    /// The last write failed: the next failure is counted, not logged again.
    failing: bool,
}

impl Heart {
    /// Reads what the previous run left next to `state_file` and registers the
    /// metrics (their values are set by [`Heart::up`]).
    pub fn open(state_file: &Path, registry: &mut Registry) -> Self {
        let path = path_for(state_file);
        let previous = read(&path).unwrap_or_else(|error| {
            // Counted as a first run: better no gap figure than an invented one.
            tracing::warn!(%error, "unreadable heartbeat file: restart and downtime counts start afresh");
            None
        });
        let metrics = Metrics {
            restarts: Family::default(),
            downtime_total: Counter::default(),
            last_downtime: Gauge::default(),
            start_time: Gauge::default(),
            write_failures: Counter::default(),
        };
        registry.register(
            "gauge_agent_restarts",
            "Starts after an earlier run, by how that run ended: clean (SIGTERM/SIGINT) or crash (no clean-stop mark); carried across restarts",
            metrics.restarts.clone(),
        );
        registry.register(
            "gauge_agent_downtime_seconds",
            "Seconds with no daemon capturing (last heartbeat or clean stop to the next start's attach), summed over restarts",
            metrics.downtime_total.clone(),
        );
        registry.register(
            "gauge_agent_last_downtime_seconds",
            "Seconds with no daemon capturing before this run (0 on a first run); after a crash, at most one heartbeat interval too long",
            metrics.last_downtime.clone(),
        );
        registry.register("gauge_agent_start_time_seconds", "When this run started, in Unix seconds", metrics.start_time.clone());
        registry.register(
            "gauge_agent_heartbeat_write_failures",
            "Heartbeat file writes that failed (the next start cannot tell the gap)",
            metrics.write_failures.clone(),
        );
        let started = unix_now();
        metrics.start_time.set(started);
        // Both reasons from the start, so an alert on crash restarts sees a 0 first.
        for reason in [Previous::Clean, Previous::Crash] {
            metrics.restarts.get_or_create(&ReasonLabels { reason: reason.label() }).inc_by(0);
        }
        Self { path, previous, started, life: None, metrics, failing: false }
    }

    /// The probes are attached: the gap ends here.
    pub fn up(&mut self) {
        let life = Lifecycle::resume(self.previous.as_ref(), self.started, unix_now());
        let m = &self.metrics;
        m.restarts.get_or_create(&ReasonLabels { reason: Previous::Clean.label() }).inc_by(life.clean_restarts);
        m.restarts.get_or_create(&ReasonLabels { reason: Previous::Crash.label() }).inc_by(life.crash_restarts);
        m.downtime_total.inc_by(life.downtime_total);
        m.last_downtime.set(life.last_downtime);
        match life.previous {
            Previous::None => {}
            Previous::Clean => tracing::info!(downtime_s = life.last_downtime, "restarted after a clean stop"),
            Previous::Crash => tracing::warn!(
                downtime_s = life.last_downtime,
                "restarted after a crash: calls made while no daemon ran were not metered"
            ),
        }
        self.life = Some(life);
        self.beat();
    }

    /// Refreshes the file (on the daemon's poll tick).
    pub fn beat(&mut self) {
        if let Some(life) = &self.life {
            let record = life.beat(unix_now());
            self.save(&record);
        }
    }

    /// Marks a clean stop, so the next start counts no crash.
    pub fn stop(&mut self) {
        if let Some(life) = &self.life {
            let record = life.stopped(unix_now());
            self.save(&record);
        }
    }

    fn save(&mut self, record: &Heartbeat) {
        match write(&self.path, record) {
            Ok(()) => self.failing = false,
            Err(error) => {
                self.metrics.write_failures.inc();
                if !self.failing {
                    tracing::error!(%error, "cannot write the heartbeat file: the next start will not know the gap");
                }
                self.failing = true;
            }
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(at: f64, clean: bool, restarts: (u64, u64), downtime: f64) -> Heartbeat {
        Heartbeat { at, clean, started: 1.0, clean_restarts: restarts.0, crash_restarts: restarts.1, downtime_seconds: downtime }
    }

    #[test]
    fn a_first_run_counts_no_restart_and_no_gap() {
        let life = Lifecycle::resume(None, 100.0, 101.0);
        assert_eq!((life.previous, life.clean_restarts, life.crash_restarts), (Previous::None, 0, 0));
        assert_eq!((life.last_downtime, life.downtime_total), (0.0, 0.0));
    }

    #[test]
    fn a_run_without_a_stop_mark_was_a_crash_and_its_gap_adds_up() {
        let life = Lifecycle::resume(Some(&beat(1000.0, false, (2, 1), 7.5)), 1004.0, 1005.0);
        assert_eq!(life.previous, Previous::Crash);
        assert_eq!((life.clean_restarts, life.crash_restarts), (2, 2));
        assert_eq!(life.last_downtime, 5.0, "from the last beat to the new capture");
        assert_eq!(life.downtime_total, 12.5);
    }

    #[test]
    fn a_marked_run_was_a_clean_stop() {
        let life = Lifecycle::resume(Some(&beat(1000.0, true, (0, 3), 0.0)), 1010.0, 1030.0);
        assert_eq!((life.previous, life.clean_restarts, life.crash_restarts), (Previous::Clean, 1, 3));
        assert_eq!(life.last_downtime, 30.0);
    }

    #[test]
    fn a_clock_stepped_back_or_a_broken_record_makes_no_negative_gap() {
        let life = Lifecycle::resume(Some(&beat(2000.0, false, (0, 0), f64::NAN)), 1000.0, 1001.0);
        assert_eq!((life.last_downtime, life.downtime_total), (0.0, 0.0));
        let life = Lifecycle::resume(Some(&beat(f64::INFINITY, false, (0, 0), -3.0)), 1000.0, 1001.0);
        assert_eq!((life.last_downtime, life.downtime_total), (0.0, 0.0));
    }

    #[test]
    fn counts_carry_through_the_file_across_restarts() {
        // Three runs: a crash, then a clean stop, then this one.
        let first = Lifecycle::resume(None, 0.0, 1.0);
        let second = Lifecycle::resume(Some(&first.beat(10.0)), 12.0, 13.0);
        let third = Lifecycle::resume(Some(&second.stopped(20.0)), 21.0, 22.0);
        assert_eq!((third.clean_restarts, third.crash_restarts), (1, 1));
        assert_eq!(third.last_downtime, 2.0);
        assert_eq!(third.downtime_total, 5.0);
        assert_eq!(third.beat(30.0).started, 21.0);
    }

    #[test]
    fn the_file_is_replaced_whole_and_sits_next_to_the_undo_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = path_for(&dir.path().join("state/undo.json"));
        assert_eq!(path, dir.path().join("state/undo.json.heartbeat"));
        assert_eq!(read(&path).expect("no file is no record"), None);
        let record = beat(5.0, true, (1, 2), 3.0);
        write(&path, &record).expect("write creates the directory");
        assert_eq!(read(&path).expect("read"), Some(record));
        assert!(!dir.path().join("state/undo.json.heartbeat.tmp").exists());
        std::fs::write(&path, "{\"at\": 1").expect("tear it");
        assert!(matches!(read(&path), Err(HeartbeatError::Format { .. })));
    }

    #[test]
    fn the_heart_exports_what_the_previous_run_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let undo = dir.path().join("undo.json");
        let long_ago = unix_now() - 60.0;
        write(&path_for(&undo), &beat(long_ago, false, (4, 1), 10.0)).expect("write");
        let mut registry = Registry::default();
        let mut heart = Heart::open(&undo, &mut registry);
        heart.up();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("gauge_agent_restarts_total{reason=\"crash\"} 2"), "{text}");
        assert!(text.contains("gauge_agent_restarts_total{reason=\"clean\"} 4"), "{text}");
        let sample = |name: &str| -> f64 {
            text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or_else(|| panic!("{name} in {text}"))
        };
        let last = sample("gauge_agent_last_downtime_seconds ");
        assert!((60.0..70.0).contains(&last), "{last}");
        assert!((sample("gauge_agent_downtime_seconds_total ") - (10.0 + last)).abs() < 1e-6);
        heart.stop();
        let left = read(&path_for(&undo)).expect("read").expect("a record");
        assert!(left.clean && left.crash_restarts == 2 && left.clean_restarts == 4);
    }
}
