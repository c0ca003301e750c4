//! The engine's link to the L2 tier: write-behind on publish, prefetch on lookup.
//!
//! - Every path that publishes client data into L1 (`commit_store`, lmcache_driven `store`)
//!   hands the keys to [`L2Link::stored`]; objects the prefetcher loads from L2 are published by
//!   the PrefetchController itself and never pass through here, so they are not re-stored.
//! - `lookup` locks the L1 prefix; when L2 is configured and the prefix ended before the last
//!   chunk, [`L2Link::prefetch_suffix`] submits the rest and the session records
//!   `PrefetchState::Pending { job, l1_chunks }`. The session owns the job: `query`/`wait` take
//!   its result (exactly once), and a newer lookup, `end_session`, expiry or shutdown cancel it
//!   ([`L2Link::discard`]).
//! - Without L2 every method is a cheap no-op and lookups finish at their L1 prefix.
//!
//! Lock order addition: session mutex → PrefetchController results mutex (`try_take`). The
//! controller never takes a session lock, so there is no cycle.

use std::time::Duration;

use kvtier_core::key::ObjectKey;
use kvtier_core::status::StatusNode;
use kvtier_storage::L2Tier;
use kvtier_storage::prefetch::{PrefetchConfig, PrefetchRequest, Take};

use super::session::PrefetchState;

/// Longest `wait_prefetch_status` wait, whatever the client asks (a worker is blocked meanwhile).
pub const MAX_PREFETCH_WAIT: Duration = Duration::from_secs(60);

kvtier_core::metric_set! {
    /// The engine's use of L2 (status `storage_manager.l2`, Prometheus `kvtier_l2_*`).
    pub struct L2EngineCounters {
        /// Keys handed to the write-behind controller.
        store_keys_submitted_total: Counter => "kvtier_l2_store_keys_submitted",
        /// Keys the write-behind controller refused (queue full).
        store_keys_refused_total: Counter => "kvtier_l2_store_keys_refused",
        /// Lookups that went on to L2.
        prefetches_submitted_total: Counter => "kvtier_l2_prefetches_submitted",
        /// Chunks found in L2 by lookups (beyond the L1 prefix).
        lookup_chunks_hit_l2_total: Counter => "kvtier_l2_lookup_chunks_hit",
        /// Queries answered nil because the prefetch was still running.
        queries_pending_total: Counter => "kvtier_l2_queries_pending",
        /// wait_prefetch_status calls that timed out.
        wait_timeouts_total: Counter => "kvtier_l2_wait_timeouts",
        /// Prefetch jobs cancelled (session ended, expired, or replaced by a newer lookup).
        prefetches_cancelled_total: Counter => "kvtier_l2_prefetches_cancelled",
    }
}

/// The L2 tier as the engine sees it.
#[derive(Debug, Default)]
pub struct L2Link {
    tier: Option<L2Tier>,
    counters: L2EngineCounters,
}

impl L2Link {
    /// A link to `tier`.
    pub fn new(tier: L2Tier) -> Self {
        Self {
            tier: Some(tier),
            counters: L2EngineCounters::default(),
        }
    }

    /// The tier, when configured.
    pub fn tier(&self) -> Option<&L2Tier> {
        self.tier.as_ref()
    }

    /// Counters.
    pub fn counters(&self) -> &L2EngineCounters {
        &self.counters
    }

    /// Queues newly published L1 objects for write-behind to every adapter.
    pub fn stored(&self, keys: Vec<ObjectKey>) {
        let Some(tier) = &self.tier else { return };
        if keys.is_empty() {
            return;
        }
        let n = keys.len() as u64;
        self.counters.store_keys_submitted_total.add(n);
        if !tier.store().submit(keys) {
            self.counters.store_keys_refused_total.add(n);
        }
    }

    /// The session state after a lookup whose L1 prefix covered `locked` of `keys`: `Pending`
    /// with a submitted L2 job when L2 exists and the prefix ended early, else `Done`.
    pub fn prefetch_suffix(
        &self,
        keys: &[ObjectKey],
        locked: usize,
        group: usize,
        readers: u32,
        l1_chunks: u64,
    ) -> PrefetchState {
        let Some(tier) = &self.tier else {
            return PrefetchState::Done(l1_chunks);
        };
        let Some(suffix) = keys.get(locked..).filter(|s| !s.is_empty()) else {
            return PrefetchState::Done(l1_chunks);
        };
        let job = tier.prefetch().submit(PrefetchRequest {
            keys: suffix.to_vec(),
            group,
            readers,
        });
        self.counters.prefetches_submitted_total.inc();
        PrefetchState::Pending { job, l1_chunks }
    }

    /// Cancels the L2 job of a session state that is being discarded.
    pub fn discard(&self, state: PrefetchState) {
        if let (Some(job), Some(tier)) = (state.pending_job(), &self.tier) {
            tier.prefetch().cancel(job);
            self.counters.prefetches_cancelled_total.inc();
        }
    }

    /// Takes the result of `job` if it is done (call under the owning session's mutex; the
    /// caller then owns the leases of a `Ready` result).
    pub fn try_take(&self, job: u64) -> Take {
        let Some(tier) = &self.tier else {
            return Take::Unknown;
        };
        let taken = tier.prefetch().try_take(job);
        match &taken {
            Take::Pending => self.counters.queries_pending_total.inc(),
            Take::Ready(res) => self.counters.lookup_chunks_hit_l2_total.add(res.chunks()),
            Take::Unknown => {}
        }
        taken
    }

    /// Whether `job` finished (never blocks).
    pub fn is_done(&self, job: u64) -> bool {
        self.tier.as_ref().is_none_or(|t| t.prefetch().is_done(job))
    }

    /// Counts a `wait_prefetch_status` that timed out.
    pub fn count_wait_timeout(&self) {
        self.counters.wait_timeouts_total.inc();
    }

    /// Calls `wake` after every prefetch completion (see `PrefetchController::set_on_done`).
    pub fn set_waker(&self, wake: std::sync::Arc<dyn Fn() + Send + Sync>) {
        if let Some(t) = &self.tier {
            t.prefetch().set_on_done(wake);
        }
    }

    /// The longest a `wait_prefetch_status` waits for `timeout` seconds as sent.
    pub fn wait_bound(timeout: f64) -> Duration {
        if timeout.is_finite() && timeout > 0.0 {
            Duration::try_from_secs_f64(timeout)
                .unwrap_or(MAX_PREFETCH_WAIT)
                .min(MAX_PREFETCH_WAIT)
        } else {
            Duration::ZERO
        }
    }

    /// Waits up to `timeout` seconds (capped at [`MAX_PREFETCH_WAIT`]) for `job`; whether it
    /// finished. Holds no lock while waiting.
    pub fn wait(&self, job: u64, timeout: f64) -> bool {
        let Some(tier) = &self.tier else { return true };
        let done = tier.prefetch().wait(job, Self::wait_bound(timeout));
        if !done {
            self.counters.wait_timeouts_total.inc();
        }
        done
    }

    /// Status of the L2 side: `(store_controller, prefetch_controller, l2_adapters, active
    /// jobs)`.
    pub fn status(&self) -> (StatusNode, StatusNode, Vec<StatusNode>, u64) {
        match &self.tier {
            Some(tier) => {
                let (store, prefetch, adapters) = tier.status_nodes();
                (store, prefetch, adapters, tier.prefetch().active_jobs())
            }
            None => (
                kvtier_storage::store::disabled_status(),
                kvtier_storage::prefetch::disabled_status(PrefetchConfig::default().max_in_flight),
                Vec::new(),
                0,
            ),
        }
    }

    /// Stops the tier in order (prefetch, then write-behind flush, then adapters). Idempotent.
    pub fn shutdown(&self) {
        if let Some(tier) = &self.tier {
            tier.shutdown();
        }
    }
}
