//! A Rust client of the LMCache 0.5.6 multiprocess wire protocol, for kvtier's bench and
//! integration tests. It speaks to kvtier and to `lmcache server` alike.
//!
//! - [`Client`]: one ZeroMQ `DEALER` socket. Requests are `[uid, op, payload...]` with a uid
//!   counter starting at 0; any number may be in flight ([`Client::submit`] and the `submit_*`
//!   methods return a [`Pending`] handle, [`Client::wait`] collects it). Replies are matched by
//!   uid, so they may arrive in any order. Every wait has a deadline and returns
//!   [`ClientError::Timeout`] instead of hanging; a reply that arrives after its request timed
//!   out is discarded and counted.
//! - [`codec`]: this crate's own msgpack encoding of the request types ([`CacheKey`],
//!   [`RegisterPayload`]) and decoding of the replies, written against the reference
//!   (msgspec's encoding of LMCache's dataclasses: maps of all fields in declaration order;
//!   replies decoded leniently: unknown keys ignored, key order free). It deliberately shares
//!   no code with `kvtier-proto`'s server-side decoders (only the op-id table), so a bug in
//!   one is caught by the other.
//! - [`ShmPool`]: the engine-driven shared-memory pool mapped from `/dev/shm/<shm_name>`,
//!   with bounds-checked copies.
//!
//! Engine-driven data path (what [`Client`] plus [`ShmPool`] do for a store and a retrieve):
//! `register_engine_driven` → map the pool → `prepare_store` (slots) → copy into the slots →
//! `commit_store`; `lookup` → poll `query_prefetch_status` until it is an int →
//! `prepare_retrieve` → copy out → `commit_retrieve` → `end_session`.

pub mod client;
pub mod codec;
pub mod error;
pub mod shm;

pub use client::{Client, Pending};
pub use codec::{
    CacheKey, ConfigValue, PrepareRetrieve, PrepareStore, RegisterPayload, Registration, Slot,
    Value,
};
pub use error::{ClientError, ShmError};
pub use kvtier_proto::Op;
pub use shm::ShmPool;
