//! The client's own msgpack codec: request encoding and reply decoding.
//!
//! Encoding follows what msgspec (LMCache's serializer) produces for the reference client:
//! - dataclasses and `msgspec.Struct`s are maps of **all** fields, keyed by field name, in
//!   declaration order (so [`CacheKey`] is always a 10-entry map, `8a ...`);
//! - integers take the smallest form (positive fixint, `cc`/`cd`/`ce`/`cf` for non-negative,
//!   negative fixint or `d0`..`d3` for negative); `None` is `c0`; `bytes` are `bin`; floats
//!   are float64; lists and tuples are arrays.
//!
//! Decoding parses a reply into a [`Value`] tree first (bounded depth, lengths checked against
//! the remaining input so a hostile length cannot allocate) and then reads the expected shape
//! the way msgspec's typed decoder does: unknown map keys are ignored, key order is free,
//! required keys must be present, optional ones take their defaults.
//!
//! Nothing here panics on any input.
//!
//! This file holds the encoders; `value.rs` the [`Value`] tree and its bounded parser;
//! `decode.rs` the typed reply readers and the reply types.

use rmp::encode::ByteBuf;

/// A value of `IPCCacheServerKey.request_configs`.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigValue {
    /// `None`.
    Nil,
    /// A bool.
    Bool(bool),
    /// An int.
    Int(i64),
    /// A float (encoded as float64).
    Float(f64),
    /// A str.
    Str(String),
}

/// LMCache's `IPCCacheServerKey`: which tokens a request is about.
///
/// Encoded as the map `{model_name, world_size, worker_id, token_ids, start, end, request_id,
/// cache_salt, request_configs, num_kv_readers}` in that order.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheKey {
    /// Model name (part of the object identity).
    pub model_name: String,
    /// Tensor-parallel world size of the engine.
    pub world_size: i64,
    /// The engine rank for store/retrieve; `None` (all ranks) for lookup.
    pub worker_id: Option<i64>,
    /// The request's tokens (hashed as big-endian u32 by the server).
    pub token_ids: Vec<u32>,
    /// First token of the range (a multiple of the chunk size).
    pub start: i64,
    /// End of the range (exclusive).
    pub end: i64,
    /// Request id: names the lookup session.
    pub request_id: String,
    /// Isolation salt (part of the object identity).
    pub cache_salt: String,
    /// Per-request configuration, `None` by default.
    pub request_configs: Option<Vec<(String, ConfigValue)>>,
    /// Readers of the looked-up chunks; must be at least 1 for `lookup`.
    pub num_kv_readers: i64,
}

impl CacheKey {
    /// A key over `token_ids[start..end]` for all ranks (`worker_id = None`), with an empty
    /// salt, no request configs and one reader.
    pub fn new(
        model_name: impl Into<String>,
        world_size: i64,
        token_ids: Vec<u32>,
        start: i64,
        end: i64,
        request_id: impl Into<String>,
    ) -> Self {
        Self {
            model_name: model_name.into(),
            world_size,
            worker_id: None,
            token_ids,
            start,
            end,
            request_id: request_id.into(),
            cache_salt: String::new(),
            request_configs: None,
            num_kv_readers: 1,
        }
    }

    /// The same key for one rank (`Some`) or for all ranks (`None`).
    #[must_use]
    pub fn with_worker(mut self, worker_id: Option<i64>) -> Self {
        self.worker_id = worker_id;
        self
    }

    /// The msgpack encoding of this key.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.write(&mut w);
        w.finish()
    }

    fn write(&self, w: &mut Writer) {
        w.map_len(10);
        w.str("model_name");
        w.str(&self.model_name);
        w.str("world_size");
        w.int(self.world_size);
        w.str("worker_id");
        w.opt_int(self.worker_id);
        w.str("token_ids");
        w.array_len(self.token_ids.len());
        for &t in &self.token_ids {
            w.uint(u64::from(t));
        }
        w.str("start");
        w.int(self.start);
        w.str("end");
        w.int(self.end);
        w.str("request_id");
        w.str(&self.request_id);
        w.str("cache_salt");
        w.str(&self.cache_salt);
        w.str("request_configs");
        match &self.request_configs {
            None => w.nil(),
            Some(entries) => {
                w.map_len(entries.len());
                for (k, v) in entries {
                    w.str(k);
                    match v {
                        ConfigValue::Nil => w.nil(),
                        ConfigValue::Bool(b) => w.bool(*b),
                        ConfigValue::Int(i) => w.int(*i),
                        ConfigValue::Float(f) => w.f64(*f),
                        ConfigValue::Str(s) => w.str(s),
                    }
                }
            }
        }
        w.str("num_kv_readers");
        w.int(self.num_kv_readers);
    }
}

/// LMCache's `RegisterEngineDrivenContextPayload`: one engine worker's KV layout.
///
/// Encoded as the map `{instance_id, model_name, world_size, block_size, num_layers,
/// hidden_dim_size, dtype_str, use_mla, num_physical_slots}` in that order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterPayload {
    /// Engine instance id (one per worker process).
    pub instance_id: i64,
    /// Model name.
    pub model_name: String,
    /// Tensor-parallel world size.
    pub world_size: i64,
    /// The engine's paged-attention block size in tokens.
    pub block_size: i64,
    /// Layers of the model.
    pub num_layers: i64,
    /// KV hidden size per layer (heads × head size).
    pub hidden_dim_size: i64,
    /// torch dtype name, e.g. `"float16"`.
    pub dtype_str: String,
    /// Multi-head latent attention layout (no separate K and V).
    pub use_mla: bool,
    /// Tokens per slot; `None` means the server's chunk size.
    pub num_physical_slots: Option<i64>,
}

impl RegisterPayload {
    /// The msgpack encoding of this payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.map_len(9);
        w.str("instance_id");
        w.int(self.instance_id);
        w.str("model_name");
        w.str(&self.model_name);
        w.str("world_size");
        w.int(self.world_size);
        w.str("block_size");
        w.int(self.block_size);
        w.str("num_layers");
        w.int(self.num_layers);
        w.str("hidden_dim_size");
        w.int(self.hidden_dim_size);
        w.str("dtype_str");
        w.str(&self.dtype_str);
        w.str("use_mla");
        w.bool(self.use_mla);
        w.str("num_physical_slots");
        w.opt_int(self.num_physical_slots);
        w.finish()
    }
}

/// Encodes one msgpack int (smallest form).
pub fn encode_int(v: i64) -> Vec<u8> {
    let mut w = Writer::default();
    w.int(v);
    w.finish()
}

/// Encodes one msgpack int or nil.
pub fn encode_opt_int(v: Option<i64>) -> Vec<u8> {
    let mut w = Writer::default();
    w.opt_int(v);
    w.finish()
}

/// Encodes one msgpack bool.
pub fn encode_bool(v: bool) -> Vec<u8> {
    let mut w = Writer::default();
    w.bool(v);
    w.finish()
}

/// Encodes one msgpack str.
pub fn encode_str(v: &str) -> Vec<u8> {
    let mut w = Writer::default();
    w.str(v);
    w.finish()
}

/// Encodes one msgpack float64.
pub fn encode_f64(v: f64) -> Vec<u8> {
    let mut w = Writer::default();
    w.f64(v);
    w.finish()
}

/// Encodes one msgpack bin.
pub fn encode_bin(v: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    w.bin(v);
    w.finish()
}

/// A request uid frame: the uid as a msgpack unsigned int.
pub fn encode_uid(uid: u64) -> Vec<u8> {
    let mut w = Writer::default();
    w.uint(uid);
    w.finish()
}

/// A msgpack writer over a `Vec<u8>`. `rmp`'s `ByteBuf` cannot fail, so every error branch
/// is uninhabited; lengths past `u32::MAX` (never produced by this client) saturate.
#[derive(Debug, Default)]
struct Writer {
    buf: ByteBuf,
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

macro_rules! infallible {
    ($e:expr) => {
        match $e {
            Ok(_) => {}
            Err(
                rmp::encode::ValueWriteError::InvalidMarkerWrite(e)
                | rmp::encode::ValueWriteError::InvalidDataWrite(e),
            ) => match e {},
        }
    };
}

impl Writer {
    fn finish(self) -> Vec<u8> {
        self.buf.into_vec()
    }

    fn nil(&mut self) {
        match rmp::encode::write_nil(&mut self.buf) {
            Ok(()) => {}
            Err(e) => match e {},
        }
    }

    fn bool(&mut self, v: bool) {
        match rmp::encode::write_bool(&mut self.buf, v) {
            Ok(()) => {}
            Err(e) => match e {},
        }
    }

    fn uint(&mut self, v: u64) {
        infallible!(rmp::encode::write_uint(&mut self.buf, v));
    }

    fn int(&mut self, v: i64) {
        match u64::try_from(v) {
            Ok(u) => self.uint(u),
            Err(_) => infallible!(rmp::encode::write_sint(&mut self.buf, v)),
        }
    }

    fn opt_int(&mut self, v: Option<i64>) {
        match v {
            Some(v) => self.int(v),
            None => self.nil(),
        }
    }

    fn f64(&mut self, v: f64) {
        infallible!(rmp::encode::write_f64(&mut self.buf, v));
    }

    fn str(&mut self, s: &str) {
        infallible!(rmp::encode::write_str_len(&mut self.buf, len32(s.len())));
        self.buf.as_mut_vec().extend_from_slice(s.as_bytes());
    }

    fn bin(&mut self, b: &[u8]) {
        infallible!(rmp::encode::write_bin_len(&mut self.buf, len32(b.len())));
        self.buf.as_mut_vec().extend_from_slice(b);
    }

    fn array_len(&mut self, n: usize) {
        infallible!(rmp::encode::write_array_len(&mut self.buf, len32(n)));
    }

    fn map_len(&mut self, n: usize) {
        infallible!(rmp::encode::write_map_len(&mut self.buf, len32(n)));
    }
}

pub mod decode;
mod value;

pub use decode::{PrepareRetrieve, PrepareStore, Registration, Slot};
pub use value::Value;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_take_the_smallest_form() {
        assert_eq!(encode_int(0), [0x00]);
        assert_eq!(encode_int(127), [0x7f]);
        assert_eq!(encode_int(128), [0xcc, 0x80]);
        assert_eq!(encode_int(999), [0xcd, 0x03, 0xe7]);
        assert_eq!(encode_int(1 << 20), [0xce, 0x00, 0x10, 0x00, 0x00]);
        assert_eq!(encode_int(-1), [0xff]);
        assert_eq!(encode_int(-33), [0xd0, 0xdf]);
        assert_eq!(encode_uid(256), [0xcd, 0x01, 0x00]);
        assert_eq!(encode_opt_int(None), [0xc0]);
        assert_eq!(encode_bin(b""), [0xc4, 0x00]);
    }

    #[test]
    fn key_is_a_ten_entry_map_in_declaration_order() {
        let key = CacheKey::new("m", 1, vec![1, 300], 0, 256, "r").with_worker(Some(0));
        let mut expect = vec![0x8a];
        let s = |out: &mut Vec<u8>, x: &str| {
            out.push(0xa0 | u8::try_from(x.len()).expect("short"));
            out.extend_from_slice(x.as_bytes());
        };
        s(&mut expect, "model_name");
        s(&mut expect, "m");
        s(&mut expect, "world_size");
        expect.push(0x01);
        s(&mut expect, "worker_id");
        expect.push(0x00);
        s(&mut expect, "token_ids");
        expect.extend_from_slice(&[0x92, 0x01, 0xcd, 0x01, 0x2c]);
        s(&mut expect, "start");
        expect.push(0x00);
        s(&mut expect, "end");
        expect.extend_from_slice(&[0xcd, 0x01, 0x00]);
        s(&mut expect, "request_id");
        s(&mut expect, "r");
        s(&mut expect, "cache_salt");
        s(&mut expect, "");
        s(&mut expect, "request_configs");
        expect.push(0xc0);
        s(&mut expect, "num_kv_readers");
        expect.push(0x01);
        assert_eq!(key.encode(), expect);
    }

    #[test]
    fn register_payload_field_order() {
        let p = RegisterPayload {
            instance_id: 7,
            model_name: "m".into(),
            world_size: 1,
            block_size: 16,
            num_layers: 2,
            hidden_dim_size: 64,
            dtype_str: "float16".into(),
            use_mla: false,
            num_physical_slots: None,
        };
        let v = Value::decode(&p.encode()).expect("decodes");
        let Value::Map(entries) = v else {
            panic!("not a map")
        };
        let keys: Vec<_> = entries
            .iter()
            .map(|(k, _)| k.as_str("k").expect("str key").to_owned())
            .collect();
        assert_eq!(
            keys,
            [
                "instance_id",
                "model_name",
                "world_size",
                "block_size",
                "num_layers",
                "hidden_dim_size",
                "dtype_str",
                "use_mla",
                "num_physical_slots"
            ]
        );
        assert_eq!(p.encode().first(), Some(&0x89));
    }

    #[test]
    fn replies_ignore_unknown_keys_and_order() {
        // {"pool_size": 4096, "extra": [1], "shm_name": "x"}
        let body = [
            0x83, 0xa9, b'p', b'o', b'o', b'l', b'_', b's', b'i', b'z', b'e', 0xcd, 0x10, 0x00,
            0xa5, b'e', b'x', b't', b'r', b'a', 0x91, 0x01, 0xa8, b's', b'h', b'm', b'_', b'n',
            b'a', b'm', b'e', 0xa1, b'x',
        ];
        let r = decode::registration(Some(&body)).expect("decodes");
        assert_eq!(
            r,
            Registration {
                shm_name: "x".into(),
                pool_size: 4096
            }
        );
    }

    #[test]
    fn hostile_lengths_and_garbage_are_errors() {
        assert!(Value::decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(Value::decode(&[0xdf, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(Value::decode(&[0xc6, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(Value::decode(&[0xc1]).is_err());
        assert!(Value::decode(&[0x01, 0x02]).is_err());
        assert!(Value::decode(&[]).is_err());
        let deep = vec![0x91; 100];
        assert!(Value::decode(&deep).is_err());
        assert!(decode::boolean(None).is_err());
        assert!(decode::prepare_store(Some(&[0x01])).is_err());
        assert_eq!(decode::opt_uint(None), Ok(None));
        assert_eq!(decode::opt_uint(Some(&[0x03])), Ok(Some(3)));
        assert!(decode::opt_uint(Some(&[0xff])).is_err());
    }

    #[test]
    fn failed_prepare_retrieve_with_empty_context() {
        // {"success": false, "data": b"", "context": {}}
        let mut body = vec![0x83, 0xa7];
        body.extend_from_slice(b"success");
        body.push(0xc2);
        body.push(0xa4);
        body.extend_from_slice(b"data");
        body.extend_from_slice(&[0xc4, 0x00, 0xa7]);
        body.extend_from_slice(b"context");
        body.push(0x80);
        let r = decode::prepare_retrieve(Some(&body)).expect("decodes");
        assert!(!r.success);
        assert!(r.slots.is_empty());
    }
}
