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

use std::ptr::{self, NonNull};

use rustix::fs::{Mode, fstat};
use rustix::mm::{Advice, MapFlags, ProtFlags};
use rustix::shm;

use crate::error::ShmError;

/// A mapped engine-driven pool.
#[derive(Debug)]
pub struct ShmPool {
    name: String,
    ptr: NonNull<u8>,
    len: usize,
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
        Ok(Self {
            name: bare.to_owned(),
            ptr,
            len,
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

impl Drop for ShmPool {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `open`, unmapped once; no reference into it
        // exists (none is ever formed).
        let _unmapped = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
