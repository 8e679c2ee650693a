//! Enforcement at `SSL_write` entry, before the bytes leave: a process over a limit
//! is signalled at its next LLM request; a gated process has each LLM request copied
//! out and is stopped until user space releases (SIGCONT) or acts on it.
//!
//! Only LLM requests are touched: writes on connections user space marked as LLM
//! traffic, or whose bytes begin an HTTP/1 request to an LLM API path. Every other
//! write of the process goes through untouched.

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_send_signal};
use gauge_common::{
    enforce::{ConnectionKey, LLM_REQUEST_PREFIXES, flag},
    tls::kind,
};

use crate::{
    emit,
    maps::{ENFORCE, LLM_CONNECTIONS, any_enforced},
};

const SIGSTOP: u32 = 19;

/// What enforcement did to a write.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum AtWrite {
    /// Nothing: the write goes ahead.
    Passed,
    /// Copied out and the process stopped until user space decides.
    Held,
    /// The process was signalled; the bytes are not to be sent.
    Blocked,
}

/// Called at every `SSL_write*` entry with the call's arguments.
#[inline(always)]
pub fn at_write(ssl: u64, buf: u64, len: u64) -> AtWrite {
    if !any_enforced() {
        return AtWrite::Passed;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the value is copied out at once.
    let Some(enforcement) = (unsafe { ENFORCE.get(&tgid) }).copied() else { return AtWrite::Passed };
    if !is_llm_request(tgid, ssl, buf) {
        return AtWrite::Passed;
    }
    if enforcement.flags & flag::BLOCK != 0 {
        emit::marker_with(kind::STOPPED, ssl, enforcement.signal);
        // SAFETY: signals the current process, which is the target.
        unsafe { bpf_send_signal(enforcement.signal) };
        AtWrite::Blocked
    } else if enforcement.flags & flag::GATE != 0 {
        emit::call(kind::HELD, ssl, buf, len.min(u32::MAX as u64) as u32);
        // SAFETY: as above; the stop takes effect before the call's first instruction.
        unsafe { bpf_send_signal(SIGSTOP) };
        AtWrite::Held
    } else {
        AtWrite::Passed
    }
}

#[inline(always)]
fn is_llm_request(tgid: u32, ssl: u64, buf: u64) -> bool {
    let key = ConnectionKey { tgid, _pad: 0, ssl };
    // SAFETY: presence check only.
    if unsafe { LLM_CONNECTIONS.get(&key) }.is_some() {
        return true;
    }
    // SAFETY: user memory read through the checked helper.
    let Ok(head) = (unsafe { bpf_probe_read_user(buf as *const [u8; 16]) }) else { return false };
    let mut i = 0;
    while i < LLM_REQUEST_PREFIXES.len() {
        let prefix = LLM_REQUEST_PREFIXES[i];
        let mut j = 0;
        let mut same = true;
        while j < prefix.len() && j < head.len() {
            if head[j] != prefix[j] {
                same = false;
                break;
            }
            j += 1;
        }
        if same {
            return true;
        }
        i += 1;
    }
    false
}
