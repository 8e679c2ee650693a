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
/// after each `emit::WAKEUP_INTERVAL_NS` (50 ms) and lets the others pass
/// without a wakeup. A wakeup can find its record not yet committed (another CPU's
/// earlier record holds the ring back), and the last records of a burst come
/// after the last wakeup: the reader looks again when no wakeup came for this
/// long, the most such a record waits (a held request's record, and every record
/// of a process under a policy, always wakes the reader). It used to look every
/// 50 ms whether woken or not, which with the kernel's wakeups made about 40
/// thread wakeups a second under a steady stream where 20 do; at 100 ms the
/// daemon's thread woke 26 times a second under the agent-cost bench (a 60 ms
/// fallback with the kernel at 40 ms made it 41). Longer than the kernel's
/// interval, so that a steady stream's wakeups come first.
const FALLBACK: Duration = Duration::from_millis(100);
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
        let mut batch = Vec::with_capacity(self.batch);
        loop {
            if !more {
                let active = active_at.is_some_and(|t| t.elapsed() < QUIET);
                let woken = tokio::time::timeout(if active { FALLBACK } else { QUIET }, fd.readable_mut()).await.ok();
                match woken {
                    // Readiness is cleared before the ring is read, so a wakeup for a
                    // record written after this read is not lost. A wakeup counts as
                    // activity even when its record is not committed yet.
                    Some(Ok(mut guard)) => {
                        guard.clear_ready();
                        active_at = Some(Instant::now());
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
                let event = self.decode(&item);
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
            more = handled == BATCH;
            if more {
                // A flood must not monopolise the runtime's thread.
                tokio::task::yield_now().await;
            }
        }
    }

    /// Decodes and counts one record.
    fn decode(&self, record: &[u8]) -> Option<CaptureEvent> {
        let event = match CaptureEvent::try_from(record) {
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
        batch.push(event);
        batch.len() < self.batch || self.flush(batch).await
    }

    /// Sends the batch (waiting while the queue is full); false once the pipeline is gone.
    async fn flush(&self, batch: &mut Vec<CaptureEvent>) -> bool {
        // Sized up front: grown by pushes, a batch of events was reallocated and
        // copied eight times on its way to 256.
        batch.is_empty() || self.events.send(std::mem::replace(batch, Vec::with_capacity(self.batch))).await.is_ok()
    }
}
