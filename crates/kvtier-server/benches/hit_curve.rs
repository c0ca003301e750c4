//! Request-path cost of the live hit-rate curve: `HitCurve::observe` (tenant hash, per-chunk
//! fingerprint and sampling compare, a `try_send` when a chunk is sampled) per lookup, with the
//! curve's thread folding the queue as in the server, against the same loop with the curve off.
//!
//! Workload: lookups of 16 chunks over 200,000 distinct prompts (so the sampling rate falls
//! well below 1, as on a real server), 2,000,000 lookups per phase, phases alternating
//! off/on three times; prints ns per lookup (median of the phases).
//!
//! Run: `cargo bench -p kvtier-server --bench hit_curve`

use std::sync::Arc;
use std::time::Instant;

use kvtier_core::analysis::mrc::mix64;
use kvtier_core::hash::ChunkHash;
use kvtier_core::l1::{L1Config, L1Manager};
use kvtier_server::analysis::hit_curve::{HitCurve, HitCurveConfig, tenant_hash};

const CHUNKS: usize = 16;
const PROMPTS: u64 = 200_000;

fn hashes(prompt: u64) -> Vec<ChunkHash> {
    (0..CHUNKS as u64)
        .map(|i| {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&mix64(prompt * 64 + i).to_le_bytes());
            ChunkHash::from_bytes(b)
        })
        .collect()
}

fn phase(curve: &HitCurve, lookups: u64, seed: u64) -> f64 {
    let tenant = tenant_hash("bench/model", "", u32::MAX);
    let prompts: Vec<Vec<ChunkHash>> = (0..1024).map(|p| hashes(p + seed)).collect();
    let mut s = seed;
    let start = Instant::now();
    for _ in 0..lookups {
        s = mix64(s);
        // A new prompt window every 1024 lookups keeps the distinct set growing.
        let h = &prompts[(s % 1024) as usize];
        curve.observe(tenant ^ (s % PROMPTS), h, 1);
    }
    start.elapsed().as_nanos() as f64 / lookups as f64
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let lookups = if quick { 20_000 } else { 2_000_000 };
    let l1 = Arc::new(L1Manager::new(L1Config::with_capacity(1 << 30)));
    let off = HitCurve::start(
        HitCurveConfig {
            enabled: false,
            ..HitCurveConfig::default()
        },
        Arc::clone(&l1),
    )
    .expect("curve");
    let on = HitCurve::start(HitCurveConfig::default(), Arc::clone(&l1)).expect("curve");
    let (mut t_off, mut t_on) = (Vec::new(), Vec::new());
    for round in 0..3u64 {
        t_off.push(phase(&off, lookups, round * 7));
        t_on.push(phase(&on, lookups, round * 7 + 3));
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let r = on.report(1 << 30, &[]);
    println!(
        "observe, {CHUNKS} chunks per lookup: off {:.1} ns, on {:.1} ns per lookup (sample rate {:.4}, {} dropped of {} lookups)",
        med(&mut t_off),
        med(&mut t_on),
        r.sample_rate,
        r.dropped_lookups,
        r.lookups_observed
    );
    on.stop();
}
