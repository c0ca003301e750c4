//! Bulk copies of KV-cache chunks between a process's own memory and shared memory.
//!
//! A chunk is megabytes (3 MiB for a small model's 256-token chunk, 32 MiB for an 8B model's)
//! and whoever wrote it will not read it back soon: the engine copies a chunk into an L1 slot
//! and then only sends `commit`; the server reads it, if ever, when it writes it behind to L2.
//! Such copies are best done with *non-temporal* stores, which write whole lines to memory
//! without first reading each destination line into the cache (a cached store must own the line
//! before it writes it) and without evicting the working set of everything else that runs on
//! the core — the ZeroMQ, kernel and engine state that the very next round trip needs.
//!
//! **Why hand-written rather than `ptr::copy_nonoverlapping` (glibc's `memcpy`).** glibc
//! switches to non-temporal stores only above `__x86_shared_non_temporal_threshold`, which it
//! derives from the last-level cache size per thread (three quarters of it). Virtual machines
//! often report a huge shared L3 (this project's test VMs report 480 MiB for two vCPUs), which
//! puts the threshold above any chunk, so every chunk copy uses cached stores. No maintained
//! crate offers a plain non-temporal copy; the loop below is the textbook one (unaligned 16-byte
//! loads, aligned 16-byte streaming stores, `sfence`), in SSE2, which every x86-64 CPU has, so
//! there is no run-time feature detection. Wider (AVX2) stores were measured no faster: the copy
//! is bound by memory bandwidth.
//!
//! `cargo bench -p kvtier-copy` compares it with `ptr::copy_nonoverlapping` at chunk sizes; the
//! figures are in docs/performance.md.
//!
//! Other architectures use `ptr::copy_nonoverlapping` for every size.

use std::ptr;

/// Copies of at least this many bytes use non-temporal stores (x86-64). Smaller ones may well
/// be read again soon from the cache (a few pages of a partial chunk, a key, a header), and
/// below a few hundred KiB the fence and alignment steps cost more than the reads they save.
pub const NON_TEMPORAL_MIN: usize = 1 << 20;

/// Copies `len` bytes from `src` to `dst`: like `ptr::copy_nonoverlapping`, with
/// non-temporal stores when `len ≥` [`NON_TEMPORAL_MIN`] on x86-64. When it returns, the bytes
/// are visible to other cores and processes as if written by ordinary stores (a store fence
/// orders the streaming stores before anything this thread does next, such as sending the
/// message that tells a peer to read them).
///
/// # Safety
/// As for `ptr::copy_nonoverlapping`: `src` is valid for reads and `dst` for writes of `len`
/// bytes, and the two ranges do not overlap. No alignment is required.
#[inline]
pub unsafe fn copy_bulk(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if len >= NON_TEMPORAL_MIN {
        // SAFETY: the caller's contract, passed on.
        unsafe { streaming::copy(src, dst, len) };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { ptr::copy_nonoverlapping(src, dst, len) };
}

/// Copies `len` bytes with streaming stores whatever the size (x86-64; other architectures:
/// `ptr::copy_nonoverlapping`), **without** the closing fence: for a caller that assembles one
/// object out of many pieces (the gather kernels copy a KV chunk a block or a token row at a
/// time). The caller must call [`store_fence`] on the same thread after its last piece and
/// before anything that lets another thread or process read the bytes (on x86 an ordinary or
/// release store, which is how an atomic flag may publish them, does not order streaming
/// stores; only fences and locked instructions do).
///
/// # Safety
/// As [`copy_bulk`]'s.
#[inline]
pub unsafe fn copy_streaming_unfenced(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract, passed on.
    unsafe {
        streaming::copy_unfenced(src, dst, len)
    };
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: the caller's contract.
    unsafe {
        ptr::copy_nonoverlapping(src, dst, len)
    };
}

/// Orders this thread's earlier [`copy_streaming_unfenced`] stores before its later stores
/// (`sfence` on x86-64; nothing elsewhere, where those copies use ordinary stores).
#[inline]
pub fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    streaming::fence();
}

/// Copies `src` into `dst` (equal lengths) with [`copy_bulk`].
///
/// # Panics
/// If the lengths differ, as `<[u8]>::copy_from_slice` does.
pub fn copy_slice(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_slice: lengths differ");
    // SAFETY: both slices are valid for their length; a `&mut` and a `&` never overlap.
    unsafe { copy_bulk(src.as_ptr(), dst.as_mut_ptr(), src.len()) };
}

#[cfg(target_arch = "x86_64")]
mod streaming {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    use std::ptr;

    /// Bytes per loop step: one cache line, four 16-byte stores.
    const STEP: usize = 64;

    /// [`copy_unfenced`], then [`fence`].
    ///
    /// # Safety
    /// As [`super::copy_bulk`]'s.
    pub(super) unsafe fn copy(src: *const u8, dst: *mut u8, len: usize) {
        // SAFETY: passed on.
        unsafe { copy_unfenced(src, dst, len) };
        fence();
    }

    /// Streaming stores are weakly ordered: this orders them before whatever follows (the
    /// store that publishes the copy, or the system call that sends the commit).
    pub(super) fn fence() {
        // SAFETY: SSE is part of every x86-64 target; the call has no other precondition.
        unsafe { _mm_sfence() };
    }

    /// The non-temporal copy: ordinary copies for the bytes before the first 16-byte-aligned
    /// destination address and after the last whole step, streaming stores in between.
    ///
    /// # Safety
    /// As [`super::copy_bulk`]'s.
    pub(super) unsafe fn copy_unfenced(src: *const u8, dst: *mut u8, len: usize) {
        let head = dst.align_offset(16).min(len);
        // SAFETY: `head ≤ len`, inside both ranges.
        unsafe { ptr::copy_nonoverlapping(src, dst, head) };
        let body = (len - head) / STEP * STEP;
        let mut i = head;
        while i < head + body {
            // SAFETY: `i + STEP ≤ len`, so the 64 bytes at `i` are inside both ranges;
            // `dst + i` is 16-byte aligned (`head` aligned it, steps keep it), as
            // `_mm_stream_si128` requires; the loads are unaligned ones.
            unsafe {
                let s = src.add(i).cast::<__m128i>();
                let d = dst.add(i).cast::<__m128i>();
                let a = _mm_loadu_si128(s);
                let b = _mm_loadu_si128(s.add(1));
                let c = _mm_loadu_si128(s.add(2));
                let e = _mm_loadu_si128(s.add(3));
                _mm_stream_si128(d, a);
                _mm_stream_si128(d.add(1), b);
                _mm_stream_si128(d.add(2), c);
                _mm_stream_si128(d.add(3), e);
            }
            i += STEP;
        }
        // SAFETY: `i ≤ len`; the rest of both ranges.
        unsafe { ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn every_size_and_alignment_copies_exactly_its_bytes() {
        // Sizes around the threshold and around whole steps, every source and destination
        // misalignment within a line; the bytes just outside the destination stay untouched.
        let sizes = [
            0,
            1,
            63,
            64,
            65,
            4096,
            NON_TEMPORAL_MIN - 1,
            NON_TEMPORAL_MIN,
            NON_TEMPORAL_MIN + 1,
            NON_TEMPORAL_MIN + 63,
            3 << 20,
        ];
        let src_all = pattern((3 << 20) + 128, 7);
        for &n in &sizes {
            for (s_off, d_off) in [(0, 0), (1, 0), (0, 1), (7, 13), (15, 16), (63, 33), (16, 5)] {
                let src = &src_all[s_off..s_off + n];
                let mut dst = vec![0xA5u8; n + 128];
                let mut dst2 = dst.clone();
                copy_slice(&mut dst[d_off..d_off + n], src);
                assert!(dst[d_off..d_off + n] == *src, "n={n} s={s_off} d={d_off}");
                // SAFETY: both ranges lie inside their own allocations.
                unsafe {
                    copy_streaming_unfenced(src.as_ptr(), dst2.as_mut_ptr().add(d_off), n);
                }
                store_fence();
                assert!(dst2 == dst, "unfenced: n={n} s={s_off} d={d_off}");
                assert!(
                    dst[..d_off].iter().all(|&b| b == 0xA5),
                    "before: n={n} d={d_off}"
                );
                assert!(
                    dst[d_off + n..].iter().all(|&b| b == 0xA5),
                    "after: n={n} d={d_off}"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn different_lengths_panic_like_copy_from_slice() {
        copy_slice(&mut [0u8; 3], &[1u8; 4]);
    }
}
