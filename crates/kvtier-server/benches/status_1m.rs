//! Status cost with 1M objects in L1, on a real `Server` (sparse shared-memory segment, ZeroMQ
//! socket, axum HTTP API on an ephemeral port).
//!
//! Measures:
//! 1. building and serialising the whole status tree in process (`StatusSource::status` +
//!    `serde_json::to_vec`), with an empty L1 and with 1M objects;
//! 2. `GET /api/status` over loopback HTTP (keep-alive client), and `GET /metrics`;
//! 3. L1 store throughput (batches of 16 chunks: `reserve_write` → `finish_write`, then `delete`
//!    to keep the population at 1M) with and without a thread polling `/api/status` at 10 Hz,
//!    alternating the two phases (ABBA) over several rounds of the same run and comparing each
//!    round's pair, so drifting machine load cancels out.
//!
//! Run: `cargo bench -p kvtier-server --bench status_1m` (needs ~8 GiB free in /dev/shm for the
//! sparse segment; pages are never touched). Under `cargo test` (no `--bench` argument) it runs a
//! small smoke configuration instead, so the code path stays tested.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvtier_core::hash::ChunkHash;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::L1Manager;
use kvtier_server::{Server, ServerConfig};

struct Plan {
    objects: u32,
    status_iters: usize,
    http_iters: usize,
    rounds: usize,
    phase: Duration,
}

const FULL: Plan = Plan {
    objects: 1_000_000,
    status_iters: 2_000,
    http_iters: 2_000,
    rounds: 20,
    phase: Duration::from_millis(500),
};

const SMOKE: Plan = Plan {
    objects: 10_000,
    status_iters: 50,
    http_iters: 50,
    rounds: 1,
    phase: Duration::from_millis(300),
};

const OBJECT_BYTES: u64 = 4096;
const BATCH: usize = 16;

fn key(model: &Arc<str>, salt: &Arc<str>, i: u64) -> ObjectKey {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&i.to_le_bytes());
    h[8..16].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    ObjectKey {
        chunk_hash: ChunkHash::from_bytes(h),
        model_name: Arc::clone(model),
        kv_rank: 0x0100_0100,
        object_group_id: 0,
        cache_salt: Arc::clone(salt),
    }
}

fn fill(l1: &L1Manager, n: u32) {
    let model: Arc<str> = Arc::from("meta-llama/Llama-3.1-8B-Instruct");
    let salt: Arc<str> = Arc::from("");
    let mut i = 0u64;
    while i < u64::from(n) {
        let end = (i + 1024).min(u64::from(n));
        let items: Vec<_> = (i..end)
            .map(|j| (key(&model, &salt, j), OBJECT_BYTES))
            .collect();
        let tickets: Vec<_> = l1
            .reserve_write(&items, false)
            .into_iter()
            .map(|r| r.expect("L1 is large enough"))
            .collect();
        assert!(l1.finish_write(&tickets).iter().all(Result::is_ok));
        i = end;
    }
}

#[derive(Debug)]
struct Summary {
    p50: Duration,
    p99: Duration,
    max: Duration,
    mean: Duration,
}

fn summarise(mut v: Vec<Duration>) -> Summary {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    let total: Duration = v.iter().sum();
    Summary {
        p50: at(0.5),
        p99: at(0.99),
        max: v[v.len() - 1],
        mean: total / v.len() as u32,
    }
}

fn print_row(name: &str, s: &Summary, extra: &str) {
    println!(
        "{name:<44} p50 {:>9.3} ms  p99 {:>9.3} ms  max {:>9.3} ms  mean {:>9.3} ms  {extra}",
        s.p50.as_secs_f64() * 1e3,
        s.p99.as_secs_f64() * 1e3,
        s.max.as_secs_f64() * 1e3,
        s.mean.as_secs_f64() * 1e3,
    );
}

fn in_process(server: &Server, iters: usize) -> (Summary, usize) {
    let source = server.status_source();
    let mut times = Vec::with_capacity(iters);
    let mut bytes = 0;
    for _ in 0..iters {
        let t = Instant::now();
        let body = serde_json::to_vec(&source.status()).expect("serialises");
        times.push(t.elapsed());
        bytes = black_box(body).len();
    }
    (summarise(times), bytes)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

fn http_get(agent: &ureq::Agent, url: &str) -> usize {
    let mut r = agent.get(url).call().expect("answered");
    assert_eq!(r.status().as_u16(), 200);
    r.body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .expect("body")
        .len()
}

fn over_http(url: &str, iters: usize) -> (Summary, usize) {
    let agent = agent();
    let mut bytes = http_get(&agent, url); // warm the connection
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        bytes = http_get(&agent, url);
        times.push(t.elapsed());
    }
    (summarise(times), bytes)
}

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// One store phase: chunks stored per wall-clock second, and CPU nanoseconds the storing
/// thread spent per chunk (immune to preemption by other processes on a shared machine).
#[derive(Debug, Clone, Copy)]
struct PhaseResult {
    per_second: f64,
    cpu_ns_per_chunk: f64,
}

/// Stores for `phase`.
fn store_phase(l1: &L1Manager, next: &mut u64, phase: Duration) -> PhaseResult {
    let model: Arc<str> = Arc::from("meta-llama/Llama-3.1-8B-Instruct");
    let salt: Arc<str> = Arc::from("");
    let start = Instant::now();
    let cpu0 = thread_cpu();
    let mut stored = 0u64;
    while start.elapsed() < phase {
        let keys: Vec<_> = (0..BATCH as u64)
            .map(|j| key(&model, &salt, *next + j))
            .collect();
        *next += BATCH as u64;
        let items: Vec<_> = keys.iter().map(|k| (k.clone(), OBJECT_BYTES)).collect();
        let tickets: Vec<_> = l1
            .reserve_write(&items, false)
            .into_iter()
            .filter_map(Result::ok)
            .collect();
        stored += tickets.len() as u64;
        l1.finish_write(&tickets);
        l1.delete(&keys);
    }
    let cpu = thread_cpu().saturating_sub(cpu0);
    PhaseResult {
        per_second: stored as f64 / start.elapsed().as_secs_f64(),
        cpu_ns_per_chunk: cpu.as_nanos() as f64 / stored.max(1) as f64,
    }
}

/// Polls `url` at 10 Hz until `stop`; returns the poll latencies.
fn poller(url: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Duration>> {
    std::thread::Builder::new()
        .name("bench-poller".into())
        .spawn(move || {
            let agent = agent();
            let mut times = Vec::new();
            let mut tick = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                black_box(http_get(&agent, &url));
                times.push(t.elapsed());
                tick += Duration::from_millis(100);
                if let Some(wait) = tick.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            times
        })
        .expect("spawn poller")
}

fn main() {
    let plan = if std::env::args().any(|a| a == "--bench") {
        FULL
    } else {
        SMOKE
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-http")
        .enable_all()
        .build()
        .expect("runtime");
    // Twice the live set: room for the store phases (each batch is deleted again).
    let capacity = u64::from(plan.objects) * OBJECT_BYTES * 2 + (64 << 20);
    let config = {
        let mut c = ServerConfig::ephemeral(format!("kvtier_bench_status_{}", std::process::id()));
        c.l1.size_bytes = capacity;
        c.l1.align_bytes = OBJECT_BYTES;
        c.l1.eviction_trigger_watermark = 0.95;
        c.l1.eviction_ratio = 0.1;
        c
    };
    let server = Server::start(config, rt.handle()).expect("server starts");
    let addr = server.http_addr().expect("http");
    let status_url = format!("http://{addr}/api/status");
    let metrics_url = format!("http://{addr}/metrics");
    let l1 = Arc::clone(server.engine().l1());

    println!(
        "status_1m: {} objects of {} B, L1 capacity {:.1} GiB (sparse), {} status iterations, {} rounds x {:?} per store phase",
        plan.objects,
        OBJECT_BYTES,
        capacity as f64 / (1u64 << 30) as f64,
        plan.status_iters,
        plan.rounds,
        plan.phase
    );
    let (empty, bytes) = in_process(&server, plan.status_iters);
    print_row(
        "status build+serialise, empty L1",
        &empty,
        &format!("{bytes} B"),
    );

    let t = Instant::now();
    fill(&l1, plan.objects);
    println!(
        "filled L1 with {} objects in {:.2} s",
        l1.counters().objects.get(),
        t.elapsed().as_secs_f64()
    );

    let (full, bytes) = in_process(&server, plan.status_iters);
    print_row(
        &format!("status build+serialise, {} objects", plan.objects),
        &full,
        &format!("{bytes} B"),
    );
    let (http, bytes) = over_http(&status_url, plan.http_iters);
    print_row(
        &format!("GET /api/status, {} objects", plan.objects),
        &http,
        &format!("{bytes} B"),
    );
    let (metrics, bytes) = over_http(&metrics_url, plan.http_iters);
    print_row(
        &format!("GET /metrics, {} objects", plan.objects),
        &metrics,
        &format!("{bytes} B"),
    );

    let mut next = u64::from(plan.objects) + 1;
    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut poll_times = Vec::new();
    let _warm = store_phase(&l1, &mut next, plan.phase / 4);
    for round in 0..plan.rounds {
        // ABBA order, so a drift in machine load does not favour one side.
        let order: [bool; 2] = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for polled in order {
            let stop = Arc::new(AtomicBool::new(false));
            let handle = polled.then(|| poller(status_url.clone(), Arc::clone(&stop)));
            let r = store_phase(&l1, &mut next, plan.phase);
            stop.store(true, Ordering::Relaxed);
            if let Some(h) = handle {
                poll_times.extend(h.join().expect("poller"));
                with.push(r);
            } else {
                without.push(r);
            }
        }
    }
    let fmt = |v: &[PhaseResult]| {
        v.iter()
            .map(|x| format!("{:.0}", x.per_second / 1e3))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "store k chunks/s per round, without poller: {}",
        fmt(&without)
    );
    println!("store k chunks/s per round, 10 Hz poller:   {}", fmt(&with));
    let median = |v: &[PhaseResult], f: fn(&PhaseResult) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let ratio = |v: &[f64]| {
        let mut x = v.to_vec();
        x.sort_by(f64::total_cmp);
        (x[x.len() / 2] - 1.0) * 100.0
    };
    let wall: Vec<f64> = without
        .iter()
        .zip(&with)
        .map(|(a, b)| b.per_second / a.per_second)
        .collect();
    let cpu: Vec<f64> = without
        .iter()
        .zip(&with)
        .map(|(a, b)| b.cpu_ns_per_chunk / a.cpu_ns_per_chunk)
        .collect();
    println!(
        "store throughput (median of rounds): without {:.0} chunks/s, with a 10 Hz /api/status \
         poller {:.0} chunks/s; median paired change {:+.2} %",
        median(&without, |r| r.per_second),
        median(&with, |r| r.per_second),
        ratio(&wall),
    );
    println!(
        "store CPU per chunk (median of rounds): without {:.0} ns, with poller {:.0} ns; median \
         paired change {:+.2} %",
        median(&without, |r| r.cpu_ns_per_chunk),
        median(&with, |r| r.cpu_ns_per_chunk),
        ratio(&cpu),
    );
    if !poll_times.is_empty() {
        let n = poll_times.len();
        print_row(
            "GET /api/status during stores (10 Hz)",
            &summarise(poll_times),
            &format!("{n} polls"),
        );
    }
    assert_eq!(
        l1.counters().objects.get(),
        u64::from(plan.objects),
        "the population stayed at the target"
    );
    server.shutdown();
}
