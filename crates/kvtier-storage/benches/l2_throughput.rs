//! L2 adapter throughput: store and load GB/s for the fs, resp and valkey adapters (and mock).
//!
//! ```text
//! cargo bench -p kvtier-storage --bench l2_throughput -- [--adapters fs,resp,mock]
//!     [--object-mib 16] [--objects 64] [--batch 8] [--fs-path DIR] [--redis-port PORT]
//! ```
//! Objects move between a shared-memory segment (as L1) and the adapter exactly as the
//! controllers move them (`store` from L1 ranges, `lookup_and_pin` + `load` into L1 ranges), in
//! batches of `--batch` objects. fs: a temp directory under `--fs-path` (default the system temp
//! dir); loads are measured cold (each file's pages dropped with `posix_fadvise(DONTNEED)` after
//! the fsynced store) and warm (page cache). resp: a `redis-server` started on a free port
//! (no persistence) unless `--redis-port` names a running one. `valkey`: the valkey adapter
//! against one standalone redis-server and then against a 3-master Redis Cluster (3 replicas)
//! started on loopback, in the same run. Loaded bytes are verified.

use std::sync::Arc;
use std::time::Instant;

use kvtier_core::key::ObjectKey;
use kvtier_core::l1::Allocation;
use kvtier_storage::L2Backend;
use kvtier_storage::config::{FsConfig, MockConfig, RespConfig, ValkeyConfig};
use kvtier_storage::fs::FsBackend;
use kvtier_storage::mock::MockBackend;
use kvtier_storage::resp::RespBackend;
use kvtier_storage::testsuite::{Arena, RedisCluster, RedisServer, key, pattern, unique_model};
use kvtier_storage::valkey::ValkeyBackend;

struct Args {
    adapters: Vec<String>,
    object_mib: u64,
    objects: usize,
    batch: usize,
    fs_path: Option<String>,
    redis_port: Option<u16>,
}

fn parse_args() -> Args {
    let mut a = Args {
        adapters: vec!["fs".into(), "resp".into()],
        object_mib: 16,
        objects: 64,
        batch: 8,
        fs_path: None,
        redis_port: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--adapters" => a.adapters = val().split(',').map(str::to_owned).collect(),
            "--object-mib" => a.object_mib = val().parse().expect("--object-mib"),
            "--objects" => a.objects = val().parse().expect("--objects"),
            "--batch" => a.batch = val().parse().expect("--batch"),
            "--fs-path" => a.fs_path = Some(val()),
            "--redis-port" => a.redis_port = Some(val().parse().expect("--redis-port")),
            // cargo bench passes --bench; ignore unknown harness flags.
            _ => {}
        }
    }
    a
}

struct Bench<'a> {
    rt: &'a tokio::runtime::Runtime,
    arena: &'a Arena,
    src: Vec<Allocation>,
    dst: Vec<Allocation>,
    keys: Vec<ObjectKey>,
    size: u64,
    batch: usize,
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

impl Bench<'_> {
    fn store(&self, b: &dyn L2Backend) -> f64 {
        let t = Instant::now();
        for (i, chunk) in self.keys.chunks(self.batch).enumerate() {
            let src: Vec<Allocation> = (0..chunk.len())
                .map(|j| self.src[(i * self.batch + j) % self.src.len()])
                .collect();
            let r = self.rt.block_on(b.store(chunk, &self.arena.segment, &src));
            assert!(r.iter().all(Result::is_ok), "store failed: {r:?}");
        }
        gbps(
            self.size * self.keys.len() as u64,
            t.elapsed().as_secs_f64(),
        )
    }

    fn load(&self, b: &dyn L2Backend) -> f64 {
        let t = Instant::now();
        for (i, chunk) in self.keys.chunks(self.batch).enumerate() {
            let dst = &self.dst[..chunk.len()];
            let r = self.rt.block_on(async {
                let found = b.lookup_and_pin(chunk).await.expect("lookup");
                assert!(found.iter().all(Option::is_some), "missing objects");
                let r = b.load(chunk, &self.arena.segment, dst).await;
                b.unpin(chunk).await;
                r
            });
            assert!(r.iter().all(Result::is_ok), "load failed: {r:?}");
            // Verify the first object of every batch.
            let want = (i * self.batch) % self.src.len();
            assert!(
                self.arena.get(dst[0]) == self.arena.get(self.src[want]),
                "loaded bytes differ"
            );
        }
        gbps(
            self.size * self.keys.len() as u64,
            t.elapsed().as_secs_f64(),
        )
    }
}

fn drop_page_cache(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        if let Ok(f) = std::fs::File::open(e.path())
            && rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).is_ok()
        {
            n += 1;
        }
    }
    n
}

fn main() {
    let args = parse_args();
    let size = args.object_mib << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let sources = 4usize;
    let arena = Arena::new(size * (sources + args.batch) as u64 + (1 << 20));
    let src: Vec<Allocation> = (0..sources)
        .map(|i| arena.put(&pattern(i as u32, size as usize)))
        .collect();
    let dst: Vec<Allocation> = (0..args.batch).map(|_| arena.alloc(size)).collect();
    let model = unique_model();
    let keys: Vec<ObjectKey> = (0..args.objects as u32).map(|i| key(&model, i)).collect();
    let bench = Bench {
        rt: &rt,
        arena: &arena,
        src,
        dst,
        keys,
        size,
        batch: args.batch.max(1),
    };
    println!(
        "l2 throughput: {} objects x {} MiB = {:.2} GB per pass, batches of {}",
        args.objects,
        args.object_mib,
        (size * args.objects as u64) as f64 / 1e9,
        args.batch
    );
    for adapter in &args.adapters {
        match adapter.as_str() {
            "mock" => {
                let b = MockBackend::new(MockConfig {
                    max_size_gb: 64.0,
                    mock_bandwidth_gb: 1e6,
                    eviction: None,
                });
                let s = bench.store(&b);
                let l = bench.load(&b);
                println!("mock: store {s:.2} GB/s, load {l:.2} GB/s");
            }
            "fs" => {
                let dir = match &args.fs_path {
                    Some(p) => tempfile::tempdir_in(p),
                    None => tempfile::tempdir(),
                }
                .expect("temp dir");
                let b = FsBackend::open(
                    FsConfig::new(dir.path().to_str().expect("utf-8")),
                    rt.handle(),
                )
                .expect("fs adapter");
                let s = bench.store(&*b);
                let dropped = drop_page_cache(dir.path());
                let cold = bench.load(&*b);
                let warm = bench.load(&*b);
                println!(
                    "fs ({}): store {s:.2} GB/s (fsync per object), load cold {cold:.2} GB/s \
                     ({dropped} files dropped from the page cache), load warm {warm:.2} GB/s",
                    dir.path().display()
                );
                rt.block_on(b.close());
            }
            "resp" => {
                let server = match args.redis_port {
                    Some(_) => None,
                    None => Some(RedisServer::start()),
                };
                let port = args
                    .redis_port
                    .or(server.as_ref().map(RedisServer::port))
                    .expect("port");
                let b: Arc<kvtier_storage::instrumented::Instrumented<RespBackend>> = rt
                    .block_on(RespBackend::open(
                        RespConfig::new("127.0.0.1", port),
                        rt.handle(),
                    ))
                    .expect("resp adapter");
                assert!(b.health().connected, "redis not reachable on port {port}");
                let s = bench.store(&*b);
                let l = bench.load(&*b);
                println!(
                    "resp (redis-server 127.0.0.1:{port}): store {s:.2} GB/s, load {l:.2} GB/s"
                );
                rt.block_on(b.close());
            }
            "valkey" => {
                let single = RedisServer::start();
                let cluster = RedisCluster::start(3);
                for (what, cfg) in [
                    (
                        "standalone redis-server".to_owned(),
                        ValkeyConfig::new(format!("127.0.0.1:{}", single.port()), false),
                    ),
                    (
                        "Redis Cluster, 3 masters + 3 replicas".to_owned(),
                        ValkeyConfig::new(cluster.startup_nodes(), true),
                    ),
                ] {
                    let b = rt
                        .block_on(ValkeyBackend::open(cfg, rt.handle()))
                        .expect("valkey adapter");
                    assert!(b.health().connected, "valkey not reachable ({what})");
                    let s = bench.store(&*b);
                    let l = bench.load(&*b);
                    println!("valkey ({what}): store {s:.2} GB/s, load {l:.2} GB/s");
                    rt.block_on(b.close());
                }
            }
            other => panic!("unknown adapter {other:?} (fs, resp, valkey, mock)"),
        }
    }
}
