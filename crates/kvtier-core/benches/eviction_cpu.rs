//! Eviction CPU per chunk, every policy against LRU in the same run.
//!
//! - `policy_per_chunk`: the policy alone, with the same operation sequence for every policy:
//!   65,536 resident objects; per chunk, one victim is selected and removed (the caller hands
//!   back its metadata, which it keeps per slot as a 4-byte object number), a new object
//!   becomes ready in its slot, and a resident object is read (two accesses: lock and
//!   release). This is the comparison the policy choice changes. `evict_insert_read` does it
//!   one chunk at a time; `batch16` runs the same operations 16 chunks at a time, as the
//!   manager does for a 16-chunk store (one selection, the removals and the admissions each
//!   hinted first with `EvictionPolicy::prefetch`).
//! - `l1_evict_per_chunk`: the whole L1 manager on a full pool, per chunk one store that evicts
//!   exactly one object (`reserve_write` + `finish_write`: index, allocator, tenant accounting,
//!   listener and policy), with no reads (`store_evict`) or with two reads per chunk that hit
//!   under every policy (`store_evict_read`, see [`whole_path`]), or one store of 16 new
//!   chunks per call that evicts 16 (`store_evict_batch16`: a multi-chunk request, whose
//!   admissions and removals the manager hints to the policy before handling the first).
//!   Identical operations and outcomes for every policy, so this is the like-for-like ratio
//!   users pay for.
//!
//! `EVICTION_BENCH_RESIDENT=<objects>` changes the resident object count (default 65,536, whose
//! tables fit this machine's 2 MiB L2; 1,048,576 shows a large L1, whose tables do not).
//! Run: `cargo bench -p kvtier-core --bench eviction_cpu`. On a shared, loaded machine run the
//! built binary under `chrt -f 50 … --bench` instead (docs/performance.md).
//!
//! `… --interleaved [ROUNDS]` (default 10) runs the same workloads without criterion, every
//! policy in turn within each round, and prints each policy's median ns per chunk and its
//! median ratio to LRU in the same round ([`interleaved`]): the ratio survives this VM's
//! minute-to-minute swings, which move criterion's one-policy-at-a-time figures by up to 2×.

use std::hint::black_box;
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group};
use kvtier_core::hash::ChunkHash;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::eviction::{EntryId, EntryMeta, Removal, Verdict};
use kvtier_core::l1::{EvictionPolicy, EvictionPolicyKind, L1Config, L1Listener, L1Manager};

const OBJ: u64 = 4096;
const DEFAULT_RESIDENT: u64 = 65_536;
const BATCH: usize = 16;

/// Resident objects: `EVICTION_BENCH_RESIDENT` or [`DEFAULT_RESIDENT`].
fn resident() -> u64 {
    std::env::var("EVICTION_BENCH_RESIDENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &u64| n >= 1024)
        .unwrap_or(DEFAULT_RESIDENT)
}

/// The whole-path workloads (see [`whole_path`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One chunk per store, no reads.
    Store,
    /// One chunk per store and two reads per chunk.
    StoreRead,
    /// Sixteen chunks per store, no reads.
    Batch,
}

fn key(i: u64, salts: &[Arc<str>], model: &Arc<str>) -> ObjectKey {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&i.to_le_bytes());
    h[8..16].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    ObjectKey {
        chunk_hash: ChunkHash::from_bytes(h),
        model_name: Arc::clone(model),
        kv_rank: 0x0100_0100,
        object_group_id: 0,
        cache_salt: Arc::clone(&salts[(i % salts.len() as u64) as usize]),
    }
}

/// The metadata the policy bench gives object number `i`.
fn meta(i: u64) -> EntryMeta {
    EntryMeta {
        tenant: (i % 4) as u32,
        fingerprint: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
    }
}

const TENANTS: [u32; 4] = [0, 1, 2, 3];

/// One policy holding `resident` objects, driven the same way for every policy (see
/// [`policy_only`]).
struct PolicyRig {
    p: Box<dyn EvictionPolicy>,
    /// Each slot's object number: the caller hands the object's metadata back at removal, as
    /// the manager does from its entry.
    objects: Vec<u32>,
    next: u64,
    x: u64,
    resident: u64,
    victims: Vec<EntryId>,
}

impl PolicyRig {
    fn new(policy: EvictionPolicyKind, resident: u64) -> Self {
        let mut p = policy.build();
        let objects: Vec<u32> = (0..resident as u32).collect();
        for (id, &n) in objects.iter().enumerate() {
            p.on_ready(id as u32, meta(u64::from(n)));
        }
        Self {
            p,
            objects,
            next: resident,
            x: 1,
            resident,
            victims: Vec::with_capacity(BATCH),
        }
    }

    /// Two accesses (lock and release) to a pseudo-random resident object.
    fn read(&mut self) {
        self.x = self
            .x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        let read = ((self.x >> 33) % self.resident) as u32;
        let tenant = meta(u64::from(self.objects[read as usize])).tenant;
        self.p.on_access(read, tenant);
        self.p.on_access(read, tenant);
    }

    /// One chunk: select and remove a victim, admit a new object in its slot, one read.
    fn chunk(&mut self) {
        let mut victim = None;
        self.p.select(&TENANTS, &mut |id| {
            if victim.is_some() {
                return Verdict::Stop;
            }
            victim = Some(id);
            Verdict::Evict
        });
        let Some(id) = victim else { return };
        let slot = &mut self.objects[id as usize];
        self.p
            .on_remove(id, meta(u64::from(*slot)), Removal::Evicted);
        *slot = self.next as u32;
        self.p.on_ready(id, meta(self.next));
        self.next += 1;
        self.read();
        black_box(id);
    }

    /// The same operations for 16 chunks, grouped as the manager runs a 16-chunk store: one
    /// round selects 16 victims, each is hinted and then removed, the 16 new objects are
    /// hinted and then made ready; then 16 reads.
    fn batch16(&mut self) {
        let victims = &mut self.victims;
        victims.clear();
        self.p.select(&TENANTS, &mut |id| {
            if victims.len() == BATCH {
                return Verdict::Stop;
            }
            victims.push(id);
            Verdict::Evict
        });
        let p = &mut self.p;
        for &id in victims.iter() {
            p.prefetch(meta(u64::from(self.objects[id as usize])).fingerprint);
        }
        for &id in victims.iter() {
            p.on_remove(
                id,
                meta(u64::from(self.objects[id as usize])),
                Removal::Evicted,
            );
        }
        for i in 0..victims.len() as u64 {
            p.prefetch(meta(self.next + i).fingerprint);
        }
        for &id in victims.iter() {
            self.objects[id as usize] = self.next as u32;
            p.on_ready(id, meta(self.next));
            self.next += 1;
        }
        for _ in 0..self.victims.len() {
            self.read();
        }
        black_box(self.victims.len());
    }
}

fn policy_only(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_per_chunk");
    g.throughput(Throughput::Elements(BATCH as u64));
    let resident = resident();
    for policy in POLICIES {
        let mut rig = PolicyRig::new(policy, resident);
        g.bench_function(BenchmarkId::new("evict_insert_read", policy.name()), |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    rig.chunk();
                }
            });
        });
        g.bench_function(BenchmarkId::new("batch16", policy.name()), |b| {
            b.iter(|| rig.batch16());
        });
    }
    g.finish();
}

const POLICIES: [EvictionPolicyKind; 4] = [
    EvictionPolicyKind::Lru,
    EvictionPolicyKind::Arc,
    EvictionPolicyKind::S3Fifo,
    EvictionPolicyKind::IsolatedLru,
];

/// Counts listener calls (the KV-event log's place), so the whole path includes the call.
#[derive(Debug, Default)]
struct CountingListener(AtomicU64);

impl L1Listener for CountingListener {
    fn published(&self, _key: &ObjectKey) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn removed(&self, _key: &ObjectKey, _cause: kvtier_core::l1::RemovalCause) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// One whole-path step: store key `i` (the pool is full, so `reserve_write` evicts exactly one
/// object), publish it, then read `reads` (each must hit). Returns the number of misses.
fn store_one_then_read(l1: &L1Manager, item: &[(ObjectKey, u64)], reads: &[ObjectKey]) -> usize {
    let t: Vec<_> = l1
        .reserve_write(item, false)
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    let mut misses = item.len() - t.len();
    l1.finish_write(&t);
    if !reads.is_empty() {
        let leases: Vec<_> = l1
            .reserve_read(reads, 1)
            .into_iter()
            .filter_map(Result::ok)
            .collect();
        misses += reads.len() - leases.len();
        l1.finish_read(&leases, 1);
    }
    misses
}

/// One step of the whole path: the new keys (one store) and, when reading, the read set.
type Step = (Vec<(ObjectKey, u64)>, Vec<ObjectKey>);

/// A full L1 manager under one policy, driven the same way for every policy (see
/// [`whole_path`]).
struct WholeRig {
    l1: L1Manager,
    listener: Arc<CountingListener>,
    policy: EvictionPolicyKind,
    resident: u64,
    keys: KeyGen,
}

/// The keys of the whole path's steps (a field of its own so that criterion's setup closure
/// can make keys while its routine uses the manager).
struct KeyGen {
    model: Arc<str>,
    salts: Vec<Arc<str>>,
    hot_keys: Vec<ObjectKey>,
    per_store: usize,
    reading: bool,
    next: u64,
    h: usize,
}

impl WholeRig {
    /// Fills the pool and runs it to the steady state (the fill's cold objects gone twice
    /// over).
    fn new(policy: EvictionPolicyKind, mode: Mode, resident: u64) -> Self {
        let model: Arc<str> = Arc::from("bench/model");
        let salts: Vec<Arc<str>> = (0..4).map(|t| Arc::from(format!("t{t}"))).collect();
        let mut cfg = L1Config::with_capacity(resident * OBJ);
        cfg.eviction.policy = policy;
        let l1 = L1Manager::new(cfg);
        let listener = Arc::new(CountingListener::default());
        if l1.set_listener(listener.clone()).is_err() {
            panic!("listener already set");
        }
        let fill: Vec<(ObjectKey, u64)> = (0..resident)
            .map(|i| (key(i, &salts, &model), OBJ))
            .collect();
        for part in fill.chunks(1024) {
            let t: Vec<_> = l1
                .reserve_write(part, false)
                .into_iter()
                .filter_map(Result::ok)
                .collect();
            assert_eq!(t.len(), part.len(), "the fill fits");
            l1.finish_write(&t);
        }
        let hot_keys: Vec<ObjectKey> = (0..resident / 4).map(|i| key(i, &salts, &model)).collect();
        let reading = mode == Mode::StoreRead;
        if reading {
            // The hot set is read once before the steps start (it is the fill's oldest part,
            // which LRU would otherwise evict first).
            for part in hot_keys.chunks(1024) {
                assert_eq!(store_one_then_read(&l1, &[], part), 0, "{policy}");
            }
        }
        let per_store = if mode == Mode::Batch { BATCH } else { 1 };
        let mut keys = KeyGen {
            model,
            salts,
            hot_keys,
            per_store,
            reading,
            next: resident,
            h: 0,
        };
        let warm = keys.steps((2 * resident / per_store as u64) as usize);
        assert_eq!(run(&l1, &warm), 0, "{policy}");
        Self {
            l1,
            listener,
            policy,
            resident,
            keys,
        }
    }

    /// Every policy must see the same outcomes: nothing missed, the pool still full.
    fn check(&self, misses: usize) {
        let policy = self.policy;
        assert_eq!(misses, 0, "{policy}: a store failed or a read missed");
        assert_eq!(
            self.l1.usage().0,
            self.resident * OBJ,
            "{policy}: the pool stays full"
        );
        black_box(self.listener.0.load(Ordering::Relaxed));
    }
}

impl KeyGen {
    /// The next `n` steps' keys (made outside the timed part).
    fn steps(&mut self, n: usize) -> Vec<Step> {
        (0..n)
            .map(|_| {
                let items: Vec<(ObjectKey, u64)> = (0..self.per_store as u64)
                    .map(|i| (key(self.next + i, &self.salts, &self.model), OBJ))
                    .collect();
                let reads = if self.reading {
                    vec![items[0].0.clone(), self.hot_keys[self.h].clone()]
                } else {
                    Vec::new()
                };
                self.next += self.per_store as u64;
                self.h = (self.h + 1) % self.hot_keys.len();
                (items, reads)
            })
            .collect()
    }
}

/// Runs the steps; returns the misses (stores that failed and reads that missed).
fn run(l1: &L1Manager, steps: &[Step]) -> usize {
    steps
        .iter()
        .map(|(item, reads)| store_one_then_read(l1, item, reads))
        .sum()
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Store => "store_evict",
        Mode::StoreRead => "store_evict_read",
        Mode::Batch => "store_evict_batch16",
    }
}

/// The whole L1 manager's eviction cost per chunk, with the same operation sequence *and the
/// same outcomes* for every policy (every store evicts exactly one object, every read hits), so
/// the per-policy figures are a like-for-like ratio:
/// - `store_evict`: per chunk one store of a new key into a full pool (index insert and removal,
///   allocator, tenant accounting, listener, policy), no reads.
/// - `store_evict_read`: the same, and per chunk two reads (lock + release each): the chunk just
///   stored, and one of a hot set of `resident / 4` keys taken round-robin (each is read every
///   `resident / 4` chunks, so every policy keeps it: LRU by recency, ARC in T2, S3-FIFO in
///   main with reinsertion, IsolatedLRU in its tenant's list). Every new chunk is read once,
///   so ARC's T1 empties into T2 and S3-FIFO promotes to main: their main-queue paths run.
///   The bench panics if any read misses (the sequences would then differ).
/// - `store_evict_batch16`: per iteration one store of 16 new keys (one `reserve_write` that
///   evicts 16 objects, one `finish_write`), no reads.
fn whole_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("l1_evict_per_chunk");
    g.throughput(Throughput::Elements(BATCH as u64));
    let resident = resident();
    for mode in [Mode::Store, Mode::StoreRead, Mode::Batch] {
        for policy in POLICIES {
            let mut rig = WholeRig::new(policy, mode, resident);
            // Stores per iteration: 16 chunks either way.
            let stores = BATCH / rig.keys.per_store;
            let mut misses = 0;
            g.bench_function(BenchmarkId::new(mode_name(mode), policy.name()), |b| {
                b.iter_batched(
                    || rig.keys.steps(stores),
                    |steps| {
                        misses += run(&rig.l1, &steps);
                        steps
                    },
                    BatchSize::SmallInput,
                );
            });
            rig.check(misses);
        }
    }
    g.finish();
}

/// `--interleaved [ROUNDS]`: the same workloads, every policy in turn within each round
/// (ABCD DCBA … order), so that this shared machine's slow and fast phases, which last seconds
/// and move criterion's separate measurements by up to 2×, fall on all policies alike. Each
/// phase first runs untimed chunks (to reload the policy's data into the caches: as many as
/// are resident for the policy alone, `PHASE_CHUNKS` for the whole path) and then
/// `PHASE_CHUNKS` timed ones; the figure is the median over rounds of each policy's ns per
/// chunk and of its ratio to LRU *in the same round*, with the range of those ratios.
fn interleaved(rounds: usize) {
    const PHASE_CHUNKS: usize = 8192;
    let resident = resident();
    // The policy alone is a few ns per chunk: its untimed warm-up touches about as many
    // objects as are resident, so the timed part starts with the policy's tables back in the
    // caches, as in criterion's long single-policy runs.
    let warm_chunks = (resident as usize).max(PHASE_CHUNKS);
    println!(
        "eviction CPU per chunk, {resident} resident objects, {rounds} interleaved rounds of \
         {PHASE_CHUNKS} timed chunks per policy (median ns/chunk; ratio to LRU in the same \
         round: median [min–max])"
    );
    let report = |name: &str, per_round: &[[f64; 4]]| {
        for (k, policy) in POLICIES.iter().enumerate() {
            let mut ns: Vec<f64> = per_round.iter().map(|r| r[k]).collect();
            let mut ratios: Vec<f64> = per_round.iter().map(|r| r[k] / r[0]).collect();
            ns.sort_by(f64::total_cmp);
            ratios.sort_by(f64::total_cmp);
            println!(
                "  {name:<24} {:<12} {:>8.1} ns   {:.3}× [{:.3}–{:.3}]",
                policy.name(),
                ns[ns.len() / 2],
                ratios[ratios.len() / 2],
                ratios[0],
                ratios[ratios.len() - 1]
            );
        }
    };
    let mut rigs: Vec<PolicyRig> = POLICIES
        .iter()
        .map(|&p| PolicyRig::new(p, resident))
        .collect();
    for (name, batched) in [("evict_insert_read", false), ("batch16", true)] {
        let per_round = interleave(&mut rigs, rounds, |rig| {
            let phase = |rig: &mut PolicyRig, chunks: usize| {
                if batched {
                    for _ in 0..chunks / BATCH {
                        rig.batch16();
                    }
                } else {
                    for _ in 0..chunks {
                        rig.chunk();
                    }
                }
            };
            phase(rig, warm_chunks);
            let t = std::time::Instant::now();
            phase(rig, PHASE_CHUNKS);
            t.elapsed().as_nanos() as f64 / PHASE_CHUNKS as f64
        });
        report(name, &per_round);
    }
    drop(rigs);

    for mode in [Mode::Store, Mode::StoreRead, Mode::Batch] {
        let mut rigs: Vec<WholeRig> = POLICIES
            .iter()
            .map(|&p| WholeRig::new(p, mode, resident))
            .collect();
        let n = PHASE_CHUNKS / rigs[0].keys.per_store;
        let per_round = interleave(&mut rigs, rounds, |rig| {
            let warm = rig.keys.steps(n);
            let timed = rig.keys.steps(n);
            let mut misses = run(&rig.l1, &warm);
            let t = std::time::Instant::now();
            misses += run(&rig.l1, &timed);
            let ns = t.elapsed().as_nanos() as f64 / PHASE_CHUNKS as f64;
            rig.check(misses);
            // Dropping the keys (Arc decrements, frees) stays outside the timed part.
            drop((warm, timed));
            ns
        });
        report(mode_name(mode), &per_round);
    }
}

/// Runs `phase` (which returns ns per chunk) on each of the four rigs in turn, `rounds` times,
/// in ABCD order on even rounds and DCBA on odd ones; one row of figures per round, in
/// [`POLICIES`] order.
fn interleave<R>(
    rigs: &mut [R],
    rounds: usize,
    mut phase: impl FnMut(&mut R) -> f64,
) -> Vec<[f64; 4]> {
    (0..rounds)
        .map(|round| {
            let mut row = [0.0; 4];
            for k in 0..4 {
                let i = if round.is_multiple_of(2) { k } else { 3 - k };
                row[i] = phase(&mut rigs[i]);
            }
            row
        })
        .collect()
}

criterion_group!(benches, policy_only, whole_path);

fn main() {
    let mut args = std::env::args().skip_while(|a| a != "--interleaved");
    if args.next().is_some() {
        let rounds = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
        interleaved(rounds);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
