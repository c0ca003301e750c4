//! Cache analysis: how the hit rate would change with the cache size.
//!
//! - [`mrc`]: [`mrc::Shards`], an online, bounded-memory estimator of the prefix-aware hit rate
//!   at any cache size (SHARDS sampled reuse distances), behind the server's live
//!   `GET /api/hit-rate-curve`.
//! - [`lookup_log`]: the compact binary format of the lookup log (`kvtier serve
//!   --lookup-log-dir`), its encoder and a reader whose errors name the file and offset.
//! - [`replay`]: replays prefix lookups against the real [`crate::l1::L1Manager`] with any
//!   eviction policy (the policy benchmark and `kvtier simulate` share it).
//!
//! Nothing here starts a thread or takes a lock of its own: the server wraps these types.

pub mod lookup_log;
pub mod mrc;
pub mod replay;
