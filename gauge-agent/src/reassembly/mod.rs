//! Reassembly: per-connection state that turns captured chunks into HTTP messages
//! and, for LLM API calls, into [`LlmCall`]s.
//!
//! Synchronous and clock-free: time comes from the events. Memory is bounded by the
//! number of connections (least recently active evicted first), an idle timeout, the
//! caps of the HTTP and LLM stages, and one budget for the bytes all connections
//! hold together (the largest holders evicted first); everything dropped is counted
//! in [`Drops`].

mod connection;
mod h2;

use std::collections::HashMap;

use connection::{Connection, Pending, Protocol};

use crate::{
    http::h1::{self, Side},
    llm::LlmCall,
    source::{CaptureEvent, Direction, Payload},
};

const METHODS: [&[u8]; 8] = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"PRI"];

/// Bytes that begin with an HTTP/1 method (or the HTTP/2 preface's `PRI`).
fn begins_request(bytes: &[u8]) -> bool {
    bytes.split(|&b| b == b' ').next().is_some_and(|m| METHODS.contains(&m))
}

enum Detected {
    Http2 { in_sync: bool },
    Other,
}

/// What a connection speaks, from the first bytes its client wrote: the HTTP/2
/// preface, or (attached mid-connection) something shaped like an HTTP/2 frame
/// header where an HTTP/1 request line would be.
fn detect(first: &[u8]) -> Detected {
    let n = first.len().min(crate::http::h2::PREFACE.len());
    if n > 0 && first[..n] == crate::http::h2::PREFACE[..n] {
        return Detected::Http2 { in_sync: true };
    }
    let frame_like = first.len() >= 9
        && first[3] <= 9
        && first[5] & 0x80 == 0
        && !first[..4].iter().all(|b| b.is_ascii_uppercase());
    if frame_like { Detected::Http2 { in_sync: false } } else { Detected::Other }
}

/// Limits of the reassembly stage.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Connections silent this long are dropped (their open calls end incomplete).
    pub idle_timeout_ns: u64,
    /// Bytes all connections may hold together (buffers, kept bodies, decoder
    /// state). Past it the connections holding the most are evicted until a quarter
    /// of the budget is free again.
    pub max_buffered_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_connections: 16384, idle_timeout_ns: 300 * 1_000_000_000, max_buffered_bytes: 256 << 20 }
    }
}

/// Counts of what reassembly could not use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops {
    /// Connections whose bytes are not HTTP/1 (HTTP/2 and others, for now).
    pub not_http1: u64,
    /// Connections where the process is the server (it reads requests): not metered
    /// here, the client side is.
    pub server_side: u64,
    /// HTTP/2 header blocks that could not be decoded (table unknown or corrupt).
    pub hpack_desyncs: u64,
    /// HTTP/2 streams beyond the per-connection limit.
    pub streams_over_limit: u64,
    /// Connections evicted for room, idleness, or the memory budget.
    pub evicted_capacity: u64,
    pub evicted_idle: u64,
    pub evicted_memory: u64,
    /// Calls whose bytes were partly lost (cut by the per-call cap or a fault).
    pub gaps: u64,
    /// HTTP/1 responses that could not be parsed on a connection whose requests
    /// were (their start missed, bytes lost): each one's call ends incomplete.
    pub broken_responses: u64,
    /// Responses (HTTP/1, or an HTTP/2 stream's frames) no request was seen for
    /// within a second (a lost record, a server's unsolicited reply): not metered.
    pub unanswered_responses: u64,
}

/// The process a connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub tgid: u32,
    pub comm: crate::source::Comm,
    pub cgroup_id: u64,
    /// The connection (`SSL*`) the call was made on.
    pub connection: u64,
}

/// A finished call with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metered {
    pub origin: Origin,
    pub call: LlmCall,
}


/// All connections of all processes.
#[derive(Default)]
pub struct Reassembler {
    limits: Limits,
    connections: HashMap<(u32, u64), Connection, foldhash::fast::RandomState>,
    drops: Drops,
    last_sweep_ns: u64,
    /// The newest event's time: "now" for [`Reassembler::end_gone`].
    last_event_ns: u64,
    /// Sum of every connection's `accounted` bytes.
    buffered: usize,
    /// The HTTP/1 decoders' output for the event at hand, kept between events so
    /// each does not allocate its own.
    h1_events: Vec<h1::Event>,
}

/// How long a gone process's connections are kept after their last event: its last
/// events may still be on their way from the kernel when its exit is noticed.
const GONE_GRACE_NS: u64 = 5_000_000_000;

impl Reassembler {
    pub fn new(limits: Limits) -> Self {
        Self { limits, ..Default::default() }
    }

    pub fn drops(&self) -> Drops {
        self.drops
    }

    pub fn open_connections(&self) -> usize {
        self.connections.len()
    }

    /// Bytes all connections hold (see [`Limits::max_buffered_bytes`]).
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Feeds one captured event; finished calls are appended to `out`.
    pub fn feed(&mut self, event: &CaptureEvent, out: &mut Vec<Metered>) {
        let now = event.timestamp_ns;
        self.last_event_ns = self.last_event_ns.max(now);
        self.sweep(now, out);
        match &event.payload {
            Payload::Data { connection, .. } => {
                let key = (event.tgid, *connection);
                self.feed_data(event, key, out);
                self.account(key, now, out);
            }
            Payload::Close { connection } => {
                if let Some(conn) = self.remove(&(event.tgid, *connection)) {
                    conn.close(now, out);
                }
            }
            // Enforcement records: the policy stage's, not a connection's bytes.
            Payload::Exec | Payload::Held { .. } | Payload::Stopped { .. } => {}
        }
    }

    /// One captured chunk of a connection's bytes.
    fn feed_data(&mut self, event: &CaptureEvent, key: (u32, u64), out: &mut Vec<Metered>) {
        let Payload::Data { direction, connection, call_len, offset, bytes } = &event.payload else { return };
        let now = event.timestamp_ns;
        if !self.connections.contains_key(&key) {
            self.make_room(now, out);
            let origin = Origin { tgid: event.tgid, comm: event.comm, cgroup_id: event.cgroup_id, connection: *connection };
            self.connections.insert(key, Connection::new(origin, now));
        }
        let Some(conn) = self.connections.get_mut(&key) else { return };
        conn.last_seen_ns = now;
        // Chunks of one call arrive together and in order; a call whose chunks
        // fall short of its length (cap, fault, lost record) leaves a gap.
        let left = match direction {
            Direction::Write => &mut conn.write_left,
            Direction::Read => &mut conn.read_left,
        };
        if *offset == 0 {
            if *left > 0 && !conn.gap {
                conn.gap = true;
                self.drops.gaps += 1;
            }
            *left = u64::from(*call_len);
        }
        *left = left.saturating_sub(bytes.len() as u64);
        let side = match direction {
            Direction::Write => Side::Request,
            Direction::Read => Side::Response,
        };
        if conn.ignored {
            return;
        }
        if matches!(conn.protocol, Protocol::Unknown) {
            // Reads before any write are the rest of a response to a request sent
            // before the agent attached (it restarted mid-call): only a request, sent
            // by the process or read by a server, tells what the connection speaks.
            if matches!(side, Side::Response) && !begins_request(bytes) {
                return;
            }
            conn.protocol = match (side, detect(bytes)) {
                (Side::Request, Detected::Http2 { in_sync }) => Protocol::Http2(Box::new(h2::H2Connection::new(in_sync))),
                _ => Protocol::Http1,
            };
        }
        if let Protocol::Http2(h2) = &mut conn.protocol {
            let ok = match side {
                Side::Request => h2.write(bytes, now, &conn.origin, &mut self.drops, out),
                Side::Response => h2.read(bytes, now, &conn.origin, &mut self.drops, out),
            };
            if !ok {
                conn.ignored = true;
                self.drops.not_http1 += 1;
            }
            return;
        }
        conn.feed_h1(side, *offset, bytes, now, &mut self.drops, &mut self.h1_events, out);
    }

    /// Brings the buffered total up to date after an event on `key`, and evicts
    /// the largest holders when it is over the budget.
    fn account(&mut self, key: (u32, u64), now: u64, out: &mut Vec<Metered>) {
        let Some(conn) = self.connections.get_mut(&key) else { return };
        let held = conn.buffered();
        self.buffered = self.buffered.saturating_sub(conn.accounted) + held;
        conn.accounted = held;
        let budget = self.limits.max_buffered_bytes;
        if self.buffered <= budget {
            return;
        }
        // Evicting down to three quarters, not just under the line, so a flood does
        // not make every event pay for a scan. The process holding the most loses
        // its largest connections first: one that opens many medium connections
        // must not get another process's large call evicted.
        let target = budget - budget / 4;
        while self.buffered > target {
            let mut per_process: HashMap<u32, usize> = HashMap::new();
            for (&(tgid, _), conn) in &self.connections {
                *per_process.entry(tgid).or_default() += conn.accounted;
            }
            let Some((&heaviest, _)) = per_process.iter().max_by_key(|&(_, held)| *held) else { break };
            let mut own: Vec<((u32, u64), usize)> =
                self.connections.iter().filter(|(k, _)| k.0 == heaviest).map(|(k, c)| (*k, c.accounted)).collect();
            own.sort_unstable_by_key(|&(_, held)| std::cmp::Reverse(held));
            let before = self.buffered;
            for (key, _) in own {
                if self.buffered <= target {
                    break;
                }
                if let Some(conn) = self.remove(&key) {
                    self.drops.evicted_memory += 1;
                    conn.close(now, out);
                }
            }
            if self.buffered == before {
                break;
            }
        }
    }

    /// Removes a connection and its bytes from the total.
    fn remove(&mut self, key: &(u32, u64)) -> Option<Connection> {
        let conn = self.connections.remove(key)?;
        self.buffered = self.buffered.saturating_sub(conn.accounted);
        Some(conn)
    }

    /// Ends the connections of processes that are gone, as a close would (a call cut
    /// short ends incomplete): one that exits without closing TLS (a crash, SIGKILL)
    /// would otherwise hold them until the idle timeout. `alive` is asked once per
    /// process; connections with an event in the last few seconds are left for the
    /// next time. Returns how many were ended.
    pub fn end_gone(&mut self, alive: impl Fn(u32) -> bool, out: &mut Vec<Metered>) -> usize {
        let now = self.last_event_ns;
        let mut verdicts: HashMap<u32, bool> = HashMap::new();
        let gone: Vec<(u32, u64)> = self
            .connections
            .iter()
            .filter(|(_, c)| now.saturating_sub(c.last_seen_ns) > GONE_GRACE_NS)
            .map(|(k, _)| *k)
            .filter(|(tgid, _)| !*verdicts.entry(*tgid).or_insert_with(|| alive(*tgid)))
            .collect();
        for key in &gone {
            if let Some(conn) = self.remove(key) {
                let at = conn.last_seen_ns;
                conn.close(at, out);
            }
        }
        gone.len()
    }

    /// Evicts connections idle past the timeout, at most once a second of event time.
    fn sweep(&mut self, now: u64, out: &mut Vec<Metered>) {
        if now.saturating_sub(self.last_sweep_ns) < 1_000_000_000 {
            return;
        }
        self.last_sweep_ns = now;
        let timeout = self.limits.idle_timeout_ns;
        let idle: Vec<(u32, u64)> = self
            .connections
            .iter()
            .filter(|(_, c)| now.saturating_sub(c.last_seen_ns) > timeout)
            .map(|(k, _)| *k)
            .collect();
        for key in idle {
            if let Some(conn) = self.remove(&key) {
                self.drops.evicted_idle += 1;
                conn.close(now, out);
            }
        }
    }

    fn make_room(&mut self, now: u64, out: &mut Vec<Metered>) {
        if self.connections.len() < self.limits.max_connections {
            return;
        }
        let oldest = self.connections.iter().min_by_key(|(_, c)| c.last_seen_ns).map(|(k, _)| *k);
        if let Some(conn) = oldest.and_then(|key| self.remove(&key)) {
            self.drops.evicted_capacity += 1;
            conn.close(now, out);
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod late_attach_tests;
