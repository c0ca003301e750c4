//! Lookup explanations: a bounded record of recent lookups, each with the reason its prefix
//! ended where it did (`GET /api/lookups`, `kvtier explain REQUEST_ID`,
//! `kvtier_lookup_misses_total{reason}`).
//!
//! - [`history`]: what last happened in L1 to each recently seen chunk (an L1 listener).
//! - [`records`]: the ring of recent lookup records, indexed by request id.
//!
//! A record is made by every successful `lookup`. Its first missing chunk (the chunk right
//! after the prefix found) gets one [`MissReason`]:
//! - without L2, or when the L2 prefetch found nothing for it: from the chunk history (never
//!   stored, evicted and why, deleted, cleared, released after an L2 load, discarded write,
//!   another model or cache_salt holds the same tokens, stored for only some kv ranks);
//! - with L2: from the prefetch's report (found in L2 but not loaded, L2 adapters failing) and,
//!   when no L2 held it, the history as above. Such a record stays `l2_pending` until the
//!   engine collects the prefetch result (`query_prefetch_status`/`wait_prefetch_status`);
//!   a request that ends or looks up again first is `abandoned` with reason `prefetch_timeout`.
//!
//! The reason is counted once per lookup, when the record is final. Costs on the request
//! path: one history probe (one bucket, under a leaf mutex) per lookup that misses, and the
//! record (a brief O(1) lock on the ring, plus a copy of the missing suffix's chunk hashes
//! while an L2 prefetch is pending). Memory: `--lookup-records` records (about 250 bytes with
//! ordinary ids; at most about 2 KiB, as the request id is cut to [`MAX_ID_CHARS`] characters,
//! a salt has at most 128 and the model name is shared; a pending record also holds 32 bytes
//! per chunk its L2 prefetch may load, until collected) plus the history table
//! (`--miss-history-chunks` × 16 bytes).
//!
//! Lock order: records mutex and history mutex are leaves; neither is held while the other is
//! taken (the history is read before the records are locked).

pub mod history;
pub mod records;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier_core::hash::ChunkHash;
use kvtier_core::metrics::{Counter, MetricDesc, MetricKind, MetricSet, MetricUnit, MetricVisitor};
use kvtier_core::status::StatusNode;
use kvtier_storage::prefetch::PrefetchReport;
use serde::Serialize;

use self::history::{ChunkHistory, Fate, Recall, owner_of};
use self::records::{LookupRecord, Miss, Pending, RecordState, Records};

/// Longest request id or cache salt kept in a record (characters; the model name is shared).
pub const MAX_ID_CHARS: usize = 256;

/// Default number of lookup records kept (`--lookup-records`).
pub const DEFAULT_RECORDS: usize = 4096;

/// Why a lookup's prefix ended before the end of its tokens (bounded label set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MissReason {
    /// No store of this chunk (for this model and salt) is remembered.
    NeverStored,
    /// Evicted from L1, and no L2 holds it.
    Evicted,
    /// Deleted by key, and no L2 holds it.
    Deleted,
    /// Removed by a clear, and no L2 holds it.
    Cleared,
    /// Loaded from L2 for an earlier request and freed after it; no L2 holds it now.
    Released,
    /// Its write lock lapsed before the writer committed: the stored bytes were discarded.
    Discarded,
    /// Another model or cache_salt holds the same tokens.
    OtherModelOrSalt,
    /// Stored, but not for every kv rank of the lookup (or being written right now).
    Incomplete,
    /// An L2 adapter holds it, but the prefetch could not load it (L1 full, load error,
    /// prefetch queue full).
    PrefetchFailed,
    /// The request ended or looked up again before its L2 prefetch finished.
    PrefetchTimeout,
    /// L2 adapters failed their lookup, so none could be asked.
    L2Unavailable,
}

impl MissReason {
    /// Every reason, in label order.
    pub const ALL: [MissReason; 11] = [
        Self::NeverStored,
        Self::Evicted,
        Self::Deleted,
        Self::Cleared,
        Self::Released,
        Self::Discarded,
        Self::OtherModelOrSalt,
        Self::Incomplete,
        Self::PrefetchFailed,
        Self::PrefetchTimeout,
        Self::L2Unavailable,
    ];

    /// The metric label and JSON name.
    pub fn label(self) -> &'static str {
        match self {
            Self::NeverStored => "never_stored",
            Self::Evicted => "evicted",
            Self::Deleted => "deleted",
            Self::Cleared => "cleared",
            Self::Released => "released",
            Self::Discarded => "discarded",
            Self::OtherModelOrSalt => "other_model_or_salt",
            Self::Incomplete => "incomplete",
            Self::PrefetchFailed => "prefetch_failed",
            Self::PrefetchTimeout => "prefetch_timeout",
            Self::L2Unavailable => "l2_unavailable",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

static MISSES: MetricDesc = MetricDesc {
    name: "kvtier_lookup_misses",
    status_key: "misses_by_reason",
    help: "Lookups whose prefix ended before their last chunk, by the reason of the first \
           missing chunk (see kvtier explain).",
    unit: MetricUnit::None,
    kind: MetricKind::Counter,
};

static DESCRIPTORS: [MetricDesc; 1] = [MISSES];

/// What a finished `lookup` tells the explainer.
#[derive(Debug)]
pub struct LookupFacts<'a> {
    /// The request id.
    pub request_id: &'a str,
    /// The model name.
    pub model: &'a Arc<str>,
    /// The cache salt.
    pub cache_salt: &'a str,
    /// The chunk hashes asked for, in order.
    pub hashes: &'a [ChunkHash],
    /// Whole chunks found in L1 (prefix).
    pub l1_chunks: usize,
    /// Keys per chunk (kv ranks asked at once).
    pub group: usize,
    /// Whether an L2 prefetch of the rest is now pending.
    pub l2_pending: bool,
    /// When the lookup started.
    pub started: Instant,
}

/// See the module docs.
#[derive(Debug)]
pub struct Explainer {
    history: Option<Arc<ChunkHistory>>,
    records: Records,
    misses: [Counter; MissReason::ALL.len()],
    policy: &'static str,
}

impl Explainer {
    /// An explainer keeping `records` lookups (0 disables explanations and the history) and a
    /// history of about `history_slots` chunks; `policy` names L1's eviction policy.
    pub fn new(records: usize, history_slots: usize, policy: &'static str) -> Self {
        Self {
            history: (records > 0).then(|| Arc::new(ChunkHistory::new(history_slots))),
            records: Records::new(records),
            misses: Default::default(),
            policy,
        }
    }

    /// The chunk history, to be installed as an L1 listener (None when disabled).
    pub fn history(&self) -> Option<&Arc<ChunkHistory>> {
        self.history.as_ref()
    }

    /// Records kept at most.
    pub fn capacity(&self) -> usize {
        self.records.capacity()
    }

    /// Whether lookups are recorded.
    pub fn enabled(&self) -> bool {
        self.history.is_some()
    }

    /// Records a lookup (see the module docs).
    pub fn looked_up(&self, f: &LookupFacts<'_>) {
        let Some(history) = &self.history else { return };
        let chunks = f.hashes.len();
        let owner = owner_of(f.model, f.cache_salt);
        let mut state = RecordState::Done;
        let mut miss = None;
        let mut pending = None;
        if f.l1_chunks < chunks {
            if f.l2_pending {
                state = RecordState::L2Pending;
                pending = Some(Pending {
                    missing: f.hashes[f.l1_chunks..].to_vec(),
                    first_index: f.l1_chunks,
                    owner,
                    group: f.group.max(1),
                });
            } else {
                let hash = &f.hashes[f.l1_chunks];
                miss = Some(self.explain_from_history(history, hash, owner, f.l1_chunks, ""));
            }
        }
        if let Some(m) = &miss {
            self.count(m.reason);
        }
        let record = LookupRecord {
            seq: 0,
            request_id: cut(f.request_id),
            model: Arc::clone(f.model),
            cache_salt: cut(f.cache_salt),
            unix_ms: unix_ms(),
            chunks_requested: chunks as u64,
            hit_chunks_l1: f.l1_chunks as u64,
            hit_chunks_l2: None,
            state,
            lookup_us: f.started.elapsed().as_micros() as u64,
            l2_prefetch_ms: None,
            wait_timeouts: 0,
            miss,
            retrieved_objects: 0,
            failed_retrieves: 0,
            pending,
            previous: None,
        };
        // A previous lookup of the request still waiting for L2 never gets its result: it is
        // made final in the same step (no second lookup of the request on this path).
        self.records.push(record, |pending| {
            self.abandoned_miss(&pending, "the request looked up again")
        });
    }

    /// The L2 prefetch of `request_id`'s latest lookup finished with `l2_chunks` chunks loaded.
    pub fn l2_done(&self, request_id: &str, l2_chunks: u64, report: &PrefetchReport) {
        let Some(history) = &self.history else { return };
        let Some(pending) = self.records.take_pending(request_id) else {
            return;
        };
        let loaded = usize::try_from(l2_chunks).unwrap_or(usize::MAX);
        let miss = pending.missing.get(loaded).map(|hash| {
            let index = pending.first_index + loaded;
            let found_chunks = report.found_keys / pending.group;
            if !report.ran {
                miss_of(
                    MissReason::PrefetchFailed,
                    index,
                    hash,
                    None,
                    "the L2 prefetch did not run (its queue was full, or it was cancelled)".into(),
                )
            } else if loaded < found_chunks {
                let why = if report.l1_short {
                    "L1 had no room to load it"
                } else {
                    "loading it failed"
                };
                miss_of(
                    MissReason::PrefetchFailed,
                    index,
                    hash,
                    None,
                    format!("an L2 adapter holds it, but {why}"),
                )
            } else if report.failed_adapters > 0 {
                miss_of(
                    MissReason::L2Unavailable,
                    index,
                    hash,
                    None,
                    format!(
                        "{} of {} L2 adapters failed their lookup",
                        report.failed_adapters, report.adapters
                    ),
                )
            } else {
                self.explain_from_history(
                    history,
                    hash,
                    pending.owner,
                    index,
                    ", and no L2 adapter holds it",
                )
            }
        });
        if let Some(m) = &miss {
            self.count(m.reason);
        }
        self.records.finish(
            request_id,
            RecordState::Done,
            Some(l2_chunks),
            Some(report.run_time),
            miss,
        );
    }

    /// The latest lookup of `request_id` will never get its L2 result (the request ended,
    /// looked up again, or its result expired).
    pub fn abandoned(&self, request_id: &str, why: &str) {
        if self.history.is_none() {
            return;
        }
        let Some(pending) = self.records.take_pending(request_id) else {
            return;
        };
        let miss = self.abandoned_miss(&pending, why);
        self.records
            .finish(request_id, RecordState::Abandoned, None, None, miss);
    }

    /// The (counted) miss of a lookup whose L2 result will never be collected.
    fn abandoned_miss(&self, pending: &Pending, why: &str) -> Option<Miss> {
        let miss = pending.missing.first().map(|hash| {
            miss_of(
                MissReason::PrefetchTimeout,
                pending.first_index,
                hash,
                None,
                format!("{why} before its L2 prefetch finished"),
            )
        });
        if let Some(m) = &miss {
            self.count(m.reason);
        }
        miss
    }

    /// A `wait_prefetch_status` of `request_id` reached its deadline.
    pub fn wait_timed_out(&self, request_id: &str) {
        if self.enabled() {
            self.records.update(request_id, |r| r.wait_timeouts += 1);
        }
    }

    /// A retrieve for `request_id` handed `objects` objects to the engine (`ok`) or failed.
    pub fn retrieved(&self, request_id: &str, objects: usize, ok: bool) {
        if self.enabled() {
            self.records.update(request_id, |r| {
                if ok {
                    r.retrieved_objects += objects as u64;
                } else {
                    r.failed_retrieves += 1;
                }
            });
        }
    }

    /// Records of `request_id` (its lookups still kept, oldest first).
    pub fn by_request(&self, request_id: &str) -> Vec<LookupRecord> {
        self.records.by_request(request_id)
    }

    /// The `limit` most recent records, newest first.
    pub fn recent(&self, limit: usize) -> Vec<LookupRecord> {
        self.records.recent(limit)
    }

    /// The `explanations` status node.
    pub fn status(&self) -> StatusNode {
        let mut by_reason = serde_json::Map::new();
        for r in MissReason::ALL {
            by_reason.insert(r.label().into(), self.misses[r.index()].get().into());
        }
        let (held, capacity) = self.records.len_and_capacity();
        StatusNode::healthy()
            .field("enabled", self.enabled())
            .field("records", held)
            .field("records_capacity", capacity)
            .field(
                "history_slots",
                self.history.as_ref().map_or(0, |h| h.slots()),
            )
            .field(
                "history_bytes",
                self.history.as_ref().map_or(0, |h| h.bytes()),
            )
            .field("misses_by_reason", by_reason)
    }

    fn count(&self, reason: MissReason) {
        self.misses[reason.index()].inc();
    }

    fn explain_from_history(
        &self,
        history: &ChunkHistory,
        hash: &ChunkHash,
        owner: u32,
        index: usize,
        suffix: &str,
    ) -> Miss {
        let Recall {
            own,
            other_owner_stored,
        } = history.fate(hash, owner);
        let ago = |s: u32| format!("{s} s ago");
        let (reason, age, text) = match own {
            Some((Fate::Evicted(why), age)) => (
                MissReason::Evicted,
                Some(age),
                format!(
                    "evicted from L1 {} {} (policy {}){suffix}",
                    ago(age),
                    why.describe(),
                    self.policy
                ),
            ),
            Some((Fate::Deleted, age)) => (
                MissReason::Deleted,
                Some(age),
                format!("deleted from L1 {}{suffix}", ago(age)),
            ),
            Some((Fate::Cleared, age)) => (
                MissReason::Cleared,
                Some(age),
                format!("removed by a cache clear {}{suffix}", ago(age)),
            ),
            Some((Fate::Released, age)) => (
                MissReason::Released,
                Some(age),
                format!(
                    "loaded from L2 for an earlier request and freed after it {}{suffix}",
                    ago(age)
                ),
            ),
            Some((Fate::Discarded, age)) => (
                MissReason::Discarded,
                Some(age),
                format!(
                    "a store of it was discarded {}: its write lock expired before the writer \
                     committed",
                    ago(age)
                ),
            ),
            Some((Fate::Stored, age)) => (
                MissReason::Incomplete,
                Some(age),
                format!(
                    "stored {} but not for every kv rank of this lookup (or a rank's copy is \
                     being written)",
                    ago(age)
                ),
            ),
            None if other_owner_stored => (
                MissReason::OtherModelOrSalt,
                None,
                "never stored for this model and cache_salt; another model or cache_salt holds \
                 the same tokens"
                    .to_owned(),
            ),
            None => (
                MissReason::NeverStored,
                None,
                format!(
                    "never stored for this model and cache_salt, as far as the history of \
                     recent L1 events (up to {} chunks) remembers",
                    history.slots()
                ),
            ),
        };
        miss_of(reason, index, hash, age, text)
    }
}

fn miss_of(
    reason: MissReason,
    index: usize,
    hash: &ChunkHash,
    age_seconds: Option<u32>,
    detail: String,
) -> Miss {
    Miss {
        chunk_index: index as u64,
        chunk_hash: hash.to_hex(),
        reason,
        detail,
        age_seconds,
    }
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(MAX_ID_CHARS) {
        Some((i, _)) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl MetricSet for Explainer {
    fn descriptors(&self) -> &'static [MetricDesc] {
        &DESCRIPTORS
    }

    fn visit(&self, v: &mut dyn MetricVisitor) {
        for r in MissReason::ALL {
            v.counter(
                &MISSES,
                &[("reason", r.label())],
                self.misses[r.index()].get(),
            );
        }
    }
}

/// Used by the records (a record's L2 time).
pub(crate) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
