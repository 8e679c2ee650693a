//! Where OpenSSL is cheapest to probe. On x86 the kernel must single-step the
//! instruction under a uprobe out of line unless it can emulate it (calls, jumps,
//! pushes). OpenSSL 3.0's `SSL_write`, `SSL_write_ex`, `SSL_read` and `SSL_read_ex`
//! all begin with `sub rsp, N`, which it cannot: measured here, that step is most
//! of a probe's cost (about 14 us of 15 per hit, `cargo xtask bench probes`).
//!
//! Each pair funnels into one internal function, `ssl_write_internal(s, buf, num,
//! written)` or `ssl_read_internal(s, buf, num, readbytes)`, which has the `_ex`
//! arguments and results and begins with `push` (emulated). `SSL_write_ex` is just
//! `sub rsp, 8; call ssl_write_internal; ...`, so its arguments reach the internal
//! function in the same registers. Where the code proves exactly that, for this
//! build, the internal functions are hooked with the `_ex` programs instead of the
//! four exported ones (past an `endbr64` in CET builds); anywhere else the exported
//! functions are hooked as before.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

/// Names under which the internal functions are listed in `targets`.
pub const WRITE_INTERNAL: &str = "ssl_write_internal";
pub const READ_INTERNAL: &str = "ssl_read_internal";

/// A function's first byte (virtual address) and its code.
#[derive(Debug, Clone, Copy)]
pub struct Function<'a> {
    pub address: u64,
    pub code: &'a [u8],
}

/// The internal function that `ex` forwards to unchanged and that `plain` calls too,
/// when both are so and it begins with an instruction the kernel emulates; its
/// virtual address. `code_at(address)` gives the first bytes of the target.
pub fn shared_internal<'c>(plain: Function<'_>, ex: Function<'_>, code_at: impl Fn(u64) -> Option<&'c [u8]>) -> Option<u64> {
    let target = forwarded_call(ex)?;
    if !calls(plain, target) {
        return None;
    }
    emulated_entry(code_at(target)?).map(|skip| target + skip)
}

/// `sub rsp, imm` then `call rel32` (after an `endbr64` in CET builds): the call
/// sees the caller's arguments in the same registers (nothing else ran), and the
/// stack pointer moved only by the constant the call target's frame does not
/// depend on.
fn forwarded_call(ex: Function<'_>) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, ex.code, ex.address, DecoderOptions::NONE);
    let mut first = decoder.decode();
    if first.mnemonic() == Mnemonic::Endbr64 {
        first = decoder.decode();
    }
    let is_sub_rsp = first.mnemonic() == Mnemonic::Sub
        && first.op0_kind() == OpKind::Register
        && first.op0_register() == Register::RSP
        && matches!(first.op1_kind(), OpKind::Immediate8to64 | OpKind::Immediate32to64);
    if !is_sub_rsp {
        return None;
    }
    let second = decoder.decode();
    (second.mnemonic() == Mnemonic::Call && second.op0_kind() == OpKind::NearBranch64).then(|| second.near_branch64())
}

/// Whether `function` has a direct call to `target` anywhere in its code.
fn calls(function: Function<'_>, target: u64) -> bool {
    let mut decoder = Decoder::with_ip(64, function.code, function.address, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            return false;
        }
        if instruction.mnemonic() == Mnemonic::Call && instruction.op0_kind() == OpKind::NearBranch64 && instruction.near_branch64() == target {
            return true;
        }
    }
    false
}

/// Where to probe a function that begins with `push r64`, which x86 uprobes
/// emulate rather than single-step: 0, or past a CET build's `endbr64` (which moves
/// nothing, so a return probe there still finds the return address at `[rsp]`).
fn emulated_entry(code: &[u8]) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut first = decoder.decode();
    if first.mnemonic() == Mnemonic::Endbr64 {
        first = decoder.decode();
    }
    (first.code() == Code::Push_r64).then(|| first.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    // OpenSSL 3.0.19 as Debian 12 builds it (libssl.so.3), re-based at 0x1000.
    /// SSL_write_ex: sub rsp,8; call 0x1100; xor edx,edx; test eax,eax; ...
    const EX: &[u8] = b"\x48\x83\xec\x08\xe8\xf7\x00\x00\x00\x31\xd2\x85\xc0";
    /// SSL_write: sub rsp,0x18; mov rax,fs:[0x28]; mov [rsp+8],rax; xor eax,eax;
    /// lea rcx,[rsp]; call 0x1100; ...
    fn plain() -> Vec<u8> {
        let mut code = b"\x48\x83\xec\x18\x64\x48\x8b\x04\x25\x28\x00\x00\x00\x48\x89\x44\x24\x08\x31\xc0\x48\x89\xe1".to_vec();
        let at = 0x2000 + code.len() as u64 + 5;
        code.push(0xe8);
        code.extend_from_slice(&((0x1100_i64 - at as i64) as i32).to_le_bytes());
        code.extend_from_slice(b"\x48\x83\xc4\x18\xc3");
        code
    }
    /// ssl_write_internal: push r14; push r13; ...
    const INTERNAL: &[u8] = b"\x41\x56\x41\x55\x41\x54";

    fn internal_at(address: u64) -> Option<&'static [u8]> {
        (address == 0x1100).then_some(INTERNAL)
    }

    #[test]
    fn a_forwarding_ex_and_a_plain_call_to_a_push_are_hooked_inside() {
        let plain = plain();
        let found = shared_internal(Function { address: 0x2000, code: &plain }, Function { address: 0x1000, code: EX }, internal_at);
        assert_eq!(found, Some(0x1100));
    }

    #[test]
    fn anything_else_keeps_the_exported_entry_points() {
        let plain = plain();
        let p = Function { address: 0x2000, code: &plain };
        // The _ex form sets up a register before its call (a later OpenSSL passing flags).
        let ex_with_flags = b"\x48\x83\xec\x08\x31\xc9\xe8\xf5\x00\x00\x00";
        assert_eq!(shared_internal(p, Function { address: 0x1000, code: ex_with_flags }, internal_at), None);
        // The plain form calls elsewhere.
        let other = Function { address: 0x2000, code: b"\x48\x83\xec\x18\xe8\x00\x10\x00\x00" };
        assert_eq!(shared_internal(other, Function { address: 0x1000, code: EX }, internal_at), None);
        // A CET build: endbr64 first in both; the probe goes past it, on the push.
        let cet_ex = b"\xf3\x0f\x1e\xfa\x48\x83\xec\x08\xe8\xf3\x00\x00\x00";
        let cet_internal = |address: u64| (address == 0x1100).then_some(&b"\xf3\x0f\x1e\xfa\x41\x56\x41\x55"[..]);
        assert_eq!(shared_internal(p, Function { address: 0x1000, code: cet_ex }, cet_internal), Some(0x1104));
        // The internal function begins with an instruction that is single-stepped anyway.
        let sub_first = |_: u64| Some(&b"\x48\x83\xec\x38"[..]);
        assert_eq!(shared_internal(p, Function { address: 0x1000, code: EX }, sub_first), None);
        // Garbage.
        assert_eq!(shared_internal(p, Function { address: 0x1000, code: b"\xff\xff" }, internal_at), None);
        assert_eq!(shared_internal(p, Function { address: 0x1000, code: b"" }, internal_at), None);
    }
}
