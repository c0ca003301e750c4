//! kvtier storage: the L2 tier below the shared-memory L1.
//!
//! A KV cache outgrows one machine's DRAM; chunks spill to local disk and to a shared
//! Redis/Valkey deployment (which is also how several kvtier nodes share one cache). This crate
//! holds everything between L1 and those stores:
//!
//! - [`backend`]: the async, batch-first, dyn-safe [`L2Backend`](backend::L2Backend) trait. Data
//!   moves directly between the L1 segment and the backend: loads copy into caller-reserved L1
//!   ranges, stores copy out of read-locked ones.
//! - Adapters, configured with LMCache's `--l2-adapter '<JSON>'` syntax ([`config`]):
//!   [`mock`] (in memory, bandwidth-throttled), [`fs`] (crash-safe files with checksummed headers,
//!   index rebuilt from disk at start) and [`resp`] (Redis/Valkey over RESP, pipelined, bounded
//!   concurrency, values split into parts above a size limit) and [`valkey`] (LMCache's
//!   `valkey`: standalone or Redis/Valkey Cluster, TLS, ACL users, per-node status and metrics,
//!   shard outages as misses).
//! - [`store`]: the write-behind [`StoreController`](store::StoreController) (L1 → every adapter).
//! - [`prefetch`]: the [`PrefetchController`](prefetch::PrefetchController) (L2 → temporary L1
//!   objects on lookup, prefix-trimmed, lowest-index adapter wins).
//! - [`tier`]: [`L2Tier`](tier::L2Tier), which owns the async runtime, the adapters and both
//!   controllers, reports them into the status tree and shuts them down in order.
//! - [`instrumented`]: [`Instrumented`](instrumented::Instrumented), the decorator every adapter
//!   is wrapped in (intake checks, op accounting, probe loop, `errors`/`ops` status).
//! - [`health`]: per-adapter health (connectivity, last error, fail-fast gate, self-healing
//!   probe loop with backoff); [`metrics`]: the L2 entries of the observability catalog
//!   (`metric_set!` declarations, latency histograms, `L2Tier`'s `MetricSet`);
//!   [`index`]: the capacity/pin/eviction index the adapters share; [`listener`]: the index's
//!   change notifications ([`L2Listener`](listener::L2Listener), for KV events).
//! - [`task`]: [`BackgroundTask`](task::BackgroundTask), the one helper every background loop
//!   runs under (named, stoppable, reporting `task_alive`, `rounds`, `last_error`).
//! - `testsuite` (feature `testsuite`): the conformance suite every backend passes, plus test
//!   harnesses (a real `redis-server` launcher, shared-memory fixtures).
//!
//! Concurrency rules (all modules): no lock is held across an `.await`; disk I/O runs on the
//! blocking pool behind a per-adapter semaphore; every queue is bounded or counted against an
//! explicit limit with a drop-and-count full policy (controller submissions use a bounded
//! `try_send`); every background task is observable in the
//! status tree and stopped by [`L2Tier::shutdown`](tier::L2Tier::shutdown).

pub mod backend;
pub mod config;
pub mod error;
pub mod fs;
pub mod health;
pub mod index;
pub mod instrumented;
pub mod listener;
pub mod metrics;
pub mod mock;
pub mod prefetch;
pub mod resp;
pub mod store;
pub mod task;
#[cfg(feature = "testsuite")]
pub mod testsuite;
pub mod tier;
pub mod valkey;

pub use backend::{L2Backend, Usage};
pub use config::{AdapterConfig, EvictionSettings, parse_adapter_json};
pub use error::L2Error;
pub use listener::L2Listener;
pub use tier::{L2Tier, L2TierConfig};
