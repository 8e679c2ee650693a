//! Recordings: captured events written to a file and read back (replay).
//!
//! Format (documented in `docs/RECORDING.md`): JSON Lines. The first line is a
//! [`Preamble`]; every further line is one [`Line`] with data in base64. Bytes are
//! redacted by default (see `redact`), keeping their length.

use std::{
    collections::HashMap,
    io::{BufRead, Write},
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};

use super::{
    CaptureEvent, Direction, Payload,
    redact::{H2HeaderBlanker, StreamRedactor},
};

pub const FORMAT: &str = "gauge-recording";
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preamble {
    pub format: String,
    pub version: u32,
    /// Whether credentials were redacted while recording.
    pub redacted: bool,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC at the start, to turn event times into
    /// wall-clock times.
    pub realtime_offset_ns: i128,
}

/// One event as stored. (No `deny_unknown_fields`: serde does not support it
/// together with the flattened, tagged [`What`].)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// CLOCK_MONOTONIC nanoseconds.
    pub t: u64,
    pub tgid: u32,
    pub tid: u32,
    pub cgroup: u64,
    pub comm: String,
    #[serde(flatten)]
    pub what: What,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum What {
    Write { conn: u64, call_len: u32, offset: u32, data: String },
    Read { conn: u64, call_len: u32, offset: u32, data: String },
    Close { conn: u64 },
    Exec,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("recording I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("line {line}: {reason}")]
    Invalid { line: usize, reason: String },
    #[error("not a Gauge recording (first line must be a `{FORMAT}` preamble, version {VERSION})")]
    NotARecording,
}

/// Writes events, redacting each stream's bytes unless told not to.
pub struct Writer<W: Write> {
    out: W,
    redact: bool,
    redactors: HashMap<(u32, u64, Direction), Redactor>,
}

/// How one direction of a connection is redacted, decided by its first bytes.
enum Redactor {
    Http1(StreamRedactor),
    Http2(H2HeaderBlanker),
}

impl<W: Write> Writer<W> {
    pub fn new(mut out: W, redact: bool, realtime_offset_ns: i128) -> Result<Self, RecordingError> {
        let preamble = Preamble { format: FORMAT.into(), version: VERSION, redacted: redact, realtime_offset_ns };
        serde_json::to_writer(&mut out, &preamble).map_err(std::io::Error::from)?;
        out.write_all(b"\n")?;
        out.flush()?;
        Ok(Self { out, redact, redactors: HashMap::new() })
    }

    /// Writes one event; enforcement records (held, stopped) are not part of a
    /// recording: the request's bytes come again as a write when it is released.
    pub fn write(&mut self, event: &CaptureEvent) -> Result<(), RecordingError> {
        let what = match &event.payload {
            Payload::Held { .. } | Payload::Stopped { .. } => return Ok(()),
            Payload::Data { direction, connection, call_len, offset, bytes } => {
                let mut bytes = bytes.to_vec();
                if self.redact {
                    self.redact_chunk(event.tgid, *connection, *direction, &mut bytes);
                }
                let (conn, call_len, offset, data) = (*connection, *call_len, *offset, B64.encode(&bytes));
                match direction {
                    Direction::Write => What::Write { conn, call_len, offset, data },
                    Direction::Read => What::Read { conn, call_len, offset, data },
                }
            }
            Payload::Close { connection } => {
                for direction in [Direction::Write, Direction::Read] {
                    self.redactors.remove(&(event.tgid, *connection, direction));
                }
                What::Close { conn: *connection }
            }
            Payload::Exec => What::Exec,
        };
        let line = Line {
            t: event.timestamp_ns,
            tgid: event.tgid,
            tid: event.tid,
            cgroup: event.cgroup_id,
            comm: event.comm.to_string(),
            what,
        };
        serde_json::to_writer(&mut self.out, &line).map_err(std::io::Error::from)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }

    fn redact_chunk(&mut self, tgid: u32, connection: u64, direction: Direction, bytes: &mut [u8]) {
        let key = (tgid, connection, direction);
        if !self.redactors.contains_key(&key) {
            // HTTP/2 is known from the client's preface; the read side follows it.
            let preface = crate::http::h2::PREFACE;
            let client_h2 = direction == Direction::Write && bytes.starts_with(&preface[..bytes.len().min(preface.len())]);
            let server_h2 = direction == Direction::Read
                && matches!(self.redactors.get(&(tgid, connection, Direction::Write)), Some(Redactor::Http2(_)));
            let redactor = if client_h2 || server_h2 {
                Redactor::Http2(H2HeaderBlanker::new(client_h2))
            } else {
                Redactor::Http1(StreamRedactor::default())
            };
            self.redactors.insert(key, redactor);
        }
        match self.redactors.get_mut(&key) {
            Some(Redactor::Http1(r)) => r.redact(bytes),
            Some(Redactor::Http2(r)) => {
                r.redact(bytes);
                super::redact::redact_tokens(bytes);
            }
            None => {}
        }
    }

    pub fn flush(&mut self) -> Result<(), RecordingError> {
        Ok(self.out.flush()?)
    }
}

/// Which events `gauge-agent record` keeps.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Process names already looked up, by tgid.
    names: HashMap<u32, String>,
}

impl Filter {
    pub fn new(pid: Option<u32>, comm: Option<String>) -> Self {
        Self { pid, comm, names: HashMap::new() }
    }

    /// `comm` matches the thread name or the process's main thread name (worker
    /// threads, e.g. node's, have names of their own).
    pub fn keeps(&mut self, event: &CaptureEvent) -> bool {
        if self.pid.is_some_and(|pid| pid != event.tgid) {
            return false;
        }
        match &self.comm {
            None => true,
            Some(name) if event.comm == name.as_str() => true,
            Some(name) => {
                let process = self.names.entry(event.tgid).or_insert_with(|| {
                    std::fs::read_to_string(format!("/proc/{}/comm", event.tgid))
                        .map(|c| c.trim_end().to_owned())
                        .unwrap_or_default()
                });
                process == name
            }
        }
    }
}

/// Reads a whole recording back into events.
pub fn read(input: impl BufRead) -> Result<(Preamble, Vec<CaptureEvent>), RecordingError> {
    let mut lines = input.lines().enumerate();
    let preamble: Preamble = match lines.next() {
        Some((_, first)) => serde_json::from_str(&first?).map_err(|_| RecordingError::NotARecording)?,
        None => return Err(RecordingError::NotARecording),
    };
    if preamble.format != FORMAT || preamble.version != VERSION {
        return Err(RecordingError::NotARecording);
    }
    let mut events = Vec::new();
    for (index, text) in lines {
        let text = text?;
        if text.trim().is_empty() {
            continue;
        }
        let invalid = |reason: String| RecordingError::Invalid { line: index + 1, reason };
        let line: Line = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let decode = |data: &str| B64.decode(data).map_err(|e| invalid(format!("data: {e}")));
        let payload = match line.what {
            What::Write { conn, call_len, offset, data } => Payload::Data {
                direction: Direction::Write,
                connection: conn,
                call_len,
                offset,
                bytes: decode(&data)?.into(),
            },
            What::Read { conn, call_len, offset, data } => Payload::Data {
                direction: Direction::Read,
                connection: conn,
                call_len,
                offset,
                bytes: decode(&data)?.into(),
            },
            What::Close { conn } => Payload::Close { connection: conn },
            What::Exec => Payload::Exec,
        };
        events.push(CaptureEvent {
            timestamp_ns: line.t,
            tgid: line.tgid,
            tid: line.tid,
            cgroup_id: line.cgroup,
            comm: line.comm.as_str().into(),
            payload,
        });
    }
    Ok((preamble, events))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(direction: Direction, bytes: &[u8]) -> CaptureEvent {
        CaptureEvent {
            timestamp_ns: 5,
            tgid: 7,
            tid: 8,
            cgroup_id: 9,
            comm: "python3".into(),
            payload: Payload::Data { direction, connection: 3, call_len: bytes.len() as u32, offset: 0, bytes: bytes.to_vec().into() },
        }
    }

    #[test]
    fn events_round_trip_through_a_recording() {
        let events = vec![
            data(Direction::Write, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            data(Direction::Read, &[0, 159, 255, 10]),
            CaptureEvent { payload: Payload::Close { connection: 3 }, ..data(Direction::Read, b"") },
            CaptureEvent { payload: Payload::Exec, ..data(Direction::Read, b"") },
        ];
        let mut out = Vec::new();
        let mut writer = Writer::new(&mut out, true, 42).expect("preamble");
        for e in &events {
            writer.write(e).expect("write");
        }
        writer.flush().expect("flush");
        let (preamble, back) = read(out.as_slice()).expect("read");
        assert!(preamble.redacted);
        assert_eq!(preamble.realtime_offset_ns, 42);
        assert_eq!(back, events);
    }

    #[test]
    fn secrets_never_reach_the_file() {
        let mut out = Vec::new();
        let mut writer = Writer::new(&mut out, true, 0).expect("preamble");
        writer.write(&data(Direction::Write, b"POST / HTTP/1.1\r\nAuthorization: Bearer sk-live-0123456789abcdefXYZ\r\n\r\n")).expect("write");
        let (_, back) = read(out.as_slice()).expect("read");
        let Payload::Data { bytes, .. } = &back[0].payload else { panic!("data") };
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains("0123456789abcdef"), "{text}");
        assert!(text.contains("Authorization: ******"));
    }

    #[test]
    fn filters_keep_only_the_asked_process() {
        let event = data(Direction::Write, b"x");
        assert!(Filter::new(None, None).keeps(&event));
        assert!(Filter::new(Some(7), None).keeps(&event));
        assert!(!Filter::new(Some(8), None).keeps(&event));
        assert!(Filter::new(None, Some("python3".into())).keeps(&event));
        // Neither the thread name nor pid 7's process name (pid 7 is not ours).
        assert!(!Filter::new(None, Some("curl".into())).keeps(&event));
        let mine = CaptureEvent { tgid: std::process::id(), comm: "worker".into(), ..event };
        let own_name = std::fs::read_to_string("/proc/self/comm").expect("comm").trim_end().to_owned();
        assert!(Filter::new(None, Some(own_name)).keeps(&mine), "the process name matches a worker thread's event");
    }

    #[test]
    fn broken_files_are_clear_errors() {
        assert!(matches!(read(&b"hello\n"[..]), Err(RecordingError::NotARecording)));
        let mut out = Vec::new();
        Writer::new(&mut out, false, 0).expect("preamble");
        out.extend_from_slice(b"{\"t\":1}\n");
        match read(out.as_slice()) {
            Err(RecordingError::Invalid { line: 2, .. }) => {}
            other => panic!("expected an error on line 2, got {other:?}"),
        }
    }
}
