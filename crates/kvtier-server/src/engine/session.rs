//! Per-request sessions: the incremental hash cache and the lookup locks a request holds.
//!
//! A session is keyed by the client's `request_id`. Lookups record every read lock they take
//! (one [`HeldLock`] per object, with the number of reader locks still unclaimed), retrieves
//! move one lock per object out of the session while the engine copies, and `end_session`,
//! `free_lookup_locks` or the TTL reaper release what is left. Nothing is anonymous: every lock
//! the engine takes on behalf of a request is owned by exactly one session or one pending
//! retrieve, which is how kvtier avoids LMCache's lock leaks.
//!
//! Lock order: the session map lock is never held while a session's own mutex is taken for
//! long (we clone the `Arc` out first); a session mutex may be held while calling into L1.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use kvtier_core::hash::ChunkHashCache;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::ReadLease;
use parking_lot::Mutex;

/// Read locks held on one object on behalf of a session.
#[derive(Debug, Clone, Copy)]
pub struct HeldLock {
    /// The L1 lease.
    pub lease: ReadLease,
    /// Locks not yet consumed by a retrieve or released.
    pub remaining: u32,
}

/// State of the session's last lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefetchState {
    /// No lookup result waiting.
    #[default]
    Idle,
    /// The lookup's L1 prefix is recorded; L2 prefetch request `job` is loading the rest.
    /// The session owns the job: whoever moves the state away from `Pending` takes its result
    /// (query/wait) or cancels it (end_session, expiry, a newer lookup).
    Pending {
        /// PrefetchController request id.
        job: u64,
        /// Chunks found in L1 (already locked and recorded in `locks`).
        l1_chunks: u64,
    },
    /// The lookup finished with this many prefix chunks; consumed by the next query.
    Done(u64),
}

impl PrefetchState {
    /// The pending L2 job, if any.
    pub fn pending_job(&self) -> Option<u64> {
        match self {
            Self::Pending { job, .. } => Some(*job),
            _ => None,
        }
    }
}

/// One request's state.
#[derive(Debug)]
pub struct Session {
    /// Incremental chunk hashes of the request's tokens.
    pub hashes: ChunkHashCache,
    /// Lookup locks held, by object.
    pub locks: HashMap<ObjectKey, HeldLock>,
    /// The lookup result, consumed exactly once.
    pub prefetch: PrefetchState,
    last_used: Instant,
}

impl Session {
    fn new(now: Instant) -> Self {
        Self {
            hashes: ChunkHashCache::new(),
            locks: HashMap::new(),
            prefetch: PrefetchState::Idle,
            last_used: now,
        }
    }

    /// Marks the session as used now (refreshes its TTL).
    pub fn touch(&mut self, now: Instant) {
        self.last_used = now;
    }

    /// Takes every held lock out of the session.
    pub fn drain_locks(&mut self) -> Vec<HeldLock> {
        self.locks.drain().map(|(_, l)| l).collect()
    }
}

/// The session table.
#[derive(Debug)]
pub struct SessionManager {
    map: Mutex<HashMap<String, Arc<Mutex<Session>>>>,
    ttl: Duration,
    /// Sessions created so far.
    pub created_total: AtomicU64,
    /// Sessions removed by the TTL reaper.
    pub expired_total: AtomicU64,
    /// Sessions ended by `end_session`.
    pub ended_total: AtomicU64,
    active: AtomicU64,
}

impl SessionManager {
    /// Creates an empty table whose sessions expire after `ttl` without use.
    pub fn new(ttl: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            ttl,
            created_total: AtomicU64::new(0),
            expired_total: AtomicU64::new(0),
            ended_total: AtomicU64::new(0),
            active: AtomicU64::new(0),
        }
    }

    /// Session TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Number of live sessions (lock-free).
    pub fn active_count(&self) -> u64 {
        self.active.load(Relaxed)
    }

    /// The session of `request_id`, created if missing.
    pub fn get_or_create(&self, request_id: &str, now: Instant) -> Arc<Mutex<Session>> {
        let mut map = self.map.lock();
        if let Some(s) = map.get(request_id) {
            return Arc::clone(s);
        }
        let s = Arc::new(Mutex::new(Session::new(now)));
        map.insert(request_id.to_owned(), Arc::clone(&s));
        self.created_total.fetch_add(1, Relaxed);
        self.active.fetch_add(1, Relaxed);
        s
    }

    /// The session of `request_id`, if it exists.
    pub fn get(&self, request_id: &str) -> Option<Arc<Mutex<Session>>> {
        self.map.lock().get(request_id).cloned()
    }

    /// Removes and returns the session (for `end_session`).
    pub fn remove(&self, request_id: &str) -> Option<Arc<Mutex<Session>>> {
        let s = self.map.lock().remove(request_id);
        if s.is_some() {
            self.active.fetch_sub(1, Relaxed);
            self.ended_total.fetch_add(1, Relaxed);
        }
        s
    }

    /// Removes and returns every session idle for longer than the TTL. `O(sessions)`; run by the
    /// reaper thread, never on the request path. A session whose mutex is held right now is in
    /// use, so it is skipped.
    pub fn take_expired(&self, now: Instant) -> Vec<(String, Arc<Mutex<Session>>)> {
        let mut map = self.map.lock();
        let expired: Vec<String> = map
            .iter()
            .filter(|(_, s)| {
                s.try_lock()
                    .is_some_and(|s| now.saturating_duration_since(s.last_used) > self.ttl)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let out: Vec<_> = expired
            .into_iter()
            .filter_map(|k| map.remove(&k).map(|s| (k, s)))
            .collect();
        self.active.fetch_sub(out.len() as u64, Relaxed);
        self.expired_total.fetch_add(out.len() as u64, Relaxed);
        out
    }

    /// Removes every session (shutdown / clear). Returns them for lock release.
    pub fn take_all(&self) -> Vec<Arc<Mutex<Session>>> {
        let mut map = self.map.lock();
        let out: Vec<_> = map.drain().map(|(_, s)| s).collect();
        self.active.fetch_sub(out.len() as u64, Relaxed);
        out
    }
}
