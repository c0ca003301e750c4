//! Two kvtier servers sharing one real Redis Cluster through the `valkey` adapter: chunks land
//! on more than one master, each server serves the other's chunks after an L1 clear, and a
//! master killed mid-run is survived (healthcheck 503 naming the node, then 200 once the
//! replica is promoted, and the chunks come back byte-exact) without restarting kvtier.

mod common;

use std::time::Duration;

use common::*;
use kvtier_storage::AdapterConfig;
use kvtier_storage::config::ValkeyConfig;
use kvtier_storage::testsuite::RedisCluster;
use serde_json::json;

const MODEL: &str = "org/cluster-model";

fn valkey_adapter(cluster: &RedisCluster) -> AdapterConfig {
    let mut c = ValkeyConfig::new(cluster.startup_nodes(), true);
    c.num_workers = 4;
    c.request_timeout = 1.0;
    c.connection_timeout = 2.0;
    AdapterConfig::Valkey(c)
}

fn wait_written(server: &kvtier_server::Server) {
    let l2 = server.engine().l2().expect("l2 configured");
    assert!(
        l2.wait_store_idle(Duration::from_secs(20)),
        "write-behind did not finish"
    );
}

/// Clears `server`'s L1 and reads `seed`'s 4 chunks back from the cluster, byte-exact.
fn read_back(c: &mut Client, server: &kvtier_server::Server, seed: u32, rid: &str) {
    assert!(c.call_json("clear", &[json!(true)]).is_none());
    assert_eq!(l1_objects(server), 0, "L1 is empty after a forced clear");
    let toks = tokens(seed, 4);
    assert_eq!(
        lookup(c, MODEL, &toks, rid),
        4,
        "all chunks come back from L2"
    );
    let got = retrieve(c, server, 1, MODEL, &toks, 4, rid);
    for (i, bytes) in got.iter().enumerate() {
        assert!(
            *bytes == chunk_bytes(u64::from(seed), i),
            "chunk {i} differs"
        );
    }
    c.call_json("end_session", &[json!(rid)]);
}

#[test]
fn two_servers_share_a_cluster_and_survive_a_failover() {
    let mut cluster = RedisCluster::start(3);
    let rt = http_runtime();
    let a = start(config(vec![valkey_adapter(&cluster)]), &rt);
    let b = start(config(vec![valkey_adapter(&cluster)]), &rt);
    let mut ca = Client::connect(a.rpc_endpoint());
    let mut cb = Client::connect(b.rpc_endpoint());
    ca.register(1, MODEL);
    cb.register(1, MODEL);

    // Each writes its own chunks; each reads the other's.
    store(&mut ca, &a, 1, MODEL, &tokens(1, 4), 1, "a-store");
    store(&mut cb, &b, 1, MODEL, &tokens(2, 4), 2, "b-store");
    wait_written(&a);
    wait_written(&b);
    let masters = cluster.masters();
    let holding = masters.iter().filter(|&&m| cluster.dbsize(m) > 0).count();
    assert!(holding > 1, "8 chunks on {holding} of {masters:?}");
    read_back(&mut cb, &b, 1, "b-reads-a");
    read_back(&mut ca, &a, 2, "a-reads-b");
    let addr = a.http_addr().expect("http");
    assert_eq!(http_get(addr, "/api/healthcheck").0, 200);
    let (_, st) = http_get(addr, "/api/status");
    assert_eq!(
        st["storage_manager"]["l2_adapters"][0]["type"],
        "ValkeyL2Adapter"
    );
    let live = cluster.live_ports();
    wait_until("replication", Duration::from_secs(10), || {
        live.iter().map(|&p| cluster.dbsize(p)).sum::<u64>() >= 16
    });

    // A master dies: 503 naming it, then the replica is promoted and kvtier is healthy again.
    let victim = masters
        .iter()
        .copied()
        .find(|&m| cluster.dbsize(m) > 0)
        .expect("a master with keys");
    cluster.kill(victim);
    let node = format!("127.0.0.1:{victim}");
    wait_until(
        "healthcheck to name the dead master",
        Duration::from_secs(10),
        || {
            let (code, body) = http_get(addr, "/api/healthcheck");
            code == 503 && body.to_string().contains(&node)
        },
    );
    cluster.wait_ok(Duration::from_secs(20));
    wait_until("healthcheck to recover", Duration::from_secs(20), || {
        http_get(addr, "/api/healthcheck").0 == 200
    });
    read_back(&mut ca, &a, 1, "a-after-failover");
    read_back(&mut ca, &a, 2, "a-after-failover-2");
    drop(ca);
    drop(cb);
    a.shutdown();
    b.shutdown();
}
