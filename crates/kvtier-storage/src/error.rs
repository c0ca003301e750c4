//! The L2 error type: one closed set of kinds, classified once near the cause.

/// Why an L2 operation on one object (or one batch) failed.
///
/// A miss is not an error for lookups (they return `None`); `NotFound` is what a load of a key
/// that is gone returns. Every variant is cheap to clone because a batch-wide failure is
/// reported for each key of the batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum L2Error {
    /// The backend is marked unhealthy; the call failed fast without touching it.
    #[error("adapter unavailable: {0}")]
    Unavailable(String),
    /// The object is not stored (or vanished between lookup and load).
    #[error("object not found")]
    NotFound,
    /// The stored object failed verification (bad header, truncated, checksum mismatch). It is
    /// removed and never served.
    #[error("stored object is corrupt: {0}")]
    Corrupt(String),
    /// The device is full (or refuses writes: quota, file-size limit, read-only).
    #[error("no space: {0}")]
    NoSpace(String),
    /// The adapter's own capacity is exhausted by pinned objects (nothing evictable).
    #[error("capacity exhausted: {needed} bytes needed, nothing evictable")]
    CapacityFull {
        /// Bytes the store needed.
        needed: u64,
    },
    /// An I/O error other than "full".
    #[error("i/o error: {0}")]
    Io(String),
    /// The remote backend answered with an error or the connection failed.
    #[error("backend error: {0}")]
    Backend(String),
    /// The caller passed inconsistent arguments (length mismatch, range outside the segment).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The adapter is closed.
    #[error("adapter is closed")]
    Closed,
}

impl L2Error {
    /// Short stable label for metrics and status counters.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "unavailable",
            Self::NotFound => "not_found",
            Self::Corrupt(_) => "corrupt",
            Self::NoSpace(_) => "no_space",
            Self::CapacityFull { .. } => "capacity_full",
            Self::Io(_) => "io",
            Self::Backend(_) => "backend",
            Self::Invalid(_) => "invalid",
            Self::Closed => "closed",
        }
    }
}

/// Errors building the tier or an adapter from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--l2-adapter` JSON is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The adapter could not be opened (e.g. the fs base path cannot be created).
    #[error("opening the {kind} adapter: {reason}")]
    Open {
        /// Adapter type name.
        kind: &'static str,
        /// What failed.
        reason: String,
    },
    /// The async runtime could not be built.
    #[error("building the l2 runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Whether a `redis` crate error means the connection failed (refused, reset, timed out, or
/// unusable), as opposed to the server answering with an error: the `resp` and `valkey`
/// adapters mark themselves down on the first and fail only the affected keys on the second.
pub(crate) fn is_redis_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}
