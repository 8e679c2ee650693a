//! Finding the files to hook: shared `libssl` and `libgnutls` from the linker cache, libraries and
//! executables mapped by running processes, and those of processes that start later
//! (exec events). Each file is inspected once, identified by device and inode, so a
//! library shared by a thousand processes, or reached through several paths, is
//! attached once. Files inside containers are reached through `/proc/PID/root`.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::elf::{self, TlsSymbols};

/// Identity of a file independent of the path it was reached by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// Why a file was considered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "via", rename_all = "snake_case")]
pub enum Reason {
    /// Listed in the dynamic linker cache (`ldconfig -p`).
    LinkerCache,
    /// Mapped by a running process.
    Mapped { pid: u32, comm: String },
    /// The executable of a process.
    Executable { pid: u32, comm: String },
    /// Named in the config's `capture.extra_targets`.
    Config,
}

/// A file to look at: the path to open from the agent's mount namespace, and the
/// path as the owning process sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub open_path: PathBuf,
    pub display_path: String,
    pub reason: Reason,
}

/// What `gauge-agent targets` shows for one hooked (or unhookable TLS) file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub path: String,
    pub file: FileId,
    pub reason: Reason,
    /// Entry points found, with their file offsets.
    pub symbols: Vec<(String, u64)>,
    /// Probes attached (an entry and a return probe count as two).
    pub probes: usize,
    /// Why the file is not (fully) hooked.
    pub error: Option<String>,
}

/// Outcome of offering a candidate to the [`Planner`].
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Seen before (same inode), or not a TLS library: nothing to do.
    Known,
    /// A new TLS library: attach these symbols to `candidate.open_path`.
    Attach(Candidate, FileId, TlsSymbols),
    /// A new file with a TLS library compiled in that cannot be hooked; listed in
    /// the targets with the reason.
    Unhookable(String),
}

/// Remembers every inspected file so each is inspected and attached once.
#[derive(Debug, Default)]
pub struct Planner {
    seen: HashMap<FileId, Option<usize>>,
    targets: Vec<Target>,
}

impl Planner {
    /// Decides what to do with a candidate. `inspect` reads its symbols; it is a
    /// parameter so the planner can be tested without real files.
    pub fn offer(
        &mut self,
        candidate: Candidate,
        file: FileId,
        inspect: impl FnOnce(&Path) -> Result<TlsSymbols, elf::ElfError>,
    ) -> Offer {
        if self.seen.contains_key(&file) {
            return Offer::Known;
        }
        match inspect(&candidate.open_path) {
            Ok(symbols) if symbols.is_hookable() => {
                self.seen.insert(file, None);
                Offer::Attach(candidate, file, symbols)
            }
            Ok(TlsSymbols { unhookable: Some(reason), .. }) => {
                self.seen.insert(file, Some(self.targets.len()));
                self.targets.push(Target {
                    path: candidate.display_path,
                    file,
                    reason: candidate.reason,
                    symbols: Vec::new(),
                    probes: 0,
                    error: Some(reason.clone()),
                });
                Offer::Unhookable(reason)
            }
            Ok(_) => {
                self.seen.insert(file, None);
                Offer::Known
            }
            Err(error) => {
                // Unreadable or not ELF: remember it, or every exec would retry.
                tracing::debug!(%error, "not inspecting");
                self.seen.insert(file, None);
                Offer::Known
            }
        }
    }

    /// Records the attach result for a file returned by [`Planner::offer`].
    pub fn attached(&mut self, candidate: Candidate, file: FileId, symbols: &TlsSymbols, probes: usize, error: Option<String>) {
        self.seen.insert(file, Some(self.targets.len()));
        self.targets.push(Target {
            path: candidate.display_path,
            file,
            reason: candidate.reason,
            symbols: symbols.offsets.iter().map(|(name, off)| ((*name).to_owned(), *off)).collect(),
            probes,
            error,
        });
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Records that a named TLS library (linker cache, config) cannot be opened, as
    /// a target with its error. True the first time for its path, so a file missing
    /// for good is counted once, not at every rescan.
    pub fn note_unreadable(&mut self, candidate: &Candidate, error: &str) -> bool {
        if self.targets.iter().any(|t| t.path == candidate.display_path && t.probes == 0 && t.error.is_some()) {
            return false;
        }
        self.targets.push(Target {
            path: candidate.display_path.clone(),
            file: FileId { dev: 0, ino: 0 },
            reason: candidate.reason.clone(),
            symbols: Vec::new(),
            probes: 0,
            error: Some(format!("cannot open: {error}")),
        });
        true
    }

    /// For a named library (linker cache, config) whose path was hooked as another
    /// file: that file's identity. The path now holds a new file (an upgrade
    /// replaced it); the new one is new to [`Planner::offer`] and gets hooked, while
    /// processes still running the old one keep their probes on it.
    pub fn replaced(&self, candidate: &Candidate, file: FileId) -> Option<FileId> {
        if !matches!(candidate.reason, Reason::LinkerCache | Reason::Config) || self.seen.contains_key(&file) {
            return None;
        }
        self.targets.iter().rev().find(|t| t.path == candidate.display_path && t.probes > 0 && t.file != file).map(|t| t.file)
    }
}

/// The identity of an open file.
pub fn file_id_of(file: &std::fs::File) -> std::io::Result<FileId> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(FileId { dev: meta.dev(), ino: meta.ino() })
}

/// Executable file mappings in a `/proc/PID/maps` text: unique paths, in order.
pub fn mapped_executables(maps: &str) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let mut fields = line.splitn(6, ' ');
        let perms = fields.nth(1).unwrap_or("");
        let path = fields.nth(3).unwrap_or("").trim_start();
        if !perms.contains('x') || !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        if !paths.iter().any(|p| p == path) {
            paths.push(path.to_owned());
        }
    }
    paths
}

/// `libssl` and `libgnutls` paths in `ldconfig -p` output.
pub fn linker_cache_tls_libraries(ldconfig: &str) -> Vec<PathBuf> {
    ldconfig
        .lines()
        .filter_map(|line| {
            let (name, path) = line.trim().split_once(" => ")?;
            (name.starts_with("libssl.so") || name.starts_with("libgnutls.so")).then(|| PathBuf::from(path.trim()))
        })
        .collect()
}

/// The candidates one process offers: its executable and its mapped code, reached
/// through its root so that containers' files are found.
pub fn process_candidates(proc_root: &Path, pid: u32) -> Vec<Candidate> {
    let dir = proc_root.join(pid.to_string());
    let comm = std::fs::read_to_string(dir.join("comm")).map(|c| c.trim_end().to_owned()).unwrap_or_default();
    let mut out = Vec::new();
    // Kernel threads have no exe link and no maps: nothing to hook.
    if let Ok(exe) = std::fs::read_link(dir.join("exe")) {
        out.push(Candidate {
            open_path: dir.join("exe"),
            display_path: exe.display().to_string(),
            reason: Reason::Executable { pid, comm: comm.clone() },
        });
    }
    if let Ok(maps) = std::fs::read_to_string(dir.join("maps")) {
        for path in mapped_executables(&maps) {
            out.push(Candidate {
                open_path: dir.join("root").join(path.trim_start_matches('/')),
                display_path: path,
                reason: Reason::Mapped { pid, comm: comm.clone() },
            });
        }
    }
    out
}

/// Every numeric entry of `/proc`.
pub fn all_pids(proc_root: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(proc_root) else { return Vec::new() };
    entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// Candidates known before any process is looked at: the linker cache's libssl
/// (so processes that load it later are covered from their first call) and the
/// configured extra targets.
pub fn startup_candidates(extra: &[PathBuf]) -> Vec<Candidate> {
    let ldconfig = std::process::Command::new("ldconfig")
        .arg("-p")
        .output()
        .or_else(|_| std::process::Command::new("/sbin/ldconfig").arg("-p").output())
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    let cache = linker_cache_tls_libraries(&ldconfig).into_iter().map(|path| Candidate {
        display_path: path.display().to_string(),
        open_path: path,
        reason: Reason::LinkerCache,
    });
    let config = extra.iter().map(|path| Candidate {
        open_path: path.clone(),
        display_path: path.display().to_string(),
        reason: Reason::Config,
    });
    cache.chain(config).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a28000 r--p 00000000 fe:01 1180 /usr/bin/curl
55d0c0a28000-55d0c0a5c000 r-xp 00028000 fe:01 1180 /usr/bin/curl
7f1c2a000000-7f1c2a060000 r-xp 00020000 fe:01 2201 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2a100000-7f1c2a160000 r-xp 00020000 fe:01 2201 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2b000000-7f1c2b001000 r-xp 00000000 00:00 0 
7f1c2c000000-7f1c2c001000 r-xp 00000000 fe:01 77 /tmp/old lib.so (deleted)
7ffd5a3fe000-7ffd5a400000 r-xp 00000000 00:00 0                          [vdso]
";

    #[test]
    fn maps_yield_each_executable_file_once() {
        assert_eq!(
            mapped_executables(MAPS),
            vec!["/usr/bin/curl".to_owned(), "/usr/lib/x86_64-linux-gnu/libssl.so.3".to_owned()]
        );
    }

    #[test]
    fn linker_cache_lists_only_libssl_and_libgnutls() {
        let text = "5 libs found in cache `/etc/ld.so.cache'\n\
            \tlibssl3.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl3.so\n\
            \tlibssl.so.3 (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl.so.3\n\
            \tlibgnutls.so.30 (libc6,x86-64) => /lib/x86_64-linux-gnu/libgnutls.so.30\n\
            \tlibgnutls-dane.so.0 (libc6,x86-64) => /lib/x86_64-linux-gnu/libgnutls-dane.so.0\n\
            \tlibc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6\n";
        let want = ["/lib/x86_64-linux-gnu/libssl.so.3", "/lib/x86_64-linux-gnu/libgnutls.so.30"].map(PathBuf::from);
        assert_eq!(linker_cache_tls_libraries(text), want);
    }

    fn candidate(path: &str) -> Candidate {
        Candidate { open_path: path.into(), display_path: path.into(), reason: Reason::LinkerCache }
    }

    fn hookable() -> TlsSymbols {
        let mut s = TlsSymbols::default();
        s.offsets.insert("SSL_write", 0x100);
        s.offsets.insert("SSL_read", 0x200);
        s
    }

    #[test]
    fn planner_attaches_each_inode_once_whatever_the_path() {
        let mut planner = Planner::default();
        let id = FileId { dev: 1, ino: 2 };
        let Offer::Attach(c, f, s) = planner.offer(candidate("/lib/libssl.so.3"), id, |_| Ok(hookable())) else {
            panic!("first offer must attach")
        };
        planner.attached(c, f, &s, 4, None);
        let again = planner.offer(candidate("/usr/lib/libssl.so.3"), id, |_| panic!("must not re-inspect"));
        assert_eq!(again, Offer::Known);
        assert_eq!(planner.targets().len(), 1);
        assert_eq!(planner.targets()[0].probes, 4);
    }

    #[test]
    fn planner_remembers_files_without_tls() {
        let mut planner = Planner::default();
        let id = FileId { dev: 1, ino: 3 };
        assert_eq!(planner.offer(candidate("/bin/sh"), id, |_| Ok(TlsSymbols::default())), Offer::Known);
        assert_eq!(planner.offer(candidate("/bin/sh"), id, |_| panic!("cached")), Offer::Known);
        assert!(planner.targets().is_empty());
    }

    #[test]
    fn a_named_library_replaced_at_its_path_is_noticed_and_a_missing_one_noted_once() {
        let mut planner = Planner::default();
        let old = FileId { dev: 1, ino: 2 };
        let Offer::Attach(c, f, s) = planner.offer(candidate("/lib/libssl.so.3"), old, |_| Ok(hookable())) else { panic!("attach") };
        planner.attached(c, f, &s, 4, None);
        assert_eq!(planner.replaced(&candidate("/lib/libssl.so.3"), old), None, "the same file");
        let new = FileId { dev: 1, ino: 9 };
        assert_eq!(planner.replaced(&candidate("/lib/libssl.so.3"), new), Some(old));
        let mapped = Candidate { reason: Reason::Mapped { pid: 7, comm: "x".into() }, ..candidate("/lib/libssl.so.3") };
        assert_eq!(planner.replaced(&mapped, new), None, "a process's path may be another container's file");
        assert!(matches!(planner.offer(candidate("/lib/libssl.so.3"), new, |_| Ok(hookable())), Offer::Attach(..)));

        assert!(planner.note_unreadable(&candidate("/gone/libssl.so.3"), "No such file"));
        assert!(!planner.note_unreadable(&candidate("/gone/libssl.so.3"), "No such file"), "counted once");
        let gone = planner.targets().iter().find(|t| t.path == "/gone/libssl.so.3").expect("listed");
        assert_eq!((gone.probes, gone.error.as_deref()), (0, Some("cannot open: No such file")));
    }

    #[test]
    fn this_process_offers_its_executable() {
        let candidates = process_candidates(Path::new("/proc"), std::process::id());
        assert!(candidates.iter().any(|c| matches!(c.reason, Reason::Executable { .. })));
        assert!(candidates.iter().any(|c| matches!(c.reason, Reason::Mapped { .. })));
    }
}
