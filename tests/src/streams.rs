//! Rebuilding per-connection byte streams from captured events.

use std::collections::BTreeMap;

use gauge_agent::source::{CaptureEvent, Direction, Payload};

/// One connection of one process, as captured.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stream {
    pub written: Vec<u8>,
    pub read: Vec<u8>,
    pub closed: bool,
    /// Bytes calls reported but no chunk carried (cap or fault).
    pub missing: u64,
}

/// Streams of process `tgid`, keyed by connection (`SSL*`).
pub fn streams(events: &[CaptureEvent], tgid: u32) -> BTreeMap<u64, Stream> {
    let mut mine: Vec<&CaptureEvent> = events.iter().filter(|e| e.tgid == tgid).collect();
    // Chunks of one call share its timestamp and come in offset order.
    mine.sort_by_key(|e| (e.timestamp_ns, offset(e)));
    let mut out: BTreeMap<u64, Stream> = BTreeMap::new();
    let mut call_seen: BTreeMap<(u64, u64, bool), (u32, u64)> = BTreeMap::new();
    for event in mine {
        match &event.payload {
            Payload::Data { direction, connection, call_len, bytes, .. } => {
                let stream = out.entry(*connection).or_default();
                match direction {
                    Direction::Write => stream.written.extend_from_slice(bytes),
                    Direction::Read => stream.read.extend_from_slice(bytes),
                }
                let seen = call_seen.entry((*connection, event.timestamp_ns, *direction == Direction::Write)).or_insert((*call_len, 0));
                seen.1 += bytes.len() as u64;
            }
            Payload::Close { connection } => {
                if let Some(stream) = out.get_mut(connection) {
                    stream.closed = true;
                }
            }
            Payload::Exec | Payload::Held { .. } | Payload::Stopped { .. } => {}
        }
    }
    for ((connection, _, _), (call_len, got)) in call_seen {
        if let Some(stream) = out.get_mut(&connection) {
            stream.missing += u64::from(call_len).saturating_sub(got);
        }
    }
    out
}

fn offset(event: &CaptureEvent) -> u32 {
    match event.payload {
        Payload::Data { offset, .. } => offset,
        _ => 0,
    }
}
