//! `kvtier bench`: end-to-end load against any server speaking the LMCache 0.5.6 protocol
//! (kvtier or `lmcache server`), through the engine-driven shared-memory path.
//!
//! One run, in order (every phase starts on a barrier, so N client threads run each phase
//! together and the aggregate rate is total work over the phase's wall time):
//! 1. yardsticks: single-thread memcpy of the same bytes as one client's store pass; the same
//!    copy into a scratch `/dev/shm` file whose pages do not exist yet, through a fresh mapping
//!    of pages that exist, and through a mapping already faulted in (what a store costs at
//!    best in each state of the pool's pages); a bare ZeroMQ echo round trip;
//! 2. `noop` round trips, sequential (p50/p99) and pipelined (`--pipeline-depth` in flight);
//! 3. two passes of store → retrieve → verify → `clear(force)`: the first on cold pool pages,
//!    the second on the pages the first one used (the server reuses them after the clear),
//!    which isolates the first-touch page-fault cost. Store = `prepare_store` + copy into the
//!    slots + `commit_store`; retrieve = `lookup` + `query_prefetch_status` until an int (the
//!    lookup→result latency) + `prepare_retrieve` + copy out + `commit_retrieve` +
//!    `end_session`. Every retrieved byte is compared with what was stored, outside the timed
//!    region; any mismatch or failed request fails the run (exit code 1);
//! 4. with `--http-url`: fill `--status-objects` small objects, then time `GET /status` idle
//!    and while a store pass runs;
//! 5. with a known server pid (`--server-pid`, or `--spawn-server`): the server's resident
//!    memory excluding the shared segment (`VmRSS − RssShmem`), after the run. With
//!    `--spawn-server` also the time from spawning the server to its first answered `noop`.
//!
//! The bench clears the server's cache (`clear(force=True)`) between passes: never point it
//! at a server that holds data you need.

mod neighbour;
mod probe;
mod report;
mod worker;
mod yardstick;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kvtier_client::Client;

use report::{Metrics, PhaseOut};

/// Flags of `kvtier bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// ZeroMQ endpoint of the server.
    #[arg(long, default_value = "tcp://127.0.0.1:5555")]
    url: String,

    /// KV layout per chunk: `small` (24 layers × hidden 128, float16: 3 MiB per 256-token
    /// chunk), `8b` (32 layers × hidden 1024, float16: 32 MiB) or LAYERS:HIDDEN:DTYPE.
    #[arg(long, default_value = "small", value_parser = parse_shape)]
    shape: Shape,

    /// Concurrent clients (one thread, socket and engine instance each).
    #[arg(long, default_value_t = 1)]
    clients: usize,

    /// Requests per client in each store/retrieve pass.
    #[arg(long, default_value_t = 16)]
    requests: usize,

    /// Chunks per request.
    #[arg(long, default_value_t = 4)]
    chunks_per_request: usize,

    /// `noop` requests per client in each noop workload.
    #[arg(long, default_value_t = 2000)]
    noops: usize,

    /// `noop` requests in flight in the pipelined workload.
    #[arg(long, default_value_t = 200)]
    pipeline_depth: usize,

    /// Print the results as one JSON object instead of a table.
    #[arg(long)]
    json: bool,

    /// Seconds a client waits for any reply before failing the run.
    #[arg(long, default_value_t = 60.0)]
    timeout_seconds: f64,

    /// Touch the slot pages (MADV_POPULATE_WRITE) before copying into them, as a client that
    /// wants to avoid per-page faults in its copy would.
    #[arg(long)]
    client_populate: bool,

    /// HTTP base URL of the server (e.g. http://127.0.0.1:8080): enables the status workload.
    #[arg(long)]
    http_url: Option<String>,

    /// Path of the status endpoint (`/status` exists on kvtier and LMCache).
    #[arg(long, default_value = "/status")]
    status_path: String,

    /// Objects to add before timing the status endpoint (small 4 KiB chunks; 0 = none).
    #[arg(long, default_value_t = 0)]
    status_objects: u64,

    /// Pid of the server, to report its memory after the run.
    #[arg(long)]
    server_pid: Option<u32>,

    /// Start the server first and measure the time to its first answered `noop`. The command
    /// follows `--`; without one, this binary's `serve` on --url's host and port (and
    /// --http-url's, else `--no-http`) with a 2 GiB L1.
    #[arg(long)]
    spawn_server: bool,

    /// Where the spawned server's stdout and stderr go (default: discarded).
    #[arg(long)]
    server_log: Option<std::path::PathBuf>,

    /// Model name used in keys.
    #[arg(long, default_value = "kvtier-bench")]
    model: String,

    /// Seed of keys and payloads (default: from the clock, so runs never collide).
    #[arg(long)]
    seed: Option<u64>,

    /// Adds a phase in which every client's sequential noops run while one more client
    /// stores batches of this many new chunks back to back (prepare_store + commit_store, no
    /// copy; once L1 is full each batch evicts as much synchronously): how much one heavy
    /// client raises the others' noop latency. kvtier answers batches of up to 21 chunks here
    /// (a key under 16 KiB) on its poll thread and bigger ones on its transfer pool, so 16
    /// measures the inline path and 64 the pool. 0: no such phase.
    #[arg(long, default_value_t = 0)]
    neighbour_chunks: usize,

    /// Command that starts the server (with --spawn-server).
    #[arg(last = true)]
    server_cmd: Vec<String>,
}

/// Per-chunk KV layout.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Layers.
    pub layers: u64,
    /// Hidden size per layer (KV heads × head size).
    pub hidden: u64,
    /// torch dtype name.
    pub dtype: String,
    /// Bytes per element.
    pub itemsize: u64,
    /// How it was given.
    pub label: String,
}

fn parse_shape(s: &str) -> Result<Shape, String> {
    let (layers, hidden, dtype) = match s {
        "small" => (24, 128, "float16"),
        "8b" => (32, 1024, "float16"),
        _ => {
            let parts: Vec<&str> = s.split(':').collect();
            let [l, h, d] = parts.as_slice() else {
                return Err(format!(
                    "expected small, 8b or LAYERS:HIDDEN:DTYPE, got {s:?}"
                ));
            };
            let l: u64 = l.parse().map_err(|e| format!("layers {l:?}: {e}"))?;
            let h: u64 = h.parse().map_err(|e| format!("hidden {h:?}: {e}"))?;
            if l == 0 || h == 0 || l > 1024 || h > 1 << 20 {
                return Err(format!(
                    "layers and hidden must be positive and sane, got {s:?}"
                ));
            }
            (l, h, *d)
        }
    };
    let size = kvtier_proto::dtype_itemsize(dtype)
        .map(|n| n as u64)
        .ok_or_else(|| format!("unknown dtype {dtype:?}"))?;
    Ok(Shape {
        layers,
        hidden,
        dtype: dtype.to_owned(),
        itemsize: size,
        label: s.to_owned(),
    })
}

impl Shape {
    /// Bytes of one chunk of `chunk_size` tokens: K and V × layers × tokens × hidden.
    pub fn chunk_bytes(&self, chunk_size: u64) -> u64 {
        2 * self.layers * chunk_size * self.hidden * self.itemsize
    }
}

/// The fill shape of the status workload: 1 layer × hidden 4, float16 = 4 KiB per chunk.
fn fill_shape() -> Shape {
    Shape {
        layers: 1,
        hidden: 4,
        dtype: "float16".into(),
        itemsize: 2,
        label: "1:4:float16".into(),
    }
}

/// A store/retrieve pass: 0 is cold, 1 warm, 2 the load under which status is timed.
pub type Pass = u32;

/// One step of the run; every client thread and the main thread go through the same list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    NoopSeq,
    /// Sequential noops beside the heavy client of `--neighbour-chunks`.
    NoopBesideHeavy,
    NoopPipelined,
    Store(Pass),
    Retrieve(Pass),
    Verify(Pass),
    Clear,
    Fill,
    StatusIdle,
    StoreLoad,
}

impl Phase {
    fn label(self) -> String {
        match self {
            Phase::NoopSeq => "noop sequential".into(),
            Phase::NoopBesideHeavy => "noop beside a heavy client".into(),
            Phase::NoopPipelined => "noop pipelined".into(),
            Phase::Store(p) => format!("store {}", pass_name(p)),
            Phase::Retrieve(p) => format!("retrieve {}", pass_name(p)),
            Phase::Verify(p) => format!("verify {}", pass_name(p)),
            Phase::Clear => "clear".into(),
            Phase::Fill => "fill".into(),
            Phase::StatusIdle => "status idle".into(),
            Phase::StoreLoad => "status under store load".into(),
        }
    }
}

fn pass_name(p: Pass) -> &'static str {
    match p {
        0 => "cold",
        1 => "warm",
        _ => "load",
    }
}

/// Settings every worker reads.
#[derive(Debug)]
pub struct RunConfig {
    pub url: String,
    pub clients: usize,
    pub timeout: Duration,
    pub model: String,
    pub shape: Shape,
    pub chunk_size: u64,
    pub chunk_bytes: usize,
    pub requests: usize,
    pub chunks: usize,
    pub noops: usize,
    pub depth: usize,
    pub seed: u64,
    pub client_populate: bool,
    pub status_objects: u64,
    pub neighbour_chunks: usize,
}

/// State shared by the main thread and the workers.
pub struct Shared {
    barrier: Barrier,
    failed: AtomicBool,
    errors: Mutex<Vec<String>>,
    results: Mutex<Vec<(usize, PhaseOut)>>,
    done: Vec<AtomicUsize>,
    progress: ProgressBar,
    /// The pool mapping all clients share (opened by the first to register).
    pool: Mutex<Option<Arc<kvtier_client::ShmPool>>>,
}

impl Shared {
    fn fail(&self, who: &str, e: &anyhow::Error) {
        self.failed.store(true, Ordering::SeqCst);
        if let Ok(mut errs) = self.errors.lock() {
            errs.push(format!("{who}: {e:#}"));
        }
    }
}

fn phases(status: bool, neighbour: bool) -> Vec<Phase> {
    let mut v = vec![Phase::NoopSeq];
    if neighbour {
        // The heavy client's objects are cleared so that the passes start from an empty L1.
        v.extend([Phase::NoopBesideHeavy, Phase::Clear]);
    }
    v.push(Phase::NoopPipelined);
    for pass in 0..2 {
        v.extend([
            Phase::Store(pass),
            Phase::Retrieve(pass),
            Phase::Verify(pass),
            Phase::Clear,
        ]);
    }
    if status {
        v.extend([
            Phase::Fill,
            Phase::StatusIdle,
            Phase::StoreLoad,
            Phase::Clear,
        ]);
    }
    v
}

/// Runs the bench; exit code 1 if any request failed or any byte differed.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.clients == 0 || args.requests == 0 || args.chunks_per_request == 0 {
        bail!("--clients, --requests and --chunks-per-request must be at least 1");
    }
    if args.noops == 0 || args.pipeline_depth == 0 {
        bail!("--noops and --pipeline-depth must be at least 1");
    }
    if !(args.timeout_seconds.is_finite() && args.timeout_seconds > 0.0) {
        bail!("--timeout-seconds must be positive");
    }
    let timeout = Duration::from_secs_f64(args.timeout_seconds);
    let seed = args.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ (u64::from(std::process::id()) << 32)
    });

    let mut metrics = Metrics::default();
    let mut server = None;
    if args.spawn_server {
        let spawned = probe::spawn_server(&args, timeout)?;
        metrics.set("startup_ms", spawned.startup.as_secs_f64() * 1e3);
        server = Some(spawned);
    }
    let server_pid = args
        .server_pid
        .or_else(|| server.as_ref().map(probe::Spawned::pid));

    let mut probe_client = Client::connect(&args.url, timeout).context("connecting")?;
    let chunk_size = probe_client
        .get_chunk_size()
        .context("get_chunk_size (is a server listening on --url?)")?;
    if chunk_size == 0 {
        bail!("the server reports chunk size 0");
    }
    let chunk_bytes = usize::try_from(args.shape.chunk_bytes(chunk_size))?;
    if chunk_bytes < 64 {
        bail!("chunks of {chunk_bytes} bytes are too small to tag; use a larger shape");
    }
    let cfg = Arc::new(RunConfig {
        url: args.url.clone(),
        clients: args.clients,
        timeout,
        model: args.model.clone(),
        shape: args.shape.clone(),
        chunk_size,
        chunk_bytes,
        requests: args.requests,
        chunks: args.chunks_per_request,
        noops: args.noops,
        depth: args.pipeline_depth,
        seed,
        client_populate: args.client_populate,
        status_objects: args.status_objects,
        neighbour_chunks: args.neighbour_chunks,
    });
    let pass_bytes = (args.clients * args.requests * args.chunks_per_request * chunk_bytes) as u64;

    // The yardsticks: one thread copying one client's pass, chunk by chunk, into warm memory;
    // and a bare ZeroMQ DEALER→ROUTER echo over loopback TCP (the floor under any noop).
    let memcpy = yardstick::measure_memcpy(&cfg);
    metrics.set("memcpy_gbps", memcpy);
    match yardstick::measure_page_faults(&cfg) {
        Ok([first_touch, remapped, warm]) => {
            metrics.set("shm_first_touch_gbps", first_touch);
            metrics.set("shm_remapped_gbps", remapped);
            metrics.set("shm_warm_gbps", warm);
        }
        Err(e) => eprintln!("kvtier bench: warning: the page-fault yardstick failed: {e:#}"),
    }
    match probe::zmq_echo_rtt(args.noops.min(2000)) {
        Ok((p50, p99)) => {
            metrics.set("zmq_echo_rtt_p50_us", p50);
            metrics.set("zmq_echo_rtt_p99_us", p99);
        }
        Err(e) => eprintln!("kvtier bench: warning: the zeromq echo yardstick failed: {e:#}"),
    }

    let status = args.http_url.is_some();
    let phase_list = phases(status, args.neighbour_chunks > 0);
    let mut neighbour = if args.neighbour_chunks > 0 {
        Some(neighbour::Neighbour::setup(&cfg).context("setting up the heavy client")?)
    } else {
        None
    };
    let interactive = std::io::stderr().is_terminal();
    let progress = if interactive {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{spinner} {msg:28} [{bar:40}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let shared = Arc::new(Shared {
        barrier: Barrier::new(args.clients + 1),
        failed: AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
        results: Mutex::new(Vec::new()),
        done: phase_list.iter().map(|_| AtomicUsize::new(0)).collect(),
        progress: progress.clone(),
        pool: Mutex::new(None),
    });

    let mut handles = Vec::new();
    for idx in 0..args.clients {
        let shared = Arc::clone(&shared);
        let cfg = Arc::clone(&cfg);
        let list = phase_list.clone();
        let h = std::thread::Builder::new()
            .name(format!("bench-client-{idx}"))
            .spawn(move || worker::thread_main(idx, &cfg, &shared, &list))
            .context("spawning a client thread")?;
        handles.push(h);
    }

    let http = args
        .http_url
        .as_deref()
        .map(|u| probe::HttpTarget::parse(u, &args.status_path));
    let http = match http {
        Some(Err(e)) => {
            shared.fail("http", &e);
            None
        }
        Some(Ok(h)) => Some(h),
        None => None,
    };
    let mut status_idle = Vec::new();
    let mut status_load = Vec::new();
    for (i, phase) in phase_list.iter().enumerate() {
        progress.reset();
        progress.set_message(phase.label());
        progress.set_length(phase_units(*phase, &cfg, args.clients));
        shared.barrier.wait();
        if shared.failed.load(Ordering::SeqCst) {
            continue;
        }
        match (phase, &http) {
            (Phase::StatusIdle, Some(h)) => {
                if let Some(pid) = server_pid
                    && let Ok(mem) = probe::server_memory(pid)
                {
                    metrics.set(
                        "server_rss_excl_shm_filled_mib",
                        mem.rss_kib.saturating_sub(mem.shmem_kib) as f64 / 1024.0,
                    );
                }
                let deadline = Instant::now() + Duration::from_secs(5);
                while status_idle.len() < 20 && Instant::now() < deadline {
                    match h.get() {
                        Ok(d) => status_idle.push(d),
                        Err(e) => {
                            shared.fail("status", &e);
                            break;
                        }
                    }
                    progress.inc(1);
                }
            }
            (Phase::NoopBesideHeavy, _) => {
                if let Some(n) = neighbour.as_mut() {
                    // Batches back to back for as long as the clients' noops run.
                    match n.run(|| shared.done[i].load(Ordering::SeqCst) >= args.clients) {
                        Ok(out) => {
                            if let Ok(mut r) = shared.results.lock() {
                                r.push((i, out));
                            }
                        }
                        Err(e) => shared.fail("heavy client", &e),
                    }
                }
            }
            (Phase::StoreLoad, Some(h)) => {
                // Back-to-back status requests for as long as the store load runs.
                while shared.done[i].load(Ordering::SeqCst) < args.clients {
                    match h.get() {
                        Ok(d) => status_load.push(d),
                        Err(e) => {
                            shared.fail("status", &e);
                            break;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    shared.barrier.wait();
    drop(neighbour);
    for h in handles {
        if h.join().is_err() {
            shared.fail("client thread", &anyhow::anyhow!("panicked"));
        }
    }
    progress.finish_and_clear();

    // Results.
    let results = std::mem::take(
        &mut *shared
            .results
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?,
    );
    report::aggregate(&mut metrics, &phase_list, &results, memcpy);
    report::floor_ratios(&mut metrics);
    if status {
        report::status_metrics(
            &mut metrics,
            &status_idle,
            &status_load,
            args.status_objects,
        );
    }
    if let Some(pid) = server_pid {
        match probe::server_memory(pid) {
            Ok(m) => {
                metrics.set("server_rss_mib", m.rss_kib as f64 / 1024.0);
                metrics.set("server_rss_shmem_mib", m.shmem_kib as f64 / 1024.0);
                metrics.set(
                    "server_rss_excl_shm_mib",
                    m.rss_kib.saturating_sub(m.shmem_kib) as f64 / 1024.0,
                );
            }
            Err(e) => shared.fail("server memory", &e),
        }
    }
    let errors = shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
    metrics.set("errors", errors.len() as f64);
    if let Some(s) = server {
        s.stop();
    }

    let header = report::Header {
        url: args.url.clone(),
        shape: cfg.shape.clone(),
        chunk_size,
        chunk_bytes: chunk_bytes as u64,
        clients: args.clients,
        requests: args.requests,
        chunks: args.chunks_per_request,
        pass_bytes,
        seed,
    };
    if args.json {
        println!("{}", report::json(&header, &metrics, &errors));
    } else {
        print!("{}", report::table(&header, &metrics));
        for e in &errors {
            eprintln!("kvtier bench: error: {e}");
        }
    }
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Units of progress a phase reports (requests, noops or status samples).
fn phase_units(phase: Phase, cfg: &RunConfig, clients: usize) -> u64 {
    let n = match phase {
        Phase::NoopSeq | Phase::NoopBesideHeavy | Phase::NoopPipelined => cfg.noops * clients,
        Phase::Store(_) | Phase::Retrieve(_) | Phase::Verify(_) | Phase::StoreLoad => {
            cfg.requests * clients
        }
        Phase::Clear => 1,
        Phase::Fill => usize::try_from(cfg.status_objects.div_ceil(worker::FILL_CHUNKS as u64))
            .unwrap_or(usize::MAX),
        Phase::StatusIdle => 20,
    };
    n as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_the_reference_chunk_sizes() {
        let small = parse_shape("small").expect("small");
        assert_eq!(small.chunk_bytes(256), 3 << 20);
        let big = parse_shape("8b").expect("8b");
        assert_eq!(big.chunk_bytes(256), 32 << 20);
        let custom = parse_shape("2:64:bfloat16").expect("custom");
        assert_eq!(custom.chunk_bytes(256), 2 * 2 * 256 * 64 * 2);
        assert_eq!(fill_shape().chunk_bytes(256), 4096);
        for bad in [
            "",
            "7b",
            "1:2",
            "0:4:float16",
            "1:4:complex64",
            "a:4:float16",
        ] {
            assert!(parse_shape(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn every_pass_is_stored_retrieved_verified_and_cleared() {
        let list = phases(true, true);
        // The heavy client's objects are cleared before the first pass stores.
        let heavy = list.iter().position(|p| *p == Phase::NoopBesideHeavy);
        assert_eq!(
            list.get(heavy.expect("heavy phase") + 1),
            Some(&Phase::Clear)
        );
        assert!(!phases(true, false).contains(&Phase::NoopBesideHeavy));
        for pass in 0..2 {
            let store = list.iter().position(|p| *p == Phase::Store(pass));
            let retrieve = list.iter().position(|p| *p == Phase::Retrieve(pass));
            let verify = list.iter().position(|p| *p == Phase::Verify(pass));
            assert!(store < retrieve && retrieve < verify, "{list:?}");
            assert_eq!(list.get(verify.expect("verify") + 1), Some(&Phase::Clear));
        }
        assert_eq!(list.last(), Some(&Phase::Clear));
        assert!(!phases(false, false).contains(&Phase::Fill));
    }
}
