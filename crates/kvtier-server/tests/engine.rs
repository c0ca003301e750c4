//! Engine semantics driven directly with decoded requests and a manual clock: lock ownership,
//! session TTL, worker reaping, abandoned transfers. (The wire itself is covered by the Python
//! conformance suite and the transport tests.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Duration;

use kvtier_core::hash::{HashAlgorithm, TokenHasher};
use kvtier_core::l1::controller::EvictionController;
use kvtier_core::l1::{Clock, L1Config, L1Manager};
use kvtier_core::shm::{ShmOptions, ShmSegment};
use kvtier_proto::{IpcKey, RegisterEngineDrivenContext, Request, Response};
use kvtier_server::engine::{Engine, EngineConfig, EngineError};

static SEQ: AtomicU32 = AtomicU32::new(0);

struct Fixture {
    engine: Engine,
    clock: Clock,
}

fn fixture() -> Fixture {
    let clock = Clock::manual();
    let name = format!(
        "kvtier_engine_test_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Relaxed)
    );
    let segment =
        Arc::new(ShmSegment::create(&name, 64 << 20, ShmOptions::default()).expect("segment"));
    let l1 = Arc::new(L1Manager::with_clock(
        L1Config::with_capacity(64 << 20),
        clock.clone(),
    ));
    let evictor =
        EvictionController::spawn(Arc::clone(&l1), Duration::from_secs(3600)).expect("evictor");
    let engine = Engine::new(
        EngineConfig {
            chunk_size: 256,
            session_ttl: Duration::from_secs(600),
            max_sessions: kvtier_server::engine::session::DEFAULT_MAX_SESSIONS,
            worker_reap_timeout: Duration::from_secs(120),
            worker_registration_grace: Duration::from_secs(3600),
            kv_event_log_size: 1024,
            lookup_records: 64,
            miss_history_chunks: 1024,
        },
        TokenHasher::new(256, HashAlgorithm::Blake3).expect("hasher"),
        l1,
        segment,
        evictor,
    );
    Fixture { engine, clock }
}

fn key(request_id: &str, worker: Option<u32>, chunks: u64) -> IpcKey {
    IpcKey {
        model_name: "m".into(),
        world_size: 1,
        worker_id: worker,
        token_ids: (0..(chunks * 256) as u32).collect(),
        start: 0,
        end: chunks * 256,
        request_id: request_id.into(),
        cache_salt: String::new(),
        num_kv_readers: 1,
    }
}

fn register(e: &Engine, iid: i64) {
    e.handle(Request::RegisterKvCacheEngineDrivenContext(
        RegisterEngineDrivenContext {
            instance_id: iid,
            model_name: "m".into(),
            world_size: 1,
            block_size: 16,
            num_layers: 2,
            hidden_dim_size: 64,
            dtype_str: "float16".into(),
            use_mla: false,
            num_physical_slots: None,
        },
    ))
    .expect("registered");
}

fn store(e: &Engine, iid: i64, request_id: &str, chunks: u64) {
    e.handle(Request::PrepareStore {
        key: key(request_id, Some(0), chunks),
        instance_id: iid,
    })
    .expect("prepared");
    e.handle(Request::CommitStore {
        key: key(request_id, Some(0), chunks),
        instance_id: iid,
        data: Vec::new(),
    })
    .expect("committed");
}

fn lookup(e: &Engine, request_id: &str, chunks: u64) -> Vec<u8> {
    e.handle(Request::Lookup {
        key: key(request_id, None, chunks),
        tp_size: 1,
    })
    .expect("lookup");
    e.handle(Request::QueryPrefetchStatus {
        request_id: request_id.into(),
    })
    .expect("query")
    .encode()
    .expect("an int reply")
}

fn read_locked(e: &Engine) -> u64 {
    e.l1().counters().read_locked_objects.get()
}

#[test]
fn idle_sessions_expire_and_release_their_lookup_locks() {
    let f = fixture();
    register(&f.engine, 1);
    store(&f.engine, 1, "w", 3);
    assert_eq!(lookup(&f.engine, "r", 3), vec![3]);
    assert_eq!(read_locked(&f.engine), 3);
    f.clock.advance(Duration::from_secs(599));
    f.engine.housekeeping();
    assert_eq!(read_locked(&f.engine), 3, "not idle long enough");
    f.clock.advance(Duration::from_secs(2));
    f.engine.housekeeping();
    assert_eq!(
        read_locked(&f.engine),
        0,
        "an abandoned lookup's locks are released"
    );
    assert_eq!(f.engine.sessions().active_count(), 0);
    f.engine.l1().check_invariants().expect("invariants");
}

#[test]
fn silent_instances_are_reaped_with_their_pending_transfers() {
    let f = fixture();
    register(&f.engine, 7);
    f.engine
        .handle(Request::Ping {
            instance_id: Some(7),
        })
        .expect("ping");
    // A reservation the engine never commits.
    f.engine
        .handle(Request::PrepareStore {
            key: key("s", Some(0), 2),
            instance_id: 7,
        })
        .expect("prepared");
    assert_eq!(f.engine.l1().counters().staging_objects.get(), 2);
    f.clock.advance(Duration::from_secs(121));
    f.engine.housekeeping();
    assert_eq!(f.engine.l1().counters().staging_objects.get(), 0);
    assert_eq!(
        f.engine.l1().usage().0,
        0,
        "the reaped instance's reservation is returned"
    );
    let after = f.engine.handle(Request::PrepareStore {
        key: key("s2", Some(0), 1),
        instance_id: 7,
    });
    assert!(
        matches!(after, Err(EngineError::Failed(_))),
        "instance is gone: {after:?}"
    );
    assert_eq!(f.engine.counters().reaped_instances_total.get(), 1);
}

#[test]
fn instances_that_never_ping_get_the_registration_grace() {
    let f = fixture();
    register(&f.engine, 9);
    f.clock.advance(Duration::from_secs(3599));
    f.engine.housekeeping();
    assert_eq!(f.engine.counters().reaped_instances_total.get(), 0);
    f.clock.advance(Duration::from_secs(2));
    f.engine.housekeeping();
    assert_eq!(f.engine.counters().reaped_instances_total.get(), 1);
}

#[test]
fn retrieve_consumes_exactly_the_session_locks_and_end_session_releases_the_rest() {
    let f = fixture();
    register(&f.engine, 1);
    register(&f.engine, 2);
    store(&f.engine, 1, "w", 4);
    assert_eq!(lookup(&f.engine, "r", 4), vec![4]);
    // Retrieve the first two chunks only; the other two stay locked by the session.
    let mut k = key("r", Some(0), 4);
    k.end = 512;
    let reply = f
        .engine
        .handle(Request::PrepareRetrieve {
            key: k.clone(),
            instance_id: 1,
        })
        .expect("prepared");
    assert!(
        matches!(&reply, Response::PrepareRetrieve(slots) if slots.len() == 2),
        "{reply:?}"
    );
    // A second reader of the same chunks finds no lock left to take (num_kv_readers = 1).
    let again = f.engine.handle(Request::PrepareRetrieve {
        key: k.clone(),
        instance_id: 2,
    });
    assert!(
        matches!(&again, Err(EngineError::Failed(m)) if m.contains("not locked")),
        "{again:?}"
    );
    f.engine
        .handle(Request::CommitRetrieve {
            key: k,
            instance_id: 1,
        })
        .expect("committed");
    assert_eq!(read_locked(&f.engine), 2);
    f.engine
        .handle(Request::EndSession {
            request_id: "r".into(),
        })
        .expect("ended");
    assert_eq!(read_locked(&f.engine), 0);
    // The prefetch result was consumed exactly once.
    let q = f
        .engine
        .handle(Request::QueryPrefetchStatus {
            request_id: "r".into(),
        })
        .expect("query");
    assert_eq!(q, Response::PrefixHits(Some(0)));
    f.engine.l1().check_invariants().expect("invariants");
}

#[test]
fn abandoned_retrieves_and_stores_are_swept_after_their_ttl() {
    let f = fixture();
    register(&f.engine, 1);
    store(&f.engine, 1, "w", 2);
    assert_eq!(lookup(&f.engine, "r", 2), vec![2]);
    f.engine
        .handle(Request::PrepareRetrieve {
            key: key("r", Some(0), 2),
            instance_id: 1,
        })
        .expect("prepared");
    f.engine
        .handle(Request::EndSession {
            request_id: "r".into(),
        })
        .expect("ended");
    // The pending retrieve still protects the bytes the engine may be copying.
    assert_eq!(read_locked(&f.engine), 2);
    f.clock.advance(Duration::from_secs(301));
    f.engine.housekeeping();
    assert_eq!(read_locked(&f.engine), 0);
    f.engine.l1().check_invariants().expect("invariants");
}

fn prepare_offsets(e: &Engine, iid: i64, request_id: &str, chunks: u64) -> Vec<u64> {
    match e
        .handle(Request::PrepareStore {
            key: key(request_id, Some(0), chunks),
            instance_id: iid,
        })
        .expect("prepared")
    {
        Response::PrepareStore { slots, .. } => slots.iter().map(|s| s.offset).collect(),
        other => panic!("unexpected reply {other:?}"),
    }
}

fn commit(e: &Engine, iid: i64, request_id: &str, chunks: u64) -> Result<Response, EngineError> {
    e.handle(Request::CommitStore {
        key: key(request_id, Some(0), chunks),
        instance_id: iid,
        data: Vec::new(),
    })
}

/// Issue #13 finding 8 at the engine level: a store prepared and never committed keeps its
/// memory past its write TTL and the housekeeping sweep, so the next writer of the same chunks
/// gets other offsets; the late commit fails and frees it; an unregistered instance's
/// quarantine is freed at once; a forced reuse lets the sweep drop the pending store.
#[test]
fn an_expired_store_is_quarantined_until_its_writer_or_instance_returns() {
    let f = fixture();
    let l1 = Arc::clone(f.engine.l1());
    let c = l1.counters();
    for iid in 1..=3 {
        register(&f.engine, iid);
    }
    let a = prepare_offsets(&f.engine, 1, "a", 2);
    f.clock.advance(Duration::from_secs(601));
    l1.expire_locks();
    f.engine.housekeeping();
    assert_eq!(c.quarantined_objects.get(), 2);
    assert_eq!(
        f.engine.engine_driven().pending_counts().0,
        1,
        "swept too early"
    );
    // B: same chunks, other memory.
    let b = prepare_offsets(&f.engine, 2, "b", 2);
    assert_eq!(b.len(), 2);
    assert!(
        b.iter().all(|o| !a.contains(o)),
        "B {b:?} got A's memory {a:?}"
    );
    commit(&f.engine, 2, "b", 2).expect("B commits");
    // A's late commit: a failure, and its memory is free again.
    assert!(matches!(
        commit(&f.engine, 1, "a", 2),
        Err(EngineError::Failed(_))
    ));
    assert_eq!(c.quarantined_objects.get(), 0);
    assert_eq!(c.quarantine_released_total.get(), 2);
    assert_eq!(lookup(&f.engine, "r", 2), vec![2]);

    // C lapses too, then unregisters: its reservation is freed with it.
    assert_eq!(
        prepare_offsets(&f.engine, 3, "c", 3).len(),
        1,
        "chunks 0-1 are B's"
    );
    f.clock.advance(Duration::from_secs(601));
    l1.expire_locks();
    assert_eq!(c.quarantined_objects.get(), 1);
    f.engine
        .handle(Request::UnregisterKvCacheEngineDrivenContext { instance_id: 3 })
        .expect("unregistered");
    assert_eq!(c.quarantined_objects.get(), 0);
    assert_eq!(f.engine.engine_driven().pending_counts().0, 0);

    // Over the budget (a tenth of L1: 51 objects of 128 KiB) the oldest reservations go first,
    // and a pending store with none left is swept.
    let other_tokens = |rid: &str, first: u32, chunks: u32| IpcKey {
        token_ids: (first..first + chunks * 256).collect(),
        end: u64::from(chunks) * 256,
        ..key(rid, Some(0), 0)
    };
    for (rid, first, chunks) in [("old", 1_000_000, 1), ("big", 2_000_000, 60)] {
        f.engine
            .handle(Request::PrepareStore {
                key: other_tokens(rid, first, chunks),
                instance_id: 1,
            })
            .expect("prepared");
    }
    f.clock.advance(Duration::from_secs(601));
    l1.expire_locks();
    assert_eq!(c.quarantined_objects.get(), 51);
    assert_eq!(c.quarantine_forced_reuses_total.get(), 10);
    f.engine.housekeeping();
    assert_eq!(
        f.engine.engine_driven().pending_counts().0,
        1,
        "the old store (nothing left) is swept, the big one (51 held) is kept"
    );
    assert!(matches!(
        f.engine.handle(Request::CommitStore {
            key: other_tokens("big", 2_000_000, 60),
            instance_id: 1,
            data: Vec::new(),
        }),
        Err(EngineError::Failed(_))
    ));
    assert_eq!(c.quarantined_objects.get(), 0);
    l1.check_invariants().expect("invariants");
}

/// The wire edge: a lmcache_driven `store` that cannot happen (no such instance) is answered
/// `(handle, false)` with the client's own event handle, and counted as `failed`, never `ok`.
#[test]
fn a_failed_lmcache_driven_transfer_is_counted_as_failed_and_echoes_its_handle() {
    use kvtier_proto::Op;
    use kvtier_server::service::Service;
    use kvtier_server::stats::{Outcome, RpcStats};
    use kvtier_server::transport::Handler;

    let f = fixture();
    let engine = Arc::new(f.engine);
    let rpc = Arc::new(RpcStats::default());
    let arrays = Arc::new(kvtier_proto::TokenArrays::new(1 << 20, 16));
    let svc = Service::new(Arc::clone(&engine), Arc::clone(&rpc), arrays);
    let key = kvtier_client::codec::CacheKey::new("m", 1, (0..256).collect(), 0, 256, "r")
        .with_worker(Some(0))
        .encode();
    let mut iid = Vec::new();
    rmp::encode::write_sint(&mut iid, 42).expect("encode");
    let mut blocks = Vec::new();
    rmp::encode::write_array_len(&mut blocks, 1).expect("encode");
    rmp::encode::write_array_len(&mut blocks, 1).expect("encode");
    rmp::encode::write_uint(&mut blocks, 1).expect("encode");
    let mut handle = Vec::new();
    rmp::encode::write_bin(&mut handle, b"evt-7").expect("encode");
    let frames: [&[u8]; 4] = [&key, &iid, &blocks, &handle];
    for op in [Op::Store, Op::Retrieve] {
        let mut frames = frames.to_vec();
        let mut skip = Vec::new();
        if op == Op::Retrieve {
            rmp::encode::write_uint(&mut skip, 0).expect("encode");
            frames.push(&skip);
        }
        let (reply, outcome) = svc.call(op, &frames);
        assert_eq!(outcome, Outcome::Failed, "{op}");
        let expected = Response::Transfer {
            handle: b"evt-7".to_vec(),
            ok: false,
        }
        .encode();
        assert_eq!(reply, expected, "{op} echoes the handle");
        assert_eq!(svc.handle(op, &frames), expected);
        let s = rpc.get(op).expect("op stats");
        assert_eq!((s.ok.load(Relaxed), s.failed.load(Relaxed)), (0, 1), "{op}");
    }
    assert_eq!(
        engine.lmcache_driven().counters().stores_failed_total.get(),
        2
    );
    assert_eq!(
        engine
            .lmcache_driven()
            .counters()
            .retrieves_failed_total
            .get(),
        2
    );
}
