//! CPU time and memory of a process, read from `/proc` (user + system, all threads).

use std::{collections::HashMap, time::Duration};

/// Clock ticks per second for `/proc/PID/stat` times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Where a process's CPU count stood, for [`CpuMark::elapsed`]: the scheduler's
/// own nanosecond count per thread (`/proc/PID/task/TID/schedstat`), where
/// `/proc/PID/stat`'s user and system times are sampled at the timer tick, and a
/// daemon that wakes on timers runs in step with that tick, so its samples land
/// in its bursts or between them run after run (the same binary measured 1.1 and
/// 2.8 CPU-s per 1,000 calls). Counted per thread, so that a thread that exits
/// meanwhile (tokio's blocking pool lets an idle one go after 10 s) does not take
/// its earlier time off the total; what it ran after the mark is lost with it.
/// Falls back to the sampled times where schedstat is missing.
pub struct CpuMark {
    pid: u32,
    threads: Option<HashMap<u32, u64>>,
    sampled: Duration,
}

impl CpuMark {
    pub fn now(pid: u32) -> std::io::Result<Self> {
        Ok(Self { pid, threads: scheduled_times(pid).ok(), sampled: sampled_cpu_time(pid)? })
    }

    /// CPU time the process's threads ran since the mark.
    pub fn elapsed(&self) -> std::io::Result<Duration> {
        let Some(before) = &self.threads else { return Ok(sampled_cpu_time(self.pid)?.saturating_sub(self.sampled)) };
        let now = scheduled_times(self.pid)?;
        let ns = now.iter().map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0))).sum();
        Ok(Duration::from_nanos(ns))
    }
}

/// Scheduled nanoseconds by thread id.
fn scheduled_times(pid: u32) -> std::io::Result<HashMap<u32, u64>> {
    let mut times = HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else { continue };
        // A thread may exit between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
        let ns = stat.split(' ').next().and_then(|v| v.trim().parse::<u64>().ok());
        times.insert(tid, ns.ok_or_else(|| std::io::Error::other(format!("unreadable schedstat of {pid}: {stat:?}")))?);
    }
    Ok(times)
}

/// User + system CPU time of `pid` so far (its threads included, children not),
/// as sampled at the timer tick.
fn sampled_cpu_time(pid: u32) -> std::io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces, are space-separated;
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 after ") ".
    let rest = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = rest.split(' ').collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    Ok(Duration::from_secs_f64(ticks as f64 / ticks_per_second()))
}

/// A `VmHWM`/`VmRSS`-style line of `/proc/PID/status`, in bytes.
pub fn status_bytes(pid: u32, key: &str) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| std::io::Error::other(format!("no {key} in /proc/{pid}/status")))?;
    Ok(kib * 1024)
}

/// Peak resident memory of `pid` so far.
pub fn peak_rss(pid: u32) -> std::io::Result<u64> {
    status_bytes(pid, "VmHWM")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_grows_and_peak_rss_is_plausible() {
        let me = std::process::id();
        let mark = CpuMark::now(me).expect("stat");
        let sampled = sampled_cpu_time(me).expect("stat");
        spin(Duration::from_millis(100));
        assert!(sampled_cpu_time(me).expect("stat") > sampled);
        // The scheduler's count is exact, not sampled: all of the spin is in it.
        let spun = mark.elapsed().expect("schedstat");
        assert!(spun >= Duration::from_millis(100), "{spun:?}");
        // A thread that ran before the mark and exits after it takes nothing off.
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            spin(Duration::from_millis(50));
            ready_tx.send(()).expect("send");
            let _ = go_rx.recv();
        });
        ready.recv().expect("worker");
        let mark = CpuMark::now(me).expect("stat");
        drop(go);
        worker.join().expect("worker");
        spin(Duration::from_millis(100));
        let spun = mark.elapsed().expect("schedstat");
        assert!(spun >= Duration::from_millis(100), "{spun:?}: the exited thread's 50 ms were taken off");
        let rss = peak_rss(me).expect("status");
        assert!(rss > 1 << 20 && rss < 1 << 34, "{rss}");
    }

    /// Runs until this thread has had `time` of CPU by its own count, however
    /// busy the machine is (tests run side by side).
    fn spin(time: Duration) {
        let own = || {
            let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
            Duration::from_nanos(stat.split(' ').next().and_then(|v| v.parse().ok()).expect("ns"))
        };
        let start = own();
        let mut x = 0u64;
        while own() - start < time {
            for _ in 0..10_000 {
                x = x.wrapping_mul(31).wrapping_add(1);
            }
        }
        std::hint::black_box(x);
    }
}
