//! Per-request sessions: the incremental hash cache, the lookup locks a request holds, and the
//! state of its last lookup.
//!
//! A session is keyed by the client's `request_id`. This module owns *every* step of lock
//! bookkeeping, so the leak-free rule is kept in one place:
//! - [`Sessions::record`] records the read leases a lookup (or an L2 prefetch) took, one
//!   [`HeldLock`] per object with the reader locks still unclaimed;
//! - [`Sessions::take`] moves one lock per occurrence of each key out of the session, all or
//!   nothing, for a retrieve (both transfer paths call it; a repeated key needs one lock per
//!   occurrence);
//! - [`Sessions::release_keys`] (`free_lookup_locks`), [`Sessions::end`], the TTL sweep
//!   ([`Sessions::expire`]) and [`Sessions::end_all`] (shutdown) release what is left.
//!
//! Every lock the engine takes on behalf of a request is owned by exactly one session record
//! or one pending retrieve; locks replaced or released here go back to L1 in this module only.
//!
//! Expiry: sessions are swept by deadline, not by scanning: the table keeps every live session
//! exactly once in an ordered map keyed by `(deadline, serial)` (the deadline written when the
//! entry was last placed); a sweep takes the due ones (at most [`EXPIRY_BATCH`] per call),
//! re-places those used since, and removes the rest. Touching a session on the request path
//! updates only its own `last_used`, so a recorded deadline is a lower bound of the real one.
//!
//! Bound: at most `max_sessions` live sessions (`--max-sessions`). Creating one more evicts the
//! least recently used *idle* session (its mutex free), releasing its locks like an expiry
//! (counted in `evicted_total`). Because recorded deadlines are lower bounds, the first entry
//! whose recorded deadline is still its real one is the exact LRU; finding it re-places at most
//! [`EVICTION_SCAN`] entries, and when none qualifies in that many the oldest idle one seen is
//! evicted. Only sessions in use at that very moment can push the count past the cap.
//!
//! Memory: per session, the request-id string once (shared by both maps), the hash cache
//! (48 bytes per chunk of its current token list, shrunk when the list shrinks) and one record
//! per object it holds locks on (bounded by L1's object count). The table's maps are shrunk
//! by the housekeeping sweep when they fall below a quarter of their capacity, and a session
//! retired while a request still holds a reference to it takes no new locks (they go straight
//! back to L1), so no path leaks a lock into a session that is gone.
//!
//! Lock order: table mutex → session mutex (only `try_lock` while the table is held) → L1. The
//! session mutex may be held while calling into L1 or the L2 prefetch results; L1 releases of
//! replaced locks happen after the session mutex is dropped. The table mutex is held for
//! O(log n) work per request; the O(n) map shrink runs only in the housekeeping sweep, after
//! at least three quarters of the entries it sizes for are gone (amortised O(1) per removal).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier_core::hash::{ChunkHashCache, TokenHasher};
use kvtier_core::key::{ObjectKey, object_keys};
use kvtier_core::l1::{L1Manager, ReadLease};
use kvtier_core::metrics::{MetricDesc, MetricSet, MetricVisitor};
use kvtier_proto::IpcKey;
use parking_lot::Mutex;

use super::EngineError;

mod record;
mod table;

pub use record::{ChunkSpan, HeldLock, PrefetchState, Session, SessionRef, TakeError};

use table::{Slot, Table, Verdict};

/// Most expired sessions one [`Sessions::expire`] call removes (bounds the table lock hold).
pub const EXPIRY_BATCH: usize = 1024;

/// Most entries one eviction looks at to find the least recently used idle session.
pub const EVICTION_SCAN: usize = 64;

/// Default of `--max-sessions`.
pub const DEFAULT_MAX_SESSIONS: usize = 65_536;

/// The table's maps are not shrunk below this many entries of capacity.
const MIN_TABLE_CAPACITY: usize = 1024;

/// Longest session TTL used for deadlines (larger settings behave like this one).
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

kvtier_core::metric_set! {
    /// Session counters (status `sessions`, Prometheus `kvtier_sessions_*`).
    pub struct SessionMetrics {
        /// Live sessions.
        active: Gauge => "kvtier_sessions_active",
        /// Sessions created.
        created_total: Counter => "kvtier_sessions_created",
        /// Sessions ended by end_session.
        ended_total: Counter => "kvtier_sessions_ended",
        /// Sessions removed by the idle TTL.
        expired_total: Counter => "kvtier_sessions_expired",
        /// Idle sessions removed (least recently used first) to stay within --max-sessions.
        evicted_total: Counter => "kvtier_sessions_evicted",
        /// Lookup lock records released by end_session, expiry or free_lookup_locks.
        locks_released_total: Counter => "kvtier_sessions_locks_released",
    }
}

/// The session table and the one place that moves lookup locks.
#[derive(Debug)]
pub struct Sessions {
    table: Mutex<Table>,
    ttl: Duration,
    max_sessions: usize,
    hasher: TokenHasher,
    l1: Arc<L1Manager>,
    metrics: SessionMetrics,
}

impl Sessions {
    /// An empty table of at most `max_sessions` (at least 1) sessions that expire after `ttl`
    /// without use, hashing with `hasher` and releasing locks to `l1`.
    pub fn new(
        ttl: Duration,
        max_sessions: usize,
        hasher: TokenHasher,
        l1: Arc<L1Manager>,
    ) -> Self {
        Self {
            table: Mutex::new(Table::default()),
            ttl: ttl.min(MAX_TTL),
            max_sessions: max_sessions.max(1),
            hasher,
            l1,
            metrics: SessionMetrics::default(),
        }
    }

    /// Session TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The token hasher.
    pub fn hasher(&self) -> &TokenHasher {
        &self.hasher
    }

    /// Counters.
    pub fn metrics(&self) -> &SessionMetrics {
        &self.metrics
    }

    /// The most live sessions (`--max-sessions`).
    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    /// Number of live sessions (lock-free).
    pub fn active_count(&self) -> u64 {
        self.metrics.active.get()
    }

    /// The session of `request_id`, created if missing. When the table is full, creating one
    /// evicts the least recently used idle session first: its locks are released here and
    /// its request id and lookup state are returned (the caller cancels a pending L2 job).
    pub fn get_or_create(
        &self,
        request_id: &str,
        now: Instant,
    ) -> (SessionRef, Option<(Arc<str>, PrefetchState)>) {
        let mut t = self.table.lock();
        if let Some(s) = t.map.get(request_id) {
            return (Arc::clone(&s.session), None);
        }
        let evicted = if t.map.len() >= self.max_sessions {
            t.evict_lru(self.ttl)
        } else {
            None
        };
        let serial = t.next_serial;
        t.next_serial += 1;
        let s = Arc::new(Mutex::new(Session {
            hashes: ChunkHashCache::new(),
            locks: record::KeyMap::default(),
            prefetch: PrefetchState::Idle,
            last_used: now,
            retired: false,
        }));
        let id: Arc<str> = Arc::from(request_id);
        let due = (now + self.ttl, serial);
        t.order.insert(due, Arc::clone(&id));
        t.map.insert(
            id,
            Slot {
                session: Arc::clone(&s),
                due,
            },
        );
        drop(t);
        self.metrics.created_total.inc();
        self.metrics.active.add(1);
        let evicted = evicted.map(|(id, victim)| {
            self.metrics.active.sub(1);
            self.metrics.evicted_total.inc();
            let (locks, prefetch) = self.retire(&victim);
            tracing::debug!(request_id = %id, locks, "session table full; evicted the least recently used idle session");
            (id, prefetch)
        });
        (s, evicted)
    }

    /// The session of `request_id`, if it exists.
    pub fn get(&self, request_id: &str) -> Option<SessionRef> {
        self.table
            .lock()
            .map
            .get(request_id)
            .map(|s| Arc::clone(&s.session))
    }

    /// Hashes `[start, end)` of `key` through `session`'s cache (refreshing its TTL) and
    /// expands the chunks to object keys for `worker` (or every rank, chunk-major).
    ///
    /// # Errors
    /// [`EngineError::Malformed`] for an unaligned or out-of-range span, a bad model name,
    /// salt or world size.
    pub fn keys(
        &self,
        session: &SessionRef,
        key: &IpcKey,
        worker: Option<u32>,
        now: Instant,
    ) -> Result<Vec<ObjectKey>, EngineError> {
        self.span(session, key, worker, now).map(|s| s.keys)
    }

    /// Like [`keys`](Self::keys), and also the chunk hashes of the range and the hash of the
    /// chunk before it (for KV-event records).
    ///
    /// # Errors
    /// As [`keys`](Self::keys).
    pub fn span(
        &self,
        session: &SessionRef,
        key: &IpcKey,
        worker: Option<u32>,
        now: Instant,
    ) -> Result<ChunkSpan, EngineError> {
        let malformed = |e: &dyn std::fmt::Display| EngineError::Malformed(e.to_string());
        let start = usize::try_from(key.start).map_err(|e| malformed(&e))?;
        let end = usize::try_from(key.end).map_err(|e| malformed(&e))?;
        self.span_in(session, key, start, end, worker, now)
    }

    /// The span a `lookup` asks about, with LMCache's lenient rule: every whole chunk of
    /// `token_ids[..min(end, len)]` from chunk 0 (`start` is ignored and a partial tail chunk
    /// is dropped, as LMCache 0.5.6's lookup does).
    ///
    /// # Errors
    /// [`EngineError::Malformed`] for a bad model name, salt or world size.
    pub fn lookup_span(
        &self,
        session: &SessionRef,
        key: &IpcKey,
        worker: Option<u32>,
        now: Instant,
    ) -> Result<ChunkSpan, EngineError> {
        let len = key.token_ids.len();
        let end = usize::try_from(key.end).map_or(len, |e| e.min(len));
        let cs = self.hasher.chunk_size().max(1);
        self.span_in(session, key, 0, end - end % cs, worker, now)
    }

    fn span_in(
        &self,
        session: &SessionRef,
        key: &IpcKey,
        start: usize,
        end: usize,
        worker: Option<u32>,
        now: Instant,
    ) -> Result<ChunkSpan, EngineError> {
        let malformed = |e: &dyn std::fmt::Display| EngineError::Malformed(e.to_string());
        let (hashes, parent) = {
            let mut s = session.lock();
            s.last_used = s.last_used.max(now);
            let hashes = s
                .hashes
                .hashes_of(
                    &self.hasher,
                    &key.token_ids,
                    Some(key.token_ids.identity()),
                    start,
                    end,
                )
                .map_err(|e| malformed(&e))?
                .to_vec();
            let first = start / self.hasher.chunk_size().max(1);
            let parent = first.checked_sub(1).and_then(|i| s.hashes.chunk_hash(i));
            (hashes, parent)
        };
        let model: Arc<str> = Arc::from(key.model_name.as_str());
        let salt: Arc<str> = Arc::from(key.cache_salt.as_str());
        let keys = object_keys(&hashes, &model, key.world_size, worker, 0, &salt)
            .map_err(|e| malformed(&e))?;
        Ok(ChunkSpan {
            keys,
            hashes,
            parent,
            model,
            tokens: start..end,
        })
    }

    /// Records `leases` (one per key, `readers` locks each) as lookup locks of `session`,
    /// releasing any lock they replace.
    pub fn record(
        &self,
        session: &SessionRef,
        keys: impl IntoIterator<Item = ObjectKey>,
        leases: impl IntoIterator<Item = ReadLease>,
        readers: u32,
    ) {
        let stale = session.lock().record(keys, leases, readers);
        self.release_to_l1(&stale);
    }

    /// Moves one lock per occurrence of each of `keys` out of `session` (all or nothing;
    /// objects must be `object_len` bytes). Both retrieve paths (`prepare_retrieve` and the
    /// lmcache_driven `retrieve`) take their locks here. The caller owns the leases and must
    /// release them with `L1Manager::finish_read(.., 1)`.
    ///
    /// # Errors
    /// [`TakeError`] when a chunk has no lock left or another size; nothing is taken then.
    pub fn take(
        &self,
        session: &SessionRef,
        keys: &[ObjectKey],
        object_len: u64,
    ) -> Result<Vec<ReadLease>, TakeError> {
        session.lock().take(keys, object_len)
    }

    /// Releases the session's locks on `keys` (`free_lookup_locks`).
    pub fn release_keys(&self, session: &SessionRef, keys: &[ObjectKey]) {
        let held: Vec<HeldLock> = {
            let mut s = session.lock();
            let held = keys.iter().filter_map(|k| s.locks.remove(k)).collect();
            s.shrink_locks();
            held
        };
        self.release(&held);
    }

    /// Replaces the session's lookup state, returning the previous one (whose pending L2 job
    /// the caller cancels). A retired session keeps none: `next` itself comes back.
    pub fn replace_prefetch(&self, session: &SessionRef, next: PrefetchState) -> PrefetchState {
        let mut s = session.lock();
        if s.retired {
            return next;
        }
        std::mem::replace(&mut s.prefetch, next)
    }

    /// The session's lookup state (a copy).
    pub fn prefetch(&self, session: &SessionRef) -> PrefetchState {
        session.lock().prefetch
    }

    /// Runs `f` on the session's lookup state under the session mutex. `f` returns the next
    /// state, optionally leases to record (`keys`, `leases`, `readers`; e.g. an L2 prefetch
    /// result), and a value passed back to the caller.
    pub fn update_prefetch<R>(
        &self,
        session: &SessionRef,
        f: impl FnOnce(PrefetchState) -> (PrefetchState, Option<LoadedLocks>, R),
    ) -> R {
        let (stale, r) = {
            let mut s = session.lock();
            let (next, loaded, r) = f(s.prefetch);
            s.prefetch = if s.retired { PrefetchState::Idle } else { next };
            let stale = match loaded {
                Some(l) => s.record(l.keys, l.leases, l.readers),
                None => Vec::new(),
            };
            (stale, r)
        };
        self.release_to_l1(&stale);
        r
    }

    /// Ends the session of `request_id`: releases every lock it holds and returns its lookup
    /// state (the caller cancels a pending L2 job). `None` if there was no such session.
    pub fn end(&self, request_id: &str) -> Option<PrefetchState> {
        let s = self.table.lock().remove(request_id)?;
        self.metrics.active.sub(1);
        self.metrics.ended_total.inc();
        Some(self.retire(&s).1)
    }

    /// Removes up to [`EXPIRY_BATCH`] sessions idle for at least the TTL, releasing their
    /// locks; returns `(request id, locks released, lookup state)` of each. A session in use
    /// right now (its mutex held) is looked at again a second later. Then shrinks the table's
    /// maps if they hold under a quarter of their capacity; the flag says whether it did.
    pub fn expire(&self, now: Instant) -> (Vec<(Arc<str>, usize, PrefetchState)>, bool) {
        let mut removed = Vec::new();
        let shrunk = {
            let mut t = self.table.lock();
            // Each entry is looked at once per call: a re-placed one is due after `now`.
            for _ in 0..2 * EXPIRY_BATCH {
                if removed.len() >= EXPIRY_BATCH {
                    break;
                }
                let due = match t.order.first_key_value() {
                    Some((due, _)) if due.0 <= now => *due,
                    _ => break,
                };
                let Some((_, id)) = t.order.pop_first() else {
                    break;
                };
                let Some(s) = t.map.get(&id).map(|s| Arc::clone(&s.session)) else {
                    continue;
                };
                let verdict = match s.try_lock() {
                    Some(g) if now >= g.last_used + self.ttl => Verdict::Remove,
                    Some(g) => Verdict::Requeue(g.last_used + self.ttl),
                    None => Verdict::Requeue(now + Duration::from_secs(1)),
                };
                match verdict {
                    Verdict::Requeue(deadline) => t.requeue(id, due, deadline),
                    Verdict::Remove => {
                        t.map.remove(&id);
                        removed.push((id, s));
                    }
                }
            }
            t.shrink()
        };
        self.metrics.active.sub(removed.len() as u64);
        self.metrics.expired_total.add(removed.len() as u64);
        let removed = removed
            .into_iter()
            .map(|(id, s)| {
                let (locks, prefetch) = self.retire(&s);
                (id, locks, prefetch)
            })
            .collect();
        (removed, shrunk)
    }

    /// Removes every session (shutdown), releasing their locks; returns their lookup states.
    pub fn end_all(&self) -> Vec<PrefetchState> {
        let all: Vec<SessionRef> = {
            let mut t = self.table.lock();
            t.order.clear();
            std::mem::take(&mut t.map)
                .into_values()
                .map(|s| s.session)
                .collect()
        };
        self.metrics.active.sub(all.len() as u64);
        all.iter().map(|s| self.retire(s).1).collect()
    }

    /// Releases everything a removed session owns; returns `(lock records, lookup state)`.
    fn retire(&self, session: &SessionRef) -> (usize, PrefetchState) {
        let (held, prefetch) = {
            let mut s = session.lock();
            s.retired = true;
            s.hashes.clear();
            let held: Vec<HeldLock> = std::mem::take(&mut s.locks).into_values().collect();
            (held, std::mem::take(&mut s.prefetch))
        };
        self.release(&held);
        (held.len(), prefetch)
    }

    /// Releases lock records taken out of a session and counts them.
    fn release(&self, held: &[HeldLock]) {
        self.release_to_l1(held);
        self.metrics.locks_released_total.add(held.len() as u64);
    }

    /// Gives the remaining locks of `held` back to L1, one L1 call per distinct count.
    fn release_to_l1(&self, held: &[HeldLock]) {
        let mut by_count: HashMap<u32, Vec<ReadLease>> = HashMap::new();
        for h in held.iter().filter(|h| h.remaining > 0) {
            by_count.entry(h.remaining).or_default().push(h.lease);
        }
        for (count, leases) in by_count {
            self.l1.finish_read(&leases, count);
        }
    }
}

/// Leases loaded for a session outside its lookup (an L2 prefetch result), to record.
#[derive(Debug)]
pub struct LoadedLocks {
    /// One key per lease.
    pub keys: Vec<ObjectKey>,
    /// The leases.
    pub leases: Vec<ReadLease>,
    /// Reader locks per lease.
    pub readers: u32,
}

impl MetricSet for Sessions {
    fn descriptors(&self) -> &'static [MetricDesc] {
        SessionMetrics::DESCRIPTORS
    }

    fn visit(&self, v: &mut dyn MetricVisitor) {
        self.metrics.visit(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_core::hash::HashAlgorithm;
    use kvtier_core::l1::{EvictionConfig, L1Config};

    fn fixture() -> (Arc<L1Manager>, Sessions) {
        let l1 = Arc::new(L1Manager::new(L1Config {
            capacity_bytes: 1 << 20,
            quarantine_budget_bytes: 1 << 17,
            align_bytes: 4096,
            write_ttl: Duration::from_secs(60),
            read_ttl: Duration::from_secs(60),
            eviction: EvictionConfig::default(),
        }));
        let hasher = TokenHasher::new(4, HashAlgorithm::default()).expect("hasher");
        let s = Sessions::new(Duration::from_secs(10), 4, hasher, Arc::clone(&l1));
        (l1, s)
    }

    impl Sessions {
        fn expire_ids(&self, now: Instant) -> Vec<(Arc<str>, usize, PrefetchState)> {
            self.expire(now).0
        }
    }

    fn key(i: u8) -> ObjectKey {
        let hashes = vec![kvtier_core::hash::ChunkHash::from([i; 32])];
        let m: Arc<str> = Arc::from("m");
        let salt: Arc<str> = Arc::from("");
        object_keys(&hashes, &m, 1, Some(0), 0, &salt)
            .expect("key")
            .remove(0)
    }

    fn stored(l1: &L1Manager, k: &ObjectKey) -> ReadLease {
        let t = l1
            .reserve_write(&[(k.clone(), 4096)], false)
            .remove(0)
            .expect("reserve");
        l1.finish_write(&[t]).remove(0).expect("publish");
        l1.reserve_read_prefix(std::slice::from_ref(k), 2, 1)
            .remove(0)
    }

    #[test]
    fn a_repeated_key_needs_one_lock_per_occurrence_and_takes_all_or_nothing() {
        let (l1, s) = fixture();
        let now = l1.clock().now();
        let (a, b) = (key(1), key(2));
        let sess = s.get_or_create("r", now).0;
        let (la, lb) = (stored(&l1, &a), stored(&l1, &b));
        s.record(&sess, [a.clone(), b.clone()], [la, lb], 2);
        // `a` twice and `b` once: 2 locks on `a` are available.
        let got = s
            .take(&sess, &[a.clone(), b.clone(), a.clone()], 4096)
            .expect("take");
        assert_eq!(got.len(), 3);
        l1.finish_read(&got, 1);
        // Now `a` has 0 left and `b` 1: asking `b` twice takes nothing.
        assert_eq!(
            s.take(&sess, &[b.clone(), b.clone()], 4096),
            Err(TakeError::NotLocked(0))
        );
        assert_eq!(
            s.take(&sess, std::slice::from_ref(&b), 4096)
                .map(|l| l.len()),
            Ok(1)
        );
        l1.finish_read(&[lb], 1);
        assert_eq!(l1.counters().read_locked_objects.get(), 0);
        l1.check_invariants().expect("invariants");
    }

    #[test]
    fn wrong_size_is_refused_without_taking() {
        let (l1, s) = fixture();
        let now = l1.clock().now();
        let a = key(3);
        let sess = s.get_or_create("r", now).0;
        s.record(&sess, [a.clone()], [stored(&l1, &a)], 1);
        assert!(matches!(
            s.take(&sess, std::slice::from_ref(&a), 8192),
            Err(TakeError::WrongSize { chunk: 0, .. })
        ));
        assert_eq!(s.end("r"), Some(PrefetchState::Idle));
        assert_eq!(s.metrics().locks_released_total.get(), 1);
        l1.check_invariants().expect("invariants");
    }

    #[test]
    fn expiry_is_by_deadline_and_spares_sessions_in_use() {
        let (l1, s) = fixture();
        let t0 = l1.clock().now();
        s.get_or_create("old", t0);
        let used = s.get_or_create("used", t0).0;
        assert!(s.expire_ids(t0 + Duration::from_secs(5)).is_empty());
        used.lock().last_used = t0 + Duration::from_secs(8);
        let gone = s.expire_ids(t0 + Duration::from_secs(11));
        assert_eq!(gone.iter().map(|g| &*g.0).collect::<Vec<_>>(), ["old"]);
        assert_eq!(s.active_count(), 1);
        // Held right now: looked at again later, not removed.
        let guard = used.lock();
        assert!(s.expire_ids(t0 + Duration::from_secs(30)).is_empty());
        drop(guard);
        let gone = s.expire_ids(t0 + Duration::from_secs(32));
        assert_eq!(gone.len(), 1);
        assert_eq!(s.active_count(), 0);
        assert_eq!(s.metrics().expired_total.get(), 2);
    }

    #[test]
    fn a_recreated_session_is_not_expired_by_its_predecessors_entry() {
        let (l1, s) = fixture();
        let t0 = l1.clock().now();
        s.get_or_create("r", t0);
        s.end("r");
        s.get_or_create("r", t0 + Duration::from_secs(9));
        assert!(s.expire_ids(t0 + Duration::from_secs(11)).is_empty());
        assert_eq!(s.expire_ids(t0 + Duration::from_secs(20)).len(), 1);
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_used_idle_session() {
        let (l1, s) = fixture();
        let t0 = l1.clock().now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let a = s.get_or_create("a", at(0)).0;
        s.get_or_create("b", at(1));
        s.get_or_create("c", at(2));
        s.get_or_create("d", at(3));
        // `a` is the oldest but was used since; `b` holds a lock on an object.
        a.lock().last_used = at(4);
        let k = key(9);
        let b = s.get("b").expect("b");
        s.record(&b, [k.clone()], [stored(&l1, &k)], 2);
        assert_eq!(l1.counters().read_locked_objects.get(), 1);
        let (_, evicted) = s.get_or_create("e", at(5));
        assert_eq!(evicted, Some((Arc::from("b"), PrefetchState::Idle)));
        assert!(s.get("b").is_none(), "b was the least recently used");
        assert_eq!(
            l1.counters().read_locked_objects.get(),
            0,
            "its lock went back"
        );
        // In use right now: never evicted; the next oldest idle one goes instead.
        let c = s.get("c").expect("c");
        let guard = c.lock();
        let (_, evicted) = s.get_or_create("f", at(6));
        drop(guard);
        assert!(evicted.is_some());
        assert!(s.get("c").is_some() && s.get("d").is_none());
        assert_eq!(s.active_count(), 4);
        assert_eq!(s.metrics().evicted_total.get(), 2);
        // A request still holding the evicted session records nothing into it.
        let k2 = key(10);
        s.record(&b, [k2.clone()], [stored(&l1, &k2)], 2);
        assert_eq!(l1.counters().read_locked_objects.get(), 0);
        assert_eq!(
            s.replace_prefetch(&b, PrefetchState::Done(3)),
            PrefetchState::Done(3)
        );
        l1.check_invariants().expect("invariants");
    }

    #[test]
    fn the_table_gives_memory_back_after_expiry() {
        let (l1, _) = fixture();
        let hasher = TokenHasher::new(4, HashAlgorithm::default()).expect("hasher");
        let s = Sessions::new(Duration::from_secs(10), 100_000, hasher, Arc::clone(&l1));
        let t0 = l1.clock().now();
        for i in 0..20_000 {
            s.get_or_create(&format!("r{i}"), t0);
        }
        let full = s.table.lock().map.capacity();
        assert!(full >= 20_000);
        let mut gone = 0;
        loop {
            let n = s.expire_ids(t0 + Duration::from_secs(11)).len();
            gone += n;
            if n < EXPIRY_BATCH {
                break;
            }
        }
        assert_eq!(gone, 20_000);
        let t = s.table.lock();
        assert!(t.order.is_empty());
        assert!(
            t.map.capacity() <= 2 * MIN_TABLE_CAPACITY,
            "{}",
            t.map.capacity()
        );
    }
}
