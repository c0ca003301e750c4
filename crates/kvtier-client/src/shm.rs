//! The engine-driven pool, as an engine maps it: `/dev/shm/<shm_name>`, read-write,
//! `MAP_SHARED`.
//!
//! Invariants:
//! - The server owns the segment: this module opens it (never creates it) and never unlinks
//!   it. The mapping lives until the [`ShmPool`] is dropped.
//! - The memory is shared with the server and other clients, so no Rust reference is ever
//!   formed over it: access is by bounds-checked copies only. Which ranges may be written
//!   when is the protocol's business (slots from `prepare_store`), not this module's; bytes
//!   copied while another party writes them are unspecified, never out of bounds.
//! - **Populate once.** A chunk-sized [`ShmPool::copy_in`] first makes sure every
//!   [`POPULATE_GRANULE`] it touches has been faulted in by this process, in one
//!   `MADV_POPULATE_WRITE` per granule, the first time only (a bit per granule). A cold copy
//!   then pays one system call per 2 MiB instead of a trap per 4 KiB page, and a warm one pays
//!   nothing (populating pages that are already mapped costs about as much as copying into
//!   them, so it is never repeated). Populating changes no bytes; pages of a granule outside
//!   the slot are only allocated early. If the kernel refuses (before 5.14), copies fault as
//!   before.

use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use rustix::fs::{Mode, fstat};
use rustix::mm::{Advice, MapFlags, ProtFlags};
use rustix::shm;

use crate::error::ShmError;

/// Bytes per populate-once granule (see the module docs).
pub const POPULATE_GRANULE: usize = 2 << 20;

/// A mapped engine-driven pool.
#[derive(Debug)]
pub struct ShmPool {
    name: String,
    ptr: NonNull<u8>,
    len: usize,
    /// One bit per [`POPULATE_GRANULE`]: this process has populated it.
    populated: Box<[AtomicU64]>,
    /// Cleared when the kernel refuses `MADV_POPULATE_WRITE`: copies then fault page by page.
    populate_ok: AtomicBool,
}

// SAFETY: the pool is a raw shared mapping accessed only through copies (`ptr::copy`), which
// are as thread-safe as the memory itself; the pointer is never dereferenced as a reference.
unsafe impl Send for ShmPool {}
// SAFETY: as above; `&self` methods only copy bytes in or out.
unsafe impl Sync for ShmPool {}

impl ShmPool {
    /// Maps the first `pool_size` bytes of `/dev/shm/<name>` (a leading `/` is accepted).
    ///
    /// # Errors
    /// [`ShmError::InvalidName`], [`ShmError::BadSize`], [`ShmError::TooSmall`] if the
    /// segment is shorter than `pool_size`, [`ShmError::Sys`] if it cannot be opened or mapped.
    pub fn open(name: &str, pool_size: u64) -> Result<Self, ShmError> {
        let bare = name.strip_prefix('/').unwrap_or(name);
        if bare.is_empty() || bare.len() > 255 || bare.contains('/') || bare.contains('\0') {
            return Err(ShmError::InvalidName(name.to_owned()));
        }
        let len = usize::try_from(pool_size)
            .ok()
            .filter(|&l| l > 0 && isize::try_from(l).is_ok())
            .ok_or(ShmError::BadSize(pool_size))?;
        let sys = |op: &'static str| {
            move |source| ShmError::Sys {
                op,
                name: bare.to_owned(),
                source,
            }
        };
        let fd = shm::open(format!("/{bare}"), shm::OFlags::RDWR, Mode::empty())
            .map_err(sys("shm_open"))?;
        let st = fstat(&fd).map_err(sys("fstat"))?;
        let actual = u64::try_from(st.st_size).unwrap_or(0);
        if actual < pool_size {
            return Err(ShmError::TooSmall {
                name: bare.to_owned(),
                actual,
                announced: pool_size,
            });
        }
        // SAFETY: a fresh kernel-chosen mapping (null hint) of `len` bytes of a file at least
        // that long; no Rust reference to it exists. The fd may close after mapping.
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
        .map_err(sys("mmap"))?;
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or(ShmError::Sys {
            op: "mmap",
            name: bare.to_owned(),
            source: rustix::io::Errno::FAULT,
        })?;
        let granules = len.div_ceil(POPULATE_GRANULE);
        Ok(Self {
            name: bare.to_owned(),
            ptr,
            len,
            populated: (0..granules.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            populate_ok: AtomicBool::new(true),
        })
    }

    /// The segment name (without a leading `/`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Mapped bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Always `false` (a pool has at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn range(&self, offset: u64, len: usize) -> Result<usize, ShmError> {
        let oob = || ShmError::OutOfBounds {
            offset,
            len: len as u64,
            size: self.len as u64,
        };
        let start = usize::try_from(offset).map_err(|_| oob())?;
        match start.checked_add(len) {
            Some(end) if end <= self.len => Ok(start),
            _ => Err(oob()),
        }
    }

    /// Copies `src` into the pool at `offset`; nothing is copied if the range is outside.
    /// Copies of a MiB or more use non-temporal stores (`kvtier_copy::copy_bulk`): a chunk
    /// written into a slot is not read back by this process.
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`].
    pub fn copy_in(&self, offset: u64, src: &[u8]) -> Result<(), ShmError> {
        let start = self.range(offset, src.len())?;
        if src.len() >= kvtier_copy::NON_TEMPORAL_MIN {
            self.populate_once(start, src.len());
        }
        // SAFETY: `start..start + src.len()` is inside the live, writable mapping (checked).
        // `src` is a Rust slice, which never points into the mapping (no reference over it is
        // ever formed), so the ranges do not overlap.
        unsafe {
            kvtier_copy::copy_bulk(src.as_ptr(), self.ptr.as_ptr().add(start), src.len());
        }
        Ok(())
    }

    /// Fills `dst` from the pool at `offset`; nothing is copied if the range is outside.
    /// Copies of a MiB or more use non-temporal stores (`kvtier_copy::copy_bulk`).
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`].
    pub fn copy_out(&self, offset: u64, dst: &mut [u8]) -> Result<(), ShmError> {
        let start = self.range(offset, dst.len())?;
        // SAFETY: in bounds of the live mapping (checked); `dst` is an exclusive Rust slice,
        // which cannot point into the mapping.
        unsafe {
            kvtier_copy::copy_bulk(self.ptr.as_ptr().add(start), dst.as_mut_ptr(), dst.len());
        }
        Ok(())
    }

    /// Faults in this process's page-table entries for `offset..offset + len` for writing
    /// (`MADV_POPULATE_WRITE`), allocating tmpfs pages that do not exist yet. Contents are
    /// unchanged. A client that calls this before copying pays the faults up front, in one
    /// system call, instead of one trap per page during the copy.
    ///
    /// # Errors
    /// [`ShmError::OutOfBounds`]; [`ShmError::Sys`] if the kernel refuses (before 5.14, or
    /// when `/dev/shm` is full).
    pub fn populate_write(&self, offset: u64, len: u64) -> Result<(), ShmError> {
        let n = usize::try_from(len).map_err(|_| ShmError::OutOfBounds {
            offset,
            len,
            size: self.len as u64,
        })?;
        let start = self.range(offset, n)?;
        if n == 0 {
            return Ok(());
        }
        let page = rustix::param::page_size();
        let aligned = start - start % page;
        // SAFETY: `aligned..start + n` lies in the live mapping (checked above; the mapping
        // base is page-aligned). MADV_POPULATE_WRITE only faults pages in; it changes no data.
        unsafe {
            rustix::mm::madvise(
                self.ptr.as_ptr().add(aligned).cast(),
                start + n - aligned,
                Advice::LinuxPopulateWrite,
            )
        }
        .map_err(|source| ShmError::Sys {
            op: "madvise(MADV_POPULATE_WRITE)",
            name: self.name.clone(),
            source,
        })
    }
}

impl ShmPool {
    /// Populates each granule of `start..start + len` (in bounds) that this process has not
    /// populated yet (see the module docs). Never fails: a refusal only stops further tries.
    fn populate_once(&self, start: usize, len: usize) {
        if len == 0 || !self.populate_ok.load(Relaxed) {
            return;
        }
        for g in start / POPULATE_GRANULE..=(start + len - 1) / POPULATE_GRANULE {
            let (Some(word), bit) = (self.populated.get(g / 64), 1u64 << (g % 64)) else {
                return;
            };
            if word.load(Relaxed) & bit != 0 {
                continue;
            }
            let from = g * POPULATE_GRANULE;
            let n = POPULATE_GRANULE.min(self.len - from);
            if self.populate_write(from as u64, n as u64).is_err() {
                self.populate_ok.store(false, Relaxed);
                return;
            }
            word.fetch_or(bit, Relaxed);
        }
    }

    /// Granules this process has populated (tests).
    #[cfg(test)]
    fn populated_granules(&self) -> Vec<usize> {
        (0..self.len.div_ceil(POPULATE_GRANULE))
            .filter(|&g| self.populated[g / 64].load(Relaxed) & (1 << (g % 64)) != 0)
            .collect()
    }
}

impl Drop for ShmPool {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `open`, unmapped once; no reference into it
        // exists (none is ever formed).
        let _unmapped = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `/dev/shm` segment of `len` bytes, removed on drop.
    struct Segment(String);

    impl Segment {
        fn new(len: u64) -> Self {
            let name = format!("kvtier_client_shm_test_{}_{len}", std::process::id());
            let fd = shm::open(
                format!("/{name}"),
                shm::OFlags::RDWR | shm::OFlags::CREATE | shm::OFlags::EXCL,
                Mode::from_raw_mode(0o600),
            )
            .expect("create test segment");
            rustix::fs::ftruncate(&fd, len).expect("size test segment");
            Self(name)
        }
    }

    impl Drop for Segment {
        fn drop(&mut self) {
            let _removed = shm::unlink(format!("/{}", self.0));
        }
    }

    #[test]
    fn chunk_copies_populate_each_granule_once_and_keep_every_byte() {
        let g = POPULATE_GRANULE;
        let seg = Segment::new((5 * g + 4096) as u64);
        let pool = ShmPool::open(&seg.0, (5 * g + 4096) as u64).expect("open");
        // Small copies populate nothing.
        pool.copy_in(10, b"tag").expect("in bounds");
        assert!(pool.populated_granules().is_empty());
        // A 3 MiB chunk starting inside granule 1 touches granules 1 and 2.
        let chunk: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        pool.copy_in((g + 4096) as u64, &chunk).expect("in bounds");
        assert_eq!(pool.populated_granules(), vec![1, 2]);
        // The last, partial granule (4 KiB past 5 × 2 MiB) is populated within the pool.
        let tail_chunk = vec![7u8; 1 << 20];
        pool.copy_in((5 * g + 4096 - (1 << 20)) as u64, &tail_chunk)
            .expect("in bounds");
        assert_eq!(pool.populated_granules(), vec![1, 2, 4, 5]);
        // Every byte is where it was written, and the small copy before is intact.
        let mut back = vec![0u8; chunk.len()];
        pool.copy_out((g + 4096) as u64, &mut back)
            .expect("in bounds");
        assert!(back == chunk);
        let mut tag = [0u8; 3];
        pool.copy_out(10, &mut tag).expect("in bounds");
        assert_eq!(&tag, b"tag");
        let mut tail = vec![0u8; 1 << 20];
        pool.copy_out((5 * g + 4096 - (1 << 20)) as u64, &mut tail)
            .expect("in bounds");
        assert!(tail == tail_chunk);
    }
}
