//! A metered call's identity, for logs: which process (pid and kernel start time, so
//! a reused pid is another process), which connection (`SSL*`), and which exchange on
//! it (HTTP/2 stream, or the HTTP/1 request's number on the connection), plus the
//! request's start (CLOCK_MONOTONIC ns).
//!
//! Why the start time too: an `SSL*` address is reused once the connection is freed,
//! and HTTP/2 stream numbers start again on the next connection; and an HTTP/1 request
//! number counts the requests this daemon saw, which after a restart begins again
//! mid-connection. With the request's start, two different calls never share an
//! identity, in one run or across restarts.

use std::fmt;

/// Where on its connection a call was exchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Exchange {
    /// Not known (calls built outside reassembly).
    #[default]
    Unknown,
    /// The n-th request (from 1) this daemon saw on the connection.
    Http1 { request: u32 },
    Http2 { stream: u32 },
}

/// A call's identity; `Display` gives the `call_id` of the logs:
/// `pid.start_time:connection:h1-N|h2-N:start_ns`, e.g. `4242.918273:7f3a5c001e40:h2-5:8811823990112`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallId {
    pub pid: u32,
    /// Kernel start time of the process (clock ticks since boot, `/proc/PID/stat`);
    /// 0 when the process could not be read (gone, or a replay).
    pub process_start: u64,
    pub connection: u64,
    pub exchange: Exchange,
    pub start_ns: u64,
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}:{:x}:", self.pid, self.process_start, self.connection)?;
        match self.exchange {
            Exchange::Unknown => write!(f, "?")?,
            Exchange::Http1 { request } => write!(f, "h1-{request}")?,
            Exchange::Http2 { stream } => write!(f, "h2-{stream}")?,
        }
        write!(f, ":{}", self.start_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_name_process_connection_exchange_and_start() {
        let id = CallId { pid: 4242, process_start: 918_273, connection: 0x7f3a_5c00_1e40, exchange: Exchange::Http2 { stream: 5 }, start_ns: 88 };
        assert_eq!(id.to_string(), "4242.918273:7f3a5c001e40:h2-5:88");
        let h1 = CallId { exchange: Exchange::Http1 { request: 3 }, ..id };
        assert_eq!(h1.to_string(), "4242.918273:7f3a5c001e40:h1-3:88");
        // The same pid in another process (reused) is another identity.
        assert_ne!(CallId { process_start: 1, ..id }.to_string(), id.to_string());
    }
}
