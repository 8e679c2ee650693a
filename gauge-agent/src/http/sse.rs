//! Incremental `text/event-stream` decoder (the WHATWG event-stream format), fed body
//! bytes as they arrive; events split across reads are reassembled.

/// Longest line kept; longer ones are cut (counted by the caller through `overflowed`).
pub const MAX_LINE: usize = 4 * 1024 * 1024;
/// Line buffers up to this size are reused (SSE lines are mostly shorter); a larger
/// one is freed with its line, so a stream does not hold it (it counts in
/// `buffered`) for having had one long line.
const KEPT_LINE_CAPACITY: usize = 4 * 1024;

/// One event, borrowed from the decoder until the next byte is fed to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field, if any.
    pub event: Option<&'a str>,
    /// The `data:` lines joined by `\n`.
    pub data: &'a str,
}

/// The decoder's state between reads. Its buffers are kept from event to event:
/// this runs for every chunk of every stream, and a `String` per event (with the
/// copy of each line into a line buffer) was an allocation, two copies and a free
/// per chunk.
#[derive(Debug, Default)]
pub struct Decoder {
    /// The start of a line the last read cut; empty between whole lines.
    line: Vec<u8>,
    event: String,
    has_event: bool,
    data: String,
    has_data: bool,
    /// Lines that exceeded [`MAX_LINE`] and were cut.
    pub overflowed: u64,
}

impl Decoder {
    /// Bytes held for the event being read.
    pub fn buffered(&self) -> usize {
        self.line.capacity() + self.data.capacity() + self.event.capacity()
    }

    /// Decodes `bytes`, handing each event it completes to `on_event`.
    pub fn feed(&mut self, mut bytes: &[u8], on_event: &mut impl FnMut(&SseEvent<'_>)) {
        // Whole lines at a time (memchr), not byte by byte.
        while let Some(end) = memchr::memchr(b'\n', bytes) {
            if self.line.is_empty() && end <= MAX_LINE {
                // The common case: the whole line is in this read, read in place.
                self.line_done(&bytes[..end], on_event);
            } else {
                self.append(&bytes[..end]);
                let mut line = std::mem::take(&mut self.line);
                self.line_done(&line, on_event);
                // The buffer is kept for the next cut line unless an outsized line grew it.
                if line.capacity() <= KEPT_LINE_CAPACITY {
                    line.clear();
                    self.line = line;
                }
            }
            bytes = &bytes[end + 1..];
        }
        self.append(bytes);
    }

    /// Adds to the line being read, up to [`MAX_LINE`]; a line that goes past it is
    /// counted once and marked so it is not counted again.
    fn append(&mut self, part: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.line.len());
        if part.len() <= room {
            self.line.extend_from_slice(part);
        } else if self.line.len() <= MAX_LINE {
            self.line.extend_from_slice(&part[..room]);
            self.overflowed += 1;
            self.line.push(b'\0');
        }
    }

    /// The stream ended: a last line without its newline, and the event it ends.
    pub fn finish(&mut self, on_event: &mut impl FnMut(&SseEvent<'_>)) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, on_event);
        }
        self.dispatch(on_event);
    }

    fn line_done(&mut self, line: &[u8], on_event: &mut impl FnMut(&SseEvent<'_>)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line.starts_with(b":") {
            return; // comment / keep-alive
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        // Valid UTF-8 is the rule; the lossy path only for what is not.
        let value = match std::str::from_utf8(value) {
            Ok(text) => std::borrow::Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(value),
        };
        match field {
            b"event" => {
                self.event.clear();
                self.event.push_str(&value);
                self.has_event = true;
            }
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                } else {
                    self.data.clear();
                    self.has_data = true;
                }
                self.data.push_str(&value);
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(&SseEvent<'_>)) {
        if self.has_data {
            on_event(&SseEvent { event: self.has_event.then_some(self.event.as_str()), data: &self.data });
        }
        self.has_event = false;
        self.has_data = false;
        // Kept for the next event unless an outsized one grew them.
        for buffer in [&mut self.data, &mut self.event] {
            if buffer.capacity() > KEPT_LINE_CAPACITY {
                *buffer = String::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Owned {
        event: Option<String>,
        data: String,
    }

    fn decode(pieces: &[&[u8]]) -> Vec<Owned> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        let mut keep = |e: &SseEvent<'_>| out.push(Owned { event: e.event.map(str::to_owned), data: e.data.to_owned() });
        for piece in pieces {
            d.feed(piece, &mut keep);
        }
        d.finish(&mut keep);
        out
    }

    #[test]
    fn events_split_across_reads_are_reassembled() {
        let stream = b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n: ping\n\ndata: line1\ndata: line2\n\nevent: x\ndata: [DONE]";
        let whole = decode(&[stream]);
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[0], Owned { event: Some("message_start".into()), data: "{\"a\":1}".into() });
        assert_eq!(whole[1], Owned { event: None, data: "line1\nline2".into() }, "the event name is not carried over");
        assert_eq!(whole[2], Owned { event: Some("x".into()), data: "[DONE]".into() });
        for piece in [1, 2, 5] {
            let pieces: Vec<&[u8]> = stream.chunks(piece).collect();
            assert_eq!(decode(&pieces), whole, "piece {piece}");
        }
    }

    #[test]
    fn an_outsized_line_is_cut_and_counted_and_its_buffer_not_kept() {
        let long = vec![b'x'; MAX_LINE + 10];
        for pieces in [vec![&b"data: "[..], &long, b"\n\ndata: after\n\n"], vec![&[b"data: ", &long[..], b"\n\ndata: after\n\n"].concat()[..]]] {
            let mut d = Decoder::default();
            let mut sizes = Vec::new();
            for piece in &pieces {
                d.feed(piece, &mut |e| sizes.push(e.data.len()));
            }
            assert_eq!(d.overflowed, 1);
            assert_eq!(sizes[1], 5, "the next event is whole");
            assert!(sizes[0] <= MAX_LINE + 1, "cut to the cap: {}", sizes[0]);
            assert!(d.buffered() <= 3 * KEPT_LINE_CAPACITY, "the outsized buffers were freed: {}", d.buffered());
        }
    }
}
