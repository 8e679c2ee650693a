//! Finding TLS library entry points in ELF files (shared libraries and executables
//! that link OpenSSL/BoringSSL statically), as file offsets for uprobes.

use std::{collections::BTreeMap, fs::File, path::Path};

use object::{Object, ObjectSegment, ObjectSymbol};

/// The functions Gauge hooks, in the order they are looked up.
pub const OPENSSL_SYMBOLS: [&str; 6] =
    ["SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex", "SSL_shutdown", "SSL_free"];

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("{path} is not an ELF file Gauge can read: {reason}")]
    Parse { path: String, reason: String },
}

/// Entry points found in one file: symbol name -> file offset of its first instruction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSymbols {
    pub offsets: BTreeMap<&'static str, u64>,
}

impl TlsSymbols {
    /// A file is worth hooking when both directions can be seen.
    pub fn is_hookable(&self) -> bool {
        self.offsets.contains_key("SSL_write") && self.offsets.contains_key("SSL_read")
            || self.offsets.contains_key("SSL_write_ex") && self.offsets.contains_key("SSL_read_ex")
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
    // .dynsym first (what a shared library exports), then .symtab (unstripped static builds).
    for symbol in elf.dynamic_symbols().chain(elf.symbols()) {
        if !symbol.is_definition() || symbol.kind() != object::SymbolKind::Text {
            continue;
        }
        let Ok(name) = symbol.name() else { continue };
        // Versioned names (`SSL_write@@OPENSSL_3.0.0`) appear in some tables.
        let name = name.split('@').next().unwrap_or(name);
        let Some(wanted) = OPENSSL_SYMBOLS.iter().find(|s| **s == name) else { continue };
        if found.offsets.contains_key(wanted) {
            continue;
        }
        if let Some(offset) = file_offset(&elf, symbol.address()) {
            found.offsets.insert(wanted, offset);
        }
    }
    Ok(found)
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

/// Uprobes take file offsets: translate a virtual address through its load segment.
fn file_offset(elf: &object::File<'_>, address: u64) -> Option<u64> {
    elf.segments().find_map(|segment| {
        let start = segment.address();
        let (file_start, file_len) = segment.file_range();
        (address >= start && address - start < file_len).then(|| address - start + file_start)
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
        for name in OPENSSL_SYMBOLS {
            let offset = symbols.offsets.get(name).copied().unwrap_or_else(|| panic!("{name} missing"));
            assert!(offset > 0 && offset < std::fs::metadata(path).expect("stat").len());
        }
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
    fn files_without_openssl_are_not_hookable() {
        let symbols = inspect(Path::new("/bin/sh")).expect("sh is ELF");
        assert!(!symbols.is_hookable());
        assert!(inspect_bytes(b"not an elf").is_err());
    }
}
