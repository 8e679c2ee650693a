//! Incremental `text/event-stream` decoder (the WHATWG event-stream format), fed body
//! bytes as they arrive; events split across reads are reassembled.

/// Longest line kept; longer ones are cut (counted by the caller through `overflowed`).
pub const MAX_LINE: usize = 4 * 1024 * 1024;
/// Line buffers up to this size are reused (SSE lines are mostly shorter); a larger
/// one is freed with its line, so a stream does not hold it (it counts in
/// `buffered`) for having had one long line.
const KEPT_LINE_CAPACITY: usize = 4 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined by `\n`.
    pub data: String,
}

#[derive(Debug, Default)]
pub struct Decoder {
    line: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
    /// Lines that exceeded [`MAX_LINE`] and were cut.
    pub overflowed: u64,
}

impl Decoder {
    /// Bytes held for the event being read.
    pub fn buffered(&self) -> usize {
        self.line.capacity() + self.data.as_ref().map_or(0, String::capacity) + self.event.as_ref().map_or(0, String::capacity)
    }

    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<SseEvent>) {
        // Whole lines at a time (memchr), not byte by byte: this runs for every
        // chunk of every stream.
        while let Some(end) = memchr::memchr(b'\n', bytes) {
            self.append(&bytes[..end]);
            bytes = &bytes[end + 1..];
            let mut line = std::mem::take(&mut self.line);
            let len = line.len() - usize::from(line.last() == Some(&b'\r'));
            self.line_done(&line[..len], out);
            // The buffer is kept for the next line unless an outsized line grew it.
            if line.capacity() <= KEPT_LINE_CAPACITY {
                line.clear();
                self.line = line;
            }
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

    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, out);
        }
        self.dispatch(out);
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            self.dispatch(out);
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
            b"event" => self.event = Some(value.into_owned()),
            b"data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(&value);
                }
                None => self.data = Some(value.into_owned()),
            },
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = self.event.take();
        if let Some(data) = self.data.take() {
            out.push(SseEvent { event, data });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads_are_reassembled() {
        let stream = b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n: ping\n\ndata: line1\ndata: line2\n\ndata: [DONE]";
        let whole = {
            let mut d = Decoder::default();
            let mut out = Vec::new();
            d.feed(stream, &mut out);
            d.finish(&mut out);
            out
        };
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[0], SseEvent { event: Some("message_start".into()), data: "{\"a\":1}".into() });
        assert_eq!(whole[1].data, "line1\nline2");
        assert_eq!(whole[2].data, "[DONE]");
        for piece in [1, 2, 5] {
            let mut d = Decoder::default();
            let mut out = Vec::new();
            for chunk in stream.chunks(piece) {
                d.feed(chunk, &mut out);
            }
            d.finish(&mut out);
            assert_eq!(out, whole, "piece {piece}");
        }
    }
}
