//! Heap bytes per cached object in the L1 manager (issue 18 item 3): fills an `L1Manager`
//! with 1,000,000 published 4 KiB objects (the allocator works on offsets only, so no object
//! memory is touched) and prints the growth of the process's resident memory per object,
//! then again after `clear`.
//!
//! Keys are what engines send: a 32-byte chunk hash, one shared model name and salt (`Arc`s,
//! as the engine shares them across a request's keys), rank and group. The figure covers the
//! index, the entries, the eviction policy's links and the tenant table; not the engine's
//! sessions, which hold lookups, not objects.
//!
//! It also prints the slowest single `reserve_write` call of the fill: the one that grows the
//! key index and the slot table, whose rehash or move of every object happens under the L1
//! lock.
//!
//! Run: `cargo bench -p kvtier-core --bench l1_memory [-- OBJECTS]`. Under `cargo test` it runs
//! with 20,000 objects so the code path stays tested.

use std::sync::Arc;

use kvtier_core::hash::ChunkHash;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::{L1Config, L1Manager};

const OBJ: u64 = 4096;

/// Resident bytes of this process (`/proc/self/statm`, second field, in pages).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * rustix::param::page_size() as u64
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: u64 = std::env::args()
        .filter_map(|a| a.parse().ok())
        .next()
        .unwrap_or(if bench { 1_000_000 } else { 20_000 });
    let l1 = L1Manager::new(L1Config::with_capacity(n * OBJ + OBJ));
    let model: Arc<str> = Arc::from("meta-llama/Llama-3.1-8B-Instruct");
    let salt: Arc<str> = Arc::from("");
    let before = rss_bytes();
    let batch = 64u64;
    let mut i = 0u64;
    // The slowest reservation call: the one that grows the key index (and the slot vector)
    // rehashes or moves every object under the L1 lock.
    let mut slowest = (std::time::Duration::ZERO, 0u64);
    while i < n {
        let items: Vec<(ObjectKey, u64)> = (i..(i + batch).min(n))
            .map(|j| {
                let mut h = [0u8; 32];
                h[..8].copy_from_slice(&j.to_le_bytes());
                h[8..16].copy_from_slice(&j.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
                let hash = ChunkHash::from_slice(&h).unwrap_or_else(|e| panic!("hash: {e}"));
                let key =
                    ObjectKey::new(hash, Arc::clone(&model), 0x0101_0000, 0, Arc::clone(&salt))
                        .unwrap_or_else(|e| panic!("key: {e}"));
                (key, OBJ)
            })
            .collect();
        let t = std::time::Instant::now();
        let reserved = l1.reserve_write(&items, false);
        let took = t.elapsed();
        if took > slowest.0 {
            slowest = (took, i);
        }
        let tickets: Vec<_> = reserved
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("reserve: {e}")))
            .collect();
        for r in l1.finish_write(&tickets) {
            r.unwrap_or_else(|e| panic!("publish: {e}"));
        }
        i += batch;
    }
    let filled = rss_bytes();
    assert_eq!(l1.counters().objects.get(), n, "every object is cached");
    l1.clear(true);
    let cleared = rss_bytes();
    println!(
        "L1 manager with {n} objects: {:.1} bytes per object (RSS +{:.1} MiB); after clear: RSS \
         +{:.1} MiB over the start",
        filled.saturating_sub(before) as f64 / n as f64,
        filled.saturating_sub(before) as f64 / (1 << 20) as f64,
        cleared.saturating_sub(before) as f64 / (1 << 20) as f64,
    );
    println!(
        "slowest reserve_write of {batch} keys: {:.2} ms, with {} objects cached (index and slot \
         table growth under the L1 lock)",
        slowest.0.as_secs_f64() * 1e3,
        slowest.1,
    );
}
