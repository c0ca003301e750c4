//! Engine KV-cache layouts of the lmcache_driven path (the copy kernels are in
//! [`super::kernels`]).
//!
//! An engine registers one KV tensor per layer. All layers must share one logical geometry
//! (format, number of blocks, block size, heads, head size, dtype); strides and storage offsets
//! may differ per layer and need not be contiguous, as long as every element lies inside the
//! registered memory and no two elements of the engine's KV share a byte.
//!
//! Per-layer formats (LMCache's `EngineKVFormat` names; the `kv_layout` hint decides between
//! the NHD and HND variants because the shape alone cannot tell `BS` from `NH`):
//!
//! | rank | shape                 | hint | format                 | typical engine        |
//! |------|-----------------------|------|------------------------|-----------------------|
//! | 5    | `[2, NB, BS, NH, HS]` | NHD  | `NL_X_TWO_NB_BS_NH_HS` | vLLM flash-attn       |
//! | 5    | `[NB, 2, BS, NH, HS]` | NHD  | `NL_X_NB_TWO_BS_NH_HS` | vLLM flashinfer       |
//! | 5    | `[2, NB, NH, BS, HS]` | HND  | `NL_X_TWO_NB_NH_BS_HS` | vLLM CPU / HND        |
//! | 5    | `[NB, 2, NH, BS, HS]` | HND  | `NL_X_NB_TWO_NH_BS_HS` | flashinfer HND        |
//! | 3    | `[NB, BS, HS]`        | any  | `NL_X_NB_BS_HS`        | MLA                   |
//!
//! A rank-5 shape whose first axis is 2 is read as K/V-first (as LMCache does), otherwise a
//! second axis of 2 means blocks-first. Without a hint the layout is HND, which is what
//! LMCache assumes for registrations that reach a CPU-only server. Anything else (fused K/V
//! rank-4 tensors, the fp8 DSA indexer plane, cross-layer tensors) is refused with a reason.
//!
//! The cached object of one chunk has the layout the engine-driven path uses, so a chunk stored
//! one way can be retrieved the other way: `[2, num_layers, chunk_size, num_heads * head_size]`
//! (K plane then V plane, layer-major, token-major, heads then head elements within a token),
//! or `[num_layers, chunk_size, head_size]` for MLA.
//!
//! Kernels: a chunk is copied in units of one (plane, layer) pair; each unit walks the chunk's
//! engine blocks and copies the longest contiguous run the layer's strides allow (a whole block
//! for contiguous NHD tensors, one token or one head vector otherwise, one element at worst).
//! Units write disjoint bytes (distinct object ranges when gathering; distinct engine blocks
//! when scattering, which the caller guarantees by refusing repeated block ids), so they run on
//! scoped threads without synchronisation.

use std::ops::Range;

use kvtier_proto::TensorMetadata;
use serde::Serialize;

/// Why a KV registration's layout was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// No tensors were registered.
    #[error("no KV tensors were registered")]
    Empty,
    /// The `kv_layout` hint is not one kvtier understands.
    #[error("kv_layout hint {0:?} is not supported (expected NHD or HND)")]
    BadHint(String),
    /// The dtype is unknown.
    #[error("layer {layer}: unknown dtype {dtype:?}")]
    UnknownDtype {
        /// Layer index.
        layer: usize,
        /// The dtype as sent.
        dtype: String,
    },
    /// The tensor shape is not a supported vLLM KV layout.
    #[error("layer {layer}: shape {shape:?} is not a supported KV layout: {why}")]
    UnsupportedShape {
        /// Layer index.
        layer: usize,
        /// The shape as sent.
        shape: Vec<u64>,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Layers disagree on geometry or dtype.
    #[error("layer {layer}: {what} differs from layer 0 ({got} vs {want})")]
    Mismatch {
        /// Layer index.
        layer: usize,
        /// Which property.
        what: &'static str,
        /// Layer 0's value.
        want: String,
        /// This layer's value.
        got: String,
    },
    /// `stride` does not have one entry per dimension.
    #[error("layer {layer}: stride {stride:?} does not match shape {shape:?}")]
    StrideRank {
        /// Layer index.
        layer: usize,
        /// The shape.
        shape: Vec<u64>,
        /// The strides.
        stride: Vec<u64>,
    },
    /// The tensor view reaches past the registered memory.
    #[error(
        "layer {layer}: the view (storage_offset {storage_offset}, shape {shape:?}, stride \
         {stride:?}, {itemsize}-byte elements) needs {needed} bytes but the segment has {nbytes}"
    )]
    OutOfBounds {
        /// Layer index.
        layer: usize,
        /// Storage offset in elements.
        storage_offset: u64,
        /// Shape.
        shape: Vec<u64>,
        /// Strides in elements.
        stride: Vec<u64>,
        /// Element size.
        itemsize: usize,
        /// Bytes the view spans (from the start of the segment).
        needed: u128,
        /// Bytes registered.
        nbytes: u64,
    },
    /// Two elements of one tensor share memory.
    #[error("layer {layer}: strides {stride:?} make elements of shape {shape:?} overlap")]
    SelfOverlap {
        /// Layer index.
        layer: usize,
        /// Shape.
        shape: Vec<u64>,
        /// Strides in elements.
        stride: Vec<u64>,
    },
    /// Two layers share memory.
    #[error("layers {a} and {b} overlap in shared-memory segment {segment:?}")]
    LayersOverlap {
        /// First layer.
        a: usize,
        /// Second layer.
        b: usize,
        /// The segment.
        segment: String,
    },
    /// The chunk size is not a whole number of blocks.
    #[error("chunk size {chunk_size} is not a multiple of the engine block size {block_size}")]
    ChunkSize {
        /// Server chunk size in tokens.
        chunk_size: usize,
        /// Engine block size in tokens.
        block_size: usize,
    },
    /// The KV groups do not partition the layers, or use features kvtier does not serve.
    #[error("engine group {group}: {why}")]
    Groups {
        /// Group id (or index when ids are not usable).
        group: u64,
        /// What is wrong.
        why: String,
    },
    /// A size does not fit in this machine's address space.
    #[error("the KV layout is too large to address")]
    TooLarge,
}

pub use super::format::{KvFormat, KvLayoutHint};
pub use kvtier_proto::dtype_itemsize;

/// The geometry shared by every registered layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvGeometry {
    /// Per-layer format.
    pub kv_format: KvFormat,
    /// The layout hint in force.
    pub kv_layout: KvLayoutHint,
    /// Number of layers (registered tensors).
    pub num_layers: usize,
    /// Engine blocks per layer.
    pub num_blocks: usize,
    /// Tokens per engine block.
    pub block_size: usize,
    /// KV heads (1 for MLA).
    pub num_heads: usize,
    /// Elements per head.
    pub head_size: usize,
    /// dtype name as registered.
    pub dtype: String,
    /// Bytes per element.
    pub itemsize: usize,
    /// Tokens per chunk (the server's chunk size).
    pub chunk_size: usize,
}

impl KvGeometry {
    /// K and V planes (2), or 1 for MLA.
    pub fn planes(&self) -> usize {
        if self.kv_format.is_mla() { 1 } else { 2 }
    }

    /// Elements per token per layer per plane (`num_heads * head_size`).
    pub fn hidden(&self) -> usize {
        self.num_heads * self.head_size
    }

    /// Bytes per token per layer per plane.
    pub fn row_bytes(&self) -> usize {
        self.hidden() * self.itemsize
    }

    /// Engine blocks per chunk.
    pub fn blocks_per_chunk(&self) -> usize {
        self.chunk_size / self.block_size
    }

    /// Bytes of one cached chunk object.
    pub fn object_len(&self) -> usize {
        self.planes() * self.num_layers * self.chunk_size * self.row_bytes()
    }

    /// Shape of the cached object, as the engine-driven path describes it.
    pub fn object_shape(&self) -> Vec<u64> {
        let mut s = Vec::with_capacity(4);
        if !self.kv_format.is_mla() {
            s.push(2);
        }
        s.extend([self.num_layers, self.chunk_size, self.hidden()].map(|v| v as u64));
        s
    }

    /// Byte offset in an object of `(plane, layer, token)`.
    pub(super) fn object_offset(&self, plane: usize, layer: usize, token: usize) -> usize {
        ((plane * self.num_layers + layer) * self.chunk_size + token) * self.row_bytes()
    }
}

/// How much of a block the innermost copy of a layer covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// Consecutive tokens are contiguous and in object order: one copy per block.
    Block,
    /// A token's heads are contiguous: one copy per token.
    Token,
    /// A head's elements are contiguous: one copy per (token, head).
    Head,
    /// One copy per element.
    Element,
}

impl RunKind {
    /// Lower-case name for the status tree.
    pub fn name(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Token => "token",
            Self::Head => "head",
            Self::Element => "element",
        }
    }
}

/// One layer's tensor, resolved to byte strides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLayout {
    /// Index of the segment (in the registration's segment list) holding the tensor.
    pub segment: usize,
    /// Byte offset of element `[0, ..., 0]` in the segment.
    pub base: usize,
    /// Bytes between K and V planes (0 for MLA).
    pub plane_stride: usize,
    /// Bytes between consecutive blocks.
    pub block_stride: usize,
    /// Bytes between consecutive tokens of a block.
    pub token_stride: usize,
    /// Bytes between consecutive heads.
    pub head_stride: usize,
    /// Bytes between consecutive head elements.
    pub elem_stride: usize,
    /// Bytes of the segment the view spans: `[base, span_end)`.
    pub span_end: usize,
    /// The copy granularity these strides allow.
    pub run: RunKind,
    /// Shape and strides as registered (for the checksum endpoint).
    pub shape: Vec<usize>,
    /// Strides in bytes, in shape order.
    pub byte_strides: Vec<usize>,
}

/// Detects the format from layer 0's shape and the hint.
///
/// # Errors
/// [`LayoutError`] when the shape is not a supported layout.
pub fn detect_format(
    meta: &TensorMetadata,
    hint: KvLayoutHint,
    itemsize: usize,
) -> Result<KvFormat, LayoutError> {
    let shape = &meta.shape;
    let unsupported = |why| LayoutError::UnsupportedShape {
        layer: 0,
        shape: shape.clone(),
        why,
    };
    match shape.len() {
        5 if shape[0] == 2 => Ok(match hint {
            KvLayoutHint::Nhd => KvFormat::TwoNbBsNhHs,
            KvLayoutHint::Hnd => KvFormat::TwoNbNhBsHs,
        }),
        5 if shape[1] == 2 => Ok(match hint {
            KvLayoutHint::Nhd => KvFormat::NbTwoBsNhHs,
            KvLayoutHint::Hnd => KvFormat::NbTwoNhBsHs,
        }),
        5 => Err(unsupported(
            "neither the first nor the second axis is the K/V axis (2)",
        )),
        3 if itemsize == 1 && shape[2] == 132 => {
            Err(unsupported("the fp8 DSA indexer plane is not supported"))
        }
        3 => Ok(KvFormat::NbBsHs),
        4 => Err(unsupported("fused K/V (rank-4) layouts are not supported")),
        _ => Err(unsupported(
            "expected a per-layer rank-5 [2,NB,BS,NH,HS]/[NB,2,BS,NH,HS] or rank-3 MLA [NB,BS,HS] \
             tensor",
        )),
    }
}

/// Builds the shared geometry from layer 0.
///
/// # Errors
/// [`LayoutError`] for unknown dtypes, empty dimensions or a chunk size that is not a whole
/// number of blocks.
pub fn geometry(
    meta: &TensorMetadata,
    hint: KvLayoutHint,
    num_layers: usize,
    chunk_size: usize,
) -> Result<KvGeometry, LayoutError> {
    let itemsize = dtype_itemsize(&meta.dtype).ok_or_else(|| LayoutError::UnknownDtype {
        layer: 0,
        dtype: meta.dtype.chars().take(64).collect(),
    })?;
    let kv_format = detect_format(meta, hint, itemsize)?;
    let ax = kv_format.axes();
    let dim = |i: usize| -> Result<usize, LayoutError> {
        let v = meta.shape.get(i).copied().unwrap_or(0);
        let v = usize::try_from(v).map_err(|_| LayoutError::TooLarge)?;
        if v == 0 {
            return Err(LayoutError::UnsupportedShape {
                layer: 0,
                shape: meta.shape.clone(),
                why: "a dimension is 0",
            });
        }
        Ok(v)
    };
    let g = KvGeometry {
        kv_format,
        kv_layout: hint,
        num_layers,
        num_blocks: dim(ax.block)?,
        block_size: dim(ax.token)?,
        num_heads: ax.head.map_or(Ok(1), dim)?,
        head_size: dim(ax.elem)?,
        dtype: meta.dtype.clone(),
        itemsize,
        chunk_size,
    };
    if chunk_size == 0 || !chunk_size.is_multiple_of(g.block_size) {
        return Err(LayoutError::ChunkSize {
            chunk_size,
            block_size: g.block_size,
        });
    }
    // Every byte count derived from the geometry must be addressable.
    g.planes()
        .checked_mul(num_layers)
        .and_then(|v| v.checked_mul(chunk_size))
        .and_then(|v| v.checked_mul(g.num_heads))
        .and_then(|v| v.checked_mul(g.head_size))
        .and_then(|v| v.checked_mul(itemsize))
        .filter(|&v| v <= isize::MAX as usize)
        .ok_or(LayoutError::TooLarge)?;
    Ok(g)
}

impl LayerLayout {
    /// Resolves layer `layer` (`meta`, in segment `segment` of `nbytes` bytes) against the
    /// shared geometry: same shape and dtype as layer 0, every element within `nbytes`, and no
    /// two elements sharing memory.
    ///
    /// # Errors
    /// [`LayoutError`] naming the first violated rule.
    pub fn new(
        layer: usize,
        meta: &TensorMetadata,
        g: &KvGeometry,
        want_shape: &[u64],
        segment: usize,
        nbytes: u64,
    ) -> Result<Self, LayoutError> {
        if meta.dtype != g.dtype {
            return Err(LayoutError::Mismatch {
                layer,
                what: "dtype",
                want: g.dtype.clone(),
                got: meta.dtype.chars().take(64).collect(),
            });
        }
        if meta.shape != want_shape {
            return Err(LayoutError::Mismatch {
                layer,
                what: "shape",
                want: format!("{want_shape:?}"),
                got: format!("{:?}", meta.shape),
            });
        }
        if meta.stride.len() != meta.shape.len() {
            return Err(LayoutError::StrideRank {
                layer,
                shape: meta.shape.clone(),
                stride: meta.stride.clone(),
            });
        }
        // Bounds: the last element ends within `nbytes` (u128: no overflow for any u64 input).
        let itemsize = g.itemsize as u128;
        let last: u128 = meta
            .shape
            .iter()
            .zip(&meta.stride)
            .map(|(&n, &s)| u128::from(n.saturating_sub(1)) * u128::from(s))
            .sum::<u128>()
            + u128::from(meta.storage_offset);
        let needed = (last + 1) * itemsize;
        if needed > u128::from(nbytes) {
            return Err(LayoutError::OutOfBounds {
                layer,
                storage_offset: meta.storage_offset,
                shape: meta.shape.clone(),
                stride: meta.stride.clone(),
                itemsize: g.itemsize,
                needed,
                nbytes,
            });
        }
        // Every value is now bounded by `nbytes`, itself bounded by the mapping length.
        let to_usize = |v: u128| usize::try_from(v).map_err(|_| LayoutError::TooLarge);
        let shape: Vec<usize> = meta
            .shape
            .iter()
            .map(|&v| to_usize(u128::from(v)))
            .collect::<Result<_, _>>()?;
        let mut byte_strides = Vec::with_capacity(shape.len());
        for (&n, &s) in shape.iter().zip(&meta.stride) {
            // A stride of a size-1 axis never moves; keep it small so it cannot overflow.
            let s = if n == 1 { 0 } else { u128::from(s) * itemsize };
            byte_strides.push(to_usize(s)?);
        }
        if !injective(&shape, &byte_strides, g.itemsize) {
            return Err(LayoutError::SelfOverlap {
                layer,
                shape: meta.shape.clone(),
                stride: meta.stride.clone(),
            });
        }
        let ax = g.kv_format.axes();
        let at = |i: Option<usize>| i.and_then(|i| byte_strides.get(i).copied()).unwrap_or(0);
        let mut out = Self {
            segment,
            base: to_usize(u128::from(meta.storage_offset) * itemsize)?,
            plane_stride: at(ax.plane),
            block_stride: at(Some(ax.block)),
            token_stride: at(Some(ax.token)),
            head_stride: at(ax.head),
            elem_stride: at(Some(ax.elem)),
            span_end: to_usize(needed)?,
            // Computed below from the strides of the axes that actually move.
            run: RunKind::Element,
            shape,
            byte_strides,
        };
        out.run = out.run_kind(g);
        Ok(out)
    }

    fn run_kind(&self, g: &KvGeometry) -> RunKind {
        let item = g.itemsize;
        let hs_bytes = g.head_size * item;
        let row = g.row_bytes();
        let elem_ok = g.head_size == 1 || self.elem_stride == item;
        let head_ok = elem_ok && (g.num_heads == 1 || self.head_stride == hs_bytes);
        let token_ok = head_ok && (g.block_size == 1 || self.token_stride == row);
        if token_ok {
            RunKind::Block
        } else if head_ok {
            RunKind::Token
        } else if elem_ok {
            RunKind::Head
        } else {
            RunKind::Element
        }
    }

    /// `[base, span_end)`: the bytes of the segment this layer may touch.
    pub fn span(&self) -> Range<usize> {
        self.base..self.span_end
    }
}

/// Whether distinct indices of `shape` map to disjoint `itemsize`-byte elements: sorted by
/// stride, each moving axis must step over everything the smaller axes can reach.
fn injective(shape: &[usize], byte_strides: &[usize], itemsize: usize) -> bool {
    let mut axes: Vec<(usize, usize)> = shape
        .iter()
        .zip(byte_strides)
        .filter(|&(&n, _)| n > 1)
        .map(|(&n, &s)| (s, n))
        .collect();
    axes.sort_unstable();
    let mut reach = itemsize; // bytes covered by one index of the smaller axes
    for (stride, n) in axes {
        if stride < reach {
            return false;
        }
        reach = match stride.checked_mul(n - 1).and_then(|v| v.checked_add(reach)) {
            Some(v) => v,
            None => return false,
        };
    }
    true
}

/// Checks that no two layers in the same segment touch the same bytes (conservatively, by
/// their spans).
///
/// # Errors
/// [`LayoutError::LayersOverlap`] for the first overlapping pair.
pub fn check_disjoint(layers: &[LayerLayout], segment_names: &[String]) -> Result<(), LayoutError> {
    let mut spans: Vec<(usize, usize, usize, usize)> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| (l.segment, l.base, l.span_end, i))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        let (sa, _, end_a, a) = w[0];
        let (sb, start_b, _, b) = w[1];
        if sa == sb && start_b < end_a {
            return Err(LayoutError::LayersOverlap {
                a: a.min(b),
                b: a.max(b),
                segment: segment_names.get(sa).cloned().unwrap_or_default(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(dtype: &str, shape: &[u64], stride: &[u64], off: u64) -> TensorMetadata {
        TensorMetadata {
            dtype: dtype.into(),
            shape: shape.to_vec(),
            stride: stride.to_vec(),
            storage_offset: off,
            device_uuid: "cpu".into(),
        }
    }

    fn contiguous(shape: &[u64]) -> Vec<u64> {
        let mut s = vec![1u64; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * shape[i + 1];
        }
        s
    }

    #[test]
    fn formats_follow_rank_axis_and_hint() {
        let m = |shape: &[u64]| meta("float16", shape, &contiguous(shape), 0);
        let nhd = KvLayoutHint::Nhd;
        let hnd = KvLayoutHint::Hnd;
        assert_eq!(
            detect_format(&m(&[2, 8, 16, 4, 64]), nhd, 2),
            Ok(KvFormat::TwoNbBsNhHs)
        );
        assert_eq!(
            detect_format(&m(&[8, 2, 16, 4, 64]), nhd, 2),
            Ok(KvFormat::NbTwoBsNhHs)
        );
        assert_eq!(
            detect_format(&m(&[2, 8, 4, 16, 64]), hnd, 2),
            Ok(KvFormat::TwoNbNhBsHs)
        );
        assert_eq!(
            detect_format(&m(&[8, 2, 4, 16, 64]), hnd, 2),
            Ok(KvFormat::NbTwoNhBsHs)
        );
        assert_eq!(
            detect_format(&m(&[8, 16, 576]), hnd, 2),
            Ok(KvFormat::NbBsHs)
        );
        for bad in [&[8u64, 16, 4, 128][..], &[8, 3, 16, 4, 64], &[1024], &[]] {
            assert!(
                matches!(
                    detect_format(&m(bad), nhd, 2),
                    Err(LayoutError::UnsupportedShape { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(detect_format(&m(&[8, 16, 132]), nhd, 1).is_err());
    }

    #[test]
    fn hints() {
        let h = |v: &str| KvLayoutHint::from_hints(&[("kv_layout".into(), v.into())]);
        assert_eq!(h("NHD"), Ok(KvLayoutHint::Nhd));
        assert_eq!(h("HND"), Ok(KvLayoutHint::Hnd));
        assert_eq!(KvLayoutHint::from_hints(&[]), Ok(KvLayoutHint::Hnd));
        assert!(matches!(h("XYZ"), Err(LayoutError::BadHint(_))));
    }

    #[test]
    fn layer_bounds_overlap_and_run_kinds() {
        let shape = [2u64, 4, 16, 2, 8];
        let st = contiguous(&shape);
        let m0 = meta("float16", &shape, &st, 0);
        let g = geometry(&m0, KvLayoutHint::Nhd, 1, 32).expect("geometry");
        assert_eq!(g.object_len(), 2 * 32 * 16 * 2);
        let need = 2 * 4 * 16 * 2 * 8 * 2;
        let l = LayerLayout::new(0, &m0, &g, &shape, 0, need).expect("fits exactly");
        assert_eq!(l.run, RunKind::Block);
        assert_eq!(l.span(), 0..need as usize);
        assert!(matches!(
            LayerLayout::new(0, &m0, &g, &shape, 0, need - 1),
            Err(LayoutError::OutOfBounds { .. })
        ));
        // storage_offset counts.
        let m1 = meta("float16", &shape, &st, 10);
        assert!(LayerLayout::new(0, &m1, &g, &shape, 0, need).is_err());
        assert!(LayerLayout::new(0, &m1, &g, &shape, 0, need + 20).is_ok());
        // Padded head vectors: one copy per token is impossible, per head is fine.
        let padded = [st[0] * 2, st[1] * 2, st[2] * 2, 16, 1];
        let l = LayerLayout::new(
            0,
            &meta("float16", &shape, &padded, 0),
            &g,
            &shape,
            0,
            need * 2,
        )
        .expect("padded");
        assert_eq!(l.run, RunKind::Head);
        // Overlapping strides.
        let bad = [st[0], st[1], 1, 1, 1];
        assert!(matches!(
            LayerLayout::new(0, &meta("float16", &shape, &bad, 0), &g, &shape, 0, need),
            Err(LayoutError::SelfOverlap { .. })
        ));
        // Huge values neither panic nor pass.
        let huge = [u64::MAX, 1, 1, 1, 1];
        assert!(
            LayerLayout::new(
                0,
                &meta("float16", &shape, &huge, u64::MAX),
                &g,
                &shape,
                0,
                need
            )
            .is_err()
        );
    }

    #[test]
    fn layers_in_one_segment_must_not_overlap() {
        let shape = [4u64, 16, 8];
        let m = meta("float16", &shape, &contiguous(&shape), 0);
        let g = geometry(&m, KvLayoutHint::Nhd, 2, 16).expect("geometry");
        let a = LayerLayout::new(0, &m, &g, &shape, 0, 1 << 20).expect("a");
        let b_meta = meta("float16", &shape, &contiguous(&shape), 4 * 16 * 8);
        let b = LayerLayout::new(1, &b_meta, &g, &shape, 0, 1 << 20).expect("b");
        let names = vec!["s".to_owned()];
        assert!(check_disjoint(&[a.clone(), b.clone()], &names).is_ok());
        let c_meta = meta("float16", &shape, &contiguous(&shape), 4 * 16 * 8 - 1);
        let c = LayerLayout::new(1, &c_meta, &g, &shape, 0, 1 << 20).expect("c");
        assert!(check_disjoint(&[a.clone(), c.clone()], &names).is_err());
        let d = LayerLayout { segment: 1, ..c };
        assert!(check_disjoint(&[a, d], &names).is_ok());
    }

    #[test]
    fn chunk_size_must_be_whole_blocks() {
        let shape = [2u64, 4, 16, 2, 8];
        let m = meta("bfloat16", &shape, &contiguous(&shape), 0);
        assert!(matches!(
            geometry(&m, KvLayoutHint::Nhd, 1, 24),
            Err(LayoutError::ChunkSize { .. })
        ));
        assert!(matches!(
            geometry(
                &meta("complex32", &shape, &contiguous(&shape), 0),
                KvLayoutHint::Nhd,
                1,
                32
            ),
            Err(LayoutError::UnknownDtype { .. })
        ));
    }
}
