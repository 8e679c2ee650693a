//! CPU time and memory of a process, read from `/proc` (user + system, all threads).

use std::time::Duration;

/// Clock ticks per second for `/proc/PID/stat` times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// CPU time of `pid` so far, all its live threads: the scheduler's own
/// nanosecond count (`/proc/PID/task/TID/schedstat`), where `/proc/PID/stat`'s
/// user and system times are sampled at the timer tick, and a daemon that wakes
/// on timers runs in step with that tick, so its samples land in its bursts or
/// between them run after run (the same binary measured 1.1 and 2.8 CPU-s per
/// 1,000 calls). Threads that exited are not counted: the daemon's are
/// long-lived. Falls back to the sampled times where schedstat is missing.
pub fn cpu_time(pid: u32) -> std::io::Result<Duration> {
    match scheduled_time(pid) {
        Ok(time) => Ok(time),
        Err(_) => sampled_cpu_time(pid),
    }
}

fn scheduled_time(pid: u32) -> std::io::Result<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread may exit between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(task?.path().join("schedstat")) else { continue };
        let ns = stat.split(' ').next().and_then(|v| v.trim().parse::<u64>().ok());
        total += ns.ok_or_else(|| std::io::Error::other(format!("unreadable schedstat of {pid}: {stat:?}")))?;
    }
    Ok(Duration::from_nanos(total))
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
        let before = cpu_time(me).expect("stat");
        let scheduled = scheduled_time(me).expect("schedstat");
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(100) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(cpu_time(me).expect("stat") > before);
        // The scheduler's count is exact, not sampled: all of the spin is in it.
        let spun = scheduled_time(me).expect("schedstat") - scheduled;
        assert!(spun >= Duration::from_millis(95), "{spun:?}");
        let rss = peak_rss(me).expect("status");
        assert!(rss > 1 << 20 && rss < 1 << 34, "{rss}");
    }
}
