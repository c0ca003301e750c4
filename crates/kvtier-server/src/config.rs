//! The server's configuration: everything `kvtier serve` can be told, typed and grouped by the
//! component it configures (RPC front end, L1, engine, L2, HTTP), with its defaults.
//!
//! Values arrive parsed and validated: the CLI turns every flag into its type once (a policy
//! name into an [`EvictionPolicyKind`], an algorithm name into a [`HashAlgorithm`], seconds into
//! [`Duration`]s) and names the flag in its errors; [`crate::Server::start`] only checks the few
//! cross-field rules (the chunk size against the hasher, the HTTP exposure rule) and re-parses
//! nothing. Queue sizes and thread intervals are settings here, not constants in the wiring.
//!
//! `GET /config` shows the effective configuration as one flat JSON object (the groups are
//! flattened and keep the historic key names; durations are `<name>_seconds` floats); neither it
//! nor `Debug` reveals the HTTP auth token.

use std::time::Duration;

use kvtier_core::hash::HashAlgorithm;
use kvtier_core::l1::EvictionPolicyKind;
use kvtier_storage::AdapterConfig;
use serde::Serialize;

use crate::http::HttpConfig;
use crate::telemetry::TelemetryConfig;
use crate::transport::access::Cidr;

pub(crate) fn as_seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn as_opt_seconds<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

fn policy_name<S: serde::Serializer>(p: &EvictionPolicyKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.name())
}

/// The ZeroMQ front end.
#[derive(Debug, Clone, Serialize)]
pub struct RpcSettings {
    /// Address the ROUTER binds (`localhost` means 127.0.0.1).
    pub host: String,
    /// Port the ROUTER binds (0 picks a free one).
    pub port: u16,
    /// Workers per pool, unless the pool's own setting below is given.
    pub max_workers: usize,
    /// Workers of the transfer (affinity) pool (`--max-gpu-workers`); `None`: `max_workers`.
    pub max_transfer_workers: Option<usize>,
    /// Workers of the normal pool (`--max-cpu-workers`); `None`: `max_workers`.
    pub max_normal_workers: Option<usize>,
    /// Bound of each pool's queue; a request that finds it full is answered at once with its
    /// failure value and counted (`transport.rejected_busy_total`).
    #[serde(rename = "rpc_queue_capacity")]
    pub queue_capacity: usize,
    /// How long shutdown waits for in-flight requests.
    #[serde(rename = "drain_timeout_seconds", serialize_with = "as_seconds")]
    pub drain_timeout: Duration,
    /// Largest frame, and largest sum of a request's frames, the front end accepts
    /// (`--max-message-bytes`; see `transport` for what happens above it).
    pub max_message_bytes: usize,
    /// Networks whose peers may connect (`--rpc-allow`); empty: every peer that reaches the port.
    #[serde(rename = "rpc_allow")]
    pub allow: Vec<Cidr>,
    /// Bytes of recently decoded request token arrays kept for reuse
    /// (`--token-array-cache-mib`; 0 disables the cache). See `kvtier_proto::TokenArrays`.
    pub token_array_cache_bytes: usize,
}

/// Default of `--token-array-cache-mib`: room for the decoded ids (4 bytes per token) of
/// [`TOKEN_ARRAY_CACHE_ENTRIES`] prompts of up to 256k tokens.
pub const DEFAULT_TOKEN_ARRAY_CACHE_MIB: usize = 16;

/// Arrays the token-array cache holds at most: enough for the ops of the requests a step
/// prefills, few enough that a new array's memory is still warm when it is reused (with 256
/// the first op of each request got 10-25 % slower; docs/performance.md).
pub const TOKEN_ARRAY_CACHE_ENTRIES: usize = 16;

/// The L1 tier: the shared-memory pool, its locks and its eviction.
#[derive(Debug, Clone, Serialize)]
pub struct L1Settings {
    /// Pool size in bytes.
    #[serde(rename = "l1_size_bytes")]
    pub size_bytes: u64,
    /// Object alignment in bytes.
    #[serde(rename = "l1_align_bytes")]
    pub align_bytes: u64,
    /// Eviction policy.
    #[serde(serialize_with = "policy_name")]
    pub eviction_policy: EvictionPolicyKind,
    /// Background eviction starts at this `used / capacity`.
    pub eviction_trigger_watermark: f64,
    /// Fraction of used bytes freed per background round.
    pub eviction_ratio: f64,
    /// Write-lock TTL.
    #[serde(rename = "l1_write_ttl_seconds", serialize_with = "as_seconds")]
    pub write_ttl: Duration,
    /// Fraction of the pool that store reservations past their write TTL may hold until their
    /// writer returns (the quarantine, `kvtier_core::l1::manager`); 0 frees them at expiry.
    #[serde(rename = "l1_write_quarantine_fraction")]
    pub write_quarantine_fraction: f64,
    /// Read-lock TTL.
    #[serde(rename = "l1_read_ttl_seconds", serialize_with = "as_seconds")]
    pub read_ttl: Duration,
    /// Name of the shared-memory segment.
    pub shm_name: String,
    /// Allocate and zero the segment's pages in the background after start (commits the memory
    /// up front; `kvtier serve` leaves it off unless `--l1-prefault` or `--l1-init-size-gb`).
    #[serde(rename = "l1_prefault")]
    pub prefault: bool,
    /// Prefault only this many bytes from offset 0 (`--l1-init-size-gb`); `None`: the whole pool.
    #[serde(rename = "l1_prefault_limit_bytes")]
    pub prefault_limit: Option<u64>,
    /// Period of the eviction controller (TTL expiry, watermark eviction).
    #[serde(rename = "eviction_interval_seconds", serialize_with = "as_seconds")]
    pub eviction_interval: Duration,
}

/// The engine: hashing, sessions, worker liveness.
#[derive(Debug, Clone, Serialize)]
pub struct EngineSettings {
    /// Tokens per chunk.
    pub chunk_size: usize,
    /// Token hashing algorithm.
    pub hash_algorithm: HashAlgorithm,
    /// Session idle TTL.
    #[serde(rename = "session_ttl_seconds", serialize_with = "as_seconds")]
    pub session_ttl: Duration,
    /// Most live sessions (`--max-sessions`); creating one more evicts the least recently used
    /// idle session.
    pub max_sessions: usize,
    /// Reap an engine worker this long after its last ping (0 disables).
    #[serde(rename = "worker_reap_timeout_seconds", serialize_with = "as_seconds")]
    pub worker_reap_timeout: Duration,
    /// Grace period before a worker's first ping.
    #[serde(
        rename = "worker_registration_grace_seconds",
        serialize_with = "as_seconds"
    )]
    pub worker_registration_grace: Duration,
    /// Period of the housekeeping thread (session expiry, reaping, transfer sweep).
    #[serde(
        rename = "housekeeping_interval_seconds",
        serialize_with = "as_seconds"
    )]
    pub housekeeping_interval: Duration,
    /// KV-event records kept for replay (`--kv-event-log-size`; 0 disables KV events).
    pub kv_event_log_size: usize,
    /// The router-facing KV-event publisher (`--kv-events-publisher`; `None` disables it).
    pub kv_events_publisher: Option<crate::engine::kv_events::PublisherConfig>,
    /// Recent lookups kept with their miss reasons (`--lookup-records`; 0 disables them).
    pub lookup_records: usize,
    /// Slots of the chunk history that explains misses (`--miss-history-chunks`).
    pub miss_history_chunks: usize,
}

/// The L2 tier.
#[derive(Debug, Clone, Serialize)]
pub struct L2Settings {
    /// Adapters in index order (`--l2-adapter`, repeatable); empty disables L2.
    #[serde(rename = "l2_adapters")]
    pub adapters: Vec<AdapterConfig>,
    /// Prefetch requests running at once.
    #[serde(rename = "l2_prefetch_max_in_flight")]
    pub prefetch_max_in_flight: usize,
    /// How long shutdown waits for the write-behind queue to drain.
    #[serde(rename = "l2_flush_timeout_seconds", serialize_with = "as_seconds")]
    pub flush_timeout: Duration,
    /// Age past which an L2 operation in flight makes its adapter unhealthy (`None`: per
    /// adapter, see `kvtier_storage::tier::L2TierConfig::stuck_after`).
    #[serde(rename = "l2_stuck_op_seconds", serialize_with = "as_opt_seconds")]
    pub stuck_after: Option<Duration>,
}

/// The lookup-stream analyses (`crate::analysis`).
#[derive(Debug, Clone, Serialize)]
pub struct AnalysisSettings {
    /// The live hit-rate curve (`--hit-rate-curve`, `--hit-rate-curve-samples`).
    #[serde(flatten)]
    pub curve: crate::analysis::hit_curve::HitCurveConfig,
    /// The lookup log (`--lookup-log-dir`; `None` disables it).
    #[serde(flatten)]
    pub lookup_log: Option<crate::analysis::lookup_log::LookupLogConfig>,
}

/// Everything `kvtier serve` can be told.
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    /// The ZeroMQ front end.
    #[serde(flatten)]
    pub rpc: RpcSettings,
    /// The L1 tier.
    #[serde(flatten)]
    pub l1: L1Settings,
    /// The engine.
    #[serde(flatten)]
    pub engine: EngineSettings,
    /// The L2 tier.
    #[serde(flatten)]
    pub l2: L2Settings,
    /// The telemetry sampler behind the dashboard's time series.
    #[serde(flatten)]
    pub telemetry: TelemetryConfig,
    /// The hit-rate curve and the lookup log.
    #[serde(flatten)]
    pub analysis: AnalysisSettings,
    /// HTTP admin API (`None` disables it).
    pub http: Option<HttpConfig>,
    /// Stable identity of this server (`--instance-id`), shown in the status tree and as a label
    /// of `kvtier_build_info`.
    pub instance_id: String,
    /// The run-time log filter behind `GET /loglevel` (set by the binary that installed the
    /// logger; `None`: the level cannot be changed).
    #[serde(skip)]
    pub log_control: Option<std::sync::Arc<dyn crate::http::admin::LogControl>>,
    /// Gives freed heap memory back to the OS after large releases (sessions expired in bulk,
    /// `clear`); set by the binary, which knows its allocator (see
    /// [`crate::engine::MemoryRelease`]). `None`: freed memory stays with the allocator.
    #[serde(skip)]
    pub release_memory: Option<fn()>,
    /// Test-only: mounts `POST /api/debug/fault` on the HTTP API, which makes a component fail
    /// as if it had crashed (see `dashboard`). Never enable it in production.
    pub fault_injection: bool,
}

impl Default for ServerConfig {
    /// The defaults of `kvtier serve` (shared-memory name for port 5555, HTTP on loopback:8080, a fresh instance id).
    fn default() -> Self {
        Self {
            rpc: RpcSettings {
                host: "127.0.0.1".into(),
                port: 5555,
                max_workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
                max_transfer_workers: None,
                max_normal_workers: None,
                queue_capacity: 4096,
                drain_timeout: Duration::from_secs(5),
                max_message_bytes: crate::transport::DEFAULT_MAX_MESSAGE_BYTES,
                allow: Vec::new(),
                token_array_cache_bytes: DEFAULT_TOKEN_ARRAY_CACHE_MIB << 20,
            },
            l1: L1Settings {
                size_bytes: 1 << 30,
                align_bytes: 4096,
                eviction_policy: EvictionPolicyKind::Lru,
                eviction_trigger_watermark: 0.8,
                eviction_ratio: 0.2,
                write_ttl: Duration::from_secs(600),
                write_quarantine_fraction: 0.1,
                read_ttl: Duration::from_secs(300),
                shm_name: "kvtier_l1_5555".into(),
                prefault: false,
                prefault_limit: None,
                eviction_interval: Duration::from_millis(100),
            },
            engine: EngineSettings {
                chunk_size: 256,
                hash_algorithm: HashAlgorithm::Blake3,
                session_ttl: Duration::from_secs(600),
                max_sessions: crate::engine::session::DEFAULT_MAX_SESSIONS,
                worker_reap_timeout: Duration::from_secs(120),
                worker_registration_grace: Duration::from_secs(3600),
                housekeeping_interval: Duration::from_secs(1),
                kv_event_log_size: 32768,
                kv_events_publisher: None,
                lookup_records: crate::engine::explain::DEFAULT_RECORDS,
                miss_history_chunks: crate::engine::explain::history::DEFAULT_SLOTS,
            },
            l2: L2Settings {
                adapters: Vec::new(),
                prefetch_max_in_flight: 8,
                flush_timeout: Duration::from_secs(10),
                stuck_after: None,
            },
            telemetry: TelemetryConfig::default(),
            analysis: AnalysisSettings {
                curve: crate::analysis::hit_curve::HitCurveConfig::default(),
                lookup_log: None,
            },
            http: Some(HttpConfig::local(8080)),
            instance_id: new_instance_id(),
            log_control: None,
            release_memory: None,
            fault_injection: false,
        }
    }
}

/// A random UUID v4 string (LMCache mints one per start when `--instance-id` is not given).
/// The bits come from std's per-process random hash keys, mixed with the clock and the pid.
pub fn new_instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    let hi = h.finish();
    h.write_u64(hi);
    let lo = h.finish();
    let v = (u128::from(hi) << 64 | u128::from(lo)) & !(0xf000u128 << 64) & !(0xc0u128 << 56)
        | (0x4000u128 << 64)
        | (0x80u128 << 56);
    let x = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

impl ServerConfig {
    /// A configuration for tests and benchmarks: ephemeral RPC and HTTP ports on loopback, a
    /// 16 MiB L1 named `shm_name`, no prefault, one worker per pool, worker reaping off and a
    /// 1 s drain. Callers adjust what their test is about.
    pub fn ephemeral(shm_name: impl Into<String>) -> Self {
        let mut c = Self::default();
        c.rpc.port = 0;
        c.rpc.max_workers = 1;
        c.rpc.drain_timeout = Duration::from_secs(1);
        c.l1.size_bytes = 16 << 20;
        c.l1.shm_name = shm_name.into();
        c.l1.prefault = false;
        c.engine.worker_reap_timeout = Duration::ZERO;
        c.http = Some(HttpConfig::local(0));
        c
    }
}
