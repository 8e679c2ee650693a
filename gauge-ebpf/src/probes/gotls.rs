//! Go's `crypto/tls` (`(*Conn).Write`, `(*Conn).Read`, `(*Conn).Close`), which Go
//! programs link statically and call with Go's register ABI (ABIInternal, amd64):
//! arguments in RAX (the `*Conn`), RBX (`b`'s pointer), RCX (`b`'s length); results in
//! RAX (`n`) and RBX/RCX (the error); R14 holds the current goroutine.
//!
//! No uretprobes: the Go runtime moves goroutine stacks, and a return address the
//! kernel rewrote would be copied to the new stack and crash the program. User space
//! instead attaches the entry program past the stack-growth check (so a call that
//! grows its stack and restarts is seen once) and the return program on each RET
//! instruction of the function, found by decoding it. Calls are matched by
//! goroutine, not thread: a goroutine blocked in `Read` may resume on another thread.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::uprobe, maps::LruHashMap, programs::ProbeContext};
use gauge_common::tls::{kind, stat};

use crate::{
    emit, enforce,
    maps::{GO_READ_ARGS, GO_WRITE_ARGS, GoCall, SavedCall, count, end, put, replace},
};

/// Go's ABIInternal registers at a probe on x86_64.
struct GoRegs {
    rax: u64,
    rbx: u64,
    rcx: u64,
    r14: u64,
}

#[inline(always)]
fn regs(ctx: &ProbeContext) -> GoRegs {
    // SAFETY: a uprobe's context is the probed thread's saved registers, which the
    // verifier lets a program read directly.
    let r = unsafe { &*ctx.regs };
    GoRegs { rax: r.rax, rbx: r.rbx, rcx: r.rcx, r14: r.r14 }
}

#[inline(always)]
fn key(goroutine: u64) -> GoCall {
    GoCall { tgid: (bpf_get_current_pid_tgid() >> 32) as u32, _pad: 0, goroutine }
}

#[inline(always)]
fn take(calls: &LruHashMap<GoCall, SavedCall>, goroutine: u64) -> Option<SavedCall> {
    // Removed, not marked ended as for threads: goroutines are many and short-lived,
    // and no exit event would clear them.
    let key = key(goroutine);
    let call = end(calls, &key);
    if call.is_some() {
        let _ = calls.remove(&key);
    }
    call
}

/// `func (c *Conn) Write(b []byte) (int, error)`, past the stack check: saves the
/// call and applies enforcement once per call (see `SavedCall::stopped`).
#[uprobe]
pub fn go_tls_write_entry(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    let key = key(r.r14);
    let mut call = SavedCall::new(r.rax, r.rbx, 0);
    let before = replace(&GO_WRITE_ARGS, &key, call);
    // The same call restarted after a stop is already decided.
    let restarted = before.is_some_and(|b| b.stopped != 0 && b.ssl == call.ssl && b.buf == call.buf);
    if restarted || enforce::at_write(call.ssl, call.buf, r.rcx) != enforce::AtWrite::Passed {
        call.stopped = 1;
        put(&GO_WRITE_ARGS, &key, call);
    }
    0
}

/// At a RET of Write or Read: the call's `n` bytes of `b` were sent or received.
#[inline(always)]
fn finish(ctx: &ProbeContext, calls: &LruHashMap<GoCall, SavedCall>, kind: u32) {
    let r = regs(ctx);
    match take(calls, r.r14) {
        Some(call) if (r.rax as i64) > 0 => emit::call(kind, call.ssl, call.buf, r.rax.min(u32::MAX as u64) as u32),
        Some(_) => {}
        None => count(stat::MISSING_ENTRY, 1),
    }
}

/// A RET of `(*Conn).Write`.
#[uprobe]
pub fn go_tls_write_return(ctx: ProbeContext) -> u32 {
    finish(&ctx, &GO_WRITE_ARGS, kind::WRITE);
    0
}

/// `func (c *Conn) Read(b []byte) (int, error)`, past the stack check.
#[uprobe]
pub fn go_tls_read_entry(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    put(&GO_READ_ARGS, &key(r.r14), SavedCall::new(r.rax, r.rbx, 0));
    0
}

/// A RET of `(*Conn).Read`: `b[:n]` holds plaintext.
#[uprobe]
pub fn go_tls_read_return(ctx: ProbeContext) -> u32 {
    finish(&ctx, &GO_READ_ARGS, kind::READ);
    0
}

/// `func (c *Conn) Close() error`: the connection is ending.
#[uprobe]
pub fn go_tls_close_entry(ctx: ProbeContext) -> u32 {
    emit::marker(kind::CLOSE, regs(&ctx).rax);
    0
}
