//! Integration tests of the kvtier-proto wire codec: golden bytes from the reference, typed
//! decoding of hand-built msgpack, and property tests (no panics, round trips).

mod common;
mod decode;
mod golden;
mod props;
