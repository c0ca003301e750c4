//! The L1 pool's named POSIX shared-memory segment.
//!
//! One [`ShmSegment`] backs the whole L1 pool. Engines map it by name: the server sends
//! [`ShmSegment::name`] (no leading `/`) and Python's
//! `multiprocessing.shared_memory.SharedMemory(name)` opens `/dev/shm/<name>` read-write,
//! `MAP_SHARED`. LMCache 0.5.6 names the pool `lmcache_l1_pool_<--shm-name>` (see
//! [`lmcache_pool_name`]), creates it with mode 0600 and removes it on shutdown.
//!
//! Invariants:
//! - The segment is created `O_CREAT | O_EXCL`, mode 0600, sized with `ftruncate` (sparse:
//!   no page is touched unless [`ShmOptions::prefault`] is set) and mapped once, read-write,
//!   `MAP_SHARED`, for the lifetime of the value.
//! - **Liveness lock.** The creating process holds `flock(LOCK_EX)` on the segment's fd for
//!   as long as the [`ShmSegment`] lives. A name whose segment is locked belongs to a live
//!   server and is never touched; a name whose segment is *not* locked is the leftover of
//!   a crashed server and is unlinked and recreated (with a warning). The kernel drops the
//!   lock when the process dies, however it dies. (A segment made by a *Python* LMCache
//!   server carries no lock and so looks stale; do not run both with the same name.)
//! - **Unlink only our own.** On drop (or [`ShmSegment::close`]) the name is unlinked only
//!   if this process created it (not a forked child) and the name still refers to the
//!   same inode (`st_dev`/`st_ino`), so a successor's segment is never removed.
//! - **Raw memory.** The mapping is shared with other processes that read and write it at
//!   any time, so this module never forms Rust references over it except through the
//!   `unsafe` [`ShmSegment::slice`]. Safe access is by bounds-checked copies
//!   ([`ShmSegment::copy_in`] / [`ShmSegment::copy_out`]); which byte ranges may be
//!   written when is decided by the L1 object state machine, not here. Bytes copied while
//!   another party writes the same range are unspecified (torn), never out of bounds.
//! - Nothing here panics on client or environment input: names, sizes, offsets, a full
//!   `/dev/shm` and races with other servers all come back as [`ShmError`].
//!
//! Only Linux is supported (`/dev/shm` tmpfs semantics, `fallocate`, `flock`).

use std::fmt;
use std::path::PathBuf;
use std::ptr::{self, NonNull};
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use rustix::fd::OwnedFd;
use rustix::fs::{FileType, FlockOperation, Mode, Stat};
use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};
use rustix::process::{Pid, getpid};
use rustix::shm;

mod error;
mod pages;

pub use error::ShmError;
pub use pages::{POPULATE_GRANULE, populate_write};

/// Where Linux keeps POSIX shared memory; the default for [`ShmOptions::shm_dir`].
pub const DEFAULT_SHM_DIR: &str = "/dev/shm";

/// Longest accepted segment name, in bytes, without the optional leading `/`.
pub const MAX_NAME_LEN: usize = 200;

/// Prefix LMCache puts in front of `--shm-name` to name the L1 pool segment.
pub const LMCACHE_POOL_PREFIX: &str = "lmcache_l1_pool_";

/// How many times [`ShmSegment::create`] retries when another process races it for the name.
const CREATE_ATTEMPTS: usize = 4;

/// LMCache's L1 pool segment name for a `--shm-name` value: the value itself if it already
/// starts with [`LMCACHE_POOL_PREFIX`], otherwise the prefix plus the value.
pub fn lmcache_pool_name(shm_name: &str) -> String {
    if shm_name.starts_with(LMCACHE_POOL_PREFIX) {
        shm_name.to_owned()
    } else {
        format!("{LMCACHE_POOL_PREFIX}{shm_name}")
    }
}

/// Options for [`ShmSegment::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmOptions {
    /// Directory whose filesystem backs POSIX shared memory; only used for the capacity
    /// check (`statvfs`). The segment itself is always opened with `shm_open` semantics,
    /// i.e. under `/dev/shm`. Default: [`DEFAULT_SHM_DIR`].
    pub shm_dir: PathBuf,
    /// Allocate every page at creation so that no client write pays the tmpfs allocation
    /// fault (and no client can hit `SIGBUS` on a full `/dev/shm` later). This commits the
    /// whole segment size in RAM at once, charged to this process's memory cgroup, and
    /// takes time proportional to the size (zeroing). Default: `false`. For large pools,
    /// leave it off and call [`ShmSegment::prefault_range`] in pieces from a background
    /// thread instead.
    pub prefault: bool,
}

impl Default for ShmOptions {
    fn default() -> Self {
        Self {
            shm_dir: PathBuf::from(DEFAULT_SHM_DIR),
            prefault: false,
        }
    }
}

/// A named POSIX shared-memory segment, created, locked and mapped by this process.
///
/// See the module docs for the ownership and liveness rules.
pub struct ShmSegment {
    name: String,
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
    /// `fstat` of `fd` at creation: identifies our inode for the unlink check.
    identity: Stat,
    creator: Pid,
    released: bool,
    /// One bit per [`POPULATE_GRANULE`] populated by [`ShmSegment::populate_once`].
    populated: OnceLock<Box<[AtomicU64]>>,
}

// SAFETY: `ShmSegment` owns its fd and its mapping. The mapping stays valid until
// `teardown`, which needs `&mut self` (drop or `close(self)`), so no shared reference can
// observe it unmapped. All shared-reference methods either only read the immutable fields
// or go through raw-pointer copies into bounds-checked ranges (never Rust references over
// the shared memory); coordinating concurrent writers to the same bytes is the caller's
// protocol, exactly as it is for the other processes mapping the segment.
unsafe impl Send for ShmSegment {}
// SAFETY: see `Send` above; `&ShmSegment` exposes no interior Rust state that could race.
unsafe impl Sync for ShmSegment {}

impl fmt::Debug for ShmSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmSegment")
            .field("name", &self.name)
            .field("len", &self.len)
            .field("ptr", &self.ptr)
            .finish_non_exhaustive()
    }
}

/// The longest POSIX shared-memory name component Linux accepts (`NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// Validates a POSIX shared-memory name (the server's own segment, or one an engine sends) and
/// returns it without its optional leading `/`: a single, non-special path component of at
/// most [`NAME_MAX`] bytes with no NUL. This is the one name check of the workspace; names come
/// from clients, so every rejection says why.
///
/// # Errors
/// [`ShmError::InvalidName`] naming the rule that failed.
pub fn validate_name(name: &str) -> Result<&str, ShmError> {
    let invalid = |reason| ShmError::InvalidName {
        name: name.chars().take(256).collect(),
        reason,
    };
    let bare = name.strip_prefix('/').unwrap_or(name);
    if bare.is_empty() {
        return Err(invalid("it is empty"));
    }
    if bare.len() > NAME_MAX {
        return Err(invalid("it is longer than 255 bytes"));
    }
    if bare.contains('/') {
        return Err(invalid(
            "it contains '/' (only a single leading '/' is allowed)",
        ));
    }
    if bare.contains('\0') {
        return Err(invalid("it contains a NUL byte"));
    }
    if bare == "." || bare == ".." {
        return Err(invalid("it is '.' or '..'"));
    }
    Ok(bare)
}

fn same_inode(a: &Stat, b: &Stat) -> bool {
    a.st_dev == b.st_dev && a.st_ino == b.st_ino
}

/// Opens whatever `name` refers to, read-only and non-blocking (so that a FIFO planted
/// under the name in the world-writable `/dev/shm` cannot hang us).
fn open_existing(name: &str) -> Result<OwnedFd, Errno> {
    let nonblock = shm::OFlags::from_bits_retain(rustix::fs::OFlags::NONBLOCK.bits());
    shm::open(name, shm::OFlags::RDONLY | nonblock, Mode::empty())
}

/// Whether `name` currently refers to the inode described by `ours`.
fn name_refers_to(name: &str, ours: &Stat) -> Result<bool, Errno> {
    match open_existing(name) {
        Ok(fd) => Ok(same_inode(&rustix::fs::fstat(&fd)?, ours)),
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Unlinks `name` if it still refers to `ours`. Returns whether it unlinked.
fn unlink_if_ours(name: &str, ours: &Stat) -> Result<bool, Errno> {
    if !name_refers_to(name, ours)? {
        return Ok(false);
    }
    match shm::unlink(name) {
        Ok(()) | Err(Errno::NOENT) => Ok(true),
        Err(e) => Err(e),
    }
}

impl ShmSegment {
    /// Creates, locks and maps the segment `name` of `size` bytes.
    ///
    /// `name` may carry one leading `/`, which is dropped. Fails with
    /// [`ShmError::LiveOwner`] if a live server holds a segment of that name, replaces a
    /// stale one (unlocked: its server crashed), and fails with
    /// [`ShmError::InsufficientCapacity`] if `options.shm_dir` has less than `size` bytes
    /// free. With `options.prefault`, every page is allocated before this returns.
    pub fn create(name: &str, size: u64, options: ShmOptions) -> Result<Self, ShmError> {
        let name = validate_name(name)?;
        if name.len() > MAX_NAME_LEN {
            return Err(ShmError::InvalidName {
                name: name.chars().take(256).collect(),
                reason: "it is longer than 200 bytes",
            });
        }
        let invalid_size = |reason| ShmError::InvalidSize {
            name: name.to_owned(),
            size,
            reason,
        };
        if size == 0 {
            return Err(invalid_size("it must be greater than zero"));
        }
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| isize::try_from(l).is_ok())
            .ok_or_else(|| invalid_size("it does not fit this address space"))?;
        let sys = |op, source| ShmError::Sys {
            op,
            name: name.to_owned(),
            source,
        };

        for _ in 0..CREATE_ATTEMPTS {
            let flags = shm::OFlags::CREATE | shm::OFlags::EXCL | shm::OFlags::RDWR;
            match shm::open(name, flags, Mode::RUSR | Mode::WUSR) {
                Ok(fd) => {
                    let identity = rustix::fs::fstat(&fd).map_err(|e| sys("fstat", e))?;
                    match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
                        Ok(()) => {}
                        // A concurrent creator took our fresh, not-yet-locked segment for a
                        // stale one and now owns the name: start over.
                        Err(Errno::WOULDBLOCK) => continue,
                        Err(e) => {
                            // Best effort: the segment is ours and useless without the lock.
                            let _ = unlink_if_ours(name, &identity);
                            return Err(sys("flock", e));
                        }
                    }
                    if !name_refers_to(name, &identity).map_err(|e| sys("shm_open", e))? {
                        // Replaced between our create and our lock: not ours any more.
                        continue;
                    }
                    return Self::finish(name.to_owned(), fd, identity, len, &options);
                }
                Err(Errno::EXIST) => {
                    let existing = match open_existing(name) {
                        Ok(fd) => fd,
                        Err(Errno::NOENT) => continue,
                        Err(e) => return Err(sys("shm_open (existing segment)", e)),
                    };
                    let stale = rustix::fs::fstat(&existing).map_err(|e| sys("fstat", e))?;
                    if FileType::from_raw_mode(stale.st_mode) != FileType::RegularFile {
                        return Err(ShmError::NotASegment {
                            name: name.to_owned(),
                        });
                    }
                    match rustix::fs::flock(&existing, FlockOperation::NonBlockingLockExclusive) {
                        Ok(()) => {}
                        Err(Errno::WOULDBLOCK) => {
                            return Err(ShmError::LiveOwner {
                                name: name.to_owned(),
                            });
                        }
                        Err(e) => return Err(sys("flock (existing segment)", e)),
                    }
                    // Only unlink if the name still refers to the inode we locked; either
                    // way, try again from the top. The stale lock is held until here.
                    if unlink_if_ours(name, &stale)
                        .map_err(|e| sys("shm_unlink (stale segment)", e))?
                    {
                        tracing::warn!(
                            segment = name,
                            "removed stale shared-memory segment left by a server that is gone"
                        );
                    }
                }
                Err(e) => return Err(sys("shm_open", e)),
            }
        }
        Err(ShmError::Contended {
            name: name.to_owned(),
        })
    }

    /// Capacity check, size, map and (optionally) prefault a freshly created, locked segment.
    /// On failure the name is unlinked again.
    fn finish(
        name: String,
        fd: OwnedFd,
        identity: Stat,
        len: usize,
        options: &ShmOptions,
    ) -> Result<Self, ShmError> {
        let abort = |err: ShmError| {
            if let Err(e) = unlink_if_ours(&name, &identity) {
                tracing::warn!(segment = %name, error = %e, "cannot remove segment after a failed create");
            }
            err
        };
        let sys = |op, source| ShmError::Sys {
            op,
            name: name.clone(),
            source,
        };

        let vfs = rustix::fs::statvfs(&options.shm_dir).map_err(|source| {
            abort(ShmError::Statvfs {
                dir: options.shm_dir.clone(),
                source,
            })
        })?;
        let available = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        let requested = len as u64;
        if requested > available {
            return Err(abort(ShmError::InsufficientCapacity {
                name: name.clone(),
                requested,
                available,
                dir: options.shm_dir.clone(),
            }));
        }

        rustix::fs::ftruncate(&fd, requested).map_err(|e| abort(sys("ftruncate", e)))?;
        // SAFETY: a fresh mapping chosen by the kernel (null hint) of a file we just sized to
        // `len` bytes; no Rust reference to it exists.
        let raw = unsafe {
            rustix::mm::mmap(
                ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .map_err(|e| abort(sys("mmap", e)))?;
        let Some(ptr) = NonNull::new(raw.cast::<u8>()) else {
            return Err(abort(sys("mmap", Errno::FAULT)));
        };

        let segment = Self {
            name,
            fd,
            ptr,
            len,
            identity,
            creator: getpid(),
            released: false,
            populated: OnceLock::new(),
        };
        // From here on, `Drop` unmaps and unlinks on failure.
        if options.prefault {
            segment.prefault_range(0, len)?;
        }
        tracing::info!(
            segment = %segment.name,
            size = len,
            prefault = options.prefault,
            "created shared-memory segment"
        );
        Ok(segment)
    }

    /// The segment name as clients open it: without a leading `/`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size of the segment in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: a segment has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start of the mapping.
    ///
    /// The memory is shared with other processes and may change at any time: treat it as
    /// raw memory. Never hold a `&[u8]` or `&mut [u8]` over it beyond a short, externally
    /// coordinated access, and never use the pointer after the segment is dropped.
    pub fn base_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Pointer to `offset`, after checking that `offset..offset + len` lies in the segment.
    ///
    /// The same rules as for [`base_ptr`](Self::base_ptr) apply.
    pub fn ptr_at(&self, offset: usize, len: usize) -> Result<NonNull<u8>, ShmError> {
        self.check_range(offset, len)?;
        // SAFETY: `offset <= self.len` (checked above), so the result stays inside the
        // mapping (or one past its end for an empty range at the end).
        Ok(unsafe { self.ptr.add(offset) })
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<(), ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(ShmError::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Copies `src` into the segment at `offset`. Fails, without copying, if the range
    /// does not lie in the segment. A MiB or more is copied with non-temporal stores
    /// (`kvtier_copy::copy_bulk`): what lands in L1 is read by an engine later, not by this
    /// thread now.
    pub fn copy_in(&self, offset: usize, src: &[u8]) -> Result<(), ShmError> {
        let dst = self.ptr_at(offset, src.len())?;
        // SAFETY: `dst..dst + src.len()` is inside our live, writable mapping (checked by
        // `ptr_at`). It cannot overlap `src`: a safe `&[u8]` never points into the mapping,
        // and one obtained from the unsafe `slice` forbids writes to its range while alive.
        unsafe { kvtier_copy::copy_bulk(src.as_ptr(), dst.as_ptr(), src.len()) };
        Ok(())
    }

    /// Copies `dst.len()` bytes out of the segment from `offset`. Fails, without copying,
    /// if the range does not lie in the segment. Ordinary (cached) stores: the buffer is read
    /// right away by whoever sends it on to L2.
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) -> Result<(), ShmError> {
        let src = self.ptr_at(offset, dst.len())?;
        // SAFETY: `src..src + dst.len()` is inside our live mapping (checked by `ptr_at`).
        // `dst` is an exclusive Rust slice, and this module never hands out `&mut` into the
        // mapping, so the two ranges cannot overlap.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Borrows `offset..offset + len` of the segment as a byte slice.
    ///
    /// # Safety
    ///
    /// For as long as the returned slice lives, no thread of any process may write to that
    /// range (in kvtier: the object it covers is read-locked or otherwise unpublished for
    /// writing). The bounds are checked; only the no-writer rule is on the caller.
    pub unsafe fn slice(&self, offset: usize, len: usize) -> Result<&[u8], ShmError> {
        let start = self.ptr_at(offset, len)?;
        // SAFETY: in bounds of a live, readable mapping that outlives `&self`; the caller
        // guarantees no concurrent writes for the slice's lifetime.
        Ok(unsafe { std::slice::from_raw_parts(start.as_ptr(), len) })
    }

    /// Unmaps the segment, unlinks its name (if this process created it and the name still
    /// refers to it) and releases the liveness lock, reporting the first error.
    ///
    /// Dropping does the same but can only log errors.
    pub fn close(mut self) -> Result<(), ShmError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), ShmError> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        let mut first_err = None;
        // SAFETY: `ptr`/`len` are exactly our mapping, mapped once and unmapped only here
        // (guarded by `released`); we hold `&mut self`, so no borrow of it is alive.
        if let Err(source) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            first_err = Some(ShmError::Sys {
                op: "munmap",
                name: self.name.clone(),
                source,
            });
        }
        // A forked child inherits the mapping and fd but does not own the name.
        if getpid() == self.creator {
            match unlink_if_ours(&self.name, &self.identity) {
                Ok(true) => tracing::info!(segment = %self.name, "removed shared-memory segment"),
                Ok(false) => tracing::warn!(
                    segment = %self.name,
                    "not removing shared-memory segment: its name now refers to another segment"
                ),
                Err(source) => {
                    first_err.get_or_insert(ShmError::Sys {
                        op: "shm_unlink",
                        name: self.name.clone(),
                        source,
                    });
                }
            }
        }
        // The fd (and with it the liveness lock) is closed when `self` is dropped.
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(error = %e, "error while releasing shared-memory segment");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub(super) fn unique_name(tag: &str) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        format!("kvtier_test_{}_{tag}_{n}", std::process::id())
    }

    fn shm_path(name: &str) -> PathBuf {
        Path::new(DEFAULT_SHM_DIR).join(name)
    }

    pub(super) fn create(name: &str, size: u64) -> ShmSegment {
        ShmSegment::create(name, size, ShmOptions::default()).expect("create segment")
    }

    pub(super) fn allocated_bytes(name: &str) -> u64 {
        fs::metadata(shm_path(name))
            .expect("segment exists")
            .blocks()
            * 512
    }

    #[test]
    fn create_makes_a_private_sparse_file_of_the_right_size() {
        let name = unique_name("mode");
        let seg = create(&format!("/{name}"), 1 << 20);
        assert_eq!(seg.name(), name, "leading '/' is stripped");
        assert_eq!(seg.len(), 1 << 20);
        assert!(!seg.is_empty());
        let md = fs::metadata(shm_path(&name)).expect("segment file exists");
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(md.len(), 1 << 20);
        assert_eq!(md.blocks(), 0, "no page is allocated before use");
        drop(seg);
        assert!(!shm_path(&name).exists(), "drop removes the name");
    }

    #[test]
    fn data_is_shared_with_an_independent_mapping() {
        let name = unique_name("map");
        let len = 64 * 1024;
        let seg = create(&name, len as u64);
        seg.copy_in(4096, b"hello").expect("in bounds");

        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(shm_path(&name))
            .expect("open segment file");
        // SAFETY: a fresh shared mapping of a file of `len` bytes; accessed only through
        // raw pointers below and unmapped before the test ends.
        let other = unsafe {
            rustix::mm::mmap(
                ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &file,
                0,
            )
        }
        .expect("second mmap")
        .cast::<u8>();

        let mut seen = [0u8; 5];
        // SAFETY: 4096 + 5 <= len; nothing else writes these bytes now.
        unsafe { ptr::copy_nonoverlapping(other.add(4096), seen.as_mut_ptr(), 5) };
        assert_eq!(&seen, b"hello");

        // SAFETY: 100 < len.
        unsafe { other.add(100).write(42) };
        let mut byte = [0u8; 1];
        seg.copy_out(100, &mut byte).expect("in bounds");
        assert_eq!(byte, [42]);

        // SAFETY: the mapping created above, no longer used.
        unsafe { rustix::mm::munmap(other.cast(), len) }.expect("munmap");
        seg.close().expect("close");
        assert!(!shm_path(&name).exists());
    }

    #[test]
    fn second_create_while_the_first_is_alive_is_refused() {
        let name = unique_name("live");
        let first = create(&name, 8192);
        first.copy_in(0, &[9]).expect("in bounds");
        let err = ShmSegment::create(&name, 8192, ShmOptions::default())
            .expect_err("the name is owned by a live segment");
        assert!(matches!(&err, ShmError::LiveOwner { name: n } if *n == name));
        assert!(err.to_string().contains(&name));
        assert!(err.to_string().contains("live"));

        // The loser touched nothing.
        assert!(shm_path(&name).exists());
        let mut byte = [0u8; 1];
        first.copy_out(0, &mut byte).expect("in bounds");
        assert_eq!(byte, [9]);
        drop(first);
        assert!(!shm_path(&name).exists());
    }

    #[test]
    fn stale_segment_is_replaced() {
        let name = unique_name("stale");
        let path = shm_path(&name);
        fs::write(&path, vec![7u8; 8192]).expect("plant a stale segment");
        let stale_ino = fs::metadata(&path).expect("stale exists").ino();

        let seg = create(&name, 4096);
        let md = fs::metadata(&path).expect("new segment exists");
        assert_ne!(
            md.ino(),
            stale_ino,
            "a fresh segment replaced the stale one"
        );
        assert_eq!(md.len(), 4096);
        let mut head = [1u8; 16];
        seg.copy_out(0, &mut head).expect("in bounds");
        assert_eq!(head, [0u8; 16], "no stale data");
        drop(seg);
        assert!(!path.exists());
    }

    #[test]
    fn foreign_objects_under_the_name_are_refused() {
        let name = unique_name("fifo");
        let path = shm_path(&name);
        rustix::fs::mkfifoat(rustix::fs::CWD, &path, Mode::RUSR | Mode::WUSR).expect("mkfifo");
        let err = ShmSegment::create(&name, 4096, ShmOptions::default())
            .expect_err("a FIFO is not a segment");
        assert!(matches!(err, ShmError::NotASegment { .. }), "{err:?}");
        assert!(path.exists(), "the foreign object is left alone");
        fs::remove_file(&path).expect("cleanup");
    }

    #[test]
    fn drop_never_unlinks_a_successor() {
        let name = unique_name("successor");
        let first = create(&name, 4096);
        shm::unlink(name.as_str()).expect("unlink behind the first segment's back");
        let second = create(&name, 4096);
        drop(first);
        assert!(shm_path(&name).exists(), "the successor's name survives");
        second.copy_in(0, b"ok").expect("successor still usable");
        second.close().expect("close");
        assert!(!shm_path(&name).exists());
    }

    #[test]
    fn too_large_for_dev_shm_is_a_clear_error() {
        let name = unique_name("huge");
        let err = ShmSegment::create(&name, 1 << 60, ShmOptions::default())
            .expect_err("no machine has 1 EiB of /dev/shm");
        match &err {
            ShmError::InsufficientCapacity {
                name: n,
                requested,
                available,
                dir,
            } => {
                assert_eq!(n, &name);
                assert_eq!(*requested, 1 << 60);
                assert!(available < requested);
                assert_eq!(dir, Path::new(DEFAULT_SHM_DIR));
            }
            other => panic!("unexpected error {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&name) && msg.contains(&(1u64 << 60).to_string()),
            "{msg}"
        );
        assert!(!shm_path(&name).exists(), "nothing is left behind");
    }

    #[test]
    fn missing_shm_dir_is_reported() {
        let name = unique_name("nodir");
        let options = ShmOptions {
            shm_dir: PathBuf::from("/nonexistent/kvtier/shm"),
            ..ShmOptions::default()
        };
        let err = ShmSegment::create(&name, 4096, options).expect_err("statvfs fails");
        assert!(matches!(err, ShmError::Statvfs { .. }), "{err:?}");
        assert!(!shm_path(&name).exists());
    }

    #[test]
    fn invalid_names_and_sizes_are_rejected() {
        let long = "x".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "",
            "/",
            "a/b",
            "//a",
            "a\0b",
            ".",
            "..",
            "/..",
            long.as_str(),
        ] {
            let err =
                ShmSegment::create(bad, 4096, ShmOptions::default()).expect_err("invalid name");
            assert!(
                matches!(err, ShmError::InvalidName { .. }),
                "{bad:?}: {err:?}"
            );
        }
        assert_eq!(
            validate_name(&"x".repeat(MAX_NAME_LEN)).map(str::len).ok(),
            Some(MAX_NAME_LEN)
        );
        assert_eq!(validate_name("/abc").ok(), Some("abc"));

        let name = unique_name("zero");
        let err = ShmSegment::create(&name, 0, ShmOptions::default()).expect_err("zero size");
        assert!(matches!(err, ShmError::InvalidSize { .. }), "{err:?}");
        assert!(!shm_path(&name).exists());
    }

    #[test]
    fn out_of_bounds_access_is_an_error_not_a_panic() {
        let name = unique_name("oob");
        let seg = create(&name, 4096);
        assert!(matches!(
            seg.copy_in(4090, &[0; 10]),
            Err(ShmError::OutOfBounds { .. })
        ));
        assert!(matches!(
            seg.copy_in(usize::MAX, &[1]),
            Err(ShmError::OutOfBounds { .. })
        ));
        assert!(matches!(
            seg.copy_out(4096, &mut [0; 1]),
            Err(ShmError::OutOfBounds { .. })
        ));
        assert!(seg.ptr_at(1, 4096).is_err());
        assert!(seg.prefault_range(4000, 100).is_err());
        // SAFETY: nothing writes the segment during this test.
        assert!(unsafe { seg.slice(4095, 2) }.is_err());
        seg.copy_in(4096, &[])
            .expect("an empty range at the end is fine");
        seg.copy_in(4094, &[1, 2]).expect("the last two bytes");
        // SAFETY: nothing writes the segment while the slice lives.
        let tail = unsafe { seg.slice(4094, 2) }.expect("in bounds");
        assert_eq!(tail, &[1, 2]);
    }

    #[test]
    fn concurrent_disjoint_copies_from_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ShmSegment>();

        let name = unique_name("threads");
        let seg = create(&name, 4 * 4096);
        std::thread::scope(|s| {
            for i in 0..4u8 {
                let seg = &seg;
                s.spawn(move || {
                    seg.copy_in(usize::from(i) * 4096, &[i; 4096])
                        .expect("in bounds");
                });
            }
        });
        for i in 0..4u8 {
            let mut page = vec![0u8; 4096];
            seg.copy_out(usize::from(i) * 4096, &mut page)
                .expect("in bounds");
            assert!(page.iter().all(|&b| b == i));
        }
    }

    #[test]
    fn lmcache_pool_names() {
        assert_eq!(lmcache_pool_name("lmc_ref"), "lmcache_l1_pool_lmc_ref");
        assert_eq!(lmcache_pool_name("lmcache_l1_pool_x"), "lmcache_l1_pool_x");
    }
}
