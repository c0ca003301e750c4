//! Typed decoding of request payload frames.
//!
//! [`decode_request`] turns the payload frames of one request into a [`Request`]. It follows
//! msgspec's decode rules for the declared parameter types of LMCache 0.5.6:
//! - Structs and dataclasses are msgpack **maps** keyed by field name. Unknown keys are ignored
//!   whatever their type, key order is irrelevant, a duplicate key is not an error (the last
//!   occurrence wins), a missing required field is an error naming it, and a missing defaulted
//!   field takes its default. An array is never accepted in place of a struct.
//! - Top-level parameters declared exactly `int` or `bool` are decoded untyped by the reference
//!   server and then coerced with `int()` / `bool()`; here an `int` frame accepts any msgpack int
//!   and a `bool` frame accepts a bool or an int (nonzero is true). `int | None` (ping) accepts
//!   an int or nil. Every other parameter, and every field inside a struct, is strict: a bool
//!   is not an int, bin is not str, str is not bin.
//! - Every payload frame is exactly one msgpack document; trailing bytes are an error.
//!
//! Invariants:
//! - The number of payload frames is checked first against [`Op::arity`].
//! - Decoding streams over the borrowed frames and allocates only what the decoded values own
//!   (`token_ids` go straight into a `Vec<u32>`, or come from a [`TokenArrays`] cache of
//!   recently decoded arrays when the caller passes one: `token_ids.rs`); preallocation is capped by the frame size.
//! - Range checks are done here, once, on client values: token ids fit in `u32`,
//!   `1 <= world_size <= 255`, `worker_id < world_size`, `start <= end`,
//!   `cache_salt` has at most 128 chars and none of `@ / \ NUL`. Semantic checks that need
//!   server state (chunk alignment, registered instances) belong to the server.
//! - Operations kvtier does not implement yet (q-cache, CacheBlend, P2P, KV-event streams,
//!   `server_module_call`, `cb_reorder_plan`) are only arity-checked and returned as
//!   [`Request::Unsupported`] with copies of their raw frames.
//!
//! This file holds [`Request`], the frame-level helpers and [`decode_request`]; `params.rs` the
//! parameter structs ([`IpcKey`], [`RegisterKvCache`], ...) and their map decoders.

use rmp::Marker;

use crate::error::ProtoError;
use crate::op::Op;
use crate::reader::{Path, Reader, decode_error, marker_type_name};

mod params;
mod token_ids;

pub use params::*;
pub use token_ids::{MIN_CACHED_LEN, TokenArrayStats, TokenArrays, TokenIds};

use params::layout_hints;

/// Largest `world_size` accepted (it is packed into 8 bits of `kv_rank`).
pub const MAX_WORLD_SIZE: u32 = 255;

/// Longest `cache_salt`, in Unicode scalar values (Python `len`).
pub const MAX_CACHE_SALT_CHARS: usize = 128;

/// Characters a `cache_salt` must not contain (they delimit L2 object names).
pub const CACHE_SALT_FORBIDDEN: [char; 4] = ['@', '/', '\\', '\0'];

/// A decoded request, one variant per implemented operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `register_kv_cache`.
    RegisterKvCache(RegisterKvCache),
    /// `unregister_kv_cache`.
    UnregisterKvCache {
        /// Engine instance id.
        instance_id: i64,
    },
    /// `store`: copy KV blocks from the engine into the cache.
    Store {
        /// Key (worker_id set).
        key: IpcKey,
        /// Engine instance id.
        instance_id: i64,
        /// Engine block ids per KV group.
        block_ids: Vec<Vec<u64>>,
        /// Opaque event handle, echoed in the reply.
        event_ipc_handle: Vec<u8>,
    },
    /// `retrieve`: copy KV blocks from the cache into the engine.
    Retrieve {
        /// Key (worker_id set).
        key: IpcKey,
        /// Engine instance id.
        instance_id: i64,
        /// Engine block ids per KV group.
        block_ids: Vec<Vec<u64>>,
        /// Opaque event handle, echoed in the reply.
        event_ipc_handle: Vec<u8>,
        /// Leading tokens the engine already has.
        skip_first_n_tokens: u64,
    },
    /// `lookup`.
    Lookup {
        /// Key (worker_id normally nil).
        key: IpcKey,
        /// Ignored by 0.5.6 (`num_kv_readers` is used instead).
        tp_size: i64,
    },
    /// `query_prefetch_status`.
    QueryPrefetchStatus {
        /// The lookup's request id.
        request_id: String,
    },
    /// `wait_prefetch_status`.
    WaitPrefetchStatus {
        /// The lookup's request id.
        request_id: String,
        /// Seconds to wait, as sent (not validated).
        timeout: f64,
    },
    /// `free_lookup_locks`.
    FreeLookupLocks {
        /// Key; start/end select the chunks.
        key: IpcKey,
        /// Ignored by 0.5.6.
        tp_size: i64,
    },
    /// `end_session`.
    EndSession {
        /// The session's request id.
        request_id: String,
    },
    /// `register_kv_cache_engine_driven_context`.
    RegisterKvCacheEngineDrivenContext(RegisterEngineDrivenContext),
    /// `unregister_kv_cache_engine_driven_context`.
    UnregisterKvCacheEngineDrivenContext {
        /// Engine instance id.
        instance_id: i64,
    },
    /// `prepare_store`.
    PrepareStore {
        /// Key (worker_id set).
        key: IpcKey,
        /// Engine instance id.
        instance_id: i64,
    },
    /// `commit_store`.
    CommitStore {
        /// Key (worker_id set).
        key: IpcKey,
        /// Engine instance id.
        instance_id: i64,
        /// Empty in SHM mode; pickled tensors in pickle mode.
        data: Vec<u8>,
    },
    /// `prepare_retrieve`.
    PrepareRetrieve {
        /// Key (worker_id set).
        key: IpcKey,
        /// Engine instance id.
        instance_id: i64,
    },
    /// `commit_retrieve`.
    CommitRetrieve {
        /// Key (worker_id set).
        key: IpcKey,
        /// Engine instance id.
        instance_id: i64,
    },
    /// `clear`.
    Clear {
        /// Force clearing even pinned objects.
        force: bool,
    },
    /// `get_chunk_size`.
    GetChunkSize,
    /// `ping`.
    Ping {
        /// Engine instance id, or nil.
        instance_id: Option<i64>,
    },
    /// `report_block_allocation`.
    ReportBlockAllocation {
        /// Engine instance id.
        instance_id: i64,
        /// Model name.
        model_name: String,
        /// Allocation records.
        records: Vec<BlockAllocationRecord>,
    },
    /// `noop`.
    Noop,
    /// `get_experimental`.
    GetExperimental,
    /// `subscribe_kv_events`: a stream of KV-event batches for one worker instance.
    SubscribeKvEvents {
        /// The subscribing worker (one subscription per instance).
        instance_id: i64,
        /// Only records of this model are sent.
        model_name: String,
        /// Resume after this sequence number (0 = from the start of the log).
        cursor: i64,
        /// Most records per batch (LMCache accepts 1..=1024).
        max_events: i64,
    },
    /// An operation kvtier does not decode yet; only its arity was checked.
    Unsupported {
        /// The operation.
        op: Op,
        /// Copies of its payload frames, in order.
        payloads: Vec<Vec<u8>>,
    },
}

/// The event handle a CPU client sends with `store`/`retrieve` when it has none of its own, and
/// expects back.
pub const STUB_IPC_HANDLE: &[u8] = b"stub_ipc_handle";

impl Request {
    /// For `store`/`retrieve`: the event handle the reply must echo, success or failure (the
    /// client's own, or [`STUB_IPC_HANDLE`] when it sent an empty one). `None` for other ops.
    #[must_use]
    pub fn reply_event_handle(&self) -> Option<&[u8]> {
        match self {
            Self::Store {
                event_ipc_handle, ..
            }
            | Self::Retrieve {
                event_ipc_handle, ..
            } => Some(if event_ipc_handle.is_empty() {
                STUB_IPC_HANDLE
            } else {
                event_ipc_handle
            }),
            _ => None,
        }
    }
}

impl Request {
    /// The operation this request belongs to.
    #[must_use]
    pub fn op(&self) -> Op {
        match self {
            Self::RegisterKvCache(_) => Op::RegisterKvCache,
            Self::UnregisterKvCache { .. } => Op::UnregisterKvCache,
            Self::Store { .. } => Op::Store,
            Self::Retrieve { .. } => Op::Retrieve,
            Self::Lookup { .. } => Op::Lookup,
            Self::QueryPrefetchStatus { .. } => Op::QueryPrefetchStatus,
            Self::WaitPrefetchStatus { .. } => Op::WaitPrefetchStatus,
            Self::FreeLookupLocks { .. } => Op::FreeLookupLocks,
            Self::EndSession { .. } => Op::EndSession,
            Self::RegisterKvCacheEngineDrivenContext(_) => Op::RegisterKvCacheEngineDrivenContext,
            Self::UnregisterKvCacheEngineDrivenContext { .. } => {
                Op::UnregisterKvCacheEngineDrivenContext
            }
            Self::PrepareStore { .. } => Op::PrepareStore,
            Self::CommitStore { .. } => Op::CommitStore,
            Self::PrepareRetrieve { .. } => Op::PrepareRetrieve,
            Self::CommitRetrieve { .. } => Op::CommitRetrieve,
            Self::Clear { .. } => Op::Clear,
            Self::GetChunkSize => Op::GetChunkSize,
            Self::Ping { .. } => Op::Ping,
            Self::ReportBlockAllocation { .. } => Op::ReportBlockAllocation,
            Self::Noop => Op::Noop,
            Self::GetExperimental => Op::GetExperimental,
            Self::SubscribeKvEvents { .. } => Op::SubscribeKvEvents,
            Self::Unsupported { op, .. } => *op,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn missing(path: &Path<'_>, field: &'static str) -> ProtoError {
    decode_error(&path.field(field), "missing required field")
}

fn required<T>(value: Option<T>, path: &Path<'_>, field: &'static str) -> Result<T, ProtoError> {
    value.ok_or_else(|| missing(path, field))
}

fn owned_str(r: &mut Reader<'_>, path: &Path<'_>) -> Result<String, ProtoError> {
    r.read_str(path).map(str::to_owned)
}

fn world_size(r: &mut Reader<'_>, path: &Path<'_>) -> Result<u32, ProtoError> {
    let ws = r.read_u32(path)?;
    if (1..=MAX_WORLD_SIZE).contains(&ws) {
        Ok(ws)
    } else {
        Err(decode_error(
            path,
            format!("world_size must be in 1..={MAX_WORLD_SIZE}, got {ws}"),
        ))
    }
}

fn block_id_groups(r: &mut Reader<'_>, path: &Path<'_>) -> Result<Vec<Vec<u64>>, ProtoError> {
    r.read_array(path, |r, p| r.read_u64_array(p))
}

/// Decodes one whole frame as a single msgpack document named `name`.
fn frame<'a, T>(
    bytes: &'a [u8],
    name: &'static str,
    read: impl FnOnce(&mut Reader<'a>, &Path<'_>) -> Result<T, ProtoError>,
) -> Result<T, ProtoError> {
    let path = Path::Root(name);
    let mut r = Reader::new(bytes);
    let value = read(&mut r, &path)?;
    r.finish(&path)?;
    Ok(value)
}

/// A top-level `int` parameter (coerced leniently by the reference server: any msgpack int).
fn int_frame(bytes: &[u8], name: &'static str) -> Result<i64, ProtoError> {
    frame(bytes, name, |r, p| r.read_i64(p))
}

/// A top-level `int` parameter that must be non-negative.
fn uint_frame(bytes: &[u8], name: &'static str) -> Result<u64, ProtoError> {
    frame(bytes, name, |r, p| r.read_u64(p))
}

fn key_frame(bytes: &[u8], arrays: Option<&TokenArrays>) -> Result<IpcKey, ProtoError> {
    frame(bytes, "key", |r, p| IpcKey::read_with(r, p, arrays))
}

fn str_frame(bytes: &[u8], name: &'static str) -> Result<String, ProtoError> {
    frame(bytes, name, owned_str)
}

fn bin_frame(bytes: &[u8], name: &'static str) -> Result<Vec<u8>, ProtoError> {
    frame(bytes, name, |r, p| r.read_bin(p).map(<[u8]>::to_vec))
}

// ---------------------------------------------------------------------------------------------
// Entry point

/// Decodes the payload frames of one request for `op`.
///
/// `end_session` accepts extra trailing frames, which are ignored: newer LMCache clients send
/// `end_session(request_id, end_info)`, and ending the session is what they ask for. (LMCache
/// 0.5.6 itself answers nothing to a request with a wrong frame count.)
///
/// # Errors
/// [`ProtoError::Arity`] if `payloads.len() != op.arity()` (fewer for `end_session`);
/// otherwise the first decode, range or trailing-bytes error, with the parameter name as the
/// root of its path.
pub fn decode_request(op: Op, payloads: &[&[u8]]) -> Result<Request, ProtoError> {
    decode_request_with(op, payloads, None)
}

/// Like [`decode_request`], taking keys' token ids from `arrays` when it holds them (and
/// caching the ones it decodes); the result is the same either way.
///
/// # Errors
/// As [`decode_request`].
pub fn decode_request_with(
    op: Op,
    payloads: &[&[u8]],
    arrays: Option<&TokenArrays>,
) -> Result<Request, ProtoError> {
    let arity_error = || ProtoError::Arity {
        op,
        expected: op.arity(),
        got: payloads.len(),
    };
    let payloads = match payloads.get(..op.arity()) {
        Some(declared) if op == Op::EndSession => declared,
        _ => payloads,
    };
    if payloads.len() != op.arity() {
        return Err(arity_error());
    }
    let request = match (op, payloads) {
        (Op::RegisterKvCache, &[iid, kv, model, ws, engine, hints, groups]) => {
            Request::RegisterKvCache(RegisterKvCache {
                instance_id: int_frame(iid, "instance_id")?,
                kv_cache: frame(kv, "kv_cache", |r, p| {
                    r.read_array(p, DeviceIpcWrapper::read)
                })?,
                model_name: str_frame(model, "model_name")?,
                world_size: frame(ws, "world_size", world_size)?,
                engine_type: str_frame(engine, "engine_type")?,
                layout_hints: frame(hints, "layout_hints", layout_hints)?,
                engine_group_infos: frame(groups, "engine_group_infos", |r, p| {
                    r.read_array(p, EngineGroupInfo::read)
                })?,
            })
        }
        (Op::UnregisterKvCache, &[iid]) => Request::UnregisterKvCache {
            instance_id: int_frame(iid, "instance_id")?,
        },
        (Op::Store, &[key, iid, blocks, handle]) => Request::Store {
            key: key_frame(key, arrays)?,
            instance_id: int_frame(iid, "instance_id")?,
            block_ids: frame(blocks, "block_ids", block_id_groups)?,
            event_ipc_handle: bin_frame(handle, "event_ipc_handle")?,
        },
        (Op::Retrieve, &[key, iid, blocks, handle, skip]) => Request::Retrieve {
            key: key_frame(key, arrays)?,
            instance_id: int_frame(iid, "instance_id")?,
            block_ids: frame(blocks, "block_ids", block_id_groups)?,
            event_ipc_handle: bin_frame(handle, "event_ipc_handle")?,
            skip_first_n_tokens: uint_frame(skip, "skip_first_n_tokens")?,
        },
        (Op::Lookup, &[key, tp]) => Request::Lookup {
            key: key_frame(key, arrays)?,
            tp_size: int_frame(tp, "tp_size")?,
        },
        (Op::QueryPrefetchStatus, &[rid]) => Request::QueryPrefetchStatus {
            request_id: str_frame(rid, "request_id")?,
        },
        (Op::WaitPrefetchStatus, &[rid, timeout]) => Request::WaitPrefetchStatus {
            request_id: str_frame(rid, "request_id")?,
            timeout: frame(timeout, "timeout", Reader::read_f64)?,
        },
        (Op::FreeLookupLocks, &[key, tp]) => Request::FreeLookupLocks {
            key: key_frame(key, arrays)?,
            tp_size: int_frame(tp, "tp_size")?,
        },
        (Op::EndSession, &[rid]) => Request::EndSession {
            request_id: str_frame(rid, "request_id")?,
        },
        (Op::RegisterKvCacheEngineDrivenContext, &[payload]) => {
            Request::RegisterKvCacheEngineDrivenContext(frame(
                payload,
                "payload",
                RegisterEngineDrivenContext::read,
            )?)
        }
        (Op::UnregisterKvCacheEngineDrivenContext, &[iid]) => {
            Request::UnregisterKvCacheEngineDrivenContext {
                instance_id: int_frame(iid, "instance_id")?,
            }
        }
        (Op::PrepareStore, &[key, iid]) => Request::PrepareStore {
            key: key_frame(key, arrays)?,
            instance_id: int_frame(iid, "instance_id")?,
        },
        (Op::CommitStore, &[key, iid, data]) => Request::CommitStore {
            key: key_frame(key, arrays)?,
            instance_id: int_frame(iid, "instance_id")?,
            data: bin_frame(data, "data")?,
        },
        (Op::PrepareRetrieve, &[key, iid]) => Request::PrepareRetrieve {
            key: key_frame(key, arrays)?,
            instance_id: int_frame(iid, "instance_id")?,
        },
        (Op::CommitRetrieve, &[key, iid]) => Request::CommitRetrieve {
            key: key_frame(key, arrays)?,
            instance_id: int_frame(iid, "instance_id")?,
        },
        (Op::Clear, &[force]) => Request::Clear {
            force: frame(force, "force", Reader::read_bool_or_int)?,
        },
        (Op::GetChunkSize, &[]) => Request::GetChunkSize,
        (Op::SubscribeKvEvents, &[iid, model, cursor, max_events]) => Request::SubscribeKvEvents {
            instance_id: int_frame(iid, "instance_id")?,
            model_name: str_frame(model, "model_name")?,
            cursor: int_frame(cursor, "cursor")?,
            max_events: int_frame(max_events, "max_events")?,
        },
        (Op::Ping, &[iid]) => Request::Ping {
            instance_id: frame(iid, "instance_id", |r, p| {
                r.read_nil_or(p, Reader::read_i64)
            })?,
        },
        (Op::ReportBlockAllocation, &[iid, model, records]) => Request::ReportBlockAllocation {
            instance_id: int_frame(iid, "instance_id")?,
            model_name: str_frame(model, "model_name")?,
            records: frame(records, "records", |r, p| {
                r.read_array(p, BlockAllocationRecord::read)
            })?,
        },
        (Op::Noop, &[]) => Request::Noop,
        (Op::GetExperimental, &[]) => Request::GetExperimental,
        (
            Op::RegisterQCache
            | Op::UnregisterQCache
            | Op::StoreQ
            | Op::CbRegisterRope
            | Op::CbUnregisterRope
            | Op::CbRetrievePreComputed
            | Op::CbUnifiedLookup
            | Op::P2pLookupAndLock
            | Op::P2pQueryLookupResults
            | Op::P2pUnlockObjects
            | Op::CbProtocolHandshake
            | Op::CbReorderPlan
            | Op::ServerModuleCall,
            frames,
        ) => Request::Unsupported {
            op,
            payloads: frames.iter().map(|f| f.to_vec()).collect(),
        },
        // Unreachable after the arity check; kept as an error so no input can panic.
        _ => return Err(arity_error()),
    };
    Ok(request)
}
