//! The whole reassembly -> LLM path: the input is split into alternating writes and
//! reads of one connection, then the connection closes.
#![no_main]
use gauge_agent::{
    reassembly::{Limits, Reassembler},
    source::{CaptureEvent, Direction, Payload},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small limits, so that eviction by count, by idleness and by memory are all
    // reached by ordinary inputs.
    let mut r = Reassembler::new(Limits { max_connections: 4, idle_timeout_ns: 10_000_000_000, max_buffered_bytes: 64 << 10 });
    let mut out = Vec::new();
    let mut t = 0u64;
    // Records are separated by 0xFF: even records are writes, odd are reads.
    for (i, record) in data.split(|&b| b == 0xff).enumerate() {
        t += 1_000_000;
        let direction = if i % 2 == 0 { Direction::Write } else { Direction::Read };
        let event = CaptureEvent {
            timestamp_ns: t,
            tgid: 1,
            tid: 1,
            cgroup_id: 0,
            comm: "fuzz".into(),
            payload: Payload::Data { direction, connection: (i / 8) as u64, call_len: record.len() as u32, offset: 0, bytes: record.to_vec().into() },
        };
        r.feed(&event, &mut out);
    }
    let close = CaptureEvent { timestamp_ns: t + 1, tgid: 1, tid: 1, cgroup_id: 0, comm: "fuzz".into(), payload: Payload::Close { connection: 0 } };
    r.feed(&close, &mut out);
});
