//! The gather/scatter kernels of the lmcache_driven path.
//!
//! A chunk is copied in units of one (plane, layer) pair; each unit walks the chunk's engine
//! blocks and copies the longest contiguous run the layer's strides allow (a whole block for
//! contiguous NHD tensors, one token or one head vector otherwise, one element at worst; see
//! [`RunKind`]). Units write disjoint bytes (distinct object ranges when gathering; distinct
//! engine blocks when scattering, which the caller guarantees by refusing repeated block ids),
//! so they run on scoped threads without synchronisation. Engine memory is shared with another
//! process that may write it at any time: only raw pointers are used, never references.

use std::num::NonZeroUsize;
use std::ops::Range;
use std::ptr::{self, NonNull};

use super::layout::{KvGeometry, LayerLayout, RunKind};

/// Below this many bytes a transfer runs on the calling thread only.
pub const PARALLEL_MIN_BYTES: usize = 4 << 20;

/// Pieces of at least this many bytes are written with streaming stores (`kvtier_copy`), in
/// both directions: the object a gather fills is read next by an engine or by write-behind, the
/// engine blocks a scatter fills by the engine, never by this thread, so reading each
/// destination line into the cache first (what an ordinary store does) only costs. A head
/// vector (256 bytes at fp16 × 128) qualifies; single elements do not. Each thread's share ends
/// with a store fence (`run_transfer`). `cargo bench -p kvtier-server --bench
/// lmcache_driven_copy` measures it (docs/performance.md).
const STREAM_MIN_BYTES: usize = 64;

/// Which way a transfer copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Engine blocks → cached object (`store`).
    Gather,
    /// Cached object → engine blocks (`retrieve`).
    Scatter,
}

/// A raw pointer that may cross threads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendPtr(pub NonNull<u8>);

// SAFETY: the pointer is only dereferenced by the copy kernels, whose callers guarantee that
// the memory stays mapped for the whole transfer and that concurrent units write disjoint
// bytes (see the module docs).
unsafe impl Send for SendPtr {}
// SAFETY: as above; `SendPtr` itself has no interior state.
unsafe impl Sync for SendPtr {}

/// One chunk of a transfer: which chunk of the request it is and where its object lives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkTarget {
    /// Chunk index relative to the request's first chunk (selects its block ids).
    pub index: usize,
    /// Start of the chunk's object (`object_len` bytes).
    pub object: SendPtr,
    /// Tokens at the start of the chunk that must not be copied.
    pub skip_tokens: usize,
}

/// Everything the kernels need about a registration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KernelView<'a> {
    pub geometry: &'a KvGeometry,
    pub layers: &'a [LayerLayout],
    /// Base pointer of each segment.
    pub segments: &'a [SendPtr],
    /// KV group of each layer.
    pub layer_group: &'a [usize],
}

/// Runs a transfer of `chunks` on up to `threads` threads (the caller decides whether the
/// transfer is large enough to split).
///
/// # Safety
/// - Every segment pointer is the start of a live mapping that contains every layer's span.
/// - Every `ChunkTarget::object` points to `geometry.object_len()` bytes that stay valid for the
///   call; during it nobody else touches them (gather writes them) or writes them (scatter reads
///   them).
/// - `block_ids[g]` holds at least `(index + 1) * blocks_per_chunk` ids for every chunk index,
///   every id is `< num_blocks`, and for a scatter no id appears twice among the blocks written.
pub(crate) unsafe fn run_transfer(
    view: KernelView<'_>,
    block_ids: &[&[u64]],
    chunks: &[ChunkTarget],
    dir: Direction,
    threads: NonZeroUsize,
) {
    let g = view.geometry;
    let per_chunk = g.planes() * g.num_layers;
    let units = chunks.len() * per_chunk;
    if units == 0 {
        return;
    }
    let threads = threads.get().min(units);
    let run = |range: Range<usize>| {
        for u in range {
            let (c, rest) = (u / per_chunk, u % per_chunk);
            let (plane, layer) = (rest / g.num_layers, rest % g.num_layers);
            let Some(chunk) = chunks.get(c) else { continue };
            // SAFETY: forwarded from this function's contract.
            unsafe { copy_unit(view, block_ids, chunk, plane, layer, dir) };
        }
        // The streaming stores, ordered before this thread's share is reported done.
        kvtier_copy::store_fence();
    };
    if threads <= 1 {
        run(0..units);
        return;
    }
    let per = units.div_ceil(threads);
    std::thread::scope(|s| {
        let run = &run;
        for t in 1..threads {
            let range = (t * per).min(units)..((t + 1) * per).min(units);
            let spawned = std::thread::Builder::new()
                .name(format!("kvtier-kvcopy-{t}"))
                .spawn_scoped(s, move || run(range.clone()));
            if spawned.is_err() {
                // No thread to be had: do the share here, after our own.
                run((t * per).min(units)..((t + 1) * per).min(units));
            }
        }
        run(0..per.min(units));
    });
}

/// Copies one (plane, layer) of one chunk.
///
/// # Safety
/// See [`run_transfer`].
unsafe fn copy_unit(
    view: KernelView<'_>,
    block_ids: &[&[u64]],
    chunk: &ChunkTarget,
    plane: usize,
    layer: usize,
    dir: Direction,
) {
    let g = view.geometry;
    let (Some(l), Some(&group)) = (view.layers.get(layer), view.layer_group.get(layer)) else {
        return;
    };
    let (Some(seg), Some(ids)) = (view.segments.get(l.segment), block_ids.get(group)) else {
        return;
    };
    let bpc = g.blocks_per_chunk();
    let Some(ids) = ids.get(chunk.index * bpc..(chunk.index + 1) * bpc) else {
        return;
    };
    let bs = g.block_size;
    let row = g.row_bytes();
    let item = g.itemsize;
    let hs_bytes = g.head_size * item;
    let obj_plane = g.object_offset(plane, layer, 0);
    for (j, &id) in ids.iter().enumerate() {
        let first = chunk.skip_tokens.saturating_sub(j * bs);
        if first >= bs {
            continue;
        }
        let block = l.base + plane * l.plane_stride + id as usize * l.block_stride;
        let obj_block = obj_plane + j * bs * row;
        // SAFETY (all `copy` calls below): the engine offsets are index combinations within the
        // layer's validated shape (block id < NB by contract), so they lie inside the layer's
        // span within the mapping; the object offsets are < object_len by construction.
        match l.run {
            RunKind::Block => unsafe {
                copy(
                    dir,
                    seg.0,
                    block + first * l.token_stride,
                    chunk.object.0,
                    obj_block + first * row,
                    (bs - first) * row,
                );
            },
            RunKind::Token => {
                for t in first..bs {
                    unsafe {
                        copy(
                            dir,
                            seg.0,
                            block + t * l.token_stride,
                            chunk.object.0,
                            obj_block + t * row,
                            row,
                        );
                    }
                }
            }
            RunKind::Head => {
                for t in first..bs {
                    for h in 0..g.num_heads {
                        unsafe {
                            copy(
                                dir,
                                seg.0,
                                block + t * l.token_stride + h * l.head_stride,
                                chunk.object.0,
                                obj_block + t * row + h * hs_bytes,
                                hs_bytes,
                            );
                        }
                    }
                }
            }
            RunKind::Element => {
                for t in first..bs {
                    for h in 0..g.num_heads {
                        for e in 0..g.head_size {
                            unsafe {
                                copy(
                                    dir,
                                    seg.0,
                                    block
                                        + t * l.token_stride
                                        + h * l.head_stride
                                        + e * l.elem_stride,
                                    chunk.object.0,
                                    obj_block + t * row + h * hs_bytes + e * item,
                                    item,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Copies `len` bytes between `engine + engine_off` and `object + object_off`.
///
/// # Safety
/// Both ranges are inside live mappings/allocations and do not overlap each other.
#[inline(always)]
unsafe fn copy(
    dir: Direction,
    engine: NonNull<u8>,
    engine_off: usize,
    object: NonNull<u8>,
    object_off: usize,
    len: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let e = engine.as_ptr().add(engine_off);
        let o = object.as_ptr().add(object_off);
        let (from, to) = match dir {
            Direction::Gather => (e.cast_const(), o),
            Direction::Scatter => (o.cast_const(), e),
        };
        if len >= STREAM_MIN_BYTES {
            kvtier_copy::copy_streaming_unfenced(from, to, len);
        } else {
            ptr::copy_nonoverlapping(from, to, len);
        }
    }
}
