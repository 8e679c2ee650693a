//! The task that drains the ring buffer into batches of typed events for the
//! pipeline, and how it is woken (see `gauge-ebpf` `emit::wakeup`).

use std::{
    sync::{Arc, atomic::Ordering::Relaxed, mpsc as std_mpsc},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{Semaphore, mpsc},
};

use super::{CaptureState, permits_of};
use crate::source::{CaptureEvent, Payload};

/// Records handled before the reader yields to other tasks.
const BATCH: usize = 4096;
/// While records are coming, the kernel wakes the reader for the first record
/// after each `emit::WAKEUP_INTERVAL_NS` (100 ms) and lets the others pass
/// without a wakeup. The last records of a burst come after the last wakeup, and
/// a wakeup can find its record not yet committed (another CPU's earlier record
/// holds the ring back): the reader looks again when no wakeup came for this
/// long, the most the last of a burst waits (a held request's record, and every
/// record of a process under a policy, always wakes the reader; a wakeup that
/// found nothing is followed by a look after [`RELOOK`]). Longer than the kernel's
/// interval, so that a steady stream's wakeups come first. Measured under the
/// agent-cost bench: a 50 ms tick beside the kernel's 50 ms wakeups made about 40
/// thread wakeups a second; a 100 ms fallback, 26; a 60 ms fallback with the
/// kernel at 40 ms, 41; the kernel at 100 ms with this 200 ms fallback cut the
/// daemon's CPU per call by about a third again.
const FALLBACK: Duration = Duration::from_millis(200);
/// When a wakeup found no record, how soon the reader looks again.
const RELOOK: Duration = Duration::from_millis(2);
/// How long after the last record the reader goes on looking every
/// [`FALLBACK`], and how often it looks when idle.
const QUIET: Duration = Duration::from_secs(1);

pub(super) struct RingReader {
    pub(super) state: Arc<CaptureState>,
    pub(super) events: mpsc::Sender<Vec<CaptureEvent>>,
    pub(super) execs: std_mpsc::SyncSender<u32>,
    pub(super) queued: Arc<Semaphore>,
    /// Most events sent at once.
    pub(super) batch: usize,
}

/// Most events in one batch for the pipeline (fewer when `capture.queue_events` is
/// smaller): the queue holds up to `queue_events` in batches of this many.
pub(super) const MAX_BATCH: usize = 256;

impl RingReader {
    pub(super) async fn run(self, ring: RingBuf<MapData>) {
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd for as long
        // as the registration, so the fd cannot be closed or reused while registered.
        let mut fd = match unsafe { AsyncFd::register(ring) } {
            Ok(fd) => fd,
            Err(error) => {
                let (_, error) = error.into_parts();
                tracing::error!(%error, "cannot poll the capture ring buffer; no events will be seen");
                return;
            }
        };
        // The kernel skips the wakeup for most records (see `gauge-ebpf` `emit::wakeup`):
        // once woken, the reader looks at the ring at each wakeup, and FALLBACK after
        // the last look if none came, until it has been quiet for a second; idle, it
        // still looks once a second, so no record waits longer than that for a
        // wakeup that did not come.
        let mut active_at: Option<Instant> = None;
        let mut more = false;
        let mut soon = None;
        let mut batch = Vec::new();
        let mut arena = bytes::BytesMut::new();
        loop {
            let mut woken = false;
            if !more {
                let active = active_at.is_some_and(|t| t.elapsed() < QUIET);
                let wait = soon.take().unwrap_or(if active { FALLBACK } else { QUIET });
                match tokio::time::timeout(wait, fd.readable_mut()).await.ok() {
                    // Readiness is cleared before the ring is read, so a wakeup for a
                    // record written after this read is not lost. A wakeup counts as
                    // activity even when its record is not committed yet.
                    Some(Ok(mut guard)) => {
                        guard.clear_ready();
                        active_at = Some(Instant::now());
                        woken = true;
                    }
                    Some(Err(error)) => {
                        tracing::error!(%error, "polling the capture ring buffer failed");
                        return;
                    }
                    None => {}
                }
            }
            let mut handled = 0;
            while handled < BATCH {
                let Some(item) = fd.get_mut().next() else { break };
                let event = self.decode(&item, &mut arena);
                drop(item);
                handled += 1;
                if let Some(event) = event
                    && !self.forward(event, &mut batch).await
                {
                    return;
                }
            }
            if !self.flush(&mut batch).await {
                return;
            }
            if handled > 0 {
                active_at = Some(Instant::now());
            }
            // A wakeup that found nothing came, most likely, for a record held back
            // by another CPU's earlier one still being written: looked for again
            // shortly, not after FALLBACK (a record of a process under a policy
            // must not wait that long for its decision).
            soon = (woken && handled == 0).then_some(RELOOK);
            more = handled == BATCH;
            if more {
                // A flood must not monopolise the runtime's thread.
                tokio::task::yield_now().await;
            }
        }
    }

    /// Decodes and counts one record.
    fn decode(&self, record: &[u8], arena: &mut bytes::BytesMut) -> Option<CaptureEvent> {
        let event = match CaptureEvent::decode(record, arena) {
            Ok(event) => event,
            Err(error) => {
                self.state.counters.decode_errors.fetch_add(1, Relaxed);
                tracing::debug!(%error, "undecodable capture record");
                return None;
            }
        };
        let c = &self.state.counters;
        match &event.payload {
            Payload::Data { direction: crate::source::Direction::Write, bytes, .. } => {
                c.writes.fetch_add(1, Relaxed);
                c.bytes_written.fetch_add(bytes.len() as u64, Relaxed);
            }
            Payload::Data { direction: crate::source::Direction::Read, bytes, .. } => {
                c.reads.fetch_add(1, Relaxed);
                c.bytes_read.fetch_add(bytes.len() as u64, Relaxed);
            }
            Payload::Close { .. } => {
                c.closes.fetch_add(1, Relaxed);
            }
            Payload::Held { .. } => {
                c.held.fetch_add(1, Relaxed);
            }
            Payload::Stopped { .. } => {
                c.stopped.fetch_add(1, Relaxed);
            }
            Payload::Exec => {
                c.execs.fetch_add(1, Relaxed);
                if self.execs.try_send(event.tgid).is_err() {
                    c.exec_queue_full.fetch_add(1, Relaxed);
                }
            }
        }
        Some(event)
    }

    /// Adds an event to the batch for the pipeline, waiting while the queue is full
    /// in events or bytes; false once the pipeline is gone. Waiting, not dropping:
    /// the kernel ring then fills instead, where each process is held to its share,
    /// so a flooding process cannot crowd the others out of the queue either.
    async fn forward(&self, event: CaptureEvent, batch: &mut Vec<CaptureEvent>) -> bool {
        let permits = permits_of(&event);
        if permits > 0 {
            let taken = match self.queued.try_acquire_many(permits) {
                Ok(taken) => taken,
                Err(tokio::sync::TryAcquireError::Closed) => return false,
                // The queue is full: what is batched goes first, or the pipeline
                // could wait for it while this waits for the pipeline.
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    if !self.flush(batch).await {
                        return false;
                    }
                    match self.queued.acquire_many(permits).await {
                        Ok(taken) => taken,
                        Err(_) => return false,
                    }
                }
            };
            // Given back by `Events::recv` when the pipeline takes the event.
            taken.forget();
        }
        if batch.capacity() == 0 {
            // Sized up front: grown by pushes, a batch of events was reallocated
            // and copied eight times on its way to 256.
            batch.reserve_exact(self.batch);
        }
        batch.push(event);
        batch.len() < self.batch || self.flush(batch).await
    }

    /// Sends the batch (waiting while the queue is full); false once the pipeline is gone.
    async fn flush(&self, batch: &mut Vec<CaptureEvent>) -> bool {
        // The next batch's room is taken at its first event (`forward`), not here:
        // most passes over the ring end with a flush.
        batch.is_empty() || self.events.send(std::mem::take(batch)).await.is_ok()
    }
}
