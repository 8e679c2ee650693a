//! HTTP/2 connections: one exchange per stream, many at once.

use std::collections::HashMap;

use super::{Drops, Metered, Origin, Pending};
use crate::{
    http::{Headers, RequestHead, ResponseHead, h2},
    llm::{CallTracker, Exchange, providers},
};

/// Streams tracked per connection; more are counted and their calls dropped.
const MAX_STREAMS: usize = 1024;
/// Request body kept per undecodable stream to recognise it by shape.
const MAX_SHAPE_BODY: usize = 1 << 20;
/// Bounds on the response frames held for streams whose request is not seen yet
/// (see [`H2Connection::hold_early`]), as for HTTP/1.
const MAX_EARLY_BYTES: usize = 256 << 10;
const MAX_EARLY_FRAMES: usize = 256;
const EARLY_WINDOW_NS: u64 = 1_000_000_000;

pub(super) struct H2Connection {
    client: h2::Decoder,
    server: h2::Decoder,
    streams: HashMap<u32, Pending>,
    /// The highest stream the client was seen opening.
    last_opened: u32,
    /// Seen from its preface: every stream the client opens is seen opening. Seen
    /// from its middle, only those after the first one seen are known to be.
    from_start: bool,
    /// Response frames read for streams opened after `last_opened`, with when
    /// they were read.
    early: Vec<(h2::Event, u64)>,
}

impl H2Connection {
    pub(super) fn new(in_sync: bool) -> Self {
        Self {
            client: h2::Decoder::new(true, in_sync),
            server: h2::Decoder::new(false, in_sync),
            streams: HashMap::new(),
            last_opened: 0,
            from_start: in_sync,
            early: Vec::new(),
        }
    }

    /// Bytes held for this connection: both decoders and every open stream.
    pub(super) fn buffered(&self) -> usize {
        let early = self.early.capacity() * std::mem::size_of::<(h2::Event, u64)>() + self.early_bytes();
        self.client.buffered() + self.server.buffered() + self.streams.values().map(Pending::buffered).sum::<usize>() + early
    }

    /// Bytes the process wrote (requests). Returns false once the bytes are not HTTP/2.
    pub(super) fn write(&mut self, bytes: &[u8], at: u64, origin: &Origin, drops: &mut Drops, out: &mut Vec<Metered>) -> bool {
        let mut events = Vec::new();
        let ok = self.client.feed(bytes, &mut events).is_ok();
        for event in events {
            // Any client frame on a stream (headers, even undecodable ones, or data)
            // shows it open.
            if let Some(stream) = stream_of(&event).or(match &event {
                h2::Event::HpackDesync { stream } => Some(*stream),
                _ => None,
            }) {
                self.last_opened = self.last_opened.max(stream);
            }
            match event {
                h2::Event::Headers { stream, headers, end_stream } => {
                    let head = request_head(headers);
                    let pending = match providers::recognize(&head) {
                        Some(recognized) => {
                            let mut call = CallTracker::new(recognized, &head, at);
                            call.set_exchange(Exchange::Http2 { stream });
                            Pending::Llm(Box::new(call))
                        }
                        None => Pending::Other,
                    };
                    if self.streams.len() >= MAX_STREAMS && !self.streams.contains_key(&stream) {
                        drops.streams_over_limit += 1;
                        continue;
                    }
                    self.streams.insert(stream, pending);
                    if end_stream {
                        self.request_end(stream);
                    }
                }
                h2::Event::Data { stream, bytes, end_stream } => {
                    match self.streams.get_mut(&stream) {
                        Some(Pending::Llm(call)) => call.request_body(&bytes),
                        Some(Pending::Unknown { body, .. }) => {
                            let room = MAX_SHAPE_BODY.saturating_sub(body.len());
                            body.extend_from_slice(&bytes[..bytes.len().min(room)]);
                        }
                        _ => {}
                    }
                    if end_stream {
                        self.request_end(stream);
                    }
                }
                h2::Event::Reset { stream } => self.end_stream(stream, at, false, origin, out),
                h2::Event::HpackDesync { stream } => {
                    drops.hpack_desyncs += 1;
                    if self.streams.len() < MAX_STREAMS {
                        self.streams.entry(stream).or_insert_with(|| Pending::Unknown { body: Vec::new(), start: at });
                    }
                }
                h2::Event::GoAway => {}
            }
        }
        if !self.early.is_empty() {
            self.replay_early(at, origin, drops, out);
        }
        ok
    }

    /// Bytes the process read (responses).
    pub(super) fn read(&mut self, bytes: &[u8], at: u64, origin: &Origin, drops: &mut Drops, out: &mut Vec<Metered>) -> bool {
        let mut events = Vec::new();
        let ok = self.server.feed(bytes, &mut events).is_ok();
        for event in events {
            if let Some(stream) = stream_of(&event)
                && (self.from_start || self.last_opened > 0)
                && stream > self.last_opened
                && stream % 2 == 1
            {
                self.hold_early(event, at, drops);
                continue;
            }
            self.response_event(event, at, origin, drops, out);
        }
        ok
    }

    /// A response frame for a stream the client opened, by its id, but whose
    /// request was not seen yet. A process that reads on one thread while it writes
    /// on another (Go's transport reads on its own goroutine) can have the response
    /// read, and its record emitted, before the record of the write that sent the
    /// request, which is emitted when that write returns. Held, bounded, for the
    /// request that follows within [`EARLY_WINDOW_NS`]; else dropped and counted.
    fn hold_early(&mut self, event: h2::Event, at: u64, drops: &mut Drops) {
        let mut expired: Vec<u32> = Vec::new();
        self.early.retain(|(event, when)| {
            let keep = at.saturating_sub(*when) <= EARLY_WINDOW_NS;
            if !keep && let Some(stream) = stream_of(event) && !expired.contains(&stream) {
                expired.push(stream);
            }
            keep
        });
        drops.unanswered_responses += expired.len() as u64;
        if self.early.len() >= MAX_EARLY_FRAMES || self.early_bytes() + data_len(&event) > MAX_EARLY_BYTES {
            drops.unanswered_responses += 1;
            return;
        }
        self.early.push((event, at));
    }

    /// Body bytes of the held frames.
    fn early_bytes(&self) -> usize {
        self.early.iter().map(|(event, _)| data_len(event)).sum()
    }

    /// After a write: the held frames of streams whose request is now seen are
    /// read as if they came now.
    fn replay_early(&mut self, at: u64, origin: &Origin, drops: &mut Drops, out: &mut Vec<Metered>) {
        for (event, when) in std::mem::take(&mut self.early) {
            if stream_of(&event).is_some_and(|stream| stream <= self.last_opened) {
                self.response_event(event, at, origin, drops, out);
            } else {
                self.early.push((event, when));
            }
        }
    }

    /// One frame of the server's.
    fn response_event(&mut self, event: h2::Event, at: u64, origin: &Origin, drops: &mut Drops, out: &mut Vec<Metered>) {
        match event {
            h2::Event::Headers { stream, headers, end_stream } => {
                let status = headers.get(":status").and_then(|s| s.parse::<u16>().ok()).unwrap_or(0);
                if (100..200).contains(&status) {
                    return; // interim
                }
                if let Some(Pending::Llm(call)) = self.streams.get_mut(&stream) {
                    // Trailers (a second block) carry no status and are ignored.
                    if status != 0 {
                        call.response_head(ResponseHead { status, headers });
                    }
                }
                if end_stream {
                    self.end_stream(stream, at, true, origin, out);
                }
            }
            h2::Event::Data { stream, bytes, end_stream } => {
                if let Some(Pending::Llm(call)) = self.streams.get_mut(&stream) {
                    call.response_body(&bytes, at);
                }
                if end_stream {
                    self.end_stream(stream, at, true, origin, out);
                }
            }
            h2::Event::Reset { stream } => self.end_stream(stream, at, false, origin, out),
            h2::Event::HpackDesync { .. } => drops.hpack_desyncs += 1,
            h2::Event::GoAway => {}
        }
    }

    fn request_end(&mut self, stream: u32) {
        match self.streams.get_mut(&stream) {
            Some(Pending::Llm(call)) => call.request_end(),
            Some(pending @ Pending::Unknown { .. }) => {
                let Pending::Unknown { body, start } = std::mem::replace(pending, Pending::Other) else { return };
                let recognized = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|json| providers::recognize_body(&json));
                if let Some(recognized) = recognized {
                    let mut call = CallTracker::from_body(recognized, &body, start);
                    call.set_exchange(Exchange::Http2 { stream });
                    *pending = Pending::Llm(Box::new(call));
                }
            }
            _ => {}
        }
    }

    fn end_stream(&mut self, stream: u32, at: u64, complete: bool, origin: &Origin, out: &mut Vec<Metered>) {
        if let Some(Pending::Llm(call)) = self.streams.remove(&stream) {
            out.push(Metered { origin: origin.clone(), call: call.finish(at, complete) });
        }
    }

    /// Ends every open stream (connection closed or evicted).
    pub(super) fn close(self, at: u64, origin: &Origin, out: &mut Vec<Metered>) {
        for (_, pending) in self.streams {
            if let Pending::Llm(call) = pending {
                out.push(Metered { origin: origin.clone(), call: call.finish(at, false) });
            }
        }
    }
}

fn stream_of(event: &h2::Event) -> Option<u32> {
    match event {
        h2::Event::Headers { stream, .. } | h2::Event::Data { stream, .. } => Some(*stream),
        _ => None,
    }
}

fn data_len(event: &h2::Event) -> usize {
    match event {
        h2::Event::Data { bytes, .. } => bytes.len(),
        _ => 0,
    }
}

/// An HTTP/2 request as a request head: pseudo-headers become method and path;
/// `:authority` stays among the headers, where the provider table looks for a host.
fn request_head(headers: Headers) -> RequestHead {
    let method = headers.get(":method").unwrap_or_default().to_owned();
    let path = headers.get(":path").unwrap_or_default().to_owned();
    RequestHead { method, path, headers }
}
