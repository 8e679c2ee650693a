//! Reassembly: per-connection state that turns captured chunks into HTTP messages
//! and, for LLM API calls, into [`LlmCall`]s.
//!
//! Synchronous and clock-free: time comes from the events. Memory is bounded by the
//! number of connections (least recently active evicted first), an idle timeout, and
//! the caps of the HTTP and LLM stages; everything dropped is counted in [`Drops`].

mod h2;

use std::collections::{HashMap, VecDeque};

use crate::{
    http::h1::{self, Side},
    llm::{CallTracker, LlmCall, providers},
    source::{CaptureEvent, Direction, Payload},
};

const METHODS: [&[u8]; 8] = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"PRI"];

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
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_connections: 16384, idle_timeout_ns: 300 * 1_000_000_000 }
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
    /// Connections evicted for room or idleness.
    pub evicted_capacity: u64,
    pub evicted_idle: u64,
    /// Calls whose bytes were partly lost (cut by the per-call cap or a fault).
    pub gaps: u64,
}

/// The process a connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub tgid: u32,
    pub comm: String,
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

enum Pending {
    Llm(Box<CallTracker>),
    /// An HTTP/2 stream whose headers could not be decoded: its request body is kept
    /// (bounded) to recognise the call by shape when it ends.
    Unknown { body: Vec<u8>, start: u64 },
    Other,
}

struct Connection {
    origin: Origin,
    requests: h1::Decoder,
    responses: h1::Decoder,
    /// The request being read.
    current: Option<Pending>,
    /// Requests sent, waiting for their responses, oldest first.
    waiting: VecDeque<Pending>,
    /// The response being read belongs to `waiting.front()`.
    last_seen_ns: u64,
    /// Bytes of the current write/read call not seen yet.
    write_left: u64,
    read_left: u64,
    /// Bytes were lost on this connection: its calls are marked incomplete.
    gap: bool,
    /// Not HTTP from the client side: the rest of its bytes are skipped.
    ignored: bool,
    /// Which protocol, decided by the first bytes the process writes.
    protocol: Protocol,
}

enum Protocol {
    Unknown,
    Http1,
    Http2(Box<h2::H2Connection>),
}

impl Connection {
    fn new(origin: Origin, now: u64) -> Self {
        Self {
            origin,
            requests: h1::Decoder::new(Side::Request),
            responses: h1::Decoder::new(Side::Response),
            current: None,
            waiting: VecDeque::new(),
            last_seen_ns: now,
            write_left: 0,
            read_left: 0,
            gap: false,
            ignored: false,
            protocol: Protocol::Unknown,
        }
    }

    fn request_events(&mut self, events: Vec<h1::Event>, at: u64) {
        for event in events {
            match event {
                h1::Event::Request(head) => {
                    self.responses.expect_head_response(head.method == "HEAD");
                    let pending = match providers::recognize(&head) {
                        Some(recognized) => Pending::Llm(Box::new(CallTracker::new(recognized, &head, at))),
                        None => Pending::Other,
                    };
                    if let Some(previous) = self.current.replace(pending) {
                        self.waiting.push_back(previous);
                    }
                }
                h1::Event::Body(bytes) => {
                    if let Some(Pending::Llm(call)) = &mut self.current {
                        call.request_body(&bytes);
                    }
                }
                h1::Event::End => {
                    if let Some(mut pending) = self.current.take() {
                        if let Pending::Llm(call) = &mut pending {
                            call.request_end();
                        }
                        self.waiting.push_back(pending);
                    }
                }
                h1::Event::Response(_) => {}
            }
        }
    }

    fn response_events(&mut self, events: Vec<h1::Event>, at: u64, out: &mut Vec<Metered>) {
        for event in events {
            // A response may start before its request has been fully read (a server
            // answering early): the request in progress is the one it answers.
            if self.waiting.is_empty()
                && let Some(mut pending) = self.current.take()
            {
                if let Pending::Llm(call) = &mut pending {
                    call.request_end();
                }
                self.waiting.push_back(pending);
            }
            match event {
                h1::Event::Response(head) => {
                    if let Some(Pending::Llm(call)) = self.waiting.front_mut() {
                        call.response_head(head);
                    }
                }
                h1::Event::Body(bytes) => {
                    if let Some(Pending::Llm(call)) = self.waiting.front_mut() {
                        call.response_body(&bytes, at);
                    }
                }
                h1::Event::End => {
                    if let Some(Pending::Llm(call)) = self.waiting.pop_front() {
                        let complete = !self.gap;
                        out.push(Metered { origin: self.origin.clone(), call: call.finish(at, complete) });
                    }
                }
                h1::Event::Request(_) => {}
            }
        }
    }

    /// Ends every open call (connection closed or evicted).
    fn close(mut self, at: u64, out: &mut Vec<Metered>) {
        if let Protocol::Http2(h2) = std::mem::replace(&mut self.protocol, Protocol::Unknown) {
            h2.close(at, &self.origin, out);
            return;
        }
        let mut tail = Vec::new();
        self.responses.close(&mut tail);
        self.response_events(tail, at, out);
        for pending in self.current.take().into_iter().chain(self.waiting.drain(..)) {
            if let Pending::Llm(call) = pending {
                out.push(Metered { origin: self.origin.clone(), call: call.finish(at, false) });
            }
        }
    }
}

/// All connections of all processes.
#[derive(Default)]
pub struct Reassembler {
    limits: Limits,
    connections: HashMap<(u32, u64), Connection>,
    drops: Drops,
    last_sweep_ns: u64,
}

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

    /// Feeds one captured event; finished calls are appended to `out`.
    pub fn feed(&mut self, event: &CaptureEvent, out: &mut Vec<Metered>) {
        let now = event.timestamp_ns;
        self.sweep(now, out);
        match &event.payload {
            Payload::Data { direction, connection, call_len, offset, bytes } => {
                let key = (event.tgid, *connection);
                if !self.connections.contains_key(&key) {
                    self.make_room(now, out);
                    let origin = Origin { tgid: event.tgid, comm: event.comm.clone(), cgroup_id: event.cgroup_id, connection: *connection };
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
                let mut events = Vec::new();
                let (decoder, side) = match direction {
                    Direction::Write => (&mut conn.requests, Side::Request),
                    Direction::Read => (&mut conn.responses, Side::Response),
                };
                if conn.ignored {
                    return;
                }
                if matches!(conn.protocol, Protocol::Unknown) {
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
                if decoder.feed(bytes, &mut events).is_err() {
                    conn.ignored = true;
                    let serving = match side {
                        Side::Request => bytes.starts_with(b"HTTP/"),
                        Side::Response => bytes.split(|&b| b == b' ').next().is_some_and(|m| METHODS.contains(&m)),
                    };
                    if serving {
                        self.drops.server_side += 1;
                    } else {
                        self.drops.not_http1 += 1;
                    }
                    return;
                }
                match side {
                    Side::Request => conn.request_events(events, now),
                    Side::Response => conn.response_events(events, now, out),
                }
            }
            Payload::Close { connection } => {
                if let Some(conn) = self.connections.remove(&(event.tgid, *connection)) {
                    conn.close(now, out);
                }
            }
            // Enforcement records: the policy stage's, not a connection's bytes.
            Payload::Exec | Payload::Held { .. } | Payload::Stopped { .. } => {}
        }
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
            if let Some(conn) = self.connections.remove(&key) {
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
        if let Some(conn) = oldest.and_then(|key| self.connections.remove(&key)) {
            self.drops.evicted_capacity += 1;
            conn.close(now, out);
        }
    }
}

#[cfg(test)]
mod tests;
