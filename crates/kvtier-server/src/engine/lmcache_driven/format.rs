//! The per-layer KV tensor formats kvtier recognises (LMCache's `EngineKVFormat` names) and the
//! registration's layout hint; see the table in [`super::layout`].

use serde::Serialize;

use super::layout::LayoutError;

/// The engine's KV tensor format, per layer (LMCache `EngineKVFormat` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvFormat {
    /// `[2, NB, BS, NH, HS]`.
    TwoNbBsNhHs,
    /// `[NB, 2, BS, NH, HS]`.
    NbTwoBsNhHs,
    /// `[2, NB, NH, BS, HS]`.
    TwoNbNhBsHs,
    /// `[NB, 2, NH, BS, HS]`.
    NbTwoNhBsHs,
    /// MLA `[NB, BS, HS]`.
    NbBsHs,
}

/// Positions of the logical axes in a format's shape.
#[derive(Debug, Clone, Copy)]
pub(super) struct Axes {
    pub(super) plane: Option<usize>,
    pub(super) block: usize,
    pub(super) token: usize,
    pub(super) head: Option<usize>,
    pub(super) elem: usize,
}

impl KvFormat {
    /// LMCache's name of the format.
    pub fn lmcache_name(self) -> &'static str {
        match self {
            Self::TwoNbBsNhHs => "NL_X_TWO_NB_BS_NH_HS",
            Self::NbTwoBsNhHs => "NL_X_NB_TWO_BS_NH_HS",
            Self::TwoNbNhBsHs => "NL_X_TWO_NB_NH_BS_HS",
            Self::NbTwoNhBsHs => "NL_X_NB_TWO_NH_BS_HS",
            Self::NbBsHs => "NL_X_NB_BS_HS",
        }
    }

    /// Whether this is the single-plane MLA format.
    pub fn is_mla(self) -> bool {
        self == Self::NbBsHs
    }

    pub(super) fn axes(self) -> Axes {
        let (plane, block, token, head) = match self {
            Self::TwoNbBsNhHs => (Some(0), 1, 2, Some(3)),
            Self::NbTwoBsNhHs => (Some(1), 0, 2, Some(3)),
            Self::TwoNbNhBsHs => (Some(0), 1, 3, Some(2)),
            Self::NbTwoNhBsHs => (Some(1), 0, 3, Some(2)),
            Self::NbBsHs => (None, 0, 1, None),
        };
        let elem = if self.is_mla() { 2 } else { 4 };
        Axes {
            plane,
            block,
            token,
            head,
            elem,
        }
    }

    /// Position of the block axis in the shape.
    pub fn block_axis(self) -> usize {
        self.axes().block
    }
}

impl Serialize for KvFormat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.lmcache_name())
    }
}

/// The `kv_layout` hint: whether heads come before tokens within a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum KvLayoutHint {
    /// Tokens, then heads (`[.., BS, NH, HS]`).
    #[serde(rename = "NHD")]
    Nhd,
    /// Heads, then tokens (`[.., NH, BS, HS]`).
    #[serde(rename = "HND")]
    Hnd,
}

impl KvLayoutHint {
    /// Reads the `kv_layout` entry of a registration's layout hints. No entry means HND (what
    /// LMCache assumes on a CPU-only server). `BLHNC`/`BLNHC` (blocks-first views, which only
    /// change strides) count as HND/NHD.
    ///
    /// # Errors
    /// [`LayoutError::BadHint`] for any other value.
    pub fn from_hints(hints: &[(String, String)]) -> Result<Self, LayoutError> {
        match hints
            .iter()
            .find(|(k, _)| k == "kv_layout")
            .map(|(_, v)| v.as_str())
        {
            None | Some("HND" | "BLHNC") => Ok(Self::Hnd),
            Some("NHD" | "BLNHC") => Ok(Self::Nhd),
            Some(other) => Err(LayoutError::BadHint(other.chars().take(64).collect())),
        }
    }
}
