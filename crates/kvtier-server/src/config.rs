//! The server's configuration: everything `kvtier serve` can be told, with its defaults.
//!
//! Values arrive validated (the CLI parses and range-checks each flag and names the flag in
//! its errors); [`crate::Server::start`] checks the few cross-field rules once. `Debug` and
//! `Serialize` (what `GET /config` shows) never reveal the HTTP auth token; durations
//! serialise as `<name>_seconds` floats.

use std::time::Duration;

use kvtier_storage::AdapterConfig;
use serde::Serialize;

use crate::http::HttpConfig;

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
    /// Bound of each worker pool's queue; a request that finds it full is answered at once
    /// with its failure value and counted (`transport.rejected_busy_total`).
    pub rpc_queue_capacity: usize,
    /// Period of the housekeeping thread (session expiry, worker reaping, transfer sweep).
    #[serde(
        rename = "housekeeping_interval_seconds",
        serialize_with = "as_seconds"
    )]
    pub housekeeping_interval: Duration,
    /// Period of the L1 eviction controller (TTL expiry, watermark eviction).
    #[serde(rename = "eviction_interval_seconds", serialize_with = "as_seconds")]
    pub eviction_interval: Duration,
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
            rpc_queue_capacity: 4096,
            housekeeping_interval: Duration::from_secs(1),
            eviction_interval: Duration::from_millis(100),
            fault_injection: false,
        }
    }
}

fn as_seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}
