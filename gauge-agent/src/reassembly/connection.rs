//! One connection's state: which protocol it speaks and, for HTTP/1, its two
//! decoders, the requests waiting for their responses and how a connection seen
//! from its middle, or with a response out of place, is read on.

use std::collections::VecDeque;

use super::{Drops, Metered, Origin, begins_request, h2};
use crate::{
    http::h1::{self, Side},
    llm::{CallTracker, Exchange, providers},
};

/// Times an HTTP/1 connection first seen mid-message may start afresh at the next
/// write or read call before it is given up on (see `Connection::resyncs`).
const MAX_RESYNCS: u8 = 4;
/// How long a response read with no request waiting waits for that request's
/// write record (see [`Connection::hold_early`]); the two are emitted microseconds
/// to milliseconds apart.
const EARLY_WINDOW_NS: u64 = 1_000_000_000;
/// Most bytes of such a response kept.
const MAX_EARLY_BYTES: usize = 256 << 10;

/// A read call (`offset` 0) whose bytes begin an HTTP/1 response.
fn begins_response(offset: u32, bytes: &[u8]) -> bool {
    offset == 0 && bytes.starts_with(b"HTTP/1.")
}

pub(super) enum Pending {
    Llm(Box<CallTracker>),
    /// An HTTP/2 stream whose headers could not be decoded: its request body is kept
    /// (bounded) to recognise the call by shape when it ends.
    Unknown { body: Vec<u8>, start: u64 },
    Other,
}

pub(super) struct Connection {
    pub(super) origin: Origin,
    requests: h1::Decoder,
    responses: h1::Decoder,
    /// The request being read.
    current: Option<Pending>,
    /// Requests sent, waiting for their responses, oldest first: the response
    /// being read belongs to the front one.
    waiting: VecDeque<Pending>,
    /// When its last event came.
    pub(super) last_seen_ns: u64,
    /// Bytes of the current write/read call not seen yet.
    pub(super) write_left: u64,
    pub(super) read_left: u64,
    /// Bytes were lost on this connection: its calls are marked incomplete.
    pub(super) gap: bool,
    /// Not HTTP from the client side: the rest of its bytes are skipped.
    pub(super) ignored: bool,
    /// Which protocol, decided by the first bytes the process writes.
    pub(super) protocol: Protocol,
    /// What this connection added to the reassembler's buffered total, as of its
    /// last event.
    pub(super) accounted: usize,
    /// HTTP/1 requests seen on it, for the calls' identities.
    requests_seen: u32,
    /// Times its HTTP/1 decoding started afresh, before any request was seen.
    resyncs: u8,
    /// A response broke: reads are skipped until one begins the next response.
    await_response: bool,
    /// Reads of a response that came with no request waiting for it, and when
    /// the first came (see [`Connection::hold_early`]).
    early: Vec<u8>,
    early_at: u64,
    /// Such a response was too large to hold: the request that follows it within
    /// the window is the one it answered.
    owed: bool,
}

impl Pending {
    pub(super) fn buffered(&self) -> usize {
        match self {
            Self::Llm(call) => call.buffered(),
            Self::Unknown { body, .. } => body.capacity(),
            Self::Other => 0,
        }
    }
}

pub(super) enum Protocol {
    Unknown,
    Http1,
    Http2(Box<h2::H2Connection>),
}

impl Connection {
    pub(super) fn new(origin: Origin, now: u64) -> Self {
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
            early: Vec::new(),
            early_at: 0,
            owed: false,
        }
    }

    /// Bytes this connection holds now.
    pub(super) fn buffered(&self) -> usize {
        let calls: usize = self.current.iter().chain(&self.waiting).map(Pending::buffered).sum();
        let protocol = match &self.protocol {
            Protocol::Http2(h2) => h2.buffered(),
            Protocol::Unknown | Protocol::Http1 => 0,
        };
        self.requests.buffered() + self.responses.buffered() + calls + protocol + self.early.capacity()
    }

    /// One write (`Side::Request`) or read call's bytes, or the part of it in this
    /// event, on an HTTP/1 connection. `events` is scratch space, kept by the caller
    /// so that each event does not allocate its own.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn feed_h1(
        &mut self,
        side: Side,
        offset: u32,
        bytes: &[u8],
        now: u64,
        drops: &mut Drops,
        events: &mut Vec<h1::Event>,
        out: &mut Vec<Metered>,
    ) {
        if matches!(side, Side::Response) {
            if self.await_response {
                if !begins_response(offset, bytes) {
                    return;
                }
                self.await_response = false;
            }
            // Once holding, the rest of that response is held too, in order.
            if !self.early.is_empty() || (self.requests_seen > 0 && self.answers_nothing() && self.responses.between_messages()) {
                self.hold_early(bytes, now, drops);
                return;
            }
        }
        self.decode(side, offset, bytes, now, drops, events, out);
        // Replayed once the request it answers is whole (it may take several writes).
        if matches!(side, Side::Request) && self.current.is_none() && !self.waiting.is_empty() {
            let within = now.saturating_sub(self.early_at) <= EARLY_WINDOW_NS;
            if !self.early.is_empty() {
                let early = std::mem::take(&mut self.early);
                if within {
                    self.decode(Side::Response, 0, &early, now, drops, events, out);
                } else {
                    drops.unanswered_responses += 1;
                }
            } else if std::mem::take(&mut self.owed) && within {
                // Its response was too large to hold: the call ends incomplete rather
                // than take the next call's response for its own.
                self.end_broken_response(now, out);
            }
        }
    }

    /// No request is waiting for a response, nor being sent.
    fn answers_nothing(&self) -> bool {
        self.waiting.is_empty() && self.current.is_none()
    }

    /// A response read while no request waits for one. A process that reads on
    /// one thread while it writes on another (Go's transport reads on its own
    /// goroutine) can have the response's record emitted before the record of the
    /// write that sent its request, which is emitted when that write returns. It
    /// is kept, bounded, for the request that follows within [`EARLY_WINDOW_NS`];
    /// without one (a server's unsolicited 408 before it closes) it is dropped
    /// and counted.
    fn hold_early(&mut self, bytes: &[u8], now: u64, drops: &mut Drops) {
        if self.early.is_empty() {
            self.early_at = now;
            self.owed = false;
        } else if now.saturating_sub(self.early_at) > EARLY_WINDOW_NS {
            self.early.clear();
            self.early_at = now;
            drops.unanswered_responses += 1;
        }
        if self.early.len() + bytes.len() > MAX_EARLY_BYTES {
            // The rest of it is skipped, and the request that comes for it within
            // the window ends incomplete (`owed`).
            self.early = Vec::new();
            self.await_response = true;
            self.owed = true;
            drops.unanswered_responses += 1;
            return;
        }
        self.early.extend_from_slice(bytes);
    }

    /// Runs bytes through the side's decoder and hands what it found on.
    #[allow(clippy::too_many_arguments)]
    fn decode(&mut self, side: Side, offset: u32, bytes: &[u8], now: u64, drops: &mut Drops, events: &mut Vec<h1::Event>, out: &mut Vec<Metered>) {
        let decoder = match side {
            Side::Request => &mut self.requests,
            Side::Response => &mut self.responses,
        };
        // Until the first request, a write call that begins like one starts afresh:
        // the rest of a message from before the attach may sit in the decoder.
        if self.requests_seen == 0 && offset == 0 && matches!(side, Side::Request) && begins_request(bytes) {
            *decoder = h1::Decoder::new(Side::Request);
        }
        events.clear();
        if decoder.feed(bytes, events).is_err() {
            let serving = match side {
                Side::Request => bytes.starts_with(b"HTTP/"),
                Side::Response => begins_request(bytes),
            };
            if serving {
                self.ignored = true;
                drops.server_side += 1;
                return;
            }
            if matches!(side, Side::Response) && self.requests_seen > 0 {
                drops.broken_responses += 1;
                self.response_broke(offset, bytes, now, events, out);
                return;
            }
            if self.resyncs == 0 {
                drops.not_http1 += 1;
            }
            // Seen from its middle (the agent started mid-call), a connection begins
            // with the rest of a message: until it shows a request, each side starts
            // afresh at its next call, a few times, rather than going blind for good.
            if self.requests_seen == 0 && self.resyncs < MAX_RESYNCS {
                self.resyncs += 1;
                *decoder = h1::Decoder::new(side);
            } else {
                self.ignored = true;
            }
            return;
        }
        match side {
            Side::Request => self.request_events(events, bytes, now),
            Side::Response => self.response_events(events, bytes, now, out),
        }
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
            self.responses = h1::Decoder::new(Side::Response);
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
    pub(super) fn close(mut self, at: u64, out: &mut Vec<Metered>) {
        if let Protocol::Http2(h2) = std::mem::replace(&mut self.protocol, Protocol::Unknown) {
            h2.close(at, &self.origin, out);
            return;
        }
        let mut tail = Vec::new();
        // A response held for a request still being written (a server that
        // answered early, then closed) answers it.
        let early = std::mem::take(&mut self.early);
        if !early.is_empty() && !self.answers_nothing() && self.responses.feed(&early, &mut tail).is_ok() {
            self.response_events(&mut tail, &early, at, out);
        }
        tail.clear();
        self.responses.close(&mut tail);
        self.response_events(&mut tail, &[], at, out);
        for pending in self.current.take().into_iter().chain(self.waiting.drain(..)) {
            if let Pending::Llm(call) = pending {
                out.push(Metered { origin: self.origin.clone(), call: call.finish(at, false) });
            }
        }
    }
}
