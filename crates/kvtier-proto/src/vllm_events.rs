//! vLLM's KV-event wire format, for kvtier's router-facing publisher.
//!
//! The format comes from vLLM's `vllm/distributed/kv_events.py` (msgspec structs, encoded with
//! `msgspec.msgpack.Encoder`); routers (vLLM's router, llm-d's KV-cache indexer, Dynamo) decode
//! it with those structs. Two encodings exist across vLLM versions and both are written here:
//!
//! - [`Encoding::Map`] (current vLLM main): structs are msgpack maps; events are tagged with
//!   `"type"` (msgspec `tag=True`, the class name) as their first key; fields with a default that
//!   equals it are omitted (`omit_defaults=True`).
//!   - `KVEventBatch`: `{"ts": float, "events": [...]}` (`data_parallel_rank` omitted).
//!   - `BlockStored`: `{"type": "BlockStored", "block_hashes": [bin32...], "parent_block_hash":
//!     bin32 | nil, "token_ids": [int...], "block_size": int, "lora_id": nil, "medium": str,
//!     "lora_name": nil}` (`extra_keys`, `group_idx`, `kv_cache_spec_*` omitted).
//!   - `BlockRemoved`: `{"type": "BlockRemoved", "block_hashes": [bin32...], "medium": str}`.
//!   - `AllBlocksCleared`: `{"type": "AllBlocksCleared"}`.
//! - [`Encoding::Array`] (vLLM releases whose structs were `array_like=True`): structs are
//!   positional arrays, an event's first element is its tag: `[ts, events]`,
//!   `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]`,
//!   `["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`. Those releases typed
//!   block hashes as `int`, so each 32-byte chunk hash is sent as the signed 64-bit integer
//!   of its first 8 bytes (big-endian).
//!
//! kvtier-specific choices (documented in `docs/lmcache-compatibility.md`): one event per chunk;
//! `block_size` is the chunk's token count (0 when the tokens are unknown: L2 records);
//! `lora_id` and `lora_name` are nil. msgspec decoders ignore unknown map keys, so no extra key
//! is added; the model travels in the publisher's topic.

use crate::response::{KvEventKind, KvEventRecord, Writer};

/// Which of vLLM's two encodings to write. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// Maps with a `"type"` tag key (current vLLM).
    #[default]
    Map,
    /// Positional arrays with the tag first (vLLM's `array_like=True` releases).
    Array,
}

impl Encoding {
    /// The name used on the command line (`map`, `array`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Map => "map",
            Self::Array => "array",
        }
    }
}

/// An event of a batch.
#[derive(Debug, Clone, Copy)]
pub enum VllmEvent<'a> {
    /// A record of kvtier's log (`BlockStored` or `BlockRemoved`).
    Record(&'a KvEventRecord),
    /// `AllBlocksCleared`: forget everything this publisher announced on the batch's topic.
    AllCleared,
}

/// Encodes one `KVEventBatch` with timestamp `ts` (seconds since the epoch).
#[must_use]
pub fn encode_batch<'a>(
    encoding: Encoding,
    ts: f64,
    events: impl ExactSizeIterator<Item = VllmEvent<'a>>,
) -> Vec<u8> {
    let mut w = Writer::new();
    match encoding {
        Encoding::Map => {
            w.map_len(2);
            w.str("ts");
            w.f64(ts);
            w.str("events");
        }
        Encoding::Array => {
            w.array_len(2);
            w.f64(ts);
        }
    }
    let n = w.array_len(events.len());
    for e in events.take(n) {
        match e {
            VllmEvent::Record(r) => record(&mut w, encoding, r),
            VllmEvent::AllCleared => match encoding {
                Encoding::Map => {
                    w.map_len(1);
                    w.str("type");
                    w.str("AllBlocksCleared");
                }
                Encoding::Array => {
                    w.array_len(1);
                    w.str("AllBlocksCleared");
                }
            },
        }
    }
    w.finish()
}

fn hash(w: &mut Writer, encoding: Encoding, h: &[u8; 32]) {
    match encoding {
        Encoding::Map => w.bin(h),
        Encoding::Array => {
            let mut first = [0u8; 8];
            first.copy_from_slice(&h[..8]);
            w.int(i64::from_be_bytes(first));
        }
    }
}

fn hashes(w: &mut Writer, encoding: Encoding, hs: &[[u8; 32]]) {
    let n = w.array_len(hs.len());
    for h in hs.iter().take(n) {
        hash(w, encoding, h);
    }
}

fn record(w: &mut Writer, encoding: Encoding, r: &KvEventRecord) {
    let map = encoding == Encoding::Map;
    match r.kind {
        KvEventKind::Stored => {
            let tokens = r.token_ids.as_slice();
            if map {
                w.map_len(8);
                w.str("type");
            } else {
                w.array_len(7);
            }
            w.str("BlockStored");
            if map {
                w.str("block_hashes");
            }
            hashes(w, encoding, std::slice::from_ref(&r.block_hash));
            if map {
                w.str("parent_block_hash");
            }
            match &r.parent_block_hash {
                Some(p) => hash(w, encoding, p),
                None => w.nil(),
            }
            if map {
                w.str("token_ids");
            }
            let n = w.array_len(tokens.len());
            for &t in tokens.iter().take(n) {
                w.uint(u64::from(t));
            }
            if map {
                w.str("block_size");
            }
            w.uint(tokens.len() as u64);
            if map {
                w.str("lora_id");
            }
            w.nil();
            if map {
                w.str("medium");
            }
            w.str(r.medium);
            if map {
                w.str("lora_name");
                w.nil();
            }
        }
        KvEventKind::Removed => {
            if map {
                w.map_len(3);
                w.str("type");
            } else {
                w.array_len(3);
            }
            w.str("BlockRemoved");
            if map {
                w.str("block_hashes");
            }
            hashes(w, encoding, std::slice::from_ref(&r.block_hash));
            if map {
                w.str("medium");
            }
            w.str(r.medium);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response::TokenSpan;
    use std::sync::Arc;

    fn stored() -> KvEventRecord {
        KvEventRecord {
            seq: 1,
            kind: KvEventKind::Stored,
            medium: "CPU",
            model_name: Arc::from("m"),
            block_hash: [7u8; 32],
            parent_block_hash: None,
            token_ids: TokenSpan::new(Arc::from(vec![1u32, 2, 3]), 0, 3),
        }
    }

    #[test]
    fn map_encoding_starts_with_the_tag_and_has_every_required_field() {
        let r = stored();
        let b = encode_batch(Encoding::Map, 1.5, [VllmEvent::Record(&r)].into_iter());
        // {"ts": 1.5, "events": [{"type": "BlockStored", ...8 keys}]}
        assert_eq!(b[0], 0x82);
        let s = String::from_utf8_lossy(&b);
        for key in [
            "ts",
            "events",
            "type",
            "BlockStored",
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
            "lora_name",
        ] {
            assert!(s.contains(key), "{key} missing");
        }
        let tagged: &[u8] = b"\x88\xa4type\xabBlockStored";
        assert!(
            b.windows(tagged.len()).any(|w| w == tagged),
            "BlockStored is an 8-entry map whose first key is the tag"
        );
    }

    #[test]
    fn array_encoding_is_positional_with_integer_hashes() {
        let r = stored();
        let b = encode_batch(
            Encoding::Array,
            2.0,
            [VllmEvent::Record(&r), VllmEvent::AllCleared].into_iter(),
        );
        // [2.0, [["BlockStored", [int], nil, [1,2,3], 3, nil, "CPU"], ["AllBlocksCleared"]]]
        assert_eq!(b[0], 0x92);
        assert_eq!(b[1], 0xcb); // float64
        assert_eq!(b[10], 0x92); // two events
        assert_eq!(b[11], 0x97); // BlockStored: tag + 6 fields
        assert!(b.ends_with(b"\x91\xb0AllBlocksCleared"));
        assert!(!b.windows(2).any(|w| w == [0xc4, 32]), "no bin32 hashes");
    }
}
