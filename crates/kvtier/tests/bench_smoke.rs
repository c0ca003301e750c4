//! CI smoke run of `kvtier bench`: spawns a real `kvtier serve`, runs every workload at small
//! sizes with two clients, and checks the run verified every byte without errors. No
//! assertion is made on speed.

use std::process::Command;

use kvtier_storage::testsuite::free_port;

#[test]
fn bench_smoke_against_a_spawned_server() {
    let exe = env!("CARGO_BIN_EXE_kvtier");
    let (port, http_port) = (free_port(), free_port());
    let shm = format!("kvtier_bench_smoke_{}", std::process::id());
    let out = Command::new(exe)
        .args(["bench", "--json", "--spawn-server"])
        .args(["--url", &format!("tcp://127.0.0.1:{port}")])
        .args(["--http-url", &format!("http://127.0.0.1:{http_port}")])
        .args([
            "--shape",
            "2:64:float16",
            "--clients",
            "2",
            "--requests",
            "4",
        ])
        .args([
            "--chunks-per-request",
            "3",
            "--noops",
            "50",
            "--pipeline-depth",
            "16",
        ])
        .args(["--status-objects", "500", "--timeout-seconds", "30"])
        .args(["--neighbour-chunks", "2"])
        .arg("--")
        .arg(exe)
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--http-host",
            "127.0.0.1",
            "--http-port",
            &http_port.to_string(),
        ])
        .args(["--l1-size-gb", "0.25", "--shm-name", &shm, "--log", "warn"])
        .output()
        .expect("kvtier bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    let m = &report["metrics"];
    assert_eq!(m["errors"], 0.0);
    for key in [
        "startup_ms",
        "memcpy_gbps",
        "noop_rtt_p50_us",
        "noop_pipelined_ops_per_s",
        "lookup_p50_us",
        "store_cold_gbps",
        "store_warm_gbps",
        "retrieve_cold_gbps",
        "retrieve_warm_frac_memcpy",
        "status_load_p50_ms",
        "fill_objects_per_s",
        "server_rss_excl_shm_mib",
        "noop_after_copy_p50_us",
        "noop_beside_heavy_p99_us",
        "heavy_batch_p50_us",
        "commit_store_warm_p50_x_noop_after_copy",
    ] {
        assert!(
            m[key].as_f64().is_some_and(|v| v >= 0.0),
            "missing {key}: {report}"
        );
    }
    assert_eq!(report["config"]["chunk_bytes"], 2 * 2 * 256 * 64 * 2);
    // The server was stopped and removed its segment.
    assert!(!std::path::Path::new("/dev/shm").join(&shm).exists());
}
