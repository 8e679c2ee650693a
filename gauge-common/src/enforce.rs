//! What user space asks the probes to enforce, per process, at `SSL_write` entry.

/// Value of the `ENFORCE` map, keyed by tgid.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Enforcement {
    /// [`flag`] bits.
    pub flags: u32,
    /// With [`flag::BLOCK`]: the signal sent at an LLM request (SIGKILL, or SIGSTOP
    /// for an action user space completes).
    pub signal: u32,
}

pub mod flag {
    /// Hold every LLM request (SIGSTOP + a HELD record) until user space releases it.
    pub const GATE: u32 = 1;
    /// The process is over a limit: signal it at its next LLM request.
    pub const BLOCK: u32 = 2;
}

/// Key of the `LLM_CONNECTIONS` map: connections user space recognised as LLM
/// traffic, whose every write is an LLM request's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnectionKey {
    pub tgid: u32,
    pub _pad: u32,
    /// The `SSL*`.
    pub ssl: u64,
}

/// The first bytes of an HTTP/1 request line to an LLM API path (OpenAI and
/// compatible servers, Anthropic, Gemini `/v1beta`, Azure, Ollama). The probe holds
/// a write that starts with one of these before its connection is known.
pub const LLM_REQUEST_PREFIXES: [&[u8]; 3] = [b"POST /v1", b"POST /openai/", b"POST /api/"];
