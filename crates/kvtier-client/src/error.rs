//! Error types of the client.

use std::time::Duration;

use kvtier_proto::Op;

/// A request that did not produce a usable reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// ZeroMQ refused an operation (socket creation, connect, send, poll, receive).
    #[error("zeromq {what} failed: {source}")]
    Zmq {
        /// What was being done.
        what: &'static str,
        /// The libzmq error.
        source: zmq::Error,
    },
    /// No reply arrived before the deadline. A reply arriving later is discarded.
    #[error("{op} (uid {uid}) got no reply within {after:?}")]
    Timeout {
        /// The operation.
        op: Op,
        /// Its request uid.
        uid: u64,
        /// The timeout that expired.
        after: Duration,
    },
    /// The reply frames do not have the protocol's shape (`[uid, op]` or `[uid, op, body]`),
    /// or echo a different op than the one sent.
    #[error("malformed reply to {op} (uid {uid}): {reason}")]
    Protocol {
        /// The operation.
        op: Op,
        /// Its request uid.
        uid: u64,
        /// What is wrong.
        reason: String,
    },
    /// The reply body does not decode as the operation's response type.
    #[error("cannot decode the reply to {op}: {reason}")]
    Decode {
        /// The operation.
        op: Op,
        /// What is wrong.
        reason: String,
    },
    /// [`crate::Client::wait`] was asked for a uid this client has no request in flight for.
    #[error("no request with uid {0} is in flight")]
    NotInFlight(u64),
}

impl ClientError {
    /// Whether this is a [`ClientError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }
}

/// Failures of [`crate::ShmPool`].
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The name is empty, too long, or contains `/` or NUL.
    #[error("invalid shared-memory segment name {0:?}")]
    InvalidName(String),
    /// A system call failed.
    #[error("{op} of shared-memory segment {name:?} failed: {source}")]
    Sys {
        /// The call.
        op: &'static str,
        /// The segment.
        name: String,
        /// The OS error.
        source: rustix::io::Errno,
    },
    /// The segment is smaller than the pool size the server announced.
    #[error("shared-memory segment {name:?} has {actual} bytes, the server announced {announced}")]
    TooSmall {
        /// The segment.
        name: String,
        /// Its size on disk.
        actual: u64,
        /// `pool_size` from the registration reply.
        announced: u64,
    },
    /// A pool size of 0 (pickle mode) or one that does not fit the address space.
    #[error("pool size {0} cannot be mapped")]
    BadSize(u64),
    /// A copy range outside the pool.
    #[error("range {offset}+{len} is outside the {size}-byte pool")]
    OutOfBounds {
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// Pool size.
        size: u64,
    },
}
