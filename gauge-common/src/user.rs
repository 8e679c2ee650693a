//! User-space side: `Pod` impls and decoding of raw ring-buffer records.

use crate::{
    enforce::{ConnectionKey, Enforcement},
    tls::{HEADER_BYTES, TlsChunkHeader, kind},
};

// SAFETY: TlsChunkHeader is repr(C), has only integer fields and no padding (asserted
// by its size), so every bit pattern is a valid value.
unsafe impl aya::Pod for TlsChunkHeader {}
// SAFETY: two u32s, no padding.
unsafe impl aya::Pod for Enforcement {}
// SAFETY: u32 + explicit u32 padding + u64, no implicit padding.
unsafe impl aya::Pod for ConnectionKey {}
// SAFETY: two u32s, no padding.
unsafe impl aya::Pod for crate::tls::PlainSocket {}

/// Why a raw record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than the {HEADER_BYTES}-byte header")]
    TooShort(usize),
    #[error("record kind {0} is unknown: agent and eBPF object are out of step, rebuild both")]
    UnknownKind(u32),
    #[error("record says {declared} data bytes but carries {actual}")]
    LengthMismatch { declared: u32, actual: usize },
}

/// A decoded record borrowing its data from the ring buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRecord<'a> {
    pub header: TlsChunkHeader,
    pub data: &'a [u8],
}

impl<'a> TryFrom<&'a [u8]> for RawRecord<'a> {
    type Error = DecodeError;

    fn try_from(bytes: &'a [u8]) -> Result<Self, Self::Error> {
        let (head, data) = bytes
            .split_at_checked(HEADER_BYTES)
            .ok_or(DecodeError::TooShort(bytes.len()))?;
        // SAFETY: `head` is exactly HEADER_BYTES long and TlsChunkHeader is Pod; the
        // read is unaligned because ring-buffer samples are only 8-byte aligned by
        // convention, not by contract.
        let header = unsafe { core::ptr::read_unaligned(head.as_ptr().cast::<TlsChunkHeader>()) };
        if !matches!(header.kind, kind::WRITE | kind::READ | kind::CLOSE | kind::EXEC | kind::HELD | kind::STOPPED) {
            return Err(DecodeError::UnknownKind(header.kind));
        }
        // The kernel may round a record up; only a record shorter than declared is broken.
        let declared = header.chunk_len as usize;
        let data = data.get(..declared).ok_or(DecodeError::LengthMismatch {
            declared: header.chunk_len,
            actual: data.len(),
        })?;
        Ok(Self { header, data })
    }
}

/// The header's bytes as the eBPF program lays them out; a record is these bytes
/// followed by the data (used by tests and replay tools to build records).
pub fn header_bytes(header: &TlsChunkHeader) -> [u8; HEADER_BYTES] {
    let mut bytes = [0u8; HEADER_BYTES];
    // SAFETY: TlsChunkHeader is Pod and exactly HEADER_BYTES long.
    unsafe {
        core::ptr::copy_nonoverlapping(
            (header as *const TlsChunkHeader).cast::<u8>(),
            bytes.as_mut_ptr(),
            HEADER_BYTES,
        )
    };
    bytes
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn header(kind: u32, chunk_len: u32) -> TlsChunkHeader {
        TlsChunkHeader {
            timestamp_ns: 7,
            connection: 0xdead_beef,
            cgroup_id: 42,
            tgid: 100,
            pid: 101,
            kind,
            call_len: 5,
            offset: 0,
            chunk_len,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    #[test]
    fn record_round_trips_through_encode_and_decode() {
        let h = header(kind::WRITE, 5);
        let mut bytes: Vec<u8> = header_bytes(&h).to_vec();
        bytes.extend_from_slice(b"hello");
        bytes.extend_from_slice(&[0, 0, 0]); // kernel padding is tolerated
        let rec = RawRecord::try_from(bytes.as_slice()).unwrap();
        assert_eq!(rec.header, h);
        assert_eq!(rec.data, b"hello");
    }

    #[test]
    fn short_unknown_and_truncated_records_are_errors() {
        assert_eq!(RawRecord::try_from(&[0u8; 10][..]), Err(DecodeError::TooShort(10)));
        let unknown = header_bytes(&header(99, 0));
        assert_eq!(RawRecord::try_from(&unknown[..]), Err(DecodeError::UnknownKind(99)));
        let truncated = header_bytes(&header(kind::READ, 8));
        assert_eq!(
            RawRecord::try_from(&truncated[..]),
            Err(DecodeError::LengthMismatch { declared: 8, actual: 0 })
        );
    }
}
