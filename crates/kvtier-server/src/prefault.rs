//! The background prefault of the L1 segment (`kvtier-l1-prefault`, a one-shot task on the
//! workspace's thread runner), on with `kvtier serve --l1-prefault` or `--l1-init-size-gb`.
//!
//! It allocates and zeroes the segment's pages in 64 MiB pieces from offset 0 upward (the
//! allocator hands out low offsets first, so the pages engines touch first are ready first):
//! the memory is reserved up front and an engine's first write into a page is a bare page-table
//! fault. Off by default: pages allocated in bulk by the server took engines' later writes
//! 1.6–1.95× as long as pages their own first write allocated (docs/performance.md), so the
//! default leaves allocation to the engines, as LMCache does. Off the request path; stops early
//! on shutdown. A failure is not fatal (pages are then allocated on first use) but is shown in
//! the status tree: `/dev/shm` may be filling up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use kvtier_core::periodic::PeriodicThread;
use kvtier_core::shm::ShmSegment;
use kvtier_core::status::{StatusNode, StatusReport};

/// Bytes prefaulted per step (the stop check runs between steps).
const PIECE: usize = 64 << 20;

/// The prefault task and its progress.
#[derive(Debug)]
pub struct Prefault {
    enabled: bool,
    done_bytes: Arc<AtomicU64>,
    total_bytes: u64,
    thread: PeriodicThread,
}

impl Prefault {
    /// Starts prefaulting `segment`, its first `limit` bytes when given (or, when `enabled` is
    /// false, a task that does nothing, so the status tree shape does not depend on the
    /// setting).
    ///
    /// # Errors
    /// The OS error when the thread cannot be spawned.
    pub fn start(
        segment: Arc<ShmSegment>,
        enabled: bool,
        limit: Option<u64>,
    ) -> std::io::Result<Self> {
        let done_bytes = Arc::new(AtomicU64::new(0));
        let total_bytes = limit.map_or(segment.len() as u64, |l| l.min(segment.len() as u64));
        let end = usize::try_from(total_bytes).unwrap_or(segment.len());
        let done = Arc::clone(&done_bytes);
        let thread = PeriodicThread::builder("kvtier-l1-prefault")
            .description("l1 prefault thread")
            .spawn_once(move |stop| {
                if !enabled {
                    return Ok(());
                }
                let t = Instant::now();
                let mut off = 0usize;
                while off < end && !stop.is_stopped() {
                    let len = PIECE.min(end - off);
                    segment.prefault_range(off, len).map_err(|e| {
                        tracing::warn!(error = %e, "l1 prefault stopped; pages will be allocated on first use");
                        e.to_string()
                    })?;
                    off += len;
                    done.store(off as u64, Relaxed);
                }
                tracing::debug!(bytes = off, seconds = t.elapsed().as_secs_f64(), "l1 prefault finished");
                Ok(())
            })?;
        Ok(Self {
            enabled,
            done_bytes,
            total_bytes,
            thread,
        })
    }

    /// The task's thread.
    pub fn thread(&self) -> &PeriodicThread {
        &self.thread
    }

    /// Stops the task early (waits for the piece in progress). Idempotent.
    pub fn stop(&self) {
        self.thread.stop();
    }
}

impl StatusReport for Prefault {
    fn report_status(&self) -> StatusNode {
        let error = self.thread.last_error();
        self.thread
            .status_node()
            .require(error.is_none(), error.unwrap_or_default())
            .field("enabled", self.enabled)
            .field("done_bytes", self.done_bytes.load(Relaxed))
            .field("total_bytes", self.total_bytes)
    }
}
