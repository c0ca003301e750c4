//! The one runner for kvtier's background OS threads: a named thread that runs a *round*
//! closure every `interval` ([`PeriodicThread`]), or a single long task that should end early on
//! shutdown ([`PeriodicBuilder::spawn_once`]).
//!
//! ```
//! use std::time::Duration;
//! use kvtier_core::periodic::PeriodicThread;
//!
//! let t = PeriodicThread::builder("kvtier-demo")
//!     .interval(Duration::from_secs(1))
//!     .description("demo thread")
//!     .spawn(|| Ok(()))
//!     .expect("spawned");
//! t.wake(); // a round now, not in a second
//! t.stop(); // prompt: signals and joins
//! assert!(!t.is_alive());
//! ```
//!
//! Invariants:
//! - The thread waits on a condition variable, never in a bare `sleep`: [`PeriodicThread::stop`]
//!   and [`PeriodicThread::wake`] act at once. `stop` waits only for a round in progress to end.
//! - Cadence is fixed-rate: round *n* is due at `start + n × interval`; after a stall (a long
//!   round, a suspended process) the missed ticks are skipped, never run in a burst. A
//!   [`wake`](PeriodicThread::wake) runs one extra round at once and leaves the schedule as is.
//!   An interval below 1 ms is raised to 1 ms.
//! - A round returns `Result<(), String>`: an `Err` is logged, counted (`round_errors_total`),
//!   kept as `last_error`, and the loop goes on. A round that *panics* is caught
//!   (`catch_unwind`), logged, kept as `last_error`, and ends the thread: the closure may have
//!   left its state half-updated, so it is never called again and the status turns unhealthy.
//! - A round running longer than its [`stall_after`](PeriodicBuilder::stall_after) (default 30
//!   intervals, at least 5 s) makes the node unhealthy ("... is stalled: its round has been
//!   running for 12.3 s") until it ends; `current_round_seconds` shows the age.
//! - An [`essential`](PeriodicBuilder::essential) thread's death also makes the tree not live
//!   (the liveness probe fails, see [`crate::status`]).
//! - `thread_alive` is cleared by a guard when the thread exits, however it exits.
//! - Health: the node is unhealthy (reason `"<description> is not running"`) when the thread is
//!   not running and was neither stopped on purpose nor, for a one-shot task, finished by
//!   returning. A crash (panic or [`inject_crash`](PeriodicThread::inject_crash)) is unhealthy
//!   even during shutdown.
//! - `stop` is idempotent, runs on drop, and never joins from the runner thread itself (a round
//!   that stops its own handle does not deadlock).
//! - Lock order: the signal mutex and the `last_error` mutex are leaves, held for O(1) work, never
//!   while a round runs. Every other field is a relaxed atomic, so [`PeriodicThread::status_node`]
//!   never waits for a round.
//!
//! A one-shot task ([`PeriodicBuilder::spawn_once`]) runs once, at once, and gets a
//! [`StopToken`] to poll between steps (`while !stop.is_stopped() { … }`); `stop` then ends it
//! early. Example: prefaulting a segment range by range.
//!
//! Shapes of the server's threads on this runner (sketches; `engine`, `segment` and `STEP`
//! are the caller's):
//!
//! ```text
//! // housekeeping: engine.housekeeping() every second, unhealthy if it dies
//! let hk = PeriodicThread::builder("kvtier-housekeep")
//!     .interval(Duration::from_secs(1))
//!     .description("housekeeping thread")
//!     .spawn(move || { engine.housekeeping(); Ok(()) })?;
//!
//! // prefault: one pass over the segment that ends early on shutdown (hk/pf.stop())
//! let pf = PeriodicThread::builder("kvtier-l1-prefault").spawn_once(move |stop| {
//!     let mut off = 0;
//!     while off < segment.len() && !stop.is_stopped() {
//!         let len = STEP.min(segment.len() - off);
//!         segment.prefault_range(off, len).map_err(|e| e.to_string())?;
//!         off += len;
//!     }
//!     Ok(())
//! })?;
//! ```
//!
//! `status_node()` then gives each its `thread_alive`/`rounds_total`/`last_error` fields;
//! a finished prefault is healthy, a failed one keeps its error in `last_error`.

use std::any::Any;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::metrics::{MetricDesc, MetricKind, MetricSet, MetricUnit, MetricVisitor};
use crate::status::{StatusNode, StatusReport};

mod body;

use body::{run_once, run_periodic};

/// The smallest interval a periodic thread runs at.
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// What a round returns: `Err(reason)` is recorded and the loop continues.
pub type RoundResult = Result<(), String>;

/// The catalog entries of every runner, labelled `thread="<OS thread name>"`.
pub static THREAD_METRICS: [MetricDesc; 4] = [
    MetricDesc {
        name: "kvtier_thread_rounds",
        status_key: "rounds_total",
        help: "Rounds run by a background thread (including those that failed).",
        unit: MetricUnit::None,
        kind: MetricKind::Counter,
    },
    MetricDesc {
        name: "kvtier_thread_round_errors",
        status_key: "round_errors_total",
        help: "Rounds of a background thread that returned an error or panicked.",
        unit: MetricUnit::None,
        kind: MetricKind::Counter,
    },
    MetricDesc {
        name: "kvtier_thread_up",
        status_key: "thread_alive",
        help: "1 while the background thread runs.",
        unit: MetricUnit::None,
        kind: MetricKind::Gauge,
    },
    MetricDesc {
        name: "kvtier_thread_last_round_duration",
        status_key: "last_round_seconds",
        help: "Duration of the background thread's latest round.",
        unit: MetricUnit::Seconds,
        kind: MetricKind::Gauge,
    },
];

#[derive(Debug, Default)]
struct Signal {
    stop: bool,
    woken: bool,
}

#[derive(Debug)]
struct Shared {
    name: String,
    description: String,
    essential: bool,
    /// `None` for a one-shot task.
    interval: Option<Duration>,
    signal: Mutex<Signal>,
    cv: Condvar,
    /// Mirrors `signal.stop` for lock-free readers.
    stop_requested: AtomicBool,
    alive: AtomicBool,
    crashed: AtomicBool,
    finished: AtomicBool,
    inject_crash: AtomicBool,
    /// Test-only: milliseconds the next round sleeps before it runs (a stall).
    inject_stall_ms: AtomicU64,
    /// Start of the round in progress (nanoseconds since `epoch`; 0 when idle).
    round_started: AtomicU64,
    epoch: Instant,
    /// A round running longer than this is reported as stalled (`None`: never).
    stall_after: Option<Duration>,
    rounds: AtomicU64,
    round_errors: AtomicU64,
    last_round_nanos: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn record_error(&self, error: String) {
        self.round_errors.fetch_add(1, Relaxed);
        *self.last_error.lock() = Some(error);
    }
}

/// Lets a one-shot task see that it has been asked to stop.
#[derive(Clone)]
pub struct StopToken(Arc<Shared>);

impl fmt::Debug for StopToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StopToken")
            .field("thread", &self.0.name)
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

impl StopToken {
    /// Whether [`PeriodicThread::stop`] has been called.
    pub fn is_stopped(&self) -> bool {
        self.0.stop_requested.load(Relaxed)
    }

    /// Sleeps for `d` unless stopped first; returns whether a stop was requested.
    pub fn wait(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut sig = self.0.signal.lock();
        while !sig.stop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            self.0.cv.wait_for(&mut sig, deadline - now);
        }
        sig.stop
    }
}

/// Configures a [`PeriodicThread`] before it starts.
#[derive(Debug, Clone)]
pub struct PeriodicBuilder {
    name: String,
    interval: Duration,
    description: Option<String>,
    essential: bool,
    stall_after: Option<Duration>,
}

impl PeriodicBuilder {
    /// The process does not work without this thread: its death makes the status tree not live
    /// ([`StatusNode::require_live`]), so a liveness probe restarts the process.
    pub fn essential(mut self) -> Self {
        self.essential = true;
        self
    }

    /// A round running longer than this is reported as stalled (unhealthy, not a liveness
    /// failure: a stalled round may finish). Default: 30 intervals, at least 5 s. One-shot tasks
    /// are never stalled.
    pub fn stall_after(mut self, after: Duration) -> Self {
        self.stall_after = Some(after);
        self
    }

    /// Time between rounds (default 1 s; raised to [`MIN_INTERVAL`]).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// What the health reason calls the thread: `"<description> is not running"` (default
    /// `"thread <name>"`).
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    fn shared(self, interval: Option<Duration>) -> Arc<Shared> {
        let description = self
            .description
            .unwrap_or_else(|| format!("thread {}", self.name));
        Arc::new(Shared {
            name: self.name,
            description,
            essential: self.essential,
            interval,
            signal: Mutex::new(Signal::default()),
            cv: Condvar::new(),
            stop_requested: AtomicBool::new(false),
            alive: AtomicBool::new(true),
            crashed: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            inject_crash: AtomicBool::new(false),
            inject_stall_ms: AtomicU64::new(0),
            round_started: AtomicU64::new(0),
            epoch: Instant::now(),
            stall_after: interval.map(|i| {
                self.stall_after
                    .unwrap_or_else(|| (i * 30).max(Duration::from_secs(5)))
            }),
            rounds: AtomicU64::new(0),
            round_errors: AtomicU64::new(0),
            last_round_nanos: AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
    }

    /// Starts the thread; the first round runs one interval from now (or at the first
    /// [`wake`](PeriodicThread::wake)).
    pub fn spawn<F>(self, round: F) -> std::io::Result<PeriodicThread>
    where
        F: FnMut() -> RoundResult + Send + 'static,
    {
        let interval = self.interval.max(MIN_INTERVAL);
        let shared = self.shared(Some(interval));
        PeriodicThread::start(shared, move |s| run_periodic(s, interval, round))
    }

    /// Starts a one-shot task: `task` runs once, at once, and should poll its [`StopToken`]
    /// between steps so that [`stop`](PeriodicThread::stop) ends it early. Returning (`Ok` or
    /// `Err`) finishes it without making it unhealthy; an `Err` is kept as `last_error`.
    pub fn spawn_once<F>(self, task: F) -> std::io::Result<PeriodicThread>
    where
        F: FnOnce(&StopToken) -> RoundResult + Send + 'static,
    {
        let shared = self.shared(None);
        PeriodicThread::start(shared, move |s| run_once(s, task))
    }
}

/// Handle to a background thread run by this module. Stopping is explicit
/// ([`stop`](Self::stop)) and also happens on drop.
pub struct PeriodicThread {
    shared: Arc<Shared>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for PeriodicThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeriodicThread")
            .field("name", &self.shared.name)
            .field("interval", &self.shared.interval)
            .field("alive", &self.is_alive())
            .field("rounds", &self.rounds())
            .finish()
    }
}

struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Relaxed);
    }
}

impl PeriodicThread {
    /// A builder for a thread with OS name `name` (shown by `top -H`, debuggers and panics).
    pub fn builder(name: impl Into<String>) -> PeriodicBuilder {
        PeriodicBuilder {
            name: name.into(),
            interval: Duration::from_secs(1),
            description: None,
            essential: false,
            stall_after: None,
        }
    }

    /// Starts a periodic thread with the default description (`"thread <name>"`).
    pub fn spawn<F>(name: impl Into<String>, interval: Duration, round: F) -> std::io::Result<Self>
    where
        F: FnMut() -> RoundResult + Send + 'static,
    {
        Self::builder(name).interval(interval).spawn(round)
    }

    fn start(
        shared: Arc<Shared>,
        body: impl FnOnce(Arc<Shared>) + Send + 'static,
    ) -> std::io::Result<Self> {
        let t_shared = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(shared.name.clone())
            .spawn(move || body(t_shared));
        match spawned {
            Ok(h) => Ok(Self {
                shared,
                handle: Mutex::new(Some(h)),
            }),
            Err(e) => {
                shared.alive.store(false, Relaxed);
                Err(e)
            }
        }
    }

    /// The OS thread name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The configured interval (`None` for a one-shot task).
    pub fn interval(&self) -> Option<Duration> {
        self.shared.interval
    }

    /// Asks for a round now. No effect on a one-shot task.
    pub fn wake(&self) {
        self.shared.signal.lock().woken = true;
        self.shared.cv.notify_all();
    }

    /// Whether the thread is running.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Relaxed)
    }

    /// Whether [`stop`](Self::stop) has been called.
    pub fn is_stopped(&self) -> bool {
        self.shared.stop_requested.load(Relaxed)
    }

    /// Whether a one-shot task returned (with `Ok` or `Err`; not when it panicked).
    pub fn is_finished(&self) -> bool {
        self.shared.finished.load(Relaxed)
    }

    /// Whether the thread died from a panic or an injected fault.
    pub fn is_crashed(&self) -> bool {
        self.shared.crashed.load(Relaxed)
    }

    /// Whether the runner is in a state it should be in: running, stopped on purpose, or (one
    /// shot) finished; never after a crash.
    pub fn is_healthy(&self) -> bool {
        !self.is_crashed() && (self.is_alive() || self.is_stopped() || self.is_finished())
    }

    /// Rounds run so far (including failed ones; a one-shot task counts one).
    pub fn rounds(&self) -> u64 {
        self.shared.rounds.load(Relaxed)
    }

    /// Rounds that returned `Err` or panicked.
    pub fn round_errors(&self) -> u64 {
        self.shared.round_errors.load(Relaxed)
    }

    /// Duration of the latest round (zero before the first).
    pub fn last_round_duration(&self) -> Duration {
        Duration::from_nanos(self.shared.last_round_nanos.load(Relaxed))
    }

    /// The latest error (a round's `Err`, a panic message or an injected fault); kept until a
    /// newer error replaces it.
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().clone()
    }

    /// A token that reports [`stop`](Self::stop) (what one-shot tasks receive).
    pub fn stop_token(&self) -> StopToken {
        StopToken(Arc::clone(&self.shared))
    }

    /// Fault injection for tests of health reporting: the thread exits at its next wake-up as if
    /// it had died (recorded as a crash with `last_error = "injected fault"`). Wakes it at once.
    #[doc(hidden)]
    pub fn inject_crash(&self) {
        self.shared.inject_crash.store(true, Relaxed);
        self.wake();
    }

    /// Fault injection for tests of health reporting: the next round first sleeps `for_`, as if
    /// it were stuck (woken at once).
    #[doc(hidden)]
    pub fn inject_stall(&self, for_: Duration) {
        let ms = u64::try_from(for_.as_millis()).unwrap_or(u64::MAX).max(1);
        self.shared.inject_stall_ms.store(ms, Relaxed);
        self.wake();
    }

    /// How long the round in progress has been running (`None` when idle).
    pub fn current_round_age(&self) -> Option<Duration> {
        let started = self.shared.round_started.load(Relaxed);
        (started != 0).then(|| {
            Instant::now()
                .saturating_duration_since(self.shared.epoch + Duration::from_nanos(started))
        })
    }

    /// Signals the thread to stop and joins it. Prompt: a thread waiting for its next round
    /// leaves at once; a round in progress is waited for. Idempotent.
    pub fn stop(&self) {
        {
            let mut sig = self.shared.signal.lock();
            sig.stop = true;
            self.shared.stop_requested.store(true, Relaxed);
        }
        self.shared.cv.notify_all();
        let handle = self.handle.lock().take();
        if let Some(h) = handle {
            if h.thread().id() == std::thread::current().id() {
                // Called from a round: the thread exits when the round returns.
                return;
            }
            // A panic inside the thread was caught and recorded; a join error cannot carry more.
            let _joined = h.join();
        }
    }

    /// The runner's own status fields, in this order: `thread_alive`, `thread_name`,
    /// `rounds_total`, `round_errors_total`, `last_round_seconds`, `last_error`; unhealthy as
    /// described in the module doc. Owners append their own fields.
    pub fn status_node(&self) -> StatusNode {
        let alive = self.is_alive();
        let reason = format!("{} is not running", self.shared.description);
        let node = if self.shared.essential {
            StatusNode::healthy().require_live(self.is_healthy(), reason)
        } else {
            StatusNode::healthy().require(self.is_healthy(), reason)
        };
        let age = self.current_round_age();
        let stalled = match (age, self.shared.stall_after) {
            (Some(age), Some(limit)) if age > limit => Some(age),
            _ => None,
        };
        let node = match stalled {
            Some(age) => node.require(
                false,
                format!(
                    "{} is stalled: its round has been running for {:.1} s",
                    self.shared.description,
                    age.as_secs_f64()
                ),
            ),
            None => node,
        };
        node.field("thread_alive", alive)
            .field("thread_name", &self.shared.name)
            .field("rounds_total", self.rounds())
            .field("round_errors_total", self.round_errors())
            .field(
                "last_round_seconds",
                self.last_round_duration().as_secs_f64(),
            )
            .field("last_error", self.last_error())
            .field(
                "current_round_seconds",
                age.map_or(0.0, |d| d.as_secs_f64()),
            )
    }
}

impl Drop for PeriodicThread {
    fn drop(&mut self) {
        self.stop();
    }
}

impl StatusReport for PeriodicThread {
    fn report_status(&self) -> StatusNode {
        self.status_node()
    }
}

impl MetricSet for PeriodicThread {
    fn descriptors(&self) -> &'static [MetricDesc] {
        &THREAD_METRICS
    }

    fn visit(&self, v: &mut dyn MetricVisitor) {
        let labels = [("thread", self.shared.name.as_str())];
        v.counter(&THREAD_METRICS[0], &labels, self.rounds());
        v.counter(&THREAD_METRICS[1], &labels, self.round_errors());
        v.gauge(
            &THREAD_METRICS[2],
            &labels,
            f64::from(u8::from(self.is_alive())),
        );
        v.gauge(
            &THREAD_METRICS[3],
            &labels,
            self.last_round_duration().as_secs_f64(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{HistogramSnapshot, Labels};
    use std::sync::mpsc;

    const LONG: Duration = Duration::from_secs(3600);

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn stop_is_prompt_and_idempotent() {
        let t = PeriodicThread::spawn("kvtier-test-stop", LONG, || Ok(())).expect("spawn");
        assert!(t.is_alive());
        let start = Instant::now();
        t.stop();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "stop waited out the interval"
        );
        assert!(!t.is_alive());
        assert_eq!(t.rounds(), 0);
        t.stop();
        // Stopped on purpose: healthy.
        let v = t.status_node().to_value();
        assert_eq!(v["is_healthy"], true, "{v}");
        assert_eq!(v["thread_alive"], false);
    }

    #[test]
    fn wake_runs_a_round_early_and_the_thread_is_named() {
        let (tx, rx) = mpsc::channel();
        let t = PeriodicThread::spawn("kvtier-test-wake", LONG, move || {
            let name = std::thread::current().name().map(str::to_owned);
            tx.send(name).map_err(|e| e.to_string())
        })
        .expect("spawn");
        t.wake();
        let name = rx.recv_timeout(Duration::from_secs(5)).expect("a round");
        assert_eq!(name.as_deref(), Some("kvtier-test-wake"));
        wait_until("the round to be counted", || t.rounds() == 1);
        t.wake();
        rx.recv_timeout(Duration::from_secs(5))
            .expect("a second round");
        wait_until("two rounds", || t.rounds() == 2);
        assert_eq!(t.name(), "kvtier-test-wake");
        assert_eq!(t.interval(), Some(LONG));
    }

    #[test]
    fn rounds_follow_the_interval() {
        let t = PeriodicThread::spawn("kvtier-test-tick", Duration::from_millis(5), || Ok(()))
            .expect("spawn");
        wait_until("three rounds", || t.rounds() >= 3);
        t.stop();
    }

    #[test]
    fn a_panic_marks_the_thread_dead_with_the_error() {
        let t = PeriodicThread::builder("kvtier-test-panic")
            .interval(LONG)
            .description("test thread")
            .spawn(|| panic!("boom"))
            .expect("spawn");
        t.wake();
        wait_until("the thread to die", || !t.is_alive());
        assert!(t.is_crashed());
        assert_eq!(t.rounds(), 1);
        assert_eq!(t.round_errors(), 1);
        assert_eq!(t.last_error().as_deref(), Some("panicked: boom"));
        let v = t.status_node().to_value();
        assert_eq!(v["is_healthy"], false);
        assert_eq!(v["unhealthy_reason"], "test thread is not running");
        assert_eq!(v["thread_alive"], false);
        assert_eq!(v["last_error"], "panicked: boom");
        // Stopping a dead thread does not make it healthy again.
        t.stop();
        assert_eq!(t.status_node().to_value()["is_healthy"], false);
    }

    #[test]
    fn an_err_round_is_recorded_and_the_loop_continues() {
        let mut n = 0u32;
        let t = PeriodicThread::spawn("kvtier-test-err", Duration::from_millis(2), move || {
            n += 1;
            if n == 1 {
                Err("first round fails".into())
            } else {
                Ok(())
            }
        })
        .expect("spawn");
        wait_until("rounds after the error", || t.rounds() >= 3);
        assert!(t.is_alive());
        assert_eq!(t.round_errors(), 1);
        assert_eq!(t.last_error().as_deref(), Some("first round fails"));
        let v = t.status_node().to_value();
        assert_eq!(v["is_healthy"], true);
        assert_eq!(v["last_error"], "first round fails");
        assert_eq!(v["round_errors_total"], 1);
        assert_eq!(v["thread_name"], "kvtier-test-err");
    }

    #[test]
    fn inject_crash_ends_the_thread_unhealthy() {
        let t = PeriodicThread::spawn("kvtier-test-crash", LONG, || Ok(())).expect("spawn");
        t.inject_crash();
        wait_until("the thread to exit", || !t.is_alive());
        assert_eq!(t.rounds(), 0);
        let v = t.status_node().to_value();
        assert_eq!(v["is_healthy"], false);
        assert_eq!(
            v["unhealthy_reason"],
            "thread kvtier-test-crash is not running"
        );
        assert_eq!(v["last_error"], "injected fault");
    }

    #[test]
    fn a_one_shot_task_stops_early_and_finishes_healthy() {
        let (tx, rx) = mpsc::channel();
        let t = PeriodicThread::builder("kvtier-test-once")
            .spawn_once(move |stop| {
                let mut steps = 0u64;
                while !stop.wait(Duration::from_millis(1)) {
                    steps += 1;
                    if steps == 1 {
                        tx.send(()).map_err(|e| e.to_string())?;
                    }
                }
                Ok(())
            })
            .expect("spawn");
        rx.recv_timeout(Duration::from_secs(5)).expect("started");
        let start = Instant::now();
        t.stop();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(!t.is_alive());
        assert!(t.is_finished());
        assert_eq!(t.rounds(), 1);
        assert_eq!(t.interval(), None);
        assert_eq!(t.status_node().to_value()["is_healthy"], true);

        // A task that ends on its own is healthy too, even with an error.
        let t = PeriodicThread::builder("kvtier-test-once-err")
            .spawn_once(|_| Err("partial".into()))
            .expect("spawn");
        wait_until("the task to finish", || t.is_finished());
        let v = t.status_node().to_value();
        assert_eq!(v["is_healthy"], true, "{v}");
        assert_eq!(v["last_error"], "partial");
    }

    #[test]
    fn stop_from_inside_a_round_does_not_deadlock() {
        let slot: Arc<Mutex<Option<Arc<PeriodicThread>>>> = Arc::new(Mutex::new(None));
        let s = Arc::clone(&slot);
        let t = Arc::new(
            PeriodicThread::spawn("kvtier-test-self-stop", LONG, move || {
                if let Some(me) = s.lock().take() {
                    me.stop();
                }
                Ok(())
            })
            .expect("spawn"),
        );
        *slot.lock() = Some(Arc::clone(&t));
        t.wake();
        wait_until("the thread to exit", || !t.is_alive());
        assert!(t.is_healthy());
    }

    #[test]
    fn metrics_are_labelled_by_thread() {
        struct V(Vec<(String, String, f64)>);
        impl MetricVisitor for V {
            fn counter(&mut self, d: &'static MetricDesc, l: Labels<'_>, v: u64) {
                self.0.push((d.exposed_name(), l[0].1.to_owned(), v as f64));
            }
            fn gauge(&mut self, d: &'static MetricDesc, l: Labels<'_>, v: f64) {
                self.0.push((d.exposed_name(), l[0].1.to_owned(), v));
            }
            fn histogram(&mut self, _: &'static MetricDesc, _: Labels<'_>, _: &HistogramSnapshot) {}
        }
        let t = PeriodicThread::spawn("kvtier-test-metrics", LONG, || Ok(())).expect("spawn");
        let mut v = V(Vec::new());
        t.visit(&mut v);
        let names: Vec<&str> = v.0.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "kvtier_thread_rounds_total",
                "kvtier_thread_round_errors_total",
                "kvtier_thread_up",
                "kvtier_thread_last_round_duration_seconds"
            ]
        );
        assert!(v.0.iter().all(|(_, l, _)| l == "kvtier-test-metrics"));
        assert_eq!(v.0[2].2, 1.0);
        // Status keys of the catalog match the status node's field names.
        let node = t.status_node().to_value();
        for d in t.descriptors() {
            assert!(node.get(d.status_key).is_some(), "{}", d.status_key);
        }
    }
}
