//! Plain HTTP to local model servers (Ollama, vLLM, llama.cpp...), from syscall
//! tracepoints: no TLS library to hook, so the sockets themselves are followed.
//!
//! A `connect` to a port user space lists in `PLAIN_PORTS` marks the socket
//! (tgid, fd) in `PLAIN_FDS` with a connection id of its own (the top bit set, so it
//! never equals an `SSL*`); then `write`/`sendto`/`writev` and `read`/`recvfrom` on
//! it are emitted at syscall exit with the byte count, and `close` ends it. Every
//! other socket and file costs one failed map lookup per call.
//!
//! No enforcement here: a signal raised at syscall entry is delivered only after
//! the syscall, when the bytes have left.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use gauge_common::tls::{PlainSocket, kind};

use crate::{
    emit,
    maps::{LISTENS, PLAIN_CONNECTING, PLAIN_FDS, PLAIN_IO, PLAIN_PORTS, PlainCall},
};

/// Syscall tracepoint fields: the arguments from offset 16, 8 bytes each; at exit
/// the return value at 16.
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const EINPROGRESS: i64 = 115;
/// The most iovecs of one `writev` emitted.
const MAX_IOVECS: u32 = 8;

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

#[inline(always)]
fn arg(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: reading the tracepoint's own record at a fixed offset of its format.
    unsafe { ctx.read_at::<u64>(offset) }.unwrap_or(0)
}

#[inline(always)]
fn socket(fd: u64) -> PlainSocket {
    PlainSocket { tgid: (bpf_get_current_pid_tgid() >> 32) as u32, fd: fd as u32 }
}

/// `connect(fd, addr, len)`: to a listed port? Remembered until its exit.
#[tracepoint]
pub fn plain_connect_enter(ctx: TracePointContext) -> u32 {
    let (fd, addr) = (arg(&ctx, ARG0), arg(&ctx, ARG1));
    // sockaddr_in and sockaddr_in6 both start with family then port (big-endian).
    // SAFETY: user memory read through the checked helper.
    let Ok(head) = (unsafe { bpf_probe_read_user(addr as *const [u8; 4]) }) else { return 0 };
    let family = u16::from_ne_bytes([head[0], head[1]]);
    let port = u16::from_be_bytes([head[2], head[3]]);
    // SAFETY: presence check only.
    if (family == AF_INET || family == AF_INET6) && unsafe { PLAIN_PORTS.get(&port) }.is_some() {
        let _ = PLAIN_CONNECTING.insert(&bpf_get_current_pid_tgid(), &(fd as u32), 0);
    }
    0
}

/// A connect that succeeded (or is under way, non-blocking) marks its socket.
#[tracepoint]
pub fn plain_connect_exit(ctx: TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: copied out before the entry is removed.
    let Some(fd) = (unsafe { PLAIN_CONNECTING.get(&key) }).copied() else { return 0 };
    let _ = PLAIN_CONNECTING.remove(&key);
    let ret = arg(&ctx, RET) as i64;
    if ret == 0 || ret == -EINPROGRESS {
        // SAFETY: plain helper call.
        let id = unsafe { bpf_ktime_get_ns() } | 1 << 63;
        let _ = PLAIN_FDS.insert(&socket(u64::from(fd)), &id, 0);
    }
    0
}

/// `write`/`sendto`/`read`/`recvfrom(fd, buf, len, ...)` on a marked socket: saved
/// for the exit. `vectored` for `writev(fd, iov, iovcnt)`.
#[inline(always)]
fn io_enter(ctx: &TracePointContext, kind: u32, vectored: bool) -> u32 {
    let fd = arg(ctx, ARG0);
    // SAFETY: copied out at once.
    let Some(connection) = (unsafe { PLAIN_FDS.get(&socket(fd)) }).copied() else { return 0 };
    let call = PlainCall { connection, buf: arg(ctx, ARG1), count: arg(ctx, ARG2), kind, vectored: u32::from(vectored) };
    let _ = PLAIN_IO.insert(&bpf_get_current_pid_tgid(), &call, 0);
    0
}

#[inline(always)]
fn io_exit(ctx: &TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: copied out before the entry is removed.
    let Some(call) = (unsafe { PLAIN_IO.get(&key) }).copied() else { return 0 };
    let _ = PLAIN_IO.remove(&key);
    let ret = arg(ctx, RET) as i64;
    if ret <= 0 {
        return 0;
    }
    if call.vectored == 0 {
        emit::call(call.kind, call.connection, call.buf, ret.min(u32::MAX as i64) as u32);
        return 0;
    }
    // The iovecs in order, until the bytes written are used up.
    let mut left = ret as u64;
    for i in 0..MAX_IOVECS {
        if left == 0 || u64::from(i) >= call.count {
            break;
        }
        // SAFETY: user memory read through the checked helper.
        let Ok(iov) = (unsafe { bpf_probe_read_user((call.buf as *const IoVec).wrapping_add(i as usize)) }) else { break };
        let len = iov.len.min(left);
        if len > 0 {
            emit::call(call.kind, call.connection, iov.base, len.min(u32::MAX as u64) as u32);
        }
        left -= len;
    }
    0
}

#[tracepoint]
pub fn plain_write_enter(ctx: TracePointContext) -> u32 {
    io_enter(&ctx, kind::WRITE, false)
}

#[tracepoint]
pub fn plain_writev_enter(ctx: TracePointContext) -> u32 {
    io_enter(&ctx, kind::WRITE, true)
}

#[tracepoint]
pub fn plain_read_enter(ctx: TracePointContext) -> u32 {
    io_enter(&ctx, kind::READ, false)
}

#[tracepoint]
pub fn plain_io_exit(ctx: TracePointContext) -> u32 {
    io_exit(&ctx)
}

/// `close(fd)` of a marked socket ends its connection.
#[tracepoint]
pub fn plain_close_enter(ctx: TracePointContext) -> u32 {
    let key = socket(arg(&ctx, ARG0));
    // SAFETY: copied out before the entry is removed.
    if let Some(connection) = (unsafe { PLAIN_FDS.get(&key) }).copied() {
        let _ = PLAIN_FDS.remove(&key);
        emit::marker(kind::CLOSE, connection);
    }
    0
}

/// A successful `listen(2)`: counted, so that user space, waiting for a local model
/// server (`capture.plain_http = "auto"`), reads the sockets tables only after a
/// new listener may have appeared, not every few seconds on a hunch (on a host
/// with many network namespaces that read costs milliseconds per namespace).
#[tracepoint]
pub fn plain_listen_exit(ctx: TracePointContext) -> u32 {
    if arg(&ctx, RET) == 0
        && let Some(count) = LISTENS.get_ptr_mut(0)
    {
        // SAFETY: a live map value; CPUs racing lose an increment, never the change.
        unsafe { *count = (*count).wrapping_add(1) };
    }
    0
}
