//! Reassembly: per-connection state that turns captured chunks into HTTP messages
//! and, for LLM API calls, into [`LlmCall`]s.
//!
//! Synchronous and clock-free: time comes from the events. Memory is bounded by the
//! number of connections (least recently active evicted first), an idle timeout, the
//! caps of the HTTP and LLM stages, and one budget for the bytes all connections
//! hold together (the largest holders evicted first); everything dropped is counted
//! in [`Drops`].

mod h2;

use std::collections::{HashMap, VecDeque};

use crate::{
    http::h1::{self, Side},
    llm::{CallTracker, Exchange, LlmCall, providers},
    source::{CaptureEvent, Direction, Payload},
};

const METHODS: [&[u8]; 8] = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"PRI"];
/// Times an HTTP/1 connection first seen mid-message may start afresh at the next
/// write or read call before it is given up on (see `Connection::resyncs`).
const MAX_RESYNCS: u8 = 4;

/// A read call (`offset` 0) whose bytes begin an HTTP/1 response.
fn begins_response(offset: u32, bytes: &[u8]) -> bool {
    offset == 0 && bytes.starts_with(b"HTTP/1.")
}

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
    /// What this connection added to the reassembler's buffered total, as of its
    /// last event.
    accounted: usize,
    /// HTTP/1 requests seen on it, for the calls' identities.
    requests_seen: u32,
    /// Times its HTTP/1 decoding started afresh, before any request was seen.
    resyncs: u8,
    /// A response broke: reads are skipped until one begins the next response.
    await_response: bool,
}

impl Pending {
    fn buffered(&self) -> usize {
        match self {
            Self::Llm(call) => call.buffered(),
            Self::Unknown { body, .. } => body.capacity(),
            Self::Other => 0,
        }
    }
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
            accounted: 0,
            requests_seen: 0,
            resyncs: 0,
            await_response: false,
        }
    }

    /// Bytes this connection holds now.
    fn buffered(&self) -> usize {
        let calls: usize = self.current.iter().chain(&self.waiting).map(Pending::buffered).sum();
        let protocol = match &self.protocol {
            Protocol::Http2(h2) => h2.buffered(),
            Protocol::Unknown | Protocol::Http1 => 0,
        };
        self.requests.buffered() + self.responses.buffered() + calls + protocol
    }

    /// `bytes`: what the decoder was fed, which its body events are ranges of.
    fn request_events(&mut self, events: &mut Vec<h1::Event>, bytes: &[u8], at: u64) {
        for event in events.drain(..) {
            match event {
                h1::Event::Request(head) => {
                    self.responses.expect_head_response(head.method == "HEAD");
                    self.requests_seen = self.requests_seen.saturating_add(1);
                    let pending = match providers::recognize(&head) {
                        Some(recognized) => {
                            let mut call = CallTracker::new(recognized, &head, at);
                            call.set_exchange(Exchange::Http1 { request: self.requests_seen });
                            Pending::Llm(Box::new(call))
                        }
                        None => Pending::Other,
                    };
                    if let Some(previous) = self.current.replace(pending) {
                        self.waiting.push_back(previous);
                    }
                }
                h1::Event::Body(range) => {
                    if let Some(Pending::Llm(call)) = &mut self.current {
                        call.request_body(&bytes[range]);
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

    fn response_events(&mut self, events: &mut Vec<h1::Event>, bytes: &[u8], at: u64, out: &mut Vec<Metered>) {
        for event in events.drain(..) {
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
                h1::Event::Body(range) => {
                    if let Some(Pending::Llm(call)) = self.waiting.front_mut() {
                        call.response_body(&bytes[range], at);
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

    /// The response decoder failed on a connection whose requests were seen: the
    /// response's start was missed or its bytes were lost. The call it answers
    /// ends incomplete and decoding resumes at the next read that begins a
    /// response (this one, if it does), rather than the connection going blind
    /// for the rest of its life: SDKs keep one connection for hours.
    fn response_broke(&mut self, offset: u32, bytes: &[u8], at: u64, events: &mut Vec<h1::Event>, out: &mut Vec<Metered>) {
        self.end_broken_response(at, out);
        self.await_response = !begins_response(offset, bytes);
        if self.await_response {
            return;
        }
        events.clear();
        if self.responses.feed(bytes, events).is_ok() {
            self.response_events(events, bytes, at, out);
        } else {
            self.end_broken_response(at, out);
            self.await_response = true;
        }
    }

    fn end_broken_response(&mut self, at: u64, out: &mut Vec<Metered>) {
        if let Some(Pending::Llm(call)) = self.waiting.pop_front() {
            out.push(Metered { origin: self.origin.clone(), call: call.finish(at, false) });
        }
        self.responses = h1::Decoder::new(Side::Response);
    }

    /// Ends every open call (connection closed or evicted).
    fn close(mut self, at: u64, out: &mut Vec<Metered>) {
        if let Protocol::Http2(h2) = std::mem::replace(&mut self.protocol, Protocol::Unknown) {
            h2.close(at, &self.origin, out);
            return;
        }
        let mut tail = Vec::new();
        self.responses.close(&mut tail);
        self.response_events(&mut tail, &[], at, out);
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
        let (decoder, side) = match direction {
            Direction::Write => (&mut conn.requests, Side::Request),
            Direction::Read => (&mut conn.responses, Side::Response),
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
        if matches!(side, Side::Response) && conn.await_response {
            if !begins_response(*offset, bytes) {
                return;
            }
            conn.await_response = false;
        }
        // Until the first request, a write call that begins like one starts afresh:
        // the rest of a message from before the attach may sit in the decoder.
        if conn.requests_seen == 0 && *offset == 0 && matches!(side, Side::Request) && begins_request(bytes) {
            *decoder = h1::Decoder::new(Side::Request);
        }
        let mut events = std::mem::take(&mut self.h1_events);
        events.clear();
        let fed = decoder.feed(bytes, &mut events);
        if fed.is_err() {
            let serving = match side {
                Side::Request => bytes.starts_with(b"HTTP/"),
                Side::Response => bytes.split(|&b| b == b' ').next().is_some_and(|m| METHODS.contains(&m)),
            };
            if serving {
                self.h1_events = events;
                conn.ignored = true;
                self.drops.server_side += 1;
                return;
            }
            if matches!(side, Side::Response) && conn.requests_seen > 0 {
                self.drops.broken_responses += 1;
                conn.response_broke(*offset, bytes, now, &mut events, out);
                self.h1_events = events;
                return;
            }
            self.h1_events = events;
            if conn.resyncs == 0 {
                self.drops.not_http1 += 1;
            }
            // Seen from its middle (the agent started mid-call), a connection begins
            // with the rest of a message: until it shows a request, each side starts
            // afresh at its next call, a few times, rather than going blind for good.
            if conn.requests_seen == 0 && conn.resyncs < MAX_RESYNCS {
                conn.resyncs += 1;
                *decoder = h1::Decoder::new(side);
            } else {
                conn.ignored = true;
            }
            return;
        }
        match side {
            Side::Request => conn.request_events(&mut events, bytes, now),
            Side::Response => conn.response_events(&mut events, bytes, now, out),
        }
        self.h1_events = events;
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
