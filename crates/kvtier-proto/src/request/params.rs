//! The parameter structs of the requests (LMCache 0.5.6's msgspec structs and dataclasses:
//! the cache key, engine-driven registration, block allocations, tensor and IPC-wrapper
//! descriptions, KV-cache registration) and their decoders. Each decoder reads a msgpack map
//! by field name under the rules in the `request` module docs and range-checks what it reads.

use super::*;

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
    /// The full token sequence of the request (shared: see [`TokenIds`]).
    pub token_ids: TokenIds,
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

// ---------------------------------------------------------------------------------------------
// Struct decoders

impl IpcKey {
    /// Decodes a whole frame holding one key (error paths are rooted at `key`).
    ///
    /// # Errors
    /// Any [`ProtoError`] describing the first problem found.
    pub fn decode(frame_bytes: &[u8]) -> Result<Self, ProtoError> {
        key_frame(frame_bytes, None)
    }

    /// Reads a key map from `r`; errors are reported below `path`.
    ///
    /// # Errors
    /// Any [`ProtoError`] describing the first problem found.
    pub fn read(r: &mut Reader<'_>, path: &Path<'_>) -> Result<Self, ProtoError> {
        Self::read_with(r, path, None)
    }

    /// Like [`read`](Self::read), taking the token ids from `arrays` when it holds them.
    ///
    /// # Errors
    /// Any [`ProtoError`] describing the first problem found.
    pub fn read_with(
        r: &mut Reader<'_>,
        path: &Path<'_>,
        arrays: Option<&TokenArrays>,
    ) -> Result<Self, ProtoError> {
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
                "token_ids" => {
                    let p = path.field("token_ids");
                    token_ids = Some(match arrays {
                        Some(a) => a.read(r, &p)?,
                        None => TokenIds::new(r.read_u32_array(&p)?),
                    });
                }
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

pub(super) fn layout_hints(
    r: &mut Reader<'_>,
    path: &Path<'_>,
) -> Result<Vec<(String, String)>, ProtoError> {
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
