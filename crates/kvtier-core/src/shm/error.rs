//! [`ShmError`]: what creating, accessing and removing a segment can fail with, each variant
//! naming the segment and the input or OS error behind it.

use std::path::PathBuf;

use rustix::io::Errno;

/// Errors from creating, accessing and removing a shared-memory segment.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The segment name is not usable.
    #[error("invalid shared-memory segment name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name (truncated to 256 characters).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The requested size is zero or cannot be mapped on this machine.
    #[error("invalid size {size} for shared-memory segment {name:?}: {reason}")]
    InvalidSize {
        /// Segment name.
        name: String,
        /// Requested size in bytes.
        size: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The shared-memory filesystem has less free space than the segment needs.
    #[error(
        "not enough shared memory for segment {name:?}: requested {requested} bytes, \
         but only {available} bytes are available in {}",
        dir.display()
    )]
    InsufficientCapacity {
        /// Segment name.
        name: String,
        /// Requested size in bytes.
        requested: u64,
        /// Free bytes (`f_bavail * f_frsize`).
        available: u64,
        /// The directory that was checked.
        dir: PathBuf,
    },
    /// `statvfs` on the shared-memory directory failed.
    #[error("cannot check shared-memory capacity of {}: {source}", dir.display())]
    Statvfs {
        /// The directory that was checked.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: Errno,
    },
    /// Another live server holds the segment's liveness lock.
    #[error(
        "shared-memory segment {name:?} is owned by a live kvtier server (its liveness lock \
         is held); stop that server or choose another name"
    )]
    LiveOwner {
        /// Segment name.
        name: String,
    },
    /// The name is taken by something that is not a regular file (a directory, a FIFO, ...).
    #[error(
        "shared-memory name {name:?} is taken by something that is not a segment \
         (not a regular file); remove it or choose another name"
    )]
    NotASegment {
        /// Segment name.
        name: String,
    },
    /// Other processes kept replacing the name while this one tried to create it.
    #[error(
        "gave up creating shared-memory segment {name:?}: other processes kept racing for the name"
    )]
    Contended {
        /// Segment name.
        name: String,
    },
    /// A system call failed.
    #[error("{op} failed for shared-memory segment {name:?}: {source}")]
    Sys {
        /// The call that failed (`shm_open`, `ftruncate`, `mmap`, ...).
        op: &'static str,
        /// Segment name.
        name: String,
        /// The OS error.
        #[source]
        source: Errno,
    },
    /// An access range does not lie inside the segment.
    #[error("range {offset}+{len} is outside the shared-memory segment of {size} bytes")]
    OutOfBounds {
        /// Start of the range.
        offset: usize,
        /// Length of the range.
        len: usize,
        /// Segment size.
        size: usize,
    },
    /// Populating pages failed (typically `ENOSPC`: `/dev/shm` is full).
    #[error(
        "prefaulting {len} bytes at offset {offset} of shared-memory segment {name:?} failed: {source}"
    )]
    Prefault {
        /// Segment name.
        name: String,
        /// Start of the range.
        offset: usize,
        /// Length of the range.
        len: usize,
        /// The OS error.
        #[source]
        source: Errno,
    },
}
