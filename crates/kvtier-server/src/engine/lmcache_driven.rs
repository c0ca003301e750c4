//! The lmcache_driven transfer path: engines register their paged KV cache, then `store` and
//! `retrieve` name engine blocks and the server copies between those blocks and L1.
//!
//! This is vLLM's default with LMCache 0.5.6 (`LMCacheMPConnector`). kvtier serves the CPU form
//! of it: each layer's KV tensor arrives as a `cpu_shm` descriptor (msgpack ext type 1: a POSIX
//! shared-memory name, its size, and the tensor's dtype/shape/stride/storage offset), which the
//! server maps read-write (see [`mapping`]). Descriptors of other kinds (`cuda`, `cuda_raw`,
//! `cuda_vmm`, `musa`, `npu`, ...) are refused: the refusal is logged and shown in the status
//! tree under `lmcache_driven.contexts.<instance id>`, and store/retrieve for that instance
//! answer `(b"", false)`; nothing else is affected. `register_kv_cache` always replies `None`.
//!
//! Semantics (matching LMCache 0.5.6 except where noted):
//! - **Block ids.** `block_ids[g]` lists, for KV group `g` (the order of the registration's
//!   `engine_group_infos`, or one group of all layers when that list is empty), the engine
//!   blocks of the tokens `[key.start, key.end)` in order: chunk `i` of the range uses
//!   `block_ids[g][i*bpc .. (i+1)*bpc]` with `bpc = chunk_size / block_size`. Ids past what the
//!   range needs are ignored; too few ids, an id `>= num_blocks` or a group count that differs
//!   from the registration fail the whole call before anything is reserved or copied.
//! - **store** copies every full chunk of `[start, end)` into one L1 object per chunk in the
//!   engine-driven object layout ([`layout`]), so either path can read what the other wrote.
//!   Chunks already cached (or being written) are skipped; chunks whose block ids are all the
//!   null block 0 are not stored (LMCache's `--null-block-id 0`). The reply `(handle, true)` is
//!   sent only after the objects are published in L1 and visible to lookups (LMCache replies
//!   before its asynchronous `finish_write`, so an immediate lookup can miss). Unlike LMCache,
//!   a store that could not place every chunk for lack of memory replies `false`.
//! - **retrieve** needs the chunks to be locked by the session's lookup: it takes one lock per
//!   object from the session's records (the `prepare_retrieve` rule), copies, then releases
//!   them. A chunk that is missing, not locked, or of another size fails the call with
//!   `(handle, false)` and consumes nothing. `skip_first_n_tokens` counts from `key.start`:
//!   chunks wholly inside it are not copied, and in the chunk it ends in only the tokens from
//!   it on are written. (LMCache rounds the skip down to a block boundary; kvtier writes no
//!   token before the skip.) The blocks written must be distinct within a group.
//! - The event handle is echoed (`b"stub_ipc_handle"` when the client sent none): on CPU the
//!   copy is finished when the reply is sent.
//! - A second `register_kv_cache` for the same instance replaces the first (LMCache keeps the
//!   first); `unregister_kv_cache`, the worker reaper and shutdown drop the registration, and
//!   its segments are unmapped as soon as no transfer uses them (LMCache keeps dead engines'
//!   mappings: LMCache#4980).
//!
//! Performance: a store first faults in, with one `madvise(MADV_POPULATE_WRITE)` per run of
//! fresh 64 KiB granules, the L1 pages this process has never touched (`L1Pages`); the first
//! pass over a new L1 is otherwise bound by one page fault per 4 KiB.
//!
//! Concurrency: the instance table is a leaf `RwLock` held only to clone an `Arc` out or to
//! insert/remove one (segments are unmapped after the lock is released). Copies run with no
//! lock held, on up to `available_parallelism` scoped threads (`layout::run_transfer`); the L1
//! write ticket (store) or read locks (retrieve) keep the objects' memory stable meanwhile.
//! Lock order as in the engine: session mutex → L1.

pub mod layout;
pub mod mapping;

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use kvtier_core::key::ObjectKey;
use kvtier_core::l1::{L1Error, ReadLease};
use kvtier_core::shm::ShmSegment;
use kvtier_core::status::StatusNode;
use kvtier_proto::response::encode_transfer_result;
use kvtier_proto::{DeviceIpcWrapper, EngineGroupInfo, IpcKey, RegisterKvCache};
use md5::{Digest, Md5};
use parking_lot::{Mutex, RwLock};
use serde::Deserialize;

use self::layout::{
    ChunkTarget, Direction, KernelView, KvGeometry, KvLayoutHint, LayerLayout, LayoutError, SendPtr,
};
use self::mapping::{EngineSegment, FileId, MapError};
use super::session::Session;
use super::{Engine, EngineError, Reply, malformed};

/// The event handle CPU clients send and expect back.
pub const STUB_IPC_HANDLE: &[u8] = b"stub_ipc_handle";

/// Block id vLLM uses for "no block" (LMCache `--null-block-id` default).
pub const NULL_BLOCK_ID: u64 = 0;

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// A descriptor is of a device kind kvtier does not serve.
    #[error(
        "device IPC descriptor type(s) {0} not supported: this kvtier build maps cpu_shm \
         (POSIX shared memory) KV caches only"
    )]
    UnsupportedDevice(String),
    /// The layout is not supported or not valid.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A segment could not be mapped.
    #[error("layer {layer}: {source}")]
    Map {
        /// First layer using the segment.
        layer: usize,
        /// What went wrong.
        #[source]
        source: MapError,
    },
}

/// Why block ids cannot be used for a transfer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// Wrong number of KV groups.
    #[error("block ids for {got} KV groups, but the registration has {want}")]
    Groups {
        /// Groups sent.
        got: usize,
        /// Groups registered.
        want: usize,
    },
    /// Too few block ids for the chunks of the range.
    #[error("group {group}: {got} block ids, but {chunks} chunks need {want}")]
    Underflow {
        /// Group index.
        group: usize,
        /// Ids sent.
        got: usize,
        /// Ids needed.
        want: usize,
        /// Chunks in the range.
        chunks: usize,
    },
    /// A block id is out of range.
    #[error("group {group}: block id {id} is out of range (the engine has {num_blocks} blocks)")]
    OutOfRange {
        /// Group index.
        group: usize,
        /// The id.
        id: u64,
        /// Blocks per layer.
        num_blocks: usize,
    },
    /// A block would be written twice.
    #[error("group {group}: block id {id} appears twice among the blocks to write")]
    Repeated {
        /// Group index.
        group: usize,
        /// The id.
        id: u64,
    },
    /// A buffer does not hold a whole number of chunk objects.
    #[error("buffer of {len} bytes is not a whole number of {object_len}-byte chunk objects")]
    BufferLen {
        /// Buffer length.
        len: usize,
        /// Object length.
        object_len: usize,
    },
}

/// An engine's registered KV cache: validated geometry, per-layer strides and the mapped
/// segments. Public so that benchmarks and tests can drive the copy kernels directly.
#[derive(Debug)]
pub struct KvCacheMap {
    geometry: KvGeometry,
    layers: Vec<LayerLayout>,
    segments: Vec<EngineSegment>,
    segment_ptrs: Vec<SendPtr>,
    layer_group: Vec<usize>,
    num_groups: usize,
    parallel_min_bytes: usize,
}

impl KvCacheMap {
    /// Validates a `register_kv_cache` payload and maps its segments. `forbidden` is the file
    /// identity of the server's own L1 segment.
    ///
    /// # Errors
    /// [`RegisterError`] naming the first problem found.
    pub fn map(
        kv_cache: &[DeviceIpcWrapper],
        layout_hints: &[(String, String)],
        groups: &[EngineGroupInfo],
        chunk_size: usize,
        forbidden: Option<FileId>,
    ) -> Result<Self, RegisterError> {
        let mut unsupported: Vec<&str> = Vec::new();
        let mut descs = Vec::with_capacity(kv_cache.len());
        for w in kv_cache {
            match w {
                DeviceIpcWrapper::CpuShm(d) => descs.push(d),
                DeviceIpcWrapper::Other { type_name, .. } => {
                    if !unsupported.contains(&type_name.as_str()) {
                        unsupported.push(type_name);
                    }
                }
            }
        }
        if !unsupported.is_empty() {
            let list: Vec<String> = unsupported
                .iter()
                .take(8)
                .map(|t| format!("{:?}", t.chars().take(32).collect::<String>()))
                .collect();
            return Err(RegisterError::UnsupportedDevice(list.join(", ")));
        }
        let Some(first) = descs.first() else {
            return Err(LayoutError::Empty.into());
        };
        let hint = KvLayoutHint::from_hints(layout_hints)?;
        let geometry = layout::geometry(&first.metadata, hint, descs.len(), chunk_size)?;

        // Map each distinct segment once (by name, then by file identity), as large as the
        // largest descriptor naming it claims.
        let mut by_name: HashMap<&str, (usize, u64)> = HashMap::new();
        for (layer, d) in descs.iter().enumerate() {
            let e = by_name.entry(d.shm_name.as_str()).or_insert((layer, 0));
            e.1 = e.1.max(d.nbytes);
        }
        let mut names: Vec<(&str, usize, u64)> =
            by_name.into_iter().map(|(n, (l, b))| (n, l, b)).collect();
        names.sort_unstable_by_key(|&(_, layer, _)| layer);
        let mut segments: Vec<EngineSegment> = Vec::new();
        let mut seg_of_name: HashMap<&str, usize> = HashMap::new();
        let mut seg_of_id: HashMap<FileId, usize> = HashMap::new();
        for (name, layer, nbytes) in names {
            let seg = EngineSegment::open(name, nbytes, forbidden)
                .map_err(|source| RegisterError::Map { layer, source })?;
            let idx = match seg_of_id.get(&seg.id()) {
                // Two names for one file: keep the larger mapping.
                Some(&i) => {
                    if segments.get(i).is_some_and(|s| s.len() < seg.len())
                        && let Some(slot) = segments.get_mut(i)
                    {
                        *slot = seg;
                    }
                    i
                }
                None => {
                    seg_of_id.insert(seg.id(), segments.len());
                    segments.push(seg);
                    segments.len() - 1
                }
            };
            seg_of_name.insert(name, idx);
        }

        let want_shape = first.metadata.shape.clone();
        let mut layers = Vec::with_capacity(descs.len());
        for (i, d) in descs.iter().enumerate() {
            let seg = seg_of_name.get(d.shm_name.as_str()).copied().unwrap_or(0);
            let limit = segments
                .get(seg)
                .map_or(0, |s| (s.len() as u64).min(d.nbytes));
            layers.push(LayerLayout::new(
                i,
                &d.metadata,
                &geometry,
                &want_shape,
                seg,
                limit,
            )?);
        }
        let seg_names: Vec<String> = segments.iter().map(|s| s.name().to_owned()).collect();
        layout::check_disjoint(&layers, &seg_names)?;
        let (layer_group, num_groups) = resolve_groups(groups, &geometry)?;
        let segment_ptrs = segments.iter().map(|s| SendPtr(s.base_ptr())).collect();
        Ok(Self {
            geometry,
            layers,
            segments,
            segment_ptrs,
            layer_group,
            num_groups,
            parallel_min_bytes: layout::PARALLEL_MIN_BYTES,
        })
    }

    /// Transfers smaller than this run on the calling thread only (default
    /// [`layout::PARALLEL_MIN_BYTES`]).
    pub fn set_parallel_min_bytes(&mut self, bytes: usize) {
        self.parallel_min_bytes = bytes;
    }

    /// The shared geometry.
    pub fn geometry(&self) -> &KvGeometry {
        &self.geometry
    }

    /// Bytes of one chunk object.
    pub fn object_len(&self) -> usize {
        self.geometry.object_len()
    }

    /// Number of KV groups block ids must be given for.
    pub fn num_groups(&self) -> usize {
        self.num_groups
    }

    /// Per-layer layouts.
    pub fn layers(&self) -> &[LayerLayout] {
        &self.layers
    }

    /// Total bytes mapped.
    pub fn mapped_bytes(&self) -> usize {
        self.segments.iter().map(EngineSegment::len).sum()
    }

    /// Names of the mapped segments.
    pub fn segment_names(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().map(EngineSegment::name)
    }

    /// Checks `block_ids` for a transfer of `chunks` chunks. With `write_from = Some(skip)`
    /// (a scatter skipping `skip` tokens) the blocks that will be written must be distinct
    /// within each group.
    ///
    /// # Errors
    /// [`BlockError`] for the first problem.
    pub fn check_blocks(
        &self,
        block_ids: &[Vec<u64>],
        chunks: usize,
        write_from: Option<usize>,
    ) -> Result<(), BlockError> {
        if block_ids.len() != self.num_groups {
            return Err(BlockError::Groups {
                got: block_ids.len(),
                want: self.num_groups,
            });
        }
        let g = &self.geometry;
        let want = chunks * g.blocks_per_chunk();
        for (group, ids) in block_ids.iter().enumerate() {
            let Some(used) = ids.get(..want) else {
                return Err(BlockError::Underflow {
                    group,
                    got: ids.len(),
                    want,
                    chunks,
                });
            };
            if let Some(&id) = used.iter().find(|&&id| id >= g.num_blocks as u64) {
                return Err(BlockError::OutOfRange {
                    group,
                    id,
                    num_blocks: g.num_blocks,
                });
            }
            if let Some(skip) = write_from {
                let first = (skip / g.block_size).min(want);
                let mut seen = HashSet::with_capacity(want - first);
                if let Some(&id) = used[first..].iter().find(|&&id| !seen.insert(id)) {
                    return Err(BlockError::Repeated { group, id });
                }
            }
        }
        Ok(())
    }

    /// Whether every block id of chunk `chunk` (in every group) is the null block.
    pub fn chunk_is_null(&self, block_ids: &[Vec<u64>], chunk: usize) -> bool {
        let bpc = self.geometry.blocks_per_chunk();
        block_ids.iter().all(|ids| {
            ids.get(chunk * bpc..(chunk + 1) * bpc)
                .is_some_and(|c| c.iter().all(|&id| id == NULL_BLOCK_ID))
        })
    }

    fn view(&self) -> KernelView<'_> {
        KernelView {
            geometry: &self.geometry,
            layers: &self.layers,
            segments: &self.segment_ptrs,
            layer_group: &self.layer_group,
        }
    }

    /// Copies chunks between the engine blocks and object memory.
    ///
    /// # Safety
    /// `block_ids` passed [`check_blocks`](Self::check_blocks) for at least
    /// `max(index) + 1` chunks (with the scatter's skip for a scatter), and every target
    /// points to `object_len()` bytes that stay valid, and that no one else accesses in a
    /// conflicting way, for the call.
    pub(crate) unsafe fn transfer_raw(
        &self,
        block_ids: &[Vec<u64>],
        targets: &[ChunkTarget],
        dir: Direction,
        threads: NonZeroUsize,
    ) {
        let ids: Vec<&[u64]> = block_ids.iter().map(Vec::as_slice).collect();
        let bytes = targets.len().saturating_mul(self.object_len());
        let threads = if bytes < self.parallel_min_bytes {
            NonZeroUsize::MIN
        } else {
            threads
        };
        // SAFETY: the segments are mapped for as long as `self` lives, and every layer's span
        // was checked against its mapping; the rest is the caller's contract.
        unsafe { layout::run_transfer(self.view(), &ids, targets, dir, threads) };
    }

    /// Gathers `dst.len() / object_len()` chunks (chunk `i` of the range into
    /// `dst[i*object_len..]`) from the engine blocks.
    ///
    /// # Errors
    /// [`BlockError`] when the buffer or the block ids do not fit.
    pub fn gather(
        &self,
        block_ids: &[Vec<u64>],
        dst: &mut [u8],
        threads: NonZeroUsize,
    ) -> Result<(), BlockError> {
        let chunks = self.chunks_in(dst.len())?;
        self.check_blocks(block_ids, chunks, None)?;
        let base = NonNull::from(&mut *dst).cast::<u8>();
        let targets = self.targets(base, chunks, 0);
        // SAFETY: the block ids were checked; `dst` is an exclusive local buffer of
        // `chunks * object_len` bytes, borrowed for the whole call.
        unsafe { self.transfer_raw(block_ids, &targets, Direction::Gather, threads) };
        Ok(())
    }

    /// Scatters `src.len() / object_len()` chunks into the engine blocks, writing no token
    /// before `skip_tokens` (counted from the first chunk).
    ///
    /// # Errors
    /// [`BlockError`] when the buffer or the block ids do not fit.
    pub fn scatter(
        &self,
        block_ids: &[Vec<u64>],
        src: &[u8],
        skip_tokens: usize,
        threads: NonZeroUsize,
    ) -> Result<(), BlockError> {
        let chunks = self.chunks_in(src.len())?;
        self.check_blocks(block_ids, chunks, Some(skip_tokens))?;
        // Only read through this pointer (the scatter direction reads the object).
        let base = NonNull::from(src).cast::<u8>();
        let targets = self.targets(base, chunks, skip_tokens);
        // SAFETY: the block ids were checked (distinct written blocks); `src` is borrowed for
        // the whole call and only read.
        unsafe { self.transfer_raw(block_ids, &targets, Direction::Scatter, threads) };
        Ok(())
    }

    fn chunks_in(&self, len: usize) -> Result<usize, BlockError> {
        let object_len = self.object_len();
        if object_len == 0 || !len.is_multiple_of(object_len) {
            return Err(BlockError::BufferLen { len, object_len });
        }
        Ok(len / object_len)
    }

    fn targets(&self, base: NonNull<u8>, chunks: usize, skip: usize) -> Vec<ChunkTarget> {
        let cs = self.geometry.chunk_size;
        let object_len = self.object_len();
        (0..chunks)
            .filter(|i| skip < (i + 1) * cs)
            .map(|i| ChunkTarget {
                index: i,
                // SAFETY: `i * object_len` is within the buffer of `chunks * object_len` bytes.
                object: SendPtr(unsafe { base.add(i * object_len) }),
                skip_tokens: skip.saturating_sub(i * cs),
            })
            .collect()
    }

    /// MD5 digests of engine blocks, grouped `chunk_blocks` blocks per chunk, as LMCache's
    /// `POST /cache/checksums` computes them: per chunk, each layer's selected blocks in the
    /// tensor's logical order (`index_select` on the block axis), `bfloat16` widened to
    /// `float32`. Returns `digests[chunk]` (one over all layers) or, with `layerwise`,
    /// `digests[layer][chunk]`.
    ///
    /// # Errors
    /// [`BlockError::OutOfRange`] for a block id past the engine's blocks.
    pub fn block_checksums(
        &self,
        block_ids: &[u64],
        chunk_blocks: usize,
        layerwise: bool,
    ) -> Result<Vec<Vec<String>>, BlockError> {
        let g = &self.geometry;
        if let Some(&id) = block_ids.iter().find(|&&id| id >= g.num_blocks as u64) {
            return Err(BlockError::OutOfRange {
                group: 0,
                id,
                num_blocks: g.num_blocks,
            });
        }
        let chunk_blocks = chunk_blocks.max(1);
        let mut buf = vec![0u8; 64 << 10];
        let widen = g.dtype.strip_prefix("torch.").unwrap_or(&g.dtype) == "bfloat16";
        let digest = |h: Md5| hex::encode(h.finalize());
        if layerwise {
            Ok((0..self.layers.len())
                .map(|l| {
                    block_ids
                        .chunks(chunk_blocks)
                        .map(|ids| {
                            let mut h = Md5::new();
                            self.hash_layer_blocks(l, ids, widen, &mut buf, &mut h);
                            digest(h)
                        })
                        .collect()
                })
                .collect())
        } else {
            Ok(vec![
                block_ids
                    .chunks(chunk_blocks)
                    .map(|ids| {
                        let mut h = Md5::new();
                        for l in 0..self.layers.len() {
                            self.hash_layer_blocks(l, ids, widen, &mut buf, &mut h);
                        }
                        digest(h)
                    })
                    .collect(),
            ])
        }
    }

    /// Feeds layer `layer`'s blocks `ids` (already checked `< num_blocks`) to `h`.
    fn hash_layer_blocks(
        &self,
        layer: usize,
        ids: &[u64],
        widen: bool,
        buf: &mut [u8],
        h: &mut Md5,
    ) {
        let Some(l) = self.layers.get(layer) else {
            return;
        };
        let Some(seg) = self.segment_ptrs.get(l.segment) else {
            return;
        };
        let item = self.geometry.itemsize;
        let b = self.geometry.kv_format.block_axis();
        let nd = l.shape.len();
        // The innermost axes after the block axis that are contiguous form one run.
        let mut run = item;
        let mut run_from = nd;
        for i in (b + 1..nd).rev() {
            let (n, s) = (l.shape[i], l.byte_strides[i]);
            if n == 1 {
                run_from = i;
            } else if s == run {
                run *= n;
                run_from = i;
            } else {
                break;
            }
        }
        let mut emit = |off: usize| {
            let mut done = 0;
            while done < run {
                let piece = (run - done).min(if widen { buf.len() / 2 } else { buf.len() });
                let piece = piece - piece % item;
                let piece = if piece == 0 { item } else { piece };
                let Some(dst) = buf.get_mut(..piece) else {
                    return;
                };
                // SAFETY: `off + done .. + piece` lies within the layer's span (indices within
                // the shape, block ids checked), which lies within the live mapping; `dst` is
                // a local buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        seg.0.as_ptr().add(off + done),
                        dst.as_mut_ptr(),
                        piece,
                    );
                }
                if widen {
                    let mut wide = [0u8; 512];
                    for part in dst.chunks(256) {
                        let n = part.len() / 2 * 4;
                        for (j, v) in part.chunks_exact(2).enumerate() {
                            let bits = u32::from(u16::from_le_bytes([v[0], v[1]])) << 16;
                            wide[j * 4..j * 4 + 4].copy_from_slice(&bits.to_le_bytes());
                        }
                        h.update(&wide[..n]);
                    }
                } else {
                    h.update(dst);
                }
                done += piece;
            }
        };
        walk(l, b, ids, 0, l.base, run_from, &mut emit);
    }
}

/// Visits, in logical order, the offsets of every run of axes `[0, run_from)` of `l`, the
/// block axis `b` taking the values `ids`.
fn walk(
    l: &LayerLayout,
    b: usize,
    ids: &[u64],
    axis: usize,
    off: usize,
    run_from: usize,
    emit: &mut impl FnMut(usize),
) {
    if axis >= run_from {
        emit(off);
        return;
    }
    let stride = l.byte_strides.get(axis).copied().unwrap_or(0);
    if axis == b {
        for &id in ids {
            walk(
                l,
                b,
                ids,
                axis + 1,
                off + id as usize * stride,
                run_from,
                emit,
            );
        }
    } else {
        for i in 0..l.shape.get(axis).copied().unwrap_or(0) {
            walk(l, b, ids, axis + 1, off + i * stride, run_from, emit);
        }
    }
}

/// Maps each layer to its KV group. No groups means one group of every layer.
fn resolve_groups(
    groups: &[EngineGroupInfo],
    g: &KvGeometry,
) -> Result<(Vec<usize>, usize), LayoutError> {
    if groups.is_empty() {
        return Ok((vec![0; g.num_layers], 1));
    }
    let mut layer_group = vec![usize::MAX; g.num_layers];
    for (gi, info) in groups.iter().enumerate() {
        let err = |why: String| LayoutError::Groups {
            group: u64::from(info.engine_group_id),
            why,
        };
        if info.sw_size_tokens >= 0 {
            return Err(err(format!(
                "sliding-window groups (sw_size_tokens {}) are not supported",
                info.sw_size_tokens
            )));
        }
        if info.extra_object_group_tag != 0 {
            return Err(err(format!(
                "extra_object_group_tag {} is not supported",
                info.extra_object_group_tag
            )));
        }
        let tpb = info.tokens_per_block as usize;
        if tpb != 0 && tpb != g.block_size {
            return Err(err(format!(
                "tokens_per_block {tpb} differs from the tensors' block size {} (compressed \
                 block layouts are not supported)",
                g.block_size
            )));
        }
        for &l in &info.layer_indices {
            match layer_group.get_mut(l as usize) {
                Some(slot) if *slot == usize::MAX => *slot = gi,
                Some(_) => return Err(err(format!("layer {l} is in more than one group"))),
                None => {
                    return Err(err(format!(
                        "layer index {l} is out of range ({} layers registered)",
                        g.num_layers
                    )));
                }
            }
        }
    }
    if let Some(l) = layer_group.iter().position(|&x| x == usize::MAX) {
        return Err(LayoutError::Groups {
            group: 0,
            why: format!("layer {l} belongs to no group"),
        });
    }
    Ok((layer_group, groups.len()))
}

/// Counters of the lmcache_driven path.
#[derive(Debug, Default)]
pub struct LmcacheDrivenCounters {
    /// Registrations accepted.
    pub registered_total: AtomicU64,
    /// Registrations refused.
    pub refused_total: AtomicU64,
    /// Registrations removed by `unregister_kv_cache`.
    pub unregistered_total: AtomicU64,
    /// Registrations removed by the worker reaper.
    pub reaped_total: AtomicU64,
    /// Store / retrieve calls for an unknown or refused instance.
    pub unregistered_transfers_total: AtomicU64,
    /// `store` calls.
    pub stores_total: AtomicU64,
    /// `store` calls that replied `false`.
    pub stores_failed_total: AtomicU64,
    /// Chunks copied into L1 and published.
    pub store_chunks_stored_total: AtomicU64,
    /// Chunks skipped because they were cached or being written.
    pub store_chunks_skipped_total: AtomicU64,
    /// Chunks not stored because all their block ids are the null block.
    pub store_chunks_null_total: AtomicU64,
    /// Chunks not stored for lack of L1 memory.
    pub store_chunks_rejected_total: AtomicU64,
    /// `retrieve` calls.
    pub retrieves_total: AtomicU64,
    /// `retrieve` calls that replied `false`.
    pub retrieves_failed_total: AtomicU64,
    /// Chunks copied into engine blocks.
    pub retrieve_chunks_total: AtomicU64,
    /// Chunks not copied because `skip_first_n_tokens` covered them.
    pub retrieve_chunks_skipped_total: AtomicU64,
    /// Bytes copied engine → L1.
    pub bytes_gathered_total: AtomicU64,
    /// Bytes copied L1 → engine.
    pub bytes_scattered_total: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Liveness {
    last_seen: Instant,
    pinged: bool,
}

#[derive(Debug)]
struct Instance {
    model_name: String,
    world_size: u32,
    engine_type: String,
    kv: Result<Arc<KvCacheMap>, String>,
    registered_at: Instant,
    live: Mutex<Liveness>,
}

/// Granule of [`L1Pages`]: 64 KiB.
const L1_GRANULE: usize = 64 << 10;

/// Which 64 KiB granules of the L1 segment this process has already faulted in.
///
/// The first store into fresh L1 memory would otherwise take one write fault per 4 KiB page
/// during the copy; one `madvise(MADV_POPULATE_WRITE)` per run of fresh granules does the same
/// work several times faster (most of all in virtual machines). Populating pages that are
/// already mapped is not free either, so each granule is populated once: afterwards the pages
/// stay mapped in this process (if the kernel ever reclaims them, they fault in normally).
#[derive(Debug)]
struct L1Pages {
    bits: Box<[AtomicU64]>,
}

impl L1Pages {
    fn new(segment_len: usize) -> Self {
        let granules = segment_len.div_ceil(L1_GRANULE);
        Self {
            bits: (0..granules.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn is_set(&self, g: usize) -> bool {
        self.bits
            .get(g / 64)
            .is_none_or(|w| w.load(Relaxed) & (1 << (g % 64)) != 0)
    }

    /// Populates the granules of `offset..offset + len` not populated yet. Races are harmless
    /// (a granule may be populated twice).
    fn ensure(&self, segment: &ShmSegment, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / L1_GRANULE;
        let last = (offset + len - 1) / L1_GRANULE;
        let mut g = first;
        while g <= last {
            if self.is_set(g) {
                g += 1;
                continue;
            }
            let run_start = g;
            while g <= last && !self.is_set(g) {
                g += 1;
            }
            let start = run_start * L1_GRANULE;
            let end = (g * L1_GRANULE).min(segment.len());
            if let Ok(p) = segment.ptr_at(start, end.saturating_sub(start)) {
                // SAFETY: `ptr_at` checked that the range lies in the live L1 mapping.
                unsafe { mapping::populate_write(p, end - start) };
            }
            for i in run_start..g {
                if let Some(w) = self.bits.get(i / 64) {
                    w.fetch_or(1 << (i % 64), Relaxed);
                }
            }
        }
    }
}

/// The lmcache_driven registrations of an engine (one per engine worker instance).
#[derive(Debug)]
pub struct LmcacheDriven {
    instances: RwLock<HashMap<i64, Arc<Instance>>>,
    threads: NonZeroUsize,
    counters: LmcacheDrivenCounters,
    l1_pages: std::sync::OnceLock<L1Pages>,
}

impl Default for LmcacheDriven {
    fn default() -> Self {
        Self::new()
    }
}

impl LmcacheDriven {
    /// An empty table; copies use up to `available_parallelism` threads.
    pub fn new() -> Self {
        Self {
            instances: RwLock::new(HashMap::new()),
            threads: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            counters: LmcacheDrivenCounters::default(),
            l1_pages: std::sync::OnceLock::new(),
        }
    }

    /// Counters.
    pub fn counters(&self) -> &LmcacheDrivenCounters {
        &self.counters
    }

    fn get(&self, iid: i64) -> Option<Arc<Instance>> {
        self.instances.read().get(&iid).cloned()
    }

    /// Refreshes an instance's liveness (`ping` also latches "has pinged").
    pub fn touch(&self, iid: i64, now: Instant, ping: bool) {
        if let Some(inst) = self.get(iid) {
            let mut l = inst.live.lock();
            l.last_seen = l.last_seen.max(now);
            l.pinged |= ping;
        }
    }
}

/// Body of `POST /cache/checksums`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChecksumRequest {
    /// Engine block ids, in order.
    #[serde(default)]
    pub block_ids: Vec<i64>,
    /// Blocks per chunk.
    #[serde(default)]
    pub chunk_size: i64,
    /// The registered instance.
    #[serde(default)]
    pub instance_id: i64,
    /// Per-layer digests instead of one per chunk.
    #[serde(default)]
    pub layerwise: bool,
}

/// Why a checksum request failed.
#[derive(Debug, thiserror::Error)]
pub enum ChecksumError {
    /// The request is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// No such instance.
    #[error("instance_id {0} not registered")]
    NotRegistered(i64),
    /// The instance was refused at registration.
    #[error("instance_id {0} was refused at registration: {1}")]
    Refused(i64, String),
}

impl ChecksumError {
    /// The HTTP status LMCache uses for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::NotRegistered(_) => 404,
            Self::Refused(..) => 501,
        }
    }
}

/// LMCache's `compress_slot_mapping`: runs of 3+ consecutive ids become `[first, last]`.
fn compress_ids(ids: &[i64]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j].wrapping_add(1) {
            j += 1;
        }
        if j - i >= 2 {
            out.push(serde_json::json!([ids[i], ids[j]]));
        } else {
            out.extend(ids[i..=j].iter().map(|&v| serde_json::json!(v)));
        }
        i = j + 1;
    }
    out
}

fn usize_of(v: u64) -> Option<usize> {
    usize::try_from(v).ok()
}

impl Engine {
    fn lmd_instance(&self, iid: i64, now: Instant) -> Result<Arc<KvCacheMap>, EngineError> {
        let refused = |why: String| {
            self.lmd
                .counters
                .unregistered_transfers_total
                .fetch_add(1, Relaxed);
            EngineError::Failed(why)
        };
        let Some(inst) = self.lmd.get(iid) else {
            return Err(refused(format!(
                "lmcache_driven instance {iid} is not registered"
            )));
        };
        match &inst.kv {
            Ok(kv) => {
                let mut l = inst.live.lock();
                l.last_seen = l.last_seen.max(now);
                Ok(Arc::clone(kv))
            }
            Err(reason) => Err(refused(format!(
                "lmcache_driven instance {iid} was refused at registration: {reason}"
            ))),
        }
    }

    /// `register_kv_cache`: maps the engine's KV cache or records why it cannot. Always `None`.
    pub(super) fn lmd_register(&self, r: RegisterKvCache, now: Instant) -> Reply {
        let forbidden = mapping::segment_id(self.segment.name());
        let kv = KvCacheMap::map(
            &r.kv_cache,
            &r.layout_hints,
            &r.engine_group_infos,
            self.cfg.chunk_size,
            forbidden,
        );
        let c = &self.lmd.counters;
        let kv = match kv {
            Ok(kv) => {
                let g = kv.geometry();
                tracing::info!(
                    instance_id = r.instance_id,
                    model = %r.model_name,
                    world_size = r.world_size,
                    layers = g.num_layers,
                    kv_format = g.kv_format.lmcache_name(),
                    blocks = g.num_blocks,
                    block_size = g.block_size,
                    heads = g.num_heads,
                    head_size = g.head_size,
                    dtype = %g.dtype,
                    object_bytes = g.object_len(),
                    mapped_bytes = kv.mapped_bytes(),
                    "lmcache_driven KV cache registered"
                );
                c.registered_total.fetch_add(1, Relaxed);
                Ok(Arc::new(kv))
            }
            Err(e) => {
                tracing::warn!(
                    instance_id = r.instance_id,
                    model = %r.model_name,
                    reason = %e,
                    "lmcache_driven KV cache registration refused; stores and retrieves for \
                     this instance will fail"
                );
                c.refused_total.fetch_add(1, Relaxed);
                Err(e.to_string())
            }
        };
        let inst = Arc::new(Instance {
            model_name: r.model_name,
            world_size: r.world_size,
            engine_type: r.engine_type,
            kv,
            registered_at: now,
            live: Mutex::new(Liveness {
                last_seen: now,
                pinged: false,
            }),
        });
        let old = self.lmd.instances.write().insert(r.instance_id, inst);
        if old.is_some() {
            tracing::info!(
                instance_id = r.instance_id,
                "lmcache_driven instance re-registered; the previous registration is dropped"
            );
        }
        // `old` (and its mappings, once no transfer uses them) is dropped here, unlocked.
        drop(old);
        None
    }

    /// `unregister_kv_cache`: drops the registration. Returns whether there was one.
    pub(super) fn lmd_unregister(&self, iid: i64) -> bool {
        let old = self.lmd.instances.write().remove(&iid);
        let known = old.is_some();
        if known {
            self.lmd.counters.unregistered_total.fetch_add(1, Relaxed);
            tracing::info!(instance_id = iid, "lmcache_driven KV cache unregistered");
        } else {
            tracing::warn!(
                instance_id = iid,
                "unregister_kv_cache for an unknown instance"
            );
        }
        drop(old);
        known
    }

    /// Drops registrations of instances silent for longer than the reap timeout (or, if they
    /// never pinged, the registration grace). Run by housekeeping.
    pub(super) fn lmd_reap(&self, now: Instant) {
        if self.cfg.worker_reap_timeout.is_zero() {
            return;
        }
        let dead: Vec<i64> = self
            .lmd
            .instances
            .read()
            .iter()
            .filter(|(_, inst)| {
                let l = *inst.live.lock();
                let limit = if l.pinged {
                    self.cfg.worker_reap_timeout
                } else {
                    self.cfg.worker_registration_grace
                };
                now.saturating_duration_since(l.last_seen) > limit
            })
            .map(|(&iid, _)| iid)
            .collect();
        for iid in dead {
            let old = self.lmd.instances.write().remove(&iid);
            if old.is_some() {
                tracing::warn!(
                    instance_id = iid,
                    "lmcache_driven instance silent too long; unregistering it and unmapping \
                     its KV cache"
                );
                self.lmd.counters.reaped_total.fetch_add(1, Relaxed);
            }
            drop(old);
        }
    }

    /// Drops every registration (shutdown).
    pub(super) fn lmd_release_all(&self) {
        let all: Vec<Arc<Instance>> = self.lmd.instances.write().drain().map(|(_, v)| v).collect();
        drop(all);
    }

    /// `store`: gathers the full chunks of `[start, end)` from the engine blocks into L1.
    pub(super) fn lmd_store(
        &self,
        key: &IpcKey,
        instance_id: i64,
        block_ids: &[Vec<u64>],
        event_ipc_handle: &[u8],
        now: Instant,
    ) -> Result<Reply, EngineError> {
        let c = &self.lmd.counters;
        c.stores_total.fetch_add(1, Relaxed);
        let kv = self.lmd_instance(instance_id, now)?;
        let worker = key
            .worker_id
            .ok_or_else(|| malformed("store needs worker_id"))?;
        let handle = reply_handle(event_ipc_handle);
        let fail = |why: &dyn std::fmt::Display| {
            c.stores_failed_total.fetch_add(1, Relaxed);
            tracing::warn!(
                instance_id,
                request_id = %key.request_id,
                reason = %why,
                "lmcache_driven store failed"
            );
            Ok(Some(encode_transfer_result(handle, false)))
        };
        let keys = self.keys_for(key, Some(worker), now)?;
        if let Err(e) = kv.check_blocks(block_ids, keys.len(), None) {
            return fail(&e);
        }
        let object_len = kv.object_len();
        let mut items: Vec<(ObjectKey, u64)> = Vec::with_capacity(keys.len());
        let mut chunk_of: Vec<usize> = Vec::with_capacity(keys.len());
        let mut null = 0u64;
        for (i, k) in keys.into_iter().enumerate() {
            if kv.chunk_is_null(block_ids, i) {
                null += 1;
            } else {
                items.push((k, object_len as u64));
                chunk_of.push(i);
            }
        }
        c.store_chunks_null_total.fetch_add(null, Relaxed);
        let mut tickets = Vec::with_capacity(items.len());
        let mut targets = Vec::with_capacity(items.len());
        let (mut skipped, mut rejected) = (0u64, 0u64);
        let mut bad_offset = None;
        let mut ticket_keys: Vec<ObjectKey> = Vec::with_capacity(items.len());
        for (j, (r, &index)) in self
            .l1
            .reserve_write(&items, false)
            .into_iter()
            .zip(&chunk_of)
            .enumerate()
        {
            match r {
                Ok(t) => {
                    ticket_keys.push(items[j].0.clone());
                    match usize_of(t.alloc.offset).map(|o| self.segment.ptr_at(o, object_len)) {
                        Some(Ok(p)) => targets.push(ChunkTarget {
                            index,
                            object: SendPtr(p),
                            skip_tokens: 0,
                        }),
                        _ => bad_offset = Some(t.alloc.offset),
                    }
                    tickets.push(t);
                }
                Err(L1Error::OutOfMemory) => rejected += 1,
                Err(_) => skipped += 1,
            }
        }
        c.store_chunks_skipped_total.fetch_add(skipped, Relaxed);
        if let Some(offset) = bad_offset {
            self.l1.abort_write(&tickets);
            return fail(&format!(
                "L1 object at offset {offset} lies outside the segment"
            ));
        }
        let pages = self
            .lmd
            .l1_pages
            .get_or_init(|| L1Pages::new(self.segment.len()));
        for t in &tickets {
            if let Some(off) = usize_of(t.alloc.offset) {
                pages.ensure(&self.segment, off, object_len);
            }
        }
        // SAFETY: the block ids were checked for `chunk_of`'s chunks; each target is a staging
        // object of `object_len` bytes reserved by this call (its write ticket gives us sole
        // write access until `finish_write`), inside the L1 segment, which outlives the call.
        unsafe { kv.transfer_raw(block_ids, &targets, Direction::Gather, self.lmd.threads) };
        let results = self.l1.finish_write(&tickets);
        let stored = results.iter().filter(|r| r.is_ok()).count();
        c.store_chunks_stored_total
            .fetch_add(stored as u64, Relaxed);
        self.counters
            .store_chunks_committed
            .fetch_add(stored as u64, Relaxed);
        self.counters
            .store_bytes_committed
            .fetch_add((stored * object_len) as u64, Relaxed);
        // Published objects are written behind to L2 exactly like engine-driven commits.
        let published: Vec<ObjectKey> = ticket_keys
            .into_iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(k, _)| k)
            .collect();
        self.notify_l2_stored(published);
        c.bytes_gathered_total
            .fetch_add((targets.len() * object_len) as u64, Relaxed);
        if rejected > 0 {
            c.store_chunks_rejected_total.fetch_add(rejected, Relaxed);
            self.evictor.wake();
            return fail(&format!(
                "{rejected} chunk(s) not stored: L1 has no room even after evicting every \
                 unlocked object"
            ));
        }
        if stored != results.len() {
            return fail(&format!(
                "{} of {} chunk(s) were discarded (write TTL or forced clear) before publishing",
                results.len() - stored,
                results.len()
            ));
        }
        Ok(Some(encode_transfer_result(handle, true)))
    }

    /// `retrieve`: scatters chunks locked by the session's lookup into the engine blocks.
    pub(super) fn lmd_retrieve(
        &self,
        key: &IpcKey,
        instance_id: i64,
        block_ids: &[Vec<u64>],
        event_ipc_handle: &[u8],
        skip_first_n_tokens: u64,
        now: Instant,
    ) -> Result<Reply, EngineError> {
        let c = &self.lmd.counters;
        c.retrieves_total.fetch_add(1, Relaxed);
        let kv = self.lmd_instance(instance_id, now)?;
        let worker = key
            .worker_id
            .ok_or_else(|| malformed("retrieve needs worker_id"))?;
        let handle = reply_handle(event_ipc_handle);
        let refuse = |why: &dyn std::fmt::Display| {
            c.retrieves_failed_total.fetch_add(1, Relaxed);
            tracing::warn!(
                instance_id,
                request_id = %key.request_id,
                reason = %why,
                "lmcache_driven retrieve failed"
            );
            Ok(Some(encode_transfer_result(handle, false)))
        };
        let keys = self.keys_for(key, Some(worker), now)?;
        if keys.is_empty() {
            return Ok(Some(encode_transfer_result(handle, true)));
        }
        let skip = usize::try_from(skip_first_n_tokens).unwrap_or(usize::MAX);
        if let Err(e) = kv.check_blocks(block_ids, keys.len(), Some(skip)) {
            return refuse(&e);
        }
        let Some(session) = self.sessions.get(&key.request_id) else {
            return refuse(&"no lookup session for this request");
        };
        let object_len = kv.object_len();
        let leases = match take_session_locks(&session, &keys, object_len as u64) {
            Ok(l) => l,
            Err(why) => return refuse(&why),
        };
        let cs = self.cfg.chunk_size;
        let mut targets = Vec::with_capacity(leases.len());
        let mut bad_offset = None;
        for (index, lease) in leases.iter().enumerate() {
            if skip >= (index + 1) * cs {
                continue;
            }
            match usize_of(lease.alloc.offset).map(|o| self.segment.ptr_at(o, object_len)) {
                Some(Ok(p)) => targets.push(ChunkTarget {
                    index,
                    object: SendPtr(p),
                    skip_tokens: skip.saturating_sub(index * cs),
                }),
                _ => bad_offset = Some(lease.alloc.offset),
            }
        }
        if let Some(offset) = bad_offset {
            self.l1.finish_read(&leases, 1);
            return refuse(&format!(
                "L1 object at offset {offset} lies outside the segment"
            ));
        }
        // SAFETY: the block ids were checked with this skip (distinct written blocks); each
        // target is a published object read-locked by this call (so not freed or rewritten
        // until `finish_read`), inside the L1 segment, which outlives the call.
        unsafe { kv.transfer_raw(block_ids, &targets, Direction::Scatter, self.lmd.threads) };
        self.l1.finish_read(&leases, 1);
        c.retrieve_chunks_total
            .fetch_add(targets.len() as u64, Relaxed);
        c.retrieve_chunks_skipped_total
            .fetch_add((leases.len() - targets.len()) as u64, Relaxed);
        c.bytes_scattered_total
            .fetch_add((targets.len() * object_len) as u64, Relaxed);
        self.counters
            .retrieve_chunks
            .fetch_add(targets.len() as u64, Relaxed);
        self.counters
            .retrieve_bytes
            .fetch_add((targets.len() * object_len) as u64, Relaxed);
        Ok(Some(encode_transfer_result(handle, true)))
    }

    /// `POST /cache/checksums`: MD5 digests of a registered instance's engine blocks (see
    /// [`KvCacheMap::block_checksums`]), in LMCache's response format. CPU-heavy: call it off
    /// the async runtime.
    ///
    /// # Errors
    /// [`ChecksumError`] for invalid requests and unknown or refused instances.
    pub fn lmcache_driven_checksums(
        &self,
        req: &ChecksumRequest,
    ) -> Result<serde_json::Value, ChecksumError> {
        if req.block_ids.is_empty() {
            return Err(ChecksumError::BadRequest("block_ids is required".into()));
        }
        if req.chunk_size <= 0 {
            return Err(ChecksumError::BadRequest(
                "chunk_size must be positive".into(),
            ));
        }
        let inst = self
            .lmd
            .get(req.instance_id)
            .ok_or(ChecksumError::NotRegistered(req.instance_id))?;
        let kv = match &inst.kv {
            Ok(kv) => Arc::clone(kv),
            Err(reason) => return Err(ChecksumError::Refused(req.instance_id, reason.clone())),
        };
        drop(inst);
        let ids: Vec<u64> = req
            .block_ids
            .iter()
            .map(|&id| {
                u64::try_from(id)
                    .map_err(|_| ChecksumError::BadRequest(format!("block id {id} is negative")))
            })
            .collect::<Result<_, _>>()?;
        let chunk_blocks = usize::try_from(req.chunk_size).unwrap_or(usize::MAX);
        let digests = kv
            .block_checksums(&ids, chunk_blocks, req.layerwise)
            .map_err(|e| ChecksumError::BadRequest(e.to_string()))?;
        let num_chunks = ids.len().div_ceil(chunk_blocks.max(1));
        let chunk_checksums = if req.layerwise {
            let per_layer: serde_json::Map<String, serde_json::Value> = digests
                .into_iter()
                .enumerate()
                .map(|(l, d)| (format!("layer_{l}"), serde_json::json!(d)))
                .collect();
            serde_json::Value::Object(per_layer)
        } else {
            serde_json::json!(digests.into_iter().next().unwrap_or_default())
        };
        Ok(serde_json::json!({
            "status": "success",
            "chunk_size": req.chunk_size,
            "num_chunks": num_chunks,
            "chunk_checksums": chunk_checksums,
            "layerwise": req.layerwise,
            "block_id_ranges": compress_ids(&req.block_ids),
        }))
    }

    /// The `lmcache_driven` status child: every registration (or refusal) and the counters.
    pub(super) fn lmd_status(&self, now: Instant) -> StatusNode {
        let mut snapshot: Vec<(i64, Arc<Instance>)> = self
            .lmd
            .instances
            .read()
            .iter()
            .map(|(&k, v)| (k, Arc::clone(v)))
            .collect();
        snapshot.sort_unstable_by_key(|(k, _)| *k);
        let mut contexts = serde_json::Map::new();
        let (mut registered, mut refused) = (0u64, 0u64);
        for (iid, inst) in &snapshot {
            let live = *inst.live.lock();
            let common = serde_json::json!({
                "model_name": inst.model_name,
                "world_size": inst.world_size,
                "engine_type": inst.engine_type,
                "registered_seconds_ago": now.saturating_duration_since(inst.registered_at).as_secs_f64(),
                "idle_seconds": now.saturating_duration_since(live.last_seen).as_secs_f64(),
                "pinged": live.pinged,
            });
            let mut v = match &inst.kv {
                Ok(kv) => {
                    registered += 1;
                    let runs: HashSet<&'static str> = kv
                        .layers()
                        .iter()
                        .map(|l| match l.run {
                            layout::RunKind::Block => "block",
                            layout::RunKind::Token => "token",
                            layout::RunKind::Head => "head",
                            layout::RunKind::Element => "element",
                        })
                        .collect();
                    let mut runs: Vec<&str> = runs.into_iter().collect();
                    runs.sort_unstable();
                    serde_json::json!({
                        "state": "registered",
                        "geometry": kv.geometry(),
                        "object_bytes": kv.object_len(),
                        "object_shape": kv.geometry().object_shape(),
                        "num_groups": kv.num_groups(),
                        "segments": kv.segment_names().count(),
                        "mapped_bytes": kv.mapped_bytes(),
                        "copy_granularity": runs,
                    })
                }
                Err(reason) => {
                    refused += 1;
                    serde_json::json!({"state": "refused", "reason": reason})
                }
            };
            if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), common) {
                obj.extend(extra);
            }
            contexts.insert(iid.to_string(), v);
        }
        let c = &self.lmd.counters;
        let n = |a: &AtomicU64| a.load(Relaxed);
        StatusNode::healthy()
            .field("contexts", contexts)
            .field("registered_instances", registered)
            .field("refused_instances", refused)
            .field("copy_threads", self.lmd.threads.get())
            .field(
                "counters",
                serde_json::json!({
                    "registered_total": n(&c.registered_total),
                    "refused_total": n(&c.refused_total),
                    "unregistered_total": n(&c.unregistered_total),
                    "reaped_total": n(&c.reaped_total),
                    "unregistered_transfers_total": n(&c.unregistered_transfers_total),
                    "stores_total": n(&c.stores_total),
                    "stores_failed_total": n(&c.stores_failed_total),
                    "store_chunks_stored_total": n(&c.store_chunks_stored_total),
                    "store_chunks_skipped_total": n(&c.store_chunks_skipped_total),
                    "store_chunks_null_total": n(&c.store_chunks_null_total),
                    "store_chunks_rejected_total": n(&c.store_chunks_rejected_total),
                    "retrieves_total": n(&c.retrieves_total),
                    "retrieves_failed_total": n(&c.retrieves_failed_total),
                    "retrieve_chunks_total": n(&c.retrieve_chunks_total),
                    "retrieve_chunks_skipped_total": n(&c.retrieve_chunks_skipped_total),
                    "bytes_gathered_total": n(&c.bytes_gathered_total),
                    "bytes_scattered_total": n(&c.bytes_scattered_total),
                }),
            )
    }
}

fn reply_handle(sent: &[u8]) -> &[u8] {
    if sent.is_empty() {
        STUB_IPC_HANDLE
    } else {
        sent
    }
}

/// Takes one lookup lock per key out of the session (all or nothing), as `prepare_retrieve`
/// does. Fails without consuming anything if a key is not locked or has another size.
fn take_session_locks(
    session: &Arc<Mutex<Session>>,
    keys: &[ObjectKey],
    object_len: u64,
) -> Result<Vec<ReadLease>, String> {
    let mut s = session.lock();
    for (i, k) in keys.iter().enumerate() {
        match s.locks.get(k) {
            Some(h) if h.remaining > 0 && h.lease.alloc.len == object_len => {}
            Some(h) if h.remaining > 0 => {
                return Err(format!(
                    "chunk {i}: cached object is {} bytes but this instance's chunks are \
                     {object_len}",
                    h.lease.alloc.len
                ));
            }
            _ => return Err(format!("chunk {i} is not locked by the request's lookup")),
        }
    }
    let mut leases = Vec::with_capacity(keys.len());
    for k in keys {
        let Some(h) = s.locks.get_mut(k) else { break };
        h.remaining -= 1;
        leases.push(h.lease);
        if h.remaining == 0 {
            s.locks.remove(k);
        }
    }
    if leases.len() != keys.len() {
        // Only possible with a key repeated in `keys`: give back what was taken.
        for (k, lease) in keys.iter().zip(&leases) {
            s.locks
                .entry(k.clone())
                .and_modify(|h| h.remaining += 1)
                .or_insert(super::session::HeldLock {
                    lease: *lease,
                    remaining: 1,
                });
        }
        return Err("the request's chunks repeat a key".into());
    }
    Ok(leases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_proto::{CpuShmWrapper, TensorMetadata};
    use std::sync::atomic::AtomicU32;

    static SEQ: AtomicU32 = AtomicU32::new(0);

    /// xorshift64*: deterministic test randomness without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// A test-owned file in /dev/shm, removed on drop.
    struct ShmFile(String);
    impl ShmFile {
        fn new(data: &[u8]) -> Self {
            let name = format!(
                "kvtier_ut_lmd_{}_{}",
                std::process::id(),
                SEQ.fetch_add(1, Relaxed)
            );
            std::fs::write(format!("/dev/shm/{name}"), data).expect("write segment");
            Self(name)
        }
        fn read(&self) -> Vec<u8> {
            std::fs::read(format!("/dev/shm/{}", self.0)).expect("read segment")
        }
    }
    impl Drop for ShmFile {
        fn drop(&mut self) {
            let _gone = std::fs::remove_file(format!("/dev/shm/{}", self.0));
        }
    }

    const ITEM: usize = 2;
    const L: usize = 3;
    const NB: usize = 7;
    const BS: usize = 4;
    const NH: usize = 2;
    const HS: usize = 3;
    const CS: usize = 8; // two blocks per chunk

    /// (shape, names of the logical axes in shape order) for a format.
    fn logical(format: &str) -> (Vec<usize>, Vec<char>) {
        // p = plane, b = block, t = token, h = head, e = head element
        let axes: Vec<char> = match format {
            "2nbt" => "pbthe", // [2, NB, BS, NH, HS]
            "nb2t" => "bpthe", // [NB, 2, BS, NH, HS]
            "2nbh" => "pbhte", // [2, NB, NH, BS, HS]
            "nb2h" => "bphte", // [NB, 2, NH, BS, HS]
            _ => "bte",        // MLA [NB, BS, HS]
        }
        .chars()
        .collect();
        let size = |c: char| match c {
            'p' => 2,
            'b' => NB,
            't' => BS,
            'h' => NH,
            _ => HS,
        };
        (axes.iter().map(|&c| size(c)).collect(), axes)
    }

    /// Element strides for `shape` laid out physically in `order` (outermost first), with
    /// `pad[i]` spare elements after each extent of axis i.
    fn strides(shape: &[usize], order: &[usize], pad: &[usize]) -> (Vec<u64>, usize) {
        let mut st = vec![0u64; shape.len()];
        let mut step = 1usize;
        for &ax in order.iter().rev() {
            st[ax] = step as u64;
            step *= shape[ax] + pad[ax];
        }
        (st, step)
    }

    struct Case {
        kv: KvCacheMap,
        files: Vec<ShmFile>,
        axes: Vec<char>,
        metas: Vec<TensorMetadata>,
    }

    fn build(format: &str, mode: usize, rng: &mut Rng) -> Case {
        let (shape, axes) = logical(format);
        let mut files = Vec::new();
        let mut wrappers = Vec::new();
        let mut metas = Vec::new();
        for _ in 0..L {
            let n = shape.len();
            let mut order: Vec<usize> = (0..n).collect();
            let mut pad = vec![0usize; n];
            match mode {
                0 => {}
                1 => pad[n - 1] = 1,
                _ => {
                    for i in (1..n).rev() {
                        order.swap(i, rng.below(i + 1));
                    }
                    for p in &mut pad {
                        *p = rng.below(2);
                    }
                }
            }
            let (stride, numel) = strides(&shape, &order, &pad);
            let offset = if mode == 0 { 0 } else { rng.below(5) };
            let nbytes = (numel + offset) * ITEM;
            let file = ShmFile::new(&rng.bytes(nbytes));
            let meta = TensorMetadata {
                dtype: "float16".into(),
                shape: shape.iter().map(|&v| v as u64).collect(),
                stride,
                storage_offset: offset as u64,
                device_uuid: "cpu".into(),
            };
            wrappers.push(DeviceIpcWrapper::CpuShm(CpuShmWrapper {
                version: 1,
                metadata: meta.clone(),
                shm_name: format!("/{}", file.0),
                nbytes: nbytes as u64,
            }));
            metas.push(meta);
            files.push(file);
        }
        let hint = if format.ends_with('h') { "HND" } else { "NHD" };
        let hints = vec![("kv_layout".to_owned(), hint.to_owned())];
        let kv = KvCacheMap::map(&wrappers, &hints, &[], CS, None).expect("map");
        Case {
            kv,
            files,
            axes,
            metas,
        }
    }

    /// Byte offset in a layer file of element (p, blk, t, h, e).
    fn engine_off(c: &Case, layer: usize, idx: [usize; 5]) -> usize {
        let m = &c.metas[layer];
        let mut off = m.storage_offset as usize;
        for (i, &a) in c.axes.iter().enumerate() {
            let v = match a {
                'p' => idx[0],
                'b' => idx[1],
                't' => idx[2],
                'h' => idx[3],
                _ => idx[4],
            };
            off += v * m.stride[i] as usize;
        }
        off * ITEM
    }

    fn planes(c: &Case) -> usize {
        if c.axes.contains(&'p') { 2 } else { 1 }
    }

    /// Calls `f(chunk, plane, layer, token_in_chunk, head, elem, object_offset, engine_idx)`.
    fn each(
        c: &Case,
        ids: &[u64],
        chunks: usize,
        mut f: impl FnMut(usize, usize, [usize; 5], usize),
    ) {
        let (pl, nh, hs) = (planes(c), if planes(c) == 2 { NH } else { 1 }, HS);
        let row = nh * hs * ITEM;
        for ch in 0..chunks {
            for p in 0..pl {
                for l in 0..L {
                    for t in 0..CS {
                        let blk = ids[ch * (CS / BS) + t / BS] as usize;
                        for h in 0..nh {
                            for e in 0..hs {
                                let obj = ch * c.kv.object_len()
                                    + ((p * L + l) * CS + t) * row
                                    + (h * hs + e) * ITEM;
                                f(ch * CS + t, l, [p, blk, t % BS, h, e], obj);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gather_and_scatter_match_a_naive_reference_for_every_layout() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let threads = [NonZeroUsize::MIN, NonZeroUsize::new(3).expect("3")];
        for format in ["2nbt", "nb2t", "2nbh", "nb2h", "mla"] {
            for mode in 0..4 {
                let mut c = build(format, mode, &mut rng);
                c.kv.set_parallel_min_bytes(0);
                let chunks = 2;
                let mut perm: Vec<u64> = (0..NB as u64).collect();
                for i in (1..perm.len()).rev() {
                    perm.swap(i, rng.below(i + 1));
                }
                let ids = vec![perm[..chunks * CS / BS].to_vec()];
                let before: Vec<Vec<u8>> = c.files.iter().map(ShmFile::read).collect();
                for &th in &threads {
                    // Gather.
                    let mut obj = vec![0u8; chunks * c.kv.object_len()];
                    c.kv.gather(&ids, &mut obj, th).expect("gather");
                    each(&c, &ids[0], chunks, |_, l, idx, o| {
                        let e = engine_off(&c, l, idx);
                        assert_eq!(
                            obj[o..o + ITEM],
                            before[l][e..e + ITEM],
                            "{format} mode {mode}: gather layer {l} {idx:?}"
                        );
                    });
                    // Scatter with a skip.
                    let skip = rng.below(chunks * CS + 1);
                    let src = rng.bytes(chunks * c.kv.object_len());
                    let base: Vec<Vec<u8>> = c.files.iter().map(ShmFile::read).collect();
                    c.kv.scatter(&ids, &src, skip, th).expect("scatter");
                    let after: Vec<Vec<u8>> = c.files.iter().map(ShmFile::read).collect();
                    let mut want = base.clone();
                    each(&c, &ids[0], chunks, |tok, l, idx, o| {
                        if tok >= skip {
                            let e = engine_off(&c, l, idx);
                            want[l][e..e + ITEM].copy_from_slice(&src[o..o + ITEM]);
                        }
                    });
                    assert!(want == after, "{format} mode {mode} skip {skip}: scatter");
                    // Restore for the next thread count.
                    for (f, b) in c.files.iter().zip(&before) {
                        std::fs::write(format!("/dev/shm/{}", f.0), b).expect("restore");
                    }
                }
            }
        }
    }

    #[test]
    fn block_checks() {
        let mut rng = Rng(7);
        let c = build("2nbt", 0, &mut rng);
        let kv = &c.kv;
        assert_eq!(kv.num_groups(), 1);
        assert!(kv.check_blocks(&[vec![1, 2, 3, 4]], 2, None).is_ok());
        assert!(matches!(
            kv.check_blocks(&[vec![1, 2, 3]], 2, None),
            Err(BlockError::Underflow { want: 4, .. })
        ));
        assert!(matches!(
            kv.check_blocks(&[vec![1, 2], vec![3, 4]], 1, None),
            Err(BlockError::Groups { got: 2, want: 1 })
        ));
        assert!(matches!(
            kv.check_blocks(&[vec![1, NB as u64]], 1, None),
            Err(BlockError::OutOfRange { .. })
        ));
        // Repeats matter only among the blocks written.
        assert!(kv.check_blocks(&[vec![1, 1, 3, 4]], 2, None).is_ok());
        assert!(matches!(
            kv.check_blocks(&[vec![1, 1, 3, 4]], 2, Some(0)),
            Err(BlockError::Repeated { id: 1, .. })
        ));
        assert!(kv.check_blocks(&[vec![1, 1, 3, 4]], 2, Some(BS)).is_ok());
        assert!(kv.chunk_is_null(&[vec![0, 0, 3, 4]], 0));
        assert!(!kv.chunk_is_null(&[vec![0, 0, 3, 4]], 1));
        let mut small = vec![0u8; kv.object_len() - 1];
        assert!(matches!(
            kv.gather(&[vec![1, 2]], &mut small, NonZeroUsize::MIN),
            Err(BlockError::BufferLen { .. })
        ));
    }

    #[test]
    fn refusals_name_the_reason() {
        let other = DeviceIpcWrapper::Other {
            type_name: "cuda".into(),
            raw: Vec::new(),
        };
        let e = KvCacheMap::map(&[other], &[], &[], CS, None).expect_err("cuda");
        assert!(e.to_string().contains("\"cuda\""), "{e}");
        assert!(matches!(
            KvCacheMap::map(&[], &[], &[], CS, None),
            Err(RegisterError::Layout(LayoutError::Empty))
        ));
        let missing = DeviceIpcWrapper::CpuShm(CpuShmWrapper {
            version: 1,
            metadata: TensorMetadata {
                dtype: "float16".into(),
                shape: vec![NB as u64, BS as u64, HS as u64],
                stride: vec![(BS * HS) as u64, HS as u64, 1],
                storage_offset: 0,
                device_uuid: "cpu".into(),
            },
            shm_name: "/kvtier_ut_lmd_does_not_exist".into(),
            nbytes: (NB * BS * HS * ITEM) as u64,
        });
        let e = KvCacheMap::map(&[missing], &[], &[], CS, None).expect_err("missing");
        assert!(matches!(e, RegisterError::Map { layer: 0, .. }), "{e}");
    }

    #[test]
    fn groups_partition_layers() {
        let mut rng = Rng(11);
        let c = build("2nbt", 0, &mut rng);
        let g = c.kv.geometry().clone();
        let info = |id: u32, layers: &[u32]| EngineGroupInfo {
            engine_group_id: id,
            layer_indices: layers.to_vec(),
            tokens_per_block: BS as u32,
            sw_size_tokens: -1,
            extra_object_group_tag: 0,
        };
        let (map, n) = resolve_groups(&[info(0, &[0, 2]), info(1, &[1])], &g).expect("ok");
        assert_eq!((map, n), (vec![0, 1, 0], 2));
        assert!(
            resolve_groups(&[info(0, &[0, 1])], &g).is_err(),
            "layer 2 missing"
        );
        assert!(resolve_groups(&[info(0, &[0, 1, 2]), info(1, &[1])], &g).is_err());
        assert!(resolve_groups(&[info(0, &[0, 1, 2, 3])], &g).is_err());
        let mut sw = info(0, &[0, 1, 2]);
        sw.sw_size_tokens = 128;
        assert!(resolve_groups(&[sw], &g).is_err());
        let mut compressed = info(0, &[0, 1, 2]);
        compressed.tokens_per_block = (BS * 2) as u32;
        assert!(resolve_groups(&[compressed], &g).is_err());
    }

    #[test]
    fn l1_granules_are_populated_once() {
        let name = format!("kvtier_ut_lmd_l1_{}", std::process::id());
        let seg = ShmSegment::create(&name, 1 << 20, kvtier_core::shm::ShmOptions::default())
            .expect("segment");
        let pages = L1Pages::new(seg.len());
        assert_eq!(pages.bits.len(), 1); // 16 granules
        pages.ensure(&seg, 100, 100 << 10); // granules 0..=1
        assert!(pages.is_set(0) && pages.is_set(1) && !pages.is_set(2));
        pages.ensure(&seg, (1 << 20) - 1, 1); // the last granule
        assert!(pages.is_set(15) && !pages.is_set(14));
        pages.ensure(&seg, 0, 0);
        // Past the bitmap: treated as done; past the segment: never touched.
        assert!(pages.is_set(1000));
        pages.ensure(&seg, 2 << 20, 4096);
        // Populating allocated the granules' pages in the segment (and only those).
        let st = std::fs::metadata(format!("/dev/shm/{name}")).expect("stat");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(st.blocks() * 512, 3 * L1_GRANULE as u64);
    }

    #[test]
    fn compress_like_lmcache() {
        let c = |v: &[i64]| serde_json::Value::Array(compress_ids(v)).to_string();
        assert_eq!(c(&[1, 2, 3, 4, 5, 9, 10, 11, 12]), "[[1,5],[9,12]]");
        assert_eq!(c(&[5, 3, 1, 2, 4]), "[5,3,1,2,4]");
        assert_eq!(c(&[1, 2, 3, 4, 5, 7, 8]), "[[1,5],7,8]");
        assert_eq!(c(&[]), "[]");
    }
}
