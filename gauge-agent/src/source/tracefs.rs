//! tracefs, where syscall tracepoints are looked up by name (aya reads their ids
//! there). Many hosts mount it at boot; where none is, the daemon (root) mounts it,
//! as bpftrace and perf do.

use std::path::Path;

const MOUNT_POINT: &str = "/sys/kernel/tracing";
const PLACES: [&str; 2] = [MOUNT_POINT, "/sys/kernel/debug/tracing"];

/// A tracefs is readable at one of the places aya looks; mounts one if not.
pub fn ensure_mounted() -> std::io::Result<()> {
    if PLACES.iter().any(|p| is_mounted(Path::new(p))) {
        return Ok(());
    }
    let (source, target, kind) = (c"nodev", c"/sys/kernel/tracing", c"tracefs");
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), kind.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    tracing::info!(path = MOUNT_POINT, "mounted tracefs for the syscall tracepoints");
    Ok(())
}

/// The kernel creates the directory even when nothing is mounted on it: mounted
/// means it has entries.
fn is_mounted(path: &Path) -> bool {
    path.read_dir().is_ok_and(|mut entries| entries.next().is_some())
}
