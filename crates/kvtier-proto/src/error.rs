//! The single error type of the wire codec.
//!
//! Invariants:
//! - Every failure to parse client bytes is a [`ProtoError`]; the codec never panics on input.
//! - Decode errors carry the dotted field path of the offending value (for example
//!   `key.token_ids[3]`), rendered only when the error is created, never on the success path.
//! - [`ProtoError::kind`] is a closed set of short, stable labels meant for metric labels; the
//!   free-text diagnostics stay in the `Display` output (logs), never in labels.

use crate::op::Op;

/// Why a multipart message or one of its frames could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The ROUTER message has fewer than the three frames `[identity, uid, op]`.
    #[error("message has {got} frames, at least 3 are required (identity, uid, op)")]
    TooFewFrames {
        /// Number of frames received.
        got: usize,
    },
    /// The op frame is a well-formed int or str that names no known operation.
    #[error("unknown operation: {0}")]
    UnknownOp(String),
    /// The number of payload frames does not match the operation's arity.
    #[error("{op}: expected {expected} payload frames, got {got}")]
    Arity {
        /// The decoded operation.
        op: Op,
        /// Payload frames the operation declares.
        expected: usize,
        /// Payload frames received.
        got: usize,
    },
    /// A msgpack value is malformed, truncated, of the wrong type or out of range.
    #[error("{path}: {reason}")]
    Decode {
        /// Field path of the offending value, e.g. `key.token_ids[3]`.
        path: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A frame (or an ext payload) holds more bytes after its single msgpack document.
    #[error("{path}: trailing bytes after the msgpack value")]
    TrailingBytes {
        /// Field path of the frame or ext value.
        path: String,
    },
    /// A msgpack ext value with a type code other than 1 (device IPC wrapper).
    #[error("{path}: unsupported msgpack ext type {code}")]
    UnsupportedExt {
        /// Field path of the ext value.
        path: String,
        /// The ext type code received.
        code: i8,
    },
}

impl ProtoError {
    /// Short, stable label for metrics (`too_few_frames`, `unknown_op`, `arity`, `decode`,
    /// `trailing_bytes`, `unsupported_ext`).
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooFewFrames { .. } => "too_few_frames",
            Self::UnknownOp(_) => "unknown_op",
            Self::Arity { .. } => "arity",
            Self::Decode { .. } => "decode",
            Self::TrailingBytes { .. } => "trailing_bytes",
            Self::UnsupportedExt { .. } => "unsupported_ext",
        }
    }
}
