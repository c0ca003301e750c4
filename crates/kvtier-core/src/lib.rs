//! kvtier core: everything that decides *what* is cached, with no network and no async runtime.
//!
//! Components:
//! - [`analysis`]: the hit-rate curve estimator (SHARDS), the lookup-log format and the policy replay.
//! - [`collections`]: the randomly seeded foldhash map and set used for well-mixed keys.
//! - [`hash`]: LMCache-compatible token hashing (blake3 prefix chain) and an incremental per-request cache.
//! - [`key`]: [`key::ObjectKey`], kv_rank packing and the per-rank fan-out.
//! - [`shm`]: the named POSIX shared-memory segment that backs L1 and that engines map.
//! - [`l1`]: the L1 manager (object state machine, allocator, TTL locks) and eviction policies.
//! - [`metrics`]: the observability catalog (counters, gauges, the latency histogram).
//! - [`inflight`]: start times of operations in flight (the oldest age turns stuck work unhealthy).
//! - [`periodic`]: the one runner for background threads (periodic rounds or a one-shot task,
//!   prompt stop, panic capture, liveness in the status tree).
//! - [`status`]: the composable status tree every component reports into.

pub mod analysis;
pub mod collections;
pub mod hash;
pub mod inflight;
pub mod key;
pub mod l1;
pub mod metrics;
pub mod periodic;
pub mod shm;
pub mod status;
