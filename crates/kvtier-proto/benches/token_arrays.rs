//! Decoding a request's token array: plainly, and through a `TokenArrays` cache that misses
//! (new tokens: decode + remember), hits (the same array again: compare + share) or finds a
//! prefix (the array grew by one 256-token chunk: compare + copy + decode the rest), at a short
//! (1,024 ids) and a long (32,768 ids) prompt. Ids are random below 128,000 (a Llama-3-sized
//! vocabulary), so about half are uint16 and half uint32 on the wire; `plain_textlike` draws
//! them log-uniformly instead (mostly fixint and uint16, as text's frequent tokens have low
//! ids). `plain` decodes one array again and again (the branch predictor learns it);
//! `plain_distinct`/`plain_warm` go through 256 different arrays (as a server sees them).
//!
//! Run: `cargo bench -p kvtier-proto --bench token_arrays`.

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvtier_proto::{Path, Reader, TokenArrays};

fn encode(ids: &[u32]) -> Vec<u8> {
    let mut out = Vec::new();
    let len = u32::try_from(ids.len()).expect("a bench-sized array");
    rmp::encode::write_array_len(&mut out, len).expect("vec write");
    for &v in ids {
        rmp::encode::write_uint(&mut out, u64::from(v)).expect("vec write");
    }
    out
}

/// Deterministic pseudo-random ids below 128,000 (splitmix64).
fn ids(n: usize, seed: u64) -> Vec<u32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % 128_000) as u32
        })
        .collect()
}

fn token_arrays(c: &mut Criterion) {
    let path = Path::Root("token_ids");
    let mut g = c.benchmark_group("token_array_decode");
    for n in [1024usize, 32_768] {
        g.throughput(Throughput::Elements(n as u64));
        let base = ids(n + 256, 1);
        let bytes = encode(&base[..n]);
        let grown = encode(&base);
        g.bench_function(BenchmarkId::new("plain", n), |b| {
            b.iter(|| {
                let mut r = Reader::new(black_box(&bytes));
                black_box(r.read_u32_array(&path).expect("decodes"))
            });
        });
        // A miss per iteration: 256 distinct arrays in turn through a cache of 64 (each array
        // is evicted before it comes back); `plain_distinct` decodes the same arrays without
        // the cache (their bytes are as cold in the CPU caches as the misses' are).
        let distinct: Vec<Vec<u8>> = (0..256).map(|s| encode(&ids(n, 100 + s))).collect();
        let mut i = 0;
        g.bench_function(BenchmarkId::new("plain_distinct", n), |b| {
            b.iter(|| {
                i = (i + 1) % distinct.len();
                let mut r = Reader::new(black_box(&distinct[i]));
                black_box(r.read_u32_array(&path).expect("decodes"))
            });
        });
        let cache = TokenArrays::new(usize::MAX, 64);
        g.bench_function(BenchmarkId::new("miss", n), |b| {
            b.iter(|| {
                i = (i + 1) % distinct.len();
                let mut r = Reader::new(black_box(&distinct[i]));
                black_box(cache.read(&mut r, &path).expect("decodes"))
            });
        });
        // The same misses and decodes with the array's bytes in the CPU caches first (as a
        // request's are when the server has just received it).
        let warm = |i: &mut usize| {
            *i = (*i + 1) % distinct.len();
            let a = &distinct[*i];
            black_box(a.iter().map(|&b| u64::from(b)).sum::<u64>());
            a
        };
        g.bench_function(BenchmarkId::new("plain_warm", n), |b| {
            b.iter_batched(
                || warm(&mut i),
                |a| black_box(Reader::new(a).read_u32_array(&path).expect("decodes")),
                BatchSize::SmallInput,
            );
        });
        // Ids log-uniform below 128,000 (rank-frequency like text: frequent tokens have low
        // ids in BPE vocabularies): ~41 % fixint, 6 % uint8, 47 % uint16, 6 % uint32.
        let text_like: Vec<Vec<u8>> = (0..256)
            .map(|s| {
                let v: Vec<u32> = ids(n, 7_000 + s)
                    .iter()
                    .map(|&r| (128_000f64.powf(f64::from(r) / 128_000.0) - 1.0) as u32)
                    .collect();
                encode(&v)
            })
            .collect();
        let mut k = 0;
        g.bench_function(BenchmarkId::new("plain_textlike", n), |b| {
            b.iter_batched(
                || {
                    k = (k + 1) % text_like.len();
                    let a = &text_like[k];
                    black_box(a.iter().map(|&b| u64::from(b)).sum::<u64>());
                    a
                },
                |a| black_box(Reader::new(a).read_u32_array(&path).expect("decodes")),
                BatchSize::SmallInput,
            );
        });
        g.bench_function(BenchmarkId::new("miss_warm", n), |b| {
            b.iter_batched(
                || warm(&mut i),
                |a| black_box(cache.read(&mut Reader::new(a), &path).expect("decodes")),
                BatchSize::SmallInput,
            );
        });
        let cache = TokenArrays::new(usize::MAX, 64);
        cache
            .read(&mut Reader::new(&bytes), &path)
            .expect("decodes");
        g.bench_function(BenchmarkId::new("hit", n), |b| {
            b.iter(|| {
                let mut r = Reader::new(black_box(&bytes));
                black_box(cache.read(&mut r, &path).expect("decodes"))
            });
        });
        g.bench_function(BenchmarkId::new("prefix", n), |b| {
            b.iter_batched(
                // Untimed: a cache holding the shorter array.
                || {
                    let cache = TokenArrays::new(usize::MAX, 64);
                    cache
                        .read(&mut Reader::new(&bytes), &path)
                        .expect("decodes");
                    cache
                },
                |cache| {
                    let mut r = Reader::new(black_box(&grown));
                    black_box(cache.read(&mut r, &path).expect("decodes"));
                    cache
                },
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, token_arrays);
criterion_main!(benches);
