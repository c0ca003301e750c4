//! Cost of KV events on the engine's request path: the same engine-driven cycle
//! (`prepare_store` + `commit_store` of 4 chunks, `lookup` + query, `end_session`, then a
//! forced `clear` every 64 cycles so chunks are published and removed) on four engines built
//! side by side in one process: KV events off (`--kv-event-log-size 0`), on without a
//! subscriber, on with one subscriber draining every batch, and events off with lookup
//! explanations on (`--lookup-records 4096`: a record per lookup, the chunk history as L1's
//! listener; the other three run with `--lookup-records 0`).
//!
//! The three configurations run in alternating phases (ABCCBA) over several rounds and the
//! figure is the **thread CPU time per cycle** (`CLOCK_THREAD_CPUTIME_ID`), so the load of
//! other processes on this shared machine does not count; each configuration's median over
//! the rounds is printed with its ratio to "off".
//!
//! Run: `cargo bench -p kvtier-server --bench kv_events [-- ROUNDS]` (default 10). Under `cargo
//! test` it runs one short round so the code path stays tested.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Duration;

use kvtier_core::hash::{HashAlgorithm, TokenHasher};
use kvtier_core::l1::controller::EvictionController;
use kvtier_core::l1::{L1Config, L1Manager};
use kvtier_core::shm::{ShmOptions, ShmSegment};
use kvtier_proto::{IpcKey, RegisterEngineDrivenContext, Request};
use kvtier_server::engine::kv_events::{StreamPoll, Subscription};
use kvtier_server::engine::{Engine, EngineConfig};

/// The allocator `kvtier serve` uses (see the binary's `main.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static SEQ: AtomicU32 = AtomicU32::new(0);
const CHUNK: usize = 256;
const CHUNKS: u64 = 4;

fn engine(log: usize, lookup_records: usize) -> Engine {
    let name = format!(
        "kvtier_bench_kve_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Relaxed)
    );
    let segment =
        Arc::new(ShmSegment::create(&name, 64 << 20, ShmOptions::default()).expect("segment"));
    let l1 = Arc::new(L1Manager::new(L1Config::with_capacity(64 << 20)));
    let evictor =
        EvictionController::spawn(Arc::clone(&l1), Duration::from_secs(3600)).expect("evictor");
    let e = Engine::new(
        EngineConfig {
            chunk_size: CHUNK,
            session_ttl: Duration::from_secs(600),
            max_sessions: kvtier_server::engine::session::DEFAULT_MAX_SESSIONS,
            worker_reap_timeout: Duration::ZERO,
            worker_registration_grace: Duration::from_secs(3600),
            kv_event_log_size: log,
            lookup_records,
            miss_history_chunks: kvtier_server::engine::explain::history::DEFAULT_SLOTS,
        },
        TokenHasher::new(CHUNK, HashAlgorithm::Blake3).expect("hasher"),
        l1,
        segment,
        evictor,
    );
    e.handle(Request::RegisterKvCacheEngineDrivenContext(
        RegisterEngineDrivenContext {
            instance_id: 1,
            model_name: "m".into(),
            world_size: 1,
            block_size: 16,
            num_layers: 1,
            hidden_dim_size: 8,
            dtype_str: "float16".into(),
            use_mla: true,
            num_physical_slots: None,
        },
    ))
    .expect("registered");
    e
}

fn key(tokens: &[u32], worker: Option<u32>, rid: &str) -> IpcKey {
    IpcKey {
        model_name: "m".into(),
        world_size: 1,
        worker_id: worker,
        token_ids: tokens.to_vec().into(),
        start: 0,
        end: CHUNKS * CHUNK as u64,
        request_id: rid.into(),
        cache_salt: String::new(),
        num_kv_readers: 1,
    }
}

fn cycle(e: &Engine, i: u32) {
    let tokens: Vec<u32> = (0..(CHUNKS as u32 * CHUNK as u32))
        .map(|t| t ^ i.wrapping_mul(2_654_435_761))
        .collect();
    let k = key(&tokens, Some(0), "s");
    black_box(e.handle(Request::PrepareStore {
        key: k.clone(),
        instance_id: 1,
    }))
    .ok();
    black_box(e.handle(Request::CommitStore {
        key: k,
        instance_id: 1,
        data: Vec::new(),
    }))
    .ok();
    let l = key(&tokens, None, "r");
    black_box(e.handle(Request::Lookup { key: l, tp_size: 1 })).ok();
    black_box(e.handle(Request::QueryPrefetchStatus {
        request_id: "r".into(),
    }))
    .ok();
    e.end_session("r");
    e.end_session("s");
    if i % 64 == 63 {
        e.clear(true);
    }
}

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

fn drain(sub: &mut Option<Subscription>) {
    if let Some(s) = sub {
        while let StreamPoll::Item(b) = s.poll() {
            black_box(b);
        }
    }
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let rounds: usize = std::env::args()
        .filter_map(|a| a.parse().ok())
        .next()
        .unwrap_or(if bench { 10 } else { 1 });
    let per_phase: u32 = if bench { 4_000 } else { 200 };
    let engines = [
        engine(0, 0),
        engine(32_768, 0),
        engine(32_768, 0),
        engine(0, kvtier_server::engine::explain::DEFAULT_RECORDS),
    ];
    let mut subs: [Option<Subscription>; 4] = [
        None,
        None,
        Some(
            engines[2]
                .subscribe_kv_events(9, "m".into(), 0, 1024)
                .expect("subscribed"),
        ),
        None,
    ];
    let names = [
        "off",
        "on, no subscriber",
        "on, one subscriber",
        "events off, explain on",
    ];
    let mut per_cycle: [Vec<f64>; 4] = Default::default();
    let mut i = 0u32;
    for round in 0..rounds {
        let order: [usize; 8] = if round % 2 == 0 {
            [0, 1, 2, 3, 3, 2, 1, 0]
        } else {
            [3, 2, 1, 0, 0, 1, 2, 3]
        };
        for &c in &order {
            let e = &engines[c];
            let cpu0 = thread_cpu();
            for _ in 0..per_phase {
                cycle(e, i);
                i = i.wrapping_add(1);
                if c == 2 && i.is_multiple_of(16) {
                    drain(&mut subs[2]);
                }
            }
            let cpu = thread_cpu().saturating_sub(cpu0);
            per_cycle[c].push(cpu.as_secs_f64() * 1e6 / f64::from(per_phase));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let base = median(&mut per_cycle[0].clone());
    println!(
        "KV-event and explanation cost per engine cycle (prepare+commit 4 chunks, lookup+query, \
         end_session; thread CPU, median of {} phases)",
        per_cycle[0].len()
    );
    for (c, name) in names.iter().enumerate() {
        let m = median(&mut per_cycle[c]);
        println!("  {name:<22} {m:>8.2} µs/cycle   {:.3}× off", m / base);
    }
    if let Some(s) = &subs[2] {
        black_box(s);
    }
    for e in &engines {
        e.release_all();
        e.evictor().stop();
    }
}
