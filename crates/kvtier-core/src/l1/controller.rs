//! The background L1 maintenance thread (`kvtier-l1-evict`).
//!
//! Every `interval` (and whenever [`EvictionController::wake`] is called) it applies lapsed TTLs
//! and, when usage is at or above the trigger watermark, evicts `eviction_ratio` of the used
//! bytes. Stores do not depend on it: allocation failures evict synchronously in the manager.
//! Its liveness is reported in the status tree; a dead thread makes the node unhealthy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::manager::L1Manager;
use crate::status::{StatusNode, StatusReport};

#[derive(Debug, Default)]
struct Shared {
    stop: Mutex<bool>,
    cv: Condvar,
    woken: AtomicBool,
    alive: AtomicBool,
    crash: AtomicBool,
    rounds: AtomicU64,
    triggered: AtomicU64,
}

/// Handle to the maintenance thread. Stopping is explicit ([`stop`](Self::stop)) and also
/// happens on drop.
#[derive(Debug)]
pub struct EvictionController {
    l1: Arc<L1Manager>,
    shared: Arc<Shared>,
    interval: Duration,
    handle: Mutex<Option<JoinHandle<()>>>,
}

struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Relaxed);
    }
}

impl EvictionController {
    /// Starts the thread.
    pub fn spawn(l1: Arc<L1Manager>, interval: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        shared.alive.store(true, Relaxed);
        let (t_l1, t_shared) = (Arc::clone(&l1), Arc::clone(&shared));
        let handle = std::thread::Builder::new()
            .name("kvtier-l1-evict".into())
            .spawn(move || run(&t_l1, t_shared, interval))?;
        Ok(Self {
            l1,
            shared,
            interval,
            handle: Mutex::new(Some(handle)),
        })
    }

    /// Asks for a round now (e.g. after an allocation failure).
    pub fn wake(&self) {
        self.shared.woken.store(true, Relaxed);
        self.shared.cv.notify_one();
    }

    /// Whether the thread is running.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Relaxed)
    }

    /// Rounds run so far.
    pub fn rounds(&self) -> u64 {
        self.shared.rounds.load(Relaxed)
    }

    /// Rounds that evicted something.
    pub fn triggered_rounds(&self) -> u64 {
        self.shared.triggered.load(Relaxed)
    }

    /// Fault injection for tests of health reporting: makes the thread exit as if it had died.
    #[doc(hidden)]
    pub fn inject_crash(&self) {
        self.shared.crash.store(true, Relaxed);
        self.wake();
    }

    /// Stops and joins the thread. Idempotent.
    pub fn stop(&self) {
        *self.shared.stop.lock() = true;
        self.shared.cv.notify_all();
        if let Some(h) = self.handle.lock().take() {
            // A panic inside the thread has already been reported through `alive`.
            let _joined = h.join();
        }
    }
}

impl Drop for EvictionController {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(l1: &L1Manager, shared: Arc<Shared>, interval: Duration) {
    let _guard = AliveGuard(Arc::clone(&shared));
    loop {
        {
            let mut stop = shared.stop.lock();
            if !*stop && !shared.woken.swap(false, Relaxed) {
                shared.cv.wait_for(&mut stop, interval);
            }
            if *stop {
                return;
            }
        }
        if shared.crash.load(Relaxed) {
            tracing::error!("l1 eviction thread stopping on injected fault");
            return;
        }
        let out = l1.maintenance_round();
        shared.rounds.fetch_add(1, Relaxed);
        if out.objects > 0 {
            shared.triggered.fetch_add(1, Relaxed);
            tracing::debug!(
                objects = out.objects,
                bytes = out.bytes,
                "l1 eviction round"
            );
        }
    }
}

impl StatusReport for EvictionController {
    fn report_status(&self) -> StatusNode {
        let cfg = self.l1.config().eviction;
        let alive = self.is_alive();
        StatusNode::healthy()
            .require(alive, "eviction thread is not running")
            .field("thread_alive", alive)
            .field("eviction_policy", cfg.policy.name())
            .field("trigger_watermark", cfg.trigger_watermark)
            .field("eviction_ratio", cfg.eviction_ratio)
            .field("interval_seconds", self.interval.as_secs_f64())
            .field("round_count_total", self.rounds())
            .field("triggered_round_count_total", self.triggered_rounds())
    }
}
