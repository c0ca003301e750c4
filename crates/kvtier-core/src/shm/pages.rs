//! Page population of the L1 segment: reserving and zeroing pages ahead of the clients
//! ([`ShmSegment::prefault_range`], the opt-in prefault), faulting in once per 64 KiB granule
//! the pages this process is about to copy into ([`ShmSegment::populate_once`]), and the one
//! `MADV_POPULATE_WRITE` call of the workspace ([`populate_write`]).
//!
//! Invariants: nothing here changes the segment's contents or touches a page directly (a touch
//! on a full tmpfs is a `SIGBUS`, not an error); every call is best effort or returns
//! [`ShmError`], never panics; the granule bitmap only grows (a granule may be populated twice
//! in a race, which is harmless).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use rustix::fs::FallocateFlags;
use rustix::io::Errno;
use rustix::mm::Advice;

use super::{ShmError, ShmSegment};

/// Granule of [`ShmSegment::populate_once`]: 64 KiB.
pub const POPULATE_GRANULE: usize = 64 << 10;

/// Asks the kernel to fault in, for writing, the pages of `len` bytes at `ptr` (one
/// `madvise(MADV_POPULATE_WRITE)`, Linux 5.14+), so that a following copy takes no page faults.
/// Faulting pages in bulk in the kernel is several times cheaper than one fault per 4 KiB page
/// during the copy, which matters most in virtual machines. Changes no data. This is the one
/// populate call of the workspace (L1 prefault fallback, L1 first-touch, engine segments).
///
/// # Errors
/// The `madvise` error (`EINVAL` on kernels older than 5.14); callers treat it as best effort.
///
/// # Safety
/// `ptr..ptr + len` lies within one live mapping (shared or private).
pub unsafe fn populate_write(ptr: NonNull<u8>, len: usize) -> Result<(), Errno> {
    if len == 0 {
        return Ok(());
    }
    let page = rustix::param::page_size();
    let addr = ptr.as_ptr() as usize;
    let start = addr - addr % page;
    // SAFETY: the page holding `ptr` belongs to the same mapping as `ptr` (mappings are whole
    // pages), so `start..addr + len` is mapped; MADV_POPULATE_WRITE only faults pages in.
    unsafe {
        rustix::mm::madvise(
            start as *mut std::ffi::c_void,
            addr + len - start,
            Advice::LinuxPopulateWrite,
        )
    }
}

impl ShmSegment {
    /// Allocates and zeroes the pages of `offset..offset + len` now, so that a client's first
    /// write to them is a bare page-table fault: no tmpfs allocation, no zeroing (and no
    /// `SIGBUS` when `/dev/shm` fills up).
    ///
    /// Costs `len` bytes of RAM (tmpfs pages are not reclaimable except to swap), charged
    /// to this process's memory cgroup, plus the time to zero them. Already-allocated pages
    /// are skipped. Safe to call from a background thread in pieces while clients use the
    /// segment: it never changes the contents.
    ///
    /// Three steps. `fallocate` on the segment fd (tmpfs supports it since Linux 3.5) reserves
    /// the pages, failing cleanly when `/dev/shm` is full. It does not zero them: tmpfs zeroes
    /// a fallocated page at its first fault, which then costs the faulting client as much as a
    /// fresh page (perf: `clear_page_erms` was 37 % of a Python client's cold-store profile),
    /// so `madvise(MADV_POPULATE_WRITE)` (Linux 5.14) faults them in through this process's
    /// mapping, zeroing them here. `MADV_DONTNEED` then drops this process's page-table entries
    /// again (a shared mapping keeps the pages and their contents; it only unmaps), so a large
    /// pool costs the server no page tables. It never touches pages directly, because a touch
    /// on a full tmpfs is a `SIGBUS`, not an error; where `fallocate` is unsupported the
    /// populate alone reserves. A kernel without `MADV_POPULATE_WRITE` (`EINVAL`) keeps the
    /// reservation and leaves zeroing to the first fault.
    pub fn prefault_range(&self, offset: usize, len: usize) -> Result<(), ShmError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let prefault_err = |source| ShmError::Prefault {
            name: self.name.clone(),
            offset,
            len,
            source,
        };
        match rustix::fs::fallocate(
            &self.fd,
            FallocateFlags::KEEP_SIZE,
            offset as u64,
            len as u64,
        ) {
            Ok(()) => match self.populate_write(offset, len) {
                Ok(()) | Err(Errno::INVAL) => {}
                Err(e) => return Err(prefault_err(e)),
            },
            Err(Errno::OPNOTSUPP | Errno::NOSYS) => {
                self.populate_write(offset, len).map_err(prefault_err)?;
            }
            Err(e) => return Err(prefault_err(e)),
        }
        self.unmap_own_pages(offset, len);
        Ok(())
    }

    /// Drops this process's page-table entries for the whole pages inside
    /// `offset..offset + len` (`MADV_DONTNEED`). On this shared mapping that only unmaps: the
    /// tmpfs pages and their contents stay, and a later access here faults them back in
    /// without zeroing. Best effort: an error only leaves the entries in place.
    fn unmap_own_pages(&self, offset: usize, len: usize) {
        let page = rustix::param::page_size();
        let start = offset.next_multiple_of(page);
        let end = (offset + len) / page * page;
        if end <= start {
            return;
        }
        let Ok(p) = self.ptr_at(start, end - start) else {
            return;
        };
        // SAFETY: `start..end` lies in our live shared mapping (checked) and is page aligned.
        // MADV_DONTNEED on a MAP_SHARED file mapping discards no data: the next access through
        // any pointer or slice into the range faults the same tmpfs page back in, so a reader
        // here sees the same bytes before and after.
        let r =
            unsafe { rustix::mm::madvise(p.as_ptr().cast(), end - start, Advice::LinuxDontNeed) };
        if let Err(e) = r {
            tracing::debug!(segment = %self.name, error = %e, "MADV_DONTNEED after prefault failed");
        }
    }

    /// `madvise(MADV_POPULATE_WRITE)` over the pages covering `offset..offset + len`
    /// (which must be in bounds).
    fn populate_write(&self, offset: usize, len: usize) -> Result<(), Errno> {
        let p = self.ptr_at(offset, len).map_err(|_| Errno::INVAL)?;
        // SAFETY: `ptr_at` checked that the range lies in our live mapping.
        unsafe { populate_write(p, len) }
    }

    /// Faults in, once per 64 KiB granule for the life of the segment, the pages of
    /// `offset..offset + len` that this process has not populated yet. The first store into
    /// fresh L1 memory would otherwise take one write fault per 4 KiB page during the copy;
    /// populating pages already mapped is not free either, hence the granule bitmap. Best
    /// effort: out-of-range requests and `madvise` errors are ignored (the pages then fault in
    /// normally). Races are harmless (a granule may be populated twice).
    pub fn populate_once(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let bits = self.populated.get_or_init(|| {
            (0..self.len.div_ceil(POPULATE_GRANULE).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        });
        let is_set = |g: usize| {
            bits.get(g / 64)
                .is_none_or(|w| w.load(Relaxed) & (1 << (g % 64)) != 0)
        };
        let first = offset / POPULATE_GRANULE;
        let last = (offset + len - 1) / POPULATE_GRANULE;
        let mut g = first;
        while g <= last {
            if is_set(g) {
                g += 1;
                continue;
            }
            let run_start = g;
            while g <= last && !is_set(g) {
                g += 1;
            }
            let start = run_start * POPULATE_GRANULE;
            let end = (g * POPULATE_GRANULE).min(self.len);
            let _best_effort = self.populate_write(start, end.saturating_sub(start));
            for i in run_start..g {
                if let Some(w) = bits.get(i / 64) {
                    w.fetch_or(1 << (i % 64), Relaxed);
                }
            }
        }
    }

    /// Whether [`populate_once`](Self::populate_once) has covered the granule holding `offset`.
    pub fn is_populated(&self, offset: usize) -> bool {
        let g = offset / POPULATE_GRANULE;
        self.populated
            .get()
            .and_then(|b| b.get(g / 64))
            .is_some_and(|w| w.load(Relaxed) & (1 << (g % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{allocated_bytes, create, unique_name};
    use super::*;
    use crate::shm::ShmOptions;

    #[test]
    fn prefault_allocates_pages() {
        let name = unique_name("prefault");
        let options = ShmOptions {
            prefault: true,
            ..ShmOptions::default()
        };
        let seg = ShmSegment::create(&name, 1 << 20, options).expect("create");
        assert!(allocated_bytes(&name) >= 1 << 20);
        drop(seg);

        let name = unique_name("prefault_range");
        let seg = create(&name, 1 << 20);
        seg.prefault_range(64 * 1024, 8192).expect("in bounds");
        let allocated = allocated_bytes(&name);
        assert!((8192..1 << 20).contains(&allocated), "{allocated}");
        seg.prefault_range(0, 0).expect("empty range");
    }

    /// Whether this process has a page-table entry for the page holding `p`
    /// (`/proc/self/pagemap`, bit 63: present).
    fn page_present(p: NonNull<u8>) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        let page = rustix::param::page_size() as u64;
        let mut f = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
        f.seek(SeekFrom::Start(p.as_ptr() as u64 / page * 8))
            .expect("seek");
        let mut entry = [0u8; 8];
        f.read_exact(&mut entry).expect("read pagemap");
        u64::from_le_bytes(entry) >> 63 == 1
    }

    #[test]
    fn prefault_keeps_contents_and_leaves_no_page_mapped_here() {
        let name = unique_name("prefault_unmaps");
        let seg = create(&name, 1 << 20);
        seg.copy_in(8192, b"kept").expect("in bounds");
        let at = seg.ptr_at(8192, 4).expect("in bounds");
        assert!(page_present(at), "the copy mapped the page");
        seg.prefault_range(0, 1 << 20).expect("prefault");
        assert!(allocated_bytes(&name) >= 1 << 20);
        assert!(
            !page_present(at) && !page_present(seg.ptr_at(64 * 1024, 1).expect("in bounds")),
            "prefault drops this process's page-table entries (no page tables for the pool)"
        );
        let mut out = [0u8; 4];
        seg.copy_out(8192, &mut out).expect("in bounds");
        assert_eq!(&out, b"kept", "contents survive the prefault");
        // A range with partial pages at both ends: the partial pages stay mapped.
        seg.copy_in(4096, &[1; 8192]).expect("in bounds");
        seg.prefault_range(4096 + 10, 4096).expect("prefault");
        assert!(page_present(seg.ptr_at(4096, 1).expect("in bounds")));
    }

    #[test]
    fn populate_write_fallback_allocates_pages() {
        let name = unique_name("populate");
        let seg = create(&name, 1 << 20);
        seg.populate_write(4096 + 10, 100)
            .expect("MADV_POPULATE_WRITE (Linux 5.14+)");
        assert!(allocated_bytes(&name) >= 4096);
    }
}
