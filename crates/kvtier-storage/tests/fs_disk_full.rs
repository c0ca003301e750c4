//! The fs adapter when the filesystem refuses writes.
//!
//! A real write failure without root or a dedicated filesystem: this test binary lowers its own
//! RLIMIT_FSIZE so that writing a file beyond the limit fails with EFBIG (SIGXFSZ ignored), the
//! same class of failure as ENOSPC for the adapter. It runs alone in its own process because the
//! limit is process-wide.

use std::time::{Duration, Instant};

use kvtier_storage::config::FsConfig;
use kvtier_storage::fs::FsBackend;
use kvtier_storage::testsuite::{Arena, key, pattern, unique_model};
use kvtier_storage::{L2Backend, L2Error};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn full_disk_marks_unhealthy_fails_fast_and_recovers() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Everything that needs large files (the shm segment) is created before the limit.
    let arena = Arena::new(16 << 20);
    let dir = tempfile::tempdir().expect("tmp");
    let b = FsBackend::open(
        FsConfig::new(dir.path().to_str().expect("utf-8")),
        rt.handle(),
    )
    .expect("open");
    let model = unique_model();
    let small = key(&model, 1);
    let big = key(&model, 2);
    let small_data = pattern(1, 10_000);
    let big_data = pattern(2, 4 << 20);
    let small_src = arena.put(&small_data);
    let big_src = arena.put(&big_data);
    rt.block_on(async {
        let r = b
            .store(std::slice::from_ref(&small), &arena.segment, &[small_src])
            .await;
        assert!(r[0].is_ok(), "{r:?}");
    });

    // SAFETY: setting a signal disposition to SIG_IGN; no handler code runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let original = getrlimit(Resource::Fsize);
    setrlimit(
        Resource::Fsize,
        Rlimit {
            current: Some(1 << 20),
            maximum: original.maximum,
        },
    )
    .expect("lowering RLIMIT_FSIZE");

    rt.block_on(async {
        let r = b
            .store(std::slice::from_ref(&big), &arena.segment, &[big_src])
            .await;
        assert!(matches!(r[0], Err(L2Error::NoSpace(_))), "{r:?}");
    });
    let h = b.health();
    assert!(!h.connected, "{h:?}");
    let node = b.report_status();
    assert!(!node.is_healthy());
    let reason = node.unhealthy_reason().unwrap_or_default();
    assert!(reason.contains("disk full or not writable"), "{reason}");
    // Stores fail fast (counted); lookups and loads keep working.
    rt.block_on(async {
        let r = b
            .store(std::slice::from_ref(&big), &arena.segment, &[big_src])
            .await;
        assert!(matches!(r[0], Err(L2Error::Unavailable(_))), "{r:?}");
        let found = b
            .lookup_and_pin(&[small.clone(), big.clone()])
            .await
            .expect("lookup");
        assert_eq!(
            found,
            vec![Some(10_000), None],
            "nothing half-written is visible"
        );
        let dst = arena.alloc(10_000);
        let r = b
            .load(std::slice::from_ref(&small), &arena.segment, &[dst])
            .await;
        assert!(r[0].is_ok(), "{r:?}");
        assert!(arena.get(dst) == small_data);
        b.unpin(std::slice::from_ref(&small)).await;
    });
    let v = b.report_status().to_value();
    assert!(
        v["errors"]["fast_failures_total"].as_u64().unwrap_or(0) >= 1,
        "{v}"
    );
    // The probe keeps failing while the limit stays.
    std::thread::sleep(Duration::from_millis(400));
    assert!(!b.health().connected);
    assert!(v["errors"]["down_transitions_total"] == 1, "{v}");
    let tmp_left = std::fs::read_dir(dir.path().join(".kvtier-tmp"))
        .expect("tmp dir")
        .count();
    assert_eq!(tmp_left, 0, "failed writes leave no temp files");

    // Space comes back: the adapter recovers by itself and stores work again.
    setrlimit(Resource::Fsize, original).expect("restoring RLIMIT_FSIZE");
    wait_until("the fs adapter to recover", Duration::from_secs(15), || {
        b.health().connected
    });
    assert!(b.report_status().is_healthy());
    rt.block_on(async {
        let r = b
            .store(std::slice::from_ref(&big), &arena.segment, &[big_src])
            .await;
        assert!(r[0].is_ok(), "{r:?}");
        let dst = arena.alloc(4 << 20);
        b.lookup_and_pin(std::slice::from_ref(&big))
            .await
            .expect("lookup");
        let r = b
            .load(std::slice::from_ref(&big), &arena.segment, &[dst])
            .await;
        assert!(r[0].is_ok(), "{r:?}");
        assert!(arena.get(dst) == big_data);
        b.close().await;
    });
}
