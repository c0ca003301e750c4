//! Cache analysis on the lookup stream: the live hit-rate curve ([`hit_curve`]) and the lookup
//! log for offline what-if replays ([`lookup_log`]).
//!
//! [`LookupObserver`] is the one entry point on the request path: `engine/lookup.rs` calls
//! [`LookupObserver::lookup`] once per lookup with the request's hashed span. It does O(chunks)
//! work without a lock or a wait: a sampling filter for the curve and, with `--lookup-log-dir`,
//! one record; both hand their work to a named thread through a bounded queue that drops and
//! counts when full.

pub mod hit_curve;
pub mod lookup_log;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use kvtier_core::analysis::lookup_log::{ALL_RANKS, LookupRecord, chunk_id};
use kvtier_core::l1::L1Manager;

use self::hit_curve::{HitCurve, tenant_hash};
use self::lookup_log::LookupLog;
use crate::engine::session::ChunkSpan;

/// Where lookups are reported: the live curve and the lookup log, each optional.
#[derive(Debug, Default)]
pub struct LookupObserver {
    curve: Option<Arc<HitCurve>>,
    log: Option<Arc<LookupLog>>,
    l1: Option<Arc<L1Manager>>,
}

impl LookupObserver {
    /// Reports to `curve` (when enabled) and `log`; `l1` gives the chunk size the log records.
    pub fn new(curve: Arc<HitCurve>, log: Option<Arc<LookupLog>>, l1: Arc<L1Manager>) -> Self {
        Self {
            curve: curve.enabled().then_some(curve),
            log,
            l1: Some(l1),
        }
    }

    /// One lookup's span: `group` ranks looked up at once (1 for a one-worker lookup).
    pub fn lookup(&self, span: &ChunkSpan, group: usize) {
        if self.curve.is_none() && self.log.is_none() {
            return;
        }
        let Some(first) = span.keys.first() else {
            return;
        };
        let rank = if group == 1 { first.kv_rank } else { ALL_RANKS };
        let weight = u32::try_from(group.max(1)).unwrap_or(u32::MAX);
        if let Some(curve) = &self.curve {
            let tenant = tenant_hash(&span.model, &first.cache_salt, rank);
            curve.observe(tenant, &span.hashes, weight);
        }
        if let Some(log) = &self.log {
            let object_bytes = self.l1.as_ref().map_or(0, |l1| {
                let (used, _) = l1.usage();
                used.checked_div(l1.counters().objects.get()).unwrap_or(0)
            });
            log.record(LookupRecord {
                unix_micros: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64),
                chunk_bytes: object_bytes * u64::from(weight),
                kv_rank: rank,
                ranks: weight,
                cache_salt: Arc::clone(&first.cache_salt),
                model: Arc::clone(&span.model),
                chunks: span.hashes.iter().map(|h| chunk_id(h.as_ref())).collect(),
            });
        }
    }
}
