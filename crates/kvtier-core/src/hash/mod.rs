//! LMCache 0.5.6-compatible token hashing: the blake3 prefix chain over full chunks.
//!
//! A request's token ids are cut into chunks of `chunk_size` tokens. Only **full**
//! chunks are hashed; a trailing partial chunk is ignored. Chunk `i`'s hash covers
//! every token before it through a prefix chain:
//!
//! ```text
//! h_-1 = NONE_HASH = blake3(12 zero bytes)
//! h_i  = blake3(h_{i-1} ‖ tokens[i*C .. (i+1)*C] as big-endian u32)
//! ```
//!
//! Invariants:
//! - A [`ChunkHash`] is always exactly 32 bytes (a blake3 digest).
//! - [`TokenHasher`] output for a token slice depends only on the chunk size and the
//!   tokens: it is deterministic across processes and restarts (unlike LMCache with
//!   vLLM installed and no `PYTHONHASHSEED`, which seeds `NONE_HASH` randomly).
//! - Only blake3 is supported. LMCache silently falls back to Python's builtin `hash`
//!   for other algorithm names when vLLM is absent; that is not reproducible outside
//!   one Python process, so [`HashAlgorithm::from_str`] refuses every other name.
//! - [`ChunkHashCache`] returns exactly what a one-shot [`TokenHasher::hash_chunks`]
//!   over the same tokens returns, while hashing each new chunk only once.
//!
//! Nothing here panics on client input: token ids that do not fit a `u32`, unaligned
//! or out-of-range token windows all come back as [`HashError`].

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length in bytes of a chunk hash (a blake3 digest).
pub const CHUNK_HASH_LEN: usize = 32;

/// Largest chunk size [`TokenHasher::new`] accepts, in tokens.
///
/// LMCache's default is 256; this bound only keeps the per-chunk message buffer
/// (`32 + 4 * chunk_size` bytes) sane.
pub const MAX_CHUNK_SIZE: usize = 1 << 20;

/// Errors from token hashing and chunk-hash parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// A hash algorithm other than blake3 was requested.
    #[error(
        "unsupported hash algorithm {name:?}: only \"blake3\" is exact in kvtier \
         (LMCache silently falls back to Python's builtin hash for other names, \
         which no other process can reproduce, so kvtier refuses)"
    )]
    UnsupportedAlgorithm {
        /// The name that was asked for.
        name: String,
    },
    /// The chunk size is zero or larger than [`MAX_CHUNK_SIZE`].
    #[error("invalid chunk size {chunk_size}: must be between 1 and {MAX_CHUNK_SIZE} tokens")]
    InvalidChunkSize {
        /// The rejected chunk size.
        chunk_size: usize,
    },
    /// A token id is negative or does not fit in 32 bits (LMCache packs ids as `>I`).
    #[error("token id {value} at index {index} is out of range: token ids must be in 0..2^32")]
    TokenOutOfRange {
        /// Position of the token in the input.
        index: usize,
        /// The offending value.
        value: i64,
    },
    /// `start` or `end` is not a multiple of the chunk size.
    #[error("token range {start}..{end} is not aligned to the chunk size {chunk_size}")]
    Unaligned {
        /// Requested start offset (tokens).
        start: usize,
        /// Requested end offset (tokens).
        end: usize,
        /// The hasher's chunk size.
        chunk_size: usize,
    },
    /// `start` is greater than `end`.
    #[error("token range {start}..{end} is reversed: start must not exceed end")]
    ReversedRange {
        /// Requested start offset (tokens).
        start: usize,
        /// Requested end offset (tokens).
        end: usize,
    },
    /// `end` lies beyond the tokens that were supplied.
    #[error("token range end {end} is beyond the {len} tokens supplied")]
    RangeOutOfBounds {
        /// Requested end offset (tokens).
        end: usize,
        /// Number of tokens supplied.
        len: usize,
    },
    /// A chunk hash in text form is not 64 hex digits.
    #[error("invalid chunk hash {input:?}: expected {} hex digits", CHUNK_HASH_LEN * 2)]
    InvalidHex {
        /// The rejected text (truncated to 80 characters).
        input: String,
    },
    /// A chunk hash in binary form is not 32 bytes.
    #[error("invalid chunk hash length {len}: expected {CHUNK_HASH_LEN} bytes")]
    InvalidLength {
        /// The length that was supplied.
        len: usize,
    },
}

/// A 32-byte blake3 chunk digest: the content identity of one chunk and its prefix.
///
/// `Display` and `Debug` print lowercase hex; serde uses the same hex string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChunkHash([u8; CHUNK_HASH_LEN]);

/// Hashed as two 128-bit words rather than as a byte slice (what `derive` would do): the same
/// bits reach the hasher, but a word-oriented hasher (foldhash, hashbrown's default) mixes
/// each word inline instead of calling its out-of-line byte-string path with a length prefix.
/// The L1 index, the namespace table and the ghost-list fingerprints hash one of these per
/// key on every store, lookup and eviction.
impl std::hash::Hash for ChunkHash {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (lo, hi) = self.0.split_at(16);
        for half in [lo, hi] {
            let mut w = [0u8; 16];
            w.copy_from_slice(half);
            state.write_u128(u128::from_le_bytes(w));
        }
    }
}

/// The seed of the chain: `blake3(12 zero bytes)`, i.e. LMCache hashing `(0, (0,), None)`
/// as 8 zero bytes (int 0, big-endian) followed by 4 zero bytes (token 0).
///
/// A unit test checks this constant against blake3.
pub const NONE_HASH: ChunkHash =
    ChunkHash::from_hex_const("7e3eff9ef7613a50340eb12677ee03b83ac759fcba9bb32705f07248d56d473b");

impl ChunkHash {
    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; CHUNK_HASH_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw digest bytes.
    pub const fn as_bytes(&self) -> &[u8; CHUNK_HASH_LEN] {
        &self.0
    }

    /// Copies a digest out of a byte slice, which must be exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, HashError> {
        <[u8; CHUNK_HASH_LEN]>::try_from(bytes)
            .map(Self)
            .map_err(|_| HashError::InvalidLength { len: bytes.len() })
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Result<Self, HashError> {
        let mut out = [0u8; CHUNK_HASH_LEN];
        hex::decode_to_slice(s, &mut out).map_err(|_| HashError::InvalidHex {
            input: s.chars().take(80).collect(),
        })?;
        Ok(Self(out))
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Writes the lowercase hex form into `buf` and returns it as a `&str`, without allocating.
    fn encode_hex<'a>(&self, buf: &'a mut [u8; CHUNK_HASH_LEN * 2]) -> &'a str {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for (pair, byte) in buf.chunks_exact_mut(2).zip(self.0) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0x0f)];
        }
        // Every byte written above is an ASCII hex digit.
        std::str::from_utf8(buf).unwrap_or_default()
    }

    /// Compile-time hex decoder for constants; a malformed literal is a compile error.
    const fn from_hex_const(s: &str) -> Self {
        const fn nibble(c: u8) -> u8 {
            match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                _ => panic!("chunk hash constant must be lowercase hex"),
            }
        }
        let b = s.as_bytes();
        assert!(
            b.len() == CHUNK_HASH_LEN * 2,
            "chunk hash constant must be 64 hex digits"
        );
        let mut out = [0u8; CHUNK_HASH_LEN];
        let mut i = 0;
        while i < CHUNK_HASH_LEN {
            out[i] = (nibble(b[2 * i]) << 4) | nibble(b[2 * i + 1]);
            i += 1;
        }
        Self(out)
    }
}

impl From<[u8; CHUNK_HASH_LEN]> for ChunkHash {
    fn from(bytes: [u8; CHUNK_HASH_LEN]) -> Self {
        Self(bytes)
    }
}

impl TryFrom<&[u8]> for ChunkHash {
    type Error = HashError;

    fn try_from(bytes: &[u8]) -> Result<Self, HashError> {
        Self::from_slice(bytes)
    }
}

impl AsRef<[u8]> for ChunkHash {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; CHUNK_HASH_LEN * 2];
        f.write_str(self.encode_hex(&mut buf))
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; CHUNK_HASH_LEN * 2];
        write!(f, "ChunkHash({})", self.encode_hex(&mut buf))
    }
}

impl FromStr for ChunkHash {
    type Err = HashError;

    fn from_str(s: &str) -> Result<Self, HashError> {
        Self::from_hex(s)
    }
}

impl Serialize for ChunkHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; CHUNK_HASH_LEN * 2];
        serializer.serialize_str(self.encode_hex(&mut buf))
    }
}

impl<'de> Deserialize<'de> for ChunkHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HexVisitor;

        impl Visitor<'_> for HexVisitor {
            type Value = ChunkHash;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a chunk hash as 64 hex digits")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ChunkHash, E> {
                ChunkHash::from_hex(v).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(HexVisitor)
    }
}

/// The token hash algorithm. Only blake3 reproduces LMCache's hashes exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HashAlgorithm {
    /// LMCache's own blake3 prefix chain (`--hash-algorithm blake3`, the default).
    #[default]
    Blake3,
}

impl HashAlgorithm {
    /// The configuration name, as LMCache reports it in `hash_algorithm_name`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Blake3 => "blake3",
        }
    }
}

impl fmt::Display for HashAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgorithm {
    type Err = HashError;

    /// Accepts `blake3` in any case; every other name is refused (see the module docs).
    fn from_str(s: &str) -> Result<Self, HashError> {
        if s.eq_ignore_ascii_case("blake3") {
            Ok(Self::Blake3)
        } else {
            Err(HashError::UnsupportedAlgorithm { name: s.to_owned() })
        }
    }
}

impl Serialize for HashAlgorithm {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for HashAlgorithm {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;

        impl Visitor<'_> for NameVisitor {
            type Value = HashAlgorithm;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a hash algorithm name (\"blake3\")")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<HashAlgorithm, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(NameVisitor)
    }
}

/// Converts token ids from a wider signed type, as a JSON or Python client may send them.
///
/// Fails on the first id that is negative or at least 2^32 (LMCache's `struct.pack(">I")`
/// raises on those), naming its index and value.
pub fn tokens_from_i64(tokens: &[i64]) -> Result<Vec<u32>, HashError> {
    tokens
        .iter()
        .enumerate()
        .map(|(index, &value)| {
            u32::try_from(value).map_err(|_| HashError::TokenOutOfRange { index, value })
        })
        .collect()
}

/// Hashes token ids into chunk hashes with a fixed chunk size and algorithm.
///
/// Cheap to clone and to share: it holds no buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenHasher {
    chunk_size: usize,
    algorithm: HashAlgorithm,
}

impl TokenHasher {
    /// A hasher for `chunk_size`-token chunks (1 ..= [`MAX_CHUNK_SIZE`]).
    pub fn new(chunk_size: usize, algorithm: HashAlgorithm) -> Result<Self, HashError> {
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(HashError::InvalidChunkSize { chunk_size });
        }
        Ok(Self {
            chunk_size,
            algorithm,
        })
    }

    /// Tokens per chunk.
    pub const fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// The algorithm in use.
    pub const fn algorithm(&self) -> HashAlgorithm {
        self.algorithm
    }

    /// The configured algorithm's name (`"blake3"`), as reported in status.
    pub const fn hash_algorithm_name(&self) -> &'static str {
        self.algorithm.name()
    }

    /// Hashes every full chunk of `tokens`, starting the chain at [`NONE_HASH`].
    ///
    /// A trailing partial chunk is ignored.
    pub fn hash_chunks(&self, tokens: &[u32]) -> Vec<ChunkHash> {
        self.hash_chunks_from(&NONE_HASH, tokens)
    }

    /// Hashes every full chunk of `tokens`, chaining from `prefix` (the hash of the chunk
    /// just before `tokens[0]`, or [`NONE_HASH`]).
    pub fn hash_chunks_from(&self, prefix: &ChunkHash, tokens: &[u32]) -> Vec<ChunkHash> {
        let mut out = Vec::with_capacity(tokens.len() / self.chunk_size);
        let mut scratch = Vec::new();
        self.extend_chain(*prefix, tokens, &mut out, &mut scratch);
        out
    }

    /// Appends the hashes of every full chunk of `tokens` to `out`, chaining from `prefix`.
    /// Returns how many chunks were hashed. `scratch` is reused as the message buffer.
    fn extend_chain(
        &self,
        mut prefix: ChunkHash,
        tokens: &[u32],
        out: &mut Vec<ChunkHash>,
        scratch: &mut Vec<u8>,
    ) -> usize {
        let cs = self.chunk_size;
        // One contiguous message per chunk (prefix ‖ BE tokens) and a single `blake3::hash`
        // call, so blake3 can use its multi-block SIMD path for chunks over 1 KiB.
        scratch.resize(CHUNK_HASH_LEN + 4 * cs, 0);
        let mut hashed = 0;
        for chunk in tokens.chunks_exact(cs) {
            let (head, body) = scratch.split_at_mut(CHUNK_HASH_LEN);
            head.copy_from_slice(prefix.as_bytes());
            for (dst, token) in body.chunks_exact_mut(4).zip(chunk) {
                dst.copy_from_slice(&token.to_be_bytes());
            }
            prefix = ChunkHash(*blake3::hash(scratch).as_bytes());
            out.push(prefix);
            hashed += 1;
        }
        hashed
    }
}

mod chunk_cache;

pub use chunk_cache::ChunkHashCache;

#[cfg(test)]
mod tests {
    use super::*;

    fn hasher(cs: usize) -> TokenHasher {
        TokenHasher::new(cs, HashAlgorithm::Blake3).expect("valid chunk size")
    }

    fn hexes(hashes: &[ChunkHash]) -> Vec<String> {
        hashes.iter().map(ChunkHash::to_hex).collect()
    }

    #[test]
    fn none_hash_is_blake3_of_twelve_zero_bytes() {
        assert_eq!(NONE_HASH.as_bytes(), blake3::hash(&[0u8; 12]).as_bytes());
        assert_eq!(
            NONE_HASH.to_hex(),
            "7e3eff9ef7613a50340eb12677ee03b83ac759fcba9bb32705f07248d56d473b"
        );
    }

    #[test]
    fn vector_chunk4_one_to_eight() {
        let got = hasher(4).hash_chunks(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            hexes(&got),
            [
                "6309ed506b8721905753f5c73c070bb21c3aafbd9b474b1e231f41368b71123c",
                "98efc76eafb06cfe774c31ff151f300b61a614c27982a211bb8cdbd83a8c0e19",
            ]
        );
    }

    #[test]
    fn vector_chunk256_zero_to_511() {
        let tokens: Vec<u32> = (0..512).collect();
        let got = hasher(256).hash_chunks(&tokens);
        assert_eq!(
            hexes(&got),
            [
                "084547b6c40ed5b05ba8cd0305db5bf74d5617673948d9ed193ab7d6cbc484d4",
                "e5ffee45c2b9db326814c9692dc594369887ba3b0df5761817820b60f864c8e0",
            ]
        );
    }

    #[test]
    fn vector_chunk256_seven_then_9906() {
        let mut tokens = vec![7u32];
        tokens.extend(std::iter::repeat_n(9906, 255));
        let got = hasher(256).hash_chunks(&tokens);
        assert_eq!(
            hexes(&got),
            ["b88afa1d1488b5722a1cd80b4ba3d022f8e8954c5191e5964d8090eb0d3211c9"]
        );
    }

    #[test]
    fn chain_matches_manual_blake3() {
        let h = hasher(2);
        let got = h.hash_chunks(&[1, 0x0102_0304]);
        let mut msg = NONE_HASH.as_bytes().to_vec();
        msg.extend_from_slice(&[0, 0, 0, 1, 1, 2, 3, 4]);
        assert_eq!(got[0].as_bytes(), blake3::hash(&msg).as_bytes());
    }

    #[test]
    fn partial_trailing_chunk_is_ignored() {
        let h = hasher(4);
        let full = h.hash_chunks(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let with_tail = h.hash_chunks(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(full, with_tail);
        assert!(h.hash_chunks(&[1, 2, 3]).is_empty());
        assert!(h.hash_chunks(&[]).is_empty());
    }

    #[test]
    fn hash_chunks_from_continues_the_chain() {
        let h = hasher(4);
        let all = h.hash_chunks(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let tail = h.hash_chunks_from(&all[0], &[5, 6, 7, 8]);
        assert_eq!(tail, all[1..]);
    }

    #[test]
    fn invalid_chunk_sizes_are_rejected() {
        assert_eq!(
            TokenHasher::new(0, HashAlgorithm::Blake3),
            Err(HashError::InvalidChunkSize { chunk_size: 0 })
        );
        assert!(TokenHasher::new(MAX_CHUNK_SIZE + 1, HashAlgorithm::Blake3).is_err());
    }

    #[test]
    fn algorithm_names() {
        assert_eq!("blake3".parse(), Ok(HashAlgorithm::Blake3));
        assert_eq!("BLAKE3".parse(), Ok(HashAlgorithm::Blake3));
        assert_eq!(HashAlgorithm::Blake3.name(), "blake3");
        assert_eq!(hasher(4).hash_algorithm_name(), "blake3");
        for other in ["builtin", "sha256", "sha256_cbor", ""] {
            let err = other
                .parse::<HashAlgorithm>()
                .expect_err("only blake3 is accepted");
            assert!(matches!(err, HashError::UnsupportedAlgorithm { .. }));
            assert!(err.to_string().contains("only \"blake3\" is exact"));
        }
        let json = serde_json::to_string(&HashAlgorithm::Blake3).expect("serialize");
        assert_eq!(json, "\"blake3\"");
        assert!(serde_json::from_str::<HashAlgorithm>("\"builtin\"").is_err());
    }

    #[test]
    fn tokens_from_i64_checks_range() {
        assert_eq!(
            tokens_from_i64(&[0, 1, 4_294_967_295]),
            Ok(vec![0, 1, u32::MAX])
        );
        assert_eq!(
            tokens_from_i64(&[1, -1]),
            Err(HashError::TokenOutOfRange {
                index: 1,
                value: -1
            })
        );
        let err = tokens_from_i64(&[5, 6, 1 << 32]).expect_err("2^32 is out of range");
        assert_eq!(
            err,
            HashError::TokenOutOfRange {
                index: 2,
                value: 1 << 32
            }
        );
        assert!(err.to_string().contains("index 2"));
    }

    #[test]
    fn chunk_hash_text_forms() {
        let h = hasher(4).hash_chunks(&[1, 2, 3, 4])[0];
        let hex = "6309ed506b8721905753f5c73c070bb21c3aafbd9b474b1e231f41368b71123c";
        assert_eq!(h.to_string(), hex);
        assert_eq!(format!("{h:?}"), format!("ChunkHash({hex})"));
        assert_eq!(ChunkHash::from_hex(hex), Ok(h));
        assert_eq!(ChunkHash::from_hex(&hex.to_uppercase()), Ok(h));
        assert_eq!(hex.parse::<ChunkHash>(), Ok(h));
        assert!(ChunkHash::from_hex(&hex[..62]).is_err());
        assert!(ChunkHash::from_hex(&format!("{}zz", &hex[..62])).is_err());
        assert_eq!(ChunkHash::from_slice(h.as_bytes()), Ok(h));
        assert_eq!(
            ChunkHash::from_slice(&[0; 8]),
            Err(HashError::InvalidLength { len: 8 })
        );
        let json = serde_json::to_string(&h).expect("serialize");
        assert_eq!(json, format!("\"{hex}\""));
        assert_eq!(
            serde_json::from_str::<ChunkHash>(&json).expect("deserialize"),
            h
        );
        assert!(serde_json::from_str::<ChunkHash>("\"abc\"").is_err());
    }
}
