//! The registry of engine workers (one entry per `instance_id`) and its one liveness rule.
//!
//! A worker registers an engine-driven context (`register_kv_cache_engine_driven_context`), a
//! lmcache_driven KV cache (`register_kv_cache`), or both; each registration sits in its own
//! slot of the worker's entry. Liveness is per worker and has one rule for both kinds:
//! - every `ping` and every request that names the instance refreshes `last_seen`;
//! - a worker that has pinged is silent once `last_seen` is older than the reap timeout;
//!   one that never pinged gets the registration grace instead (LMCache's engines ping every
//!   few seconds; a client that never pings is an older or test client);
//! - [`Instances::reap`] removes silent workers whole and hands their registrations back to
//!   the caller, which releases what they own (pending transfers, mappings). A reap timeout of
//!   zero disables reaping.
//!
//! Lock order: the registry `RwLock` is a leaf (held to clone an `Arc` out, or to insert or
//! remove an entry); the per-worker liveness mutex is taken under the read lock only. Values
//! removed from the registry are dropped after the lock is released (dropping a lmcache_driven
//! registration may unmap segments).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use super::engine_driven::Context;
use super::lmcache_driven::LmcacheInstance;

/// Reaping settings.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// A worker silent this long after a ping is removed (0 disables reaping).
    pub reap_timeout: Duration,
    /// A worker that never pinged is removed after this long without a request.
    pub registration_grace: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    registered_at: Instant,
    last_seen: Instant,
    pinged: bool,
}

#[derive(Debug)]
struct Worker {
    engine_driven: Option<Arc<Context>>,
    lmcache_driven: Option<Arc<LmcacheInstance>>,
    seen: Mutex<Seen>,
}

impl Worker {
    fn new(now: Instant) -> Self {
        Self {
            engine_driven: None,
            lmcache_driven: None,
            seen: Mutex::new(Seen {
                registered_at: now,
                last_seen: now,
                pinged: false,
            }),
        }
    }

    fn touch(&self, now: Instant, ping: bool) {
        let mut s = self.seen.lock();
        s.last_seen = s.last_seen.max(now);
        s.pinged |= ping;
    }

    fn is_empty(&self) -> bool {
        self.engine_driven.is_none() && self.lmcache_driven.is_none()
    }
}

/// What a removed worker had registered.
#[derive(Debug, Default)]
pub struct Removed {
    /// The engine-driven context, if any.
    pub engine_driven: Option<Arc<Context>>,
    /// The lmcache_driven registration, if any.
    pub lmcache_driven: Option<Arc<LmcacheInstance>>,
}

/// Liveness of one worker, for the status tree.
#[derive(Debug, Clone, Copy)]
pub struct WorkerLiveness {
    /// Seconds since the worker first registered.
    pub registered_seconds_ago: f64,
    /// Seconds since its last ping or request.
    pub idle_seconds: f64,
    /// Whether it has pinged.
    pub pinged: bool,
}

/// A snapshot of one worker (status tree).
#[derive(Debug, Clone)]
pub struct WorkerSnapshot {
    /// Instance id.
    pub instance_id: i64,
    /// Engine-driven context.
    pub engine_driven: Option<Arc<Context>>,
    /// lmcache_driven registration.
    pub lmcache_driven: Option<Arc<LmcacheInstance>>,
    /// Liveness.
    pub liveness: WorkerLiveness,
}

/// The registry.
#[derive(Debug)]
pub struct Instances {
    workers: RwLock<HashMap<i64, Worker>>,
    liveness: Liveness,
}

impl Instances {
    /// An empty registry.
    pub fn new(liveness: Liveness) -> Self {
        Self {
            workers: RwLock::new(HashMap::new()),
            liveness,
        }
    }

    /// Reaping settings.
    pub fn liveness(&self) -> Liveness {
        self.liveness
    }

    /// Registered workers (O(1) under a brief read lock).
    pub fn len(&self) -> usize {
        self.workers.read().len()
    }

    /// Whether no worker is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `ping(instance_id)`: refreshes the worker's liveness and latches "has pinged".
    pub fn ping(&self, instance_id: i64, now: Instant) {
        if let Some(w) = self.workers.read().get(&instance_id) {
            w.touch(now, true);
        }
    }

    /// Sets the worker's engine-driven context; returns the one it replaces.
    pub fn register_engine_driven(
        &self,
        instance_id: i64,
        ctx: Context,
        now: Instant,
    ) -> Option<Arc<Context>> {
        let mut map = self.workers.write();
        let w = map.entry(instance_id).or_insert_with(|| Worker::new(now));
        w.touch(now, false);
        w.engine_driven.replace(Arc::new(ctx))
    }

    /// Sets the worker's lmcache_driven registration; returns the one it replaces (drop it
    /// outside any lock).
    pub fn register_lmcache_driven(
        &self,
        instance_id: i64,
        inst: LmcacheInstance,
        now: Instant,
    ) -> Option<Arc<LmcacheInstance>> {
        let mut map = self.workers.write();
        let w = map.entry(instance_id).or_insert_with(|| Worker::new(now));
        w.touch(now, false);
        w.lmcache_driven.replace(Arc::new(inst))
    }

    /// Removes the worker's engine-driven context.
    pub fn unregister_engine_driven(&self, instance_id: i64) -> Option<Arc<Context>> {
        self.remove_slot(instance_id, |w| w.engine_driven.take())
    }

    /// Removes the worker's lmcache_driven registration.
    pub fn unregister_lmcache_driven(&self, instance_id: i64) -> Option<Arc<LmcacheInstance>> {
        self.remove_slot(instance_id, |w| w.lmcache_driven.take())
    }

    fn remove_slot<T>(&self, instance_id: i64, take: impl FnOnce(&mut Worker) -> T) -> T
    where
        T: Default,
    {
        let mut map = self.workers.write();
        let Some(w) = map.get_mut(&instance_id) else {
            return T::default();
        };
        let out = take(w);
        if w.is_empty() {
            map.remove(&instance_id);
        }
        out
    }

    /// The worker's engine-driven context (refreshes its liveness).
    pub fn engine_driven(&self, instance_id: i64, now: Instant) -> Option<Arc<Context>> {
        let map = self.workers.read();
        let w = map.get(&instance_id)?;
        w.touch(now, false);
        w.engine_driven.clone()
    }

    /// The worker's lmcache_driven registration (refreshes its liveness).
    pub fn lmcache_driven(&self, instance_id: i64, now: Instant) -> Option<Arc<LmcacheInstance>> {
        let map = self.workers.read();
        let w = map.get(&instance_id)?;
        w.touch(now, false);
        w.lmcache_driven.clone()
    }

    /// The worker's lmcache_driven registration, without counting as activity (admin reads).
    pub fn peek_lmcache_driven(&self, instance_id: i64) -> Option<Arc<LmcacheInstance>> {
        self.workers
            .read()
            .get(&instance_id)
            .and_then(|w| w.lmcache_driven.clone())
    }

    /// Removes every silent worker (see the module docs) and returns what each had
    /// registered. O(workers) under the read lock, then one write lock per silent worker.
    pub fn reap(&self, now: Instant) -> Vec<(i64, Removed)> {
        let l = self.liveness;
        if l.reap_timeout.is_zero() {
            return Vec::new();
        }
        let silent = |w: &Worker| {
            let s = *w.seen.lock();
            let limit = if s.pinged {
                l.reap_timeout
            } else {
                l.registration_grace
            };
            now.saturating_duration_since(s.last_seen) > limit
        };
        let dead: Vec<i64> = self
            .workers
            .read()
            .iter()
            .filter(|(_, w)| silent(w))
            .map(|(&iid, _)| iid)
            .collect();
        dead.into_iter()
            .filter_map(|iid| {
                let mut map = self.workers.write();
                // Re-check: it may have pinged since the scan.
                if !map.get(&iid).is_some_and(silent) {
                    return None;
                }
                map.remove(&iid).map(|w| {
                    (
                        iid,
                        Removed {
                            engine_driven: w.engine_driven,
                            lmcache_driven: w.lmcache_driven,
                        },
                    )
                })
            })
            .collect()
    }

    /// Removes every worker (shutdown).
    pub fn drain(&self) -> Vec<(i64, Removed)> {
        let all: Vec<(i64, Worker)> = self.workers.write().drain().collect();
        all.into_iter()
            .map(|(iid, w)| {
                (
                    iid,
                    Removed {
                        engine_driven: w.engine_driven,
                        lmcache_driven: w.lmcache_driven,
                    },
                )
            })
            .collect()
    }

    /// Every worker, sorted by instance id (status tree; clones `Arc`s under the read lock).
    pub fn snapshot(&self, now: Instant) -> Vec<WorkerSnapshot> {
        let mut out: Vec<WorkerSnapshot> = self
            .workers
            .read()
            .iter()
            .map(|(&instance_id, w)| {
                let s = *w.seen.lock();
                WorkerSnapshot {
                    instance_id,
                    engine_driven: w.engine_driven.clone(),
                    lmcache_driven: w.lmcache_driven.clone(),
                    liveness: WorkerLiveness {
                        registered_seconds_ago: now
                            .saturating_duration_since(s.registered_at)
                            .as_secs_f64(),
                        idle_seconds: now.saturating_duration_since(s.last_seen).as_secs_f64(),
                        pinged: s.pinged,
                    },
                }
            })
            .collect();
        out.sort_unstable_by_key(|w| w.instance_id);
        out
    }
}
