//! Where to probe Go's `crypto/tls` in a Go executable: the entry past the
//! stack-growth check, and every RET instruction (Go code gets no uretprobes; see
//! `gauge-ebpf/src/probes/gotls.rs`). Found by decoding the function's machine code
//! (iced-x86): a byte scan for 0xC3 would also hit the insides of other instructions,
//! and a uprobe there corrupts the program.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

pub const WRITE: &str = "crypto/tls.(*Conn).Write";
pub const READ: &str = "crypto/tls.(*Conn).Read";
pub const CLOSE: &str = "crypto/tls.(*Conn).Close";
/// The Go functions Gauge hooks.
pub const SYMBOLS: [&str; 3] = [WRITE, READ, CLOSE];

/// Probe points of one Go function, as offsets from its first byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoFunction {
    /// The first instruction after the stack-growth check (0 when it has none). A
    /// call that must grow its stack runs `morestack` and re-enters at offset 0, so
    /// an entry probe there would fire twice for one call.
    pub body: u64,
    pub returns: Vec<u64>,
}

/// Decodes `code` (the function's bytes, first byte at virtual address `address`).
/// `None` when it cannot be decoded or has no RET: then it is not hooked at all,
/// since an entry without its returns would leave calls that never finish.
pub fn function(code: &[u8], address: u64) -> Option<GoFunction> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    let mut body = None;
    let mut checking = false;
    let mut returns = Vec::new();
    let mut index = 0;
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            return None;
        }
        let offset = instruction.ip().wrapping_sub(address);
        // The prologue: `cmp rsp|r12, [r14+16]` (the goroutine's stack guard) then
        // `jbe` to the morestack call at the end of the function.
        if index < 4 && body.is_none() {
            if checking && is_conditional_jump(instruction.mnemonic()) {
                body = Some(offset + instruction.len() as u64);
            }
            checking = instruction.mnemonic() == Mnemonic::Cmp && reads_stack_guard(&instruction);
        }
        if instruction.mnemonic() == Mnemonic::Ret {
            returns.push(offset);
        }
        index += 1;
    }
    (!returns.is_empty()).then(|| GoFunction { body: body.unwrap_or(0), returns })
}

/// The unsigned comparisons Go's stack check branches on (`jbe`; `jb`/`jae`/`ja` in
/// other compilers' layouts).
fn is_conditional_jump(mnemonic: Mnemonic) -> bool {
    matches!(mnemonic, Mnemonic::Jbe | Mnemonic::Jb | Mnemonic::Ja | Mnemonic::Jae)
}

fn reads_stack_guard(instruction: &Instruction) -> bool {
    (0..instruction.op_count()).any(|i| {
        instruction.op_kind(i) == OpKind::Memory && instruction.memory_base() == Register::R14 && instruction.memory_displacement64() == 16
    })
}

/// Go's function table (`.gopclntab`) of Go 1.18 and later (magic 0xfffffff0, and
/// 0xfffffff1 from 1.20): the functions named in `wanted`, as (name, address, size).
/// A binary stripped of `.symtab` (`-ldflags=-s`, common in images) keeps this
/// table, since the runtime needs it for stack traces.
pub fn pclntab_functions(table: &[u8], wanted: &[&'static str]) -> Vec<(&'static str, u64, u64)> {
    // Every offset comes from the file: all arithmetic on them is checked.
    let word = |at: usize| -> Option<u64> { Some(u64::from_le_bytes(table.get(at..at.checked_add(8)?)?.try_into().ok()?)) };
    let word32 = |at: usize| -> Option<u32> { Some(u32::from_le_bytes(table.get(at..at.checked_add(4)?)?.try_into().ok()?)) };
    let header = || -> Option<(usize, u64, usize, usize)> {
        let magic = word32(0)?;
        // 8-byte pointers and the 1.18+ layout only.
        if !matches!(magic, 0xffff_fff0 | 0xffff_fff1) || table.get(7) != Some(&8) {
            return None;
        }
        let nfunc = usize::try_from(word(8)?).ok()?;
        let text_start = word(24)?;
        let names = usize::try_from(word(32)?).ok()?;
        let functab = usize::try_from(word(64)?).ok()?;
        Some((nfunc, text_start, names, functab))
    };
    let Some((nfunc, text_start, names, functab)) = header() else { return Vec::new() };
    let mut found = Vec::new();
    // functab: nfunc + 1 pairs of (entry offset from text start, _func offset).
    for i in 0..nfunc.min(table.len() / 8) {
        let Some(at) = i.checked_mul(8).and_then(|o| functab.checked_add(o)) else { break };
        let (Some(entry), Some(func), Some(next)) = (word32(at), at.checked_add(4).and_then(word32), at.checked_add(8).and_then(word32)) else { break };
        let name_at = functab.checked_add(func as usize).and_then(|f| f.checked_add(4));
        let Some(name_off) = name_at.and_then(word32) else { continue };
        let Some(start) = names.checked_add(name_off as usize) else { continue };
        let Some(name) = table.get(start..).and_then(|rest| rest.split(|b| *b == 0).next()) else { continue };
        if let Some(w) = wanted.iter().find(|w| w.as_bytes() == name)
            && let Some(address) = text_start.checked_add(u64::from(entry))
        {
            found.push((*w, address, u64::from(next.saturating_sub(entry))));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of two functions laid out as Go 1.18+ writes it.
    fn table() -> Vec<u8> {
        let mut t = vec![0u8; 0x48];
        t[..4].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        t[6] = 1;
        t[7] = 8;
        let set = |t: &mut Vec<u8>, at: usize, v: u64| t[at..at + 8].copy_from_slice(&v.to_le_bytes());
        set(&mut t, 8, 2); // nfunc
        set(&mut t, 24, 0x401000); // text start
        set(&mut t, 32, 0x48); // function names
        let names = b"main.main\0crypto/tls.(*Conn).Write\0";
        t.extend_from_slice(names);
        let functab = t.len();
        set(&mut t, 64, functab as u64);
        // (entry, func) x 2, then the end entry; the _funcs follow.
        let funcs = 3 * 8;
        for (entry, func) in [(0x10u32, funcs), (0x80, funcs + 8), (0x200, 0)] {
            t.extend_from_slice(&entry.to_le_bytes());
            t.extend_from_slice(&(func as u32).to_le_bytes());
        }
        for (entry, name) in [(0x10u32, 0u32), (0x80, 10)] {
            t.extend_from_slice(&entry.to_le_bytes());
            t.extend_from_slice(&name.to_le_bytes());
        }
        t
    }

    #[test]
    fn functions_are_found_by_name_in_the_go_function_table() {
        assert_eq!(pclntab_functions(&table(), &SYMBOLS), [(WRITE, 0x401080, 0x180)]);
        let mut old = table();
        old[..4].copy_from_slice(&0xffff_fffau32.to_le_bytes());
        assert!(pclntab_functions(&old, &SYMBOLS).is_empty(), "Go 1.16/1.17 tables are not read");
        assert!(pclntab_functions(&table()[..40], &SYMBOLS).is_empty(), "a cut table is no table");
        let mut hostile = table();
        hostile[64..72].copy_from_slice(&u64::MAX.to_le_bytes()); // functab offset
        hostile[32..40].copy_from_slice(&(u64::MAX - 3).to_le_bytes()); // names offset
        assert!(pclntab_functions(&hostile, &SYMBOLS).is_empty(), "offsets past the end are no functions, not a panic");
    }

    #[test]
    fn the_body_starts_after_the_stack_check_and_every_ret_is_found() {
        // cmp rsp,[r14+0x10]; jbe +N; sub rsp,0x68; inc rbx (48 ff c3: a C3 that is
        // no RET); mov rbx,rax (48 89 c3); ret; xor eax,eax; ret; call morestack; jmp 0
        let code = [
            0x49, 0x3b, 0x66, 0x10, // cmp rsp,[r14+0x10]
            0x76, 0x10, // jbe +0x10
            0x48, 0x83, 0xec, 0x68, // sub rsp,0x68
            0x48, 0xff, 0xc3, // inc rbx
            0x48, 0x89, 0xc3, // mov rbx,rax
            0xc3, // ret
            0x31, 0xc0, // xor eax,eax
            0xc3, // ret
            0xe8, 0x00, 0x00, 0x00, 0x00, // call
            0xeb, 0xe5, // jmp back
        ];
        let f = function(&code, 0x1000).expect("decodes");
        assert_eq!(f, GoFunction { body: 6, returns: vec![16, 19] });
    }

    #[test]
    fn a_large_frame_check_through_r12_is_recognised() {
        // lea r12,[rsp-0x68]; cmp r12,[r14+0x10]; jbe; ...; ret
        let code = [0x4c, 0x8d, 0x64, 0x24, 0x98, 0x4d, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0x10, 0x00, 0x00, 0x00, 0x90, 0xc3];
        assert_eq!(function(&code, 0), Some(GoFunction { body: 15, returns: vec![16] }));
    }

    #[test]
    fn without_a_stack_check_the_body_is_the_entry_and_no_ret_means_no_hook() {
        assert_eq!(function(&[0x90, 0xc3], 0), Some(GoFunction { body: 0, returns: vec![1] }));
        assert_eq!(function(&[0x90, 0x90], 0), None);
    }
}
