//! [`L2Tier`]: the L2 side of the storage manager.
//!
//! Owns a dedicated tokio runtime (worker and blocking I/O threads named `kvtier-l2`), the
//! adapters in `--l2-adapter` order, the [`StoreController`] and the
//! [`PrefetchController`]. The engine talks to it through plain (non-async) calls that never
//! block: `store().submit`, `prefetch().submit / try_take / cancel`; only `prefetch().wait` blocks,
//! bounded by its timeout.
//!
//! Start: build the runtime, open every adapter (fs scans its directory; resp connects, and an
//! unreachable server only makes the adapter start unhealthy), then spawn both controllers.
//! Shutdown ([`L2Tier::shutdown`], also on drop): stop the prefetch controller (running requests
//! finish, untaken results are released), then the store controller (queued keys are flushed
//! until the deadline), then close the adapters (probe loops stop), then stop the runtime. All of
//! it runs while L1 and the segment are still alive; the caller tears those down afterwards.
//!
//! Metrics: `L2Tier` is a [`MetricSet`] over every L2 counter, gauge and latency histogram; the
//! descriptors are also reachable without a tier ([`crate::metrics::descriptors`]).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use kvtier_core::l1::L1Manager;
use kvtier_core::metrics::{MetricDesc, MetricSet, MetricVisitor};
use kvtier_core::shm::ShmSegment;
use kvtier_core::status::StatusNode;
use parking_lot::Mutex;

use crate::backend::L2Backend;
use crate::config::AdapterConfig;
use crate::error::ConfigError;
use crate::fs::FsBackend;
use crate::listener::{BoundListener, L2Listener};
use crate::metrics::{Labelled, adapter_label};
use crate::mock::MockBackend;
use crate::prefetch::{PrefetchConfig, PrefetchController};
use crate::resp::RespBackend;
use crate::store::{StoreConfig, StoreController};
use crate::valkey::ValkeyBackend;

/// Most adapters (each store takes one L1 read lock per adapter; L1 allows 128 per call).
pub const MAX_ADAPTERS: usize = 32;

/// Settings of the L2 tier.
#[derive(Debug, Clone)]
pub struct L2TierConfig {
    /// Adapters in index order.
    pub adapters: Vec<AdapterConfig>,
    /// Write-behind settings.
    pub store: StoreConfig,
    /// Prefetch settings (`max_in_flight` is `--l2-prefetch-max-in-flight`).
    pub prefetch: PrefetchConfig,
    /// How long shutdown waits for queued and running stores.
    pub flush_timeout: Duration,
    /// Async worker threads.
    pub worker_threads: usize,
    /// Most blocking I/O threads (each adapter also bounds its own concurrency).
    pub max_blocking_threads: usize,
    /// Told of every adapter's index changes (KV events), if set.
    pub listener: Option<Arc<dyn L2Listener>>,
    /// Age past which an operation in flight makes its adapter unhealthy; `None`: the
    /// adapter's request timeout plus 5 s (`valkey`), else
    /// [`DEFAULT_STUCK_AFTER`](crate::instrumented::DEFAULT_STUCK_AFTER).
    pub stuck_after: Option<Duration>,
}

impl Default for L2TierConfig {
    fn default() -> Self {
        Self {
            adapters: Vec::new(),
            store: StoreConfig::default(),
            prefetch: PrefetchConfig::default(),
            flush_timeout: Duration::from_secs(10),
            worker_threads: 2,
            max_blocking_threads: 32,
            listener: None,
            stuck_after: None,
        }
    }
}

/// The L2 tier. See the module docs.
#[derive(Debug)]
pub struct L2Tier {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    adapters: Vec<Arc<dyn L2Backend>>,
    configs: Vec<AdapterConfig>,
    store: StoreController,
    prefetch: PrefetchController,
    flush_timeout: Duration,
    shut_down: AtomicBool,
}

/// Opens one adapter on `rt` (blocking; not from async code).
pub fn open_adapter(
    cfg: &AdapterConfig,
    rt: &tokio::runtime::Runtime,
) -> Result<Arc<dyn L2Backend>, ConfigError> {
    cfg.validate()?;
    Ok(match cfg {
        AdapterConfig::Mock(c) => Arc::new(MockBackend::new(c.clone())),
        AdapterConfig::Fs(c) => {
            let _enter = rt.enter();
            FsBackend::open(c.clone(), rt.handle())?
        }
        AdapterConfig::Resp(c) => rt.block_on(RespBackend::open(c.clone(), rt.handle()))?,
        AdapterConfig::Valkey(c) => rt.block_on(ValkeyBackend::open(c.clone(), rt.handle()))?,
    })
}

/// The stuck threshold of an adapter without an explicit one (see [`L2TierConfig::stuck_after`]).
fn default_stuck_after(cfg: &AdapterConfig) -> Duration {
    match cfg {
        AdapterConfig::Valkey(v) if v.request_timeout.is_finite() && v.request_timeout > 0.0 => {
            Duration::from_secs_f64(v.request_timeout.min(3600.0)) + Duration::from_secs(5)
        }
        _ => crate::instrumented::DEFAULT_STUCK_AFTER,
    }
}

impl L2Tier {
    /// Starts the tier. Blocking (opens adapters); must not be called from async code.
    pub fn start(
        cfg: L2TierConfig,
        l1: Arc<L1Manager>,
        segment: Arc<ShmSegment>,
    ) -> Result<Self, ConfigError> {
        if cfg.adapters.len() > MAX_ADAPTERS {
            return Err(ConfigError::Invalid(format!(
                "at most {MAX_ADAPTERS} --l2-adapter values are supported, got {}",
                cfg.adapters.len()
            )));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.worker_threads.max(1))
            .max_blocking_threads(cfg.max_blocking_threads.max(1))
            .thread_name_fn(|| "kvtier-l2".to_owned())
            .enable_all()
            .build()
            .map_err(ConfigError::Runtime)?;
        let mut adapters = Vec::with_capacity(cfg.adapters.len());
        for (i, a) in cfg.adapters.iter().enumerate() {
            let adapter = open_adapter(a, &runtime).map_err(|e| match e {
                ConfigError::Invalid(m) => ConfigError::Invalid(format!("--l2-adapter #{i}: {m}")),
                other => other,
            })?;
            tracing::info!(index = i, kind = adapter.kind(), config = ?a, "l2 adapter ready");
            adapter.set_stuck_after(cfg.stuck_after.unwrap_or_else(|| default_stuck_after(a)));
            if let Some(l) = &cfg.listener {
                adapter.set_listener(BoundListener::new(i, Arc::clone(l)));
            }
            adapters.push(adapter);
        }
        let handle = runtime.handle().clone();
        let store = StoreController::spawn(
            &handle,
            cfg.store.clone(),
            Arc::clone(&l1),
            Arc::clone(&segment),
            adapters.clone(),
        );
        let prefetch =
            PrefetchController::spawn(&handle, cfg.prefetch.clone(), l1, segment, adapters.clone());
        Ok(Self {
            runtime: Mutex::new(Some(runtime)),
            handle,
            adapters,
            configs: cfg.adapters,
            store,
            prefetch,
            flush_timeout: cfg.flush_timeout,
            shut_down: AtomicBool::new(false),
        })
    }

    /// The write-behind controller.
    pub fn store(&self) -> &StoreController {
        &self.store
    }

    /// The prefetch controller.
    pub fn prefetch(&self) -> &PrefetchController {
        &self.prefetch
    }

    /// The adapters in index order.
    pub fn adapters(&self) -> &[Arc<dyn L2Backend>] {
        &self.adapters
    }

    /// The adapter configurations in index order.
    pub fn configs(&self) -> &[AdapterConfig] {
        &self.configs
    }

    /// The runtime's handle.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Runs `f` on the tier's runtime from a non-async thread (tests, tools).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.handle.block_on(f)
    }

    /// Waits (polling) until the write-behind queue is empty and no store is running, or
    /// `timeout` passes. Returns whether it became idle. For tests and tools.
    pub fn wait_store_idle(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.store.is_idle() {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Status nodes: `(store_controller, prefetch_controller, l2_adapters)`.
    pub fn status_nodes(&self) -> (StatusNode, StatusNode, Vec<StatusNode>) {
        let adapters = self
            .adapters
            .iter()
            .enumerate()
            .map(|(i, a)| a.report_status().field("index", i).field("kind", a.kind()))
            .collect();
        (
            self.store.report_status(),
            self.prefetch.report_status(),
            adapters,
        )
    }

    /// Stops everything in order (see the module docs). Idempotent. Call from a non-async
    /// thread.
    pub fn shutdown(&self) {
        if self.shut_down.swap(true, Relaxed) {
            return;
        }
        let Some(runtime) = self.runtime.lock().take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Inside some runtime: cannot block here. Release what we can without waiting.
            tracing::warn!("l2 tier shut down from async context; not flushing");
            runtime.shutdown_background();
            return;
        }
        let flush = self.flush_timeout;
        runtime.block_on(async {
            self.prefetch.stop(Duration::from_secs(5)).await;
            self.store.stop(flush).await;
            for a in &self.adapters {
                a.close().await;
            }
        });
        runtime.shutdown_timeout(Duration::from_secs(2));
        tracing::info!("l2 tier stopped");
    }
}

impl MetricSet for L2Tier {
    fn descriptors(&self) -> &'static [MetricDesc] {
        crate::metrics::descriptors()
    }

    /// Controller counters unlabelled; per-adapter counters, gauges and latency histograms
    /// with `adapter` = [`adapter_label`] (index and kind, as in `l2_adapters[i]`).
    fn visit(&self, v: &mut dyn MetricVisitor) {
        let labels: Vec<String> = self
            .adapters
            .iter()
            .enumerate()
            .map(|(i, a)| adapter_label(i, a.kind()))
            .collect();
        self.store.visit_metrics(&labels, v);
        self.prefetch.visit_metrics(v);
        for (a, name) in self.adapters.iter().zip(&labels) {
            a.visit_metrics(&mut Labelled::new(v, &[("adapter", name)]));
        }
    }
}

impl Drop for L2Tier {
    fn drop(&mut self) {
        self.shutdown();
    }
}
