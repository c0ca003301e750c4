//! Lookups and their results: `lookup`, `query_prefetch_status`, `wait_prefetch_status`,
//! `free_lookup_locks`, `end_session`.
//!
//! `lookup(key with worker_id None)` hashes the whole chunks of `token_ids[..min(end, len)]`
//! (LMCache's lenient span: `start` is ignored, a partial tail chunk is dropped, `end` beyond
//! the tokens is clamped) through the request's session, read-locks
//! in L1 the longest prefix of *whole chunks* present for every rank (`num_kv_readers` locks per
//! object), records the leases in the session, and, when L2 is configured and the prefix ended
//! early, submits the rest to the L2 prefetcher. The prefix length is the session's lookup
//! result, which the next `query_prefetch_status`/`wait_prefetch_status` consumes exactly once
//! (nil while L2 is still loading; 0 for an unknown request). An L2 result's leases are recorded
//! in the session exactly like L1 hits, so retrieves, `free_lookup_locks`, `end_session` and
//! expiry treat them alike.
//!
//! Every function here is bounded by the request's size (no wait except `wait`, which holds no
//! lock while it waits), so the service may run them inline on the poll thread. The transport
//! does not use `wait` on its threads: it keeps a [`PrefetchWait`] per waiting request and polls
//! it when a prefetch completes or its deadline passes, so any number of waiters hold no thread.

use std::time::Instant;

use kvtier_proto::IpcKey;
use kvtier_storage::prefetch::Take;

use super::explain::LookupFacts;
use super::session::{LoadedLocks, PrefetchState};
use super::{EngineError, Shared, malformed};

/// `lookup`: locks the L1 prefix, records it, and starts the L2 prefetch of the rest. On error
/// the session's result becomes a definite 0 (the client polls for it).
pub(super) fn lookup(cx: &Shared, key: &IpcKey, now: Instant) -> Result<(), EngineError> {
    cx.counters.lookups_total.inc();
    let started = Instant::now();
    let session = cx.session(&key.request_id, now);
    let (next, result) = match lock_prefix(cx, key, &session, now, started) {
        Ok(next) => (next, Ok(())),
        Err(e) => (PrefetchState::Done(0), Err(e)),
    };
    let previous = cx.sessions.replace_prefetch(&session, next);
    cx.l2.discard(previous);
    result
}

fn lock_prefix(
    cx: &Shared,
    key: &IpcKey,
    session: &super::session::SessionRef,
    now: Instant,
    started: Instant,
) -> Result<PrefetchState, EngineError> {
    if key.num_kv_readers == 0 {
        return Err(malformed(
            "lookup with num_kv_readers = 0 (clients older than LMCache 0.5 are not supported)",
        ));
    }
    let span = cx.sessions.lookup_span(session, key, key.worker_id, now)?;
    let keys = span.keys.clone();
    let group = if key.worker_id.is_some() {
        1
    } else {
        (key.world_size as usize).max(1)
    };
    cx.observer.lookup(&span, group);
    cx.counters
        .lookup_chunks_requested_total
        .add((keys.len() / group) as u64);
    let leases = cx.l1.reserve_read_prefix(&keys, key.num_kv_readers, group);
    let locked = leases.len();
    let hits = (locked / group) as u64;
    cx.counters.lookup_chunks_hit_total.add(hits);
    cx.sessions
        .record(session, keys.iter().cloned(), leases, key.num_kv_readers);
    if cx.l2.tier().is_some() && locked < keys.len() {
        // Chunks an L2 prefetch may load into L1: their KV-event records carry the tokens.
        let chunks = keys.len() / group;
        cx.events.bind(
            &span.hashes,
            span.parent,
            span.token_ids(key),
            cx.chunk_size,
            (locked / group)..chunks,
        );
    }
    let next = cx
        .l2
        .prefetch_suffix(&keys, locked, group, key.num_kv_readers, hits);
    cx.explain.looked_up(&LookupFacts {
        request_id: &key.request_id,
        model: &span.model,
        cache_salt: &key.cache_salt,
        hashes: &span.hashes,
        l1_chunks: locked / group,
        group,
        l2_pending: next.pending_job().is_some(),
        started,
    });
    Ok(next)
}

/// `query_prefetch_status`: the lookup's prefix chunk count, consumed once; `None` (nil)
/// while L2 is still loading; 0 for an unknown request.
pub(super) fn query(cx: &Shared, request_id: &str) -> Option<u64> {
    let unknown = || {
        cx.counters.unknown_prefetch_queries_total.inc();
        Some(0)
    };
    let Some(session) = cx.sessions.get(request_id) else {
        return unknown();
    };
    cx.sessions.update_prefetch(&session, |state| match state {
        PrefetchState::Done(n) => (PrefetchState::Idle, None, Some(n)),
        PrefetchState::Pending { job, l1_chunks } => match cx.l2.try_take(job) {
            Take::Pending => (state, None, None),
            Take::Ready(res) => {
                let l2_chunks = res.chunks();
                cx.explain.l2_done(request_id, l2_chunks, &res.report);
                cx.counters.lookup_chunks_hit_total.add(l2_chunks);
                let loaded = LoadedLocks {
                    keys: res.keys,
                    leases: res.leases,
                    readers: res.readers,
                };
                (
                    PrefetchState::Idle,
                    Some(loaded),
                    Some(l1_chunks + l2_chunks),
                )
            }
            Take::Unknown => {
                cx.explain
                    .abandoned(request_id, "its L2 result expired or was cancelled");
                (PrefetchState::Idle, None, Some(l1_chunks))
            }
        },
        PrefetchState::Idle => (PrefetchState::Idle, None, unknown()),
    })
}

/// `wait_prefetch_status`: like [`query`], but first waits up to `timeout` seconds for a
/// pending L2 job; nil if it is still running then.
pub(super) fn wait(cx: &Shared, request_id: &str, timeout: f64) -> Option<u64> {
    let job = cx
        .sessions
        .get(request_id)
        .and_then(|s| cx.sessions.prefetch(&s).pending_job());
    if let Some(job) = job
        && !cx.l2.wait(job, timeout)
    {
        cx.explain.wait_timed_out(request_id);
        return None;
    }
    query(cx, request_id)
}

/// A `wait_prefetch_status` that waits without a thread: the transport keeps it and polls it
/// when a prefetch completes (the L2 link's waker) or its deadline passes.
#[derive(Debug)]
pub struct PrefetchWait {
    request_id: String,
    job: Option<u64>,
    deadline: Instant,
}

impl PrefetchWait {
    /// Starts waiting for `request_id`'s pending L2 job, if any, for at most `timeout` seconds
    /// (capped like [`wait`]).
    pub(super) fn new(cx: &Shared, request_id: String, timeout: f64, now: Instant) -> Self {
        let job = cx
            .sessions
            .get(&request_id)
            .and_then(|s| cx.sessions.prefetch(&s).pending_job());
        Self {
            request_id,
            job,
            deadline: now + super::l2::L2Link::wait_bound(timeout),
        }
    }

    /// When the wait ends at the latest.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The answer once there is one: `Some(result)` when the job is done (or there is none),
    /// `Some(None)` at the deadline, `None` while still waiting. `force` answers now.
    pub(super) fn poll(&self, cx: &Shared, now: Instant, force: bool) -> Option<Option<u64>> {
        let done = self.job.is_none_or(|job| cx.l2.is_done(job));
        if done {
            return Some(query(cx, &self.request_id));
        }
        if force || now >= self.deadline {
            cx.l2.count_wait_timeout();
            cx.explain.wait_timed_out(&self.request_id);
            return Some(None);
        }
        None
    }
}

/// `free_lookup_locks`: releases the session's locks on the range.
pub(super) fn free_lookup_locks(
    cx: &Shared,
    key: &IpcKey,
    now: Instant,
) -> Result<(), EngineError> {
    let Some(session) = cx.sessions.get(&key.request_id) else {
        return Ok(());
    };
    let keys = cx.sessions.keys(&session, key, key.worker_id, now)?;
    cx.sessions.release_keys(&session, &keys);
    Ok(())
}

/// `end_session`: releases every lock the session holds and cancels its L2 prefetch.
pub(super) fn end_session(cx: &Shared, request_id: &str) {
    if let Some(prefetch) = cx.sessions.end(request_id) {
        if prefetch.pending_job().is_some() {
            cx.explain.abandoned(request_id, "the request ended");
        }
        cx.l2.discard(prefetch);
    }
}
