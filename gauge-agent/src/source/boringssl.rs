//! BoringSSL linked into an executable and hidden (no `SSL_*` symbol): Bun, hence
//! Claude Code. Its `SSL_write` and `SSL_read` are found by the bytes they begin
//! with in known builds, and hooked with the OpenSSL probes (same arguments and
//! results). Each pattern must match exactly once in the executable code, or
//! nothing is hooked: a wrong offset would corrupt the program.
//!
//! `SSL_shutdown`/`SSL_free` are not found, so connections end by their HTTP
//! framing or by eviction rather than by a close record.

use memchr::memmem;

/// The first bytes of a function: `prefix`, then `skip` bytes that differ between
/// builds of the same code (an address), then `suffix`.
struct Pattern {
    prefix: &'static [u8],
    skip: usize,
    suffix: &'static [u8],
}

/// A build whose functions are known by their bytes.
struct Build {
    name: &'static str,
    write: Pattern,
    read: Pattern,
}

/// Seen in Bun 1.4.5 for linux-x64 (BoringSSL as Bun vendors it, built by its clang).
/// `SSL_write`: push rbp; mov rbp,rsp; push r15..rbx; sub rsp,0x18; mov r15d,edx;
/// mov r14,rsi; mov rbx,rdi; mov rax,[rdi+0x30]; ... `SSL_read`, with `SSL_peek`
/// inlined: the same pushes, `cmp qword [rdi+0x98],0` (the QUIC check), then an
/// error call whose file-name address differs per build.
const KNOWN: [Build; 1] = [Build {
    name: "Bun 1.4 (linux-x64)",
    write: Pattern {
        prefix: b"\x55\x48\x89\xe5\x41\x57\x41\x56\x41\x55\x41\x54\x53\x48\x83\xec\x18\x41\x89\xd7\x49\x89\xf6\x48\x89\xfb\x48\x8b\x47\x30\xc7\x80",
        skip: 0,
        suffix: b"",
    },
    read: Pattern {
        prefix: b"\x55\x48\x89\xe5\x41\x57\x41\x56\x53\x50\x48\x83\xbf\x98\x00\x00\x00\x00\x74\x2e\xb9",
        skip: 4,
        suffix: b"\xbf\x10\x00\x00\x00\x31\xf6",
    },
}];

/// Whether an executable that has no OpenSSL symbols is worth scanning: one that
/// exports Node's addon API (`napi_*`), as JavaScript runtimes with a TLS stack
/// compiled in do. Node itself exports `SSL_*` and is found by symbol first.
pub fn worth_scanning(exported: &[&str]) -> bool {
    exported.contains(&"napi_create_function")
}

/// The file offsets of `SSL_write` and `SSL_read` in `code`, the executable
/// segment's bytes starting at file offset `code_offset`; else why not.
pub fn find(code: &[u8], code_offset: u64) -> Result<(&'static str, u64, u64), String> {
    for build in &KNOWN {
        if let (Some(write), Some(read)) = (only_match(code, &build.write), only_match(code, &build.read)) {
            return Ok((build.name, code_offset.saturating_add(write as u64), code_offset.saturating_add(read as u64)));
        }
    }
    Err("BoringSSL without symbols in a build Gauge does not know (see README, Which clients are seen)".into())
}

/// The one place `pattern` matches, if exactly one.
fn only_match(code: &[u8], pattern: &Pattern) -> Option<usize> {
    let mut found = memmem::find_iter(code, pattern.prefix).filter(|at| {
        let tail = at + pattern.prefix.len() + pattern.skip;
        code.get(tail..tail + pattern.suffix.len()) == Some(pattern.suffix)
    });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_with(pieces: &[&[u8]]) -> Vec<u8> {
        let mut code = vec![0xcc; 64];
        for piece in pieces {
            code.extend_from_slice(piece);
            code.extend_from_slice(&[0xcc; 16]);
        }
        code
    }

    fn read_bytes(address: [u8; 4]) -> Vec<u8> {
        [KNOWN[0].read.prefix, &address, KNOWN[0].read.suffix].concat()
    }

    #[test]
    fn each_function_is_found_once_whatever_the_address_inside() {
        let code = code_with(&[&read_bytes([1, 2, 3, 4]), KNOWN[0].write.prefix]);
        assert_eq!(find(&code, 0x1000), Ok(("Bun 1.4 (linux-x64)", 0x1000 + 64 + 32 + 16, 0x1000 + 64)));
    }

    #[test]
    fn a_pattern_matching_twice_or_a_wrong_tail_hooks_nothing() {
        let twice = code_with(&[&read_bytes([1, 2, 3, 4]), KNOWN[0].write.prefix, KNOWN[0].write.prefix]);
        assert!(find(&twice, 0).is_err());
        let mut wrong = read_bytes([1, 2, 3, 4]);
        *wrong.last_mut().expect("byte") = 0;
        assert!(find(&code_with(&[&wrong, KNOWN[0].write.prefix]), 0).is_err());
    }
}
