//! resp adapter fault behaviour against a real redis-server that the test stops and restarts.

use std::time::{Duration, Instant};

use kvtier_storage::config::RespConfig;
use kvtier_storage::resp::RespBackend;
use kvtier_storage::testsuite::{Arena, RedisServer, key, pattern, unique_model};
use kvtier_storage::{L2Backend, L2Error};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn redis_outage_marks_unhealthy_fails_fast_and_recovers() {
    let mut redis = RedisServer::start();
    let rt = runtime();
    let arena = Arena::new(4 << 20);
    let b = rt
        .block_on(RespBackend::open(
            RespConfig::new("127.0.0.1", redis.port()),
            rt.handle(),
        ))
        .expect("open");
    assert!(b.health().connected);
    let model = unique_model();
    let k1 = key(&model, 1);
    let k2 = key(&model, 2);
    let src = arena.put(&pattern(1, 30_000));
    rt.block_on(async {
        let r = b
            .store(std::slice::from_ref(&k1), &arena.segment, &[src])
            .await;
        assert!(r[0].is_ok(), "{r:?}");
    });

    redis.stop();
    // The heartbeat notices without any traffic.
    wait_until(
        "the adapter to turn unhealthy",
        Duration::from_secs(10),
        || !b.health().connected,
    );
    let node = b.report_status();
    assert!(!node.is_healthy());
    let reason = node.unhealthy_reason().unwrap_or_default();
    assert!(reason.contains("redis at 127.0.0.1"), "{reason}");
    let v = node.to_value();
    assert_eq!(v["connected"], false);
    assert!(v["last_error"].is_string(), "{v}");
    // Stores and lookups fail fast with the reason, and are counted.
    let before = v["errors"]["fast_failures_total"].as_u64().unwrap_or(0);
    rt.block_on(async {
        let r = b
            .store(std::slice::from_ref(&k2), &arena.segment, &[src])
            .await;
        assert!(
            matches!(&r[0], Err(L2Error::Unavailable(why)) if why.contains("redis")),
            "{r:?}"
        );
        let l = b.lookup_and_pin(std::slice::from_ref(&k1)).await;
        assert!(matches!(l, Err(L2Error::Unavailable(_))), "{l:?}");
    });
    let v = b.report_status().to_value();
    assert!(
        v["errors"]["fast_failures_total"].as_u64().unwrap_or(0) >= before + 2,
        "{v}"
    );
    assert!(
        v["ops"]["store"]["failed_objects_total"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{v}"
    );

    // The server comes back (empty: no persistence): the adapter reconnects by itself.
    redis.restart();
    wait_until("the adapter to recover", Duration::from_secs(15), || {
        b.health().connected
    });
    assert!(b.report_status().is_healthy());
    let v = b.report_status().to_value();
    assert_eq!(v["errors"]["recoveries_total"], 1, "{v}");
    rt.block_on(async {
        let r = b
            .store(std::slice::from_ref(&k2), &arena.segment, &[src])
            .await;
        assert!(r[0].is_ok(), "{r:?}");
        let found = b
            .lookup_and_pin(std::slice::from_ref(&k2))
            .await
            .expect("lookup");
        assert_eq!(found, vec![Some(30_000)]);
        let dst = arena.alloc(30_000);
        let r = b
            .load(std::slice::from_ref(&k2), &arena.segment, &[dst])
            .await;
        assert!(r[0].is_ok(), "{r:?}");
        assert!(arena.get(dst) == pattern(1, 30_000));
        b.unpin(std::slice::from_ref(&k2)).await;
        b.close().await;
    });
}

#[test]
fn starts_unhealthy_without_a_server_and_connects_later() {
    let mut redis = RedisServer::start();
    redis.stop();
    let rt = runtime();
    let b = rt
        .block_on(RespBackend::open(
            RespConfig::new("127.0.0.1", redis.port()),
            rt.handle(),
        ))
        .expect("an unreachable server does not fail start-up");
    assert!(!b.health().connected);
    assert!(!b.report_status().is_healthy());
    redis.restart();
    wait_until("the adapter to connect", Duration::from_secs(15), || {
        b.health().connected
    });
    rt.block_on(b.close());
}

#[test]
fn corrupt_value_is_a_removed_miss() {
    let redis = RedisServer::start();
    let rt = runtime();
    let arena = Arena::new(4 << 20);
    let mut cfg = RespConfig::new("127.0.0.1", redis.port());
    cfg.part_bytes = 10_000;
    let b = rt
        .block_on(RespBackend::open(cfg, rt.handle()))
        .expect("open");
    let model = unique_model();
    let k = key(&model, 1);
    let src = arena.put(&pattern(1, 35_000));
    rt.block_on(async {
        let r = b
            .store(std::slice::from_ref(&k), &arena.segment, &[src])
            .await;
        assert!(r[0].is_ok(), "{r:?}");
        // Remove one part behind the adapter's back.
        let client =
            redis::Client::open(format!("redis://127.0.0.1:{}", redis.port())).expect("client");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let n: i64 = redis::cmd("DEL")
            .arg(kvtier_storage::resp::part_key(&k.to_string(), 2))
            .query_async(&mut c)
            .await
            .expect("del");
        assert_eq!(n, 1, "part 2 existed");
        assert_eq!(
            b.lookup_and_pin(std::slice::from_ref(&k))
                .await
                .expect("lookup"),
            vec![Some(35_000)]
        );
        let dst = arena.alloc(35_000);
        let r = b
            .load(std::slice::from_ref(&k), &arena.segment, &[dst])
            .await;
        assert!(
            matches!(&r[0], Err(L2Error::Corrupt(why)) if why.contains("part 2")),
            "{r:?}"
        );
        b.unpin(std::slice::from_ref(&k)).await;
        assert_eq!(
            b.lookup_and_pin(std::slice::from_ref(&k))
                .await
                .expect("lookup"),
            vec![None],
            "the damaged object was deleted"
        );
        let left: i64 = redis::cmd("EXISTS")
            .arg(kvtier_storage::resp::part_key(&k.to_string(), 1))
            .query_async(&mut c)
            .await
            .expect("exists");
        assert_eq!(left, 0, "its other parts were deleted too");
        b.close().await;
    });
    let v = b.report_status().to_value();
    assert_eq!(v["ops"]["corrupt_objects_total"], 1, "{v}");
}

#[test]
fn index_heals_after_the_server_loses_data() {
    let mut redis = RedisServer::start();
    let rt = runtime();
    let arena = Arena::new(4 << 20);
    let b = rt
        .block_on(RespBackend::open(
            RespConfig::new("127.0.0.1", redis.port()),
            rt.handle(),
        ))
        .expect("open");
    let model = unique_model();
    let k = key(&model, 1);
    let src = arena.put(&pattern(1, 20_000));
    let store = |b: &RespBackend| {
        rt.block_on(async {
            let r = b
                .store(std::slice::from_ref(&k), &arena.segment, &[src])
                .await;
            assert!(r[0].is_ok(), "{r:?}");
        });
    };
    store(&b);
    assert_eq!(b.usage().object_count, 1);
    // The server restarts empty (no persistence).
    redis.restart();
    wait_until("reconnect", Duration::from_secs(15), || {
        rt.block_on(b.lookup_and_pin(std::slice::from_ref(&k)))
            .is_ok()
    });
    assert_eq!(
        b.usage().object_count,
        0,
        "the miss un-indexed the lost object"
    );
    // The next store rewrites it instead of skipping it as "already held".
    store(&b);
    assert_eq!(
        rt.block_on(b.lookup_and_pin(std::slice::from_ref(&k)))
            .expect("lookup"),
        vec![Some(20_000)]
    );
    rt.block_on(async {
        b.unpin(std::slice::from_ref(&k)).await;
        b.close().await;
    });
}
