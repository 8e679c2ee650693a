//! OpenSSL (shared `libssl.so*` or linked statically, e.g. into node) and BoringSSL,
//! which keeps the same entry points.
//!
//! Writes are emitted at return and only when the call succeeded: node calls
//! `SSL_write` repeatedly with the same bytes while a handshake is pending, and only
//! the successful call sends them. Reads are emitted at return, when the buffer
//! holds the plaintext. Entry probes save the arguments per thread; return probes
//! always mark them ended (see `SavedCall::live`).
//!
//! When return probes are unsafe on this kernel (see `gauge-agent` `source::hazards`)
//! user space attaches none and sets `WRITE_AT_ENTRY`: writes are then emitted at
//! entry with the length asked for, so a write that fails (or is repeated while a
//! handshake is pending) is emitted all the same; reads are not seen at all.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use gauge_common::tls::{kind, stat};

use crate::{
    emit, enforce,
    maps::{READ_ARGS, SavedCall, WRITE_ARGS, count, end, put, replace, write_at_entry},
};

fn args(ctx: &ProbeContext, len_out_arg: Option<usize>) -> SavedCall {
    SavedCall::new(
        ctx.arg::<u64>(0).unwrap_or(0),
        ctx.arg::<u64>(1).unwrap_or(0),
        len_out_arg.and_then(|n| ctx.arg::<u64>(n)).unwrap_or(0),
    )
}

pub(crate) fn save(ctx: &ProbeContext, calls: &LruHashMap<u64, SavedCall>, len_out_arg: Option<usize>) {
    put(calls, &bpf_get_current_pid_tgid(), args(ctx, len_out_arg));
}

/// Entry of a write: saves the arguments and applies enforcement once per call
/// (see `SavedCall::stopped`).
pub(crate) fn write_entry(ctx: &ProbeContext, len_out_arg: Option<usize>, len: u64) {
    if write_at_entry() {
        // Nothing is saved: no return probe would ever remove it, and a stale entry
        // would make the next write with the same buffer look like a restarted one
        // and slip past enforcement. A restart after a stop (rare) is then held and
        // emitted twice, which errs on the side of holding.
        let ssl = ctx.arg::<u64>(0).unwrap_or(0);
        let buf = ctx.arg::<u64>(1).unwrap_or(0);
        // A blocked request is never sent, so it is not a write; a held one is,
        // unless the policy then acts on it.
        if enforce::at_write(ssl, buf, len) != enforce::AtWrite::Blocked {
            emit::call(kind::WRITE, ssl, buf, len.min(u32::MAX as u64) as u32);
        }
        return;
    }
    let key = bpf_get_current_pid_tgid();
    let mut call = args(ctx, len_out_arg);
    let before = replace(&WRITE_ARGS, &key, call);
    // The same call, restarted after the stop, is already decided.
    let restarted = before.is_some_and(|b| b.stopped != 0 && b.ssl == call.ssl && b.buf == call.buf);
    if restarted || enforce::at_write(call.ssl, call.buf, len) != enforce::AtWrite::Passed {
        call.stopped = 1;
        put(&WRITE_ARGS, &key, call);
    }
}

pub(crate) fn take(calls: &LruHashMap<u64, SavedCall>) -> Option<SavedCall> {
    let call = end(calls, &bpf_get_current_pid_tgid());
    if call.is_none() {
        count(stat::MISSING_ENTRY, 1);
    }
    call
}

/// Return of `int SSL_write(SSL *s, const void *buf, int num)` or
/// `int SSL_read(SSL *s, void *buf, int num)`: the result is the byte count.
fn finish_int(ctx: &RetProbeContext, calls: &LruHashMap<u64, SavedCall>, kind: u32) {
    let ret: i32 = ctx.ret();
    if let Some(call) = take(calls)
        && ret > 0
    {
        emit::call(kind, call.ssl, call.buf, ret as u32);
    }
}

/// Return of `int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)`
/// or `int SSL_read_ex(SSL *s, void *buf, size_t num, size_t *readbytes)`: 1 on
/// success, with the byte count stored through the last argument.
fn finish_ex(ctx: &RetProbeContext, calls: &LruHashMap<u64, SavedCall>, kind: u32) {
    let ret: i32 = ctx.ret();
    let Some(call) = take(calls) else { return };
    if ret != 1 || call.len_out == 0 {
        return;
    }
    // SAFETY: user memory read through the checked helper.
    let Ok(len) = (unsafe { bpf_probe_read_user(call.len_out as *const u64) }) else {
        count(stat::READ_FAULTS, 1);
        return;
    };
    if len > 0 {
        emit::call(kind, call.ssl, call.buf, len.min(u32::MAX as u64) as u32);
    }
}

/// `int SSL_write(SSL *s, const void *buf, int num)`
#[uprobe]
pub fn ssl_write_entry(ctx: ProbeContext) -> u32 {
    let num = ctx.arg::<u64>(2).unwrap_or(0) as u32 as i32;
    write_entry(&ctx, None, num.max(0) as u64);
    0
}

#[uretprobe]
pub fn ssl_write_return(ctx: RetProbeContext) -> u32 {
    finish_int(&ctx, &WRITE_ARGS, kind::WRITE);
    0
}

/// `int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)`
#[uprobe]
pub fn ssl_write_ex_entry(ctx: ProbeContext) -> u32 {
    write_entry(&ctx, Some(3), ctx.arg::<u64>(2).unwrap_or(0));
    0
}

#[uretprobe]
pub fn ssl_write_ex_return(ctx: RetProbeContext) -> u32 {
    finish_ex(&ctx, &WRITE_ARGS, kind::WRITE);
    0
}

/// `int SSL_read(SSL *s, void *buf, int num)`
#[uprobe]
pub fn ssl_read_entry(ctx: ProbeContext) -> u32 {
    save(&ctx, &READ_ARGS, None);
    0
}

#[uretprobe]
pub fn ssl_read_return(ctx: RetProbeContext) -> u32 {
    finish_int(&ctx, &READ_ARGS, kind::READ);
    0
}

/// `int SSL_read_ex(SSL *s, void *buf, size_t num, size_t *readbytes)`
#[uprobe]
pub fn ssl_read_ex_entry(ctx: ProbeContext) -> u32 {
    save(&ctx, &READ_ARGS, Some(3));
    0
}

#[uretprobe]
pub fn ssl_read_ex_return(ctx: RetProbeContext) -> u32 {
    finish_ex(&ctx, &READ_ARGS, kind::READ);
    0
}

/// `int SSL_shutdown(SSL *s)`: the connection is ending.
#[uprobe]
pub fn ssl_shutdown_entry(ctx: ProbeContext) -> u32 {
    emit::marker(kind::CLOSE, ctx.arg::<u64>(0).unwrap_or(0));
    0
}

/// `void SSL_free(SSL *s)`: the `SSL*` may be reused for another connection.
#[uprobe]
pub fn ssl_free_entry(ctx: ProbeContext) -> u32 {
    emit::marker(kind::CLOSE, ctx.arg::<u64>(0).unwrap_or(0));
    0
}
