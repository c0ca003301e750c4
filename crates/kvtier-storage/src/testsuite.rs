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

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

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

/// A real `redis-server` on a free loopback port, without persistence, in a temp directory.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

/// The first port of the kernel's ephemeral range (`ip_local_port_range`; 32768 if unreadable).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A free loopback port in `lo..hi` for a test server, never handed out twice in this process.
/// Candidates walk the range from a per-process start in steps of a prime, so parallel test
/// processes start apart.
/// `offset` is `0` for a plain port; a Redis Cluster node passes `10_000` so that its bus port
/// `p + 10000` is checked free and reserved together with `p`.
fn free_port_in(lo: u16, hi: u16, offset: u16) -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    static STEP: AtomicU64 = AtomicU64::new(0);
    let span = u64::from(hi.saturating_sub(lo).max(1));
    let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..span {
        let n = STEP.fetch_add(1, Relaxed);
        let candidate = u64::from(std::process::id()).wrapping_mul(7_919) + n * 104_729;
        let Ok(p) = u16::try_from(u64::from(lo) + candidate % span) else {
            continue;
        };
        let Some(q) = p.checked_add(offset) else {
            continue;
        };
        let pair = if q == p { vec![p] } else { vec![p, q] };
        if pair.iter().all(|x| !given.contains(x) && free(*x)) {
            given.extend(pair);
            return p;
        }
    }
    panic!("no free loopback port in {lo}..{hi}");
}

/// A free loopback port for a test server. It comes from below the kernel's ephemeral range:
/// a port from `bind(0)` is ephemeral, and a client connecting somewhere (a retrying Redis
/// client, a ZeroMQ socket) can take it as its source port between the pick and the server's
/// bind. Never handed out twice in this process.
pub fn free_port() -> u16 {
    free_port_in(10_000, ephemeral_low().max(12_000), 0)
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _t = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl RedisServer {
    /// Starts a server. Panics (never skips) if `redis-server` is not installed.
    pub fn start() -> Self {
        match Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
        {
            Ok(_) => {}
            Err(e) => panic!(
                "redis-server is not available ({e}). The resp L2 tests need a real Redis server \
                 and never skip: install it (e.g. `apt-get install -y redis-server`; \
                 scripts/test does this) and rerun."
            ),
        }
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let mut me = Self {
            child: None,
            port: 0,
            dir,
        };
        for _ in 0..5 {
            me.port = free_port();
            if me.spawn() {
                return me;
            }
        }
        panic!("could not start redis-server on a free port after 5 attempts");
    }

    fn spawn(&mut self) -> bool {
        let log = self.dir.path().join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if redis_ping(self.port) {
                return true;
            }
            if let Some(c) = &mut self.child
                && let Ok(Some(_)) = c.try_wait()
            {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _killed = c.kill();
            let _waited = c.wait();
        }
    }

    /// Starts it again on the same port (its data is gone: no persistence).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("could not restart redis-server on port {}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn require_tool(tool: &str, package: &str) {
    if let Err(e) = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        panic!(
            "{tool} is not available ({e}). The valkey L2 tests need it and never skip: install \
             it (e.g. `apt-get install -y {package}`; scripts/test does this) and rerun."
        );
    }
}

/// A free loopback port `p` whose cluster bus port `p + 10000` is free and reserved too (both
/// below the ephemeral range, see [`free_port`]).
fn free_cluster_port() -> u16 {
    free_port_in(
        10_000,
        ephemeral_low().saturating_sub(10_000).max(12_000),
        10_000,
    )
}

/// Runs `redis-cli` with `args` against `port`, returning stdout.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("running redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A real Redis Cluster on loopback: `masters` masters with one replica each, no persistence,
/// `cluster-node-timeout` 1 s, and `cluster-require-full-coverage no` (a shard outage leaves the
/// other shards serving). Panics (never skips) without `redis-server`/`redis-cli`.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<(u16, Option<Child>)>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts `2 * masters` nodes and creates the cluster; waits until every node reports
    /// `cluster_state:ok`.
    pub fn start(masters: usize) -> Self {
        require_tool("redis-server", "redis-server");
        require_tool("redis-cli", "redis-tools");
        let dir = tempfile::tempdir().expect("temp dir for the cluster");
        let mut me = Self {
            nodes: Vec::new(),
            dir,
        };
        let mut ports = Vec::new();
        for _ in 0..masters * 2 {
            let p = free_cluster_port();
            ports.push(p);
        }
        for &p in &ports {
            let child = me.spawn(p);
            me.nodes.push((p, Some(child)));
        }
        for &p in &ports {
            wait_for(Duration::from_secs(10), &format!("redis node {p}"), || {
                redis_ping(p)
            });
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("running redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        me.wait_ok(Duration::from_secs(20));
        me
    }

    fn spawn(&self, port: u16) -> Child {
        let nd = self.dir.path().join(port.to_string());
        std::fs::create_dir_all(&nd).expect("node dir");
        Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", "1000"])
            .args(["--cluster-require-full-coverage", "no"])
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(&nd)
            .arg("--logfile")
            .arg(nd.join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server")
    }

    /// Waits until every running node reports `cluster_state:ok` and agrees on full coverage.
    pub fn wait_ok(&self, timeout: Duration) {
        wait_for(timeout, "cluster_state:ok on every live node", || {
            self.live_ports().iter().all(|&p| {
                let info = redis_cli(p, &["cluster", "info"]);
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            })
        });
    }

    /// Ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    /// `startup_nodes` for the adapter (every node).
    pub fn startup_nodes(&self) -> String {
        self.nodes
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Ports of the current masters that serve hash slots (as a live node sees them). A node
    /// that has not yet taken its replica role after `CLUSTER REPLICATE` is still listed as a
    /// master for a moment, without slots; it is not counted (`CLUSTER NODES` lists a master's
    /// slot ranges from its ninth field on).
    pub fn masters(&self) -> Vec<u16> {
        let Some(&probe) = self.live_ports().first() else {
            return Vec::new();
        };
        redis_cli(probe, &["cluster", "nodes"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter(|l| l.split_whitespace().nth(8).is_some())
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter_map(|a| a.split('@').next()?.rsplit_once(':')?.1.parse().ok())
            .collect()
    }

    /// Keys stored on the node at `port`.
    pub fn dbsize(&self, port: u16) -> u64 {
        redis_cli(port, &["dbsize"]).trim().parse().unwrap_or(0)
    }

    /// Kills the node at `port` (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        for (p, c) in &mut self.nodes {
            if *p == port
                && let Some(mut child) = c.take()
            {
                let _killed = child.kill();
                let _waited = child.wait();
            }
        }
    }

    /// Kills every node.
    pub fn kill_all(&mut self) {
        for p in self.live_ports() {
            self.kill(p);
        }
    }

    /// Restarts every stopped node with its cluster configuration (it rejoins).
    pub fn restart_stopped(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].1.is_some() {
                continue;
            }
            let p = self.nodes[i].0;
            self.nodes[i].1 = Some(self.spawn(p));
            wait_for(Duration::from_secs(10), &format!("redis node {p}"), || {
                redis_ping(p)
            });
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Polls `cond` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Certificates for TLS tests, made with the `openssl` CLI in a temporary directory: a CA, a
/// server certificate for `127.0.0.1` signed by it, and an unrelated second CA.
#[derive(Debug)]
pub struct TestCerts {
    dir: tempfile::TempDir,
}

impl TestCerts {
    /// Generates the certificates. Panics (never skips) without `openssl`.
    pub fn generate() -> Self {
        require_tool("openssl", "openssl");
        let dir = tempfile::tempdir().expect("temp dir for certificates");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("running openssl");
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=kvtier test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ]);
        }
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(dir.path().join("san.ext"), "subjectAltName=IP:127.0.0.1\n")
            .expect("writing san.ext");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ]);
        Self { dir }
    }

    /// Path of a generated file (`ca.pem`, `other-ca.pem`, `server.pem`, `server.key`).
    pub fn path(&self, name: &str) -> String {
        self.dir
            .path()
            .join(name)
            .to_str()
            .expect("utf-8 temp path")
            .to_owned()
    }
}

/// A `redis-server` that only speaks TLS (certificates from `certs`), on a free loopback port.
#[derive(Debug)]
pub struct TlsRedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsRedisServer {
    /// Starts it; panics if it does not accept TLS connections within 10 s.
    pub fn start(certs: &TestCerts) -> Self {
        require_tool("redis-server", "redis-server");
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--tls-cert-file", &certs.path("server.pem")])
            .args(["--tls-key-file", &certs.path("server.key")])
            .args(["--tls-ca-cert-file", &certs.path("ca.pem")])
            .args(["--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server with TLS");
        wait_for(Duration::from_secs(10), "redis-server's TLS port", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// The TLS port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for TlsRedisServer {
    fn drop(&mut self) {
        let _killed = self.child.kill();
        let _waited = self.child.wait();
    }
}
