//! Process lifecycle: tells user space when a process executes a new program, so
//! that it can look for TLS libraries to hook in it without polling `/proc`.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::raw_tracepoint, programs::RawTracePointContext};
use gauge_common::tls::kind;

use crate::{
    emit,
    maps::{READ_ARGS, WRITE_ARGS},
};

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`,
/// as a raw tracepoint so that no tracefs mount is needed. The record carries only
/// the task identity: user space reads `/proc/PID/exe` and `/proc/PID/maps`.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_ctx: RawTracePointContext) -> i32 {
    emit::marker(kind::EXEC, 0);
    0
}

/// `sched_process_exit(struct task_struct *p)`, for every exiting thread, in its own
/// context: its saved-call entries go with it. They are otherwise kept between
/// calls and overwritten in place (see `SavedCall::live`), so without this the maps
/// would fill with threads long gone and evict calls in flight.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(_ctx: RawTracePointContext) -> i32 {
    let key = bpf_get_current_pid_tgid();
    let _ = WRITE_ARGS.remove(&key);
    let _ = READ_ARGS.remove(&key);
    0
}
