//! Adapter health: connectivity, last error, the fail-fast gate and the self-healing probe loop.
//!
//! Each adapter owns one [`Health`]. When the adapter sees a backend-level failure (connection
//! refused or dropped, device full) it calls [`Health::mark_down`] with the reason: from then on
//! [`Health::gate`] makes calls that need the backend fail at once with `Unavailable` (counted in
//! `fast_failures_total`), so a dead Redis costs nothing per request and causes no retry storm.
//! A probe task ([`spawn_probe_loop`]) retries the backend with exponential backoff (100 ms
//! doubling to 5 s) and calls [`Health::mark_up`] when it answers again; while healthy it can
//! also send a heartbeat at a fixed interval so an idle adapter notices an outage.
//!
//! The probe loop is a [`BackgroundTask`]: its status (`probe_alive`, `probe_rounds`,
//! `probe_last_error` in the adapter's node) is reported like every other background loop.
//!
//! `up` is an atomic read on every call; the details sit behind a short mutex that is never held
//! across an `.await`.

use std::sync::Weak;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use kvtier_core::metrics::status_fields;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Notify;

use crate::backend::BoxFuture;
use crate::error::L2Error;
use crate::metrics::HealthCounters;
use crate::task::{BackgroundTask, TaskCtx};

/// First retry delay of the probe loop.
pub const PROBE_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay of the probe loop.
pub const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Inner {
    down_reason: Option<String>,
    down_since: Option<Instant>,
    last_error: Option<(String, Instant)>,
}

/// Health state of one adapter.
#[derive(Debug)]
pub struct Health {
    up: AtomicBool,
    inner: Mutex<Inner>,
    wake: Notify,
    /// Errors, fast failures, transitions, probes and heartbeats (catalog entries).
    pub counters: HealthCounters,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

/// A point-in-time view of [`Health`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthSnapshot {
    /// Whether the backend is reachable/usable.
    pub connected: bool,
    /// Why it is not (when `connected` is false).
    pub reason: Option<String>,
    /// Seconds since it went down.
    pub down_for_seconds: Option<f64>,
    /// The last error seen (even while healthy, e.g. one corrupt file).
    pub last_error: Option<String>,
    /// Seconds since the last error.
    pub last_error_age_seconds: Option<f64>,
}

impl Health {
    /// A healthy state.
    pub fn new() -> Self {
        Self {
            up: AtomicBool::new(true),
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
            counters: HealthCounters::default(),
        }
    }

    /// Whether the backend is usable (one atomic load).
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// `Ok` when up; otherwise counts a fast failure and returns `Unavailable` with the reason.
    pub fn gate(&self) -> Result<(), L2Error> {
        if self.is_up() {
            return Ok(());
        }
        self.counters.fast_failures_total.inc();
        let reason = self
            .inner
            .lock()
            .down_reason
            .clone()
            .unwrap_or_else(|| "backend is down".to_owned());
        Err(L2Error::Unavailable(reason))
    }

    /// Records an error without changing health.
    pub fn record_error(&self, msg: impl Into<String>) {
        self.counters.errors_total.inc();
        self.inner.lock().last_error = Some((msg.into(), Instant::now()));
    }

    /// Marks the backend down for `reason` (also recorded as the last error) and wakes the probe
    /// loop. Returns whether this call made the transition.
    pub fn mark_down(&self, adapter: &str, reason: impl Into<String>) -> bool {
        let reason = reason.into();
        let now = Instant::now();
        let was_up = {
            let mut inner = self.inner.lock();
            inner.last_error = Some((reason.clone(), now));
            let was_up = self.up.swap(false, Relaxed);
            if was_up || inner.down_reason.is_none() {
                inner.down_since = Some(now);
            }
            inner.down_reason = Some(reason.clone());
            was_up
        };
        self.counters.errors_total.inc();
        if was_up {
            self.counters.down_transitions_total.inc();
            tracing::warn!(adapter, %reason, "l2 adapter unhealthy; failing its calls fast until it recovers");
            self.wake.notify_one();
        }
        was_up
    }

    /// Marks the backend usable again. Returns whether this call made the transition.
    pub fn mark_up(&self, adapter: &str) -> bool {
        let (was_down, down_for) = {
            let mut inner = self.inner.lock();
            let was_down = !self.up.swap(true, Relaxed);
            let since = inner.down_since.take();
            inner.down_reason = None;
            (was_down, since.map(|s| s.elapsed()))
        };
        if was_down {
            self.counters.recoveries_total.inc();
            tracing::info!(
                adapter,
                down_seconds = down_for.map(|d| d.as_secs_f64()),
                "l2 adapter recovered"
            );
        }
        was_down
    }

    /// A snapshot for status and tests.
    pub fn snapshot(&self) -> HealthSnapshot {
        let inner = self.inner.lock();
        HealthSnapshot {
            connected: self.is_up(),
            reason: inner.down_reason.clone(),
            down_for_seconds: inner.down_since.map(|s| s.elapsed().as_secs_f64()),
            last_error: inner.last_error.as_ref().map(|(m, _)| m.clone()),
            last_error_age_seconds: inner
                .last_error
                .as_ref()
                .map(|(_, t)| t.elapsed().as_secs_f64()),
        }
    }

    /// Counters as JSON for the status tree.
    pub fn counters_json(&self) -> serde_json::Value {
        status_fields(&self.counters).into()
    }
}

/// What the probe loop calls. Implemented by adapters.
pub trait Prober: Send + Sync + 'static {
    /// The adapter's name for logs.
    fn probe_name(&self) -> &str;
    /// The adapter's health.
    fn probe_health(&self) -> &Health;
    /// Tries the backend while it is down; `Ok` means it is usable again (the prober has
    /// re-established whatever it needs, e.g. connections).
    fn probe(&self) -> BoxFuture<'_, Result<(), String>>;
    /// A cheap liveness check while up; `Err` marks the adapter down. `None` disables heartbeats.
    fn heartbeat(&self) -> Option<BoxFuture<'_, Result<(), String>>> {
        None
    }
}

/// A running probe loop (a [`BackgroundTask`] named `l2-health-probe`); dropping it does not
/// stop the loop, [`ProbeLoop::stop`] does (or dropping the adapter: the loop holds it weakly).
#[derive(Debug)]
pub struct ProbeLoop {
    task: BackgroundTask,
}

impl ProbeLoop {
    /// Whether the loop task is running.
    pub fn is_alive(&self) -> bool {
        self.task.is_alive()
    }

    /// The underlying task (rounds: probes and heartbeats; last error: the last failed probe).
    pub fn task(&self) -> &BackgroundTask {
        &self.task
    }

    /// Stops the loop and waits for it.
    pub async fn stop(&self) {
        self.task.stop().await;
    }
}

/// Spawns the probe loop of `prober` on `handle`. The loop holds a weak reference between
/// rounds, so it ends by itself once the adapter is dropped. `heartbeat_interval`: how often to call
/// [`Prober::heartbeat`] while healthy.
pub fn spawn_probe_loop<P: Prober>(
    handle: &tokio::runtime::Handle,
    prober: Weak<P>,
    heartbeat_interval: Duration,
) -> ProbeLoop {
    let task = BackgroundTask::spawn(handle, "l2-health-probe", move |ctx| {
        probe_loop(prober, heartbeat_interval, ctx)
    });
    ProbeLoop { task }
}

async fn probe_loop<P: Prober>(prober: Weak<P>, heartbeat_interval: Duration, mut ctx: TaskCtx) {
    let mut backoff = PROBE_BACKOFF_MIN;
    loop {
        let Some(p) = prober.upgrade() else { return };
        if p.probe_health().is_up() {
            backoff = PROBE_BACKOFF_MIN;
            // Wait for a heartbeat tick, a mark_down, or stop.
            let woken = tokio::select! {
                () = ctx.stopped() => return,
                () = p.probe_health().wake.notified() => true,
                () = tokio::time::sleep(heartbeat_interval) => false,
            };
            if woken {
                continue;
            }
            if let Some(hb) = p.heartbeat() {
                ctx.round();
                p.probe_health().counters.heartbeats_total.inc();
                let result = tokio::select! {
                    () = ctx.stopped() => return,
                    r = hb => r,
                };
                if let Err(e) = result {
                    ctx.error(e.clone());
                    p.probe_health().mark_down(p.probe_name(), e);
                }
            }
        } else {
            drop(p);
            tokio::select! {
                () = ctx.stopped() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            let Some(p) = prober.upgrade() else { return };
            ctx.round();
            p.probe_health().counters.probes_total.inc();
            let result = tokio::select! {
                () = ctx.stopped() => return,
                r = p.probe() => r,
            };
            match result {
                Ok(()) => {
                    p.probe_health().mark_up(p.probe_name());
                    backoff = PROBE_BACKOFF_MIN;
                }
                Err(e) => {
                    tracing::debug!(adapter = p.probe_name(), error = %e, "l2 probe failed");
                    ctx.error(e.clone());
                    p.probe_health().record_error(e);
                    backoff = (backoff * 2).min(PROBE_BACKOFF_MAX);
                }
            }
        }
    }
}
