//! Free-space check before the long builds: a full disk otherwise shows up, minutes
//! in, as an LLVM "IO failure on output stream" that reads like a compiler bug.

use std::{path::Path, process::Command};

/// A fresh clone's release build, clippy and test binaries take about 7 GiB.
pub const TEST_NEEDS_GIB: u64 = 8;
/// The sanitizer build of the fuzz targets takes about 3.5 GiB.
pub const FUZZ_NEEDS_GIB: u64 = 4;

/// Says so, loudly, when the filesystem holding `dir` has less than `need_gib` free.
/// Only a warning: the estimate is rough and a warm target directory needs less.
pub fn warn_if_low(dir: &Path, need_gib: u64) {
    let Some(free) = free_gib(dir) else { return };
    if free < need_gib {
        eprintln!(
            "==> WARNING: only {free} GiB free under {}; this step needs about {need_gib} GiB. \
             If it fails with \"No space left on device\", free space (old target/ directories, \
             `cargo clean`) and run it again.",
            dir.display()
        );
    }
}

fn free_gib(dir: &Path) -> Option<u64> {
    // `df -Pk` is POSIX and on every host this runs on; no crate needed for one number.
    let out = Command::new("df").arg("-Pk").arg(dir).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let available_kib: u64 = text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()?;
    Some(available_kib / (1024 * 1024))
}
