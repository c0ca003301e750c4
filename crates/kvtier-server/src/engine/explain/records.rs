//! The ring of recent lookup records, indexed by request id.
//!
//! Invariants: at most `capacity` records (the oldest goes first); `index` maps the 64-bit
//! hash of each request id to the sequence number of its newest record still in the ring, and
//! each record links to the request's previous record (`previous`), so a request's records
//! form a chain without a list per request; a lookup through the index compares the record's
//! request id, so a hash collision reads as "no record". A record's `pending` part (the chunk
//! hashes an L2 prefetch may still load) exists only while its state is `l2_pending`. Records
//! are shared `Arc`s: readers copy pointers under the lock and serialise outside it; an update
//! clones a record only while a reader still holds it.
//!
//! Locking: one leaf mutex, held for O(1) work per request-path call (O(records of one
//! request) for `by_request`, O(limit) pointer copies for `recent`).

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use kvtier_core::hash::ChunkHash;
use parking_lot::Mutex;
use serde::Serialize;

use super::{MissReason, millis};

/// Where a record stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Final.
    Done,
    /// Waiting for the L2 prefetch result to be collected.
    L2Pending,
    /// The request ended (or looked up again) before collecting its L2 result.
    Abandoned,
}

/// The first missing chunk of a lookup and why it was missing.
#[derive(Debug, Clone, Serialize)]
pub struct Miss {
    /// Its position in the lookup (0-based chunk number).
    pub chunk_index: u64,
    /// Its chunk hash (hex).
    pub chunk_hash: String,
    /// The reason (metric label).
    pub reason: MissReason,
    /// A sentence for humans.
    pub detail: String,
    /// Seconds since the remembered event (eviction, delete, ...), when there is one.
    pub age_seconds: Option<u32>,
}

/// What an L2-pending record keeps to explain its miss once the prefetch result is in.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Chunk hashes from the first chunk L1 lacked to the end of the lookup.
    pub missing: Vec<ChunkHash>,
    /// Chunk number of `missing[0]`.
    pub first_index: usize,
    /// Owner fingerprint of the lookup (model, salt).
    pub owner: u32,
    /// Keys per chunk.
    pub group: usize,
}

/// One lookup, as `GET /api/lookups` and `kvtier explain` show it.
#[derive(Debug, Clone, Serialize)]
pub struct LookupRecord {
    /// Position in the stream of records (1 = first since start).
    pub seq: u64,
    /// The request id (cut to 256 characters).
    pub request_id: String,
    /// The model name.
    #[serde(serialize_with = "as_str")]
    pub model: Arc<str>,
    /// The cache salt (`""` for none).
    pub cache_salt: String,
    /// When the lookup arrived (milliseconds since the Unix epoch).
    pub unix_ms: u64,
    /// Whole chunks the lookup asked for.
    pub chunks_requested: u64,
    /// Prefix chunks found in L1.
    pub hit_chunks_l1: u64,
    /// Prefix chunks then loaded from L2 (`None`: no L2 prefetch, or not collected).
    pub hit_chunks_l2: Option<u64>,
    /// Where the record stands.
    pub state: RecordState,
    /// Time the server spent on the lookup request itself.
    pub lookup_us: u64,
    /// How long the L2 prefetch ran (when there was one and it was collected).
    pub l2_prefetch_ms: Option<f64>,
    /// `wait_prefetch_status` calls that reached their deadline.
    pub wait_timeouts: u32,
    /// The first missing chunk and why (`None`: every chunk hit, or the L2 result is pending).
    pub miss: Option<Miss>,
    /// Objects (chunk × kv rank) handed to the engine by retrieves of this request.
    pub retrieved_objects: u64,
    /// Retrieves of this request that failed.
    pub failed_retrieves: u32,
    #[serde(skip)]
    pub(super) pending: Option<Pending>,
    /// The same request's previous record (its `seq`), if any.
    #[serde(skip)]
    pub(super) previous: Option<u64>,
}

fn as_str<S: serde::Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

type Hasher = foldhash::fast::FixedState;

fn id_hash(request_id: &str) -> u64 {
    Hasher::with_seed(0x7265_7175_6573_7473).hash_one(request_id)
}

#[derive(Debug, Default)]
struct Ring {
    records: VecDeque<Arc<LookupRecord>>,
    /// Sequence number of `records[0]`.
    first_seq: u64,
    /// Request id hash → newest record's `seq`.
    index: HashMap<u64, u64, Hasher>,
}

impl Ring {
    fn get(&self, seq: u64) -> Option<&Arc<LookupRecord>> {
        let i = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        self.records.get(i)
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut LookupRecord> {
        let i = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        self.records.get_mut(i).map(Arc::make_mut)
    }

    /// `seq` of `request_id`'s newest record still held.
    fn latest(&self, request_id: &str) -> Option<u64> {
        let seq = *self.index.get(&id_hash(request_id))?;
        (self.get(seq)?.request_id == request_id).then_some(seq)
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct Records {
    ring: Mutex<Ring>,
    capacity: usize,
}

impl Records {
    /// A ring of `capacity` records.
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Mutex::new(Ring {
                first_seq: 1,
                ..Ring::default()
            }),
            capacity,
        }
    }

    /// Appends a record (its `seq` is assigned here), dropping the oldest when full. When the
    /// request's previous record is still `l2_pending`, it becomes `abandoned` with the miss
    /// `abandon` makes of its pending part (called under the ring's lock: O(1) work only).
    pub fn push(&self, mut record: LookupRecord, abandon: impl FnOnce(Pending) -> Option<Miss>) {
        if self.capacity == 0 {
            return;
        }
        let hash = id_hash(&record.request_id);
        let mut r = self.ring.lock();
        if r.records.len() == self.capacity
            && let Some(old) = r.records.pop_front()
        {
            let first = r.first_seq;
            r.first_seq += 1;
            // The index points at a request's newest record: drop the entry only if that is
            // the record leaving.
            let old_hash = id_hash(&old.request_id);
            if r.index.get(&old_hash) == Some(&first) {
                r.index.remove(&old_hash);
            }
        }
        let seq = r.first_seq + r.records.len() as u64;
        record.seq = seq;
        record.previous = r.latest(&record.request_id);
        if let Some(prev) = record.previous.and_then(|s| r.get_mut(s))
            && prev.state == RecordState::L2Pending
            && let Some(pending) = prev.pending.take()
        {
            prev.state = RecordState::Abandoned;
            prev.miss = abandon(pending);
        }
        r.index.insert(hash, seq);
        r.records.push_back(Arc::new(record));
    }

    /// Takes the pending part of `request_id`'s latest record, if it is still pending.
    pub fn take_pending(&self, request_id: &str) -> Option<Pending> {
        let mut r = self.ring.lock();
        let seq = r.latest(request_id)?;
        let rec = r.get_mut(seq)?;
        if rec.state != RecordState::L2Pending {
            return None;
        }
        rec.pending.take()
    }

    /// Makes `request_id`'s latest record final.
    pub fn finish(
        &self,
        request_id: &str,
        state: RecordState,
        l2_chunks: Option<u64>,
        l2_time: Option<Duration>,
        miss: Option<Miss>,
    ) {
        self.update(request_id, |rec| {
            rec.state = state;
            rec.hit_chunks_l2 = l2_chunks;
            rec.l2_prefetch_ms = l2_time.map(millis);
            rec.miss = miss;
            rec.pending = None;
        });
    }

    /// Applies `f` to `request_id`'s latest record.
    pub fn update(&self, request_id: &str, f: impl FnOnce(&mut LookupRecord)) {
        let mut r = self.ring.lock();
        if let Some(seq) = r.latest(request_id)
            && let Some(rec) = r.get_mut(seq)
        {
            f(rec);
        }
    }

    /// `request_id`'s records still held, oldest first.
    pub fn by_request(&self, request_id: &str) -> Vec<LookupRecord> {
        let mut picked: Vec<Arc<LookupRecord>> = {
            let r = self.ring.lock();
            let mut out = Vec::new();
            let mut next = r.latest(request_id);
            while let Some(rec) = next.and_then(|s| r.get(s)) {
                out.push(Arc::clone(rec));
                next = rec.previous;
            }
            out
        };
        picked.reverse();
        picked.iter().map(|a| (**a).clone()).collect()
    }

    /// The `limit` newest records, newest first.
    pub fn recent(&self, limit: usize) -> Vec<LookupRecord> {
        let picked: Vec<Arc<LookupRecord>> = {
            let r = self.ring.lock();
            r.records.iter().rev().take(limit).cloned().collect()
        };
        picked.iter().map(|a| (**a).clone()).collect()
    }

    /// Records kept at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// `(records held, capacity)`.
    pub fn len_and_capacity(&self) -> (usize, usize) {
        (self.ring.lock().records.len(), self.capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> LookupRecord {
        LookupRecord {
            seq: 0,
            request_id: id.into(),
            model: "m".into(),
            cache_salt: String::new(),
            unix_ms: 0,
            chunks_requested: 2,
            hit_chunks_l1: 1,
            hit_chunks_l2: None,
            state: RecordState::Done,
            lookup_us: 1,
            l2_prefetch_ms: None,
            wait_timeouts: 0,
            miss: None,
            retrieved_objects: 0,
            failed_retrieves: 0,
            pending: None,
            previous: None,
        }
    }

    #[test]
    fn the_ring_is_bounded_and_its_index_follows() {
        let r = Records::new(3);
        for id in ["a", "b", "a", "c", "d"] {
            r.push(rec(id), |_| None);
        }
        assert_eq!(r.len_and_capacity(), (3, 3));
        let a: Vec<u64> = r.by_request("a").iter().map(|x| x.seq).collect();
        assert_eq!(a, vec![3]);
        r.push(rec("a"), |_| None); // seq 6; a's seq 3 leaves the ring
        r.push(rec("a"), |_| None); // seq 7
        let a: Vec<u64> = r.by_request("a").iter().map(|x| x.seq).collect();
        assert_eq!(a, vec![6, 7]);
        assert!(r.by_request("b").is_empty());
        let newest: Vec<String> = r.recent(2).into_iter().map(|x| x.request_id).collect();
        assert_eq!(newest, vec!["a", "a"]);
        assert!(r.by_request("c").is_empty());
        r.update("a", |x| x.retrieved_objects = 7);
        assert_eq!(r.by_request("a")[1].retrieved_objects, 7);
        assert_eq!(r.by_request("a")[0].retrieved_objects, 0);
        assert_eq!(r.ring.lock().index.len(), 2); // d and a
    }

    #[test]
    fn a_new_lookup_abandons_the_requests_pending_one() {
        let r = Records::new(8);
        let mut pending = rec("p");
        pending.state = RecordState::L2Pending;
        pending.pending = Some(Pending {
            missing: Vec::new(),
            first_index: 1,
            owner: 0,
            group: 1,
        });
        r.push(pending, |_| None);
        let mut asked = None;
        r.push(rec("p"), |p| {
            asked = Some(p.first_index);
            None
        });
        assert_eq!(asked, Some(1));
        let both = r.by_request("p");
        assert_eq!(both[0].state, RecordState::Abandoned);
        assert!(both[0].pending.is_none());
        assert_eq!(both[1].state, RecordState::Done);
        r.push(rec("p"), |_| panic!("a done record is not abandoned"));
    }
}
