//! The one module that touches aya: loads the embedded eBPF object, attaches its
//! probes to files, and hands out the ring buffer and the kernel-side counters.

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{RawTracePoint, UProbe, uprobe::UProbeScope},
};
use gauge_common::{
    enforce::{ConnectionKey, Enforcement},
    maps::{ENFORCE, EVENTS, GLOBAL_MAX_CALL_BYTES, LLM_CONNECTIONS, STATS, programs as prog},
    tls::{self, stat},
};

use super::elf::TlsSymbols;

/// The eBPF object built by `build.rs`; empty when built with `GAUGE_EBPF_STUB=1`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gauge-ebpf"));

/// (symbol, entry program, return program) for every hooked function.
const HOOKS: [(&str, &str, Option<&str>); 6] = [
    ("SSL_write", prog::SSL_WRITE_ENTRY, Some(prog::SSL_WRITE_RETURN)),
    ("SSL_write_ex", prog::SSL_WRITE_EX_ENTRY, Some(prog::SSL_WRITE_EX_RETURN)),
    ("SSL_read", prog::SSL_READ_ENTRY, Some(prog::SSL_READ_RETURN)),
    ("SSL_read_ex", prog::SSL_READ_EX_ENTRY, Some(prog::SSL_READ_EX_RETURN)),
    ("SSL_shutdown", prog::SSL_SHUTDOWN_ENTRY, None),
    ("SSL_free", prog::SSL_FREE_ENTRY, None),
];

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "this gauge-agent was built without its eBPF object (GAUGE_EBPF_STUB=1); \
         run `cargo xtask setup` and rebuild to capture"
    )]
    StubObject,
    #[error("loading the eBPF object failed: {0}. Gauge needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN) and a kernel >= 5.8 with BTF")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program `{name}`: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF object has no `{0}`: agent and eBPF object are out of step, rebuild both")]
    Missing(&'static str),
    #[error("eBPF map `{name}`: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("cannot start the discovery thread: {0}")]
    Thread(std::io::Error),
    #[error("capture.ring_buffer_bytes = {0} must be a power of two and at least 4096")]
    RingSize(u32),
}

/// Settings the eBPF object is loaded with.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub ring_buffer_bytes: u32,
    pub max_call_bytes: u32,
}

/// The loaded object with its programs loaded and the exec tracepoint attached.
pub struct KernelCapture {
    ebpf: Ebpf,
}

impl KernelCapture {
    pub fn load(options: LoadOptions) -> Result<Self, KernelError> {
        if EBPF_OBJECT.is_empty() {
            return Err(KernelError::StubObject);
        }
        let ring = options.ring_buffer_bytes;
        if !ring.is_power_of_two() || ring < 4096 {
            return Err(KernelError::RingSize(ring));
        }
        let max_call = options.max_call_bytes.min(tls::MAX_CALL_BYTES);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(EVENTS, ring)
            .override_global(GLOBAL_MAX_CALL_BYTES, &max_call, true)
            .load(EBPF_OBJECT)?;
        for (_, entry, ret) in HOOKS {
            for name in std::iter::once(entry).chain(ret) {
                uprobe(&mut ebpf, name)?.load().map_err(|source| KernelError::Program { name, source })?;
            }
        }
        let name = prog::SCHED_PROCESS_EXEC;
        let exec: &mut RawTracePoint = program(&mut ebpf, name)?;
        exec.load().map_err(|source| KernelError::Program { name, source })?;
        exec.attach("sched_process_exec").map_err(|source| KernelError::Program { name, source })?;
        Ok(Self { ebpf })
    }

    /// Attaches every hook whose symbol `symbols` has to the file at `path`, for all
    /// processes. Returns the number of probes attached and the first error, if any
    /// (a file is still useful when, say, `SSL_free` could not be hooked).
    pub fn attach(&mut self, path: &Path, symbols: &TlsSymbols) -> (usize, Option<String>) {
        let mut attached = 0;
        let mut first_error = None;
        for (symbol, entry, ret) in HOOKS {
            let Some(&offset) = symbols.offsets.get(symbol) else { continue };
            for name in std::iter::once(entry).chain(ret) {
                let result = uprobe(&mut self.ebpf, name).and_then(|p| {
                    p.attach(offset, path, UProbeScope::AllProcesses)
                        .map_err(|source| KernelError::Program { name, source })
                });
                match result {
                    Ok(_) => attached += 1,
                    Err(error) => {
                        first_error.get_or_insert_with(|| format!("{symbol}: {}", chain(&error)));
                    }
                }
            }
        }
        (attached, first_error)
    }

    /// The ring buffer of captured records (can be taken once).
    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>, KernelError> {
        let map = self.ebpf.take_map(EVENTS).ok_or(KernelError::Missing(EVENTS))?;
        RingBuf::try_from(map).map_err(|source| KernelError::Map { name: EVENTS, source })
    }

    /// Reader of the kernel-side counters (can be taken once).
    pub fn take_stats(&mut self) -> Result<KernelStatsReader, KernelError> {
        let map = self.ebpf.take_map(STATS).ok_or(KernelError::Missing(STATS))?;
        let array = PerCpuArray::try_from(map).map_err(|source| KernelError::Map { name: STATS, source })?;
        Ok(KernelStatsReader { array })
    }
}

impl KernelCapture {
    /// The maps through which policies act in the kernel (can be taken once).
    pub fn take_enforcement(&mut self) -> Result<EnforcementMaps, KernelError> {
        let map = self.ebpf.take_map(ENFORCE).ok_or(KernelError::Missing(ENFORCE))?;
        let enforce = HashMap::try_from(map).map_err(|source| KernelError::Map { name: ENFORCE, source })?;
        let map = self.ebpf.take_map(LLM_CONNECTIONS).ok_or(KernelError::Missing(LLM_CONNECTIONS))?;
        let connections = HashMap::try_from(map).map_err(|source| KernelError::Map { name: LLM_CONNECTIONS, source })?;
        Ok(EnforcementMaps { enforce, connections })
    }
}

/// What the probes enforce at `SSL_write` entry, per process.
pub struct EnforcementMaps {
    enforce: HashMap<MapData, u32, Enforcement>,
    connections: HashMap<MapData, ConnectionKey, u8>,
}

impl EnforcementMaps {
    pub fn set(&mut self, tgid: u32, enforcement: Enforcement) -> Result<(), aya::maps::MapError> {
        self.enforce.insert(tgid, enforcement, 0)
    }

    pub fn clear(&mut self, tgid: u32) {
        // Absent already is fine: the goal is that it is absent.
        let _ = self.enforce.remove(&tgid);
    }

    /// Every write on this connection is an LLM request's from now on.
    pub fn mark_llm(&mut self, tgid: u32, ssl: u64) -> Result<(), aya::maps::MapError> {
        self.connections.insert(ConnectionKey { tgid, _pad: 0, ssl }, 1, 0)
    }
}

/// An error with its causes, for logs.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(KernelError::Missing(name))?;
    program.try_into().map_err(|source| KernelError::Program { name, source })
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, KernelError> {
    program(ebpf, name)
}

/// Totals of the kernel-side counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub events_submitted: u64,
    pub bytes_submitted: u64,
    pub events_lost: u64,
    pub bytes_lost: u64,
    pub bytes_truncated: u64,
    pub read_faults: u64,
    pub missing_entry: u64,
}

pub struct KernelStatsReader {
    array: PerCpuArray<MapData, u64>,
}

impl KernelStatsReader {
    pub fn read(&self) -> KernelStats {
        let total = |index: u32| -> u64 {
            self.array.get(&index, 0).map(|per_cpu| per_cpu.iter().copied().sum()).unwrap_or(0)
        };
        KernelStats {
            events_submitted: total(stat::EVENTS_SUBMITTED),
            bytes_submitted: total(stat::BYTES_SUBMITTED),
            events_lost: total(stat::EVENTS_LOST),
            bytes_lost: total(stat::BYTES_LOST),
            bytes_truncated: total(stat::BYTES_TRUNCATED),
            read_faults: total(stat::READ_FAULTS),
            missing_entry: total(stat::MISSING_ENTRY),
        }
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones use the memory
/// cgroup, and some sandboxes refuse the raise. So a failure is only a warning.
pub fn raise_memlock_rlimit() {
    let limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11, which account BPF memory to the cgroup"
        );
    }
}
