//! `POST /cache/checksums` (LMCache 0.5.6): MD5 digests of a registered instance's engine
//! blocks, as `lmcache bench server` asks for them to verify a round trip.
//!
//! Digests follow LMCache's definition: per chunk of `chunk_size` blocks, each layer's selected
//! blocks in the tensor's logical order, `bfloat16` widened to `float32`. CPU-heavy: the HTTP
//! handler runs it off the async runtime. The HTTP status of each error is chosen in `http/`.
//! Reading a segment the engine truncated is contained like a copy ([`super::fault`]): the
//! digests would be of zero pages, so the request fails with [`ChecksumError::Faulted`].

use md5::{Digest, Md5};
use serde::Deserialize;

use super::kv_cache::{BlockError, KvCacheMap, SegmentFault, walk};

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
    /// A segment of the instance was truncated under the server.
    #[error("instance_id {0}: {1}")]
    Faulted(i64, SegmentFault),
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

/// Answers a checksum request for `kv` (the registration of `req.instance_id`), in LMCache's
/// response format.
///
/// # Errors
/// [`ChecksumError::BadRequest`] for an empty id list, a non-positive chunk size, a negative
/// or out-of-range block id; [`ChecksumError::Faulted`] when a segment was truncated before
/// or during the reads.
pub fn checksums(
    kv: &KvCacheMap,
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
    let ids: Vec<u64> = req
        .block_ids
        .iter()
        .map(|&id| {
            u64::try_from(id)
                .map_err(|_| ChecksumError::BadRequest(format!("block id {id} is negative")))
        })
        .collect::<Result<_, _>>()?;
    let chunk_blocks = usize::try_from(req.chunk_size).unwrap_or(usize::MAX);
    let faulted = |kv: &KvCacheMap| {
        kv.fault()
            .map(|f| ChecksumError::Faulted(req.instance_id, f))
    };
    if let Some(e) = faulted(kv) {
        return Err(e);
    }
    let digests = kv
        .block_checksums(&ids, chunk_blocks, req.layerwise)
        .map_err(|e| ChecksumError::BadRequest(e.to_string()))?;
    if let Some(e) = faulted(kv) {
        return Err(e);
    }
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

impl KvCacheMap {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_like_lmcache() {
        let c = |v: &[i64]| serde_json::Value::Array(compress_ids(v)).to_string();
        assert_eq!(c(&[1, 2, 3, 4, 5, 9, 10, 11, 12]), "[[1,5],[9,12]]");
        assert_eq!(c(&[5, 3, 1, 2, 4]), "[5,3,1,2,4]");
        assert_eq!(c(&[1, 2, 3, 4, 5, 7, 8]), "[[1,5],7,8]");
        assert_eq!(c(&[]), "[]");
    }
}
