//! The engine's L2 hooks: write-behind on commit, L2 prefetch on lookup, prefetch results on
//! query/wait, and the L2 part of the status tree.
//!
//! - `commit_store` hands the keys it published to the StoreController
//!   ([`Engine::notify_l2_stored`]). Objects the prefetcher loads from L2 are published by the
//!   PrefetchController itself and never pass through here, so they are not re-stored.
//! - `lookup` locks the L1 prefix as before. When L2 is configured and the prefix ended before
//!   the last chunk, the remaining keys go to the PrefetchController and the session records
//!   `PrefetchState::Pending { job, l1_chunks }`.
//! - `query_prefetch_status` answers nil while the job runs. When it is done the result is taken
//!   (exactly once) under the session mutex, its read leases are recorded in the session exactly
//!   like L1 hits (so `prepare_retrieve`, `free_lookup_locks`, `end_session` and the TTL reaper
//!   treat them alike), and the reply is `l1_chunks + l2_chunks`.
//! - `wait_prefetch_status` blocks the worker on the controller's condition variable (no session
//!   lock held) for at most the client's timeout, capped at [`MAX_PREFETCH_WAIT`]; on timeout it
//!   answers nil.
//! - A pending job is cancelled (its leases released when it finishes) by `end_session`, session
//!   expiry, `release_all` and a newer lookup in the same session.
//!
//! Lock order addition: session mutex → PrefetchController results mutex (`try_take`). The
//! controller never takes a session lock, so there is no cycle.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use kvtier_core::key::ObjectKey;
use kvtier_core::l1::ReadLease;
use kvtier_core::status::StatusNode;
use kvtier_proto::response::encode_int;
use kvtier_storage::L2Tier;
use kvtier_storage::prefetch::{PrefetchConfig, PrefetchRequest, Take};

use super::session::{HeldLock, PrefetchState, Session};
use super::{Engine, Reply};

/// Longest `wait_prefetch_status` wait, whatever the client asks (a worker is blocked meanwhile).
pub const MAX_PREFETCH_WAIT: Duration = Duration::from_secs(60);

/// Engine-level L2 counters.
#[derive(Debug, Default)]
pub struct L2Counters {
    /// Keys handed to the write-behind controller.
    pub store_keys_submitted: AtomicU64,
    /// Keys the write-behind controller refused (queue full).
    pub store_keys_refused: AtomicU64,
    /// Lookups that went on to L2.
    pub prefetches_submitted: AtomicU64,
    /// Chunks found in L2 by lookups (beyond the L1 prefix).
    pub lookup_chunks_hit_l2: AtomicU64,
    /// Queries answered nil because the prefetch was still running.
    pub queries_pending: AtomicU64,
    /// `wait_prefetch_status` calls that timed out.
    pub wait_timeouts: AtomicU64,
    /// Prefetch jobs cancelled (session ended, expired, or replaced by a newer lookup).
    pub prefetches_cancelled: AtomicU64,
}

/// Records `leases` (one per key, `readers` locks each) as lookup locks of the session.
/// Returns the locks they replace (a previous lease on the same key that expired or whose object
/// was replaced); the caller releases those after dropping the session mutex.
pub(super) fn record_locks(
    s: &mut Session,
    keys: impl IntoIterator<Item = ObjectKey>,
    leases: impl IntoIterator<Item = ReadLease>,
    readers: u32,
) -> Vec<HeldLock> {
    let mut stale = Vec::new();
    for (k, lease) in keys.into_iter().zip(leases) {
        match s.locks.get_mut(&k) {
            Some(held) if held.lease == lease => held.remaining += readers,
            Some(held) => {
                stale.push(*held);
                *held = HeldLock {
                    lease,
                    remaining: readers,
                };
            }
            None => {
                s.locks.insert(
                    k,
                    HeldLock {
                        lease,
                        remaining: readers,
                    },
                );
            }
        }
    }
    stale
}

fn reply_int(n: u64) -> Reply {
    Some(encode_int(i64::try_from(n).unwrap_or(i64::MAX)))
}

impl Engine {
    /// Attaches the L2 tier (write-behind and prefetch). Call before serving.
    pub fn with_l2(mut self, l2: L2Tier) -> Self {
        self.l2 = Some(l2);
        self
    }

    /// The L2 tier, when configured.
    pub fn l2(&self) -> Option<&L2Tier> {
        self.l2.as_ref()
    }

    /// Engine-level L2 counters.
    pub fn l2_counters(&self) -> &L2Counters {
        &self.l2_counters
    }

    /// Queues newly published L1 objects for write-behind to every L2 adapter (no-op without
    /// L2). Every path that publishes client data into L1 calls this; L2 prefetch results never
    /// do.
    pub fn notify_l2_stored(&self, keys: Vec<ObjectKey>) {
        let Some(l2) = &self.l2 else { return };
        if keys.is_empty() {
            return;
        }
        let n = keys.len() as u64;
        self.l2_counters.store_keys_submitted.fetch_add(n, Relaxed);
        if !l2.store().submit(keys) {
            self.l2_counters.store_keys_refused.fetch_add(n, Relaxed);
        }
    }

    /// The session state after a lookup whose L1 prefix covered `locked` of `keys`: `Pending`
    /// with a submitted L2 job when L2 exists and the prefix ended early, else `Done`.
    pub(super) fn prefetch_suffix(
        &self,
        keys: &[ObjectKey],
        locked: usize,
        group: usize,
        readers: u32,
        l1_chunks: u64,
    ) -> PrefetchState {
        let Some(l2) = &self.l2 else {
            return PrefetchState::Done(l1_chunks);
        };
        let Some(suffix) = keys.get(locked..).filter(|s| !s.is_empty()) else {
            return PrefetchState::Done(l1_chunks);
        };
        let job = l2.prefetch().submit(PrefetchRequest {
            keys: suffix.to_vec(),
            group,
            readers,
        });
        self.l2_counters.prefetches_submitted.fetch_add(1, Relaxed);
        PrefetchState::Pending { job, l1_chunks }
    }

    /// Cancels the L2 job of a session state that is being discarded.
    pub(super) fn discard_prefetch(&self, state: PrefetchState) {
        if let (Some(job), Some(l2)) = (state.pending_job(), &self.l2) {
            l2.prefetch().cancel(job);
            self.l2_counters.prefetches_cancelled.fetch_add(1, Relaxed);
        }
    }

    /// `query_prefetch_status`: the lookup's prefix chunk count, consumed once; nil while L2 is
    /// still loading; 0 for an unknown request.
    pub(super) fn query_prefetch(&self, request_id: &str) -> Reply {
        let Some(session) = self.sessions.get(request_id) else {
            self.counters.unknown_prefetch_queries.fetch_add(1, Relaxed);
            return reply_int(0);
        };
        let mut stale = Vec::new();
        let reply = {
            let mut s = session.lock();
            match s.prefetch {
                PrefetchState::Done(n) => {
                    s.prefetch = PrefetchState::Idle;
                    reply_int(n)
                }
                PrefetchState::Pending { job, l1_chunks } => {
                    let taken = self.l2.as_ref().map(|l2| l2.prefetch().try_take(job));
                    match taken {
                        Some(Take::Pending) => {
                            self.l2_counters.queries_pending.fetch_add(1, Relaxed);
                            None
                        }
                        Some(Take::Ready(res)) => {
                            s.prefetch = PrefetchState::Idle;
                            let l2_chunks = res.chunks();
                            stale = record_locks(&mut s, res.keys, res.leases, res.readers);
                            self.l2_counters
                                .lookup_chunks_hit_l2
                                .fetch_add(l2_chunks, Relaxed);
                            self.counters
                                .lookup_chunks_hit
                                .fetch_add(l2_chunks, Relaxed);
                            reply_int(l1_chunks + l2_chunks)
                        }
                        Some(Take::Unknown) | None => {
                            s.prefetch = PrefetchState::Idle;
                            reply_int(l1_chunks)
                        }
                    }
                }
                PrefetchState::Idle => {
                    self.counters.unknown_prefetch_queries.fetch_add(1, Relaxed);
                    reply_int(0)
                }
            }
        };
        for h in stale {
            self.l1.finish_read(&[h.lease], h.remaining);
        }
        reply
    }

    /// `wait_prefetch_status`: like `query_prefetch_status`, but first waits up to `timeout`
    /// seconds (capped at [`MAX_PREFETCH_WAIT`]) for a pending L2 job; nil if it is still
    /// running then.
    pub(super) fn wait_prefetch(&self, request_id: &str, timeout: f64) -> Reply {
        let job = self
            .sessions
            .get(request_id)
            .and_then(|s| s.lock().prefetch.pending_job());
        if let (Some(job), Some(l2)) = (job, &self.l2) {
            let wait = if timeout.is_finite() && timeout > 0.0 {
                Duration::try_from_secs_f64(timeout)
                    .unwrap_or(MAX_PREFETCH_WAIT)
                    .min(MAX_PREFETCH_WAIT)
            } else {
                Duration::ZERO
            };
            if !l2.prefetch().wait(job, wait) {
                self.l2_counters.wait_timeouts.fetch_add(1, Relaxed);
                return None;
            }
        }
        self.query_prefetch(request_id)
    }

    /// Status of the L2 side: `(store_controller, prefetch_controller, l2_adapters, active jobs)`.
    pub(super) fn l2_status(&self) -> (StatusNode, StatusNode, Vec<StatusNode>, u64) {
        match &self.l2 {
            Some(l2) => {
                let (store, prefetch, adapters) = l2.status_nodes();
                (store, prefetch, adapters, l2.prefetch().active_jobs())
            }
            None => (
                kvtier_storage::store::disabled_status(),
                kvtier_storage::prefetch::disabled_status(PrefetchConfig::default().max_in_flight),
                Vec::new(),
                0,
            ),
        }
    }

    /// L2 counters as JSON.
    pub(super) fn l2_counters_json(&self) -> serde_json::Value {
        let c = &self.l2_counters;
        serde_json::json!({
            "enabled": self.l2.is_some(),
            "store_keys_submitted_total": c.store_keys_submitted.load(Relaxed),
            "store_keys_refused_total": c.store_keys_refused.load(Relaxed),
            "prefetches_submitted_total": c.prefetches_submitted.load(Relaxed),
            "lookup_chunks_hit_l2_total": c.lookup_chunks_hit_l2.load(Relaxed),
            "queries_pending_total": c.queries_pending.load(Relaxed),
            "wait_timeouts_total": c.wait_timeouts.load(Relaxed),
            "prefetches_cancelled_total": c.prefetches_cancelled.load(Relaxed),
        })
    }

    /// Stops the L2 tier in order (prefetch, then write-behind flush, then adapters). Call during
    /// shutdown after request intake stopped and before L1 goes away. Idempotent.
    pub fn shutdown_l2(&self) {
        if let Some(l2) = &self.l2 {
            l2.shutdown();
        }
    }
}
