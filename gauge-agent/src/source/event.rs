//! The typed event every capture source emits.

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
        bytes: Vec<u8>,
    },
    /// The connection was shut down or freed.
    Close { connection: u64 },
    /// The process executed a new program.
    Exec,
    /// A chunk of an LLM request of a gated process, read at `SSL_write` entry: the
    /// process is stopped until the policy stage releases it.
    Held { connection: u64, call_len: u32, offset: u32, bytes: Vec<u8> },
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
    pub comm: String,
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

pub(crate) fn comm_string(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

impl TryFrom<&[u8]> for CaptureEvent {
    type Error = DecodeError;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        let RawRecord { header, data } = RawRecord::try_from(bytes)?;
        let TlsChunkHeader { timestamp_ns, connection, cgroup_id, tgid, pid, kind, call_len, offset, comm, .. } =
            header;
        let payload = match kind {
            kind::WRITE | kind::READ => Payload::Data {
                direction: if kind == kind::WRITE { Direction::Write } else { Direction::Read },
                connection,
                call_len,
                offset,
                bytes: data.to_vec(),
            },
            kind::CLOSE => Payload::Close { connection },
            kind::HELD => Payload::Held { connection, call_len, offset, bytes: data.to_vec() },
            kind::STOPPED => Payload::Stopped { connection, signal: offset },
            // RawRecord only accepts known kinds.
            _ => Payload::Exec,
        };
        Ok(Self { timestamp_ns, tgid, tid: pid, cgroup_id, comm: comm_string(&comm), payload })
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
        let event = CaptureEvent::try_from(bytes.as_slice()).expect("decodes");
        assert_eq!(event.comm, "python3");
        assert_eq!(event.connection_key(), Some((10, 0x55)));
        assert_eq!(
            event.payload,
            Payload::Data { direction: Direction::Read, connection: 0x55, call_len: 3, offset: 0, bytes: b"abc".to_vec() }
        );
    }
}
