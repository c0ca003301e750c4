//! The backend conformance suite and test harnesses (feature `testsuite`).
//!
//! [`run_conformance`] checks the [`L2Backend`] contract (see `backend`'s module docs) against a
//! backend factory; `mock`, `fs`, `resp` and `valkey` (standalone and cluster) all run it (`tests/conformance.rs`). Every case uses
//! keys with a fresh model name, so cases sharing one remote store (Redis) cannot see each
//! other's objects.
//!
//! Harnesses: [`RedisCluster`] starts a real Redis Cluster (masters with one replica each) on
//! loopback; [`TestCerts`] and [`TlsRedisServer`] give TLS tests a CA, certificates and a
//! TLS-only server. [`RedisServer`] starts a real `redis-server` on a free loopback port with a
//! temporary directory and no persistence, and can stop and restart it on the same port (fault
//! tests). If `redis-server` is not installed it **panics** with instructions: the resp tests
//! never skip. [`test_segment`] creates a uniquely named shared-memory segment and [`Arena`]
//! hands out ranges of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use kvtier_core::hash::ChunkHash;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::Allocation;
use kvtier_core::shm::{ShmOptions, ShmSegment};
use parking_lot::Mutex;

use crate::backend::L2Backend;
use crate::error::L2Error;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A process-unique suffix for names (pid plus a counter).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Relaxed)
    )
}

/// A fresh shared-memory segment of `size` bytes with a unique name (removed on drop).
pub fn test_segment(size: u64) -> Arc<ShmSegment> {
    Arc::new(
        ShmSegment::create(&unique("kvtier_l2t"), size, ShmOptions::default())
            .expect("creating a test shared-memory segment"),
    )
}

/// A model name that no other test or case uses (contains a `/` to exercise the `-SEP-`
/// mapping of file and key names).
pub fn unique_model() -> Arc<str> {
    Arc::from(unique("org/model").as_str())
}

/// Key `n` of `model` (rank 0 of world size 1, no salt).
pub fn key(model: &Arc<str>, n: u32) -> ObjectKey {
    let mut h = [0u8; 32];
    h[..4].copy_from_slice(&n.to_be_bytes());
    h[31] = 0xa5;
    ObjectKey {
        chunk_hash: ChunkHash::from_bytes(h),
        model_name: Arc::clone(model),
        kv_rank: 0x0100_0100,
        object_group_id: 0,
        cache_salt: Arc::from(""),
    }
}

/// Key `n` of `model` with a cache salt.
pub fn salted_key(model: &Arc<str>, n: u32, salt: &str) -> ObjectKey {
    ObjectKey {
        cache_salt: Arc::from(salt),
        ..key(model, n)
    }
}

/// Deterministic, position- and seed-dependent bytes.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A bump allocator over a test segment: hands out 4096-aligned ranges.
#[derive(Debug)]
pub struct Arena {
    /// The segment.
    pub segment: Arc<ShmSegment>,
    next: Mutex<u64>,
}

impl Arena {
    /// An arena over a new segment of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            segment: test_segment(size),
            next: Mutex::new(0),
        }
    }

    /// A new range of `len` bytes (panics when the arena is exhausted).
    pub fn alloc(&self, len: u64) -> Allocation {
        let mut next = self.next.lock();
        let offset = *next;
        *next = (offset + len).div_ceil(4096) * 4096;
        assert!(
            *next <= self.segment.len() as u64,
            "test arena exhausted ({} bytes)",
            self.segment.len()
        );
        Allocation { offset, len }
    }

    /// A new range holding `bytes`.
    pub fn put(&self, bytes: &[u8]) -> Allocation {
        let a = self.alloc(bytes.len() as u64);
        self.segment
            .copy_in(a.offset as usize, bytes)
            .expect("in bounds");
        a
    }

    /// The bytes of a range.
    pub fn get(&self, a: Allocation) -> Vec<u8> {
        let mut v = vec![0u8; a.len as usize];
        self.segment
            .copy_out(a.offset as usize, &mut v)
            .expect("in bounds");
        v
    }

    /// Resets the arena (reuse its memory).
    pub fn reset(&self) {
        *self.next.lock() = 0;
    }
}

/// Builds a fresh backend; the argument is its capacity in bytes (`None` = unlimited, or the
/// adapter's largest configurable capacity).
pub type Factory<'a> = dyn Fn(Option<u64>) -> Arc<dyn L2Backend> + 'a;

fn ok_all(r: &[Result<(), L2Error>], what: &str) {
    for (i, x) in r.iter().enumerate() {
        assert!(x.is_ok(), "{what}: key {i} failed: {x:?}");
    }
}

type Case = fn(&tokio::runtime::Runtime, &Factory<'_>, &Arena);

/// Runs every conformance case against backends from `factory`, each case on `rt`.
pub fn run_conformance(name: &str, rt: &tokio::runtime::Runtime, factory: &Factory<'_>) {
    let arena = Arena::new(64 << 20);
    let cases: [(&str, Case); 10] = [
        ("round_trip", case_round_trip),
        ("existing_store_is_idempotent", case_existing),
        ("missing_and_mismatched_loads", case_missing),
        ("pins_are_counted", case_pins),
        ("delete_skips_pinned", case_delete),
        ("capacity_evicts_unpinned_oldest", case_capacity),
        ("concurrent_batches", case_concurrent),
        ("invalid_batches_are_refused", case_invalid),
        ("status_fields", case_status),
        ("closed_refuses", case_closed),
    ];
    for (case, f) in cases {
        eprintln!("conformance[{name}]: {case}");
        arena.reset();
        f(rt, factory, &arena);
    }
}

fn case_round_trip(rt: &tokio::runtime::Runtime, factory: &Factory<'_>, arena: &Arena) {
    let b = factory(None);
    let model = unique_model();
    let sizes = [1usize, 1000, 4096, 65_537, (1 << 20) + 3];
    let mut keys: Vec<ObjectKey> = (0..sizes.len() as u32).map(|i| key(&model, i)).collect();
    keys.push(salted_key(&model, 99, "tenant-a"));
    let data: Vec<Vec<u8>> = sizes
        .iter()
        .chain(std::iter::once(&777))
        .enumerate()
        .map(|(i, &n)| pattern(i as u32 + 1, n))
        .collect();
    let src: Vec<Allocation> = data.iter().map(|d| arena.put(d)).collect();
    rt.block_on(async {
        ok_all(&b.store(&keys, &arena.segment, &src).await, "store");
        let mut probe = keys.clone();
        probe.push(key(&model, 1000));
        probe.push(salted_key(&model, 0, "other-tenant"));
        let found = b.lookup_and_pin(&probe).await.expect("lookup");
        let want: Vec<Option<u64>> = data
            .iter()
            .map(|d| Some(d.len() as u64))
            .chain([None, None])
            .collect();
        assert_eq!(found, want, "lookup reports presence and length");
        let u = b.usage();
        assert_eq!(u.object_count, keys.len() as u64);
        assert_eq!(
            u.used_bytes,
            data.iter().map(|d| d.len() as u64).sum::<u64>()
        );
        assert_eq!(u.pinned_count, keys.len() as u64, "every hit is pinned");
        let dst: Vec<Allocation> = data.iter().map(|d| arena.alloc(d.len() as u64)).collect();
        ok_all(&b.load(&keys, &arena.segment, &dst).await, "load");
        for (i, (d, a)) in data.iter().zip(&dst).enumerate() {
            assert!(arena.get(*a) == *d, "object {i} loaded bytes differ");
        }
        b.unpin(&keys).await;
        assert_eq!(b.usage().pinned_count, 0, "unpin releases the pins");
        b.close().await;
    });
}

fn case_existing(rt: &tokio::runtime::Runtime, factory: &Factory<'_>, arena: &Arena) {
    let b = factory(None);
    let model = unique_model();
    let k = vec![key(&model, 1)];
    let first = arena.put(&pattern(7, 5000));
    let second = arena.put(&pattern(8, 5000));
    rt.block_on(async {
        ok_all(&b.store(&k, &arena.segment, &[first]).await, "first store");
        ok_all(
            &b.store(&k, &arena.segment, &[second]).await,
            "second store",
        );
        assert_eq!(b.usage().object_count, 1);
        assert_eq!(b.usage().used_bytes, 5000);
        let dst = arena.alloc(5000);
        assert_eq!(
            b.lookup_and_pin(&k).await.expect("lookup"),
            vec![Some(5000)]
        );
        ok_all(&b.load(&k, &arena.segment, &[dst]).await, "load");
        assert!(
            arena.get(dst) == pattern(7, 5000),
            "a key already held is not rewritten"
        );
        b.unpin(&k).await;
        // A batch repeating a key stores it once.
        let dup = vec![key(&model, 2), key(&model, 2)];
        let a = arena.put(&pattern(9, 100));
        ok_all(&b.store(&dup, &arena.segment, &[a, a]).await, "dup batch");
        assert_eq!(b.usage().object_count, 2);
        b.close().await;
    });
}

fn case_missing(rt: &tokio::runtime::Runtime, factory: &Factory<'_>, arena: &Arena) {
    let b = factory(None);
    let model = unique_model();
    let keys = vec![key(&model, 1), key(&model, 2)];
    let data = pattern(3, 3000);
    let src = arena.put(&data);
    rt.block_on(async {
        ok_all(&b.store(&keys[..1], &arena.segment, &[src]).await, "store");
        let dst = [arena.alloc(3000), arena.alloc(3000)];
        let r = b.load(&keys, &arena.segment, &dst).await;
        assert!(r[0].is_ok(), "present key loads: {:?}", r[0]);
        assert_eq!(r[1], Err(L2Error::NotFound), "absent key is NotFound");
        assert!(arena.get(dst[0]) == data);
        // A range of the wrong length is refused, not partially filled.
        let short = arena.alloc(2999);
        let r = b.load(&keys[..1], &arena.segment, &[short]).await;
        assert!(r[0].is_err(), "length mismatch must fail: {:?}", r[0]);
        b.close().await;
    });
}

fn case_pins(rt: &tokio::runtime::Runtime, factory: &Factory<'_>, arena: &Arena) {
    let b = factory(None);
    let model = unique_model();
    let k = vec![key(&model, 1)];
    let src = arena.put(&pattern(1, 100));
    rt.block_on(async {
        ok_all(&b.store(&k, &arena.segment, &[src]).await, "store");
        b.lookup_and_pin(&k).await.expect("lookup");
        b.lookup_and_pin(&k).await.expect("lookup");
        assert_eq!(b.usage().pinned_count, 1);
        b.unpin(&k).await;
        assert_eq!(b.usage().pinned_count, 1, "two lookups need two unpins");
        b.unpin(&k).await;
        assert_eq!(b.usage().pinned_count, 0);
        b.unpin(&k).await;
        b.unpin(&[key(&model, 5)]).await;
        assert_eq!(b.usage().pinned_count, 0, "extra unpins are ignored");
        // A miss pins nothing.
        assert_eq!(
            b.lookup_and_pin(&[key(&model, 6)]).await.expect("lookup"),
            vec![None]
        );
        assert_eq!(b.usage().pinned_count, 0);
        b.close().await;
    });
}

fn case_delete(rt: &tokio::runtime::Runtime, factory: &Factory<'_>, arena: &Arena) {
    let b = factory(None);
    let model = unique_model();
    let keys = vec![key(&model, 1), key(&model, 2)];
    let src = [arena.put(&pattern(1, 200)), arena.put(&pattern(2, 300))];
    rt.block_on(async {
        ok_all(&b.store(&keys, &arena.segment, &src).await, "store");
        b.lookup_and_pin(&keys[1..]).await.expect("lookup");
        let n = b.delete(&keys).await.expect("delete");
        assert_eq!(n, 1, "only the unpinned key is deleted");
        b.unpin(&keys[1..]).await;
        let found = b.lookup_and_pin(&keys).await.expect("lookup");
        assert_eq!(found, vec![None, Some(300)]);
        b.unpin(&keys[1..]).await;
        assert_eq!(b.usage().object_count, 1);
        assert_eq!(b.delete(&keys).await.expect("delete"), 1);
        assert_eq!(b.usage().object_count, 0);
        assert_eq!(b.usage().used_bytes, 0);
        b.close().await;
    });
}

fn case_capacity(rt: &tokio::runtime::Runtime, factory: &Factory<'_>, arena: &Arena) {
    const S: u64 = 16 << 10;
    let b = factory(Some(4 * S));
    let model = unique_model();
    let keys: Vec<ObjectKey> = (0..8).map(|i| key(&model, i)).collect();
    let src: Vec<Allocation> = (0..8).map(|i| arena.put(&pattern(i, S as usize))).collect();
    rt.block_on(async {
        for i in 0..4 {
            ok_all(
                &b.store(&keys[i..=i], &arena.segment, &src[i..=i]).await,
                "fill",
            );
        }
        assert_eq!(b.usage().object_count, 4);
        assert_eq!(b.usage().capacity_bytes, 4 * S);
        // Pin the oldest; the next two stores evict the next-oldest unpinned ones.
        b.lookup_and_pin(&keys[..1]).await.expect("lookup");
        ok_all(
            &b.store(&keys[4..6], &arena.segment, &src[4..6]).await,
            "over capacity",
        );
        let u = b.usage();
        assert!(
            u.used_bytes <= 4 * S,
            "usage {} over capacity",
            u.used_bytes
        );
        let found = b.lookup_and_pin(&keys[..6]).await.expect("lookup");
        assert_eq!(
            found,
            vec![Some(S), None, None, Some(S), Some(S), Some(S)],
            "pinned key 0 survives; keys 1 and 2 (oldest unpinned) were evicted"
        );
        // Everything pinned: a store that needs room fails, nothing is evicted.
        let r = b.store(&keys[6..7], &arena.segment, &src[6..7]).await;
        assert!(
            matches!(r[0], Err(L2Error::CapacityFull { .. })),
            "expected CapacityFull, got {:?}",
            r[0]
        );
        assert_eq!(b.usage().object_count, 4);
        b.unpin(&keys[..1]).await;
        b.unpin(&keys[..1]).await;
        b.unpin(&keys[3..6]).await;
        ok_all(
            &b.store(&keys[6..7], &arena.segment, &src[6..7]).await,
            "after unpin",
        );
        let dst = arena.alloc(S);
        assert_eq!(
            b.lookup_and_pin(&keys[6..7]).await.expect("lookup"),
            vec![Some(S)]
        );
        ok_all(&b.load(&keys[6..7], &arena.segment, &[dst]).await, "load");
        assert!(arena.get(dst) == pattern(6, S as usize));
        b.unpin(&keys[6..7]).await;
        b.close().await;
    });
}

fn case_concurrent(rt: &tokio::runtime::Runtime, factory: &Factory<'_>, arena: &Arena) {
    let b = factory(None);
    let model = unique_model();
    let per = 4u32;
    let batches = 8u32;
    let keys: Vec<Vec<ObjectKey>> = (0..batches)
        .map(|t| (0..per).map(|i| key(&model, t * per + i)).collect())
        .collect();
    let data: Vec<Vec<Vec<u8>>> = (0..batches)
        .map(|t| {
            (0..per)
                .map(|i| pattern(t * per + i, 20_000 + i as usize))
                .collect()
        })
        .collect();
    let src: Vec<Vec<Allocation>> = data
        .iter()
        .map(|d| d.iter().map(|x| arena.put(x)).collect())
        .collect();
    let dst: Vec<Vec<Allocation>> = data
        .iter()
        .map(|d| d.iter().map(|x| arena.alloc(x.len() as u64)).collect())
        .collect();
    rt.block_on(async {
        let stores = keys
            .iter()
            .zip(&src)
            .map(|(k, s)| b.store(k, &arena.segment, s));
        for r in futures_util::future::join_all(stores).await {
            ok_all(&r, "concurrent store");
        }
        assert_eq!(b.usage().object_count, u64::from(per * batches));
        let loads = keys.iter().zip(&dst).map(|(k, d)| async {
            b.lookup_and_pin(k).await.expect("lookup");
            let r = b.load(k, &arena.segment, d).await;
            b.unpin(k).await;
            r
        });
        for r in futures_util::future::join_all(loads).await {
            ok_all(&r, "concurrent load");
        }
        for (d, a) in data.iter().zip(&dst) {
            for (x, y) in d.iter().zip(a) {
                assert!(arena.get(*y) == *x, "concurrent load bytes differ");
            }
        }
        b.close().await;
    });
}

fn case_invalid(rt: &tokio::runtime::Runtime, factory: &Factory<'_>, arena: &Arena) {
    let b = factory(None);
    let model = unique_model();
    let keys = vec![key(&model, 1), key(&model, 2)];
    let a = arena.put(&pattern(1, 10));
    let outside = Allocation {
        offset: arena.segment.len() as u64 - 5,
        len: 10,
    };
    rt.block_on(async {
        let r = b.store(&keys, &arena.segment, &[a]).await;
        assert_eq!(r.len(), 2);
        assert!(
            r.iter().all(|x| matches!(x, Err(L2Error::Invalid(_)))),
            "{r:?}"
        );
        let r = b.store(&keys[..1], &arena.segment, &[outside]).await;
        assert!(matches!(r[0], Err(L2Error::Invalid(_))), "{r:?}");
        let r = b.load(&keys[..1], &arena.segment, &[outside]).await;
        assert!(r[0].is_err(), "{r:?}");
        assert_eq!(b.usage().object_count, 0, "nothing was stored");
        b.close().await;
    });
}

fn case_status(rt: &tokio::runtime::Runtime, factory: &Factory<'_>, arena: &Arena) {
    let b = factory(None);
    let model = unique_model();
    let k = vec![key(&model, 1)];
    let src = arena.put(&pattern(1, 1234));
    rt.block_on(async {
        ok_all(&b.store(&k, &arena.segment, &[src]).await, "store");
        b.lookup_and_pin(&k).await.expect("lookup");
    });
    let node = b.report_status();
    assert!(node.is_healthy(), "{:?}", node.unhealthy_reason());
    let v = node.to_value();
    for field in [
        "is_healthy",
        "type",
        "stored_object_count",
        "locked_key_count",
        "current_size_bytes",
        "max_capacity_bytes",
        "connected",
        "last_error",
        "errors",
        "ops",
    ] {
        assert!(v.get(field).is_some(), "status lacks {field}: {v}");
    }
    assert_eq!(v["type"], b.type_name());
    assert_eq!(v["stored_object_count"], 1);
    assert_eq!(v["locked_key_count"], 1);
    assert_eq!(v["current_size_bytes"], 1234);
    assert_eq!(v["connected"], true);
    assert_eq!(v["ops"]["store"]["objects_total"], 1);
    assert!(b.health().connected);
    rt.block_on(async {
        b.unpin(&k).await;
        b.close().await;
    });
}

fn case_closed(rt: &tokio::runtime::Runtime, factory: &Factory<'_>, arena: &Arena) {
    let b = factory(None);
    let model = unique_model();
    let k = vec![key(&model, 1)];
    let src = arena.put(&pattern(1, 10));
    rt.block_on(async {
        b.close().await;
        let r = b.store(&k, &arena.segment, &[src]).await;
        assert!(r[0].is_err(), "a closed adapter refuses stores: {r:?}");
        assert!(b.lookup_and_pin(&k).await.is_err());
    });
}

mod redis;

pub use redis::{
    RedisCluster, RedisServer, TestCerts, TlsRedisServer, free_port, redis_cli, wait_for,
};
