//! fs adapter behaviour beyond the conformance suite: restart survival, corruption handling,
//! crash leftovers, file naming, capacity on restart, watermark eviction.

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::sync::Arc;

use kvtier_core::l1::Allocation;
use kvtier_storage::config::{EvictionPolicyName, EvictionSettings, FsConfig};
use kvtier_storage::fs::FsBackend;
use kvtier_storage::instrumented::Instrumented;
use kvtier_storage::testsuite::{Arena, key, pattern, unique_model};
use kvtier_storage::{L2Backend, L2Error};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn open(rt: &tokio::runtime::Runtime, dir: &Path, capacity: u64) -> Arc<Instrumented<FsBackend>> {
    let mut cfg = FsConfig::new(dir.to_str().expect("utf-8 path"));
    cfg.max_capacity_gb = capacity as f64 / (1u64 << 30) as f64;
    FsBackend::open(cfg, rt.handle()).expect("open fs adapter")
}

#[test]
fn survives_restart_with_same_base_path() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tmp");
    let arena = Arena::new(8 << 20);
    let model = unique_model();
    let keys: Vec<_> = (0..3).map(|i| key(&model, i)).collect();
    let data: Vec<Vec<u8>> = (0..3).map(|i| pattern(i, 100_000 + i as usize)).collect();
    let src: Vec<Allocation> = data.iter().map(|d| arena.put(d)).collect();
    {
        let b = open(&rt, dir.path(), 0);
        rt.block_on(async {
            let r = b.store(&keys, &arena.segment, &src).await;
            assert!(r.iter().all(Result::is_ok), "{r:?}");
            b.close().await;
        });
    }
    // A new process (new adapter) on the same directory finds everything.
    let b = open(&rt, dir.path(), 0);
    assert_eq!(b.rebuild_report().objects, 3);
    assert_eq!(b.usage().object_count, 3);
    assert_eq!(
        b.usage().used_bytes,
        data.iter().map(|d| d.len() as u64).sum::<u64>()
    );
    let dst: Vec<Allocation> = data.iter().map(|d| arena.alloc(d.len() as u64)).collect();
    rt.block_on(async {
        let found = b.lookup_and_pin(&keys).await.expect("lookup");
        assert_eq!(
            found,
            data.iter()
                .map(|d| Some(d.len() as u64))
                .collect::<Vec<_>>()
        );
        let r = b.load(&keys, &arena.segment, &dst).await;
        assert!(r.iter().all(Result::is_ok), "{r:?}");
        b.unpin(&keys).await;
        b.close().await;
    });
    for (d, a) in data.iter().zip(&dst) {
        assert!(arena.get(*a) == *d, "bytes differ after restart");
    }
}

#[test]
fn files_are_named_like_lmcache() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tmp");
    let arena = Arena::new(1 << 20);
    let model = unique_model();
    let k = key(&model, 7);
    let b = open(&rt, dir.path(), 0);
    rt.block_on(async {
        let r = b
            .store(
                std::slice::from_ref(&k),
                &arena.segment,
                &[arena.put(b"abc")],
            )
            .await;
        assert!(r[0].is_ok());
    });
    let expected = format!(
        "{}@0x01000100@0@{}.data",
        model.replace('/', "-SEP-"),
        k.chunk_hash
    );
    assert_eq!(b.object_path(&k), dir.path().join(&expected));
    assert!(dir.path().join(&expected).is_file(), "{expected} missing");
    // Nothing is left in the temp directory.
    let tmp_entries = fs::read_dir(dir.path().join(".kvtier-tmp"))
        .expect("tmp dir")
        .count();
    assert_eq!(tmp_entries, 0);
    rt.block_on(b.close());
}

fn store_one(
    rt: &tokio::runtime::Runtime,
    b: &FsBackend,
    arena: &Arena,
    k: &kvtier_core::key::ObjectKey,
    data: &[u8],
) {
    rt.block_on(async {
        let r = b
            .store(std::slice::from_ref(k), &arena.segment, &[arena.put(data)])
            .await;
        assert!(r[0].is_ok(), "{r:?}");
    });
}

#[test]
fn truncated_or_corrupt_file_is_a_counted_removed_miss() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tmp");
    let arena = Arena::new(8 << 20);
    let model = unique_model();
    let b = open(&rt, dir.path(), 0);
    let (k1, k2, k3) = (key(&model, 1), key(&model, 2), key(&model, 3));
    let good = pattern(3, 50_000);
    for (k, seed) in [(&k1, 1), (&k2, 2), (&k3, 3)] {
        store_one(&rt, &b, &arena, k, &pattern(seed, 50_000));
    }
    // Truncate k1, flip one payload byte of k2.
    let p1 = b.object_path(&k1);
    let len = fs::metadata(&p1).expect("meta").len();
    OpenOptions::new()
        .write(true)
        .open(&p1)
        .expect("open")
        .set_len(len / 2)
        .expect("truncate");
    let p2 = b.object_path(&k2);
    let mut bytes = fs::read(&p2).expect("read");
    let last = bytes.len() - 10;
    bytes[last] ^= 0xff;
    fs::write(&p2, &bytes).expect("write");

    let keys = vec![k1.clone(), k2.clone(), k3.clone()];
    let dst: Vec<Allocation> = (0..3).map(|_| arena.alloc(50_000)).collect();
    // Pre-fill the destinations so a partial copy would show.
    for a in &dst {
        arena
            .segment
            .copy_in(a.offset as usize, &vec![0xEE; 50_000])
            .expect("fill");
    }
    rt.block_on(async {
        let found = b.lookup_and_pin(&keys).await.expect("lookup");
        assert_eq!(found, vec![Some(50_000); 3], "index still lists all three");
        let r = b.load(&keys, &arena.segment, &dst).await;
        assert!(
            matches!(&r[0], Err(L2Error::Corrupt(why)) if why.contains("truncated")),
            "{:?}",
            r[0]
        );
        assert!(
            matches!(&r[1], Err(L2Error::Corrupt(why)) if why.contains("checksum")),
            "{:?}",
            r[1]
        );
        assert!(r[2].is_ok());
        b.unpin(&keys).await;
        // Removed and never served again.
        let found = b.lookup_and_pin(&keys).await.expect("lookup");
        assert_eq!(found, vec![None, None, Some(50_000)]);
        b.unpin(&keys).await;
    });
    assert!(arena.get(dst[2]) == good);
    // Corrupt data was never copied into L1 (the checksum is verified before the copy).
    assert!(arena.get(dst[0]).iter().all(|&x| x == 0xEE));
    assert!(arena.get(dst[1]).iter().all(|&x| x == 0xEE));
    assert!(!p1.exists() && !p2.exists(), "corrupt files are removed");
    let v = b.report_status().to_value();
    assert_eq!(v["ops"]["corrupt_objects_total"], 2, "{v}");
    assert!(
        v["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("corrupt")),
        "{v}"
    );
    assert!(
        v["is_healthy"].as_bool().expect("bool"),
        "one bad file does not make the adapter unhealthy"
    );
    rt.block_on(b.close());
}

#[test]
fn start_up_scan_drops_bad_files_and_temp_leftovers() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tmp");
    let arena = Arena::new(4 << 20);
    let model = unique_model();
    let b = open(&rt, dir.path(), 0);
    for i in 0..3 {
        store_one(&rt, &b, &arena, &key(&model, i), &pattern(i, 10_000));
    }
    let truncated = b.object_path(&key(&model, 0));
    rt.block_on(b.close());
    drop(b);
    // A crash mid-write leaves a temp file; a torn final file would fail the header check.
    fs::write(
        dir.path().join(".kvtier-tmp/0000000000000001-1.tmp"),
        b"partial",
    )
    .expect("tmp");
    let len = fs::metadata(&truncated).expect("meta").len();
    OpenOptions::new()
        .write(true)
        .open(&truncated)
        .expect("open")
        .set_len(len - 1)
        .expect("truncate");
    let garbage = dir.path().join(format!("{}.data", key(&model, 9)));
    fs::write(&garbage, b"not an object").expect("garbage");
    fs::write(dir.path().join("not-a-key.data"), b"x").expect("foreign");

    let b = open(&rt, dir.path(), 0);
    let r = b.rebuild_report().clone();
    assert_eq!(r.objects, 2, "{r:?}");
    assert_eq!(r.corrupt_removed, 2, "{r:?}");
    assert_eq!(r.tmp_removed, 1, "{r:?}");
    assert_eq!(r.foreign_files, 1, "{r:?}");
    assert!(!truncated.exists() && !garbage.exists());
    assert!(
        dir.path().join("not-a-key.data").exists(),
        "foreign files are left alone"
    );
    rt.block_on(b.close());
}

#[test]
fn smaller_capacity_on_restart_evicts_oldest() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tmp");
    let arena = Arena::new(4 << 20);
    let model = unique_model();
    let b = open(&rt, dir.path(), 0);
    for i in 0..4 {
        store_one(&rt, &b, &arena, &key(&model, i), &pattern(i, 10_000));
        // Distinct modification times, so "oldest" is well defined.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    rt.block_on(b.close());
    drop(b);
    let b = open(&rt, dir.path(), 20_000);
    assert_eq!(b.rebuild_report().evicted, 2);
    assert_eq!(b.usage().object_count, 2);
    rt.block_on(async {
        let keys: Vec<_> = (0..4).map(|i| key(&model, i)).collect();
        let found = b.lookup_and_pin(&keys).await.expect("lookup");
        assert_eq!(found, vec![None, None, Some(10_000), Some(10_000)]);
        b.close().await;
    });
}

#[test]
fn watermark_eviction_section() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tmp");
    let arena = Arena::new(4 << 20);
    let model = unique_model();
    let mut cfg = FsConfig::new(dir.path().to_str().expect("utf-8"));
    cfg.max_capacity_gb = 100_000.0 / (1u64 << 30) as f64;
    cfg.eviction = Some(EvictionSettings {
        eviction_policy: EvictionPolicyName::Fifo,
        trigger_watermark: 0.5,
        eviction_ratio: 0.5,
    });
    let b = FsBackend::open(cfg, rt.handle()).expect("open");
    for i in 0..4 {
        store_one(&rt, &b, &arena, &key(&model, i), &pattern(i, 10_000));
    }
    assert_eq!(b.usage().object_count, 4);
    // The fifth store reaches 50 % of the capacity: half the used bytes are evicted, oldest first.
    store_one(&rt, &b, &arena, &key(&model, 4), &pattern(4, 10_000));
    let u = b.usage();
    assert_eq!(u.object_count, 2, "{u:?}");
    let v = b.report_status().to_value();
    assert_eq!(v["ops"]["evicted_objects_total"], 3, "{v}");
    rt.block_on(async {
        let keys: Vec<_> = (0..5).map(|i| key(&model, i)).collect();
        let found = b.lookup_and_pin(&keys).await.expect("lookup");
        assert_eq!(found, vec![None, None, None, Some(10_000), Some(10_000)]);
        b.close().await;
    });
}
