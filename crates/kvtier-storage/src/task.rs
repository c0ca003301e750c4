//! [`BackgroundTask`]: the one way kvtier-storage runs a background loop on a tokio runtime.
//!
//! Every loop (adapter health probes, the store controller, the prefetch dispatcher and its
//! result-expiry tick) is a named task spawned on a runtime handle through this module, so each
//! one is observable the same way and stopped the same way:
//! - `task_alive`: true from spawn until the task's future returns, panics or is aborted (a drop
//!   guard clears it, so a panicking loop shows up as dead in the status tree);
//! - `rounds`: rounds of work the loop reported ([`TaskCtx::round`]; one per tick for
//!   [`BackgroundTask::spawn_periodic`]);
//! - `last_error`: the last error the loop reported ([`TaskCtx::error`]), if any.
//!
//! Stopping: [`BackgroundTask::stop`] signals the loop (a `watch` channel the loop selects on via
//! [`TaskCtx::stopped`]) and awaits it. Loops that drain a channel stop when its senders are
//! gone; their owner waits with [`BackgroundTask::join_within`] and, past the deadline,
//! [`BackgroundTask::abort`]s them.
//!
//! Invariants: the state mutex (last error) is held only to copy a string, never across an
//! `.await`; a task never holds a strong reference that keeps its owner alive unless the owner
//! stops it explicitly.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use kvtier_core::metrics::Counter;
use kvtier_core::status::StatusNode;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug)]
struct TaskState {
    name: &'static str,
    alive: AtomicBool,
    rounds: Counter,
    last_error: Mutex<Option<String>>,
}

/// What a running loop gets: the stop signal and the place to report rounds and errors.
#[derive(Debug)]
pub struct TaskCtx {
    state: Arc<TaskState>,
    stop: watch::Receiver<bool>,
}

impl TaskCtx {
    /// Resolves once a stop was requested (or the [`BackgroundTask`] was dropped).
    pub async fn stopped(&mut self) {
        let _changed = self.stop.wait_for(|stop| *stop).await;
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Counts one round of work.
    pub fn round(&self) {
        self.state.rounds.inc();
    }

    /// Records the last error (also logged at debug level).
    pub fn error(&self, msg: impl Into<String>) {
        let msg = msg.into();
        tracing::debug!(task = self.state.name, error = %msg, "background task error");
        *self.state.last_error.lock() = Some(msg);
    }
}

/// A named background task. See the module docs.
#[derive(Debug)]
pub struct BackgroundTask {
    state: Arc<TaskState>,
    stop: watch::Sender<bool>,
    join: Mutex<Option<JoinHandle<()>>>,
}

impl BackgroundTask {
    /// Spawns `body` on `handle` as the task `name`.
    pub fn spawn<F, Fut>(handle: &tokio::runtime::Handle, name: &'static str, body: F) -> Self
    where
        F: FnOnce(TaskCtx) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let state = Arc::new(TaskState {
            name,
            alive: AtomicBool::new(true),
            rounds: Counter::default(),
            last_error: Mutex::new(None),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let fut = body(TaskCtx {
            state: Arc::clone(&state),
            stop: stop_rx,
        });
        let guard = AliveGuard(Arc::clone(&state));
        let join = handle.spawn(async move {
            let _guard = guard;
            fut.await;
        });
        Self {
            state,
            stop: stop_tx,
            join: Mutex::new(Some(join)),
        }
    }

    /// Spawns a task that calls `tick` every `period` (the first call after one period) until
    /// stopped; each call is a round, and an `Err` is recorded as the last error.
    pub fn spawn_periodic<F, Fut>(
        handle: &tokio::runtime::Handle,
        name: &'static str,
        period: Duration,
        mut tick: F,
    ) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send,
    {
        Self::spawn(handle, name, move |mut ctx| async move {
            let mut interval =
                tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = ctx.stopped() => return,
                    _ = interval.tick() => {}
                }
                ctx.round();
                if let Err(e) = tick().await {
                    ctx.error(e);
                }
            }
        })
    }

    /// The task's name.
    pub fn name(&self) -> &'static str {
        self.state.name
    }

    /// Whether the task is running.
    pub fn is_alive(&self) -> bool {
        self.state.alive.load(Relaxed)
    }

    /// Rounds reported so far.
    pub fn rounds(&self) -> u64 {
        self.state.rounds.get()
    }

    /// The last error reported.
    pub fn last_error(&self) -> Option<String> {
        self.state.last_error.lock().clone()
    }

    /// Asks the loop to stop, without waiting.
    pub fn request_stop(&self) {
        let _sent = self.stop.send(true);
    }

    /// Asks the loop to stop and waits for it.
    pub async fn stop(&self) {
        self.request_stop();
        let join = self.join.lock().take();
        if let Some(j) = join {
            let _joined = j.await;
        }
    }

    /// Waits up to `deadline` for the task to finish by itself (it was told to stop by other
    /// means, e.g. its channel closed). Returns whether it finished; if not, it keeps running
    /// (see [`abort`](Self::abort)).
    pub async fn join_within(&self, deadline: Duration) -> bool {
        let join = self.join.lock().take();
        let Some(mut j) = join else { return true };
        if tokio::time::timeout(deadline, &mut j).await.is_ok() {
            return true;
        }
        *self.join.lock() = Some(j);
        false
    }

    /// Aborts the task and waits until it is gone.
    pub async fn abort(&self) {
        let join = self.join.lock().take();
        if let Some(j) = join {
            j.abort();
            let _aborted = j.await;
        }
    }

    /// Adds `task_alive`, `rounds` and `last_error` (each after `prefix`) to `node`.
    pub fn report(&self, node: StatusNode, prefix: &str) -> StatusNode {
        node.field(format!("{prefix}task_alive"), self.is_alive())
            .field(format!("{prefix}rounds"), self.rounds())
            .field(format!("{prefix}last_error"), self.last_error())
    }
}

struct AliveGuard(Arc<TaskState>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_task_counts_rounds_records_errors_and_stops() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut n = 0u32;
        let t = BackgroundTask::spawn_periodic(
            rt.handle(),
            "test",
            Duration::from_millis(10),
            move || {
                n += 1;
                let r = if n == 2 {
                    Err(format!("round {n}"))
                } else {
                    Ok(())
                };
                async move { r }
            },
        );
        rt.block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while t.rounds() < 3 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        assert!(t.is_alive());
        assert!(t.rounds() >= 3, "{}", t.rounds());
        assert_eq!(t.last_error().as_deref(), Some("round 2"));
        rt.block_on(t.stop());
        assert!(!t.is_alive());
        let rounds = t.rounds();
        let v = t.report(StatusNode::healthy(), "x_").to_value();
        assert_eq!(v["x_task_alive"], false);
        assert_eq!(v["x_rounds"], rounds);
        assert_eq!(v["x_last_error"], "round 2");
    }
}
