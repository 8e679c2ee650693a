//! Process lifecycle: tells user space when a process executes a new program, so
//! that it can look for TLS libraries to hook in it without polling `/proc`.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use gauge_common::tls::kind;

use crate::emit;

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`,
/// as a raw tracepoint so that no tracefs mount is needed. The record carries only
/// the task identity: user space reads `/proc/PID/exe` and `/proc/PID/maps`.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_ctx: RawTracePointContext) -> i32 {
    emit::marker(kind::EXEC, 0);
    0
}
