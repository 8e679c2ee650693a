//! The start-up canary's return probe (see `gauge-agent/src/source/hazards.rs`).
//! What is tested is whether the kernel's way back from a return probe lets a
//! seccomp-confined caller live; the probe only counts that it fired, so a canary
//! whose probe never took effect cannot pass for a safe kernel.

use aya_ebpf::{
    macros::{map, uretprobe},
    maps::Array,
    programs::RetProbeContext,
};

#[map]
static CANARY_HITS: Array<u64> = Array::with_max_entries(1, 0);

#[uretprobe]
pub fn canary_return(_ctx: RetProbeContext) -> u32 {
    if let Some(hits) = CANARY_HITS.get_ptr_mut(0) {
        // SAFETY: a valid map value; one canary process calls once.
        unsafe { *hits += 1 };
    }
    0
}
