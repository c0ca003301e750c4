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
//!   (`token_ids` go straight into a `Vec<u32>`); preallocation is capped by the frame size.
//! - Range checks are done here, once, on client values: token ids fit in `u32`,
//!   `1 <= world_size <= 255`, `worker_id < world_size`, `start <= end`,
//!   `cache_salt` has at most 128 chars and none of `@ / \ NUL`. Semantic checks that need
//!   server state (chunk alignment, registered instances) belong to the server.
//! - Operations kvtier does not implement yet (q-cache, CacheBlend, P2P, KV-event streams,
//!   `server_module_call`, `cb_reorder_plan`) are only arity-checked and returned as
//!   [`Request::Unsupported`] with copies of their raw frames.

use rmp::Marker;

use crate::error::ProtoError;
use crate::op::Op;
use crate::reader::{Path, Reader, decode_error, marker_type_name};

/// Largest `world_size` accepted (it is packed into 8 bits of `kv_rank`).
pub const MAX_WORLD_SIZE: u32 = 255;

/// Longest `cache_salt`, in Unicode scalar values (Python `len`).
pub const MAX_CACHE_SALT_CHARS: usize = 128;

/// Characters a `cache_salt` must not contain (they delimit L2 object names).
pub const CACHE_SALT_FORBIDDEN: [char; 4] = ['@', '/', '\\', '\0'];

/// The ext type code of a device IPC wrapper.
pub const IPC_WRAPPER_EXT: i8 = 1;

/// The client's cache key (LMCache `IPCCacheServerKey`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpcKey {
    /// Model name (part of object identity).
    pub model_name: String,
    /// Number of KV ranks, `1..=255`.
    pub world_size: u32,
    /// The KV rank this key is for, or `None` for "every rank" (lookups). Always `< world_size`.
    pub worker_id: Option<u32>,
    /// The full token sequence of the request.
    pub token_ids: Vec<u32>,
    /// First token of the range being operated on.
    pub start: u64,
    /// One past the last token of the range; `start <= end` (it may exceed `token_ids.len()`:
    /// lookups clamp it, transfers refuse it).
    pub end: u64,
    /// Request id (not part of identity).
    pub request_id: String,
    /// Cache namespace salt (part of identity); default `""`.
    pub cache_salt: String,
    /// Number of readers a lookup locks for; default 0.
    pub num_kv_readers: u32,
}

/// Payload of `register_kv_cache_engine_driven_context` (LMCache
/// `RegisterEngineDrivenContextPayload`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterEngineDrivenContext {
    /// Engine instance id.
    pub instance_id: i64,
    /// Model name.
    pub model_name: String,
    /// Number of KV ranks, `1..=255`.
    pub world_size: u32,
    /// Engine block size in tokens.
    pub block_size: u32,
    /// Number of layers.
    pub num_layers: u32,
    /// Hidden dimension per token per layer.
    pub hidden_dim_size: u32,
    /// torch dtype attribute name, e.g. `"bfloat16"`.
    pub dtype_str: String,
    /// MLA layout (no separate K and V planes).
    pub use_mla: bool,
    /// Tokens per slot; `None` means use the chunk size.
    pub num_physical_slots: Option<u32>,
}

/// One entry of `report_block_allocation` (LMCache `BlockAllocationRecord`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockAllocationRecord {
    /// Engine request id.
    pub req_id: String,
    /// Newly allocated block ids per KV group; a flat list on the wire is one group, an empty
    /// list is no group.
    pub new_block_ids: Vec<Vec<u64>>,
    /// Newly scheduled token ids.
    pub new_token_ids: Vec<u32>,
}

/// Tensor metadata of a device IPC wrapper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMetadata {
    /// torch dtype name, e.g. `"float16"`.
    pub dtype: String,
    /// Tensor shape.
    pub shape: Vec<u64>,
    /// Strides in elements.
    pub stride: Vec<u64>,
    /// Offset into the storage, in elements.
    pub storage_offset: u64,
    /// Device uuid (`"cpu"` for SHM tensors).
    pub device_uuid: String,
}

/// A `cpu_shm` device IPC wrapper: a KV tensor the client placed in a POSIX SHM segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuShmWrapper {
    /// Wrapper format version.
    pub version: i64,
    /// Tensor layout.
    pub metadata: TensorMetadata,
    /// SHM segment name as sent (may start with `/`).
    pub shm_name: String,
    /// Segment size in bytes.
    pub nbytes: u64,
}

/// One element of `register_kv_cache`'s `kv_cache` list (msgpack ext type 1 whose data is a
/// tagged map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceIpcWrapper {
    /// `type == "cpu_shm"`, fully decoded.
    CpuShm(CpuShmWrapper),
    /// Any other device type (`cuda`, `cuda_raw`, `cuda_vmm`, `musa`, `npu`, ...), kept opaque.
    Other {
        /// The `type` tag.
        type_name: String,
        /// The ext payload (a msgpack map), verbatim.
        raw: Vec<u8>,
    },
}

/// One engine KV group (LMCache `EngineGroupInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineGroupInfo {
    /// Group id.
    pub engine_group_id: u32,
    /// Layers in this group.
    pub layer_indices: Vec<u32>,
    /// Tokens per engine block; default 0.
    pub tokens_per_block: u32,
    /// Sliding-window size in tokens, -1 for none; default -1.
    pub sw_size_tokens: i64,
    /// Extra object-group tag; default 0.
    pub extra_object_group_tag: i64,
}

/// Payloads of `register_kv_cache`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterKvCache {
    /// Engine instance id.
    pub instance_id: i64,
    /// One wrapper per KV tensor.
    pub kv_cache: Vec<DeviceIpcWrapper>,
    /// Model name.
    pub model_name: String,
    /// Number of KV ranks, `1..=255`.
    pub world_size: u32,
    /// Engine type enum value, e.g. `"vllm"`.
    pub engine_type: String,
    /// Layout hints with string values (non-string values are dropped).
    pub layout_hints: Vec<(String, String)>,
    /// KV groups.
    pub engine_group_infos: Vec<EngineGroupInfo>,
}

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

fn key_frame(bytes: &[u8]) -> Result<IpcKey, ProtoError> {
    frame(bytes, "key", IpcKey::read)
}

fn str_frame(bytes: &[u8], name: &'static str) -> Result<String, ProtoError> {
    frame(bytes, name, owned_str)
}

fn bin_frame(bytes: &[u8], name: &'static str) -> Result<Vec<u8>, ProtoError> {
    frame(bytes, name, |r, p| r.read_bin(p).map(<[u8]>::to_vec))
}

// ---------------------------------------------------------------------------------------------
// Struct decoders

impl IpcKey {
    /// Decodes a whole frame holding one key (error paths are rooted at `key`).
    ///
    /// # Errors
    /// Any [`ProtoError`] describing the first problem found.
    pub fn decode(frame_bytes: &[u8]) -> Result<Self, ProtoError> {
        key_frame(frame_bytes)
    }

    /// Reads a key map from `r`; errors are reported below `path`.
    ///
    /// # Errors
    /// Any [`ProtoError`] describing the first problem found.
    pub fn read(r: &mut Reader<'_>, path: &Path<'_>) -> Result<Self, ProtoError> {
        let mut model_name = None;
        let mut world_size_v = None;
        let mut worker_id = None;
        let mut token_ids = None;
        let mut start = None;
        let mut end = None;
        let mut request_id = None;
        let mut cache_salt = None;
        let mut num_kv_readers = None;
        r.read_struct(path, |r, key| {
            match key {
                "model_name" => model_name = Some(owned_str(r, &path.field("model_name"))?),
                "world_size" => world_size_v = Some(world_size(r, &path.field("world_size"))?),
                "worker_id" => {
                    worker_id = Some(r.read_nil_or(&path.field("worker_id"), Reader::read_u32)?);
                }
                "token_ids" => token_ids = Some(r.read_u32_array(&path.field("token_ids"))?),
                "start" => start = Some(r.read_u64(&path.field("start"))?),
                "end" => end = Some(r.read_u64(&path.field("end"))?),
                "request_id" => request_id = Some(owned_str(r, &path.field("request_id"))?),
                "cache_salt" => cache_salt = Some(owned_str(r, &path.field("cache_salt"))?),
                "request_configs" => {
                    // `dict | None`: type-checked, content ignored (not part of identity).
                    let p = path.field("request_configs");
                    match r.peek_marker(&p)? {
                        Marker::Null | Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                            r.skip_value(&p)?;
                        }
                        m => {
                            return Err(decode_error(
                                &p,
                                format!("expected map or nil, found {}", marker_type_name(m)),
                            ));
                        }
                    }
                }
                "num_kv_readers" => {
                    num_kv_readers = Some(r.read_u32(&path.field("num_kv_readers"))?);
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;

        let key = IpcKey {
            model_name: required(model_name, path, "model_name")?,
            world_size: required(world_size_v, path, "world_size")?,
            worker_id: required(worker_id, path, "worker_id")?,
            token_ids: required(token_ids, path, "token_ids")?,
            start: required(start, path, "start")?,
            end: required(end, path, "end")?,
            request_id: required(request_id, path, "request_id")?,
            cache_salt: cache_salt.unwrap_or_default(),
            num_kv_readers: num_kv_readers.unwrap_or(0),
        };
        key.validate(path)?;
        Ok(key)
    }

    fn validate(&self, path: &Path<'_>) -> Result<(), ProtoError> {
        if let Some(w) = self.worker_id
            && w >= self.world_size
        {
            return Err(decode_error(
                &path.field("worker_id"),
                format!("worker_id {w} must be < world_size {}", self.world_size),
            ));
        }
        // `end` beyond the tokens is the server's call (LMCache's lookup clamps it; the
        // transfer ops refuse it), so it is not checked here.
        if self.start > self.end {
            return Err(decode_error(
                &path.field("start"),
                format!("start {} exceeds end {}", self.start, self.end),
            ));
        }
        let salt_path = path.field("cache_salt");
        if self.cache_salt.chars().count() > MAX_CACHE_SALT_CHARS {
            return Err(decode_error(
                &salt_path,
                format!("longer than {MAX_CACHE_SALT_CHARS} characters"),
            ));
        }
        if let Some(c) = self
            .cache_salt
            .chars()
            .find(|c| CACHE_SALT_FORBIDDEN.contains(c))
        {
            return Err(decode_error(
                &salt_path,
                format!("contains forbidden character {c:?}"),
            ));
        }
        Ok(())
    }

    /// The token range `[start, end)` as `usize` indices (always within `token_ids`).
    #[must_use]
    pub fn range(&self) -> std::ops::Range<usize> {
        let len = self.token_ids.len();
        let clamp = |v: u64| usize::try_from(v).unwrap_or(len).min(len);
        clamp(self.start)..clamp(self.end)
    }
}

impl RegisterEngineDrivenContext {
    /// Reads the payload map from `r`; errors are reported below `path`.
    ///
    /// # Errors
    /// Any [`ProtoError`] describing the first problem found.
    pub fn read(r: &mut Reader<'_>, path: &Path<'_>) -> Result<Self, ProtoError> {
        let mut instance_id = None;
        let mut model_name = None;
        let mut world_size_v = None;
        let mut block_size = None;
        let mut num_layers = None;
        let mut hidden_dim_size = None;
        let mut dtype_str = None;
        let mut use_mla = None;
        let mut num_physical_slots = None;
        r.read_struct(path, |r, key| {
            match key {
                "instance_id" => instance_id = Some(r.read_i64(&path.field("instance_id"))?),
                "model_name" => model_name = Some(owned_str(r, &path.field("model_name"))?),
                "world_size" => world_size_v = Some(world_size(r, &path.field("world_size"))?),
                "block_size" => block_size = Some(r.read_u32(&path.field("block_size"))?),
                "num_layers" => num_layers = Some(r.read_u32(&path.field("num_layers"))?),
                "hidden_dim_size" => {
                    hidden_dim_size = Some(r.read_u32(&path.field("hidden_dim_size"))?);
                }
                "dtype_str" => dtype_str = Some(owned_str(r, &path.field("dtype_str"))?),
                "use_mla" => use_mla = Some(r.read_bool(&path.field("use_mla"))?),
                "num_physical_slots" => {
                    num_physical_slots =
                        r.read_nil_or(&path.field("num_physical_slots"), Reader::read_u32)?;
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(Self {
            instance_id: required(instance_id, path, "instance_id")?,
            model_name: required(model_name, path, "model_name")?,
            world_size: required(world_size_v, path, "world_size")?,
            block_size: required(block_size, path, "block_size")?,
            num_layers: required(num_layers, path, "num_layers")?,
            hidden_dim_size: required(hidden_dim_size, path, "hidden_dim_size")?,
            dtype_str: required(dtype_str, path, "dtype_str")?,
            use_mla: required(use_mla, path, "use_mla")?,
            num_physical_slots,
        })
    }
}

impl BlockAllocationRecord {
    /// Reads one record map from `r`; errors are reported below `path`.
    ///
    /// # Errors
    /// Any [`ProtoError`] describing the first problem found.
    pub fn read(r: &mut Reader<'_>, path: &Path<'_>) -> Result<Self, ProtoError> {
        let mut req_id = None;
        let mut new_block_ids = None;
        let mut new_token_ids = None;
        r.read_struct(path, |r, key| {
            match key {
                "req_id" => req_id = Some(owned_str(r, &path.field("req_id"))?),
                "new_block_ids" => {
                    new_block_ids = Some(flat_or_grouped_ids(r, &path.field("new_block_ids"))?);
                }
                "new_token_ids" => {
                    new_token_ids = Some(r.read_u32_array(&path.field("new_token_ids"))?);
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(Self {
            req_id: required(req_id, path, "req_id")?,
            new_block_ids: new_block_ids.unwrap_or_default(),
            new_token_ids: new_token_ids.unwrap_or_default(),
        })
    }
}

/// `list[int]` (one group) or `list[list[int]]`; the first element decides, the rest must match.
fn flat_or_grouped_ids(r: &mut Reader<'_>, path: &Path<'_>) -> Result<Vec<Vec<u64>>, ProtoError> {
    let mut peek = r.clone();
    let len = peek.read_array_len(path)?;
    if len == 0 {
        *r = peek;
        return Ok(Vec::new());
    }
    match peek.peek_marker(&path.index(0))? {
        Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => block_id_groups(r, path),
        _ => Ok(vec![r.read_u64_array(path)?]),
    }
}

impl TensorMetadata {
    /// Reads a metadata map from `r`; errors are reported below `path`.
    ///
    /// # Errors
    /// Any [`ProtoError`] describing the first problem found.
    pub fn read(r: &mut Reader<'_>, path: &Path<'_>) -> Result<Self, ProtoError> {
        let mut dtype = None;
        let mut shape = None;
        let mut stride = None;
        let mut storage_offset = None;
        let mut device_uuid = None;
        r.read_struct(path, |r, key| {
            match key {
                "dtype" => dtype = Some(owned_str(r, &path.field("dtype"))?),
                "shape" => shape = Some(r.read_u64_array(&path.field("shape"))?),
                "stride" => stride = Some(r.read_u64_array(&path.field("stride"))?),
                "storage_offset" => {
                    storage_offset = Some(r.read_u64(&path.field("storage_offset"))?);
                }
                "device_uuid" => device_uuid = Some(owned_str(r, &path.field("device_uuid"))?),
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(Self {
            dtype: required(dtype, path, "dtype")?,
            shape: required(shape, path, "shape")?,
            stride: required(stride, path, "stride")?,
            storage_offset: required(storage_offset, path, "storage_offset")?,
            device_uuid: required(device_uuid, path, "device_uuid")?,
        })
    }
}

impl DeviceIpcWrapper {
    /// Reads one ext-1 value from `r` and decodes its tagged map.
    ///
    /// # Errors
    /// [`ProtoError::UnsupportedExt`] for an ext code other than 1; otherwise a decode error.
    pub fn read(r: &mut Reader<'_>, path: &Path<'_>) -> Result<Self, ProtoError> {
        let (code, data) = r.read_ext(path)?;
        if code != IPC_WRAPPER_EXT {
            return Err(ProtoError::UnsupportedExt {
                path: path.to_string(),
                code,
            });
        }
        Self::from_ext_data(data, path)
    }

    /// Decodes the msgpack map carried by an ext-1 value (the tag may be anywhere in the map).
    ///
    /// # Errors
    /// A decode error describing the first problem found.
    pub fn from_ext_data(data: &[u8], path: &Path<'_>) -> Result<Self, ProtoError> {
        // Pass 1: find the tag.
        let mut type_name = None;
        let mut scan = Reader::new(data);
        scan.read_struct(path, |r, key| {
            if key == "type" {
                type_name = Some(r.read_str(&path.field("type"))?);
                Ok(true)
            } else {
                Ok(false)
            }
        })?;
        scan.finish(path)?;
        let type_name = required(type_name, path, "type")?;
        if type_name != "cpu_shm" {
            return Ok(Self::Other {
                type_name: type_name.to_owned(),
                raw: data.to_vec(),
            });
        }

        // Pass 2: decode the cpu_shm variant.
        let mut version = None;
        let mut metadata = None;
        let mut shm_name = None;
        let mut nbytes = None;
        let mut r = Reader::new(data);
        r.read_struct(path, |r, key| {
            match key {
                "type" => {
                    r.read_str(&path.field("type"))?;
                }
                "version" => version = Some(r.read_i64(&path.field("version"))?),
                "metadata" => metadata = Some(TensorMetadata::read(r, &path.field("metadata"))?),
                "shm_name" => shm_name = Some(owned_str(r, &path.field("shm_name"))?),
                "nbytes" => nbytes = Some(r.read_u64(&path.field("nbytes"))?),
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(Self::CpuShm(CpuShmWrapper {
            version: required(version, path, "version")?,
            metadata: required(metadata, path, "metadata")?,
            shm_name: required(shm_name, path, "shm_name")?,
            nbytes: required(nbytes, path, "nbytes")?,
        }))
    }
}

impl EngineGroupInfo {
    /// Reads one group map from `r`; errors are reported below `path`.
    ///
    /// # Errors
    /// Any [`ProtoError`] describing the first problem found.
    pub fn read(r: &mut Reader<'_>, path: &Path<'_>) -> Result<Self, ProtoError> {
        let mut engine_group_id = None;
        let mut layer_indices = None;
        let mut tokens_per_block = None;
        let mut sw_size_tokens = None;
        let mut extra_object_group_tag = None;
        r.read_struct(path, |r, key| {
            match key {
                "engine_group_id" => {
                    engine_group_id = Some(r.read_u32(&path.field("engine_group_id"))?);
                }
                "layer_indices" => {
                    layer_indices = Some(r.read_u32_array(&path.field("layer_indices"))?);
                }
                "tokens_per_block" => {
                    tokens_per_block = Some(r.read_u32(&path.field("tokens_per_block"))?);
                }
                "sw_size_tokens" => {
                    sw_size_tokens = Some(r.read_i64(&path.field("sw_size_tokens"))?);
                }
                "extra_object_group_tag" => {
                    extra_object_group_tag =
                        Some(r.read_i64(&path.field("extra_object_group_tag"))?);
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(Self {
            engine_group_id: required(engine_group_id, path, "engine_group_id")?,
            layer_indices: required(layer_indices, path, "layer_indices")?,
            tokens_per_block: tokens_per_block.unwrap_or(0),
            sw_size_tokens: sw_size_tokens.unwrap_or(-1),
            extra_object_group_tag: extra_object_group_tag.unwrap_or(0),
        })
    }
}

fn layout_hints(r: &mut Reader<'_>, path: &Path<'_>) -> Result<Vec<(String, String)>, ProtoError> {
    let mut hints = Vec::new();
    r.read_struct(path, |r, key| {
        let p = path.key(key);
        match r.peek_marker(&p)? {
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                let value = r.read_str(&p)?;
                hints.push((key.to_owned(), value.to_owned()));
                Ok(true)
            }
            _ => Ok(false),
        }
    })?;
    Ok(hints)
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
            key: key_frame(key)?,
            instance_id: int_frame(iid, "instance_id")?,
            block_ids: frame(blocks, "block_ids", block_id_groups)?,
            event_ipc_handle: bin_frame(handle, "event_ipc_handle")?,
        },
        (Op::Retrieve, &[key, iid, blocks, handle, skip]) => Request::Retrieve {
            key: key_frame(key)?,
            instance_id: int_frame(iid, "instance_id")?,
            block_ids: frame(blocks, "block_ids", block_id_groups)?,
            event_ipc_handle: bin_frame(handle, "event_ipc_handle")?,
            skip_first_n_tokens: uint_frame(skip, "skip_first_n_tokens")?,
        },
        (Op::Lookup, &[key, tp]) => Request::Lookup {
            key: key_frame(key)?,
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
            key: key_frame(key)?,
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
            key: key_frame(key)?,
            instance_id: int_frame(iid, "instance_id")?,
        },
        (Op::CommitStore, &[key, iid, data]) => Request::CommitStore {
            key: key_frame(key)?,
            instance_id: int_frame(iid, "instance_id")?,
            data: bin_frame(data, "data")?,
        },
        (Op::PrepareRetrieve, &[key, iid]) => Request::PrepareRetrieve {
            key: key_frame(key)?,
            instance_id: int_frame(iid, "instance_id")?,
        },
        (Op::CommitRetrieve, &[key, iid]) => Request::CommitRetrieve {
            key: key_frame(key)?,
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
