//! Finding TLS library entry points in ELF files (shared libraries and executables
//! that link OpenSSL/BoringSSL statically; GnuTLS; Go's crypto/tls), as file offsets
//! for uprobes.

use std::{collections::BTreeMap, fs::File, path::Path};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

use super::{boringssl, golang, openssl};

/// OpenSSL's (and BoringSSL's) functions Gauge hooks.
pub const OPENSSL_SYMBOLS: [&str; 6] =
    ["SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex", "SSL_shutdown", "SSL_free"];
/// GnuTLS's. `gnutls_record_send` tail-calls `gnutls_record_send2` (3.6.3 on): where
/// both exist only `send2` is kept, so no write is seen twice.
pub const GNUTLS_SYMBOLS: [&str; 5] = ["gnutls_record_send2", "gnutls_record_send", "gnutls_record_recv", "gnutls_bye", "gnutls_deinit"];

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("{path} is not an ELF file Gauge can read: {reason}")]
    Parse { path: String, reason: String },
}

/// Entry points found in one file: symbol name -> file offset of its first instruction
/// (for Go functions, of the first past the stack check).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSymbols {
    pub offsets: BTreeMap<&'static str, u64>,
    /// Go functions only: file offsets of their RET instructions, probed instead of
    /// a uretprobe.
    pub returns: BTreeMap<&'static str, Vec<u64>>,
    /// Why a file with a TLS library compiled in cannot be hooked (listed in
    /// `targets` with it), e.g. BoringSSL without symbols in an unknown build.
    pub unhookable: Option<String>,
}

impl TlsSymbols {
    /// A file is worth hooking when both directions can be seen.
    pub fn is_hookable(&self) -> bool {
        let has = |name| self.offsets.contains_key(name);
        has("SSL_write") && has("SSL_read")
            || has("SSL_write_ex") && has("SSL_read_ex")
            || has(openssl::WRITE_INTERNAL) && has(openssl::READ_INTERNAL)
            || (has("gnutls_record_send2") || has("gnutls_record_send")) && has("gnutls_record_recv")
            || has(golang::WRITE) && has(golang::READ)
    }
}

/// Reads the file's symbols without loading it whole: executables such as node are
/// ~100 MB, and only the symbol tables and program headers are touched.
pub fn inspect(path: &Path) -> Result<TlsSymbols, ElfError> {
    let display = path.display().to_string();
    let file = File::open(path).map_err(|source| ElfError::Open { path: display.clone(), source })?;
    // SAFETY: the mapping is read-only and private; a concurrent truncation of the
    // file could fault, which is why only regular files from /proc maps and the
    // linker cache are inspected.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ElfError::Open { path: display.clone(), source })?;
    inspect_bytes(&map).map_err(|reason| ElfError::Parse { path: display, reason })
}

/// [`inspect`] over bytes already in memory.
pub fn inspect_bytes(data: &[u8]) -> Result<TlsSymbols, String> {
    let elf = object::File::parse(data).map_err(|e| e.to_string())?;
    let mut found = TlsSymbols::default();
    // (address, size) of OpenSSL's read and write functions, for `prefer_internal`.
    let mut functions: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
    // .dynsym first (what a shared library exports), then .symtab (unstripped static builds).
    for symbol in elf.dynamic_symbols().chain(elf.symbols()) {
        if !symbol.is_definition() || symbol.kind() != object::SymbolKind::Text {
            continue;
        }
        let Ok(name) = symbol.name() else { continue };
        // Versioned names (`SSL_write@@OPENSSL_3.0.0`) appear in some tables.
        let name = name.split('@').next().unwrap_or(name);
        let Some(wanted) = OPENSSL_SYMBOLS.iter().chain(&GNUTLS_SYMBOLS).chain(&golang::SYMBOLS).find(|s| **s == name) else { continue };
        if found.offsets.contains_key(wanted) {
            continue;
        }
        if golang::SYMBOLS.contains(wanted) {
            add_go_function(&elf, &mut found, wanted, symbol.address(), symbol.size());
        } else if let Some(offset) = file_offset(&elf, symbol.address()) {
            found.offsets.insert(wanted, offset);
            functions.insert(wanted, (symbol.address(), symbol.size()));
        }
    }
    // A Go binary stripped of .symtab still has its function table.
    if !found.offsets.contains_key(golang::WRITE)
        && let Some(table) = elf.section_by_name(".gopclntab").and_then(|s| s.data().ok())
    {
        for (name, address, size) in golang::pclntab_functions(table, &golang::SYMBOLS) {
            add_go_function(&elf, &mut found, name, address, size);
        }
    }
    prefer_internal(&elf, &mut found, &functions);
    if found.offsets.contains_key("gnutls_record_send2") {
        found.offsets.remove("gnutls_record_send");
    }
    if !found.is_hookable() {
        let exported: Vec<&str> = elf.dynamic_symbols().filter_map(|s| s.name().ok()).collect();
        if boringssl::worth_scanning(&exported) {
            find_hidden_boringssl(&elf, data, &mut found);
        }
    }
    Ok(found)
}

/// OpenSSL 3.0: hook the internal read and write functions, which begin with an
/// instruction the kernel emulates, in place of the four exported ones (see
/// `openssl.rs`); only where the code proves both directions funnel through them.
fn prefer_internal(elf: &object::File<'_>, found: &mut TlsSymbols, functions: &BTreeMap<&'static str, (u64, u64)>) {
    // Longer than any of these functions; the symbol size bounds it when known.
    const MOST: u64 = 512;
    let function = |name: &str| {
        let &(address, size) = functions.get(name)?;
        let size = if size == 0 { MOST } else { size.min(MOST) };
        Some(openssl::Function { address, code: code_at(elf, address, size)? })
    };
    let internal = |plain: &str, ex: &str| {
        openssl::shared_internal(function(plain)?, function(ex)?, |address| code_at(elf, address, 16)).and_then(|a| file_offset(elf, a))
    };
    let (Some(write), Some(read)) = (internal("SSL_write", "SSL_write_ex"), internal("SSL_read", "SSL_read_ex")) else { return };
    if write == read {
        return;
    }
    for name in ["SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex"] {
        found.offsets.remove(name);
    }
    found.offsets.insert(openssl::WRITE_INTERNAL, write);
    found.offsets.insert(openssl::READ_INTERNAL, read);
}

/// Bun and the like: BoringSSL's `SSL_write`/`SSL_read` found by their bytes in the
/// executable segment (see `boringssl.rs`).
fn find_hidden_boringssl(elf: &object::File<'_>, data: &[u8], found: &mut TlsSymbols) {
    const PF_X: u32 = 1;
    let code = elf.segments().find(|s| matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0));
    let Some((start, len)) = code.map(|s| s.file_range()) else { return };
    let Some(bytes) = usize::try_from(start).ok().zip(usize::try_from(len).ok()).and_then(|(s, l)| data.get(s..s.checked_add(l)?)) else { return };
    match boringssl::find(bytes, start) {
        Ok((build, write, read)) => {
            tracing::debug!(build, "BoringSSL without symbols found by its known bytes");
            found.offsets.insert("SSL_write", write);
            found.offsets.insert("SSL_read", read);
        }
        Err(reason) => found.unhookable = Some(reason),
    }
}

/// The file offset of function `name` defined in the file at `path` (either symbol
/// table), for a uprobe on it; `None` when the file does not define it (stripped).
pub fn function_offset(path: &Path, name: &str) -> Result<Option<u64>, ElfError> {
    let display = path.display().to_string();
    let file = File::open(path).map_err(|source| ElfError::Open { path: display.clone(), source })?;
    // SAFETY: as in `inspect`.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ElfError::Open { path: display.clone(), source })?;
    let elf = object::File::parse(&*map).map_err(|e| ElfError::Parse { path: display, reason: e.to_string() })?;
    let symbol = elf
        .dynamic_symbols()
        .chain(elf.symbols())
        .find(|s| s.is_definition() && s.kind() == object::SymbolKind::Text && s.name() == Ok(name));
    Ok(symbol.and_then(|s| file_offset(&elf, s.address())))
}

/// Adds the probe points of the Go function at `address` (`size` bytes), decoded from
/// its bytes; nothing when it cannot be decoded.
fn add_go_function(elf: &object::File<'_>, found: &mut TlsSymbols, name: &'static str, address: u64, size: u64) {
    let Some(function) = code_at(elf, address, size).and_then(|code| golang::function(code, address)) else { return };
    let at = |offset: u64| address.checked_add(offset).and_then(|a| file_offset(elf, a));
    let returns: Option<Vec<u64>> = function.returns.iter().map(|r| at(*r)).collect();
    if let (Some(entry), Some(returns)) = (at(function.body), returns) {
        found.offsets.insert(name, entry);
        found.returns.insert(name, returns);
    }
}

/// The `size` bytes at virtual address `address`, from the section holding them.
fn code_at<'a>(elf: &object::File<'a>, address: u64, size: u64) -> Option<&'a [u8]> {
    let section = elf.sections().find(|s| address >= s.address() && address - s.address() < s.size())?;
    let data = section.data().ok()?;
    let start = usize::try_from(address - section.address()).ok()?;
    data.get(start..start.checked_add(usize::try_from(size).ok()?)?)
}

/// Uprobes take file offsets: translate a virtual address through its load segment.
fn file_offset(elf: &object::File<'_>, address: u64) -> Option<u64> {
    elf.segments().find_map(|segment| {
        let start = segment.address();
        let (file_start, file_len) = segment.file_range();
        (address >= start && address - start < file_len).then(|| (address - start).checked_add(file_start)).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_libssl_exports_every_hooked_function() {
        let path = Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        if !path.exists() {
            return; // Not a Debian/Ubuntu x86_64 host; the kernel tests cover attach.
        }
        let symbols = inspect(path).expect("libssl parses");
        assert!(symbols.is_hookable());
        // Debian 12's OpenSSL 3.0: reads and writes at the internal functions (see
        // `openssl.rs`), the closes where they are exported.
        let names: Vec<&str> = symbols.offsets.keys().copied().collect();
        assert_eq!(names, ["SSL_free", "SSL_shutdown", openssl::READ_INTERNAL, openssl::WRITE_INTERNAL], "{symbols:?}");
        for (name, offset) in &symbols.offsets {
            assert!(*offset > 0 && *offset < std::fs::metadata(path).expect("stat").len(), "{name}");
        }
        // The internal functions lie outside the exported ones (they are called).
        let exported = |name| function_offset(path, name).expect("read").expect("exported");
        assert_ne!(symbols.offsets[openssl::WRITE_INTERNAL], exported("SSL_write_ex"));
    }

    #[test]
    fn node_exports_its_static_openssl() {
        let path = Path::new("/usr/bin/node");
        if !path.exists() {
            return; // node is not installed; the kernel tests say so if they need it.
        }
        let symbols = inspect(path).expect("node parses");
        assert!(symbols.is_hookable(), "node links OpenSSL statically: {symbols:?}");
    }

    #[test]
    fn gnutls_is_hooked_at_send2_recv_bye_and_deinit() {
        let path = Path::new("/usr/lib/x86_64-linux-gnu/libgnutls.so.30");
        if !path.exists() {
            return; // GnuTLS is not installed; the kernel test (gnutls-cli) needs it.
        }
        let symbols = inspect(path).expect("libgnutls parses");
        assert!(symbols.is_hookable());
        let names: Vec<&str> = symbols.offsets.keys().copied().collect();
        assert_eq!(names, ["gnutls_bye", "gnutls_deinit", "gnutls_record_recv", "gnutls_record_send2"], "send is a tail call into send2: only send2");
    }

    #[test]
    fn files_without_openssl_are_not_hookable() {
        let symbols = inspect(Path::new("/bin/sh")).expect("sh is ELF");
        assert!(!symbols.is_hookable());
        assert!(inspect_bytes(b"not an elf").is_err());
    }
}
