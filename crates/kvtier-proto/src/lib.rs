//! LMCache 0.5.6 multiprocess wire protocol: op table, msgpack payload decoding and response
//! encoding, wire-compatible with LMCache 0.5.6 clients (msgspec msgpack over ZeroMQ).
//!
//! Layout of a request as the server's ROUTER socket sees it (see [`frame`]):
//! `[identity, uid, op, payload_1, ..., payload_n]`; replies are `[identity, uid, op]` (for a
//! `None` result) or `[identity, uid, op, response]`, with `uid` and `op` echoed byte-for-byte.
//!
//! Modules:
//! - [`op`]: the operation table ([`Op`]) and op-frame decoding ([`decode_op`]).
//! - [`reader`]: the strict streaming msgpack [`Reader`] with field-path errors.
//! - [`request`]: typed payload decoding ([`decode_request`] → [`Request`]).
//! - [`response`]: response encoders and each op's defined failure reply.
//! - [`frame`]: multipart framing and stream control frames.
//! - [`dtype`]: the torch dtype table ([`dtype_itemsize`]).
//! - [`vllm_events`]: vLLM's KV-event format (`KVEventBatch` of `BlockStored`/`BlockRemoved`/
//!   `AllBlocksCleared`), written by the router-facing publisher.
//! - [`error`]: the error type, [`ProtoError`].
//!
//! Crate-wide invariants: no input bytes can make any function panic, overflow or allocate more
//! than a small multiple of the input size; every decode failure is a typed [`ProtoError`]
//! naming the field path. The reference server sends no error replies, so what the server does
//! on error (log, then send [`Op::failure_reply`] or nothing) is decided outside this crate.

pub mod dtype;
pub mod error;
pub mod frame;
pub mod op;
pub mod reader;
pub mod request;
pub mod response;
pub mod vllm_events;

pub use dtype::dtype_itemsize;
pub use error::ProtoError;
pub use frame::{RequestFrames, StreamControl, decode_uid};
pub use op::{Op, Scheduling, decode_op};
pub use reader::{Path, Reader};
pub use request::{
    BlockAllocationRecord, CpuShmWrapper, DeviceIpcWrapper, EngineGroupInfo, IpcKey,
    RegisterEngineDrivenContext, RegisterKvCache, Request, STUB_IPC_HANDLE, TensorMetadata,
    TokenArrayStats, TokenArrays, TokenIds, decode_request, decode_request_with,
};
pub use response::{
    KvEventBatch, KvEventKind, KvEventRecord, RegisterEngineDrivenContextResponse, Response, Slot,
    TokenSpan,
};
