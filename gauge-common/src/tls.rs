//! The record the eBPF programs put on the [`crate::maps::EVENTS`] ring buffer:
//! a fixed [`TlsChunkHeader`] immediately followed by `chunk_len` bytes of data.

/// Bytes of one chunk. A TLS record holds at most 16 KiB of plaintext, so one
/// `SSL_read` fits in one chunk; larger writes are split into several.
pub const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks one call may produce: the hard ceiling of the per-call capture cap.
pub const MAX_CHUNKS_PER_CALL: usize = 256;
/// The most bytes of one call that can ever be captured (4 MiB).
pub const MAX_CALL_BYTES: u32 = (CHUNK_BYTES * MAX_CHUNKS_PER_CALL) as u32;
/// Bytes of the task's `comm`.
pub const COMM_BYTES: usize = 16;

/// What a record describes. Plain `u32` constants, not an enum: an enum with an
/// unexpected discriminant read from kernel memory is undefined behaviour.
pub mod kind {
    /// Plaintext the process handed to `SSL_write`/`SSL_write_ex` (sent).
    pub const WRITE: u32 = 1;
    /// Plaintext `SSL_read`/`SSL_read_ex` returned to the process (received).
    pub const READ: u32 = 2;
    /// `SSL_shutdown`/`SSL_free` on the connection: its state can be freed.
    pub const CLOSE: u32 = 3;
    /// A process called `execve`; the data is the executed file's path.
    pub const EXEC: u32 = 4;
    /// An LLM request of a gated process, read at `SSL_write` entry: the process was
    /// stopped (SIGSTOP) before the bytes left, until user space decides.
    pub const HELD: u32 = 5;
    /// An LLM request of a process over a limit: it was signalled at `SSL_write`
    /// entry (the signal is in `offset`), the bytes did not leave.
    pub const STOPPED: u32 = 6;
}

/// Header of every ring-buffer record. 64 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsChunkHeader {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    /// The `SSL*` of the call: stable for the connection's life, reused after `SSL_free`.
    pub connection: u64,
    /// cgroup v2 id of the calling task (`bpf_get_current_cgroup_id`).
    pub cgroup_id: u64,
    /// Process id (thread group id).
    pub tgid: u32,
    /// Thread id.
    pub pid: u32,
    /// One of the [`kind`] constants.
    pub kind: u32,
    /// Bytes the call moved in total (its return value), before any cap.
    pub call_len: u32,
    /// Offset of this chunk's first byte within the call.
    pub offset: u32,
    /// Bytes of data that follow this header in the record.
    pub chunk_len: u32,
    /// The calling thread's name, NUL-padded.
    pub comm: [u8; COMM_BYTES],
}

pub const HEADER_BYTES: usize = core::mem::size_of::<TlsChunkHeader>();
const _: () = assert!(HEADER_BYTES == 64);

/// Indexes of the per-CPU counters in [`crate::maps::STATS`].
pub mod stat {
    /// Records written to the ring buffer.
    pub const EVENTS_SUBMITTED: u32 = 0;
    /// Data bytes in those records.
    pub const BYTES_SUBMITTED: u32 = 1;
    /// Records lost because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 2;
    /// Data bytes in the lost records.
    pub const BYTES_LOST: u32 = 3;
    /// Bytes of calls beyond the per-call cap, never captured.
    pub const BYTES_TRUNCATED: u32 = 4;
    /// Chunks whose user memory could not be read.
    pub const READ_FAULTS: u32 = 5;
    /// Return probes that found no saved arguments (attached mid-call).
    pub const MISSING_ENTRY: u32 = 6;
    /// Data records refused because their process took more than its share of a
    /// ring that is filling up (see `gauge-ebpf` `emit::admitted`).
    pub const EVENTS_THROTTLED: u32 = 7;
    /// Data bytes in those records.
    pub const BYTES_THROTTLED: u32 = 8;
    /// Number of counters.
    pub const COUNT: u32 = 9;
}

/// Key of the `PLAIN_FDS` map: a socket of a process, connected to a port listed for
/// plain-HTTP capture. User space writes it too, for connections made before the
/// daemon started.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PlainSocket {
    pub tgid: u32,
    pub fd: u32,
}
