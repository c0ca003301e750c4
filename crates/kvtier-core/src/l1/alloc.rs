//! Offset allocator for the L1 pool.
//!
//! The pool is one contiguous byte range (the shared-memory segment); this module hands out
//! sub-ranges of it and never touches the memory itself (engines write into it directly, so no
//! allocator metadata may live inside the pool).
//!
//! Policy: **best fit with address-order tie break, eager coalescing**. Free blocks are indexed
//! twice: by offset (to find neighbours on free) and by `(size, offset)` (to find the smallest
//! block that fits). Both operations are `O(log f)` where `f` is the number of free fragments;
//! nothing scans the free list. Best fit keeps large holes intact for large objects when models
//! with different chunk sizes share the pool, and the address tie break reuses low, already
//! faulted-in pages first, which keeps engine-side page faults down.
//!
//! Invariants (checked by [`RangeAllocator::check`]):
//! - every block is aligned to `align` and its size is a multiple of `align`;
//! - free blocks never overlap and are never adjacent (adjacent blocks are merged on free);
//! - `free_bytes` equals the sum of free block sizes; the two indexes hold the same blocks.

use std::collections::{BTreeMap, BTreeSet};

/// A best-fit offset allocator over `[0, capacity)`.
#[derive(Debug)]
pub struct RangeAllocator {
    capacity: u64,
    align: u64,
    by_offset: BTreeMap<u64, u64>,
    by_size: BTreeSet<(u64, u64)>,
    free_bytes: u64,
}

impl RangeAllocator {
    /// Creates an allocator over `[0, capacity)` rounded down to `align`. `align` must be a power
    /// of two; it is clamped to at least 1.
    pub fn new(capacity: u64, align: u64) -> Self {
        let align = align.max(1).next_power_of_two();
        let capacity = capacity - capacity % align;
        let mut by_offset = BTreeMap::new();
        let mut by_size = BTreeSet::new();
        if capacity > 0 {
            by_offset.insert(0, capacity);
            by_size.insert((capacity, 0));
        }
        Self {
            capacity,
            align,
            by_offset,
            by_size,
            free_bytes: capacity,
        }
    }

    /// Usable capacity in bytes (a multiple of the alignment).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Alignment of every block.
    pub fn align(&self) -> u64 {
        self.align
    }

    /// Bytes currently free.
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    /// Size of the largest free block (the largest object that can be allocated right now).
    pub fn largest_free_block(&self) -> u64 {
        self.by_size.last().map_or(0, |&(size, _)| size)
    }

    /// Number of free fragments.
    pub fn free_fragments(&self) -> usize {
        self.by_offset.len()
    }

    /// Rounds `size` up to the alignment; `None` on overflow or for a zero size.
    pub fn reserved_size(&self, size: u64) -> Option<u64> {
        if size == 0 {
            return None;
        }
        size.checked_add(self.align - 1)
            .map(|s| s & !(self.align - 1))
    }

    /// Allocates `size` bytes (rounded up to the alignment). Returns the offset, or `None` if no
    /// free block is large enough.
    pub fn alloc(&mut self, size: u64) -> Option<u64> {
        let size = self.reserved_size(size)?;
        let &(block_size, offset) = self.by_size.range((size, 0)..).next()?;
        self.by_size.remove(&(block_size, offset));
        self.by_offset.remove(&offset);
        if block_size > size {
            let rest_off = offset + size;
            let rest = block_size - size;
            self.by_offset.insert(rest_off, rest);
            self.by_size.insert((rest, rest_off));
        }
        self.free_bytes -= size;
        Some(offset)
    }

    /// Allocates every size in `sizes` or none of them.
    pub fn alloc_batch(&mut self, sizes: &[u64]) -> Option<Vec<u64>> {
        let mut out = Vec::with_capacity(sizes.len());
        for &size in sizes {
            match self.alloc(size) {
                Some(off) => out.push(off),
                None => {
                    for (&off, &sz) in out.iter().zip(sizes) {
                        self.free(off, sz);
                    }
                    return None;
                }
            }
        }
        Some(out)
    }

    /// Returns a block obtained from [`alloc`](Self::alloc) with the same `size`.
    pub fn free(&mut self, offset: u64, size: u64) {
        let Some(size) = self.reserved_size(size) else {
            return;
        };
        debug_assert!(offset.is_multiple_of(self.align) && offset + size <= self.capacity);
        self.free_bytes += size;
        let mut start = offset;
        let mut len = size;
        // Merge with the free block that ends where this one starts.
        if let Some((&prev_off, &prev_len)) = self.by_offset.range(..offset).next_back() {
            debug_assert!(prev_off + prev_len <= offset, "double free at {offset}");
            if prev_off + prev_len == offset {
                self.by_offset.remove(&prev_off);
                self.by_size.remove(&(prev_len, prev_off));
                start = prev_off;
                len += prev_len;
            }
        }
        // Merge with the free block that starts where this one ends.
        let end = offset + size;
        if let Some(&next_len) = self.by_offset.get(&end) {
            self.by_offset.remove(&end);
            self.by_size.remove(&(next_len, end));
            len += next_len;
        }
        self.by_offset.insert(start, len);
        self.by_size.insert((len, start));
    }

    /// Verifies the invariants listed in the module docs. `O(f)`; for tests and debugging.
    pub fn check(&self) -> Result<(), String> {
        if self.by_offset.len() != self.by_size.len() {
            return Err("free indexes disagree in length".into());
        }
        let mut sum = 0u64;
        let mut prev_end: Option<u64> = None;
        for (&off, &len) in &self.by_offset {
            if off % self.align != 0 || len % self.align != 0 || len == 0 {
                return Err(format!("misaligned free block {off}+{len}"));
            }
            if !self.by_size.contains(&(len, off)) {
                return Err(format!("free block {off}+{len} missing from size index"));
            }
            if let Some(pe) = prev_end
                && pe >= off
            {
                return Err(format!(
                    "free block {off} overlaps or touches its predecessor"
                ));
            }
            if off + len > self.capacity {
                return Err(format!("free block {off}+{len} beyond capacity"));
            }
            prev_end = Some(off + len);
            sum += len;
        }
        if sum != self.free_bytes {
            return Err(format!(
                "free_bytes {} != sum of blocks {sum}",
                self.free_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_coalesces_back_to_one_block() {
        let mut a = RangeAllocator::new(1 << 20, 4096);
        let x = a.alloc(5000).expect("fits");
        let y = a.alloc(4096).expect("fits");
        let z = a.alloc(100).expect("fits");
        assert_eq!((x, y, z), (0, 8192, 12288));
        a.free(y, 4096);
        a.free(x, 5000);
        a.free(z, 100);
        a.check().expect("invariants");
        assert_eq!(a.free_fragments(), 1);
        assert_eq!(a.free_bytes(), 1 << 20);
    }

    #[test]
    fn best_fit_prefers_smallest_hole() {
        let mut a = RangeAllocator::new(64 * 4096, 4096);
        let blocks: Vec<u64> = (0..8).map(|_| a.alloc(4 * 4096).expect("fits")).collect();
        // Holes of 4 pages at block 1 and 8 pages at blocks 3..5.
        a.free(blocks[1], 4 * 4096);
        a.free(blocks[3], 4 * 4096);
        a.free(blocks[4], 4 * 4096);
        let small = a.alloc(2 * 4096).expect("fits");
        assert_eq!(small, blocks[1], "small object goes to the small hole");
        let big = a.alloc(8 * 4096).expect("fits");
        assert_eq!(
            big, blocks[3],
            "the 8-page hole stays intact for the big object"
        );
        a.check().expect("invariants");
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let mut a = RangeAllocator::new(10 * 4096, 4096);
        assert!(a.alloc_batch(&[4096; 11]).is_none());
        assert_eq!(a.free_bytes(), 10 * 4096);
        let got = a.alloc_batch(&[4096; 10]).expect("fits exactly");
        assert_eq!(got.len(), 10);
        assert_eq!(a.free_bytes(), 0);
        assert!(a.alloc(1).is_none());
        a.check().expect("invariants");
    }

    #[test]
    fn zero_and_huge_sizes_fail_cleanly() {
        let mut a = RangeAllocator::new(1 << 20, 4096);
        assert!(a.alloc(0).is_none());
        assert!(a.alloc(u64::MAX).is_none());
        assert!(a.alloc((1 << 20) + 1).is_none());
        assert_eq!(a.free_bytes(), 1 << 20);
    }
}
