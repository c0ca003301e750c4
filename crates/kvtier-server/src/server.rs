//! Wiring only: builds every component from the [`ServerConfig`] and stops them in order.
//!
//! Start order: shared-memory segment (+ background prefault task) → L1 manager → eviction
//! thread → L2 tier (adapters, store and prefetch controllers; only with `--l2-adapter`) →
//! hit-rate curve thread (unless `--hit-rate-curve off`) → lookup log writer (with
//! `--lookup-log-dir`) → engine (both attached as its lookup observer) → KV-event publisher
//! (only with `--kv-events-publisher`; its L2 listener is given to the L2 tier when that
//! starts) → housekeeping thread → telemetry sampler → ZeroMQ front end (ZAP handler first
//! with `--rpc-allow`, then the ROUTER) → HTTP API.
//!
//! Shutdown runs the reverse: stop RPC intake and drain in-flight requests (bounded), close the
//! ROUTER, then stop the ZAP handler → stop
//! HTTP → stop the telemetry sampler → stop the hit-rate curve → stop the lookup log (it writes
//! what is still queued) → stop housekeeping → stop prefault → stop L2 (prefetch,
//! then write-behind flush with a deadline, then close adapters) → release every client lock
//! and pending transfer → let the KV-event publisher send the resulting removals (bounded) and
//! stop it → stop eviction → unmap and unlink the segment (when the last `Arc` of
//! it drops).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier_core::hash::TokenHasher;
use kvtier_core::l1::controller::EvictionController;
use kvtier_core::l1::{EvictionConfig, L1Config, L1Manager};
use kvtier_core::periodic::PeriodicThread;
use kvtier_core::shm::{ShmOptions, ShmSegment};
use kvtier_storage::{AdapterConfig, L2Listener, L2Tier, L2TierConfig};

use crate::analysis::LookupObserver;
use crate::analysis::hit_curve::HitCurve;
use crate::analysis::lookup_log::LookupLog;
pub use crate::config::ServerConfig;
use crate::engine::kv_events::{KvEventPublisher, PublisherError, l2_medium_names};
use crate::engine::{Engine, EngineConfig};
use crate::http::HttpServer;
use crate::http::metrics::HttpStats;
use crate::prefault::Prefault;
use crate::service::Service;
use crate::stats::RpcStats;
use crate::status::StatusParts;
pub use crate::status::StatusSource;
use crate::telemetry::Telemetry;
use crate::transport::{TransportConfig, ZmqFrontEnd};

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
    /// The KV-event publisher could not start.
    #[error("kv events: {0}")]
    KvEvents(#[from] PublisherError),
    /// The lookup log could not start.
    #[error(transparent)]
    LookupLog(#[from] crate::analysis::lookup_log::LookupLogError),
    /// A thread could not be spawned.
    #[error("spawning {what}: {source}")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

fn spawn_err(what: &'static str) -> impl FnOnce(std::io::Error) -> ServerError {
    move |source| ServerError::Spawn { what, source }
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    source: StatusSource,
    http: Option<HttpServer>,
}

impl Server {
    /// Builds and starts every component. `runtime` hosts the HTTP API.
    ///
    /// # Errors
    /// [`ServerError`] naming the setting or component that failed; whatever had started is
    /// stopped again (dropped) before returning.
    pub fn start(
        config: ServerConfig,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Self, ServerError> {
        let started = Instant::now();
        if let Some(h) = &config.http {
            h.check_exposure().map_err(crate::http::HttpError::from)?;
        }
        let hasher = TokenHasher::new(config.engine.chunk_size, config.engine.hash_algorithm)
            .map_err(|e| ServerError::Config(format!("--chunk-size: {e}")))?;
        let segment = Arc::new(ShmSegment::create(
            &config.l1.shm_name,
            config.l1.size_bytes,
            ShmOptions::default(),
        )?);
        let prefault = Arc::new(
            Prefault::start(
                Arc::clone(&segment),
                config.l1.prefault,
                config.l1.prefault_limit,
            )
            .map_err(spawn_err("kvtier-l1-prefault"))?,
        );
        let quarantine = config.l1.write_quarantine_fraction.clamp(0.0, 1.0);
        let l1 = Arc::new(L1Manager::new(L1Config {
            capacity_bytes: config.l1.size_bytes,
            quarantine_budget_bytes: (config.l1.size_bytes as f64 * quarantine) as u64,
            align_bytes: config.l1.align_bytes,
            write_ttl: config.l1.write_ttl,
            read_ttl: config.l1.read_ttl,
            eviction: EvictionConfig {
                policy: config.l1.eviction_policy,
                trigger_watermark: config.l1.eviction_trigger_watermark,
                eviction_ratio: config.l1.eviction_ratio,
            },
        }));
        let evictor = EvictionController::spawn(Arc::clone(&l1), config.l1.eviction_interval)
            .map_err(spawn_err("kvtier-l1-evict"))?;
        let mut engine = Engine::new(
            EngineConfig {
                chunk_size: config.engine.chunk_size,
                session_ttl: config.engine.session_ttl,
                max_sessions: config.engine.max_sessions,
                worker_reap_timeout: config.engine.worker_reap_timeout,
                worker_registration_grace: config.engine.worker_registration_grace,
                kv_event_log_size: config.engine.kv_event_log_size,
                lookup_records: config.engine.lookup_records,
                miss_history_chunks: config.engine.miss_history_chunks,
            },
            hasher,
            Arc::clone(&l1),
            Arc::clone(&segment),
            evictor,
        );
        let publish = config.engine.kv_events_publisher.clone();
        if publish.is_some() {
            engine.kv_events().enable_l2_records(l2_medium_names(
                config.l2.adapters.iter().map(AdapterConfig::kind),
            ));
        }
        if !config.l2.adapters.is_empty() {
            let mut l2_cfg = L2TierConfig {
                adapters: config.l2.adapters.clone(),
                flush_timeout: config.l2.flush_timeout,
                stuck_after: config.l2.stuck_after,
                listener: publish
                    .is_some()
                    .then(|| Arc::clone(engine.kv_events()) as Arc<dyn L2Listener>),
                ..L2TierConfig::default()
            };
            l2_cfg.prefetch.max_in_flight = config.l2.prefetch_max_in_flight.max(1);
            l2_cfg.prefetch.result_ttl = config.l1.read_ttl;
            engine = engine.with_l2(L2Tier::start(l2_cfg, l1, Arc::clone(&segment))?);
        }
        let hit_curve = Arc::new(
            HitCurve::start(config.analysis.curve, Arc::clone(engine.l1()))
                .map_err(spawn_err("kvtier-hit-curve"))?,
        );
        let lookup_log = match &config.analysis.lookup_log {
            Some(cfg) => Some(Arc::new(LookupLog::start(cfg.clone())?)),
            None => None,
        };
        let observer = LookupObserver::new(
            Arc::clone(&hit_curve),
            lookup_log.clone(),
            Arc::clone(engine.l1()),
        );
        let engine = Arc::new(
            engine
                .with_lookup_observer(observer)
                .with_memory_release(config.release_memory),
        );
        if let Some(cfg) = publish {
            KvEventPublisher::start(cfg, engine.kv_events(), &config.instance_id)?;
        }
        let rpc = Arc::new(RpcStats::default());
        let token_arrays = Arc::new(kvtier_proto::TokenArrays::new(
            config.rpc.token_array_cache_bytes,
            crate::config::TOKEN_ARRAY_CACHE_ENTRIES,
        ));
        let housekeeper = {
            let engine = Arc::clone(&engine);
            Arc::new(
                PeriodicThread::builder("kvtier-housekeep")
                    .essential()
                    .interval(config.engine.housekeeping_interval)
                    .description("housekeeping thread")
                    .spawn(move || {
                        engine.housekeeping();
                        Ok(())
                    })
                    .map_err(spawn_err("kvtier-housekeep"))?,
            )
        };
        let telemetry = Arc::new(
            Telemetry::spawn(Arc::clone(&engine), Arc::clone(&rpc), config.telemetry)
                .map_err(spawn_err("kvtier-telemetry"))?,
        );
        let host = if config.rpc.host == "localhost" {
            "127.0.0.1"
        } else {
            config.rpc.host.as_str()
        };
        let frontend = Arc::new(ZmqFrontEnd::start(
            TransportConfig {
                bind: format!("tcp://{host}:{}", config.rpc.port),
                host: config.rpc.host.clone(),
                allow: config.rpc.allow.clone(),
                max_message_bytes: config.rpc.max_message_bytes,
                workers: config
                    .rpc
                    .max_transfer_workers
                    .unwrap_or(config.rpc.max_workers),
                normal_workers: config
                    .rpc
                    .max_normal_workers
                    .unwrap_or(config.rpc.max_workers),
                queue_capacity: config.rpc.queue_capacity,
                drain_timeout: config.rpc.drain_timeout,
            },
            Arc::new(Service::new(
                Arc::clone(&engine),
                Arc::clone(&rpc),
                Arc::clone(&token_arrays),
            )),
        )?);
        let source = StatusSource {
            inner: Arc::new(StatusParts {
                engine,
                rpc,
                token_arrays: crate::stats::TokenArrayMetrics(token_arrays),
                started,
                housekeeper,
                config,
                frontend,
                prefault,
                http: Arc::new(HttpStats::default()),
                telemetry,
                hit_curve,
                lookup_log,
            }),
        };
        let http = match &source.config().http {
            Some(h) => Some(HttpServer::start(h.clone(), source.clone(), runtime)?),
            None => None,
        };
        let server = Self { source, http };
        tracing::info!(
            rpc = server.rpc_endpoint(),
            http = server.http_addr().map(|a| a.to_string()),
            shm = server.engine().segment().name(),
            l1_bytes = server.engine().l1().capacity_bytes(),
            l2_adapters = server.config().l2.adapters.len(),
            startup_ms = started.elapsed().as_secs_f64() * 1e3,
            "kvtier serving"
        );
        Ok(server)
    }

    /// The ZeroMQ endpoint actually bound.
    pub fn rpc_endpoint(&self) -> &str {
        self.source.frontend().endpoint()
    }

    /// The HTTP address actually bound.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().map(HttpServer::local_addr)
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        self.source.engine()
    }

    /// What the HTTP API serves: the status tree, configuration and counters.
    pub fn status_source(&self) -> &StatusSource {
        &self.source
    }

    /// Per-op statistics.
    pub fn rpc_stats(&self) -> &Arc<RpcStats> {
        self.source.rpc()
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        self.source.config()
    }

    /// The telemetry sampler and its ring.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        self.source.telemetry()
    }

    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.source.uptime()
    }

    /// Stops everything in order (see the module docs).
    pub fn shutdown(self) {
        let p = &self.source.inner;
        tracing::info!("shutting down: stopping request intake");
        p.frontend.shutdown();
        if let Some(h) = &self.http {
            h.shutdown();
        }
        p.telemetry.stop();
        p.hit_curve.stop();
        if let Some(log) = &p.lookup_log {
            log.stop();
        }
        p.housekeeper.stop();
        p.prefault.stop();
        p.engine.shutdown_l2();
        p.engine.release_all();
        if let Some(publisher) = p.engine.kv_events().publisher() {
            // Routers hear the final removals before the sockets close.
            publisher.drain(p.engine.kv_events(), Duration::from_millis(500));
            publisher.stop();
        }
        p.engine.evictor().stop();
        tracing::info!("shutdown complete; removing the shared-memory segment");
    }
}
