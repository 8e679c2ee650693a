//! Incremental HTTP/2 frame decoder for one direction of a connection, with the
//! direction's HPACK state (`loona-hpack`).
//!
//! Yields header blocks (after CONTINUATION frames are joined and HPACK-decoded),
//! DATA payloads without padding, and stream resets. When the header table is
//! unknown (the agent attached mid-connection) or a block does not decode, the
//! direction is marked desynchronised: later header blocks are reported as
//! [`Event::HpackDesync`] instead of being trusted, since a wrong table yields
//! wrong headers rather than errors. DATA frames are still delivered.

use super::Headers;

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest frame buffered (the protocol allows 16 MiB; peers rarely exceed 16 KiB).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest frame accepted on a connection seen only from its middle: the default
/// SETTINGS_MAX_FRAME_SIZE, so that bytes merely shaped like frames are soon refused.
pub const MAX_FRAME_UNSYNCED: usize = 16 * 1024;
/// Largest header block assembled from CONTINUATION frames.
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// HPACK dynamic table size accepted from the peer's encoder: 16 times the 4 KiB
/// default that clients keep, so that a hostile connection cannot hold more.
const MAX_TABLE: usize = 64 << 10;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const PUSH_PROMISE: u8 = 5;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Headers { stream: u32, headers: Headers, end_stream: bool },
    Data { stream: u32, bytes: Vec<u8>, end_stream: bool },
    Reset { stream: u32 },
    GoAway,
    HpackDesync { stream: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum H2Error {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    FrameTooLarge(usize),
    #[error("header block exceeds {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLarge,
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("connection preface missing")]
    NoPreface,
}

pub struct Decoder {
    preface_left: usize,
    buf: Vec<u8>,
    hpack: loona_hpack::Decoder<'static>,
    /// A header block waiting for CONTINUATION frames: (stream, end_stream, block, is a push promise).
    pending_block: Option<(u32, bool, Vec<u8>, bool)>,
    desynced: bool,
    failed: bool,
    max_frame: usize,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("h2::Decoder").field("desynced", &self.desynced).field("failed", &self.failed).finish()
    }
}

impl Decoder {
    /// Bytes held: a partial frame, a header block waiting for CONTINUATION, and the
    /// HPACK table (estimated at the 4 KiB every peer starts with; it may grow to
    /// `MAX_TABLE` if both ends agree).
    pub fn buffered(&self) -> usize {
        const HPACK_TABLE: usize = 4096;
        self.buf.capacity() + self.pending_block.as_ref().map_or(0, |(_, _, block, _)| block.capacity()) + HPACK_TABLE
    }

    /// `client`: this direction starts with the connection preface. `in_sync`: the
    /// connection was seen from its start (otherwise the HPACK table is unknown).
    pub fn new(client: bool, in_sync: bool) -> Self {
        let mut hpack = loona_hpack::Decoder::new();
        hpack.set_max_allowed_table_size(MAX_TABLE);
        Self {
            preface_left: if client && in_sync { PREFACE.len() } else { 0 },
            buf: Vec::new(),
            hpack,
            pending_block: None,
            desynced: !in_sync,
            failed: false,
            max_frame: if in_sync { MAX_FRAME } else { MAX_FRAME_UNSYNCED },
        }
    }

    pub fn failed(&self) -> bool {
        self.failed
    }

    pub fn desynced(&self) -> bool {
        self.desynced
    }

    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<Event>) -> Result<(), H2Error> {
        if self.failed {
            return Ok(());
        }
        if self.preface_left > 0 {
            let seen = PREFACE.len() - self.preface_left;
            let n = self.preface_left.min(bytes.len());
            if bytes[..n] != PREFACE[seen..seen + n] {
                self.failed = true;
                return Err(H2Error::NoPreface);
            }
            self.preface_left -= n;
            bytes = &bytes[n..];
        }
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        let result = loop {
            let rest = &self.buf[start..];
            if rest.len() < 9 {
                break Ok(());
            }
            let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            if len > self.max_frame {
                break Err(H2Error::FrameTooLarge(len));
            }
            if rest.len() < 9 + len {
                break Ok(());
            }
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
            let payload = rest[9..9 + len].to_vec();
            start += 9 + len;
            if let Err(e) = self.frame(kind, flags, stream, &payload, out) {
                break Err(e);
            }
        };
        self.buf.drain(..start);
        if result.is_err() {
            self.failed = true;
            self.buf = Vec::new();
        }
        result
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8], out: &mut Vec<Event>) -> Result<(), H2Error> {
        if self.pending_block.is_some() && kind != CONTINUATION {
            return Err(H2Error::Malformed("interleaved header block"));
        }
        match kind {
            DATA => {
                let data = unpad(flags, payload).ok_or(H2Error::Malformed("DATA"))?;
                out.push(Event::Data { stream, bytes: data.to_vec(), end_stream: flags & END_STREAM != 0 });
            }
            HEADERS => {
                let mut block = unpad(flags, payload).ok_or(H2Error::Malformed("HEADERS"))?;
                if flags & PRIORITY != 0 {
                    block = block.get(5..).ok_or(H2Error::Malformed("HEADERS"))?;
                }
                self.start_block(stream, flags, block, false, out)?;
            }
            PUSH_PROMISE => {
                // Its header block must be decoded to keep the HPACK table in step.
                let block = unpad(flags, payload).and_then(|b| b.get(4..)).ok_or(H2Error::Malformed("PUSH_PROMISE"))?;
                self.start_block(stream, flags, block, true, out)?;
            }
            CONTINUATION => {
                let Some((s, end_stream, mut block, push)) = self.pending_block.take() else {
                    return Err(H2Error::Malformed("CONTINUATION"));
                };
                if s != stream {
                    return Err(H2Error::Malformed("CONTINUATION"));
                }
                if block.len() + payload.len() > MAX_HEADER_BLOCK {
                    return Err(H2Error::HeaderBlockTooLarge);
                }
                block.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    self.decode_block(stream, end_stream, &block, push, out);
                } else {
                    self.pending_block = Some((s, end_stream, block, push));
                }
            }
            RST_STREAM => out.push(Event::Reset { stream }),
            GOAWAY => out.push(Event::GoAway),
            _ => {}
        }
        Ok(())
    }

    fn start_block(&mut self, stream: u32, flags: u8, block: &[u8], push: bool, out: &mut Vec<Event>) -> Result<(), H2Error> {
        let end_stream = flags & END_STREAM != 0;
        if flags & END_HEADERS != 0 {
            self.decode_block(stream, end_stream, block, push, out);
        } else {
            if block.len() > MAX_HEADER_BLOCK {
                return Err(H2Error::HeaderBlockTooLarge);
            }
            self.pending_block = Some((stream, end_stream, block.to_vec(), push));
        }
        Ok(())
    }

    fn decode_block(&mut self, stream: u32, end_stream: bool, block: &[u8], push: bool, out: &mut Vec<Event>) {
        if self.desynced {
            out.push(Event::HpackDesync { stream });
            return;
        }
        match self.hpack.decode(block) {
            Ok(fields) if !push => {
                let headers = fields
                    .into_iter()
                    .map(|(name, value)| (String::from_utf8_lossy(&name).to_ascii_lowercase(), value))
                    .collect();
                out.push(Event::Headers { stream, headers: Headers(headers), end_stream });
            }
            Ok(_) => {}
            Err(_) => {
                self.desynced = true;
                out.push(Event::HpackDesync { stream });
            }
        }
    }
}

/// A frame's payload without its padding (PADDED flag: first byte is the pad length).
fn unpad(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    if flags & PADDED == 0 {
        return Some(payload);
    }
    let pad = usize::from(*payload.first()?);
    payload.get(1..payload.len().checked_sub(pad)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn encode(headers: &[(&str, &str)], encoder: &mut loona_hpack::Encoder<'_>) -> Vec<u8> {
        encoder.encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn headers_with_continuation_padding_and_data_decode_in_any_split() {
        let mut enc = loona_hpack::Encoder::new();
        let block = encode(&[(":method", "POST"), (":path", "/v1/messages"), (":authority", "api.anthropic.com"), ("x-stainless-retry-count", "1")], &mut enc);
        let (a, b) = block.split_at(block.len() / 2);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(4, 0, 0, &[])); // SETTINGS
        bytes.extend(frame(HEADERS, 0, 1, a));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        let mut padded = vec![3u8];
        padded.extend_from_slice(b"{\"model\":\"m\"}");
        padded.extend_from_slice(&[0, 0, 0]);
        bytes.extend(frame(DATA, PADDED | END_STREAM, 1, &padded));
        bytes.extend(frame(RST_STREAM, 0, 3, &[0, 0, 0, 8]));
        for piece in [1, 5, bytes.len()] {
            let mut d = Decoder::new(true, true);
            let mut out = Vec::new();
            for chunk in bytes.chunks(piece) {
                d.feed(chunk, &mut out).expect("valid");
            }
            assert_eq!(out.len(), 3, "piece {piece}: {out:?}");
            let Event::Headers { stream: 1, headers, end_stream: false } = &out[0] else { panic!("{out:?}") };
            assert_eq!(headers.get(":path"), Some("/v1/messages"));
            assert_eq!(headers.get("x-stainless-retry-count"), Some("1"));
            assert_eq!(out[1], Event::Data { stream: 1, bytes: b"{\"model\":\"m\"}".to_vec(), end_stream: true });
            assert_eq!(out[2], Event::Reset { stream: 3 });
        }
    }

    #[test]
    fn a_mid_connection_attach_reports_desync_but_keeps_data() {
        let mut enc = loona_hpack::Encoder::new();
        let _first = encode(&[(":status", "200"), ("x-custom", "fills the dynamic table")], &mut enc);
        let second = encode(&[(":status", "200"), ("x-custom", "fills the dynamic table")], &mut enc);
        let mut bytes = frame(HEADERS, END_HEADERS, 5, &second);
        bytes.extend(frame(DATA, END_STREAM, 5, b"data: {}\n\n"));
        let mut d = Decoder::new(false, false);
        let mut out = Vec::new();
        d.feed(&bytes, &mut out).expect("frames parse");
        assert_eq!(out[0], Event::HpackDesync { stream: 5 });
        assert!(matches!(out[1], Event::Data { stream: 5, end_stream: true, .. }));
    }

    #[test]
    fn hostile_frames_are_errors_not_panics() {
        let mut d = Decoder::new(true, true);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"GET / HTTP/1.1\r\n\r\n", &mut out), Err(H2Error::NoPreface));
        let mut d = Decoder::new(false, true);
        assert!(d.feed(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1], &mut out).is_err(), "16 MiB frame refused");
        let mut d = Decoder::new(false, true);
        assert!(d.feed(&frame(DATA, PADDED, 1, &[200, 1, 2]), &mut out).is_err(), "padding longer than the frame");
        let mut d = Decoder::new(false, true);
        assert!(d.feed(&frame(CONTINUATION, END_HEADERS, 1, b"x"), &mut out).is_err());
    }
}
