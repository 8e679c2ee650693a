//! Counting-only probes for `cargo xtask bench` (`gauge-agent __probe-floor`): the
//! floor Gauge's own probes are measured against. They fire where Gauge's would and
//! do nothing but count, so the difference is the cost of Gauge's work per hit.
//! The daemon never loads them.

use aya_ebpf::{
    macros::{map, uprobe, uretprobe},
    maps::PerCpuArray,
    programs::{ProbeContext, RetProbeContext},
};

/// Hits: slot 0 entries, slot 1 returns.
#[map]
static FLOOR_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

#[inline(always)]
fn hit(slot: u32) {
    if let Some(count) = FLOOR_HITS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot; a BPF program is not preempted on its CPU.
        unsafe { *count += 1 };
    }
}

#[uprobe]
pub fn floor_entry(_ctx: ProbeContext) -> u32 {
    hit(0);
    0
}

#[uretprobe]
pub fn floor_return(_ctx: RetProbeContext) -> u32 {
    hit(1);
    0
}
