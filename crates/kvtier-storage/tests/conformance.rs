//! The L2 backend conformance suite, run against every adapter (resp against a real
//! redis-server started by the harness).

use std::sync::Arc;

use kvtier_storage::L2Backend;
use kvtier_storage::config::{FsConfig, MockConfig, RespConfig};
use kvtier_storage::fs::FsBackend;
use kvtier_storage::mock::MockBackend;
use kvtier_storage::resp::RespBackend;
use kvtier_storage::testsuite::{RedisServer, run_conformance};

const GIB: f64 = (1u64 << 30) as f64;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn gb(bytes: Option<u64>, unlimited: f64) -> f64 {
    bytes.map_or(unlimited, |b| b as f64 / GIB)
}

#[test]
fn mock_conforms() {
    let rt = runtime();
    run_conformance("mock", &rt, &|cap| {
        Arc::new(MockBackend::new(MockConfig {
            max_size_gb: gb(cap, 1.0),
            mock_bandwidth_gb: 100.0,
            eviction: None,
        })) as Arc<dyn L2Backend>
    });
}

#[test]
fn fs_conforms() {
    let rt = runtime();
    let dirs = parking_lot::Mutex::new(Vec::new());
    run_conformance("fs", &rt, &|cap| {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = FsConfig::new(dir.path().to_str().expect("utf-8 path"));
        cfg.max_capacity_gb = gb(cap, 0.0);
        let b = FsBackend::open(cfg, rt.handle()).expect("open fs adapter");
        dirs.lock().push(dir);
        b as Arc<dyn L2Backend>
    });
}

#[test]
fn resp_conforms() {
    let redis = RedisServer::start();
    let rt = runtime();
    run_conformance("resp", &rt, &|cap| {
        let mut cfg = RespConfig::new("127.0.0.1", redis.port());
        cfg.max_capacity_gb = gb(cap, 0.0);
        cfg.num_workers = 4;
        // Small parts so the suite's larger objects are split across keys.
        cfg.part_bytes = 100_000;
        let b = rt
            .block_on(RespBackend::open(cfg, rt.handle()))
            .expect("open resp adapter");
        assert!(
            b.health().connected,
            "resp adapter did not connect: {:?}",
            b.health()
        );
        b as Arc<dyn L2Backend>
    });
}
