//! `mock`: an in-memory L2 adapter with a capacity and simulated bandwidth (tests and demos).
//!
//! Objects live in a map behind one mutex, together with the [`ObjectIndex`] (FIFO eviction that
//! skips pinned keys unless an `eviction` section says otherwise). A store of a key already held
//! is skipped. Each load and store call sleeps `bytes / mock_bandwidth_gb` after its copies, so
//! slow-L2 behaviour can be reproduced without a slow device. Copies happen outside the lock.
//! Intake checks and accounting come from [`Instrumented`], which [`MockBackend::new`] returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use kvtier_core::key::ObjectKey;
use kvtier_core::l1::Allocation;
use kvtier_core::shm::ShmSegment;
use kvtier_core::status::StatusNode;
use parking_lot::Mutex;

use crate::backend::{BoxFuture, KeyResults, L2Backend, Usage, copy_in, copy_out, status_head};
use crate::config::{EvictionPolicyName, MockConfig, gib_to_bytes};
use crate::error::L2Error;
use crate::health::Health;
use crate::index::ObjectIndex;
use crate::instrumented::Instrumented;
use crate::metrics::AdapterEvents;

use kvtier_core::collections::FastMap as Map;

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
    events: AdapterEvents,
    closed: AtomicBool,
}

impl MockBackend {
    /// Builds an empty adapter, wrapped in [`Instrumented`] (what the tier uses).
    pub fn new(cfg: MockConfig) -> Instrumented<Self> {
        Instrumented::new(Self::bare(cfg))
    }

    /// Builds an empty adapter without the instrumentation (for decorator tests).
    pub fn bare(cfg: MockConfig) -> Self {
        let capacity = gib_to_bytes(cfg.max_size_gb).max(1);
        Self {
            bytes_per_sec: cfg.mock_bandwidth_gb * (1u64 << 30) as f64,
            state: Mutex::new(State {
                index: ObjectIndex::new(capacity, EvictionPolicyName::Fifo, cfg.eviction.as_ref()),
                data: Map::default(),
            }),
            cfg,
            health: Health::new(),
            events: AdapterEvents::default(),
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

    fn evict(&self, state: &mut State, victims: &[(ObjectKey, u64)]) {
        for (k, len) in victims {
            state.data.remove(k);
            self.events.evicted_objects_total.inc();
            self.events.evicted_bytes_total.add(*len);
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
        Box::pin(async move { Ok(self.state.lock().index.get_and_pin(keys)) })
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
            let mut bytes = 0u64;
            let mut out = Vec::with_capacity(keys.len());
            for (k, a) in keys.iter().zip(src) {
                if self.state.lock().index.contains(k) {
                    self.events.store_skipped_existing_total.inc();
                    out.push(Ok(()));
                    continue;
                }
                let r = copy_out(segment, *a).and_then(|buf| {
                    let mut st = self.state.lock();
                    if st.index.contains(k) {
                        self.events.store_skipped_existing_total.inc();
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
            out
        })
    }

    fn delete<'a>(&'a self, keys: &'a [ObjectKey]) -> BoxFuture<'a, Result<u64, L2Error>> {
        Box::pin(async move {
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
            Ok(n)
        })
    }

    fn usage(&self) -> Usage {
        self.state.lock().index.usage()
    }

    fn set_listener(&self, listener: crate::listener::BoundListener) {
        self.state.lock().index.set_listener(listener);
    }

    fn health_state(&self) -> Option<&Health> {
        Some(&self.health)
    }

    fn events(&self) -> Option<&AdapterEvents> {
        Some(&self.events)
    }

    fn report_status(&self) -> StatusNode {
        status_head(self, &self.health.snapshot())
            .require(!self.closed.load(Relaxed), "adapter is closed")
            .field("mock_bandwidth_gb", self.cfg.mock_bandwidth_gb)
            .field("eviction", self.cfg.eviction)
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.closed.store(true, Relaxed);
        })
    }
}
