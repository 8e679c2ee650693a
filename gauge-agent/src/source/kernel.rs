//! The one module that touches aya: loads the embedded eBPF object, attaches its
//! probes to files, and hands out the ring buffer and the kernel-side counters.

use std::{collections::HashSet, num::NonZeroU32, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        RawTracePoint, TracePoint, UProbe,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};
use gauge_common::{
    enforce::{ConnectionKey, Enforcement},
    maps::{
        CANARY_HITS, ENFORCE, ENFORCED, EVENTS, FLOOR_HITS, GLOBAL_MAX_CALL_BYTES, GLOBAL_RING_BYTES, GLOBAL_WRITE_AT_ENTRY, LISTENS, LLM_CONNECTIONS, PLAIN_FDS, PLAIN_PORTS, STATS,
        programs as prog,
    },
    tls::{self, PlainSocket, stat},
};

use super::{elf::TlsSymbols, golang, openssl, tracefs};

/// The eBPF object built by `build.rs`; empty when built with `GAUGE_EBPF_STUB=1`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gauge-ebpf"));

/// What a hooked function does, which decides when its probes are attached (in
/// this order, see [`probe_points`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    /// Ends a connection.
    Close,
    /// Reads plaintext: its entry only saves the buffer for its return.
    Read,
    /// Writes plaintext: its entry emits the bytes itself when return probes are off.
    Write,
}

/// (symbol, entry program, return program, role) for every hooked function.
const HOOKS: [(&str, &str, Option<&str>, Role); 13] = [
    ("SSL_write", prog::SSL_WRITE_ENTRY, Some(prog::SSL_WRITE_RETURN), Role::Write),
    ("SSL_write_ex", prog::SSL_WRITE_EX_ENTRY, Some(prog::SSL_WRITE_EX_RETURN), Role::Write),
    ("SSL_read", prog::SSL_READ_ENTRY, Some(prog::SSL_READ_RETURN), Role::Read),
    ("SSL_read_ex", prog::SSL_READ_EX_ENTRY, Some(prog::SSL_READ_EX_RETURN), Role::Read),
    // OpenSSL 3.0's internal functions take the `_ex` arguments (see `openssl.rs`).
    (openssl::WRITE_INTERNAL, prog::SSL_WRITE_EX_ENTRY, Some(prog::SSL_WRITE_EX_RETURN), Role::Write),
    (openssl::READ_INTERNAL, prog::SSL_READ_EX_ENTRY, Some(prog::SSL_READ_EX_RETURN), Role::Read),
    ("SSL_shutdown", prog::SSL_SHUTDOWN_ENTRY, None, Role::Close),
    ("SSL_free", prog::SSL_FREE_ENTRY, None, Role::Close),
    ("gnutls_record_send2", prog::GNUTLS_SEND_ENTRY, Some(prog::GNUTLS_SEND_RETURN), Role::Write),
    ("gnutls_record_send", prog::GNUTLS_SEND_ENTRY, Some(prog::GNUTLS_SEND_RETURN), Role::Write),
    ("gnutls_record_recv", prog::GNUTLS_RECV_ENTRY, Some(prog::GNUTLS_RECV_RETURN), Role::Read),
    ("gnutls_bye", prog::GNUTLS_CLOSE_ENTRY, None, Role::Close),
    ("gnutls_deinit", prog::GNUTLS_CLOSE_ENTRY, None, Role::Close),
];

/// Go's crypto/tls: (symbol, entry program, program for each of its RETs, role).
/// Plain uprobes all, so they are attached whether return probes are on or off.
const GO_HOOKS: [(&str, &str, Option<&str>, Role); 3] = [
    (golang::WRITE, prog::GO_TLS_WRITE_ENTRY, Some(prog::GO_TLS_WRITE_RETURN), Role::Write),
    (golang::READ, prog::GO_TLS_READ_ENTRY, Some(prog::GO_TLS_READ_RETURN), Role::Read),
    (golang::CLOSE, prog::GO_TLS_CLOSE_ENTRY, None, Role::Close),
];

/// Plain HTTP: each program and the syscall tracepoints it is attached to.
const PLAIN_TRACEPOINTS: [(&str, &[&str]); 7] = [
    (prog::PLAIN_CONNECT_ENTER, &["sys_enter_connect"]),
    (prog::PLAIN_CONNECT_EXIT, &["sys_exit_connect"]),
    (prog::PLAIN_WRITE_ENTER, &["sys_enter_write", "sys_enter_sendto"]),
    (prog::PLAIN_WRITEV_ENTER, &["sys_enter_writev"]),
    (prog::PLAIN_READ_ENTER, &["sys_enter_read", "sys_enter_recvfrom"]),
    (prog::PLAIN_IO_EXIT, &["sys_exit_write", "sys_exit_sendto", "sys_exit_writev", "sys_exit_read", "sys_exit_recvfrom"]),
    (prog::PLAIN_CLOSE_ENTER, &["sys_enter_close"]),
];

/// The programs of one hook that are loaded and attached.
fn hook_programs(
    (_, entry, ret, role): (&'static str, &'static str, Option<&'static str>, Role),
    return_probes: bool,
) -> impl Iterator<Item = &'static str> {
    let entry = (return_probes || role != Role::Read).then_some(entry);
    entry.into_iter().chain(ret.filter(|_| return_probes))
}

/// (symbol, program, file offset) of one probe.
type ProbePoint = (&'static str, &'static str, u64);

/// Every probe a file with `symbols` gets, in the order they are attached: closes, then
/// reads, then writes, and a function's return before its entry. A file's probes
/// go live one at a time while its processes run, so a process is seen from the
/// middle; in this order, whatever it is seen doing is followed by the rest: a
/// request seen is one whose response reads are all seen too (were writes first,
/// a response could be missed, or seen only from its body, while its request was
/// seen), and an entry seen is one whose return is seen.
fn probe_points(symbols: &TlsSymbols, return_probes: bool) -> Vec<ProbePoint> {
    // Sorted by (role, is_entry): `Role` is declared in attach order, and a
    // return (false) comes before its entry (true).
    let mut points: Vec<((Role, bool), ProbePoint)> = Vec::new();
    for hook @ (symbol, entry, _, role) in HOOKS {
        if let Some(&offset) = symbols.offsets.get(symbol) {
            points.extend(hook_programs(hook, return_probes).map(|name| ((role, name == entry), (symbol, name, offset))));
        }
    }
    for (symbol, entry, ret, role) in GO_HOOKS {
        let Some(&offset) = symbols.offsets.get(symbol) else { continue };
        points.push(((role, true), (symbol, entry, offset)));
        let returns = symbols.returns.get(symbol).map(Vec::as_slice).unwrap_or_default();
        points.extend(ret.into_iter().flat_map(|ret| returns.iter().map(move |r| ((role, false), (symbol, ret, *r)))));
    }
    points.sort_by_key(|(rank, _)| *rank);
    points.into_iter().map(|(_, point)| point).collect()
}

/// Every program some hook uses, once (GnuTLS's send and close programs serve two
/// symbols each).
fn programs_to_load(return_probes: bool) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    let go = GO_HOOKS.into_iter().flat_map(|(_, entry, ret, _)| std::iter::once(entry).chain(ret));
    for name in HOOKS.into_iter().flat_map(|hook| hook_programs(hook, return_probes)).chain(go) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

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
    #[error("the uretprobe canary needs a process id, got 0")]
    CanaryPid,
    #[error("plain-HTTP capture needs tracefs, which is not mounted and could not be ({0}): mount it (`mount -t tracefs nodev /sys/kernel/tracing`; in a container, mount the host's /sys/kernel/tracing) or set capture.plain_http_ports = []")]
    Tracefs(std::io::Error),
}

/// Settings the eBPF object is loaded with.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub ring_buffer_bytes: u32,
    pub max_call_bytes: u32,
    /// Whether uretprobes are attached; without them writes are emitted at entry
    /// and reads are not captured (see `source::hazards`).
    pub return_probes: bool,
}

/// The loaded object with its programs loaded and the exec tracepoint attached.
pub struct KernelCapture {
    ebpf: Ebpf,
    return_probes: bool,
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
        let write_at_entry = u32::from(!options.return_probes);
        let ring_bytes = u64::from(ring);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(EVENTS, ring)
            .override_global(GLOBAL_RING_BYTES, &ring_bytes, true)
            .override_global(GLOBAL_MAX_CALL_BYTES, &max_call, true)
            .override_global(GLOBAL_WRITE_AT_ENTRY, &write_at_entry, true)
            .load(EBPF_OBJECT)?;
        for name in programs_to_load(options.return_probes) {
            uprobe(&mut ebpf, name)?.load().map_err(|source| KernelError::Program { name, source })?;
        }
        for name in [prog::SCHED_PROCESS_EXEC, prog::SCHED_PROCESS_EXIT] {
            let tracepoint: &mut RawTracePoint = program(&mut ebpf, name)?;
            tracepoint.load().map_err(|source| KernelError::Program { name, source })?;
            tracepoint.attach(name).map_err(|source| KernelError::Program { name, source })?;
        }
        Ok(Self { ebpf, return_probes: options.return_probes })
    }

    /// Attaches every hook whose symbol `symbols` has to the file at `path`, for all
    /// processes. Returns the number of probes attached, of those refused, and the
    /// first error, if any (a file is still useful when, say, `SSL_free` could not
    /// be hooked).
    pub fn attach(&mut self, path: &Path, symbols: &TlsSymbols) -> (usize, usize, Option<String>) {
        let (mut attached, mut refused, mut first_error) = (0, 0, None);
        for (symbol, name, offset) in probe_points(symbols, self.return_probes) {
            let result = uprobe(&mut self.ebpf, name)
                .and_then(|p| p.attach(offset, path, UProbeScope::AllProcesses).map_err(|source| KernelError::Program { name, source }));
            match result {
                Ok(_) => attached += 1,
                Err(error) => {
                    refused += 1;
                    first_error.get_or_insert_with(|| format!("{symbol} at {offset:#x}: {}", chain(&error)));
                }
            }
        }
        (attached, refused, first_error)
    }

    /// Follows plain-HTTP connections to `ports` from syscall tracepoints (see
    /// `gauge-ebpf/src/probes/plain.rs`); returns the tracepoints attached. Nothing
    /// is attached for no ports, so hosts without local model servers pay nothing.
    pub fn capture_plain_http(&mut self, ports: &[u16]) -> Result<usize, KernelError> {
        if ports.is_empty() {
            return Ok(0);
        }
        let map = self.ebpf.map_mut(PLAIN_PORTS).ok_or(KernelError::Missing(PLAIN_PORTS))?;
        let mut listed: HashMap<_, u16, u8> = HashMap::try_from(map).map_err(|source| KernelError::Map { name: PLAIN_PORTS, source })?;
        for port in ports {
            listed.insert(port, 1, 0).map_err(|source| KernelError::Map { name: PLAIN_PORTS, source })?;
        }
        tracefs::ensure_mounted().map_err(KernelError::Tracefs)?;
        let mut attached = 0;
        for (name, syscalls) in PLAIN_TRACEPOINTS {
            let program: &mut TracePoint = program(&mut self.ebpf, name)?;
            program.load().map_err(|source| KernelError::Program { name, source })?;
            for syscall in syscalls {
                program.attach("syscalls", syscall).map_err(|source| KernelError::Program { name, source })?;
                attached += 1;
            }
        }
        Ok(attached)
    }

    /// Starts counting the host's successful `listen(2)` calls (read with
    /// [`Self::listens`]): `capture.plain_http = "auto"` looks for a local model
    /// server only when the count moved.
    pub fn watch_listens(&mut self) -> Result<(), KernelError> {
        tracefs::ensure_mounted().map_err(KernelError::Tracefs)?;
        let name = prog::PLAIN_LISTEN_EXIT;
        let program: &mut TracePoint = program(&mut self.ebpf, name)?;
        program.load().map_err(|source| KernelError::Program { name, source })?;
        program.attach("syscalls", "sys_exit_listen").map_err(|source| KernelError::Program { name, source })?;
        Ok(())
    }

    /// Successful `listen(2)` calls since [`Self::watch_listens`].
    pub fn listens(&self) -> Result<u64, KernelError> {
        let map = self.ebpf.map(LISTENS).ok_or(KernelError::Missing(LISTENS))?;
        let array = Array::<_, u64>::try_from(map).map_err(|source| KernelError::Map { name: LISTENS, source })?;
        array.get(&0, 0).map_err(|source| KernelError::Map { name: LISTENS, source })
    }

    /// Marks sockets found already connected to a listed port (see `source::plain`),
    /// as `connect` would have; returns how many.
    pub fn mark_plain_sockets(&mut self, sockets: &[(u32, u32)]) -> Result<usize, KernelError> {
        let map = self.ebpf.map_mut(PLAIN_FDS).ok_or(KernelError::Missing(PLAIN_FDS))?;
        let mut marked: HashMap<_, PlainSocket, u64> = HashMap::try_from(map).map_err(|source| KernelError::Map { name: PLAIN_FDS, source })?;
        // Ids with bits 63 and 62 set: never an SSL*, never one the kernel makes from
        // its clock (bit 63 only, and years below 2^62 ns).
        for (i, (tgid, fd)) in sockets.iter().enumerate() {
            let id = 3 << 62 | i as u64;
            marked.insert(PlainSocket { tgid: *tgid, fd: *fd }, id, 0).map_err(|source| KernelError::Map { name: PLAIN_FDS, source })?;
        }
        Ok(sockets.len())
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
        let map = self.ebpf.take_map(ENFORCED).ok_or(KernelError::Missing(ENFORCED))?;
        let count = Array::try_from(map).map_err(|source| KernelError::Map { name: ENFORCED, source })?;
        Ok(EnforcementMaps { enforce, count, entries: HashSet::new(), connections })
    }
}

/// A second, small copy of the eBPF object for the start-up canary, with only its
/// return probe (which counts its hits) loaded: the real object's `WRITE_AT_ENTRY`
/// is fixed at load, so it can only be loaded once the canary has answered.
pub struct CanaryProbe {
    ebpf: Ebpf,
    link: Option<UProbeLinkId>,
}

impl CanaryProbe {
    pub fn load() -> Result<Self, KernelError> {
        if EBPF_OBJECT.is_empty() {
            return Err(KernelError::StubObject);
        }
        // The smallest ring: this copy never carries a record.
        let mut ebpf = EbpfLoader::new().map_max_entries(EVENTS, 4096).load(EBPF_OBJECT)?;
        let name = prog::CANARY_RETURN;
        uprobe(&mut ebpf, name)?.load().map_err(|source| KernelError::Program { name, source })?;
        Ok(Self { ebpf, link: None })
    }

    /// Attaches the return probe to the function at `offset` in `path`, for process
    /// `pid` only: the agent maps the same file and must not be probed itself.
    pub fn attach(&mut self, path: &Path, offset: u64, pid: u32) -> Result<(), KernelError> {
        let pid = NonZeroU32::new(pid).ok_or(KernelError::CanaryPid)?;
        let name = prog::CANARY_RETURN;
        let program = uprobe(&mut self.ebpf, name)?;
        let link = program
            .attach(offset, path, UProbeScope::OneProcess(pid))
            .map_err(|source| KernelError::Program { name, source })?;
        self.link = Some(link);
        Ok(())
    }

    /// How often the return probe fired.
    pub fn hits(&self) -> Result<u64, KernelError> {
        let map = self.ebpf.map(CANARY_HITS).ok_or(KernelError::Missing(CANARY_HITS))?;
        let array = Array::<_, u64>::try_from(map).map_err(|source| KernelError::Map { name: CANARY_HITS, source })?;
        array.get(&0, 0).map_err(|source| KernelError::Map { name: CANARY_HITS, source })
    }

    /// Detaches the return probe (dropping the object would too, later).
    pub fn detach(&mut self) -> Result<(), KernelError> {
        let Some(link) = self.link.take() else { return Ok(()) };
        let name = prog::CANARY_RETURN;
        uprobe(&mut self.ebpf, name)?.detach(link).map_err(|source| KernelError::Program { name, source })
    }
}

/// The benchmark's floor (`gauge-agent __probe-floor`): counting-only probes where
/// Gauge's would be, from another small copy of the object.
pub struct FloorProbe {
    ebpf: Ebpf,
}

impl FloorProbe {
    pub fn load() -> Result<Self, KernelError> {
        if EBPF_OBJECT.is_empty() {
            return Err(KernelError::StubObject);
        }
        let mut ebpf = EbpfLoader::new().map_max_entries(EVENTS, 4096).load(EBPF_OBJECT)?;
        for name in [prog::FLOOR_ENTRY, prog::FLOOR_RETURN] {
            uprobe(&mut ebpf, name)?.load().map_err(|source| KernelError::Program { name, source })?;
        }
        Ok(Self { ebpf })
    }

    /// A counting probe at every entry and return point Gauge would attach to this
    /// file's read and write functions (`symbols`, as discovery found them); how many.
    pub fn attach(&mut self, path: &Path, symbols: &TlsSymbols) -> Result<usize, KernelError> {
        let mut attached = 0;
        for (symbol, _, ret, _) in HOOKS {
            let Some(&offset) = symbols.offsets.get(symbol) else { continue };
            for name in std::iter::once(prog::FLOOR_ENTRY).chain(ret.map(|_| prog::FLOOR_RETURN)) {
                uprobe(&mut self.ebpf, name)?
                    .attach(offset, path, UProbeScope::AllProcesses)
                    .map_err(|source| KernelError::Program { name, source })?;
                attached += 1;
            }
        }
        Ok(attached)
    }

    /// (entries, returns) counted so far.
    pub fn hits(&self) -> Result<(u64, u64), KernelError> {
        let map = self.ebpf.map(FLOOR_HITS).ok_or(KernelError::Missing(FLOOR_HITS))?;
        let array = PerCpuArray::<_, u64>::try_from(map).map_err(|source| KernelError::Map { name: FLOOR_HITS, source })?;
        let total = |slot: u32| array.get(&slot, 0).map(|per_cpu| per_cpu.iter().sum::<u64>());
        let error = |source| KernelError::Map { name: FLOOR_HITS, source };
        Ok((total(0).map_err(error)?, total(1).map_err(error)?))
    }
}

/// What the probes enforce at `SSL_write` entry, per process.
pub struct EnforcementMaps {
    enforce: HashMap<MapData, u32, Enforcement>,
    /// `ENFORCED`: how many entries `enforce` holds, which the probes read to skip
    /// their lookups in it while it is empty.
    count: Array<MapData, u64>,
    /// The tgids in `enforce`, as far as this side knows: one that may still be
    /// there is kept, so the count errs high (a wasted lookup), never low (a policy
    /// skipped).
    entries: HashSet<u32>,
    connections: HashMap<MapData, ConnectionKey, u8>,
}

impl EnforcementMaps {
    pub fn set(&mut self, tgid: u32, enforcement: Enforcement) -> Result<(), aya::maps::MapError> {
        // The entry first, then the count: a probe that reads the count as
        // nonzero must find it.
        self.enforce.insert(tgid, enforcement, 0)?;
        if self.entries.insert(tgid) {
            self.publish()?;
        }
        Ok(())
    }

    pub fn clear(&mut self, tgid: u32) {
        // Absent already is fine: the goal is that it is absent. The count comes
        // down only once the entry is surely gone.
        let gone = self.enforce.remove(&tgid).is_ok() || matches!(self.enforce.get(&tgid, 0), Err(aya::maps::MapError::KeyNotFound));
        if gone && self.entries.remove(&tgid) {
            let _ = self.publish();
        }
    }

    fn publish(&mut self) -> Result<(), aya::maps::MapError> {
        self.count.set(0, self.entries.len() as u64, 0)
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
    /// Refused for taking more than a process's share of a filling ring.
    pub events_throttled: u64,
    pub bytes_throttled: u64,
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
            events_throttled: total(stat::EVENTS_THROTTLED),
            bytes_throttled: total(stat::BYTES_THROTTLED),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_return_probes_only_entries_that_work_alone_are_attached() {
        assert_eq!(programs_to_load(true).len(), 20);
        let entries = programs_to_load(false);
        assert_eq!(
            entries,
            [
                prog::SSL_WRITE_ENTRY,
                prog::SSL_WRITE_EX_ENTRY,
                prog::SSL_SHUTDOWN_ENTRY,
                prog::SSL_FREE_ENTRY,
                prog::GNUTLS_SEND_ENTRY,
                prog::GNUTLS_CLOSE_ENTRY,
                prog::GO_TLS_WRITE_ENTRY,
                prog::GO_TLS_WRITE_RETURN,
                prog::GO_TLS_READ_ENTRY,
                prog::GO_TLS_READ_RETURN,
                prog::GO_TLS_CLOSE_ENTRY,
            ],
            "no uretprobe, and no read entry whose saved buffer no return would use; Go's RET probes are plain uprobes"
        );
    }

    #[test]
    fn a_files_probes_go_live_closes_then_reads_then_writes_returns_before_entries() {
        let mut symbols = TlsSymbols::default();
        for (symbol, offset) in [("SSL_write_ex", 0x10), ("SSL_read_ex", 0x20), ("SSL_free", 0x30)] {
            symbols.offsets.insert(symbol, offset);
        }
        let names: Vec<&str> = probe_points(&symbols, true).into_iter().map(|(_, name, _)| name).collect();
        assert_eq!(
            names,
            [prog::SSL_FREE_ENTRY, prog::SSL_READ_EX_RETURN, prog::SSL_READ_EX_ENTRY, prog::SSL_WRITE_EX_RETURN, prog::SSL_WRITE_EX_ENTRY]
        );

        let mut go = TlsSymbols::default();
        for (symbol, offset) in [(golang::WRITE, 0x100), (golang::READ, 0x200), (golang::CLOSE, 0x300)] {
            go.offsets.insert(symbol, offset);
        }
        go.returns.insert(golang::WRITE, vec![0x110, 0x120]);
        go.returns.insert(golang::READ, vec![0x210, 0x220]);
        let points = probe_points(&go, false);
        let offsets: Vec<u64> = points.iter().map(|(_, _, offset)| *offset).collect();
        assert_eq!(offsets, [0x300, 0x210, 0x220, 0x200, 0x110, 0x120, 0x100], "{points:?}");
    }
}
