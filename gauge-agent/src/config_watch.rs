//! Hot reload: notices when the config file changes, and reads it once it has
//! settled.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};

/// Notices changes to the config file by its modification time and length, once
/// they have settled for a poll (an editor that truncates, then writes, must not
/// have its half-written file loaded).
pub struct ConfigWatch {
    path: PathBuf,
    last: Option<(std::time::SystemTime, u64)>,
    seen: Option<(std::time::SystemTime, u64)>,
    dry_run: bool,
}

impl ConfigWatch {
    pub fn new(path: PathBuf, dry_run: bool) -> Self {
        let last = Self::stamp(&path);
        Self { path, last, seen: last, dry_run }
    }

    fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }

    /// The new config when the file changed since last looked at.
    pub fn changed(&mut self) -> Option<Result<Config, ConfigError>> {
        let now = Self::stamp(&self.path);
        let settled = now == self.seen;
        self.seen = now;
        if now.is_none() || now == self.last || !settled {
            return None;
        }
        self.last = now;
        Some(Config::load(Some(&self.path)).map(|mut c| {
            c.enforcement.dry_run |= self.dry_run;
            c
        }))
    }
}

