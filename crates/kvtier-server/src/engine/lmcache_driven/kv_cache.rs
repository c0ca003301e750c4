//! An engine's registered KV cache ([`KvCacheMap`]): validation of a `register_kv_cache`
//! payload against the mapped segments, KV-group resolution, block-id checks, and the
//! gather/scatter entry points of the copy kernels ([`super::layout`]).
//!
//! Block ids: `block_ids[g]` lists, for KV group `g`, the engine blocks of the tokens
//! `[key.start, key.end)` in order; chunk `i` uses `block_ids[g][i*bpc .. (i+1)*bpc]` with
//! `bpc = chunk_size / block_size`. Ids past what the range needs are ignored; too few ids, an
//! id `>= num_blocks` or a group count that differs from the registration fail the whole call
//! before anything is reserved or copied.
//!
//! Safety model: the engine owns the segments and may write them at any time, so nothing here
//! forms Rust references over engine memory; the kernels use raw pointers only, and callers
//! keep the objects' L1 memory stable (write ticket or read locks) during a copy.
//!
//! Faults: the engine may also shrink a segment. Every mapping is guarded ([`super::fault`]):
//! a copy that touches lost pages finishes on zero pages, and [`KvCacheMap::transfer_raw`]
//! checks the segments' fault flags before and after the copy and reports a
//! [`SegmentFault`]; the caller must then treat whatever was copied as garbage (a gather's
//! objects are aborted, never published). Once faulted, a registration stays faulted: every
//! later transfer fails before copying until the engine registers again.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use kvtier_proto::{DeviceIpcWrapper, EngineGroupInfo};

use super::kernels::{self, ChunkTarget, Direction, KernelView, SendPtr};
use super::layout::{self, KvGeometry, KvLayoutHint, LayerLayout, LayoutError};
use super::mapping::{EngineSegment, FileId, MapError};

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

/// An engine segment of the registration lost pages under the server (the engine truncated or
/// shrank it): the copy that noticed it, and every later one, is void.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "engine segment {segment:?} was truncated by its owner while mapped; the lost pages were \
     replaced with zeros, so this registration can no longer be copied from or to (the engine \
     must register its KV cache again)"
)]
pub struct SegmentFault {
    /// The segment's name.
    pub segment: String,
}

/// Why a [`KvCacheMap::gather`] / [`KvCacheMap::scatter`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// The buffer or the block ids do not fit (nothing was copied).
    #[error(transparent)]
    Blocks(#[from] BlockError),
    /// An engine segment faulted (before or during the copy).
    #[error(transparent)]
    Fault(#[from] SegmentFault),
}

/// An engine's registered KV cache: validated geometry, per-layer strides and the mapped
/// segments. Public so that benchmarks and tests can drive the copy kernels directly.
#[derive(Debug)]
pub struct KvCacheMap {
    pub(super) geometry: KvGeometry,
    pub(super) layers: Vec<LayerLayout>,
    segments: Vec<EngineSegment>,
    pub(super) segment_ptrs: Vec<SendPtr>,
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
            parallel_min_bytes: kernels::PARALLEL_MIN_BYTES,
        })
    }

    /// Transfers smaller than this run on the calling thread only (default
    /// [`kernels::PARALLEL_MIN_BYTES`]).
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

    /// The first segment that faulted (lost pages under the server), if any. O(segments),
    /// one atomic load each.
    pub fn fault(&self) -> Option<SegmentFault> {
        self.segments
            .iter()
            .find(|s| s.faulted())
            .map(|s| SegmentFault {
                segment: s.name().to_owned(),
            })
    }

    fn check_fault(&self) -> Result<(), SegmentFault> {
        self.fault().map_or(Ok(()), Err)
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
    /// # Errors
    /// [`SegmentFault`] when a segment faulted before the call (nothing is copied) or during it
    /// (the copy finished on zero pages: a gather's objects hold garbage, a scatter's writes
    /// may be partly lost).
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
    ) -> Result<(), SegmentFault> {
        self.check_fault()?;
        let ids: Vec<&[u64]> = block_ids.iter().map(Vec::as_slice).collect();
        let bytes = targets.len().saturating_mul(self.object_len());
        let threads = if bytes < self.parallel_min_bytes {
            NonZeroUsize::MIN
        } else {
            threads
        };
        // SAFETY: the segments are mapped for as long as `self` lives (and stay mapped if the
        // engine shrinks them: the fault guard replaces lost pages), and every layer's span was
        // checked against its mapping; the rest is the caller's contract.
        unsafe { kernels::run_transfer(self.view(), &ids, targets, dir, threads) };
        self.check_fault()
    }

    /// Gathers `dst.len() / object_len()` chunks (chunk `i` of the range into
    /// `dst[i*object_len..]`) from the engine blocks.
    ///
    /// # Errors
    /// [`TransferError::Blocks`] when the buffer or the block ids do not fit,
    /// [`TransferError::Fault`] when a segment faulted (`dst` then holds garbage).
    pub fn gather(
        &self,
        block_ids: &[Vec<u64>],
        dst: &mut [u8],
        threads: NonZeroUsize,
    ) -> Result<(), TransferError> {
        let chunks = self.chunks_in(dst.len())?;
        self.check_blocks(block_ids, chunks, None)?;
        let base = NonNull::from(&mut *dst).cast::<u8>();
        let targets = self.targets(base, chunks, 0);
        // SAFETY: the block ids were checked; `dst` is an exclusive local buffer of
        // `chunks * object_len` bytes, borrowed for the whole call.
        unsafe { self.transfer_raw(block_ids, &targets, Direction::Gather, threads) }?;
        Ok(())
    }

    /// Scatters `src.len() / object_len()` chunks into the engine blocks, writing no token
    /// before `skip_tokens` (counted from the first chunk).
    ///
    /// # Errors
    /// [`TransferError::Blocks`] when the buffer or the block ids do not fit,
    /// [`TransferError::Fault`] when a segment faulted.
    pub fn scatter(
        &self,
        block_ids: &[Vec<u64>],
        src: &[u8],
        skip_tokens: usize,
        threads: NonZeroUsize,
    ) -> Result<(), TransferError> {
        let chunks = self.chunks_in(src.len())?;
        self.check_blocks(block_ids, chunks, Some(skip_tokens))?;
        // Only read through this pointer (the scatter direction reads the object).
        let base = NonNull::from(src).cast::<u8>();
        let targets = self.targets(base, chunks, skip_tokens);
        // SAFETY: the block ids were checked (distinct written blocks); `src` is borrowed for
        // the whole call and only read.
        unsafe { self.transfer_raw(block_ids, &targets, Direction::Scatter, threads) }?;
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
}

/// Visits, in logical order, the offsets of every run of axes `[0, run_from)` of `l`, the
/// block axis `b` taking the values `ids`.
pub(super) fn walk(
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_proto::{CpuShmWrapper, TensorMetadata};
    use std::sync::atomic::AtomicU32;
    use std::sync::atomic::Ordering::Relaxed;

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
            // LMCache's name form (the only one registration accepts); unique to this process.
            let name = format!(
                "lmcache_kv_{}_{}",
                std::process::id(),
                800_000 + SEQ.fetch_add(1, Relaxed)
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
            Err(TransferError::Blocks(BlockError::BufferLen { .. }))
        ));
    }

    #[test]
    fn a_segment_truncated_under_a_transfer_fails_it_and_every_later_one() {
        let mut rng = Rng(13);
        let c = build("2nbt", 0, &mut rng);
        let ids = vec![vec![1, 2, 3, 4]];
        let mut obj = vec![0u8; 2 * c.kv.object_len()];
        c.kv.gather(&ids, &mut obj, NonZeroUsize::MIN)
            .expect("gather before the truncation");
        assert!(c.kv.fault().is_none());
        let victim = &c.files[1];
        std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/dev/shm/{}", victim.0))
            .expect("open")
            .set_len(0)
            .expect("truncate");
        // The copy touches the lost pages: contained, reported, named.
        let e = c.kv.gather(&ids, &mut obj, NonZeroUsize::MIN);
        let Err(TransferError::Fault(f)) = e else {
            panic!("expected a fault, got {e:?}");
        };
        assert_eq!(f.segment, victim.0);
        assert!(f.to_string().contains("truncated"), "{f}");
        assert_eq!(c.kv.fault(), Some(f.clone()));
        // Sticky: a scatter fails before copying, a block check still comes first.
        assert_eq!(
            c.kv.scatter(&ids, &obj, 0, NonZeroUsize::MIN),
            Err(TransferError::Fault(f))
        );
        assert!(matches!(
            c.kv.gather(&[vec![1]], &mut obj, NonZeroUsize::MIN),
            Err(TransferError::Blocks(_))
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
}
