//! `kvtier serve`: flags, validation and the process lifecycle (signals, ordered shutdown).
//!
//! Every `lmcache server` 0.5.6 flag is accepted: kvtier's own flags below carry LMCache's names
//! and defaults, and [`compat`] holds the rest (mapped, accepted without effect, or refused).
//! A refused or invalid flag exits 2 with a message naming it, like a command-line error.

mod compat;
mod kv_events;
mod process;
mod values;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use kvtier_server::analysis::hit_curve::HitCurveConfig;
use kvtier_server::analysis::lookup_log::LookupLogConfig;
use kvtier_server::config::{
    AnalysisSettings, EngineSettings, L1Settings, L2Settings, RpcSettings,
};
use kvtier_server::http::{AuthToken, HttpConfig};
use kvtier_server::{Server, ServerConfig};

use process::{init_logging, release_memory};
use values::{fraction, fraction_or_zero, parse_allow, parse_on_off, parse_token, seconds};

/// Flags of `kvtier serve`. Names and defaults follow `lmcache server` where it has the flag;
/// every flag can also be set through the environment variable shown.
#[derive(Debug, Args)]
#[command(next_line_help = false)]
pub struct ServeArgs {
    /// Address the ZeroMQ RPC socket binds ("localhost" means 127.0.0.1). The RPC protocol has
    /// no authentication: any peer that reaches the port can clear the cache, fill it with
    /// reservations and make the server map /dev/shm segments. A non-loopback address (e.g.
    /// 0.0.0.0) is accepted, as by `lmcache server`, but without --rpc-allow the server logs a
    /// warning at start and /api/status reports `transport.access.open_to_any_peer: true`.
    #[arg(long, env = "KVTIER_HOST", default_value = "127.0.0.1")]
    host: String,

    /// Only peers in these networks may connect to the RPC port, e.g. `--rpc-allow
    /// 10.0.0.0/8,127.0.0.1` (comma-separated, repeatable; IPv4 or IPv6; a bare address is one
    /// host). Enforced during the ZeroMQ handshake by a ZAP handler, so LMCache clients need no
    /// change; a refused peer gets no reply and is counted
    /// (`transport.access.peers_refused_total`). Default: no filter.
    #[arg(
        long,
        env = "KVTIER_RPC_ALLOW",
        value_name = "CIDR[,CIDR...]",
        value_parser = parse_allow
    )]
    rpc_allow: Vec<Vec<kvtier_server::transport::access::Cidr>>,

    /// Memory for recently decoded request token arrays, in MiB. Every LMCache op carries the
    /// request's whole token list; an op whose list is byte-for-byte one seen recently (the
    /// lookup, retrieve and store of one request) reuses the decoded ids instead of decoding
    /// them again, and a list that extends a recent one decodes only the new tokens. 4 bytes
    /// per cached token, at most 16 lists. 0 disables the cache.
    #[arg(long, env = "KVTIER_TOKEN_ARRAY_CACHE_MIB", value_name = "MIB", default_value_t = kvtier_server::config::DEFAULT_TOKEN_ARRAY_CACHE_MIB)]
    token_array_cache_mib: usize,

    /// Largest RPC message accepted, in bytes. A single frame larger than this makes the server
    /// drop the sender's connection before reading it (no reply; counted in
    /// `transport.peer_disconnects_total`); a request whose frames together exceed it is
    /// answered at once with its failure value (`transport.oversized_rejected_total`). The
    /// default, 64 MiB, is far above what LMCache clients send (a lookup of a 10M-token context
    /// is about 50 MB).
    #[arg(long, env = "KVTIER_MAX_MESSAGE_BYTES", default_value_t = kvtier_server::transport::DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,

    /// Port of the ZeroMQ RPC socket (LMCache clients connect to tcp://HOST:PORT).
    #[arg(long, env = "KVTIER_PORT", default_value_t = 5555)]
    port: u16,

    /// Tokens per chunk; must match the engines' `get_chunk_size` expectation (a multiple of
    /// the engine's block size).
    #[arg(long, env = "KVTIER_CHUNK_SIZE", default_value_t = 256)]
    chunk_size: usize,

    /// Token hash algorithm. Only `blake3` is supported: it is the one LMCache computes
    /// identically in every process.
    #[arg(long, env = "KVTIER_HASH_ALGORITHM", default_value = "blake3")]
    hash_algorithm: String,

    /// L1 size in GiB: the size of the shared-memory segment that holds the cache
    /// (`--l1-size` is accepted too). /dev/shm must have this much free space.
    #[arg(
        long,
        visible_alias = "l1-size",
        env = "KVTIER_L1_SIZE_GB",
        default_value_t = 1.0
    )]
    l1_size_gb: f64,

    /// Alignment of every cached object in bytes (a power of two, at least 4096 recommended).
    #[arg(long, env = "KVTIER_L1_ALIGN_BYTES", default_value_t = 4096)]
    l1_align_bytes: u64,

    /// Allocate and zero the segment's pages in a background thread right after start-up (the
    /// full L1 size of RAM, or --l1-init-size-gb). This reserves the memory up front: a full
    /// /dev/shm then fails the prefault, visibly in the status tree, instead of an engine's
    /// write with SIGBUS later. Off by default, because pages allocated in bulk by the server
    /// took the engines' later writes 1.6-1.95x as long as pages allocated by the engine's own
    /// first write (measured with LMCache's client; docs/performance.md), and a server-side
    /// first touch places the pages on the server's NUMA node rather than the engine's.
    #[arg(long, env = "KVTIER_L1_PREFAULT", overrides_with = "no_l1_prefault")]
    l1_prefault: bool,

    /// The default: each page of the segment is allocated by the first write into it (as in
    /// LMCache). Overrides --l1-prefault and --l1-init-size-gb.
    #[arg(long, env = "KVTIER_NO_L1_PREFAULT", overrides_with = "l1_prefault")]
    no_l1_prefault: bool,

    /// L1 eviction policy: LRU, ARC, IsolatedLRU, S3FIFO or noop (case-insensitive).
    #[arg(long, env = "KVTIER_EVICTION_POLICY", default_value = "LRU")]
    eviction_policy: String,

    /// Background eviction starts when L1 usage reaches this fraction (0 < x <= 1).
    #[arg(long, env = "KVTIER_EVICTION_TRIGGER_WATERMARK", default_value_t = 0.8)]
    eviction_trigger_watermark: f64,

    /// Fraction of the used bytes each background eviction round frees (0 < x <= 1).
    #[arg(long, env = "KVTIER_EVICTION_RATIO", default_value_t = 0.2)]
    eviction_ratio: f64,

    /// Seconds a store reservation may stay uncommitted before it is discarded.
    #[arg(long, env = "KVTIER_L1_WRITE_TTL_SECONDS", default_value_t = 600.0)]
    l1_write_ttl_seconds: f64,

    /// Fraction of L1 (0 <= x <= 1) that store reservations past their write TTL may keep
    /// holding until their writer commits or aborts, or its instance is unregistered or
    /// reaped. The key is free for other writers at once, but the memory is not handed to
    /// another store, so a late writer cannot overwrite someone else's chunk (LMCache reuses
    /// the memory at once). Past this budget the oldest reservations are freed and counted in
    /// kvtier_l1_quarantine_forced_reuses_total; 0 frees them at expiry.
    #[arg(
        long,
        env = "KVTIER_L1_WRITE_QUARANTINE_FRACTION",
        default_value_t = 0.1
    )]
    l1_write_quarantine_fraction: f64,

    /// Seconds a read lock (lookup or retrieve) lives without being refreshed.
    #[arg(long, env = "KVTIER_L1_READ_TTL_SECONDS", default_value_t = 300.0)]
    l1_read_ttl_seconds: f64,

    /// Name of the POSIX shared-memory segment (/dev/shm/NAME) engines map
    /// [default: kvtier_l1_<PORT>].
    #[arg(long, env = "KVTIER_SHM_NAME")]
    shm_name: Option<String>,

    /// Worker threads per pool (one pool for transfers with per-client affinity, one for the
    /// other operations; --max-gpu-workers / --max-cpu-workers set each pool) [default: number
    /// of CPUs].
    #[arg(long, env = "KVTIER_MAX_WORKERS")]
    max_workers: Option<usize>,

    /// Seconds an idle request session (and the lookup locks it holds) survives without an
    /// end_session.
    #[arg(long, env = "KVTIER_SESSION_TTL_SECONDS", default_value_t = 600.0)]
    session_ttl_seconds: f64,

    /// Most request sessions kept at once (one per request id between its first lookup or
    /// store and its end_session or TTL). Creating one more evicts the least recently used idle
    /// session, releasing its lookup locks (counted as sessions evicted_total). A session costs
    /// under 1 KiB plus 48 bytes per 256-token chunk of its request, so the default bounds the
    /// table to about 64 MB for ordinary requests; it should exceed the requests the engines
    /// keep in flight (running + waiting) by a wide margin.
    #[arg(long, env = "KVTIER_MAX_SESSIONS", default_value_t = kvtier_server::engine::session::DEFAULT_MAX_SESSIONS)]
    max_sessions: usize,

    /// KV-event records kept for replay to `subscribe_kv_events` subscribers (LMCache's flag;
    /// KV-aware routers learn what the host cache holds from them). 0 disables KV events.
    #[arg(long, env = "KVTIER_KV_EVENT_LOG_SIZE", default_value_t = 32768)]
    kv_event_log_size: usize,

    /// Recent lookups kept with the reason each prefix ended where it did (`GET /api/lookups`,
    /// `kvtier explain REQUEST_ID`, `kvtier_lookup_misses_total{reason}`). A record takes
    /// about 250 bytes (at most about 2 KiB with 256-character ids). 0 disables lookup
    /// records, miss reasons and the chunk history.
    #[arg(long, env = "KVTIER_LOOKUP_RECORDS", default_value_t = kvtier_server::engine::explain::DEFAULT_RECORDS)]
    lookup_records: usize,

    /// Chunks whose last L1 event (stored, evicted and why, deleted, cleared, discarded) is
    /// remembered to explain misses: a fixed table of 16 bytes per chunk, allocated at start
    /// (rounded up to a power of two; the default is 4 MiB). A miss on a chunk older than the
    /// table's memory is reported as "never stored".
    #[arg(long, env = "KVTIER_MISS_HISTORY_CHUNKS", default_value_t = kvtier_server::engine::explain::history::DEFAULT_SLOTS)]
    miss_history_chunks: usize,

    /// Unregister an engine instance this many seconds after its last ping, releasing what it
    /// holds (0 disables; otherwise at least 30).
    #[arg(
        long,
        env = "KVTIER_WORKER_REAP_TIMEOUT_SECONDS",
        default_value_t = 120.0
    )]
    worker_reap_timeout_seconds: f64,

    /// Seconds an instance that never pinged is kept.
    #[arg(
        long,
        env = "KVTIER_WORKER_REGISTRATION_GRACE_SECONDS",
        default_value_t = 3600.0
    )]
    worker_registration_grace_seconds: f64,

    /// Seconds shutdown waits for in-flight requests before exiting.
    #[arg(long, env = "KVTIER_DRAIN_TIMEOUT_SECONDS", default_value_t = 5.0)]
    drain_timeout_seconds: f64,

    /// Address of the HTTP admin API (status tree, health check, Prometheus metrics, config,
    /// cache clearing). A non-loopback address needs --http-auth-token, or --http-insecure.
    #[arg(long, env = "KVTIER_HTTP_HOST", default_value = "127.0.0.1")]
    http_host: String,

    /// Port of the HTTP admin API (0 picks a free one; 8080 like `lmcache server`).
    #[arg(long, env = "KVTIER_HTTP_PORT", default_value_t = 8080)]
    http_port: u16,

    /// Do not start the HTTP admin API.
    #[arg(long, env = "KVTIER_NO_HTTP")]
    no_http: bool,

    /// Bearer token the HTTP admin API requires on every route except /api/healthcheck and
    /// /healthcheck (clients send `Authorization: Bearer <token>`). Prefer the environment
    /// variable: a flag is visible in the process list. Never shown by /config or in logs.
    #[arg(
        long,
        env = "KVTIER_HTTP_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        value_parser = parse_token
    )]
    http_auth_token: Option<AuthToken>,

    /// Allow a non-loopback --http-host without --http-auth-token (anyone who can reach the
    /// port can then read the status and clear the cache).
    #[arg(long, env = "KVTIER_HTTP_INSECURE")]
    http_insecure: bool,

    /// Test-only: mounts `POST /api/debug/fault` on the HTTP API, which makes a component fail
    /// as if it had crashed (used by the dashboard's end-to-end test). Hidden from --help;
    /// never enable it in production.
    #[arg(long, hide = true)]
    enable_fault_injection: bool,

    /// An L2 adapter as LMCache JSON, repeatable (index order = order given). Types: `mock`
    /// {max_size_gb, mock_bandwidth_gb}, `fs` {base_path, max_capacity_gb?, relative_tmp_dir?,
    /// num_workers?}, `resp` {host, port, username?, password?, key_prefix?, max_capacity_gb?,
    /// num_workers?}, `valkey` {startup_nodes: "host:port[,host:port...]", cluster_mode?,
    /// username?, password?, key_prefix?, tls_enable?, tls_ca_file?, tls_client_cert_file?,
    /// tls_client_key_file?, database_id?, request_timeout?, connection_timeout?,
    /// max_capacity_gb?, ttl_seconds?, num_workers?}; each may add "eviction": {"eviction_policy": "LRU"|"ARC"|"IsolatedLRU"|"noop" (LMCache's
    /// names) or "S3FIFO"|"FIFO" (kvtier's), "trigger_watermark": 0.8,
    /// "eviction_ratio": 0.2}. Example: --l2-adapter '{"type":"fs","base_path":"/var/cache/kvtier"}'
    /// (The environment variable sets one adapter.)
    #[arg(long = "l2-adapter", value_name = "JSON", env = "KVTIER_L2_ADAPTER")]
    l2_adapter: Vec<String>,

    /// L2 prefetch requests loading at once; further lookups wait in a FIFO.
    #[arg(long, env = "KVTIER_L2_PREFETCH_MAX_IN_FLIGHT", default_value_t = 8)]
    l2_prefetch_max_in_flight: usize,

    /// Seconds shutdown waits for queued L2 write-behind stores.
    #[arg(long, env = "KVTIER_L2_FLUSH_TIMEOUT_SECONDS", default_value_t = 10.0)]
    l2_flush_timeout_seconds: f64,

    /// Seconds an L2 operation (lookup, load, store, delete) may stay in flight before its
    /// adapter is reported unhealthy ("oldest store in flight 41.2 s"): a hung Redis or a frozen
    /// disk that never answers [default: the adapter's request_timeout + 5 s for valkey, else
    /// 30].
    #[arg(long, env = "KVTIER_L2_STUCK_OP_SECONDS")]
    l2_stuck_op_seconds: Option<f64>,

    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `kvtier_server=debug`); RUST_LOG
    /// overrides it. `GET /loglevel` shows it and `POST /loglevel?level=debug` changes it at run
    /// time.
    #[arg(long, env = "KVTIER_LOG", default_value = "info")]
    log: String,

    /// The live hit-rate curve (`GET /api/hit-rate-curve`, status node `hit_rate_curve`, the
    /// dashboard's "Hit rate vs cache size" chart): estimates from the lookups what hit rate L1
    /// would have at 0.25x to 8x its size (SHARDS sampling: a hash compare per chunk on the
    /// request path, bounded memory; see docs/hit-rate-curve.md). `off` skips the sampling
    /// and its thread.
    #[arg(long, env = "KVTIER_HIT_RATE_CURVE", value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    hit_rate_curve: bool,

    /// Most objects the hit-rate curve tracks (its memory bound: about 100 bytes each; the
    /// sampling rate falls as the workload's distinct chunks exceed it). More samples, less
    /// noise.
    #[arg(long, env = "KVTIER_HIT_RATE_CURVE_SAMPLES", default_value_t = 8192)]
    hit_rate_curve_samples: usize,

    /// Write every lookup (time, cache_salt, model, chunk hashes, chunk size) to binary
    /// `*.kvtlog` files in this directory, for `kvtier simulate`. Written by a background
    /// thread from a bounded queue: a lookup never waits for the disk (a full queue drops
    /// records and counts them, status node `lookup_log`). Off by default.
    #[arg(long, env = "KVTIER_LOOKUP_LOG_DIR", value_name = "DIR")]
    lookup_log_dir: Option<std::path::PathBuf>,

    /// Bound on the lookup log directory's *.kvtlog files together: past it the oldest files
    /// are deleted (files already there count). Sizes like 4096, 512MiB, 1GB (binary units).
    #[arg(long, env = "KVTIER_LOOKUP_LOG_MAX_BYTES", value_name = "SIZE", default_value = "1GiB", value_parser = crate::size::parse_size)]
    lookup_log_max_bytes: u64,

    /// Size at which the lookup log closes its current file and starts a new one (at most
    /// --lookup-log-max-bytes).
    #[arg(long, env = "KVTIER_LOOKUP_LOG_FILE_BYTES", value_name = "SIZE", default_value = "64MiB", value_parser = crate::size::parse_size)]
    lookup_log_file_bytes: u64,

    #[command(flatten)]
    kv_events: kv_events::KvEventsArgs,

    #[command(flatten)]
    lmcache: compat::LmcacheArgs,
}

/// What `into_config` hands to `run` besides the configuration.
struct Extras {
    log: String,
    notes: Vec<compat::Note>,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<(ServerConfig, Extras)> {
        let notes = self.lmcache.resolve()?;
        if self.chunk_size == 0 || self.chunk_size > 1 << 20 {
            bail!(
                "--chunk-size must be between 1 and 1048576 tokens, got {}",
                self.chunk_size
            );
        }
        if !(self.l1_size_gb.is_finite() && self.l1_size_gb > 0.0) {
            bail!(
                "--l1-size-gb must be a positive number of GiB, got {}",
                self.l1_size_gb
            );
        }
        let l1_size_bytes = (self.l1_size_gb * (1u64 << 30) as f64) as u64;
        if !self.l1_align_bytes.is_power_of_two() {
            bail!(
                "--l1-align-bytes must be a power of two, got {}",
                self.l1_align_bytes
            );
        }
        if l1_size_bytes < self.l1_align_bytes {
            bail!(
                "--l1-size-gb {} is smaller than one aligned object",
                self.l1_size_gb
            );
        }
        let eviction_policy = self
            .eviction_policy
            .parse::<kvtier_core::l1::EvictionPolicyKind>()
            .map_err(|e| anyhow::anyhow!("--eviction-policy: {e}"))?;
        let hash_algorithm = self
            .hash_algorithm
            .parse::<kvtier_core::hash::HashAlgorithm>()
            .map_err(|e| anyhow::anyhow!("--hash-algorithm: {e}"))?;
        let reap = seconds(
            "worker-reap-timeout-seconds",
            self.worker_reap_timeout_seconds,
            true,
        )?;
        if !reap.is_zero() && reap < Duration::from_secs(30) {
            bail!(
                "--worker-reap-timeout-seconds must be 0 (disabled) or at least 30, got {}",
                self.worker_reap_timeout_seconds
            );
        }
        let pool = |flag: &str, n: Option<usize>| match n {
            Some(0) => bail!("--{flag} must be at least 1"),
            Some(n) if n > 1024 => bail!("--{flag} must be at most 1024, got {n}"),
            n => Ok(n),
        };
        let workers = pool("max-workers", self.max_workers)?
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        let max_transfer_workers = pool("max-gpu-workers", self.lmcache.max_gpu_workers)?;
        let max_normal_workers = pool("max-cpu-workers", self.lmcache.max_cpu_workers)?;
        let instance_id = match self.lmcache.instance_id {
            Some(id) if id.trim().is_empty() => bail!("--instance-id must not be empty"),
            Some(id) if id.len() > 256 || id.chars().any(char::is_control) => {
                bail!("--instance-id must be at most 256 printable characters")
            }
            Some(id) => id,
            None => kvtier_server::config::new_instance_id(),
        };
        let mut l2_adapters = Vec::with_capacity(self.l2_adapter.len());
        for (i, json) in self.l2_adapter.iter().enumerate() {
            let cfg = kvtier_storage::parse_adapter_json(json)
                .map_err(|e| anyhow::anyhow!("--l2-adapter #{i}: {e}"))?;
            l2_adapters.push(cfg);
        }
        if !(1..=1024).contains(&self.l2_prefetch_max_in_flight) {
            bail!(
                "--l2-prefetch-max-in-flight must be between 1 and 1024, got {}",
                self.l2_prefetch_max_in_flight
            );
        }
        if !(4096..=1 << 30).contains(&self.max_message_bytes) {
            bail!(
                "--max-message-bytes must be between 4096 and 1073741824, got {}",
                self.max_message_bytes
            );
        }
        if !(1..=1 << 24).contains(&self.max_sessions) {
            bail!(
                "--max-sessions must be between 1 and 16777216, got {}",
                self.max_sessions
            );
        }
        if !(16..=1 << 24).contains(&self.hit_rate_curve_samples) {
            bail!(
                "--hit-rate-curve-samples must be between 16 and 16777216, got {}",
                self.hit_rate_curve_samples
            );
        }
        if self.lookup_log_file_bytes > self.lookup_log_max_bytes {
            bail!(
                "--lookup-log-file-bytes ({}) must not exceed --lookup-log-max-bytes ({})",
                self.lookup_log_file_bytes,
                self.lookup_log_max_bytes
            );
        }
        let shm_name = self
            .shm_name
            .unwrap_or_else(|| format!("kvtier_l1_{}", self.port));
        let defaults = ServerConfig::default();
        let cfg = ServerConfig {
            rpc: RpcSettings {
                host: self.host,
                port: self.port,
                max_workers: workers,
                max_transfer_workers,
                max_normal_workers,
                drain_timeout: seconds("drain-timeout-seconds", self.drain_timeout_seconds, true)?,
                max_message_bytes: self.max_message_bytes,
                allow: self.rpc_allow.into_iter().flatten().collect(),
                token_array_cache_bytes: self
                    .token_array_cache_mib
                    .checked_mul(1 << 20)
                    .context("--token-array-cache-mib is too large")?,
                ..defaults.rpc
            },
            l1: L1Settings {
                size_bytes: l1_size_bytes,
                align_bytes: self.l1_align_bytes,
                eviction_policy,
                eviction_trigger_watermark: fraction(
                    "eviction-trigger-watermark",
                    self.eviction_trigger_watermark,
                )?,
                eviction_ratio: fraction("eviction-ratio", self.eviction_ratio)?,
                write_ttl: seconds("l1-write-ttl-seconds", self.l1_write_ttl_seconds, false)?,
                write_quarantine_fraction: fraction_or_zero(
                    "l1-write-quarantine-fraction",
                    self.l1_write_quarantine_fraction,
                )?,
                read_ttl: seconds("l1-read-ttl-seconds", self.l1_read_ttl_seconds, false)?,
                shm_name,
                prefault: !self.no_l1_prefault
                    && (self.l1_prefault || self.lmcache.l1_init_size_gb.is_some()),
                prefault_limit: self
                    .lmcache
                    .l1_init_size_gb
                    .map(|g| g.saturating_mul(1 << 30)),
                ..defaults.l1
            },
            engine: EngineSettings {
                chunk_size: self.chunk_size,
                hash_algorithm,
                session_ttl: seconds("session-ttl-seconds", self.session_ttl_seconds, false)?,
                max_sessions: self.max_sessions,
                kv_event_log_size: self.kv_event_log_size,
                lookup_records: self.lookup_records,
                miss_history_chunks: self.miss_history_chunks,
                kv_events_publisher: self.kv_events.resolve(self.kv_event_log_size)?,
                worker_reap_timeout: reap,
                worker_registration_grace: seconds(
                    "worker-registration-grace-seconds",
                    self.worker_registration_grace_seconds,
                    false,
                )?,
                ..defaults.engine
            },
            l2: L2Settings {
                adapters: l2_adapters,
                prefetch_max_in_flight: self.l2_prefetch_max_in_flight,
                flush_timeout: seconds(
                    "l2-flush-timeout-seconds",
                    self.l2_flush_timeout_seconds,
                    true,
                )?,
                stuck_after: self
                    .l2_stuck_op_seconds
                    .map(|v| seconds("l2-stuck-op-seconds", v, false))
                    .transpose()?,
            },
            http: if self.no_http {
                None
            } else {
                let http = HttpConfig {
                    host: self.http_host,
                    port: self.http_port,
                    auth_token: self.http_auth_token,
                    allow_insecure: self.http_insecure,
                };
                http.check_exposure()?;
                Some(http)
            },
            telemetry: defaults.telemetry,
            analysis: AnalysisSettings {
                curve: HitCurveConfig {
                    enabled: self.hit_rate_curve,
                    max_samples: self.hit_rate_curve_samples,
                },
                lookup_log: self.lookup_log_dir.map(|dir| LookupLogConfig {
                    dir,
                    max_bytes: self.lookup_log_max_bytes,
                    file_bytes: self.lookup_log_file_bytes,
                }),
            },
            instance_id,
            fault_injection: self.enable_fault_injection,
            log_control: None,
            release_memory: Some(release_memory),
        };
        Ok((
            cfg,
            Extras {
                log: self.log,
                notes,
            },
        ))
    }
}

/// Runs the server until SIGINT or SIGTERM, then shuts down in order and exits 0.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let (mut cfg, extras) = match args.into_config() {
        Ok(v) => v,
        Err(e) => {
            // A refused or invalid flag is a command-line error (exit 2, like clap's own).
            eprintln!("kvtier serve: error: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let control = init_logging(&extras.log)?;
    cfg.log_control = Some(control);
    for note in &extras.notes {
        tracing::info!(
            flag = note.flag,
            reason = note.reason,
            "lmcache flag accepted without effect"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kvtier-http")
        .enable_all()
        .build()
        .context("building the async runtime")?;
    // The handlers are installed before the server starts: a client can be answered as soon as
    // the front end binds, and a SIGTERM from then on must mean an ordered shutdown, not the
    // default action (death with the segment left in /dev/shm).
    let (mut term, mut int) = runtime
        .block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })
        .context("installing the SIGTERM/SIGINT handlers")?;
    let server = Server::start(cfg, runtime.handle()).context("starting kvtier")?;
    let signal = runtime.block_on(async {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        Ok::<_, std::io::Error>(name)
    });
    match signal {
        Ok(name) => tracing::info!(signal = name, "stopping"),
        Err(e) => tracing::error!(error = %e, "signal handling failed; stopping"),
    }
    server.shutdown();
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(ExitCode::SUCCESS)
}
