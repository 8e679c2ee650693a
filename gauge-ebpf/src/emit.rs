//! Turning one intercepted call into ring-buffer records.

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    generated::{bpf_get_current_comm, bpf_loop, bpf_probe_read_user, bpf_ringbuf_output},
};
use core::ffi::c_void;
use gauge_common::tls::{CHUNK_BYTES, HEADER_BYTES, MAX_CHUNKS_PER_CALL, kind, stat};

use crate::maps::{Chunk, ENFORCE, EVENTS, LAST_WAKEUP, SCRATCH, SHARES, Share, any_enforced, count, max_call_bytes, ring_bytes};

/// `bpf_ringbuf_query` flags.
const BPF_RB_AVAIL_DATA: u64 = 0;
/// `bpf_ringbuf_output` flags.
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// After a record that wakes user space, others skip the wakeup for this long;
/// user space, once woken, looks at the ring at each wakeup and whenever none came
/// for 200 ms, for a second (see `gauge-agent` `source::runtime::ring_reader`), so
/// it finds them without one. Shorter than that 200 ms, or a steady stream's
/// records would be found by the reader's own looks, a second thread wakeup. Only
/// metering waits on it: records that a process or a decision waits on wake user
/// space at once (`wakeup`). 100 ms, not 50: the daemon's CPU per streamed call
/// fell by about a third (docs/PERFORMANCE.md section 2).
const WAKEUP_INTERVAL_NS: u64 = 100_000_000;
/// The window over which a process's share of the ring is counted.
const SHARE_WINDOW_NS: u64 = 100_000_000;

/// Whether a data record of `bytes` from `tgid` may go on the ring.
///
/// One process must not blind the capture of all others by flooding the shared
/// ring. While the ring is less than a quarter full nothing is counted (the common
/// case costs two queries). Past a quarter, each process's bytes per 100 ms window
/// are counted; past half full, a process that has put more than an eighth of the
/// ring in its window is refused. Its window does not start afresh while the ring
/// stays over half full, so it is refused until user space has drained the ring
/// back under half, however slowly that goes: a flooder cannot take the rest of
/// the ring, which stays for processes sending ordinary amounts (they never reach
/// their share, so their windows start afresh as usual).
#[inline(always)]
fn admitted(tgid: u32, now_ns: u64, bytes: u64, size: u64, pending: u64) -> bool {
    if pending < size / 4 {
        return true;
    }
    let share = match SHARES.get_ptr_mut(tgid) {
        Some(share) => share,
        None => {
            let _ = SHARES.insert(tgid, Share { window_start_ns: now_ns, bytes: 0 }, 0);
            match SHARES.get_ptr_mut(tgid) {
                Some(share) => share,
                None => return true,
            }
        }
    };
    // SAFETY: a live map value; concurrent updates from another CPU only make the
    // estimate rougher (see SHARES).
    let share = unsafe { &mut *share };
    let pressed = pending > size / 2;
    let over = share.bytes > size / 8;
    // A start time ahead of `now` (another CPU just moved it) is no expiry.
    let expired = now_ns > share.window_start_ns && now_ns - share.window_start_ns > SHARE_WINDOW_NS;
    if expired && !(pressed && over) {
        share.window_start_ns = now_ns;
        share.bytes = 0;
    } else if pressed && over {
        return false;
    }
    share.bytes += bytes;
    true
}

/// Whether this record wakes user space. Waking it for every record cost about
/// 5x the kernel and agent time of waking it now and then; so data records wake it
/// at most once per [`WAKEUP_INTERVAL_NS`], or at once when the ring is an eighth
/// full. Records a stopped process or a new program waits on, and those of
/// processes under a policy, always wake it.
#[inline(always)]
fn wakeup(kind: u32, tgid: u32, now_ns: u64, size: u64, pending: u64) -> u64 {
    if kind == kind::HELD || kind == kind::STOPPED || kind == kind::EXEC || pending > size / 8 {
        return BPF_RB_FORCE_WAKEUP;
    }
    // A process under a policy races user space: its next request must meet the
    // decision this record leads to (a connection marked as LLM traffic, a budget
    // spent), so none of its records wait.
    // SAFETY: only tested for presence.
    if any_enforced() && unsafe { ENFORCE.get(&tgid) }.is_some() {
        return BPF_RB_FORCE_WAKEUP;
    }
    let Some(last) = LAST_WAKEUP.get_ptr_mut(0) else { return 0 };
    // SAFETY: a live map value; a race between CPUs costs at most an extra wakeup.
    let last = unsafe { &mut *last };
    if now_ns > *last && now_ns - *last < WAKEUP_INTERVAL_NS {
        return BPF_RB_NO_WAKEUP;
    }
    *last = now_ns;
    // Forced: the kernel's default wakes only when the reader has consumed up to
    // this record, which another CPU's earlier, still uncommitted record can
    // prevent; then nothing would wake it. (User space also looks once a second.)
    BPF_RB_FORCE_WAKEUP
}

/// The per-CPU scratch record with its header filled for the current task.
#[inline(always)]
fn scratch(kind: u32, connection: u64, call_len: u32) -> Option<&'static mut Chunk> {
    // SAFETY: per-CPU map value; nothing else on this CPU runs until we return.
    let chunk = unsafe { &mut *SCRATCH.get_ptr_mut(0)? };
    let pid_tgid = bpf_get_current_pid_tgid();
    let header = &mut chunk.header;
    // SAFETY: plain helper calls without pointer arguments.
    header.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    header.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    header.connection = connection;
    header.tgid = (pid_tgid >> 32) as u32;
    header.pid = pid_tgid as u32;
    header.kind = kind;
    header.call_len = call_len;
    header.offset = 0;
    header.chunk_len = 0;
    // Straight into the record: the safe wrapper's zeroed stack copy cost a
    // `memset` call and a byte-by-byte copy per record. On failure the helper
    // zeroes the field.
    // SAFETY: the destination is the header's comm field, in a map value.
    unsafe { bpf_get_current_comm(header.comm.as_mut_ptr().cast(), header.comm.len() as u32) };
    Some(chunk)
}

/// Sends `header + data[..len]`; counts it as submitted, lost or throttled. False
/// when throttled: the rest of the call would be too.
#[inline(always)]
fn output(chunk: &mut Chunk, len: usize) -> bool {
    // Only plaintext is rationed: markers are tiny, and a held request must reach
    // user space, whose process waits stopped for the decision.
    let data = chunk.header.kind == kind::WRITE || chunk.header.kind == kind::READ;
    let size = ring_bytes();
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA);
    if data && !admitted(chunk.header.tgid, chunk.header.timestamp_ns, (HEADER_BYTES + len) as u64, size, pending) {
        count(stat::EVENTS_THROTTLED, 1);
        count(stat::BYTES_THROTTLED, len as u64);
        return false;
    }
    // Re-clamp right before the helper call: the verifier needs the bound on the
    // exact register it checks, and the compiler may not keep an earlier one.
    let len = len & (2 * CHUNK_BYTES - 1);
    if len > CHUNK_BYTES {
        return true;
    }
    chunk.header.chunk_len = len as u32;
    let flags = wakeup(chunk.header.kind, chunk.header.tgid, chunk.header.timestamp_ns, size, pending);
    // SAFETY: `chunk` is a valid map value of HEADER_BYTES + CHUNK_BYTES bytes and
    // `len <= CHUNK_BYTES`.
    let ret = unsafe {
        bpf_ringbuf_output(
            (&raw const EVENTS).cast_mut().cast(),
            (chunk as *mut Chunk).cast(),
            (HEADER_BYTES + len) as u64,
            flags,
        )
    };
    if ret == 0 {
        count(stat::EVENTS_SUBMITTED, 1);
        count(stat::BYTES_SUBMITTED, len as u64);
    } else {
        count(stat::EVENTS_LOST, 1);
        count(stat::BYTES_LOST, len as u64);
    }
    true
}

/// State of one call's copy loop, on the caller's stack.
#[repr(C)]
struct CopyLoop {
    buf: u64,
    cap: u32,
    _pad: u32,
}

/// Emits the plaintext of a completed `SSL_write`/`SSL_read` as chunks of at most
/// [`CHUNK_BYTES`], up to the per-call cap. Bytes past the cap, or that cannot be
/// read, are counted; user space sees the gap as `offset + chunk_len < call_len`.
///
/// The chunks are produced by `bpf_loop` (kernel 5.17+): the verifier checks the
/// callback once, where an unrolled loop of 256 chunks exceeds its budget.
#[inline(always)]
pub fn call(kind: u32, connection: u64, buf: u64, call_len: u32) {
    let cap = call_len.min(max_call_bytes());
    if call_len > cap {
        count(stat::BYTES_TRUNCATED, u64::from(call_len - cap));
    }
    if scratch(kind, connection, call_len).is_none() {
        return;
    }
    let chunks = (cap as usize).div_ceil(CHUNK_BYTES).min(MAX_CHUNKS_PER_CALL) as u32;
    let mut state = CopyLoop { buf, cap, _pad: 0 };
    // SAFETY: the callback has the signature bpf_loop requires and only reads `state`.
    unsafe {
        bpf_loop(chunks, copy_chunk as *mut c_void, (&raw mut state).cast(), 0);
    }
}

/// One iteration: copies chunk `index` of the call into the scratch record and
/// outputs it. Returns 1 to stop the loop.
extern "C" fn copy_chunk(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `call` gave it, to a live CopyLoop.
    let state = unsafe { &*(ctx as *const CopyLoop) };
    let offset = (index as usize).wrapping_mul(CHUNK_BYTES);
    let cap = state.cap as usize;
    if offset >= cap {
        return 1;
    }
    // SAFETY: per-CPU map value, header already filled by `call` on this CPU.
    let Some(chunk) = SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p }) else {
        return 1;
    };
    let len = (cap - offset).min(CHUNK_BYTES);
    let len = len & (2 * CHUNK_BYTES - 1);
    if len > CHUNK_BYTES {
        return 1;
    }
    chunk.header.offset = offset as u32;
    // SAFETY: the destination is the scratch value's data array and
    // `len <= CHUNK_BYTES`; the source is user memory, checked by the helper.
    let read = unsafe {
        bpf_probe_read_user(chunk.data.as_mut_ptr().cast(), len as u32, (state.buf as usize + offset) as *const c_void)
    };
    if read != 0 {
        count(stat::READ_FAULTS, 1);
        return 1;
    }
    if output(chunk, len) {
        return 0;
    }
    // Refused: the rest of the call would be too, so it is counted and skipped.
    count(stat::BYTES_THROTTLED, (cap - offset - len) as u64);
    1
}

/// Emits a header-only record (connection close, exec).
#[inline(always)]
pub fn marker(kind: u32, connection: u64) {
    marker_with(kind, connection, 0);
}

/// A header-only record carrying one number in `offset` (the signal of STOPPED).
#[inline(always)]
pub fn marker_with(kind: u32, connection: u64, value: u32) {
    if let Some(chunk) = scratch(kind, connection, 0) {
        chunk.header.offset = value;
        let _ = output(chunk, 0);
    }
}
