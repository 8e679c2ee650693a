//! GnuTLS (`libgnutls.so.30`): the record layer's send and receive, with the same
//! entry/return discipline as OpenSSL (see `openssl.rs`): writes and reads are
//! emitted at return, only when the call moved bytes, so a send that returns
//! `GNUTLS_E_AGAIN` and is repeated is emitted once.
//!
//! `gnutls_record_send` is a tail call into `gnutls_record_send2` since 3.6.3, so
//! user space hooks `send2` where it exists (covering both) and `send` only where it
//! does not; never both, or each write would be seen twice.

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use gauge_common::tls::kind;

use super::openssl::{save, take, write_entry};
use crate::{
    emit,
    maps::{READ_ARGS, SavedCall, WRITE_ARGS},
};

/// Return of `ssize_t gnutls_record_send*(...)` or `gnutls_record_recv(...)`: the
/// byte count, or a negative error (0 from recv is the peer's end of data).
fn finish_ssize(ctx: &RetProbeContext, calls: &LruHashMap<u64, SavedCall>, kind: u32) {
    let ret: i64 = ctx.ret();
    if let Some(call) = take(calls)
        && ret > 0
    {
        emit::call(kind, call.ssl, call.buf, ret.min(u32::MAX as i64) as u32);
    }
}

/// `ssize_t gnutls_record_send(gnutls_session_t session, const void *data, size_t data_size)`
/// and `gnutls_record_send2(session, data, data_size, size_t pad, unsigned flags)`.
#[uprobe]
pub fn gnutls_send_entry(ctx: ProbeContext) -> u32 {
    write_entry(&ctx, None, ctx.arg::<u64>(2).unwrap_or(0));
    0
}

#[uretprobe]
pub fn gnutls_send_return(ctx: RetProbeContext) -> u32 {
    finish_ssize(&ctx, &WRITE_ARGS, kind::WRITE);
    0
}

/// `ssize_t gnutls_record_recv(gnutls_session_t session, void *data, size_t data_size)`
#[uprobe]
pub fn gnutls_recv_entry(ctx: ProbeContext) -> u32 {
    save(&ctx, &READ_ARGS, None);
    0
}

#[uretprobe]
pub fn gnutls_recv_return(ctx: RetProbeContext) -> u32 {
    finish_ssize(&ctx, &READ_ARGS, kind::READ);
    0
}

/// `int gnutls_bye(gnutls_session_t session, gnutls_close_request_t how)` and
/// `void gnutls_deinit(gnutls_session_t session)`: the session is ending (and its
/// pointer may be reused).
#[uprobe]
pub fn gnutls_close_entry(ctx: ProbeContext) -> u32 {
    emit::marker(kind::CLOSE, ctx.arg::<u64>(0).unwrap_or(0));
    0
}
