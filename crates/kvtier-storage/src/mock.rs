//! `mock`: an in-memory L2 adapter with a capacity and simulated bandwidth (tests and demos).
//!
//! Objects live in a map behind one mutex, together with the [`ObjectIndex`] (FIFO eviction that
//! skips pinned keys unless an `eviction` section says otherwise). A store of a key already held
//! is skipped. Each load and store call sleeps `bytes / mock_bandwidth_gb` after its copies, so
//! slow-L2 behaviour can be reproduced without a slow device. Copies happen outside the lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use kvtier_core::key::ObjectKey;
use kvtier_core::l1::Allocation;
use kvtier_core::shm::ShmSegment;
use kvtier_core::status::StatusNode;
use parking_lot::Mutex;

use crate::backend::{
    BoxFuture, KeyResults, L2Backend, Usage, all_err, check_batch, copy_in, copy_out,
};
use crate::config::{EvictionPolicyName, MockConfig, gib_to_bytes};
use crate::error::L2Error;
use crate::health::{Health, HealthSnapshot};
use crate::index::ObjectIndex;
use crate::metrics::AdapterStats;

type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug)]
struct State {
    index: ObjectIndex,
    data: Map<ObjectKey, Arc<[u8]>>,
}

/// The `mock` adapter.
#[derive(Debug)]
pub struct MockBackend {
    cfg: MockConfig,
    state: Mutex<State>,
    bytes_per_sec: f64,
    health: Health,
    stats: AdapterStats,
    closed: AtomicBool,
}

impl MockBackend {
    /// Builds an empty adapter.
    pub fn new(cfg: MockConfig) -> Self {
        let capacity = gib_to_bytes(cfg.max_size_gb).max(1);
        Self {
            bytes_per_sec: cfg.mock_bandwidth_gb * (1u64 << 30) as f64,
            state: Mutex::new(State {
                index: ObjectIndex::new(capacity, EvictionPolicyName::Fifo, cfg.eviction.as_ref()),
                data: Map::default(),
            }),
            cfg,
            health: Health::new(),
            stats: AdapterStats::default(),
            closed: AtomicBool::new(false),
        }
    }

    async fn throttle(&self, bytes: u64) {
        if bytes == 0 || self.bytes_per_sec <= 0.0 {
            return;
        }
        let secs = bytes as f64 / self.bytes_per_sec;
        if let Ok(d) = Duration::try_from_secs_f64(secs) {
            tokio::time::sleep(d).await;
        }
    }

    fn check_open(&self) -> Result<(), L2Error> {
        if self.closed.load(Relaxed) {
            Err(L2Error::Closed)
        } else {
            Ok(())
        }
    }

    fn evict(&self, state: &mut State, victims: &[(ObjectKey, u64)]) {
        for (k, len) in victims {
            state.data.remove(k);
            self.stats.evicted_objects.fetch_add(1, Relaxed);
            self.stats.evicted_bytes.fetch_add(*len, Relaxed);
        }
    }
}

impl L2Backend for MockBackend {
    fn type_name(&self) -> &'static str {
        "MockL2Adapter"
    }

    fn kind(&self) -> &'static str {
        "mock"
    }

    fn lookup_and_pin<'a>(
        &'a self,
        keys: &'a [ObjectKey],
    ) -> BoxFuture<'a, Result<Vec<Option<u64>>, L2Error>> {
        Box::pin(async move {
            self.check_open()?;
            let t = Instant::now();
            let out = self.state.lock().index.get_and_pin(keys);
            self.stats.record_lookup(keys.len(), &out, t.elapsed());
            Ok(out)
        })
    }

    fn unpin<'a>(&'a self, keys: &'a [ObjectKey]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.state.lock().index.unpin_all(keys);
        })
    }

    fn load<'a>(
        &'a self,
        keys: &'a [ObjectKey],
        segment: &'a Arc<ShmSegment>,
        dst: &'a [Allocation],
    ) -> BoxFuture<'a, KeyResults> {
        Box::pin(async move {
            let t = Instant::now();
            if let Err(e) = self
                .check_open()
                .and_then(|()| check_batch(keys, segment, dst))
            {
                self.stats.load.record(0, 0, keys.len() as u64, t.elapsed());
                return all_err(keys.len(), &e);
            }
            let mut bytes = 0u64;
            let mut out = Vec::with_capacity(keys.len());
            for (k, a) in keys.iter().zip(dst) {
                let obj = self.state.lock().data.get(k).cloned();
                let r = match obj {
                    None => Err(L2Error::NotFound),
                    Some(v) if v.len() as u64 != a.len => Err(L2Error::Invalid(format!(
                        "stored object is {} bytes, L1 range is {}",
                        v.len(),
                        a.len
                    ))),
                    Some(v) => copy_in(segment, a.offset, &v).map(|()| bytes += a.len),
                };
                out.push(r);
            }
            self.throttle(bytes).await;
            let ok = out.iter().filter(|r| r.is_ok()).count() as u64;
            self.stats
                .load
                .record(ok, bytes, keys.len() as u64 - ok, t.elapsed());
            out
        })
    }

    fn store<'a>(
        &'a self,
        keys: &'a [ObjectKey],
        segment: &'a Arc<ShmSegment>,
        src: &'a [Allocation],
    ) -> BoxFuture<'a, KeyResults> {
        Box::pin(async move {
            let t = Instant::now();
            if let Err(e) = self
                .check_open()
                .and_then(|()| check_batch(keys, segment, src))
            {
                self.stats
                    .store
                    .record(0, 0, keys.len() as u64, t.elapsed());
                return all_err(keys.len(), &e);
            }
            let mut bytes = 0u64;
            let mut out = Vec::with_capacity(keys.len());
            for (k, a) in keys.iter().zip(src) {
                if self.state.lock().index.contains(k) {
                    self.stats.skipped_existing.fetch_add(1, Relaxed);
                    out.push(Ok(()));
                    continue;
                }
                let r = copy_out(segment, *a).and_then(|buf| {
                    let mut st = self.state.lock();
                    if st.index.contains(k) {
                        self.stats.skipped_existing.fetch_add(1, Relaxed);
                        return Ok(());
                    }
                    let victims = st
                        .index
                        .reserve(a.len)
                        .map_err(|needed| L2Error::CapacityFull { needed })?;
                    self.evict(&mut st, &victims);
                    st.index.finish_reservation(a.len, Some(k.clone()));
                    st.data.insert(k.clone(), Arc::from(buf));
                    let more = st.index.watermark_victims();
                    self.evict(&mut st, &more);
                    bytes += a.len;
                    Ok(())
                });
                if let Err(e) = &r {
                    self.health.record_error(format!("store {k}: {e}"));
                }
                out.push(r);
            }
            self.throttle(bytes).await;
            let failed = out.iter().filter(|r| r.is_err()).count() as u64;
            let written = keys.len() as u64 - failed;
            self.stats.store.record(written, bytes, failed, t.elapsed());
            out
        })
    }

    fn delete<'a>(&'a self, keys: &'a [ObjectKey]) -> BoxFuture<'a, Result<u64, L2Error>> {
        Box::pin(async move {
            self.check_open()?;
            let t = Instant::now();
            let mut n = 0;
            {
                let mut st = self.state.lock();
                for k in keys {
                    if st.index.is_pinned(k) {
                        continue;
                    }
                    if st.index.remove(k).is_some() {
                        st.data.remove(k);
                        n += 1;
                    }
                }
            }
            self.stats.delete.record(n, 0, 0, t.elapsed());
            Ok(n)
        })
    }

    fn usage(&self) -> Usage {
        let st = self.state.lock();
        Usage {
            used_bytes: st.index.used(),
            capacity_bytes: st.index.capacity(),
            object_count: st.index.len(),
            pinned_count: st.index.pinned_count(),
        }
    }

    fn health(&self) -> HealthSnapshot {
        self.health.snapshot()
    }

    fn report_status(&self) -> StatusNode {
        let u = self.usage();
        let h = self.health.snapshot();
        StatusNode::healthy()
            .require(!self.closed.load(Relaxed), "adapter is closed")
            .field("type", self.type_name())
            .field("stored_object_count", u.object_count)
            .field("locked_key_count", u.pinned_count)
            .field("current_size_bytes", u.used_bytes)
            .field("max_capacity_bytes", u.capacity_bytes)
            .field("connected", h.connected)
            .field("last_error", h.last_error)
            .field("mock_bandwidth_gb", self.cfg.mock_bandwidth_gb)
            .field("eviction", self.cfg.eviction)
            .field("errors", self.health.counters_json())
            .field("ops", self.stats.to_json())
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.closed.store(true, Relaxed);
        })
    }
}
