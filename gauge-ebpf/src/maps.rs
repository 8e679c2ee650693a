//! Maps and globals shared by the probes. Names match `gauge_common::maps`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use gauge_common::{
    enforce::{ConnectionKey, Enforcement},
    tls::{CHUNK_BYTES, MAX_CALL_BYTES as HARD_MAX_CALL_BYTES, PlainSocket, TlsChunkHeader, stat},
};

/// Captured records. User space sets the real size at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// When a record last might have woken user space (see `emit::wakeup`). One slot
/// for the host, not per CPU: user space drains the whole ring whichever CPU woke it.
#[map]
pub static LAST_WAKEUP: Array<u64> = Array::with_max_entries(1, 0);

/// Loss and volume counters, per CPU so that no probe contends on a lock.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// One record under construction per CPU: too large for the 512-byte BPF stack.
#[map]
pub static SCRATCH: PerCpuArray<Chunk> = PerCpuArray::with_max_entries(1, 0);

/// Arguments saved at `SSL_write*` entry, keyed by pid_tgid, read at return. LRU so a
/// thread that dies mid-call cannot leak an entry forever.
#[map]
pub static WRITE_ARGS: LruHashMap<u64, SavedCall> = LruHashMap::with_max_entries(16384, 0);

/// Same for `SSL_read*`.
#[map]
pub static READ_ARGS: LruHashMap<u64, SavedCall> = LruHashMap::with_max_entries(16384, 0);

/// Go `crypto/tls` calls in flight, keyed by goroutine (see `probes/gotls.rs`).
#[map]
pub static GO_WRITE_ARGS: LruHashMap<GoCall, SavedCall> = LruHashMap::with_max_entries(16384, 0);

#[map]
pub static GO_READ_ARGS: LruHashMap<GoCall, SavedCall> = LruHashMap::with_max_entries(16384, 0);

/// A goroutine of a process: Go heaps sit at the same addresses in every process,
/// so the `g` pointer alone is not unique on the host.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoCall {
    pub tgid: u32,
    pub _pad: u32,
    pub goroutine: u64,
}

/// Ports whose plain-HTTP connections are captured (host order); user space only.
#[map]
pub static PLAIN_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(64, 0);

/// Successful `listen(2)` calls (see `gauge_common::maps::LISTENS`).
#[map]
pub static LISTENS: Array<u64> = Array::with_max_entries(1, 0);

/// The socket of a `connect` to a listed port, between its entry and exit.
#[map]
pub static PLAIN_CONNECTING: LruHashMap<u64, u32> = LruHashMap::with_max_entries(4096, 0);

/// Sockets connected to a listed port -> their connection id (see `probes/plain.rs`).
#[map]
pub static PLAIN_FDS: LruHashMap<PlainSocket, u64> = LruHashMap::with_max_entries(65536, 0);

/// A read or write on such a socket, between syscall entry and exit, by pid_tgid.
#[map]
pub static PLAIN_IO: LruHashMap<u64, PlainCall> = LruHashMap::with_max_entries(16384, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PlainCall {
    pub connection: u64,
    pub buf: u64,
    /// The length asked for; for `writev`, the number of iovecs.
    pub count: u64,
    pub kind: u32,
    pub vectored: u32,
}

/// Processes under a policy (tgid -> what to enforce); written by user space only.
#[map]
pub static ENFORCE: HashMap<u32, Enforcement> = HashMap::with_max_entries(16384, 0);

/// How many entries `ENFORCE` holds, kept by user space (see [`any_enforced`]).
#[map]
pub static ENFORCED: Array<u64> = Array::with_max_entries(1, 0);

/// Whether any process is under a policy. When none is, the probes skip their
/// `ENFORCE` lookups: a hash lookup at every write's entry and every record's
/// output, where this array read is inlined by the verifier. User space raises
/// the count after an entry is in and lowers it after one is out, so a nonzero
/// count never hides an entry (docs/PERFORMANCE.md section 1).
#[inline(always)]
pub fn any_enforced() -> bool {
    ENFORCED.get(0).is_some_and(|count| *count != 0)
}

/// Connections user space recognised as LLM traffic. LRU: closed connections are
/// never removed explicitly.
#[map]
pub static LLM_CONNECTIONS: LruHashMap<ConnectionKey, u8> = LruHashMap::with_max_entries(65536, 0);

/// Bytes each process put on the ring in its current window, counted only while
/// the ring is filling up. Racy across CPUs by design: a fair share needs an
/// estimate, not an exact count, and atomics would cost every probe hit.
#[map]
pub static SHARES: LruHashMap<u32, Share> = LruHashMap::with_max_entries(16384, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Share {
    pub window_start_ns: u64,
    pub bytes: u64,
}

/// Most bytes captured from one call; user space sets it from the config.
#[unsafe(no_mangle)]
static MAX_CALL_BYTES: u32 = HARD_MAX_CALL_BYTES;

/// The per-call cap, never above what the chunk loop can carry.
#[inline(always)]
pub fn max_call_bytes() -> u32 {
    // SAFETY: a plain global that the loader rewrites before the program runs; the
    // volatile read keeps the compiler from folding in the default.
    let configured = unsafe { core::ptr::read_volatile(&MAX_CALL_BYTES) };
    configured.min(HARD_MAX_CALL_BYTES)
}

/// The size of `EVENTS` in bytes; user space sets it with the ring's size at load.
/// A global, not `bpf_ringbuf_query(RING_SIZE)` at every record: a helper call less.
#[unsafe(no_mangle)]
static RING_BYTES: u64 = 16 * 1024 * 1024;

#[inline(always)]
pub fn ring_bytes() -> u64 {
    // SAFETY: as for MAX_CALL_BYTES.
    unsafe { core::ptr::read_volatile(&RING_BYTES) }
}

/// 1 when return probes are off: writes are then emitted at entry. Set at load.
#[unsafe(no_mangle)]
static WRITE_AT_ENTRY: u32 = 0;

#[inline(always)]
pub fn write_at_entry() -> bool {
    // SAFETY: as for MAX_CALL_BYTES.
    unsafe { core::ptr::read_volatile(&WRITE_AT_ENTRY) != 0 }
}

#[repr(C)]
pub struct Chunk {
    pub header: TlsChunkHeader,
    pub data: [u8; CHUNK_BYTES],
}

/// Arguments of an in-flight call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SavedCall {
    /// The `SSL*`.
    pub ssl: u64,
    /// The caller's plaintext buffer.
    pub buf: u64,
    /// `_ex` forms: where the byte count is written (`size_t *`); 0 otherwise.
    pub len_out: u64,
    /// 1 when enforcement stopped the process at this call's entry. A signal taken
    /// at a uprobe may make the kernel restart the probed instruction, and the entry
    /// probe then fires again for the same call: it must not hold it twice.
    pub stopped: u32,
    /// 1 from entry to return. A finished call's entry is marked, not deleted, and
    /// the thread's next call overwrites it in place: a map update or delete costs
    /// several times a lookup, and this runs on every read and write. The entries of
    /// an exiting thread are deleted then (`probes/process.rs`).
    pub live: u32,
}

impl SavedCall {
    pub const fn new(ssl: u64, buf: u64, len_out: u64) -> Self {
        Self { ssl, buf, len_out, stopped: 0, live: 1 }
    }
}

/// Saves a call at its entry: in place over the thread's last one when it has one.
#[inline(always)]
pub fn put<K>(calls: &LruHashMap<K, SavedCall>, key: &K, call: SavedCall) {
    let _ = replace(calls, key, call);
}

/// Saves a call at its entry and returns the one still in flight for `key`, if
/// any: one lookup, where a lookup and then `put` took two.
#[inline(always)]
pub fn replace<K>(calls: &LruHashMap<K, SavedCall>, key: &K, call: SavedCall) -> Option<SavedCall> {
    match calls.get_ptr_mut(key) {
        Some(slot) => {
            // SAFETY: a live map value, written only by its own thread's probes.
            let slot = unsafe { &mut *slot };
            let before = *slot;
            *slot = call;
            (before.live != 0).then_some(before)
        }
        None => {
            let _ = calls.insert(key, &call, 0);
            None
        }
    }
}

/// Ends the call in flight for `key`: returns it and marks its entry ended.
#[inline(always)]
pub fn end<K>(calls: &LruHashMap<K, SavedCall>, key: &K) -> Option<SavedCall> {
    let slot = calls.get_ptr_mut(key)?;
    // SAFETY: a live map value, written only by its own thread's probes.
    let slot = unsafe { &mut *slot };
    let call = *slot;
    slot.live = 0;
    (call.live != 0).then_some(call)
}

#[inline(always)]
pub fn count(index: u32, by: u64) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and a BPF program is not preempted on its CPU.
        unsafe { *slot += by };
    }
}
