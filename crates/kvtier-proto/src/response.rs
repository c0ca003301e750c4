//! Response encoding, byte-compatible with msgspec's msgpack encoder.
//!
//! msgspec encodes a handler's return value as follows, and so do these encoders:
//! `None` → no response frame at all (`Option<Vec<u8>>::None`); `bool` → msgpack bool;
//! `int` → the smallest msgpack int form (`4d`, `cd 01 00`, ...); `str` → str; `bytes` → bin;
//! tuples and lists → arrays; dataclasses and Structs → maps of **all** fields in declaration
//! order.
//!
//! Invariants:
//! - Encoding is infallible: writes go to a `Vec<u8>` through `rmp`'s [`ByteBuf`], whose error
//!   type is uninhabited.
//! - Lengths are written with their exact msgpack length prefix. A str, bin or container longer
//!   than `u32::MAX` (impossible for server-generated replies) is truncated to `u32::MAX` items,
//!   so the output is always one well-formed msgpack document.
//!
//! # Failure replies
//!
//! The reference server never sends error replies: a failing handler leaves the client waiting
//! until its timeout (300 s). [`Op::failure_reply`] gives, for each op, a value the typed client
//! decodes successfully and reads as "did not happen", so a server can answer instead:
//!
//! | operation | failure reply | why |
//! |---|---|---|
//! | `store`, `retrieve`, `store_q`, `cb_retrieve_pre_computed` | `[b"", false]` | `tuple[bytes, bool]` with ok=false |
//! | `commit_store`, `commit_retrieve`, `ping` | `false` | `bool` |
//! | `get_chunk_size` | `0` | `int`; never fails in practice |
//! | `p2p_lookup_and_lock` | `0` | `int` task id |
//! | `query_prefetch_status`, `wait_prefetch_status` | `0` | zero prefix chunks hit; `None` would mean "still running" and make the client poll or wait again |
//! | `get_experimental`, `cb_reorder_plan` | `[]` | `list` |
//! | `prepare_store` | `{"context": {"slots": [], "chunk_indices": []}}` | "nothing to write", as the reference sends when L1 is full |
//! | `prepare_retrieve` | `{"success": false, "data": b"", "context": {}}` | as the reference sends for unlocked chunks |
//! | `register_kv_cache_engine_driven_context` | `{"shm_name": "", "pool_size": 0}` | the "no SHM pool" response |
//! | `cb_protocol_handshake` | `[0, false]` | `tuple[int, bool]` with ok=false |
//! | `noop` | `"OK"` | `str`; cannot fail |
//! | `subscribe_kv_events` | bare reply | end of stream |
//! | `cb_unified_lookup`, `p2p_query_lookup_results` | bare reply | `T \| None` |
//! | `server_module_call` | bare reply | no reference handler or defined value; the client resolves `None` at once instead of timing out |
//! | every op returning `None` (register/unregister, `lookup`, `free_lookup_locks`, `end_session`, `clear`, `report_block_allocation`, ...) | bare reply | `None` |

use std::convert::Infallible;

use rmp::encode::{ByteBuf, ValueWriteError};

use crate::op::Op;

/// One SHM slot descriptor of the engine-driven data path: a chunk stored contiguously at
/// `offset` in the pool. Encoded as `{offset, length, shape, dtype}` in that order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Byte offset in the SHM pool (4096-aligned).
    pub offset: u64,
    /// Length in bytes (numel × itemsize).
    pub length: u64,
    /// Tensor shape of the chunk.
    pub shape: Vec<u64>,
    /// torch dtype name, e.g. `"bfloat16"`.
    pub dtype: String,
}

/// Response of `register_kv_cache_engine_driven_context`. `shm_name` is the bare segment name
/// (no leading `/`); `""` with `pool_size` 0 means pickle mode / no pool.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegisterEngineDrivenContextResponse {
    /// SHM segment name without a leading `/`.
    pub shm_name: String,
    /// Pool size in bytes.
    pub pool_size: u64,
}

impl RegisterEngineDrivenContextResponse {
    /// Encodes as the map `{shm_name, pool_size}`.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.map_len(2);
        w.str("shm_name");
        w.str(&self.shm_name);
        w.str("pool_size");
        w.uint(self.pool_size);
        w.finish()
    }
}

/// A `Vec<u8>` msgpack writer with infallible methods.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    buf: ByteBuf,
}

/// Discharges `rmp`'s write error for [`ByteBuf`], whose error type is uninhabited.
fn infallible<T>(result: Result<T, ValueWriteError<Infallible>>) -> T {
    match result {
        Ok(v) => v,
        Err(ValueWriteError::InvalidMarkerWrite(e) | ValueWriteError::InvalidDataWrite(e)) => {
            match e {}
        }
    }
}

fn clamp_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

impl Writer {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.buf.into_vec()
    }

    pub(crate) fn bool(&mut self, v: bool) {
        match rmp::encode::write_bool(&mut self.buf, v) {
            Ok(()) => {}
            Err(e) => match e {},
        }
    }

    pub(crate) fn int(&mut self, v: i64) {
        infallible(rmp::encode::write_sint(&mut self.buf, v));
    }

    pub(crate) fn f64(&mut self, v: f64) {
        infallible(rmp::encode::write_f64(&mut self.buf, v));
    }

    pub(crate) fn uint(&mut self, v: u64) {
        infallible(rmp::encode::write_uint(&mut self.buf, v));
    }

    pub(crate) fn bytes(&mut self, data: &[u8]) {
        self.buf.as_mut_vec().extend_from_slice(data);
    }

    pub(crate) fn str(&mut self, s: &str) {
        let len = clamp_len(s.len());
        infallible(rmp::encode::write_str_len(&mut self.buf, len));
        // Truncation (only past 4 GiB) may split a UTF-8 sequence; still valid framing.
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        self.bytes(s.as_bytes().get(..n).unwrap_or(s.as_bytes()));
    }

    pub(crate) fn bin(&mut self, data: &[u8]) {
        let len = clamp_len(data.len());
        infallible(rmp::encode::write_bin_len(&mut self.buf, len));
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        self.bytes(data.get(..n).unwrap_or(data));
    }

    /// Writes an array header for `items` and returns how many items to write.
    pub(crate) fn array_len(&mut self, items: usize) -> usize {
        let len = clamp_len(items);
        infallible(rmp::encode::write_array_len(&mut self.buf, len));
        usize::try_from(len).unwrap_or(usize::MAX)
    }

    pub(crate) fn nil(&mut self) {
        match rmp::encode::write_nil(&mut self.buf) {
            Ok(()) => {}
            Err(e) => match e {},
        }
    }

    pub(crate) fn map_len(&mut self, entries: u32) {
        infallible(rmp::encode::write_map_len(&mut self.buf, entries));
    }

    pub(crate) fn uint_array(&mut self, values: &[u64]) {
        let n = self.array_len(values.len());
        for &v in values.iter().take(n) {
            self.uint(v);
        }
    }

    pub(crate) fn slot(&mut self, slot: &Slot) {
        self.map_len(4);
        self.str("offset");
        self.uint(slot.offset);
        self.str("length");
        self.uint(slot.length);
        self.str("shape");
        self.uint_array(&slot.shape);
        self.str("dtype");
        self.str(&slot.dtype);
    }

    pub(crate) fn slots(&mut self, slots: &[Slot]) {
        let n = self.array_len(slots.len());
        for slot in slots.iter().take(n) {
            self.slot(slot);
        }
    }
}

/// Encodes a `bool` response.
#[must_use]
pub fn encode_bool(v: bool) -> Vec<u8> {
    let mut w = Writer::new();
    w.bool(v);
    w.finish()
}

/// Encodes an `int` response in the smallest msgpack form (256 → `cd 01 00`).
#[must_use]
pub fn encode_int(v: i64) -> Vec<u8> {
    let mut w = Writer::new();
    w.int(v);
    w.finish()
}

/// Encodes a non-negative `int` response in the smallest msgpack form.
#[must_use]
pub fn encode_uint(v: u64) -> Vec<u8> {
    let mut w = Writer::new();
    w.uint(v);
    w.finish()
}

/// Encodes an `int | None` response: `None` becomes a bare reply.
#[must_use]
pub fn encode_optional_int(v: Option<i64>) -> Option<Vec<u8>> {
    v.map(encode_int)
}

/// Encodes a `str` response.
#[must_use]
pub fn encode_str(s: &str) -> Vec<u8> {
    let mut w = Writer::new();
    w.str(s);
    w.finish()
}

/// Encodes a `list[str]` response.
#[must_use]
pub fn encode_str_list(items: &[&str]) -> Vec<u8> {
    let mut w = Writer::new();
    let n = w.array_len(items.len());
    for s in items.iter().take(n) {
        w.str(s);
    }
    w.finish()
}

/// Encodes the `tuple[bytes, bool]` result of `store` / `retrieve`: `[bin handle, bool ok]`.
#[must_use]
pub fn encode_transfer_result(handle: &[u8], ok: bool) -> Vec<u8> {
    let mut w = Writer::new();
    w.array_len(2);
    w.bin(handle);
    w.bool(ok);
    w.finish()
}

/// Encodes the `prepare_store` response
/// `{"context": {"slots": [...], "chunk_indices": [...]}}`.
#[must_use]
pub fn encode_prepare_store(slots: &[Slot], chunk_indices: &[u64]) -> Vec<u8> {
    let mut w = Writer::new();
    w.map_len(1);
    w.str("context");
    w.map_len(2);
    w.str("slots");
    w.slots(slots);
    w.str("chunk_indices");
    w.uint_array(chunk_indices);
    w.finish()
}

/// Encodes the `prepare_retrieve` response
/// `{"success": bool, "data": b"", "context": {"slots": [...]}}`; when `success` is false the
/// context is the empty map `{}` and `slots` is ignored.
#[must_use]
pub fn encode_prepare_retrieve(success: bool, slots: &[Slot]) -> Vec<u8> {
    let mut w = Writer::new();
    w.map_len(3);
    w.str("success");
    w.bool(success);
    w.str("data");
    w.bin(&[]);
    w.str("context");
    if success {
        w.map_len(1);
        w.str("slots");
        w.slots(slots);
    } else {
        w.map_len(0);
    }
    w.finish()
}

/// Encodes the `cb_protocol_handshake` response `[int version, bool ok]`.
#[must_use]
pub fn encode_cb_protocol_handshake(version: i64, ok: bool) -> Vec<u8> {
    let mut w = Writer::new();
    w.array_len(2);
    w.int(version);
    w.bool(ok);
    w.finish()
}

/// What a KV-event record says happened (`KVEventRecord.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvEventKind {
    /// The chunk became readable in the medium.
    Stored,
    /// The chunk left the medium.
    Removed,
}

impl KvEventKind {
    /// The wire string (`"stored"` / `"removed"`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Removed => "removed",
        }
    }
}

/// One sequenced cache change (LMCache 0.5.6 `KVEventRecord`), encoded as the map
/// `{seq, kind, medium, model_name, block_hashes, parent_block_hash, token_ids}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventRecord {
    /// Sequence number (1, 2, ...; never reused within an incarnation).
    pub seq: u64,
    /// Stored or removed.
    pub kind: KvEventKind,
    /// Where (`"CPU"` for L1).
    pub medium: &'static str,
    /// The model the chunks belong to.
    pub model_name: std::sync::Arc<str>,
    /// The chunk's 32-byte hash. kvtier announces one chunk per record, so the wire's
    /// `block_hashes` list always has this one element (kept inline: no allocation per record).
    pub block_hash: [u8; 32],
    /// The hash of the chunk before the first one (stored records), `None` for a first chunk or
    /// when unknown.
    pub parent_block_hash: Option<[u8; 32]>,
    /// The chunk's tokens (stored records; empty when unknown and for removals).
    pub token_ids: TokenSpan,
}

/// A run of tokens inside a shared buffer: the records of one store share its token buffer
/// instead of copying each chunk's tokens.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenSpan {
    buf: Option<std::sync::Arc<[u32]>>,
    start: usize,
    len: usize,
}

impl TokenSpan {
    /// `buf[start..start + len]` (clamped to the buffer).
    #[must_use]
    pub fn new(buf: std::sync::Arc<[u32]>, start: usize, len: usize) -> Self {
        let start = start.min(buf.len());
        let len = len.min(buf.len() - start);
        Self {
            buf: Some(buf),
            start,
            len,
        }
    }

    /// The tokens.
    #[must_use]
    pub fn as_slice(&self) -> &[u32] {
        self.buf
            .as_deref()
            .and_then(|b| b.get(self.start..self.start + self.len))
            .unwrap_or(&[])
    }
}

/// One batch of a `subscribe_kv_events` stream (LMCache 0.5.6 `KVEventBatch`), encoded as the
/// map `{enabled, incarnation, next_cursor, lost, events}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventBatch {
    /// Whether the server records events (false ends the stream).
    pub enabled: bool,
    /// Changes when the server restarts: earlier announcements no longer hold.
    pub incarnation: u64,
    /// Resume after this sequence number.
    pub next_cursor: u64,
    /// Records were lost since the cursor: earlier announcements no longer hold.
    pub lost: bool,
    /// The records.
    pub events: Vec<KvEventRecord>,
}

impl KvEventBatch {
    fn write(&self, w: &mut Writer) {
        w.map_len(5);
        w.str("enabled");
        w.bool(self.enabled);
        w.str("incarnation");
        w.uint(self.incarnation);
        w.str("next_cursor");
        w.uint(self.next_cursor);
        w.str("lost");
        w.bool(self.lost);
        w.str("events");
        let n = w.array_len(self.events.len());
        for r in self.events.iter().take(n) {
            w.map_len(7);
            w.str("seq");
            w.uint(r.seq);
            w.str("kind");
            w.str(r.kind.as_str());
            w.str("medium");
            w.str(r.medium);
            w.str("model_name");
            w.str(&r.model_name);
            w.str("block_hashes");
            w.array_len(1);
            w.bin(&r.block_hash);
            w.str("parent_block_hash");
            match &r.parent_block_hash {
                Some(h) => w.bin(h),
                None => w.nil(),
            }
            w.str("token_ids");
            let tokens = r.token_ids.as_slice();
            let m = w.array_len(tokens.len());
            for &t in tokens.iter().take(m) {
                w.uint(u64::from(t));
            }
        }
    }
}

/// A handler's typed result, the counterpart of [`Request`](crate::Request): the engine
/// returns one, the service encodes it at the edge with [`Response::encode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `None`: a bare reply without a response frame.
    Nothing,
    /// `bool`.
    Bool(bool),
    /// `int` (non-negative).
    Uint(u64),
    /// `int | None` of the prefetch-status queries: `None` (bare reply) while still running.
    PrefixHits(Option<u64>),
    /// `str`.
    Str(&'static str),
    /// `list[str]`.
    StrList(Vec<String>),
    /// `register_kv_cache_engine_driven_context`'s `{shm_name, pool_size}`.
    EngineDrivenContext(RegisterEngineDrivenContextResponse),
    /// `prepare_store`'s slots for the chunks to write and their indices in the range.
    PrepareStore {
        /// One slot per chunk to write.
        slots: Vec<Slot>,
        /// Index in the request's range of each slot's chunk.
        chunk_indices: Vec<u64>,
    },
    /// `prepare_retrieve`'s slots (success).
    PrepareRetrieve(Vec<Slot>),
    /// One `subscribe_kv_events` batch.
    KvEvents(KvEventBatch),
    /// `store` / `retrieve`'s `(event handle, ok)`.
    Transfer {
        /// The event handle, echoed.
        handle: Vec<u8>,
        /// Whether the transfer happened.
        ok: bool,
    },
}

impl Response {
    /// The reply payload: `None` for a bare reply.
    #[must_use]
    pub fn encode(&self) -> Option<Vec<u8>> {
        Some(match self {
            Self::Nothing | Self::PrefixHits(None) => return None,
            Self::Bool(b) => encode_bool(*b),
            Self::Uint(n) => encode_uint(*n),
            Self::PrefixHits(Some(n)) => encode_int(i64::try_from(*n).unwrap_or(i64::MAX)),
            Self::Str(s) => encode_str(s),
            Self::StrList(items) => {
                let refs: Vec<&str> = items.iter().map(String::as_str).collect();
                encode_str_list(&refs)
            }
            Self::EngineDrivenContext(r) => r.encode(),
            Self::PrepareStore {
                slots,
                chunk_indices,
            } => encode_prepare_store(slots, chunk_indices),
            Self::PrepareRetrieve(slots) => encode_prepare_retrieve(true, slots),
            Self::Transfer { handle, ok } => encode_transfer_result(handle, *ok),
            Self::KvEvents(batch) => {
                let mut w = Writer::new();
                batch.write(&mut w);
                w.finish()
            }
        })
    }
}

impl Op {
    /// The reply to send when this op's handler fails, or `None` for a bare `[uid, op]` reply.
    /// See the table in the [module docs](crate::response).
    #[must_use]
    pub fn failure_reply(self) -> Option<Vec<u8>> {
        match self {
            Op::Store | Op::Retrieve | Op::StoreQ | Op::CbRetrievePreComputed => {
                Some(encode_transfer_result(&[], false))
            }
            Op::CommitStore | Op::CommitRetrieve | Op::Ping => Some(encode_bool(false)),
            Op::GetChunkSize
            | Op::P2pLookupAndLock
            | Op::QueryPrefetchStatus
            | Op::WaitPrefetchStatus => Some(encode_int(0)),
            Op::GetExperimental | Op::CbReorderPlan => Some(encode_str_list(&[])),
            Op::PrepareStore => Some(encode_prepare_store(&[], &[])),
            Op::PrepareRetrieve => Some(encode_prepare_retrieve(false, &[])),
            Op::RegisterKvCacheEngineDrivenContext => {
                Some(RegisterEngineDrivenContextResponse::default().encode())
            }
            Op::CbProtocolHandshake => Some(encode_cb_protocol_handshake(0, false)),
            Op::Noop => Some(encode_str("OK")),
            Op::RegisterKvCache
            | Op::UnregisterKvCache
            | Op::RegisterQCache
            | Op::UnregisterQCache
            | Op::Lookup
            | Op::FreeLookupLocks
            | Op::EndSession
            | Op::UnregisterKvCacheEngineDrivenContext
            | Op::Clear
            | Op::ReportBlockAllocation
            | Op::CbRegisterRope
            | Op::CbUnregisterRope
            | Op::CbUnifiedLookup
            | Op::P2pQueryLookupResults
            | Op::P2pUnlockObjects
            | Op::SubscribeKvEvents
            | Op::ServerModuleCall => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars() {
        assert_eq!(encode_int(256), [0xcd, 0x01, 0x00]);
        assert_eq!(encode_int(0x4d), [0x4d]);
        assert_eq!(encode_int(999), [0xcd, 0x03, 0xe7]);
        assert_eq!(encode_int(-1), [0xff]);
        assert_eq!(
            encode_uint(u64::MAX),
            [0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(encode_bool(true), [0xc3]);
        assert_eq!(encode_str("OK"), b"\xa2OK");
        assert_eq!(encode_optional_int(None), None);
        assert_eq!(
            encode_str_list(&["kv_event_stream"]),
            b"\x91\xafkv_event_stream"
        );
        assert_eq!(
            encode_transfer_result(b"stub_ipc_handle", true),
            b"\x92\xc4\x0fstub_ipc_handle\xc3"
        );
        assert_eq!(encode_cb_protocol_handshake(1, true), [0x92, 0x01, 0xc3]);
    }

    #[test]
    fn engine_driven_response() {
        let r = RegisterEngineDrivenContextResponse {
            shm_name: "kv".into(),
            pool_size: 4096,
        };
        assert_eq!(
            r.encode(),
            b"\x82\xa8shm_name\xa2kv\xa9pool_size\xcd\x10\x00"
        );
    }

    #[test]
    fn prepare_retrieve_failure_shape() {
        let bytes = encode_prepare_retrieve(false, &[]);
        assert_eq!(bytes, b"\x83\xa7success\xc2\xa4data\xc4\x00\xa7context\x80");
    }

    #[test]
    fn failure_replies() {
        assert_eq!(
            Op::Store.failure_reply(),
            Some(b"\x92\xc4\x00\xc2".to_vec())
        );
        assert_eq!(Op::CommitStore.failure_reply(), Some(vec![0xc2]));
        assert_eq!(Op::QueryPrefetchStatus.failure_reply(), Some(vec![0x00]));
        assert_eq!(Op::GetExperimental.failure_reply(), Some(vec![0x90]));
        assert_eq!(Op::Noop.failure_reply(), Some(b"\xa2OK".to_vec()));
        assert_eq!(
            Op::CbProtocolHandshake.failure_reply(),
            Some(vec![0x92, 0x00, 0xc2])
        );
        assert_eq!(Op::Lookup.failure_reply(), None);
        assert_eq!(Op::SubscribeKvEvents.failure_reply(), None);
        assert_eq!(
            Op::PrepareStore.failure_reply(),
            Some(b"\x81\xa7context\x82\xa5slots\x90\xadchunk_indices\x90".to_vec())
        );
    }
}
