//! KV events: a sequenced, bounded replay log of what L1 holds, streamed to subscribers
//! (`subscribe_kv_events`, LMCache 0.5.6's protocol) so KV-aware routers know which engine's
//! host cache holds a prefix.
//!
//! Records (LMCache's `KVEventRecord`, medium `"CPU"`):
//! - `stored` — a chunk became readable in L1: one record per chunk, with its 32-byte hash,
//!   the hash of the chunk before it and its tokens. Unlike LMCache, stores through *both*
//!   transfer paths (engine-driven `commit_store` and lmcache_driven `store`) and chunks
//!   loaded back from L2 by a prefetch are announced: the engine *binds* a chunk's tokens and
//!   parent when it reserves the chunk ([`KvEvents::bind`]), and the L1 publish consumes the
//!   binding. A publish without a binding is announced without tokens and counted
//!   (`unbound_stores`).
//! - `removed` — a chunk left L1 for any reason (eviction, delete, clear, a temporary object's
//!   last reader leaving).
//!
//! A chunk is identified by `(model, chunk hash)`, as routers see it: the ranks of a
//! tensor-parallel engine and the tenants (`cache_salt`) that hold the same tokens share one
//! identity. `stored` is announced when the first such object is published and `removed` when
//! the last one leaves (a resident count per identity, keyed by a 64-bit fingerprint: 13 bytes
//! per bucket, [`resident`]), so every announcement is made once and a removal never precedes its
//! store.
//!
//! Ordering: the records are appended by the L1 listener ([`L1Listener`]), which L1 calls with
//! its mutex held, so the log is in L1 order. The listener does O(1) work per key under the
//! log's own mutex (a leaf: L1 mutex → log mutex) and never blocks; when a subscriber may be
//! waiting it writes the transport's eventfd (a non-blocking 8-byte write) once per burst.
//!
//! Replay and loss: the log keeps the newest `--kv-event-log-size` records (0 disables the
//! whole feature and subscribers get one `enabled=false` batch). A subscriber resumes after its
//! cursor; if the cursor fell off the log (or lies in the future, e.g. after a restart) the
//! batch says `lost=true` and the subscriber must drop what it learned and resynchronise. The
//! `incarnation` (start time in ns) changes on every restart.
//!
//! L2 records (only with a router-facing publisher, [`publisher`]): `stored`/`removed` for what
//! each L2 adapter's index holds, with the adapter's medium ([`l2_medium_names`]), from the
//! adapters' [`L2Listener`] notifications. They share the log and its sequence with the L1
//! records (one order for the publisher) but are never sent to LMCache subscribers, whose
//! protocol only knows L1 (`"CPU"`). Resident counting is per `(medium, model, chunk hash)`.
//!
//! Subscriptions: one per worker instance (a new one closes the old); closed by `cancel`, the
//! instance's unregistration or reaping, a ping-less silence longer than the reap timeout, and
//! shutdown. Streaming is done by the transport, one batch per client credit, without a thread
//! per subscriber ([`Subscription::poll`] never blocks).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kvtier_core::hash::ChunkHash;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::{L1Listener, RemovalCause};
use kvtier_core::metrics::{MetricDesc, MetricKind, MetricSet, MetricUnit, MetricVisitor};
use kvtier_proto::{KvEventBatch, KvEventKind, KvEventRecord, TokenSpan};
use kvtier_storage::L2Listener;
use parking_lot::Mutex;
use resident::ResidentCounts;

mod listeners;
pub mod publisher;
mod resident;
mod subscription;

pub use publisher::{KvEventPublisher, PublisherConfig, PublisherError};
pub use subscription::{StreamPoll, Subscription};

/// The capability `get_experimental` advertises when events are enabled.
pub const CAPABILITY: &str = "kv_event_stream";

/// The medium of L1 records.
pub const MEDIUM_CPU: &str = "CPU";

/// Most records a subscriber may ask for per batch (LMCache's bound).
pub const MAX_EVENTS_PER_BATCH: i64 = 1024;

/// Most media: L1 plus one per L2 adapter (`kvtier_storage::tier::MAX_ADAPTERS`).
pub const MAX_MEDIA: usize = 1 + 32;

/// Bindings kept for chunks reserved but not yet published (abandoned stores age out first).
const MAX_BINDINGS: usize = 8192;

/// Something that wakes the transport so it polls its streams again (cheap, non-blocking).
#[derive(Clone)]
pub struct Waker(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waker")
    }
}

kvtier_core::metric_set! {
    /// KV-event counters (status `kv_events`, Prometheus `kvtier_kv_events_*`).
    pub struct KvEventCounters {
        /// `stored` records appended.
        stored_total: Counter => "kvtier_kv_events_stored",
        /// `removed` records appended.
        removed_total: Counter => "kvtier_kv_events_removed",
        /// Records that fell off the replay log.
        records_dropped_total: Counter => "kvtier_kv_events_records_dropped",
        /// Batches with `lost=true` sent to subscribers.
        lost_batches_total: Counter => "kvtier_kv_events_lost_batches",
        /// Publishes announced without tokens (no binding from the store path).
        unbound_stores_total: Counter as "unbound_stores" => "kvtier_kv_events_unbound_stores",
        /// Subscriptions opened.
        subscriptions_total: Counter => "kvtier_kv_events_subscriptions",
        /// Batches sent to subscribers.
        batches_total: Counter => "kvtier_kv_events_batches",
    }
}

const RECORDS: MetricDesc = MetricDesc {
    name: "kvtier_kv_events_records",
    status_key: "records_by_medium",
    help: "Records appended to the KV-event log, by kind and medium.",
    unit: MetricUnit::None,
    kind: MetricKind::Counter,
};

static DESCRIPTORS: [MetricDesc; 4] = [
    RECORDS,
    MetricDesc {
        name: "kvtier_kv_events_subscribers",
        status_key: "subscribers",
        help: "Open subscribe_kv_events streams.",
        unit: MetricUnit::None,
        kind: MetricKind::Gauge,
    },
    MetricDesc {
        name: "kvtier_kv_events_log_depth",
        status_key: "log_depth",
        help: "Records held in the replay log.",
        unit: MetricUnit::None,
        kind: MetricKind::Gauge,
    },
    MetricDesc {
        name: "kvtier_kv_events_resident_chunks",
        status_key: "resident_chunks",
        help: "Distinct (medium, model, chunk) identities announced as stored and not removed.",
        unit: MetricUnit::None,
        kind: MetricKind::Gauge,
    },
];

#[derive(Debug)]
struct Binding {
    parent: Option<ChunkHash>,
    tokens: TokenSpan,
}

/// Records appended per medium and kind (`[stored, removed]`), relaxed atomics.
#[derive(Debug)]
struct MediumCounts([[std::sync::atomic::AtomicU64; 2]; MAX_MEDIA]);

impl Default for MediumCounts {
    fn default() -> Self {
        Self(std::array::from_fn(|_| Default::default()))
    }
}

impl MediumCounts {
    fn inc(&self, medium: usize, kind: KvEventKind) {
        let k = match kind {
            KvEventKind::Stored => 0,
            KvEventKind::Removed => 1,
        };
        if let Some(c) = self.0.get(medium) {
            c[k].fetch_add(1, Relaxed);
        }
    }

    fn get(&self, medium: usize) -> [u64; 2] {
        self.0
            .get(medium)
            .map_or([0, 0], |c| [c[0].load(Relaxed), c[1].load(Relaxed)])
    }
}

/// The media L2 records are announced with, one per adapter in `--l2-adapter` order: `DISK`
/// (`fs`), `REDIS` (`resp`), `VALKEY` (`valkey`), `MOCK` (`mock`); a kind configured twice gets
/// `_1`, `_2`, ... from its second adapter on.
pub fn l2_medium_names<'a>(kinds: impl IntoIterator<Item = &'a str>) -> Vec<&'static str> {
    let mut seen: HashMap<&'static str, usize> = HashMap::new();
    kinds
        .into_iter()
        .map(|kind| {
            let base = match kind {
                "fs" => "DISK",
                "resp" => "REDIS",
                "valkey" => "VALKEY",
                "mock" => "MOCK",
                _ => "L2",
            };
            let n = seen.entry(base).or_insert(0);
            let name = match *n {
                0 => base,
                k => intern(format!("{base}_{k}")),
            };
            *n += 1;
            name
        })
        .collect()
}

/// Interns a medium name. The records carry `&'static str` media (no allocation or refcount per
/// record); the names are few (at most [`MAX_MEDIA`] distinct ones per configuration), so they
/// are leaked once each and reused by every later server in the process.
fn intern(name: String) -> &'static str {
    static NAMES: OnceLock<Mutex<Vec<&'static str>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(Default::default).lock();
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    names.push(leaked);
    leaked
}

use kvtier_core::collections::FastMap;

#[derive(Debug)]
struct SubEntry {
    id: u64,
    closed: Arc<AtomicBool>,
    last_seen: Instant,
}

#[derive(Debug, Default)]
struct State {
    log: VecDeque<KvEventRecord>,
    next_seq: u64,
    /// Announced identities: `(medium index, model, chunk hash)` → objects holding it.
    resident: ResidentCounts,
    bindings: FastMap<ChunkHash, Binding>,
    binding_order: VecDeque<ChunkHash>,
    subscriptions: HashMap<i64, SubEntry>,
    next_sub: u64,
}

/// The KV-event log and its subscriptions. See the module docs.
#[derive(Debug)]
pub struct KvEvents {
    capacity: usize,
    incarnation: u64,
    state: Mutex<State>,
    counters: KvEventCounters,
    by_medium: MediumCounts,
    waker: OnceLock<Waker>,
    /// Media of L2 records, by adapter index; set when a publisher wants L2 records.
    l2_media: OnceLock<Vec<&'static str>>,
    publisher: OnceLock<Arc<KvEventPublisher>>,
}

impl KvEvents {
    /// A log keeping `capacity` records (0 disables events).
    pub fn new(capacity: usize) -> Self {
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Self {
            capacity,
            incarnation,
            state: Mutex::new(State {
                next_seq: 1,
                ..State::default()
            }),
            counters: KvEventCounters::default(),
            by_medium: MediumCounts::default(),
            waker: OnceLock::new(),
            l2_media: OnceLock::new(),
            publisher: OnceLock::new(),
        }
    }

    /// Whether events are recorded (log size > 0).
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// This run's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Counters.
    pub fn counters(&self) -> &KvEventCounters {
        &self.counters
    }

    /// Sets the waker the transport gives for its streams (once).
    pub fn set_waker(&self, waker: Waker) {
        let _already = self.waker.set(waker);
    }

    /// Wakes the transport (the waker coalesces bursts: one eventfd write until the transport
    /// has polled again).
    fn wake(&self) {
        if let Some(w) = self.waker.get() {
            (w.0)();
        }
    }

    /// Records L2 changes too, announcing adapter `i` with medium `media[i]` (see
    /// [`l2_medium_names`]). Call once, before the L2 tier starts; later calls are ignored.
    pub fn enable_l2_records(&self, media: Vec<&'static str>) {
        let _already = self.l2_media.set(media);
    }

    /// Attaches the router-facing publisher (once): it is woken on every append and reported
    /// in the status tree.
    pub fn attach_publisher(&self, publisher: Arc<KvEventPublisher>) {
        let _already = self.publisher.set(publisher);
    }

    /// The attached publisher.
    pub fn publisher(&self) -> Option<&Arc<KvEventPublisher>> {
        self.publisher.get()
    }

    /// The sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.state.lock().next_seq
    }

    /// Remembers the tokens and parent of chunks about to be published (`tokens` holds the
    /// tokens of the range, `hashes[i]` is chunk `i` of it; only the chunks in `chunks` are
    /// bound). O(chunks × chunk size) copying, outside any L1 lock.
    pub fn bind(
        &self,
        hashes: &[ChunkHash],
        parent: Option<ChunkHash>,
        range_tokens: &[u32],
        chunk_size: usize,
        chunks: impl IntoIterator<Item = usize>,
    ) {
        if !self.enabled() || chunk_size == 0 {
            return;
        }
        // One allocation per store: the bound chunks' tokens, back to back (only those chunks,
        // so a record never keeps tokens of chunks it does not describe alive).
        let mut picked: Vec<(usize, ChunkHash)> = Vec::new();
        for i in chunks {
            if let Some(&hash) = hashes.get(i)
                && (i + 1) * chunk_size <= range_tokens.len()
            {
                picked.push((i, hash));
            }
        }
        if picked.is_empty() {
            return;
        }
        // Usually the picked chunks are consecutive: then their tokens are one slice of the
        // request's, copied once straight into the shared buffer (no intermediate `Vec`, whose
        // conversion would allocate and copy a second time).
        let first = picked[0].0;
        let consecutive = picked.iter().enumerate().all(|(n, &(i, _))| i == first + n);
        let buf: Arc<[u32]> = if consecutive {
            Arc::from(&range_tokens[first * chunk_size..(first + picked.len()) * chunk_size])
        } else {
            let mut tokens = Vec::with_capacity(picked.len() * chunk_size);
            for &(i, _) in &picked {
                tokens.extend_from_slice(&range_tokens[i * chunk_size..(i + 1) * chunk_size]);
            }
            Arc::from(tokens)
        };
        let mut s = self.state.lock();
        for (n, (i, hash)) in picked.into_iter().enumerate() {
            let parent = match i {
                0 => parent,
                _ => hashes.get(i - 1).copied(),
            };
            let b = Binding {
                parent,
                tokens: TokenSpan::new(Arc::clone(&buf), n * chunk_size, chunk_size),
            };
            if s.bindings.insert(hash, b).is_none() {
                s.binding_order.push_back(hash);
            }
        }
        while s.binding_order.len() > MAX_BINDINGS {
            if let Some(old) = s.binding_order.pop_front() {
                s.bindings.remove(&old);
            }
        }
    }

    fn append(&self, s: &mut State, medium: usize, record: KvEventRecord) {
        match record.kind {
            KvEventKind::Stored => self.counters.stored_total.inc(),
            KvEventKind::Removed => self.counters.removed_total.inc(),
        }
        self.by_medium.inc(medium, record.kind);
        s.log.push_back(record);
        s.next_seq += 1;
        while s.log.len() > self.capacity {
            s.log.pop_front();
            self.counters.records_dropped_total.inc();
        }
        if !s.subscriptions.is_empty() {
            self.wake();
        }
        if let Some(p) = self.publisher.get() {
            p.wake();
        }
    }

    /// The status fields (LMCache's `kv_events` names plus kvtier's counters).
    pub fn status(&self) -> serde_json::Map<String, serde_json::Value> {
        let (depth, next_seq, first_seq, subscribers, resident) = {
            let s = self.state.lock();
            (
                s.log.len(),
                s.next_seq,
                s.log.front().map_or(s.next_seq, |r| r.seq),
                s.subscriptions.len(),
                s.resident.len(),
            )
        };
        let mut m = serde_json::Map::new();
        m.insert("enabled".into(), self.enabled().into());
        m.insert("incarnation".into(), self.incarnation.into());
        m.insert("log_depth".into(), depth.into());
        m.insert("log_capacity".into(), self.capacity.into());
        m.insert("first_seq".into(), first_seq.into());
        m.insert("next_seq".into(), next_seq.into());
        // kvtier's listener never drops events, so there are no lost markers in the log; a
        // subscriber that falls off the log gets `lost=true` (lost_batches_total).
        m.insert("lost_markers".into(), 0.into());
        m.insert("subscribers".into(), subscribers.into());
        m.insert("resident_chunks".into(), resident.into());
        m.extend(kvtier_core::metrics::status_fields(&self.counters));
        let mut media = serde_json::Map::new();
        for (i, name) in self.media().enumerate() {
            let [stored, removed] = self.by_medium.get(i);
            media.insert(
                name.to_owned(),
                serde_json::json!({"stored": stored, "removed": removed}),
            );
        }
        m.insert(RECORDS.status_key.into(), media.into());
        m
    }
}

impl MetricSet for KvEvents {
    fn descriptors(&self) -> &'static [MetricDesc] {
        &DESCRIPTORS
    }

    fn visit(&self, v: &mut dyn MetricVisitor) {
        let (subs, depth, resident) = {
            let s = self.state.lock();
            (s.subscriptions.len(), s.log.len(), s.resident.len())
        };
        let [records, subscribers, log_depth, resident_chunks] = &DESCRIPTORS;
        v.gauge(subscribers, &[], subs as f64);
        v.gauge(log_depth, &[], depth as f64);
        v.gauge(resident_chunks, &[], resident as f64);
        for (i, medium) in self.media().enumerate() {
            let [stored, removed] = self.by_medium.get(i);
            v.counter(records, &[("kind", "stored"), ("medium", medium)], stored);
            v.counter(records, &[("kind", "removed"), ("medium", medium)], removed);
        }
    }
}
