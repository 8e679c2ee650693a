//! The live capture: the kernel object, the discovery thread that attaches probes
//! to new files, and the task that drains the ring buffer into typed events
//! (`runtime/ring_reader.rs`).
//!
//! Every event that cannot be delivered is counted, never silently lost: the kernel
//! counts ring-buffer overflows, this module counts decode errors and full queues.

use std::{
    cmp::Reverse,
    fs::File,
    os::fd::AsRawFd,
    collections::BinaryHeap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc as std_mpsc,
    },
    time::{Duration, Instant},
};

use tokio::sync::{Semaphore, mpsc, watch};

mod ring_reader;

use ring_reader::{MAX_BATCH, RingReader};

use super::{
    CaptureEvent, Payload,
    discovery::{self, Candidate, Offer, Planner, Target},
    elf,
    hazards::{self, ReturnProbeState, ReturnProbes},
    kernel::{EnforcementMaps, KernelCapture, KernelError, KernelStats, KernelStatsReader, LoadOptions, raise_memlock_rlimit},
};

/// How the live capture is set up (from the `[capture]` config section).
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    pub load: LoadOptions,
    /// Events buffered between the ring-buffer reader and the pipeline.
    pub queue_events: usize,
    /// The most bytes those events may hold together.
    pub queue_bytes: usize,
    pub extra_targets: Vec<PathBuf>,
    /// `capture.plain_http_ports`: plain-HTTP connections to these ports are captured.
    pub plain_http_ports: Vec<u16>,
    /// `capture.plain_http`: when their tracepoints are attached.
    pub plain_http: PlainHttp,
    /// `capture.rescan_interval`: how often every process is looked at again.
    pub rescan_interval: Duration,
    /// `capture.return_probes`; `load.return_probes` is settled from it at start.
    pub return_probes: ReturnProbes,
}

/// `capture.plain_http`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlainHttp {
    /// Once a process on the host listens on a listed port: the tracepoints cost
    /// every process's reads and writes, so hosts without a local model server
    /// should not pay for them.
    #[default]
    Auto,
    On,
    Off,
}

/// Counters kept in user space; the kernel's own are read through [`KernelStatsReader`].
#[derive(Debug, Default)]
pub struct CaptureCounters {
    pub writes: AtomicU64,
    pub reads: AtomicU64,
    pub closes: AtomicU64,
    pub execs: AtomicU64,
    pub bytes_written: AtomicU64,
    pub bytes_read: AtomicU64,
    pub decode_errors: AtomicU64,
    pub exec_queue_full: AtomicU64,
    /// Enforcement records: LLM requests held at entry, and blocked ones.
    pub held: AtomicU64,
    pub stopped: AtomicU64,
    /// Probes the kernel refused to attach (`gauge_probe_attach_failures_total{reason="attach"}`).
    pub attach_refused: AtomicU64,
    /// TLS libraries named by the linker cache or `capture.extra_targets` that could
    /// not be opened or read as ELF (`reason="unreadable"`).
    pub attach_unreadable: AtomicU64,
    /// Executables with a TLS library compiled in that cannot be hooked
    /// (`reason="unhookable"`), e.g. BoringSSL without symbols in an unknown build.
    pub attach_unhookable: AtomicU64,
    /// Files found in a later rescan at a path whose hooked file was replaced (an
    /// upgrade), hooked anew (`gauge_probe_files_replaced_total`).
    pub files_replaced: AtomicU64,
}

/// What the capture shares with the rest of the agent (metrics, `/targets`), created
/// before the capture starts so the listener can answer while probes attach.
pub struct CaptureState {
    pub counters: CaptureCounters,
    pub targets: watch::Sender<Vec<Target>>,
    kernel: OnceLock<Mutex<KernelStatsReader>>,
    return_probes: OnceLock<ReturnProbeState>,
}

impl CaptureState {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            counters: CaptureCounters::default(),
            targets: watch::Sender::new(Vec::new()),
            kernel: OnceLock::new(),
            return_probes: OnceLock::new(),
        })
    }

    /// Whether return probes are attached, and why; None before the capture starts.
    pub fn return_probes(&self) -> Option<&ReturnProbeState> {
        self.return_probes.get()
    }

    /// The kernel-side counters, zero before the capture has started.
    pub fn kernel_stats(&self) -> KernelStats {
        self.kernel.get().and_then(|m| m.lock().ok().map(|reader| reader.read())).unwrap_or_default()
    }

    pub fn probes_attached(&self) -> usize {
        self.targets.borrow().iter().map(|t| t.probes).sum()
    }
}

/// Delays after an exec at which the process's mappings are looked at again, to
/// catch TLS libraries it loads late (e.g. Python imports `ssl` on demand).
const RESCAN_AFTER: [Duration; 3] = [Duration::from_millis(100), Duration::from_secs(1), Duration::from_secs(5)];

/// Loads the probes, attaches to every TLS library in use or in the linker cache,
/// and starts draining events into the returned channel. Returns once the first
/// attach pass is done. Must be called inside a tokio runtime.
pub fn start(options: CaptureOptions, state: Arc<CaptureState>) -> Result<Capture, KernelError> {
    raise_memlock_rlimit();
    let decision = hazards::decide(
        options.return_probes,
        || hazards::run_canary(hazards::CANARY_TIMEOUT),
        hazards::KernelInfo::current(),
    );
    decision.log();
    let load = LoadOptions { return_probes: decision.on, ..options.load };
    let _ = state.return_probes.set(decision);
    let mut kernel = KernelCapture::load(load)?;
    let auto_plain = options.plain_http == PlainHttp::Auto && !options.plain_http_ports.is_empty();
    // Counting listen(2) calls starts before the first look, so a server that
    // starts listening in between is not missed.
    let mut listens_seen = None;
    if auto_plain {
        match kernel.watch_listens().and_then(|()| kernel.listens()) {
            Ok(count) => listens_seen = Some(count),
            Err(error) => tracing::info!(%error, "listen(2) calls cannot be counted: the sockets tables are read every few seconds instead"),
        }
    }
    let plain_now = match options.plain_http {
        PlainHttp::Off => false,
        PlainHttp::On => true,
        PlainHttp::Auto => super::plain::listening(Path::new("/proc"), &discovery::all_pids(Path::new("/proc")), &options.plain_http_ports),
    };
    let mut plain_pending = false;
    if plain_now {
        follow_plain_http(&mut kernel, &options.plain_http_ports, &state.counters)?;
    } else if auto_plain {
        plain_pending = true;
        tracing::info!(ports = ?options.plain_http_ports, every = ?PLAIN_LISTENER_CHECK, "plain-HTTP capture waits for a local model server: nothing listens on these ports (looked for again within seconds of a listen(2) on the host; capture.plain_http = \"on\" follows them regardless, e.g. for a server on another host)");
    }
    let ring = kernel.take_ring()?;
    let stats = kernel.take_stats()?;
    let enforcement = kernel.take_enforcement()?;

    let mut planner = Planner::default();
    let proc_root = PathBuf::from("/proc");
    let mut initial = discovery::startup_candidates(&options.extra_targets);
    for pid in discovery::all_pids(&proc_root) {
        initial.extend(discovery::process_candidates(&proc_root, pid));
    }
    let mut open = Vec::new();
    for candidate in initial {
        offer(&mut planner, &mut kernel, &mut open, &state.counters, candidate);
    }
    state.targets.send_replace(planner.targets().to_vec());
    let _ = state.kernel.set(Mutex::new(stats));
    tracing::info!(
        targets = planner.targets().len(),
        probes = planner.targets().iter().map(|t| t.probes).sum::<usize>(),
        "TLS capture attached"
    );

    let (exec_tx, exec_rx) = std_mpsc::sync_channel::<u32>(4096);
    std::thread::Builder::new()
        .name("gauge-discovery".into())
        .spawn({
            let state = state.clone();
            let mut rescan = Rescan {
                every: options.rescan_interval,
                extra_targets: options.extra_targets.clone(),
                plain_ports: options.plain_http_ports.clone(),
                plain_pending,
                listens_seen,
                last_full_look: Instant::now(),
            };
            move || discovery_loop(kernel, planner, open, proc_root, exec_rx, &state, &mut rescan)
        })
        .map_err(KernelError::Thread)?;

    // Events go to the pipeline in batches: one per pass over the ring, so the
    // pipeline's thread is woken once per pass, not once per event.
    let batch = options.queue_events.clamp(1, MAX_BATCH);
    let (events_tx, events) = mpsc::channel(options.queue_events.div_ceil(batch));
    let queued = Arc::new(Semaphore::new((options.queue_bytes / PERMIT_BYTES).max(MIN_PERMITS)));
    let reader = RingReader { state, events: events_tx, execs: exec_tx, queued: queued.clone(), batch };
    tokio::spawn(reader.run(ring));
    Ok(Capture { events: Events { events, pending: Vec::new().into_iter(), queued }, enforcement })
}

/// A started capture: its events, and the maps through which policies act in the kernel.
pub struct Capture {
    pub events: Events,
    pub enforcement: EnforcementMaps,
}

/// The captured events waiting for the pipeline, bounded in number and in bytes.
pub struct Events {
    events: mpsc::Receiver<Vec<CaptureEvent>>,
    /// The rest of the batch being handed out.
    pending: std::vec::IntoIter<CaptureEvent>,
    /// Room left for queued bytes, in permits of [`PERMIT_BYTES`].
    queued: Arc<Semaphore>,
}

impl Events {
    /// The next event; `None` once the capture has stopped. Cancel-safe.
    pub async fn recv(&mut self) -> Option<CaptureEvent> {
        loop {
            if let Some(event) = self.pending.next() {
                self.queued.add_permits(permits_of(&event) as usize);
                return Some(event);
            }
            self.pending = self.events.recv().await?.into_iter();
        }
    }

    /// The next event if one is queued already, without waiting: the daemon's loop
    /// takes what came in one go rather than one event per turn of its `select!`.
    pub fn try_recv(&mut self) -> Option<CaptureEvent> {
        if self.pending.len() == 0 {
            self.pending = self.events.try_recv().ok()?.into_iter();
        }
        let event = self.pending.next()?;
        self.queued.add_permits(permits_of(&event) as usize);
        Some(event)
    }

    pub fn is_empty(&self) -> bool {
        self.pending.len() == 0 && self.events.is_empty()
    }
}

impl Drop for Events {
    /// A reader waiting for room learns that nobody will make any.
    fn drop(&mut self) {
        self.queued.close();
    }
}

/// The queue's byte budget is kept in permits of this many bytes.
const PERMIT_BYTES: usize = 1024;
/// Room for the largest record (a 16 KiB chunk), whatever the config says.
const MIN_PERMITS: usize = 64;

/// What an event weighs in the queue's byte budget, in permits. Only data chunks
/// count: the other records are small, and a held request must never wait behind a
/// flood (its process waits, stopped, for the decision).
fn permits_of(event: &CaptureEvent) -> u32 {
    match &event.payload {
        Payload::Data { bytes, .. } => {
            // The event's slice of the arena it shares (see `CaptureEvent::decode`);
            // the little room an arena is left with (at most 4 KiB of each 64 KiB,
            // or the last arena's) is not counted.
            let bytes = std::mem::size_of::<CaptureEvent>() + bytes.len();
            u32::try_from(bytes.div_ceil(PERMIT_BYTES)).unwrap_or(u32::MAX).min(MIN_PERMITS as u32)
        }
        _ => 0,
    }
}

/// Inspects a candidate and attaches to it when it is a new TLS library.
///
/// The file is opened once and then reached as `/proc/self/fd/N`, never again by the
/// candidate's path: `/proc/PID/exe` and `/proc/PID/root/...` vanish when a
/// short-lived process exits mid-attach. The open file is kept in `open` so the
/// path stays valid for the agent's life.
fn offer(planner: &mut Planner, kernel: &mut KernelCapture, open: &mut Vec<File>, counters: &CaptureCounters, candidate: Candidate) {
    // A process's files vanish when it exits: only the files named up front (linker
    // cache, config) count as failures when they cannot be read.
    let named = matches!(candidate.reason, discovery::Reason::LinkerCache | discovery::Reason::Config);
    let (file, id) = match File::open(&candidate.open_path).and_then(|file| discovery::file_id_of(&file).map(|id| (file, id))) {
        Ok(found) => found,
        Err(error) => {
            if named && planner.note_unreadable(&candidate, &error.to_string()) {
                counters.attach_unreadable.fetch_add(1, Relaxed);
                tracing::warn!(path = %candidate.display_path, %error, "cannot open a TLS library to hook");
            }
            return;
        }
    };
    let fd_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    if let Some(previous) = planner.replaced(&candidate, id) {
        counters.files_replaced.fetch_add(1, Relaxed);
        tracing::info!(path = %candidate.display_path, old = ?previous, new = ?id, "a hooked file was replaced (an upgrade?): hooking the new one");
    }
    let shown = candidate.display_path.clone();
    let offer = planner.offer(candidate, id, |_| elf::inspect(&fd_path));
    if let Offer::Unhookable(reason) = &offer {
        counters.attach_unhookable.fetch_add(1, Relaxed);
        tracing::warn!(path = %shown, %reason, "a TLS library is compiled in but cannot be hooked: its calls are not seen");
    }
    if let Offer::Attach(candidate, id, symbols) = offer {
        let (probes, refused, error) = kernel.attach(&fd_path, &symbols);
        counters.attach_refused.fetch_add(refused as u64, Relaxed);
        match &error {
            None => tracing::info!(path = %candidate.display_path, probes, reason = ?candidate.reason, "attached"),
            Some(error) => tracing::warn!(path = %candidate.display_path, probes, refused, %error, "attach incomplete"),
        }
        planner.attached(candidate, id, &symbols, probes, error);
        open.push(file);
    }
}

/// The periodic sweep of every process (and the linker cache and config targets):
/// it finds libraries loaded long after a process started (`dlopen`), which the
/// rescans after an exec miss, and files replaced at a hooked path (upgrades).
struct Rescan {
    every: Duration,
    extra_targets: Vec<PathBuf>,
    plain_ports: Vec<u16>,
    /// `capture.plain_http = "auto"` with no listener seen yet: looked for every
    /// [`PLAIN_LISTENER_CHECK`] if a `listen(2)` happened since the last look.
    plain_pending: bool,
    /// The host's `listen(2)` count at the last look; None when it cannot be
    /// counted, and every check looks.
    listens_seen: Option<u64>,
    /// When the tables were last read whatever the count said.
    last_full_look: Instant,
}

impl Rescan {
    /// Whether a listener may have appeared since the last look: reading the
    /// sockets tables walks the kernel's whole connection hash, per network
    /// namespace, so it is done only when a `listen(2)` was counted.
    /// Every [`PLAIN_FULL_LOOK`] they are read anyway: a listener made where the
    /// tracepoint does not see it (io_uring's listen, a 32-bit task) is found then.
    fn listener_may_have_appeared(&mut self, kernel: &KernelCapture, now: Instant) -> bool {
        if now.saturating_duration_since(self.last_full_look) >= PLAIN_FULL_LOOK {
            self.last_full_look = now;
            if let Ok(count) = kernel.listens() {
                self.listens_seen = self.listens_seen.map(|_| count);
            }
            return true;
        }
        let Some(seen) = self.listens_seen else { return true };
        match kernel.listens() {
            Ok(count) => {
                self.listens_seen = Some(count);
                count != seen
            }
            Err(_) => true,
        }
    }
}

/// How often a local model server is looked for while `plain_http = "auto"` waits
/// for one: a server started after the daemon is followed within this.
const PLAIN_LISTENER_CHECK: Duration = Duration::from_secs(5);
/// How often the sockets tables are read even when no `listen(2)` was counted.
const PLAIN_FULL_LOOK: Duration = Duration::from_secs(300);

/// Attaches the plain-HTTP tracepoints and marks connections already open. Plain
/// HTTP is an addition: where its tracepoints cannot be had (no tracefs, or no
/// right to read it), TLS capture goes on and the failure is counted.
fn follow_plain_http(kernel: &mut KernelCapture, ports: &[u16], counters: &CaptureCounters) -> Result<(), KernelError> {
    match kernel.capture_plain_http(ports) {
        Ok(0) => {}
        Ok(plain) => {
            // After the tracepoints, so a connection made meanwhile is marked either way.
            let open = super::plain::established(Path::new("/proc"), &discovery::all_pids(Path::new("/proc")), ports);
            let marked = kernel.mark_plain_sockets(&open)?;
            tracing::info!(?ports, tracepoints = plain, already_open = marked, "following plain-HTTP connections to local model servers");
        }
        Err(error) => {
            counters.attach_refused.fetch_add(1, Relaxed);
            tracing::warn!(%error, ?ports, "plain-HTTP capture is off: calls to local model servers are not seen (TLS capture is unaffected)");
        }
    }
    Ok(())
}

/// Owns the kernel object: attaching is blocking work (ELF parsing, perf_event_open),
/// so it runs on its own thread, fed by exec events.
fn discovery_loop(
    mut kernel: KernelCapture,
    mut planner: Planner,
    mut open: Vec<File>,
    proc_root: PathBuf,
    execs: std_mpsc::Receiver<u32>,
    state: &CaptureState,
    rescan: &mut Rescan,
) {
    let mut rescans: BinaryHeap<Reverse<(Instant, u32)>> = BinaryHeap::new();
    let mut sweep_at = Instant::now() + rescan.every;
    let mut plain_at = Instant::now() + PLAIN_LISTENER_CHECK;
    loop {
        let mut next_at = rescans.peek().map_or(sweep_at, |Reverse((at, _))| (*at).min(sweep_at));
        if rescan.plain_pending {
            next_at = next_at.min(plain_at);
        }
        let before = planner.targets().len();
        let mut candidates = Vec::new();
        match execs.recv_timeout(next_at.saturating_duration_since(Instant::now())) {
            Ok(pid) => {
                let now = Instant::now();
                rescans.extend(RESCAN_AFTER.iter().map(|d| Reverse((now + *d, pid))));
                candidates = discovery::process_candidates(&proc_root, pid);
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        }
        // What is due runs after an exec as well as after a timeout: on a host that
        // starts processes more often than every few seconds, the timeout never
        // comes.
        let now = Instant::now();
        if now >= sweep_at {
            sweep_at = now + rescan.every;
            candidates.extend(discovery::startup_candidates(&rescan.extra_targets));
            for pid in discovery::all_pids(&proc_root) {
                candidates.extend(discovery::process_candidates(&proc_root, pid));
            }
        }
        if rescan.plain_pending && now >= plain_at {
            plain_at = now + PLAIN_LISTENER_CHECK;
            if rescan.listener_may_have_appeared(&kernel, now)
                && super::plain::listening(&proc_root, &discovery::all_pids(&proc_root), &rescan.plain_ports)
            {
                rescan.plain_pending = false;
                if let Err(error) = follow_plain_http(&mut kernel, &rescan.plain_ports, &state.counters) {
                    tracing::warn!(%error, "plain-HTTP capture could not start");
                }
            }
        }
        while rescans.peek().is_some_and(|Reverse((at, _))| *at <= now) {
            let Some(Reverse((_, pid))) = rescans.pop() else { break };
            candidates.extend(discovery::process_candidates(&proc_root, pid));
        }
        for candidate in candidates {
            offer(&mut planner, &mut kernel, &mut open, &state.counters, candidate);
        }
        if planner.targets().len() != before {
            state.targets.send_replace(planner.targets().to_vec());
        }
    }
}
