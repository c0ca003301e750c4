//! Mappings of engine-owned POSIX shared-memory segments (`cpu_shm` KV descriptors).
//!
//! The engine creates the segment and puts its KV tensor in it; the server opens it by name
//! read-write and maps it `MAP_SHARED`, so both processes see the same pages. The engine owns
//! the name (the server never unlinks it) and may write the pages at any time, so this module
//! never forms Rust references over the mapping: the copy kernels use raw pointers only.
//!
//! Opening is defensive because the name comes from a client: it must be a name LMCache's
//! client creates (see [`check_lmcache_name`]: `/lmcache_kv_<pid>_<n>`), so a peer cannot make
//! the server map and write any other `/dev/shm` file; it is a single path component under
//! `/dev/shm` (one leading `/` allowed), is opened `O_NOFOLLOW | O_NONBLOCK`
//! (no symlinks, no FIFOs), must be a regular file at least as large as the descriptor's
//! `nbytes`, and must not be the server's own L1 segment. The mapping covers exactly `nbytes`.
//!
//! The engine can shrink the file after registration; touching the lost pages would raise
//! `SIGBUS` in the server. Every mapping is therefore registered with the process's `SIGBUS`
//! guard ([`super::fault`]) for its whole life: a fault inside it is cured with zero pages and
//! reported through [`EngineSegment::faulted`], so the request fails and the server lives on.
//! The guard is released before the range is unmapped. Unlinking or replacing the file needs
//! nothing: the mapping keeps the old inode (see [`super::fault`]).

use std::fmt;
use std::ptr::NonNull;

use rustix::fd::OwnedFd;
use rustix::fs::{FileType, Mode, Stat};
use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};
use rustix::shm;

use super::fault::{Guard, GuardError};

/// Why an engine segment could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The name is not a valid shared-memory name.
    #[error("shared-memory name {name:?} is invalid: {why}")]
    InvalidName {
        /// The name as sent (truncated).
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// An OS call failed.
    #[error("{op} of shared-memory segment {name:?} failed: {source}")]
    Sys {
        /// Which call.
        op: &'static str,
        /// The segment.
        name: String,
        /// The OS error.
        #[source]
        source: Errno,
    },
    /// The name refers to something other than a regular file.
    #[error("shared-memory segment {name:?} is not a regular file")]
    NotAFile {
        /// The segment.
        name: String,
    },
    /// The segment is smaller than the descriptor says.
    #[error("shared-memory segment {name:?} has {actual} bytes but the descriptor claims {nbytes}")]
    TooSmall {
        /// The segment.
        name: String,
        /// Bytes claimed by the descriptor.
        nbytes: u64,
        /// Bytes the segment has.
        actual: u64,
    },
    /// `nbytes` is zero or too large for this address space.
    #[error("shared-memory segment {name:?}: nbytes {nbytes} cannot be mapped")]
    BadSize {
        /// The segment.
        name: String,
        /// Bytes claimed by the descriptor.
        nbytes: u64,
    },
    /// The name is not one LMCache's client gives a `cpu_shm` segment.
    #[error(
        "shared-memory name {name:?} is refused: LMCache clients name their cpu_shm segments \
         /lmcache_kv_<pid>_<n>, and kvtier maps no other segment"
    )]
    NotLmcacheName {
        /// The name as sent (truncated).
        name: String,
    },
    /// The name is the server's own L1 pool.
    #[error("shared-memory segment {name:?} is the server's own L1 pool")]
    IsL1Pool {
        /// The segment.
        name: String,
    },
    /// The mapping cannot be protected against the segment shrinking under it.
    #[error("shared-memory segment {name:?} cannot be guarded against truncation: {source}")]
    Guard {
        /// The segment.
        name: String,
        /// Why.
        #[source]
        source: GuardError,
    },
}

/// Identity of a file (device and inode), used to spot two names for the same segment.
pub type FileId = (u64, u64);

fn file_id(st: &Stat) -> FileId {
    (st.st_dev, st.st_ino)
}

/// Strips one leading `/` and checks the rest is a single, non-special path component (the
/// workspace's one name check, `kvtier_core::shm::validate_name`).
fn bare_name(name: &str) -> Result<&str, MapError> {
    kvtier_core::shm::validate_name(name).map_err(|e| match e {
        kvtier_core::shm::ShmError::InvalidName { name, reason } => {
            MapError::InvalidName { name, why: reason }
        }
        _ => MapError::InvalidName {
            name: name.chars().take(256).collect(),
            why: "invalid shared-memory name",
        },
    })
}

/// The prefix of every `cpu_shm` segment name LMCache 0.5.6 creates, without the leading `/`.
pub const LMCACHE_SHM_PREFIX: &str = "lmcache_kv_";

/// Accepts only the names LMCache 0.5.6's client gives the segments it registers:
/// `CpuShmTensorWrapper.SHM_NAME_PREFIX` (`/lmcache_kv_`) followed by `<pid>_<n>`, a process id
/// and a per-process counter in decimal (`migrate_to_shm_and_wrap` in
/// `lmcache/v1/platform/devices/cpu/shm.py`). `name` is already stripped of its leading `/`.
///
/// # Errors
/// [`MapError::NotLmcacheName`] naming the input.
pub fn check_lmcache_name(name: &str) -> Result<(), MapError> {
    let digits = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
    };
    let ok = name
        .strip_prefix(LMCACHE_SHM_PREFIX)
        .and_then(|rest| rest.split_once('_'))
        .is_some_and(|(pid, n)| digits(pid, 10) && digits(n, 20));
    if ok {
        Ok(())
    } else {
        Err(MapError::NotLmcacheName {
            name: name.chars().take(256).collect(),
        })
    }
}

/// The file identity of the shared-memory segment `name`, if it exists.
pub fn segment_id(name: &str) -> Option<FileId> {
    let bare = bare_name(name).ok()?;
    let flags = shm::OFlags::RDONLY | nonblock_nofollow();
    let fd = shm::open(bare, flags, Mode::empty()).ok()?;
    rustix::fs::fstat(&fd).ok().map(|st| file_id(&st))
}

fn nonblock_nofollow() -> shm::OFlags {
    shm::OFlags::from_bits_retain(
        (rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOFOLLOW).bits(),
    )
}

/// One engine segment mapped read-write, `MAP_SHARED`, guarded against `SIGBUS`; unguarded
/// and unmapped on drop.
pub struct EngineSegment {
    name: String,
    ptr: NonNull<u8>,
    len: usize,
    id: FileId,
    guard: Guard,
}

// SAFETY: the value owns its mapping, which stays valid until `drop` (needs ownership). Shared
// methods only read immutable fields; the memory itself is accessed through raw pointers by
// the copy kernels, whose callers coordinate concurrent access (see the module docs).
unsafe impl Send for EngineSegment {}
// SAFETY: see `Send`.
unsafe impl Sync for EngineSegment {}

impl fmt::Debug for EngineSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineSegment")
            .field("name", &self.name)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl EngineSegment {
    /// Opens and maps the first `nbytes` bytes of the engine segment `name`. `forbidden` is the
    /// identity of the server's own L1 segment, which may never be registered as engine memory.
    ///
    /// # Errors
    /// [`MapError`] describing the first check that failed.
    pub fn open(name: &str, nbytes: u64, forbidden: Option<FileId>) -> Result<Self, MapError> {
        let bare = bare_name(name)?;
        check_lmcache_name(bare)?;
        let sys = |op, source| MapError::Sys {
            op,
            name: bare.to_owned(),
            source,
        };
        let len = usize::try_from(nbytes)
            .ok()
            .filter(|&n| n > 0 && n <= isize::MAX as usize)
            .ok_or_else(|| MapError::BadSize {
                name: bare.to_owned(),
                nbytes,
            })?;
        let fd: OwnedFd = shm::open(bare, shm::OFlags::RDWR | nonblock_nofollow(), Mode::empty())
            .map_err(|e| sys("shm_open", e))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| sys("fstat", e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(MapError::NotAFile {
                name: bare.to_owned(),
            });
        }
        let id = file_id(&st);
        if forbidden == Some(id) {
            return Err(MapError::IsL1Pool {
                name: bare.to_owned(),
            });
        }
        let actual = u64::try_from(st.st_size).unwrap_or(0);
        if actual < nbytes {
            return Err(MapError::TooSmall {
                name: bare.to_owned(),
                nbytes,
                actual,
            });
        }
        // SAFETY: a fresh mapping chosen by the kernel (null hint) of `len` bytes of a regular
        // file at least that large; no Rust reference to it exists or will be formed.
        let raw = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .map_err(|e| sys("mmap", e))?;
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or_else(|| sys("mmap", Errno::FAULT))?;
        let guard = match Guard::new(ptr.as_ptr(), len) {
            Ok(g) => g,
            Err(source) => {
                // SAFETY: the mapping made above, not used by anyone yet.
                let _unmapped = unsafe { rustix::mm::munmap(raw, len) };
                return Err(MapError::Guard {
                    name: bare.to_owned(),
                    source,
                });
            }
        };
        // The fd can go: the mapping keeps the pages alive.
        Ok(Self {
            name: bare.to_owned(),
            ptr,
            len,
            id,
            guard,
        })
    }

    /// The segment name without its leading `/`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Mapped bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: a mapping has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Device and inode of the segment.
    pub fn id(&self) -> FileId {
        self.id
    }

    /// Start of the mapping. Raw memory shared with the engine: never form references over it.
    pub fn base_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Whether the engine shrank the segment under an access: its pages were replaced with
    /// private zero pages and no longer reach the engine. Sticky for the life of the mapping.
    pub fn faulted(&self) -> bool {
        self.guard.faulted()
    }
}

impl Drop for EngineSegment {
    fn drop(&mut self) {
        // Unguard first: the handler must never act on a range that is no longer ours.
        self.guard.release();
        // SAFETY: `ptr`/`len` are exactly our mapping, mapped once in `open` and unmapped only
        // here; holders of raw pointers into it keep the owning `Arc` alive while they copy.
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            tracing::warn!(segment = %self.name, error = %e, "munmap of an engine segment failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    static SEQ: AtomicU32 = AtomicU32::new(0);

    /// A name of LMCache's form, unique to this process (LMCache's own counter starts at 0 in
    /// the engine's process, whose pid is not ours).
    fn unique() -> String {
        format!(
            "lmcache_kv_{}_{}",
            std::process::id(),
            900_000 + SEQ.fetch_add(1, Ordering::Relaxed)
        )
    }

    struct Owned(String);
    impl Drop for Owned {
        fn drop(&mut self) {
            let _gone = shm::unlink(self.0.as_str());
        }
    }

    fn create(name: &str, len: u64) -> Owned {
        let fd = shm::open(
            name,
            shm::OFlags::CREATE | shm::OFlags::EXCL | shm::OFlags::RDWR,
            Mode::RUSR | Mode::WUSR,
        )
        .expect("create");
        rustix::fs::ftruncate(&fd, len).expect("ftruncate");
        Owned(name.to_owned())
    }

    fn maps_contain(name: &str) -> bool {
        std::fs::read_to_string("/proc/self/maps")
            .expect("maps")
            .lines()
            .any(|l| l.ends_with(&format!("/dev/shm/{name}")))
    }

    #[test]
    fn maps_shared_pages_and_unmaps_on_drop() {
        let name = unique();
        let _owned = create(&name, 8192);
        let a = EngineSegment::open(&format!("/{name}"), 8192, None).expect("map a");
        let b = EngineSegment::open(&name, 4096, None).expect("map b");
        assert_eq!(a.id(), b.id());
        assert_eq!(segment_id(&name), Some(a.id()));
        // SAFETY: test-local mappings of the same fresh segment; nothing else writes it.
        unsafe {
            a.base_ptr().as_ptr().add(100).write(42);
            assert_eq!(b.base_ptr().as_ptr().add(100).read(), 42);
        }
        assert!(maps_contain(&name));
        drop(a);
        drop(b);
        assert!(!maps_contain(&name));
    }

    #[test]
    fn refuses_bad_names_sizes_and_the_l1_pool() {
        let name = unique();
        let _owned = create(&name, 4096);
        assert!(matches!(
            EngineSegment::open(&name, 4097, None),
            Err(MapError::TooSmall { actual: 4096, .. })
        ));
        assert!(matches!(
            EngineSegment::open(&name, 0, None),
            Err(MapError::BadSize { .. })
        ));
        let id = segment_id(&name);
        assert!(matches!(
            EngineSegment::open(&name, 4096, id),
            Err(MapError::IsL1Pool { .. })
        ));
        for bad in ["", "/", "a/b", "//x", "..", "/."] {
            assert!(
                matches!(
                    EngineSegment::open(bad, 1, None),
                    Err(MapError::InvalidName { .. })
                ),
                "{bad:?}"
            );
        }
        // Real files that are not LMCache segments are never opened.
        let other = format!("kvtier_ut_map_{}", std::process::id());
        let _other = create(&other, 4096);
        for bad in [
            other.as_str(),
            "lmcache_kv_",
            "lmcache_kv_12",
            "lmcache_kv_12_",
            "lmcache_kv__3",
            "lmcache_kv_1x_3",
            "lmcache_kv_1_2_3",
            "lmcache_l1_pool_x",
            "kvtier_l1_5555",
        ] {
            let e = EngineSegment::open(bad, 4096, None).expect_err(bad);
            assert!(matches!(e, MapError::NotLmcacheName { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(check_lmcache_name("lmcache_kv_4242_0").is_ok());
        assert!(matches!(
            EngineSegment::open(&unique(), 1, None),
            Err(MapError::Sys {
                op: "shm_open",
                source: Errno::NOENT,
                ..
            })
        ));
    }
}
