//! The L1 tier: an object table over one shared-memory pool.
//!
//! - [`alloc`]: best-fit offset allocator over the pool.
//! - [`eviction`]: the eviction-policy trait and its LRU / ARC / S3-FIFO / IsolatedLRU / noop
//!   implementations.
//! - `namespace`: interns the `(model, kv_rank, group, salt)` part of the keys the entries hold.
//! - [`tenants`]: per-`cache_salt` accounting, quotas and per-tenant recency lists.
//! - [`manager`]: the object state machine, TTL locks, synchronous and background eviction.
//! - [`listener`]: observers of publishes and removals (KV events).
//! - [`controller`]: the background thread that expires TTLs and evicts above the watermark.

pub mod alloc;
pub mod controller;
pub mod eviction;
mod ghost;
mod index;
mod list;
pub mod listener;
pub mod manager;
mod namespace;
pub mod pressure;
mod ring;
pub mod tenants;

pub use eviction::{EvictionPolicy, EvictionPolicyKind};
pub use listener::{EvictedFor, L1Listener, Listeners, RemovalCause};
pub use manager::{
    Allocation, ClearOutcome, Clock, EvictionConfig, EvictionOutcome, L1Config, L1Counters,
    L1Error, L1Manager, ReadLease, WriteTicket,
};
pub use tenants::{DEFAULT_SALT_NAME, Directory, TenantCounters, TenantStats, salt_name};
