//! The typed event every capture source emits.

use bytes::{Bytes, BytesMut};
use gauge_common::{
    tls::{TlsChunkHeader, kind},
    user::{DecodeError, RawRecord},
};

/// Which way plaintext moved, seen from the monitored process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The process wrote it: a request.
    Write,
    /// The process read it: a response.
    Read,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A chunk of one `SSL_write`/`SSL_read` call.
    Data {
        direction: Direction,
        /// The `SSL*`; unique per process while the connection lives.
        connection: u64,
        /// Bytes the whole call moved; more than `offset + bytes.len()` when the call
        /// was cut by the per-call cap or a fault.
        call_len: u32,
        /// Offset of `bytes` within the call.
        offset: u32,
        bytes: Bytes,
    },
    /// The connection was shut down or freed.
    Close { connection: u64 },
    /// The process executed a new program.
    Exec,
    /// A chunk of an LLM request of a gated process, read at `SSL_write` entry: the
    /// process is stopped until the policy stage releases it.
    Held { connection: u64, call_len: u32, offset: u32, bytes: Bytes },
    /// A process over a limit was sent `signal` at an LLM request; nothing was sent.
    Stopped { connection: u64, signal: u32 },
}

/// One captured event with the identity of the task that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureEvent {
    /// CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub cgroup_id: u64,
    /// Thread name (`comm`).
    pub comm: Comm,
    pub payload: Payload,
}

impl CaptureEvent {
    /// `(tgid, connection)` for events on a connection.
    pub fn connection_key(&self) -> Option<(u32, u64)> {
        match self.payload {
            Payload::Data { connection, .. } | Payload::Close { connection } => Some((self.tgid, connection)),
            Payload::Exec | Payload::Held { .. } | Payload::Stopped { .. } => None,
        }
    }
}

/// A thread name as the kernel keeps it (at most 15 bytes), held inline: every
/// capture record carries one, and a `String` for it was an allocation per
/// event, about 3% of the daemon's CPU under a stream of calls.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm {
    bytes: [u8; COMM_BYTES],
    len: u8,
}

const COMM_BYTES: usize = 16;

impl Comm {
    /// From the kernel's NUL-padded bytes. Bytes that are not UTF-8 become U+FFFD,
    /// as far as they fit.
    pub fn from_kernel(raw: &[u8]) -> Self {
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        match std::str::from_utf8(&raw[..end]) {
            Ok(name) => Self::from(name),
            Err(_) => Self::from(String::from_utf8_lossy(&raw[..end]).as_ref()),
        }
    }

    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 characters are ever stored (`From<&str>`).
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl From<&str> for Comm {
    /// Cut at a character boundary to what fits.
    fn from(name: &str) -> Self {
        let mut len = name.len().min(COMM_BYTES);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        let mut bytes = [0; COMM_BYTES];
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        // len <= 16.
        Self { bytes, len: len as u8 }
    }
}

impl std::ops::Deref for Comm {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Comm {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Room taken at a time for the bytes of the events read from the ring: the
/// events of one pass share it, sliced, where each had an allocation of its own
/// (about 5% of the daemon's CPU under a stream of calls). It is freed when the
/// last event in it is.
const ARENA_BYTES: usize = 64 * 1024;
/// A record that does not fit in what is left of the arena gets an allocation of
/// its own while more than this is left, so that little of an arena is ever left
/// unused (and uncounted in the queue's byte budget).
const ARENA_SLACK: usize = 4 * 1024;

impl CaptureEvent {
    /// Decodes a kernel record, copying its bytes into `arena`.
    pub fn decode(record: &[u8], arena: &mut BytesMut) -> Result<Self, DecodeError> {
        let RawRecord { header, data } = RawRecord::try_from(record)?;
        let TlsChunkHeader { timestamp_ns, connection, cgroup_id, tgid, pid, kind, call_len, offset, comm, .. } =
            header;
        let mut bytes = || {
            if arena.capacity() < data.len() {
                if arena.capacity() > ARENA_SLACK {
                    return Bytes::copy_from_slice(data);
                }
                *arena = BytesMut::with_capacity(ARENA_BYTES.max(data.len()));
            }
            arena.extend_from_slice(data);
            arena.split().freeze()
        };
        let payload = match kind {
            kind::WRITE | kind::READ => Payload::Data {
                direction: if kind == kind::WRITE { Direction::Write } else { Direction::Read },
                connection,
                call_len,
                offset,
                bytes: bytes(),
            },
            kind::CLOSE => Payload::Close { connection },
            kind::HELD => Payload::Held { connection, call_len, offset, bytes: bytes() },
            kind::STOPPED => Payload::Stopped { connection, signal: offset },
            // RawRecord only accepts known kinds.
            _ => Payload::Exec,
        };
        Ok(Self { timestamp_ns, tgid, tid: pid, cgroup_id, comm: Comm::from_kernel(&comm), payload })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gauge_common::user::header_bytes;

    #[test]
    fn kernel_record_decodes_to_a_typed_event() {
        let header = TlsChunkHeader {
            timestamp_ns: 1,
            connection: 0x55,
            cgroup_id: 9,
            tgid: 10,
            pid: 11,
            kind: kind::READ,
            call_len: 3,
            offset: 0,
            chunk_len: 3,
            comm: *b"python3\0\0\0\0\0\0\0\0\0",
        };
        let mut bytes = header_bytes(&header).to_vec();
        bytes.extend_from_slice(b"abc");
        let mut arena = BytesMut::new();
        let event = CaptureEvent::decode(&bytes, &mut arena).expect("decodes");
        let again = CaptureEvent::decode(&bytes, &mut arena).expect("decodes");
        assert_eq!(again, event, "the arena's room is not the event's");
        // A record too large for what is left: its own allocation while much is left,
        // a new arena once little is.
        let mut big = header_bytes(&TlsChunkHeader { call_len: 60_000, chunk_len: 60_000, ..header }).to_vec();
        big.resize(big.len() + 60_000, b'x');
        let data = |event: CaptureEvent| match event.payload {
            Payload::Data { bytes, .. } => bytes,
            _ => panic!("data"),
        };
        data(CaptureEvent::decode(&big, &mut arena).expect("decodes"));
        let left = arena.capacity();
        assert!(left > ARENA_SLACK && left < 60_000, "{left}");
        assert_eq!(data(CaptureEvent::decode(&big, &mut arena).expect("decodes")).len(), 60_000);
        assert_eq!(arena.capacity(), left, "copied alone, the arena kept");
        arena.extend_from_slice(&vec![0; left - ARENA_SLACK / 2]);
        let _ = arena.split();
        data(CaptureEvent::decode(&big, &mut arena).expect("decodes"));
        assert_eq!(arena.capacity(), ARENA_BYTES - 60_000, "a new arena, the rest of it left");
        assert_eq!(event.comm, "python3");
        assert_eq!(&*Comm::from_kernel(b"py\xffthon\0\0"), "py\u{fffd}thon", "not UTF-8: replaced");
        assert_eq!(&*Comm::from("a-name-longer-than-sixteen"), "a-name-longer-th", "cut to what fits");
        assert_eq!(&*Comm::from("fifteen-bytes-\u{e9}"), "fifteen-bytes-\u{e9}", "16 bytes fit");
        assert_eq!(&*Comm::from("fifteen-bytes-a\u{e9}"), "fifteen-bytes-a", "cut at a character boundary");
        assert_eq!(event.connection_key(), Some((10, 0x55)));
        assert_eq!(
            event.payload,
            Payload::Data { direction: Direction::Read, connection: 0x55, call_len: 3, offset: 0, bytes: Bytes::from_static(b"abc") }
        );
    }
}
