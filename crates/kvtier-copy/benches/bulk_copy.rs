//! `copy_bulk` (non-temporal stores above 1 MiB on x86-64) against `ptr::copy_nonoverlapping`
//! (glibc's `memcpy`), copying chunk-sized pieces of a 256 MiB destination in turn so that
//! neither side finds the destination in the cache, as a pass of chunk stores does not.
//!
//! Run: `cargo bench -p kvtier-copy --bench bulk_copy`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const DEST: usize = 256 << 20;

fn bulk_copy(c: &mut Criterion) {
    let mut g = c.benchmark_group("bulk_copy");
    let mut dest = vec![1u8; DEST];
    for chunk in [1usize << 20, 3 << 20, 32 << 20] {
        let src = vec![7u8; chunk];
        g.throughput(Throughput::Bytes(chunk as u64));
        let mut at = 0;
        let mut next = |dest: &mut Vec<u8>| {
            at = (at + chunk) % (DEST / chunk * chunk);
            dest.as_mut_ptr().wrapping_add(at)
        };
        g.bench_function(BenchmarkId::new("memcpy", chunk >> 20), |b| {
            b.iter(|| {
                let d = next(&mut dest);
                // SAFETY: `d..d + chunk` lies inside `dest`; `src` is a separate allocation.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), d, chunk) };
                black_box(d);
            });
        });
        g.bench_function(BenchmarkId::new("copy_bulk", chunk >> 20), |b| {
            b.iter(|| {
                let d = next(&mut dest);
                // SAFETY: as above.
                unsafe { kvtier_copy::copy_bulk(src.as_ptr(), d, chunk) };
                black_box(d);
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bulk_copy);
criterion_main!(benches);
