//! L2 end to end through the wire protocol: a real ZeroMQ client stores chunks into an
//! in-process kvtier server (shared-memory L1, write-behind to fs or a real redis-server), L1 is
//! force-cleared, and lookups bring the chunks back from L2 with equal bytes. Also: restart with
//! the same fs base_path, L1 prefix + L2 suffix, wait_prefetch_status, and a Redis outage.

mod common;

use std::time::Duration;

use common::*;
use kvtier_storage::AdapterConfig;
use kvtier_storage::config::{FsConfig, MockConfig, RespConfig};
use kvtier_storage::testsuite::RedisServer;
use serde_json::json;

const MODEL: &str = "org/e2e-model";

fn fs_adapter(dir: &std::path::Path) -> AdapterConfig {
    AdapterConfig::Fs(FsConfig::new(dir.to_str().expect("utf-8 path")))
}

fn resp_adapter(port: u16) -> AdapterConfig {
    let mut c = RespConfig::new("127.0.0.1", port);
    c.num_workers = 2;
    AdapterConfig::Resp(c)
}

fn wait_written(server: &kvtier_server::Server) {
    let l2 = server.engine().l2().expect("l2 configured");
    assert!(
        l2.wait_store_idle(Duration::from_secs(20)),
        "write-behind did not finish"
    );
}

fn clear_l1(c: &mut Client, server: &kvtier_server::Server) {
    assert!(c.call_json("clear", &[json!(true)]).is_none());
    assert_eq!(l1_objects(server), 0, "L1 is empty after a forced clear");
}

fn status(server: &kvtier_server::Server) -> serde_json::Value {
    let (code, v) = http_get(server.http_addr().expect("http"), "/api/status");
    assert_eq!(code, 200);
    v
}

/// Stores 4 chunks, waits for write-behind, clears L1, looks up and retrieves from L2.
fn round_trip_through_l2(c: &mut Client, server: &kvtier_server::Server, seed: u32) {
    let toks = tokens(seed, 4);
    let asked = store(c, server, 1, MODEL, &toks, u64::from(seed), "store-1");
    assert_eq!(asked, vec![0, 1, 2, 3]);
    wait_written(server);
    clear_l1(c, server);
    let hits = lookup(c, MODEL, &toks, "read-1");
    assert_eq!(hits, 4, "all chunks come back from L2");
    let got = retrieve(c, server, 1, MODEL, &toks, 4, "read-1");
    for (i, bytes) in got.iter().enumerate() {
        assert!(
            *bytes == chunk_bytes(u64::from(seed), i),
            "chunk {i} differs after the L2 round trip"
        );
    }
    c.call_json("end_session", &[json!("read-1")]);
    // The prefetched copies were temporary: gone once the retrieve released them.
    wait_until(
        "temporary objects to be freed",
        Duration::from_secs(5),
        || l1_objects(server) == 0,
    );
}

#[test]
fn fs_l2_round_trip_survives_clear_and_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let rt = http_runtime();
    let server = start(config(vec![fs_adapter(dir.path())]), &rt);
    let mut c = Client::connect(server.rpc_endpoint());
    c.register(1, MODEL);
    round_trip_through_l2(&mut c, &server, 1);

    let v = status(&server);
    let sm = &v["storage_manager"];
    assert_eq!(sm["num_l2_adapters"], 1);
    assert_eq!(sm["l2_adapters"][0]["type"], "FSL2Adapter");
    assert_eq!(sm["l2_adapters"][0]["stored_object_count"], 4);
    assert_eq!(sm["store_controller"]["thread_alive"], true);
    // Prefetched objects are not written back to L2.
    assert_eq!(
        sm["store_controller"]["submitted_keys_total"], 4,
        "{}",
        sm["store_controller"]
    );
    assert_eq!(sm["prefetch_controller"]["keys_loaded_total"], 4);
    assert_eq!(sm["l2"]["lookup_chunks_hit_l2_total"], 4);
    drop(c);
    server.shutdown();

    // A new server process on the same base_path still finds the chunks.
    let server = start(config(vec![fs_adapter(dir.path())]), &rt);
    let mut c = Client::connect(server.rpc_endpoint());
    c.register(1, MODEL);
    let toks = tokens(1, 4);
    assert_eq!(lookup(&mut c, MODEL, &toks, "after-restart"), 4);
    let got = retrieve(&mut c, &server, 1, MODEL, &toks, 4, "after-restart");
    for (i, bytes) in got.iter().enumerate() {
        assert!(
            *bytes == chunk_bytes(1, i),
            "chunk {i} differs after restart"
        );
    }
    c.call_json("end_session", &[json!("after-restart")]);

    // A truncated file is a miss, not corrupt data: the prefix stops before it.
    clear_l1(&mut c, &server);
    let l2 = server.engine().l2().expect("l2");
    let adapter = &l2.adapters()[0];
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".data"))
        .collect();
    assert_eq!(files.len(), 4);
    // Find chunk 2's file by loading the key names the server computes.
    let keys = {
        let hasher =
            kvtier_core::hash::TokenHasher::new(CHUNK, kvtier_core::hash::HashAlgorithm::Blake3)
                .expect("hasher");
        let hashes = hasher.hash_chunks(&toks);
        kvtier_core::key::object_keys(
            &hashes,
            &std::sync::Arc::from(MODEL),
            1,
            Some(0),
            0,
            &std::sync::Arc::from(""),
        )
        .expect("keys")
    };
    let path = dir.path().join(format!("{}.data", keys[2]));
    let len = std::fs::metadata(&path).expect("chunk 2 file").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(len - 100)
        .expect("truncate");
    assert_eq!(
        lookup(&mut c, MODEL, &toks, "truncated"),
        2,
        "prefix ends at the damaged chunk"
    );
    let got = retrieve(&mut c, &server, 1, MODEL, &toks, 2, "truncated");
    assert!(got[0] == chunk_bytes(1, 0) && got[1] == chunk_bytes(1, 1));
    c.call_json("end_session", &[json!("truncated")]);
    assert!(!path.exists(), "the damaged file was removed");
    assert_eq!(adapter.usage().object_count, 3);
    let v = status(&server);
    assert_eq!(
        v["storage_manager"]["l2_adapters"][0]["ops"]["corrupt_objects_total"],
        1
    );
    drop(c);
    server.shutdown();
}

#[test]
fn l1_prefix_continues_in_l2_and_wait_prefetch_status() {
    let dir = tempfile::tempdir().expect("tmp");
    let rt = http_runtime();
    let server = start(config(vec![fs_adapter(dir.path())]), &rt);
    let mut c = Client::connect(server.rpc_endpoint());
    c.register(1, MODEL);
    let toks = tokens(2, 4);
    store(&mut c, &server, 1, MODEL, &toks, 2, "s");
    wait_written(&server);
    clear_l1(&mut c, &server);
    // Bring chunks 0-1 back into L1 (a session keeps them locked), then look up all four:
    // L1 answers the first two, L2 the rest.
    let half = &toks[..2 * CHUNK];
    assert_eq!(lookup(&mut c, MODEL, half, "half"), 2);
    let k = key(MODEL, &toks, 0, toks.len(), None, "full");
    assert!(c.call_json("lookup", &[k, json!(1)]).is_none());
    let n = c
        .call_json("wait_prefetch_status", &[json!("full"), json!(10.0)])
        .expect("wait answers an int once done");
    assert_eq!(n, json!(4));
    // Consumed exactly once: a second query is an unknown request (0).
    assert_eq!(
        c.call_json("query_prefetch_status", &[json!("full")]),
        Some(json!(0))
    );
    let got = retrieve(&mut c, &server, 1, MODEL, &toks, 4, "full");
    for (i, bytes) in got.iter().enumerate() {
        assert!(*bytes == chunk_bytes(2, i), "chunk {i} differs");
    }
    // Only the suffix went to L2: 2 keys for "half", then 2 (not 4) for "full".
    let v = status(&server);
    assert_eq!(
        v["storage_manager"]["prefetch_controller"]["keys_requested_total"],
        2 + 2
    );
    c.call_json("end_session", &[json!("full")]);
    c.call_json("end_session", &[json!("half")]);
    wait_until(
        "temporary objects to be freed",
        Duration::from_secs(5),
        || l1_objects(&server) == 0,
    );
    // A lookup whose session ends before anyone collects the result leaks nothing.
    assert!(
        c.call_json(
            "lookup",
            &[
                key(MODEL, &toks, 0, toks.len(), None, "abandoned"),
                json!(1)
            ]
        )
        .is_none()
    );
    c.call_json("end_session", &[json!("abandoned")]);
    wait_until(
        "abandoned prefetch to be released",
        Duration::from_secs(10),
        || {
            l1_objects(&server) == 0
                && server
                    .engine()
                    .l2()
                    .is_some_and(|l2| l2.prefetch().active_jobs() == 0)
        },
    );
    drop(c);
    server.shutdown();
}

#[test]
fn resp_l2_round_trip_and_outage() {
    let mut redis = RedisServer::start();
    let rt = http_runtime();
    let server = start(config(vec![resp_adapter(redis.port())]), &rt);
    let mut c = Client::connect(server.rpc_endpoint());
    c.register(1, MODEL);
    round_trip_through_l2(&mut c, &server, 3);
    let v = status(&server);
    assert_eq!(
        v["storage_manager"]["l2_adapters"][0]["type"],
        "RESPL2Adapter"
    );
    let (code, _) = http_get(server.http_addr().expect("http"), "/api/healthcheck");
    assert_eq!(code, 200);

    // Redis goes away: the adapter turns unhealthy, /api/healthcheck says 503, L1 keeps serving.
    redis.stop();
    let addr = server.http_addr().expect("http");
    wait_until(
        "healthcheck to report the outage",
        Duration::from_secs(10),
        || http_get(addr, "/api/healthcheck").0 == 503,
    );
    let (_, body) = http_get(addr, "/api/healthcheck");
    let why = body.to_string();
    assert!(
        why.contains("l2_adapters") && why.contains("redis"),
        "{why}"
    );
    let v = status(&server);
    let a = &v["storage_manager"]["l2_adapters"][0];
    assert_eq!(a["connected"], false, "{a}");
    assert!(
        a["unhealthy_reason"]
            .as_str()
            .is_some_and(|r| r.contains("redis")),
        "{a}"
    );

    let toks = tokens(4, 3);
    store(&mut c, &server, 1, MODEL, &toks, 4, "during-outage");
    wait_written(&server);
    let v = status(&server);
    let sc = &v["storage_manager"]["store_controller"]["adapters"][0];
    assert_eq!(
        sc["failed_keys_total"], 3,
        "stores to the dead adapter fail and are counted: {sc}"
    );
    assert_eq!(
        lookup(&mut c, MODEL, &toks, "outage-read"),
        3,
        "L1 still serves"
    );
    let got = retrieve(&mut c, &server, 1, MODEL, &toks, 3, "outage-read");
    for (i, bytes) in got.iter().enumerate() {
        assert!(*bytes == chunk_bytes(4, i));
    }
    c.call_json("end_session", &[json!("outage-read")]);
    // A lookup that misses L1 while L2 is down answers 0 instead of hanging.
    let other = tokens(5, 2);
    assert_eq!(lookup(&mut c, MODEL, &other, "outage-miss"), 0);
    c.call_json("end_session", &[json!("outage-miss")]);

    // Redis returns (empty): healthy again without restarting kvtier, and L2 works again.
    redis.restart();
    wait_until("healthcheck to recover", Duration::from_secs(15), || {
        http_get(addr, "/api/healthcheck").0 == 200
    });
    round_trip_through_l2(&mut c, &server, 6);
    drop(c);
    server.shutdown();
}

#[test]
fn wait_prefetch_status_times_out_with_nil_then_answers() {
    // A slow mock L2: 8 chunks of 8 KiB at 256 KiB/s take ~250 ms per store or load batch.
    let slow = AdapterConfig::Mock(MockConfig {
        max_size_gb: 1.0,
        mock_bandwidth_gb: 1.0 / 4096.0,
        eviction: None,
    });
    let rt = http_runtime();
    let server = start(config(vec![slow]), &rt);
    let mut c = Client::connect(server.rpc_endpoint());
    c.register(1, MODEL);
    let toks = tokens(7, 8);
    store(&mut c, &server, 1, MODEL, &toks, 7, "s");
    wait_written(&server);
    clear_l1(&mut c, &server);
    let k = key(MODEL, &toks, 0, toks.len(), None, "slow");
    assert!(c.call_json("lookup", &[k, json!(1)]).is_none());
    assert_eq!(
        c.call_json("query_prefetch_status", &[json!("slow")]),
        None,
        "nil while L2 is loading"
    );
    assert_eq!(
        c.call_json("wait_prefetch_status", &[json!("slow"), json!(0.001)]),
        None,
        "nil when the wait times out"
    );
    assert_eq!(
        c.call_json("wait_prefetch_status", &[json!("slow"), json!(30.0)]),
        Some(json!(8))
    );
    let got = retrieve(&mut c, &server, 1, MODEL, &toks, 8, "slow");
    assert!(got.iter().enumerate().all(|(i, b)| *b == chunk_bytes(7, i)));
    c.call_json("end_session", &[json!("slow")]);
    let v = status(&server);
    assert!(
        v["storage_manager"]["l2"]["wait_timeouts_total"].as_u64() >= Some(1),
        "{v}"
    );
    assert_eq!(
        v["storage_manager"]["l2_adapters"][0]["type"],
        "MockL2Adapter"
    );
    drop(c);
    server.shutdown();
}
