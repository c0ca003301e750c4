//! The `valkey` adapter against real servers: the conformance suite in standalone and cluster
//! mode, keys spread over the masters, a master failover and a whole-cluster outage survived
//! without reopening the adapter, TLS (right and wrong CA) and an ACL user (right and wrong
//! password), and a corrupt value deleted and counted. One cluster serves every cluster case (they
//! run in sequence in one test).

use std::sync::Arc;
use std::time::Duration;

use kvtier_storage::L2Backend;
use kvtier_storage::config::ValkeyConfig;
use kvtier_storage::testsuite::{
    Arena, RedisCluster, RedisServer, TestCerts, TlsRedisServer, key, pattern, redis_cli,
    run_conformance, unique_model, wait_for,
};
use kvtier_storage::valkey::ValkeyBackend;

const GIB: f64 = (1u64 << 30) as f64;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn open(rt: &tokio::runtime::Runtime, cfg: ValkeyConfig) -> Arc<dyn L2Backend> {
    rt.block_on(ValkeyBackend::open(cfg, rt.handle()))
        .expect("open valkey adapter")
}

fn conform(name: &str, rt: &tokio::runtime::Runtime, base: &ValkeyConfig) {
    run_conformance(name, rt, &|cap| {
        let mut cfg = base.clone();
        cfg.max_capacity_gb = cap.map_or(0.0, |b| b as f64 / GIB);
        cfg.num_workers = 4;
        let b = open(rt, cfg);
        assert!(
            b.health().connected,
            "valkey did not connect: {:?}",
            b.health()
        );
        b
    });
}

fn reason(b: &dyn L2Backend) -> String {
    format!("{:?}", b.report_status().unhealthy_reason())
}

#[test]
fn valkey_standalone_conforms_and_refuses_oversized_objects() {
    let redis = RedisServer::start();
    let rt = runtime();
    let mut cfg = ValkeyConfig::new(format!("127.0.0.1:{}", redis.port()), false);
    cfg.key_prefix = "conformance".to_owned();
    cfg.database_id = Some(3);
    conform("valkey-standalone", &rt, &cfg);
    // The database and the prefix are used.
    let keys = redis_cli(
        redis.port(),
        &["-n", "3", "--scan", "--pattern", "conformance@*"],
    );
    assert!(!keys.trim().is_empty(), "no prefixed keys in db 3");
    // Objects above the largest value are refused, never split.
    cfg.max_value_bytes = 1000;
    let b = open(&rt, cfg);
    let arena = Arena::new(1 << 20);
    let model = unique_model();
    let src = [arena.put(&pattern(1, 1001)), arena.put(&pattern(2, 1000))];
    let r = rt.block_on(b.store(&[key(&model, 1), key(&model, 2)], &arena.segment, &src));
    assert!(
        matches!(&r[0], Err(kvtier_storage::L2Error::Invalid(m)) if m.contains("never split")),
        "{r:?}"
    );
    assert!(r[1].is_ok(), "{r:?}");
}

#[test]
fn valkey_corrupt_value_is_a_counted_deleted_miss() {
    // A value whose length no longer matches what the lookup pinned (rewritten behind the
    // adapter's back) fails the load as corrupt, is deleted from the server and un-indexed.
    let redis = RedisServer::start();
    let rt = runtime();
    let mut cfg = ValkeyConfig::new(format!("127.0.0.1:{}", redis.port()), false);
    cfg.key_prefix = "corrupt".to_owned();
    let b = open(&rt, cfg);
    let arena = Arena::new(1 << 20);
    let model = unique_model();
    let k = key(&model, 1);
    let one = std::slice::from_ref(&k);
    let src = arena.put(&pattern(1, 1000));
    assert!(rt.block_on(b.store(one, &arena.segment, &[src]))[0].is_ok());
    assert_eq!(
        rt.block_on(b.lookup_and_pin(one)).expect("lookup"),
        vec![Some(1000)]
    );
    let name = kvtier_storage::valkey::wire_key("corrupt", &k);
    redis_cli(redis.port(), &["SET", &name, "short"]);
    let dst = arena.alloc(1000);
    let r = rt.block_on(b.load(one, &arena.segment, &[dst]));
    assert!(
        matches!(&r[0], Err(kvtier_storage::L2Error::Corrupt(why)) if why.contains("5 bytes")),
        "{r:?}"
    );
    rt.block_on(b.unpin(one));
    assert_eq!(
        redis_cli(redis.port(), &["EXISTS", &name]).trim(),
        "0",
        "the corrupt value was deleted"
    );
    assert_eq!(
        rt.block_on(b.lookup_and_pin(one)).expect("lookup"),
        vec![None]
    );
    assert_eq!(b.usage().object_count, 0, "and un-indexed");
    let v = b.report_status().to_value();
    assert_eq!(v["ops"]["corrupt_objects_total"], 1, "{v}");
}

#[test]
fn valkey_acl_user() {
    let redis = RedisServer::start();
    let out = redis_cli(
        redis.port(),
        &["ACL", "SETUSER", "kvtier", "on", ">s3cret", "~*", "+@all"],
    );
    assert!(out.contains("OK"), "{out}");
    let rt = runtime();
    let mut cfg = ValkeyConfig::new(format!("127.0.0.1:{}", redis.port()), false);
    cfg.username = "kvtier".to_owned();
    cfg.password = "s3cret".to_owned();
    let good = open(&rt, cfg.clone());
    assert!(good.health().connected, "{:?}", good.health());
    let arena = Arena::new(1 << 20);
    let model = unique_model();
    let k = [key(&model, 1)];
    let src = [arena.put(&pattern(1, 5000))];
    let r = rt.block_on(good.store(&k, &arena.segment, &src));
    assert!(r[0].is_ok(), "{r:?}");
    // A wrong password: the adapter opens, is unhealthy, says why, and fails calls fast.
    cfg.password = "wrong".to_owned();
    let bad = open(&rt, cfg);
    assert!(!bad.health().connected);
    let why = reason(bad.as_ref());
    assert!(
        why.to_lowercase().contains("authentication") && why.contains("127.0.0.1"),
        "{why}"
    );
    assert!(rt.block_on(bad.lookup_and_pin(&k)).is_err());
    rt.block_on(async {
        good.close().await;
        bad.close().await;
    });
}

#[test]
fn valkey_tls_with_right_and_wrong_ca() {
    let certs = TestCerts::generate();
    let redis = TlsRedisServer::start(&certs);
    let rt = runtime();
    let mut cfg = ValkeyConfig::new(format!("127.0.0.1:{}", redis.port()), false);
    cfg.tls_enable = true;
    cfg.tls_ca_file = Some(certs.path("ca.pem"));
    cfg.request_timeout = 2.0;
    cfg.connection_timeout = 2.0;
    conform("valkey-tls", &rt, &cfg);
    cfg.tls_ca_file = Some(certs.path("other-ca.pem"));
    let bad = open(&rt, cfg.clone());
    assert!(!bad.health().connected);
    let why = reason(bad.as_ref());
    assert!(
        why.contains("certificate") || why.contains("UnknownIssuer"),
        "{why}"
    );
    // Plaintext against the TLS port is refused too (not a hang).
    cfg.tls_enable = false;
    cfg.tls_ca_file = None;
    let plain = open(&rt, cfg);
    assert!(!plain.health().connected);
    // A missing CA file fails start-up with the path named.
    let mut missing = ValkeyConfig::new(format!("127.0.0.1:{}", redis.port()), false);
    missing.tls_enable = true;
    missing.tls_ca_file = Some("/nonexistent/ca.pem".to_owned());
    let e = rt
        .block_on(ValkeyBackend::open(missing, rt.handle()))
        .expect_err("unreadable CA file");
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
}

#[test]
fn valkey_cluster_conforms_spreads_and_survives_failover_and_outage() {
    let mut cluster = RedisCluster::start(3);
    let rt = runtime();
    let mut cfg = ValkeyConfig::new(cluster.startup_nodes(), true);
    cfg.request_timeout = 1.0;
    cfg.connection_timeout = 2.0;
    conform("valkey-cluster", &rt, &cfg);

    // Keys spread over the masters.
    let b = open(&rt, cfg.clone());
    let arena = Arena::new(16 << 20);
    let model = unique_model();
    let n = 48u32;
    let keys: Vec<_> = (0..n).map(|i| key(&model, i)).collect();
    let data: Vec<Vec<u8>> = (0..n).map(|i| pattern(i, 10_000 + i as usize)).collect();
    let src: Vec<_> = data.iter().map(|d| arena.put(d)).collect();
    let r = rt.block_on(b.store(&keys, &arena.segment, &src));
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");
    let holding: Vec<u16> = masters
        .iter()
        .copied()
        .filter(|&m| cluster.dbsize(m) > 0)
        .collect();
    assert!(holding.len() > 1, "keys on one master only: {holding:?}");
    // Replicas show up in the topology once they have synced (the heartbeat rereads it).
    wait_for(Duration::from_secs(10), "6 nodes in the topology", || {
        b.report_status().to_value()["nodes_known_count"] == 6
    });
    let st = b.report_status().to_value();
    assert_eq!(st["slots_covered_count"], 16384, "{st}");
    assert_eq!(st["masters_count"], 3, "{st}");
    assert!(b.report_status().is_healthy(), "{st}");

    // Every key replicated before the failover.
    let live = cluster.live_ports();
    wait_for(Duration::from_secs(10), "replication", || {
        live.iter().map(|&p| cluster.dbsize(p)).sum::<u64>()
            >= masters.iter().map(|&m| cluster.dbsize(m)).sum::<u64>() * 2
    });

    // Kill a master: unhealthy naming it, its keys are misses, the other shards serve.
    let victim = holding[0];
    cluster.kill(victim);
    wait_for(
        Duration::from_secs(10),
        "the adapter to name the dead master",
        || reason(b.as_ref()).contains(&format!("127.0.0.1:{victim}")),
    );
    let found = rt
        .block_on(b.lookup_and_pin(&keys))
        .expect("a shard outage is misses, not an error");
    let hits = found.iter().flatten().count();
    rt.block_on(b.unpin(&keys));
    assert!(hits > 0, "the other shards keep serving");
    // The replica is promoted: healthy again, every chunk back, byte-exact.
    cluster.wait_ok(Duration::from_secs(20));
    wait_for(Duration::from_secs(20), "the adapter to recover", || {
        b.report_status().is_healthy()
    });
    let st = b.report_status().to_value();
    assert!(st["failovers_total"].as_u64() >= Some(1), "{st}");
    assert!(st["slot_moves_total"].as_u64() >= Some(1), "{st}");
    wait_for(
        Duration::from_secs(10),
        "every chunk after the failover",
        || {
            let f = rt.block_on(b.lookup_and_pin(&keys)).unwrap_or_default();
            rt.block_on(b.unpin(&keys));
            f.iter().flatten().count() == n as usize
        },
    );
    let dst: Vec<_> = data.iter().map(|d| arena.alloc(d.len() as u64)).collect();
    let r = rt.block_on(b.load(&keys, &arena.segment, &dst));
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    for (d, a) in data.iter().zip(&dst) {
        assert!(arena.get(*a) == *d, "bytes differ after failover");
    }

    // The whole cluster goes down and comes back (empty): down, then healthy by itself.
    cluster.kill_all();
    wait_for(Duration::from_secs(10), "the adapter to go down", || {
        !b.health().connected
    });
    assert!(
        rt.block_on(b.lookup_and_pin(&keys)).is_err(),
        "fails fast while down"
    );
    cluster.restart_stopped();
    cluster.wait_ok(Duration::from_secs(30));
    wait_for(Duration::from_secs(30), "the adapter to reconnect", || {
        b.report_status().is_healthy()
    });
    let r = rt.block_on(b.store(&keys[..4], &arena.segment, &src[..4]));
    assert!(r.iter().all(Result::is_ok), "{r:?}");

    // Metrics: per-node requests and topology gauges are visited.
    let mut names = Vec::new();
    struct Names<'a>(&'a mut Vec<String>);
    impl kvtier_core::metrics::MetricVisitor for Names<'_> {
        fn counter(
            &mut self,
            d: &'static kvtier_core::metrics::MetricDesc,
            l: kvtier_core::metrics::Labels<'_>,
            _: u64,
        ) {
            self.0.push(format!("{}{l:?}", d.name));
        }
        fn gauge(
            &mut self,
            d: &'static kvtier_core::metrics::MetricDesc,
            l: kvtier_core::metrics::Labels<'_>,
            _: f64,
        ) {
            self.0.push(format!("{}{l:?}", d.name));
        }
        fn histogram(
            &mut self,
            d: &'static kvtier_core::metrics::MetricDesc,
            l: kvtier_core::metrics::Labels<'_>,
            _: &kvtier_core::metrics::HistogramSnapshot,
        ) {
            self.0.push(format!("{}{l:?}", d.name));
        }
    }
    b.visit_metrics(&mut Names(&mut names));
    let all = names.join("\n");
    for want in [
        "kvtier_l2_valkey_slots_covered",
        "kvtier_l2_valkey_failovers",
        "kvtier_l2_valkey_node_requests",
        "kvtier_l2_valkey_node_request_duration",
    ] {
        assert!(all.contains(want), "{want} missing:\n{all}");
    }
    rt.block_on(b.close());
}
