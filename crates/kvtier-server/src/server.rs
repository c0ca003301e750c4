//! Wiring: builds the segment, L1, engine, front end, housekeeping thread and HTTP API, and
//! stops them in order.
//!
//! Start order: shared-memory segment (+ background prefault thread) → L1 manager → eviction
//! thread → L2 tier (adapters, store and prefetch controllers; only with `--l2-adapter`) → engine
//! → housekeeping thread → telemetry sampler → ZeroMQ front end → HTTP API. Shutdown runs the
//! reverse: stop RPC intake and drain in-flight requests (bounded) → stop HTTP → stop the
//! telemetry sampler → stop housekeeping → stop prefault → stop L2 (prefetch, then write-behind
//! flush with a deadline, then close adapters) → release every client lock and pending transfer →
//! stop eviction → unmap and unlink the segment.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvtier_core::hash::{HashAlgorithm, TokenHasher};
use kvtier_core::l1::controller::EvictionController;
use kvtier_core::l1::{EvictionConfig, L1Config, L1Manager};
use kvtier_core::shm::{ShmOptions, ShmSegment};
use kvtier_core::status::{StatusNode, StatusReport};
use kvtier_storage::{AdapterConfig, L2Tier, L2TierConfig};
use parking_lot::{Condvar, Mutex};
use serde::Serialize;

use crate::engine::{Engine, EngineConfig};
use crate::http::metrics::HttpStats;
use crate::http::{HttpConfig, HttpServer};
use crate::service::Service;
use crate::stats::RpcStats;
use crate::telemetry::{Telemetry, TelemetryConfig};
use crate::transport::{TransportConfig, ZmqFrontEnd};

/// Everything `kvtier serve` can be told. `Debug` and `Serialize` (what `GET /config` shows)
/// never reveal the HTTP auth token; durations serialise as `<name>_seconds` floats.
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    /// Address the ZeroMQ ROUTER binds.
    pub host: String,
    /// Port the ZeroMQ ROUTER binds (0 picks a free one).
    pub port: u16,
    /// Tokens per chunk.
    pub chunk_size: usize,
    /// Token hashing algorithm.
    pub hash_algorithm: String,
    /// L1 pool size in bytes.
    pub l1_size_bytes: u64,
    /// Object alignment in bytes.
    pub l1_align_bytes: u64,
    /// Eviction policy name.
    pub eviction_policy: String,
    /// Background eviction watermark.
    pub eviction_trigger_watermark: f64,
    /// Fraction of used bytes freed per background round.
    pub eviction_ratio: f64,
    /// Write-lock TTL.
    #[serde(rename = "l1_write_ttl_seconds", serialize_with = "as_seconds")]
    pub l1_write_ttl: Duration,
    /// Read-lock TTL.
    #[serde(rename = "l1_read_ttl_seconds", serialize_with = "as_seconds")]
    pub l1_read_ttl: Duration,
    /// Name of the shared-memory segment.
    pub shm_name: String,
    /// Populate the segment's pages in the background after start (commits the memory up front,
    /// saves engines the tmpfs allocation fault on first use of every page).
    pub l1_prefault: bool,
    /// Workers per pool.
    pub max_workers: usize,
    /// Session idle TTL.
    #[serde(rename = "session_ttl_seconds", serialize_with = "as_seconds")]
    pub session_ttl: Duration,
    /// Reap an engine instance this long after its last ping (0 disables).
    #[serde(rename = "worker_reap_timeout_seconds", serialize_with = "as_seconds")]
    pub worker_reap_timeout: Duration,
    /// Grace period before an instance's first ping.
    #[serde(
        rename = "worker_registration_grace_seconds",
        serialize_with = "as_seconds"
    )]
    pub worker_registration_grace: Duration,
    /// Shutdown drain bound.
    #[serde(rename = "drain_timeout_seconds", serialize_with = "as_seconds")]
    pub drain_timeout: Duration,
    /// HTTP admin API (`None` disables it).
    pub http: Option<HttpConfig>,
    /// L2 adapters in index order (`--l2-adapter`, repeatable); empty disables L2.
    pub l2_adapters: Vec<AdapterConfig>,
    /// L2 prefetch requests running at once (`--l2-prefetch-max-in-flight`).
    pub l2_prefetch_max_in_flight: usize,
    /// How long shutdown waits for the write-behind queue to drain.
    pub l2_flush_timeout: Duration,
    /// Test-only: mounts `POST /api/debug/fault` on the HTTP API, which makes a component fail
    /// as if it had crashed (see `dashboard`). Never enable it in production.
    pub fault_injection: bool,
}

impl Default for ServerConfig {
    /// The defaults of `kvtier serve` (shared-memory name for port 5555, HTTP on loopback:8000).
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 5555,
            chunk_size: 256,
            hash_algorithm: "blake3".into(),
            l1_size_bytes: 1 << 30,
            l1_align_bytes: 4096,
            eviction_policy: "LRU".into(),
            eviction_trigger_watermark: 0.8,
            eviction_ratio: 0.2,
            l1_write_ttl: Duration::from_secs(600),
            l1_read_ttl: Duration::from_secs(300),
            shm_name: "kvtier_l1_5555".into(),
            l1_prefault: true,
            max_workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            session_ttl: Duration::from_secs(600),
            worker_reap_timeout: Duration::from_secs(120),
            worker_registration_grace: Duration::from_secs(3600),
            drain_timeout: Duration::from_secs(5),
            http: Some(HttpConfig::local(8000)),
            l2_adapters: Vec::new(),
            l2_prefetch_max_in_flight: 8,
            l2_flush_timeout: Duration::from_secs(10),
            fault_injection: false,
        }
    }
}

fn as_seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The shared-memory segment could not be created.
    #[error(transparent)]
    Shm(#[from] kvtier_core::shm::ShmError),
    /// The front end could not start.
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    /// The HTTP API could not start (or its configuration is refused).
    #[error("http api: {0}")]
    Http(#[from] crate::http::HttpError),
    /// The L2 tier could not start.
    #[error("l2: {0}")]
    L2(#[from] kvtier_storage::error::ConfigError),
    /// A thread could not be spawned.
    #[error("spawning {what}: {source}")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

#[derive(Debug, Default)]
struct Stopper {
    stop: Mutex<bool>,
    cv: Condvar,
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    source: StatusSource,
    config: ServerConfig,
    engine: Arc<Engine>,
    rpc: Arc<RpcStats>,
    frontend: Arc<ZmqFrontEnd>,
    http: Option<HttpServer>,
    housekeeper: Mutex<Option<JoinHandle<()>>>,
    telemetry: Arc<Telemetry>,
    prefaulter: Mutex<Option<JoinHandle<()>>>,
    prefault: Arc<PrefaultProgress>,
    stopper: Arc<Stopper>,
    started: Instant,
}

/// Shared view for the HTTP API: builds the status tree on demand.
#[derive(Debug, Clone)]
pub struct StatusSource {
    inner: Arc<StatusParts>,
}

#[derive(Debug)]
struct StatusParts {
    engine: Arc<Engine>,
    rpc: Arc<RpcStats>,
    started: Instant,
    housekeeper_alive: Arc<AtomicBool>,
    config: ServerConfig,
    frontend: Arc<ZmqFrontEnd>,
    prefault: Arc<PrefaultProgress>,
    http: Arc<HttpStats>,
    telemetry: Arc<Telemetry>,
}

impl StatusSource {
    /// The whole status tree.
    pub fn status(&self) -> StatusNode {
        let p = &self.inner;
        let mut rpc = StatusNode::healthy();
        let mut unsupported = serde_json::Map::new();
        for (op, s) in p.rpc.iter() {
            let count = s.latency.count();
            if count == 0 {
                continue;
            }
            let un = s.unsupported.load(Relaxed);
            if un > 0 {
                unsupported.insert(op.name().to_owned(), un.into());
            }
            rpc = rpc.field(
                op.name(),
                serde_json::json!({
                    "count": count,
                    "ok": s.ok.load(Relaxed),
                    "malformed": s.malformed.load(Relaxed),
                    "unsupported": un,
                    "failed": s.failed.load(Relaxed),
                    "latency_p50_seconds": s.latency.quantile(0.5),
                    "latency_p99_seconds": s.latency.quantile(0.99),
                }),
            );
        }
        let hk_alive = p.housekeeper_alive.load(Relaxed);
        let mut root = p
            .engine
            .report_status()
            .child(
                "housekeeping",
                StatusNode::healthy()
                    .require(hk_alive, "housekeeping thread is not running")
                    .field("thread_alive", hk_alive)
                    .field("interval_seconds", 1.0),
            )
            .child("rpc", rpc)
            .field("unsupported_op_counts", unsupported);
        root = root.child("transport", p.frontend.report_status());
        root = root.child("l1_prefault", p.prefault.report(p.config.l1_prefault));
        if p.config.http.is_some() {
            root = root.child("http", p.http.report_status());
        }
        root = root.child("telemetry", p.telemetry.report_status());
        root.field("uptime_seconds", p.started.elapsed().as_secs_f64())
            .field("version", env!("CARGO_PKG_VERSION"))
    }

    /// The effective configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.inner.engine
    }

    /// Per-op statistics.
    pub fn rpc(&self) -> &Arc<RpcStats> {
        &self.inner.rpc
    }

    /// The ZeroMQ front end (transport counters).
    pub fn frontend(&self) -> &Arc<ZmqFrontEnd> {
        &self.inner.frontend
    }

    /// Time since the server started.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Counters and liveness of the HTTP API.
    pub fn http_stats(&self) -> &Arc<HttpStats> {
        &self.inner.http
    }

    /// The telemetry ring (the dashboard's time series).
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.inner.telemetry
    }
}

impl Server {
    /// Builds and starts every component. `runtime` hosts the HTTP API.
    pub fn start(
        config: ServerConfig,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Self, ServerError> {
        let started = Instant::now();
        if let Some(h) = &config.http {
            h.check_exposure().map_err(crate::http::HttpError::from)?;
        }
        let algorithm: HashAlgorithm = config
            .hash_algorithm
            .parse()
            .map_err(|e: kvtier_core::hash::HashError| ServerError::Config(e.to_string()))?;
        let hasher = TokenHasher::new(config.chunk_size, algorithm)
            .map_err(|e| ServerError::Config(format!("--chunk-size: {e}")))?;
        let policy = config.eviction_policy.parse().map_err(
            |e: kvtier_core::l1::eviction::UnknownPolicy| {
                ServerError::Config(format!("--eviction-policy: {e}"))
            },
        )?;
        let segment = Arc::new(ShmSegment::create(
            &config.shm_name,
            config.l1_size_bytes,
            ShmOptions::default(),
        )?);
        let prefault = Arc::new(PrefaultProgress::default());
        let prefaulter = if config.l1_prefault {
            Some(spawn_prefault(Arc::clone(&segment), Arc::clone(&prefault))?)
        } else {
            None
        };
        let l1 = Arc::new(L1Manager::new(L1Config {
            capacity_bytes: config.l1_size_bytes,
            align_bytes: config.l1_align_bytes,
            write_ttl: config.l1_write_ttl,
            read_ttl: config.l1_read_ttl,
            eviction: EvictionConfig {
                policy,
                trigger_watermark: config.eviction_trigger_watermark,
                eviction_ratio: config.eviction_ratio,
            },
        }));
        let evictor = EvictionController::spawn(Arc::clone(&l1), Duration::from_millis(100))
            .map_err(|e| ServerError::Spawn {
                what: "kvtier-l1-evict",
                source: e,
            })?;
        let l2 = if config.l2_adapters.is_empty() {
            None
        } else {
            let mut l2_cfg = L2TierConfig {
                adapters: config.l2_adapters.clone(),
                flush_timeout: config.l2_flush_timeout,
                ..L2TierConfig::default()
            };
            l2_cfg.prefetch.max_in_flight = config.l2_prefetch_max_in_flight.max(1);
            l2_cfg.prefetch.result_ttl = config.l1_read_ttl;
            Some(L2Tier::start(
                l2_cfg,
                Arc::clone(&l1),
                Arc::clone(&segment),
            )?)
        };
        let mut engine = Engine::new(
            EngineConfig {
                chunk_size: config.chunk_size,
                session_ttl: config.session_ttl,
                worker_reap_timeout: config.worker_reap_timeout,
                worker_registration_grace: config.worker_registration_grace,
            },
            hasher,
            l1,
            segment,
            evictor,
        );
        if let Some(l2) = l2 {
            engine = engine.with_l2(l2);
        }
        let engine = Arc::new(engine);
        let rpc = Arc::new(RpcStats::default());
        let stopper = Arc::new(Stopper::default());
        let housekeeper_alive = Arc::new(AtomicBool::new(true));
        let housekeeper = {
            let engine = Arc::clone(&engine);
            let stopper = Arc::clone(&stopper);
            let alive = Arc::clone(&housekeeper_alive);
            std::thread::Builder::new()
                .name("kvtier-housekeep".into())
                .spawn(move || {
                    struct Guard(Arc<AtomicBool>);
                    impl Drop for Guard {
                        fn drop(&mut self) {
                            self.0.store(false, Relaxed);
                        }
                    }
                    let _guard = Guard(alive);
                    loop {
                        {
                            let mut stop = stopper.stop.lock();
                            if !*stop {
                                stopper.cv.wait_for(&mut stop, Duration::from_secs(1));
                            }
                            if *stop {
                                return;
                            }
                        }
                        engine.housekeeping();
                    }
                })
                .map_err(|e| ServerError::Spawn {
                    what: "kvtier-housekeep",
                    source: e,
                })?
        };
        let telemetry = Arc::new(
            Telemetry::spawn(
                Arc::clone(&engine),
                Arc::clone(&rpc),
                TelemetryConfig::default(),
            )
            .map_err(|e| ServerError::Spawn {
                what: "kvtier-telemetry",
                source: e,
            })?,
        );
        let host = if config.host == "localhost" {
            "127.0.0.1"
        } else {
            config.host.as_str()
        };
        let frontend = Arc::new(ZmqFrontEnd::start(
            TransportConfig {
                bind: format!("tcp://{host}:{}", config.port),
                workers: config.max_workers,
                queue_capacity: 4096,
                drain_timeout: config.drain_timeout,
            },
            Arc::new(Service::new(Arc::clone(&engine), Arc::clone(&rpc))),
        )?);
        let source = StatusSource {
            inner: Arc::new(StatusParts {
                engine: Arc::clone(&engine),
                rpc: Arc::clone(&rpc),
                started,
                housekeeper_alive: Arc::clone(&housekeeper_alive),
                config: config.clone(),
                frontend: Arc::clone(&frontend),
                prefault: Arc::clone(&prefault),
                http: Arc::new(HttpStats::default()),
                telemetry: Arc::clone(&telemetry),
            }),
        };
        let http = match &config.http {
            Some(h) => Some(HttpServer::start(h.clone(), source.clone(), runtime)?),
            None => None,
        };
        let server = Self {
            source,
            config,
            engine,
            rpc,
            frontend,
            http,
            housekeeper: Mutex::new(Some(housekeeper)),
            telemetry,
            prefaulter: Mutex::new(prefaulter),
            prefault,
            stopper,
            started,
        };
        tracing::info!(
            rpc = server.frontend.endpoint(),
            http = server.http.as_ref().map(|h| h.local_addr().to_string()),
            shm = server.engine.segment().name(),
            l1_bytes = server.engine.l1().capacity_bytes(),
            l2_adapters = server.config.l2_adapters.len(),
            startup_ms = started.elapsed().as_secs_f64() * 1e3,
            "kvtier serving"
        );
        Ok(server)
    }

    /// The ZeroMQ endpoint actually bound.
    pub fn rpc_endpoint(&self) -> &str {
        self.frontend.endpoint()
    }

    /// The HTTP address actually bound.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().map(HttpServer::local_addr)
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// What the HTTP API serves: the status tree, configuration and counters.
    pub fn status_source(&self) -> &StatusSource {
        &self.source
    }

    /// Per-op statistics.
    pub fn rpc_stats(&self) -> &Arc<RpcStats> {
        &self.rpc
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The telemetry sampler and its ring.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops everything in order (see the module docs).
    pub fn shutdown(self) {
        tracing::info!("shutting down: stopping request intake");
        self.frontend.shutdown();
        if let Some(h) = &self.http {
            h.shutdown();
        }
        self.telemetry.stop();
        *self.stopper.stop.lock() = true;
        self.stopper.cv.notify_all();
        if let Some(h) = self.housekeeper.lock().take() {
            let _joined = h.join();
        }
        self.prefault.stop.store(true, Relaxed);
        if let Some(h) = self.prefaulter.lock().take() {
            let _joined = h.join();
        }
        self.engine.shutdown_l2();
        self.engine.release_all();
        self.engine.evictor().stop();
        tracing::info!("shutdown complete; removing the shared-memory segment");
    }
}

/// Progress of the background prefault of the L1 segment.
#[derive(Debug, Default)]
struct PrefaultProgress {
    done_bytes: std::sync::atomic::AtomicU64,
    total_bytes: std::sync::atomic::AtomicU64,
    alive: AtomicBool,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
}

impl PrefaultProgress {
    fn report(&self, enabled: bool) -> StatusNode {
        let error = self.error.lock().clone();
        // A failed prefault is not fatal (pages are then allocated on first use), but an
        // operator should see it: /dev/shm may be filling up.
        StatusNode::healthy()
            .require(error.is_none(), error.clone().unwrap_or_default())
            .field("enabled", enabled)
            .field("thread_alive", self.alive.load(Relaxed))
            .field("done_bytes", self.done_bytes.load(Relaxed))
            .field("total_bytes", self.total_bytes.load(Relaxed))
            .field("error", error)
    }
}

/// Populates the segment in 64 MiB pieces from offset 0 upward (the allocator hands out low
/// offsets first, so the pages engines touch first are warm first). Runs off the request path
/// and stops early on shutdown.
fn spawn_prefault(
    segment: Arc<ShmSegment>,
    progress: Arc<PrefaultProgress>,
) -> Result<JoinHandle<()>, ServerError> {
    const PIECE: usize = 64 << 20;
    progress.total_bytes.store(segment.len() as u64, Relaxed);
    progress.alive.store(true, Relaxed);
    std::thread::Builder::new()
        .name("kvtier-l1-prefault".into())
        .spawn(move || {
            let t = Instant::now();
            let mut off = 0usize;
            while off < segment.len() && !progress.stop.load(Relaxed) {
                let len = PIECE.min(segment.len() - off);
                if let Err(e) = segment.prefault_range(off, len) {
                    tracing::warn!(error = %e, "l1 prefault stopped; pages will be allocated on first use");
                    *progress.error.lock() = Some(e.to_string());
                    break;
                }
                off += len;
                progress.done_bytes.store(off as u64, Relaxed);
            }
            progress.alive.store(false, Relaxed);
            tracing::debug!(bytes = off, seconds = t.elapsed().as_secs_f64(), "l1 prefault finished");
        })
        .map_err(|e| ServerError::Spawn {
            what: "kvtier-l1-prefault",
            source: e,
        })
}
