//! `fs`: objects as files on a local filesystem, crash-safe and verified, surviving restarts.
//!
//! # Layout
//! `base_path/<ObjectKey>.data`, where `<ObjectKey>` is the key's text form
//! (`<model with / as -SEP->@0x<kv_rank:08x>@<group hex>@<chunk hash hex>[@<salt>]`), the same
//! names as LMCache's fs adapter. In-progress writes live in `base_path/<relative_tmp_dir>/`
//! (same filesystem, so the final rename is atomic); leftovers there are removed at start.
//!
//! # File format (version 1, little-endian)
//! ```text
//! 0   8   magic "KVTIERL2"
//! 8   4   format version (1)
//! 12  4   key length K (bytes of the text form)
//! 16  8   payload length N
//! 24  32  blake3(key text || payload)
//! 56  K   key text (must equal the file name without ".data")
//! 56+K N  payload (the L1 object's bytes)
//! ```
//!
//! # Durability and verification
//! - A store writes the temp file, `fsync`s it, renames it into place and `fsync`s the directory
//!   (once per batch) before it is acknowledged and indexed. A crash at any point leaves either
//!   no file or a complete one under the final name.
//! - A load reads the whole file and checks magic, version, key, both lengths, the file size and
//!   the checksum before copying a single byte into L1. A file that fails is a miss, counted in
//!   `corrupt_objects_total`, logged and deleted: corrupt data is never served.
//! - At start the index is rebuilt by scanning `base_path` (headers and sizes are checked; the
//!   checksum is checked on load), ordered by modification time, then trimmed to the capacity.
//!
//! # Capacity and health
//! With `max_capacity_gb` the adapter evicts unpinned files (LRU unless the `eviction` section
//! says FIFO) to make room, and with an `eviction` section also at the watermark. A write that
//! fails because the device is full (ENOSPC, EDQUOT, EFBIG, EROFS) marks the adapter down:
//! stores then fail fast while lookups and loads keep working, and a probe (writing a file as
//! large as the one that failed) brings it back when space returns.
//!
//! # Concurrency
//! File operations run on tokio's blocking pool, at most `num_workers` at a time (a semaphore).
//! The index mutex is held only for in-memory updates, never across I/O or an `.await`.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

use kvtier_core::key::ObjectKey;
use kvtier_core::l1::Allocation;
use kvtier_core::shm::ShmSegment;
use kvtier_core::status::StatusNode;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::backend::{
    BoxFuture, BufPool, KeyResults, L2Backend, Usage, all_err, copy_in, status_head, usize_len,
};
use crate::config::{EvictionPolicyName, FsConfig, gib_to_bytes};
use crate::error::{ConfigError, L2Error};
use crate::health::{Health, Prober};
use crate::index::{ObjectIndex, StorePlan};
use crate::instrumented::Instrumented;
use crate::metrics::AdapterEvents;

mod format;
mod scan;

pub use format::{
    FORMAT_VERSION, HEADER_FIXED, Header, MAGIC, SUFFIX, encode_header, parse_header,
};

use format::{classify, fsync_dir, read_verified, write_tmp};

pub use scan::RebuildReport;

const PROBE_MAX_BYTES: u64 = 64 << 20;

/// The `fs` adapter.
#[derive(Debug)]
pub struct FsBackend {
    cfg: FsConfig,
    base: PathBuf,
    tmp: PathBuf,
    index: Mutex<ObjectIndex>,
    io: Arc<Semaphore>,
    bufs: Arc<BufPool>,
    health: Health,
    events: AdapterEvents,
    tmp_seq: AtomicU64,
    last_failed_len: AtomicU64,
    rebuild: RebuildReport,
}

impl FsBackend {
    /// Opens (creating if needed) `base_path`, removes leftover temp files, rebuilds the index
    /// from the files present, and starts the health probe on `handle`. Blocking: call it at
    /// start-up, not from async code.
    pub fn open(
        cfg: FsConfig,
        handle: &tokio::runtime::Handle,
    ) -> Result<Arc<Instrumented<Self>>, ConfigError> {
        let open_err = |reason: String| ConfigError::Open { kind: "fs", reason };
        let base = PathBuf::from(&cfg.base_path);
        let tmp = base.join(&cfg.relative_tmp_dir);
        fs::create_dir_all(&tmp)
            .map_err(|e| open_err(format!("creating {}: {e}", tmp.display())))?;
        let capacity = gib_to_bytes(cfg.max_capacity_gb);
        let mut index = ObjectIndex::new(capacity, EvictionPolicyName::LRU, cfg.eviction.as_ref());
        let rebuild = Self::rebuild(&base, &tmp, &mut index)
            .map_err(|e| open_err(format!("scanning {}: {e}", base.display())))?;
        tracing::info!(
            base_path = %base.display(),
            objects = rebuild.objects,
            bytes = rebuild.bytes,
            corrupt_removed = rebuild.corrupt_removed,
            tmp_removed = rebuild.tmp_removed,
            evicted = rebuild.evicted,
            seconds = rebuild.seconds,
            "fs l2 adapter index rebuilt from disk"
        );
        let me = Arc::new(Instrumented::new(Self {
            io: Arc::new(Semaphore::new(cfg.num_workers)),
            bufs: Arc::new(BufPool::new(cfg.num_workers)),
            cfg,
            base,
            tmp,
            index: Mutex::new(index),
            health: Health::new(),
            events: AdapterEvents::default(),
            tmp_seq: AtomicU64::new(0),
            last_failed_len: AtomicU64::new(0),
            rebuild,
        }));
        // No heartbeat: an idle disk does not go away; the probe runs only while down.
        me.start_probe(handle, Duration::from_secs(3600));
        Ok(me)
    }

    /// The start-up scan's report.
    pub fn rebuild_report(&self) -> &RebuildReport {
        &self.rebuild
    }

    /// The file that holds `key`.
    pub fn object_path(&self, key: &ObjectKey) -> PathBuf {
        self.base.join(format!("{key}{SUFFIX}"))
    }

    /// Removes victims' files (already un-indexed) and counts them.
    async fn remove_files(&self, victims: Vec<(ObjectKey, u64)>, evicted: bool) {
        if victims.is_empty() {
            return;
        }
        if evicted {
            self.events.evicted_objects_total.add(victims.len() as u64);
            self.events
                .evicted_bytes_total
                .add(victims.iter().map(|(_, l)| l).sum());
        }
        let paths: Vec<PathBuf> = victims.iter().map(|(k, _)| self.object_path(k)).collect();
        let _permit = self.io.acquire().await;
        let removed = tokio::task::spawn_blocking(move || {
            for p in paths {
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("removing {}: {e}", p.display())),
                }
            }
            Ok(())
        })
        .await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.health.record_error(e),
            Err(e) => self.health.record_error(format!("remove task failed: {e}")),
        }
    }

    /// Handles a file that failed verification: un-index, delete, count, log.
    async fn quarantine(&self, key: &ObjectKey, why: &str) {
        self.events.corrupt_objects_total.inc();
        let path = self.object_path(key);
        tracing::warn!(file = %path.display(), %why, "corrupt l2 object: treating as a miss and removing it");
        self.health
            .record_error(format!("corrupt object {}: {why}", path.display()));
        let removed = self.index.lock().remove(key);
        if let Some(len) = removed {
            self.remove_files(vec![(key.clone(), len)], false).await;
        }
    }

    fn store_error(&self, key: &ObjectKey, len: u64, e: &L2Error) {
        if let L2Error::NoSpace(msg) = e {
            self.last_failed_len.store(len, Relaxed);
            self.health.mark_down(
                self.kind(),
                format!(
                    "disk full or not writable at {}: {msg}",
                    self.base.display()
                ),
            );
        } else {
            self.health.record_error(format!("store {key}: {e}"));
        }
    }

    async fn store_batch(
        &self,
        keys: &[ObjectKey],
        segment: &Arc<ShmSegment>,
        src: &[Allocation],
    ) -> KeyResults {
        let n = keys.len();
        if let Err(e) = self.health.gate() {
            return all_err(n, &e);
        }
        let mut plan = StorePlan::new(
            &self.index,
            keys,
            src,
            &self.events.store_skipped_existing_total,
        );
        self.remove_files(std::mem::take(&mut plan.victims), true)
            .await;

        // Phase 1: copy out of L1 and write + fsync temp files, `num_workers` at a time.
        let mut set: JoinSet<(usize, Result<PathBuf, L2Error>)> = JoinSet::new();
        let jobs = plan.jobs.clone();
        for &i in &jobs {
            let Ok(permit) = Arc::clone(&self.io).acquire_owned().await else {
                plan.set(i, Err(L2Error::Closed));
                continue;
            };
            let seq = self.tmp_seq.fetch_add(1, Relaxed);
            let key_text = keys[i].to_string();
            let tmp = self
                .tmp
                .join(format!("{seq:016x}-{}.tmp", std::process::id()));
            let seg = Arc::clone(segment);
            let a = src[i];
            let bufs = Arc::clone(&self.bufs);
            set.spawn_blocking(move || {
                let _permit = permit;
                let r = usize_len(a.len).and_then(|len| {
                    let mut payload = bufs.take_len(len);
                    let r = usize_len(a.offset)
                        .and_then(|off| {
                            seg.copy_out(off, &mut payload)
                                .map_err(|e| L2Error::Invalid(e.to_string()))
                        })
                        .and_then(|()| {
                            write_tmp(&tmp, &key_text, &payload)
                                .map_err(|e| classify(&e, "writing the temp file"))
                        });
                    bufs.give(payload);
                    r
                });
                (i, r.map(|()| tmp))
            });
        }
        let mut written: Vec<(usize, PathBuf)> = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((i, Ok(tmp))) => written.push((i, tmp)),
                Ok((i, Err(e))) => plan.set(i, Err(e)),
                Err(e) => tracing::error!(error = %e, "fs store task failed"),
            }
        }

        // Phase 2: rename into place and fsync the directory once for the batch.
        if !written.is_empty() {
            let renames: Vec<(usize, PathBuf, PathBuf)> = written
                .into_iter()
                .map(|(i, tmp)| (i, tmp, self.object_path(&keys[i])))
                .collect();
            let base = self.base.clone();
            let _permit = self.io.acquire().await;
            let published = tokio::task::spawn_blocking(move || {
                let mut results: Vec<(usize, PathBuf, Result<(), L2Error>)> = renames
                    .into_iter()
                    .map(|(i, tmp, dst)| {
                        let r = fs::rename(&tmp, &dst).map_err(|e| {
                            let _removed = fs::remove_file(&tmp);
                            classify(&e, "renaming into place")
                        });
                        (i, dst, r)
                    })
                    .collect();
                if let Err(e) = fsync_dir(&base) {
                    let err = classify(&e, "fsyncing the directory");
                    for (_, dst, r) in &mut results {
                        if r.is_ok() {
                            let _removed = fs::remove_file(&*dst);
                            *r = Err(err.clone());
                        }
                    }
                }
                results
            })
            .await;
            match published {
                Ok(results) => {
                    for (i, _, r) in results {
                        plan.set(i, r);
                    }
                }
                Err(e) => tracing::error!(error = %e, "fs publish task failed"),
            }
        }

        // Phase 3: index what is durable, release the other reservations.
        let (results, more_victims) = plan.finish(&self.index, keys, src);
        for &i in &jobs {
            if let Err(e) = &results[i] {
                self.store_error(&keys[i], src[i].len, e);
            }
        }
        self.remove_files(more_victims, true).await;
        results
    }

    async fn load_batch(
        &self,
        keys: &[ObjectKey],
        segment: &Arc<ShmSegment>,
        dst: &[Allocation],
    ) -> KeyResults {
        let n = keys.len();
        let mut out: Vec<Option<Result<(), L2Error>>> = (0..n).map(|_| None).collect();
        let mut set: JoinSet<(usize, Result<(), L2Error>)> = JoinSet::new();
        for (i, (k, a)) in keys.iter().zip(dst).enumerate() {
            let indexed = self.index.lock().get(k);
            let Some(len) = indexed else {
                out[i] = Some(Err(L2Error::NotFound));
                continue;
            };
            if len != a.len {
                out[i] = Some(Err(L2Error::Invalid(format!(
                    "stored object is {len} bytes, L1 range is {}",
                    a.len
                ))));
                continue;
            }
            let Ok(permit) = Arc::clone(&self.io).acquire_owned().await else {
                out[i] = Some(Err(L2Error::Closed));
                continue;
            };
            let path = self.object_path(k);
            let key_text = k.to_string();
            let seg = Arc::clone(segment);
            let a = *a;
            let bufs = Arc::clone(&self.bufs);
            set.spawn_blocking(move || {
                let _permit = permit;
                let mut buf = bufs.take();
                let r = read_verified(&path, &key_text, a.len, &mut buf)
                    .and_then(|off| copy_in(&seg, a.offset, buf.get(off..).unwrap_or_default()));
                bufs.give(buf);
                (i, r)
            });
        }
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((i, r)) => out[i] = Some(r),
                Err(e) => tracing::error!(error = %e, "fs load task failed"),
            }
        }
        let results: KeyResults = out
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(L2Error::Io("load task lost".to_owned()))))
            .collect();
        for (k, r) in keys.iter().zip(&results) {
            match r {
                Err(L2Error::Corrupt(why)) => self.quarantine(k, why).await,
                Err(L2Error::NotFound) => {
                    if self.index.lock().remove(k).is_some() {
                        self.events.vanished_objects_total.inc();
                    }
                }
                Err(e) => self.health.record_error(format!("load {k}: {e}")),
                Ok(()) => {}
            }
        }
        results
    }
}

impl Prober for FsBackend {
    fn probe_name(&self) -> &str {
        "fs"
    }

    fn probe_health(&self) -> &Health {
        &self.health
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let size = self
                .last_failed_len
                .load(Relaxed)
                .clamp(4096, PROBE_MAX_BYTES);
            let path = self.tmp.join(format!("probe-{}.tmp", std::process::id()));
            let base = self.base.clone();
            let r = tokio::task::spawn_blocking(move || -> Result<(), String> {
                if !base.is_dir() {
                    return Err(format!("{} is not a directory", base.display()));
                }
                let payload = vec![0u8; usize::try_from(size).unwrap_or(4096)];
                let r = write_tmp(&path, "probe", &payload)
                    .map_err(|e| format!("disk still not writable ({size}-byte probe write): {e}"));
                let _removed = fs::remove_file(&path);
                r
            })
            .await;
            r.map_err(|e| format!("probe task failed: {e}"))?
        })
    }
}

impl L2Backend for FsBackend {
    fn type_name(&self) -> &'static str {
        "FSL2Adapter"
    }

    fn kind(&self) -> &'static str {
        "fs"
    }

    fn lookup_and_pin<'a>(
        &'a self,
        keys: &'a [ObjectKey],
    ) -> BoxFuture<'a, Result<Vec<Option<u64>>, L2Error>> {
        Box::pin(async move { Ok(self.index.lock().get_and_pin(keys)) })
    }

    fn unpin<'a>(&'a self, keys: &'a [ObjectKey]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.index.lock().unpin_all(keys);
        })
    }

    fn load<'a>(
        &'a self,
        keys: &'a [ObjectKey],
        segment: &'a Arc<ShmSegment>,
        dst: &'a [Allocation],
    ) -> BoxFuture<'a, KeyResults> {
        Box::pin(self.load_batch(keys, segment, dst))
    }

    fn store<'a>(
        &'a self,
        keys: &'a [ObjectKey],
        segment: &'a Arc<ShmSegment>,
        src: &'a [Allocation],
    ) -> BoxFuture<'a, KeyResults> {
        Box::pin(self.store_batch(keys, segment, src))
    }

    fn delete<'a>(&'a self, keys: &'a [ObjectKey]) -> BoxFuture<'a, Result<u64, L2Error>> {
        Box::pin(async move {
            let removed: Vec<(ObjectKey, u64)> = {
                let mut ix = self.index.lock();
                keys.iter()
                    .filter_map(|k| {
                        if ix.is_pinned(k) {
                            return None;
                        }
                        ix.remove(k).map(|len| (k.clone(), len))
                    })
                    .collect()
            };
            let n = removed.len() as u64;
            self.remove_files(removed, false).await;
            Ok(n)
        })
    }

    fn usage(&self) -> Usage {
        self.index.lock().usage()
    }

    fn set_listener(&self, listener: crate::listener::BoundListener) {
        self.index.lock().set_listener(listener);
    }

    fn health_state(&self) -> Option<&Health> {
        Some(&self.health)
    }

    fn events(&self) -> Option<&AdapterEvents> {
        Some(&self.events)
    }

    fn report_status(&self) -> StatusNode {
        let h = self.health.snapshot();
        let reason = format!(
            "fs adapter at {} is unhealthy: {}",
            self.base.display(),
            h.reason.as_deref().unwrap_or("unknown")
        );
        status_head(self, &h)
            .require(h.connected, reason)
            .field("base_path", &self.cfg.base_path)
            .field("relative_tmp_dir", &self.cfg.relative_tmp_dir)
            .field("num_workers", self.cfg.num_workers)
            .field("use_odirect", false)
            .field("eviction", self.cfg.eviction)
            .field("rebuild", &self.rebuild)
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
