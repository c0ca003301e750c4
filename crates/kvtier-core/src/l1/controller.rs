//! The background L1 maintenance thread (`kvtier-l1-evict`), run by
//! [`PeriodicThread`](crate::periodic::PeriodicThread).
//!
//! Every `interval` (and whenever [`EvictionController::wake`] is called) it applies lapsed TTLs
//! and, when usage is at or above the trigger watermark, evicts `eviction_ratio` of the used
//! bytes. Stores do not depend on it: allocation failures evict synchronously in the manager.
//! Its liveness is reported in the status tree: a thread that died (a panicking round, an
//! injected fault) makes the node unhealthy with the reason `eviction thread is not running`;
//! one stopped by [`EvictionController::stop`] does not.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::manager::L1Manager;
use crate::metrics::{MetricDesc, MetricKind, MetricSet, MetricUnit, MetricVisitor};
use crate::periodic::PeriodicThread;
use crate::status::{StatusNode, StatusReport};

/// Handle to the maintenance thread. Stopping is explicit ([`stop`](Self::stop)) and also
/// happens on drop.
#[derive(Debug)]
pub struct EvictionController {
    l1: Arc<L1Manager>,
    triggered: Arc<AtomicU64>,
    interval: Duration,
    thread: PeriodicThread,
}

impl EvictionController {
    /// Starts the thread.
    pub fn spawn(l1: Arc<L1Manager>, interval: Duration) -> std::io::Result<Self> {
        let triggered = Arc::new(AtomicU64::new(0));
        let (t_l1, t_triggered) = (Arc::clone(&l1), Arc::clone(&triggered));
        let thread = PeriodicThread::builder("kvtier-l1-evict")
            .essential()
            .interval(interval)
            .description("eviction thread")
            .spawn(move || {
                let out = t_l1.maintenance_round();
                if out.objects > 0 {
                    t_triggered.fetch_add(1, Relaxed);
                    tracing::debug!(
                        objects = out.objects,
                        bytes = out.bytes,
                        "l1 eviction round"
                    );
                }
                Ok(())
            })?;
        Ok(Self {
            l1,
            triggered,
            interval,
            thread,
        })
    }

    /// Asks for a round now (e.g. after an allocation failure).
    pub fn wake(&self) {
        self.thread.wake();
    }

    /// Whether the thread is running.
    pub fn is_alive(&self) -> bool {
        self.thread.is_alive()
    }

    /// Rounds run so far.
    pub fn rounds(&self) -> u64 {
        self.thread.rounds()
    }

    /// Rounds that evicted something.
    pub fn triggered_rounds(&self) -> u64 {
        self.triggered.load(Relaxed)
    }

    /// The runner (round timing, last error, labelled thread metrics).
    pub fn thread(&self) -> &PeriodicThread {
        &self.thread
    }

    /// Fault injection for tests of health reporting: makes the thread exit as if it had died.
    #[doc(hidden)]
    pub fn inject_crash(&self) {
        self.thread.inject_crash();
    }

    /// Stops and joins the thread. Idempotent.
    pub fn stop(&self) {
        self.thread.stop();
    }
}

/// The controller's own metrics (its thread's generic ones are in [`PeriodicThread`]'s set).
static EVICTION_METRICS: [MetricDesc; 3] = [
    MetricDesc {
        name: "kvtier_l1_eviction_rounds",
        status_key: "round_count_total",
        help: "Background eviction rounds run.",
        unit: MetricUnit::None,
        kind: MetricKind::Counter,
    },
    MetricDesc {
        name: "kvtier_l1_eviction_triggered_rounds",
        status_key: "triggered_round_count_total",
        help: "Background eviction rounds that evicted something.",
        unit: MetricUnit::None,
        kind: MetricKind::Counter,
    },
    MetricDesc {
        name: "kvtier_l1_eviction_thread_up",
        status_key: "thread_alive",
        help: "1 while the background eviction thread runs.",
        unit: MetricUnit::None,
        kind: MetricKind::Gauge,
    },
];

impl MetricSet for EvictionController {
    fn descriptors(&self) -> &'static [MetricDesc] {
        &EVICTION_METRICS
    }

    fn visit(&self, v: &mut dyn MetricVisitor) {
        let [rounds, triggered, up] = &EVICTION_METRICS;
        v.counter(rounds, &[], self.rounds());
        v.counter(triggered, &[], self.triggered_rounds());
        v.gauge(up, &[], f64::from(u8::from(self.is_alive())));
    }
}

impl StatusReport for EvictionController {
    fn report_status(&self) -> StatusNode {
        let cfg = self.l1.config().eviction;
        self.thread
            .status_node()
            .field("eviction_policy", cfg.policy.name())
            .field("trigger_watermark", cfg.trigger_watermark)
            .field("eviction_ratio", cfg.eviction_ratio)
            .field("interval_seconds", self.interval.as_secs_f64())
            .field("round_count_total", self.rounds())
            .field("triggered_round_count_total", self.triggered_rounds())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l1::L1Config;

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn status_keeps_its_fields_and_a_crash_is_unhealthy_but_a_stop_is_not() {
        let l1 = Arc::new(L1Manager::new(L1Config::with_capacity(1 << 20)));
        let ec =
            EvictionController::spawn(Arc::clone(&l1), Duration::from_secs(3600)).expect("spawn");
        ec.wake();
        wait_until("a woken round", || ec.rounds() == 1);
        let v = ec.report_status().to_value();
        assert_eq!(v["is_healthy"], true);
        assert_eq!(v["thread_alive"], true);
        assert_eq!(v["thread_name"], "kvtier-l1-evict");
        assert_eq!(v["round_count_total"], 1);
        assert_eq!(v["rounds_total"], 1);
        assert_eq!(v["triggered_round_count_total"], 0);
        assert_eq!(v["interval_seconds"], 3600.0);
        ec.stop();
        assert_eq!(ec.report_status().to_value()["is_healthy"], true);

        let ec = EvictionController::spawn(l1, Duration::from_secs(3600)).expect("spawn");
        ec.inject_crash();
        wait_until("the thread to die", || !ec.is_alive());
        let v = ec.report_status().to_value();
        assert_eq!(v["unhealthy_reason"], "eviction thread is not running");
        assert_eq!(v["last_error"], "injected fault");
    }
}
