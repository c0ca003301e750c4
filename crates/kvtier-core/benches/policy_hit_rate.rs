//! Policy benchmark: replays synthetic prefix workloads against the real [`L1Manager`] with each
//! eviction policy at several cache sizes and prints the chunk hit rates side by side (a
//! markdown table, as quoted in docs/performance.md).
//!
//! A request is a sequence of chunk keys (a prompt's prefix chunks). Replaying it
//! (`kvtier_core::analysis::replay`, shared with `kvtier simulate`) does what an engine does:
//! `reserve_read_prefix` (the hit count is the prefix found in L1), release the locks, then
//! store the chunks that missed (`reserve_write` + `finish_write`, evicting synchronously when
//! L1 is full). Objects are 4 KiB; the allocator works on offsets only, so
//! no memory is touched. Cache sizes are fractions of the trace's distinct chunks.
//!
//! Workloads (deterministic, seeded):
//! - `zipf`: 2,000 prompts (one of 10 shared 2-chunk system prompts + 4–12 own chunks), Zipf
//!   (s = 1.0) popularity, 60,000 requests.
//! - `zipf+scan`: the same, with one-off prompts (8 unique chunks each, never reused)
//!   interleaved 1:1 during the middle third.
//! - `tenants`: three tenants with their own Zipf prompts and a fourth that floods unique
//!   prompts (half the traffic); the hit rate is the three victims'. `LRU+quota` caps the
//!   flooder at 10 % of the cache through `set_quota`.
//! - `mooncake-like`: a multi-turn conversation trace shaped after the Mooncake trace's
//!   published statistics (23,608 requests, 512-token blocks, about 15 blocks per prompt, about half of all
//!   blocks reusable with an unbounded cache); see docs/performance.md.
//!
//! Run: `cargo bench -p kvtier-core --bench policy_hit_rate`

use std::collections::HashSet;
use std::sync::Arc;

use kvtier_core::analysis::replay::Replay;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::EvictionPolicyKind;

const OBJ: u64 = 4096;

/// splitmix64: a small deterministic generator (no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf(s) over `0..n` by inverse CDF.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for i in 0..n {
            acc += 1.0 / ((i + 1) as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Self(cdf)
    }

    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.0.partition_point(|&c| c < u).min(self.0.len() - 1)
    }
}

/// One request: its tenant and chunk ids.
struct Req {
    tenant: u8,
    chunks: Vec<u64>,
}

/// A trace and which tenants count for its hit rate.
struct Trace {
    name: &'static str,
    reqs: Vec<Req>,
    counted: fn(u8) -> bool,
}

fn zipf_prompts(rng: &mut Rng, n: usize, id_base: u64) -> Vec<Vec<u64>> {
    (0..n)
        .map(|p| {
            let sys = rng.below(10);
            let own = 4 + rng.below(9);
            let mut c = vec![id_base + sys * 2, id_base + sys * 2 + 1];
            c.extend((0..own).map(|i| id_base + 1_000 + p as u64 * 64 + i));
            c
        })
        .collect()
}

fn zipf_trace(scan: bool) -> Trace {
    let mut rng = Rng(7);
    let prompts = zipf_prompts(&mut rng, 2_000, 0);
    let zipf = Zipf::new(prompts.len(), 1.0);
    let n = 60_000;
    let mut next_unique = 1u64 << 40;
    let mut reqs = Vec::with_capacity(n * 3 / 2);
    for i in 0..n {
        reqs.push(Req {
            tenant: 0,
            chunks: prompts[zipf.sample(&mut rng)].clone(),
        });
        if scan && i >= n / 3 && i < 2 * n / 3 {
            reqs.push(Req {
                tenant: 0,
                chunks: (0..8).map(|k| next_unique + k).collect(),
            });
            next_unique += 8;
        }
    }
    Trace {
        name: if scan { "zipf+scan" } else { "zipf" },
        reqs,
        counted: |_| true,
    }
}

fn tenant_trace() -> Trace {
    let mut rng = Rng(11);
    let prompts: Vec<Vec<Vec<u64>>> = (0..3u64)
        .map(|t| zipf_prompts(&mut rng, 700, (t + 1) << 32))
        .collect();
    let zipf = Zipf::new(700, 1.0);
    let mut next_unique = 1u64 << 40;
    let mut reqs = Vec::new();
    for i in 0..90_000u64 {
        if i % 2 == 0 {
            reqs.push(Req {
                tenant: 3,
                chunks: (0..8).map(|k| next_unique + k).collect(),
            });
            next_unique += 8;
        } else {
            let t = rng.below(3) as u8;
            reqs.push(Req {
                tenant: t,
                chunks: prompts[t as usize][zipf.sample(&mut rng)].clone(),
            });
        }
    }
    Trace {
        name: "tenants (flood)",
        reqs,
        counted: |t| t < 3,
    }
}

/// Multi-turn conversations sharing a few system prompts: a request either opens a
/// conversation (system prompt of 2 blocks from 20, Zipf, plus a first user turn of 1–20
/// blocks) or continues one (Zipf over recent conversations: the previous prompt plus 1–4 new
/// blocks). Conversations end after 2–10 turns.
fn mooncake_trace() -> Trace {
    let mut rng = Rng(23);
    let sys = Zipf::new(20, 1.2);
    let recent = Zipf::new(64, 0.8);
    let mut live: Vec<(Vec<u64>, u32)> = Vec::new();
    let mut next = 1u64 << 36;
    let mut reqs = Vec::with_capacity(23_608);
    while reqs.len() < 23_608 {
        let open = live.is_empty() || rng.unit() < 0.55;
        let chunks = if open {
            let s = sys.sample(&mut rng) as u64;
            let mut c = vec![s * 2, s * 2 + 1];
            let first = 1 + rng.below(20);
            c.extend((0..first).map(|k| next + k));
            next += first;
            live.push((c.clone(), 2 + rng.below(9) as u32));
            c
        } else {
            let idx = live.len() - 1 - recent.sample(&mut rng).min(live.len() - 1);
            let add = 1 + rng.below(4);
            let (conv, turns) = &mut live[idx];
            conv.extend((0..add).map(|k| next + k));
            next += add;
            *turns -= 1;
            let c = conv.clone();
            if *turns == 0 {
                live.remove(idx);
            }
            c
        };
        reqs.push(Req { tenant: 0, chunks });
    }
    Trace {
        name: "mooncake-like",
        reqs,
        counted: |_| true,
    }
}

/// Hit rate of the counted tenants' chunks (the replay itself is the library's, shared with
/// `kvtier simulate`).
fn replay(trace: &Trace, policy: EvictionPolicyKind, objects: u64, flood_quota: bool) -> f64 {
    let replay = Replay::new(objects * OBJ, policy);
    let model: Arc<str> = Arc::from("bench/model");
    let salts: Vec<Arc<str>> = (0..4).map(|t| Arc::from(format!("tenant-{t}"))).collect();
    if flood_quota {
        replay.l1().set_quota(&salts[3], Some(objects * OBJ / 10));
    }
    let (mut hits, mut total) = (0u64, 0u64);
    for r in &trace.reqs {
        let keys: Vec<ObjectKey> = r
            .chunks
            .iter()
            .map(|&c| Replay::key(c, &model, 0x0100_0100, &salts[r.tenant as usize]))
            .collect();
        let h = replay.request(&keys, OBJ);
        if (trace.counted)(r.tenant) {
            hits += h as u64;
            total += keys.len() as u64;
        }
    }
    hits as f64 / total.max(1) as f64
}

/// Hit rate with an unbounded cache (every chunk seen before hits, prefix rule applied).
fn unbounded(trace: &Trace) -> f64 {
    let mut seen: HashSet<(u8, u64)> = HashSet::new();
    let (mut hits, mut total) = (0u64, 0u64);
    for r in &trace.reqs {
        let h = r
            .chunks
            .iter()
            .take_while(|&&c| seen.contains(&(r.tenant, c)))
            .count();
        if (trace.counted)(r.tenant) {
            hits += h as u64;
            total += r.chunks.len() as u64;
        }
        seen.extend(r.chunks.iter().map(|&c| (r.tenant, c)));
    }
    hits as f64 / total.max(1) as f64
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful either way:
    // a quick mode keeps test runs short.
    let quick =
        std::env::args().any(|a| a == "--quick") || !std::env::args().any(|a| a == "--bench");
    let traces = [
        zipf_trace(false),
        zipf_trace(true),
        tenant_trace(),
        mooncake_trace(),
    ];
    let policies = [
        EvictionPolicyKind::Lru,
        EvictionPolicyKind::Arc,
        EvictionPolicyKind::S3Fifo,
        EvictionPolicyKind::IsolatedLru,
    ];
    println!(
        "| workload | requests | distinct chunks | unbounded | cache | LRU | ARC | S3FIFO | IsolatedLRU | LRU+quota |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for trace in &traces {
        let distinct: HashSet<(u8, u64)> = trace
            .reqs
            .iter()
            .flat_map(|r| r.chunks.iter().map(move |&c| (r.tenant, c)))
            .collect();
        // The conversation trace reuses mostly recent blocks: smaller caches tell policies apart.
        let fractions: &[f64] = match (quick, trace.name) {
            (true, _) => &[0.1],
            (false, "mooncake-like") => &[0.005, 0.01, 0.02, 0.05],
            (false, _) => &[0.05, 0.1, 0.2, 0.4],
        };
        for &f in fractions {
            let objects = ((distinct.len() as f64) * f) as u64;
            let mut row = format!(
                "| {} | {} | {} | {:.1} % | {} % | ",
                trace.name,
                trace.reqs.len(),
                distinct.len(),
                100.0 * unbounded(trace),
                100.0 * f
            );
            for p in policies {
                row.push_str(&format!(
                    "{:.1} % | ",
                    100.0 * replay(trace, p, objects, false)
                ));
            }
            if trace.name.starts_with("tenants") {
                let q = replay(trace, EvictionPolicyKind::Lru, objects, true);
                row.push_str(&format!("{:.1} % |", 100.0 * q));
            } else {
                row.push_str("– |");
            }
            println!("{row}");
        }
    }
}
