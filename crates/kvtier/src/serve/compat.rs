//! The `lmcache server` 0.5.6 flags kvtier has no flag of its own for.
//!
//! Every flag of `lmcache server --help` is accepted by `kvtier serve` in one of three ways
//! (the table is `docs/lmcache-compatibility.md`; `tests/python/test_lmcache_cli.py` checks it
//! against LMCache's own `--help`):
//! - *mapped*: same meaning (most are plain [`super::ServeArgs`] fields; the pool sizes,
//!   `--l1-init-size-gb` and `--instance-id` are here);
//! - *accepted, no effect*: [`LmcacheArgs::resolve`] returns a [`Note`] that `serve` logs once at
//!   INFO with the reason;
//! - *refused*: a feature kvtier does not have; [`Refused`] names the flag and `serve` exits 2.
//!
//! Values are parsed with LMCache's types and choices, so a typo is refused even for a flag
//! that has no effect.

use clap::Args;

/// A flag accepted for compatibility that changes nothing, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The flag as given, e.g. `--enable-tracing`.
    pub flag: &'static str,
    /// Why it has no effect in kvtier.
    pub reason: &'static str,
}

/// A flag asking for a feature kvtier does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag}: not supported by kvtier ({reason})")]
pub struct Refused {
    /// The flag (with its value when the value is what is refused).
    pub flag: String,
    /// What kvtier lacks, and what to do instead.
    pub reason: &'static str,
}

const BLEND_ONLY: &str = "CacheBlend only; kvtier has no CacheBlend engine";
const P2P_OFF: &str = "peer-to-peer sharing is off without --p2p-listen-url (kvtier has no p2p)";
const COORD_OFF: &str = "only used with --coordinator-url (kvtier has no coordinator client)";
const GDS_OFF: &str = "only used with --gds-l1-path (kvtier has no GDS tier)";
const NO_OTEL: &str = "kvtier has no OpenTelemetry exporter; it logs with tracing and serves /metrics and /api/status";
const ALWAYS_ON: &str =
    "kvtier's counters are atomics read when /metrics or /api/status is asked; nothing to switch";

/// LMCache 0.5.6 server flags without a kvtier flag of their own (see the module doc).
#[derive(Debug, Default, Args)]
#[command(next_help_heading = "LMCache 0.5.6 compatibility")]
pub struct LmcacheArgs {
    /// Stable identity of this server, shown in the status tree (`instance_id`) and as the
    /// `instance_id` label of `kvtier_build_info` [default: a random UUID per start].
    #[arg(long, env = "KVTIER_INSTANCE_ID", value_name = "ID")]
    pub instance_id: Option<String>,

    /// RPC transport: `zmq` (the only one kvtier speaks; `grpc` is refused).
    #[arg(long, value_name = "zmq|grpc", value_parser = ["zmq", "grpc"])]
    pub transport: Option<String>,

    /// Worker threads of the transfer pool (store, retrieve, prepare/commit) [default:
    /// --max-workers].
    #[arg(long, env = "KVTIER_MAX_GPU_WORKERS", value_name = "N")]
    pub max_gpu_workers: Option<usize>,

    /// Worker threads of the normal pool (large lookups, waits, clear, registrations)
    /// [default: --max-workers].
    #[arg(long, env = "KVTIER_MAX_CPU_WORKERS", value_name = "N")]
    pub max_cpu_workers: Option<usize>,

    /// No effect: gRPC server threads (kvtier has no gRPC transport).
    #[arg(long, value_name = "N")]
    pub grpc_server_workers: Option<u64>,

    /// Engine block id meaning "absent": 0 (LMCache's default, and kvtier's); another value is
    /// refused.
    #[arg(long, value_name = "ID")]
    pub null_block_id: Option<i64>,

    /// `default` (accepted); `blend` (CacheBlend) is refused.
    #[arg(long, value_name = "default|blend", value_parser = ["default", "blend"])]
    pub engine_type: Option<String>,

    /// No effect: kvtier always serves both transfer modes (LMCache's `auto`).
    #[arg(long, value_name = "MODE", value_parser = ["lmcache_driven", "engine_driven", "auto"])]
    pub supported_transfer_mode: Option<String>,

    /// Refused: containers without a shared /dev/shm (kvtier's L1 is a shared-memory
    /// segment the engines map).
    #[arg(long, overrides_with = "no_isolated_ipc")]
    pub isolated_ipc: bool,
    /// No effect: the default (engines share /dev/shm with the server).
    #[arg(long, overrides_with = "isolated_ipc")]
    pub no_isolated_ipc: bool,

    /// Refused when given a location: runtime plugins are Python modules.
    #[arg(long, num_args = 0.., value_name = "LOCATION")]
    pub runtime_plugin_locations: Option<Vec<String>>,

    /// Refused unless `{}`: runtime plugins are Python modules.
    #[arg(long, value_name = "JSON")]
    pub runtime_plugin_config: Option<String>,

    /// No effect: modules the /run_script endpoint may import (kvtier has no /run_script).
    #[arg(long, num_args = 0.., value_name = "MODULE")]
    pub script_allowed_imports: Option<Vec<String>>,

    /// Refused: the /run_script endpoint (runs Python in the server).
    #[arg(long, overrides_with = "no_run_script_api_enabled")]
    pub run_script_api_enabled: bool,
    /// No effect: the default (no /run_script endpoint).
    #[arg(long, overrides_with = "run_script_api_enabled")]
    pub no_run_script_api_enabled: bool,

    /// Refused: one object group per sliding-window size (hybrid models are not supported).
    #[arg(long, overrides_with = "no_separate_object_groups")]
    pub separate_object_groups: bool,
    /// No effect: the default (one object group).
    #[arg(long, overrides_with = "separate_object_groups")]
    pub no_separate_object_groups: bool,

    /// No effect: CacheBlend only.
    #[arg(long)]
    pub enable_segmented_prefix: bool,

    /// No effect: CacheBlend only.
    #[arg(long)]
    pub enable_dedup_content: bool,

    /// No effect: CacheBlend only.
    #[arg(long)]
    pub enable_blend_reorder: bool,

    /// Refused when given a module: LMCache's experimental transfer modules.
    #[arg(long, num_args = 0.., value_name = "MODULE")]
    pub enable: Option<Vec<String>>,

    /// Refused: out-of-tree server modules are Python.
    #[arg(long, value_name = "JSON")]
    pub server_module: Vec<String>,

    /// Refused when not empty: peer-to-peer sharing.
    #[arg(long, value_name = "URL")]
    pub p2p_advertise_url: Option<String>,
    /// Refused when not empty: peer-to-peer sharing.
    #[arg(long, value_name = "URL")]
    pub p2p_listen_url: Option<String>,
    /// No effect: peer-to-peer sharing is off.
    #[arg(long, value_name = "SECONDS")]
    pub p2p_lookup_timeout: Option<f64>,
    /// No effect: peer-to-peer sharing is off.
    #[arg(long, value_name = "SECONDS")]
    pub p2p_load_timeout: Option<f64>,
    /// No effect: peer-to-peer sharing is off.
    #[arg(long, value_name = "ENGINE")]
    pub p2p_transfer_engine: Option<String>,

    /// Refused: kvtier does not join an LMCache coordinator.
    #[arg(long, value_name = "URL")]
    pub coordinator_url: Option<String>,
    /// No effect without --coordinator-url.
    #[arg(long, value_name = "IP")]
    pub coordinator_advertise_ip: Option<String>,
    /// No effect without --coordinator-url.
    #[arg(long, value_name = "SECONDS")]
    pub coordinator_heartbeat_interval: Option<f64>,
    /// No effect without --coordinator-url.
    #[arg(long)]
    pub coordinator_event_reporting: bool,
    /// No effect without --coordinator-url.
    #[arg(long, value_name = "SECONDS")]
    pub coordinator_event_flush_interval: Option<f64>,
    /// No effect without --coordinator-url.
    #[arg(long, value_name = "http|kafka", value_parser = ["http", "kafka"])]
    pub coordinator_event_transport: Option<String>,
    /// No effect without --coordinator-url.
    #[arg(long, value_name = "SERVERS")]
    pub coordinator_kafka_bootstrap_servers: Option<String>,
    /// No effect without --coordinator-url.
    #[arg(long, value_name = "TOPIC")]
    pub coordinator_kafka_topic: Option<String>,
    /// No effect without --coordinator-url.
    #[arg(long, value_name = "SECONDS")]
    pub coordinator_kafka_delivery_timeout: Option<f64>,
    /// No effect without --coordinator-url.
    #[arg(long, value_name = "SECONDS")]
    pub coordinator_blend_timeout: Option<f64>,
    /// No effect without --coordinator-url.
    #[arg(long, value_name = "N")]
    pub coordinator_blend_match_concurrency: Option<u64>,
    /// No effect without --coordinator-url.
    #[arg(long)]
    pub coordinator_l2_event_reporting: bool,
    /// No effect without --coordinator-url.
    #[arg(long, value_name = "SECONDS")]
    pub coordinator_l2_event_flush_interval: Option<f64>,

    /// No effect: kvtier's counters cost a relaxed atomic add.
    #[arg(long)]
    pub disable_observability: bool,
    /// No effect: kvtier's counters cost a relaxed atomic add; do not scrape /metrics instead.
    #[arg(long)]
    pub disable_metrics: bool,
    /// No effect: kvtier has no gRPC transport.
    #[arg(long)]
    pub disable_grpc_metrics: bool,
    /// No effect: LMCache's event-bus log subscriber (kvtier logs with --log).
    #[arg(long)]
    pub disable_logging: bool,
    /// No effect: kvtier has no OpenTelemetry exporter.
    #[arg(long)]
    pub enable_tracing: bool,
    /// No effect: kvtier has no OpenTelemetry exporter.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// No effect: kvtier has no event bus.
    #[arg(long, value_name = "N")]
    pub event_bus_queue_size: Option<u64>,
    /// No effect: metrics are served at /metrics on the HTTP port, as `lmcache server` does.
    #[arg(long, value_name = "PORT")]
    pub prometheus_port: Option<u16>,
    /// No effect: kvtier counts every request.
    #[arg(long, value_name = "RATE")]
    pub metrics_sample_rate: Option<f64>,
    /// Refused when not empty: kvtier does not log lookup hashes to files.
    #[arg(long, value_name = "DIR")]
    pub lookup_hash_log_dir: Option<String>,
    /// No effect without --lookup-hash-log-dir.
    #[arg(long, value_name = "SECONDS")]
    pub lookup_hash_log_rotation_interval: Option<u64>,
    /// No effect without --lookup-hash-log-dir.
    #[arg(long, value_name = "BYTES")]
    pub lookup_hash_log_rotation_max_size: Option<u64>,
    /// No effect without --lookup-hash-log-dir.
    #[arg(long, value_name = "N")]
    pub lookup_hash_log_max_files: Option<u64>,
    /// No effect: CPython garbage-collector monitor.
    #[arg(long)]
    pub enable_gc_monitor: bool,
    /// No effect: CPython garbage-collector monitor.
    #[arg(long, value_name = "MS")]
    pub gc_monitor_min_pause_ms: Option<f64>,
    /// No effect: CPython garbage-collector monitor.
    #[arg(long, value_name = "N")]
    pub gc_monitor_top_objects: Option<u64>,
    /// No effect: kvtier's state is always at /api/status and /metrics.
    #[arg(long)]
    pub enable_extra_logging: bool,
    /// No effect: kvtier's state is always at /api/status and /metrics.
    #[arg(long, value_name = "SECONDS")]
    pub extra_logging_interval: Option<f64>,
    /// Refused: storage/event traces for LMCache's replay tools.
    #[arg(long, value_name = "storage|events", value_parser = ["storage", "events"])]
    pub trace_level: Option<String>,
    /// No effect without --trace-level.
    #[arg(long, value_name = "PATH")]
    pub trace_output: Option<String>,

    /// Refused: tagged L1 managers (DRAM, DEVDAX, GDS); use --l1-size-gb.
    #[arg(long, value_name = "JSON")]
    pub l1_manager: Vec<String>,
    /// No effect: the L1 segment is a sparse shared-memory file; its pages are allocated on
    /// first use (see --l1-prefault, --l1-init-size-gb).
    #[arg(long, overrides_with = "no_l1_use_lazy")]
    pub l1_use_lazy: bool,
    /// No effect (see --l1-use-lazy).
    #[arg(long, overrides_with = "l1_use_lazy")]
    pub no_l1_use_lazy: bool,
    /// GiB of the segment allocated and zeroed in the background right after start, the rest on
    /// first use; giving it turns the prefault on (see --l1-prefault) [default: no prefault].
    #[arg(long, env = "KVTIER_L1_INIT_SIZE_GB", value_name = "GIB")]
    pub l1_init_size_gb: Option<u64>,
    /// Refused: huge pages for L1.
    #[arg(long, overrides_with = "no_l1_use_hugepages")]
    pub l1_use_hugepages: bool,
    /// No effect: the default (no huge pages).
    #[arg(long, overrides_with = "l1_use_hugepages")]
    pub no_l1_use_hugepages: bool,
    /// Refused: a DEVDAX L1.
    #[arg(long, value_name = "PATH")]
    pub l1_devdax_path: Option<String>,
    /// Refused: a GPUDirect Storage L1.
    #[arg(long, value_name = "PATH")]
    pub gds_l1_path: Option<String>,
    /// No effect without --gds-l1-path.
    #[arg(long, overrides_with = "no_gds_l1_use_direct_io")]
    pub gds_l1_use_direct_io: bool,
    /// No effect without --gds-l1-path.
    #[arg(long, overrides_with = "gds_l1_use_direct_io")]
    pub no_gds_l1_use_direct_io: bool,
    /// No effect without --gds-l1-path.
    #[arg(long, value_name = "BACKEND")]
    pub gds_l1_backend: Option<String>,
    /// `default` (write to L1, then L2 behind); `skip_l1` is refused.
    #[arg(long, value_name = "POLICY", value_parser = ["default", "skip_l1"])]
    pub l2_store_policy: Option<String>,
    /// `default` (prefetch the L1 miss suffix); `retain` is refused.
    #[arg(long, value_name = "POLICY", value_parser = ["default", "retain"])]
    pub l2_prefetch_policy: Option<String>,
    /// No effect: kvtier's threads wake on events, not on a notifier period.
    #[arg(long, value_name = "MS")]
    pub periodic_notifier_interval_ms: Option<u64>,

    /// No effect: output format of the `lmcache` CLI's reporting commands (a server prints
    /// none).
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<String>,
    /// No effect: the `lmcache` CLI's metrics file (a server writes none).
    #[arg(long, value_name = "PATH")]
    pub output: Option<String>,
    /// No effect: the `lmcache` CLI's quiet mode (use --log to quieten kvtier).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

fn refuse(flag: impl Into<String>, reason: &'static str) -> Result<(), Refused> {
    Err(Refused {
        flag: flag.into(),
        reason,
    })
}

fn given<T>(v: &Option<T>) -> bool {
    v.is_some()
}

fn non_empty(v: &Option<String>) -> bool {
    v.as_deref().is_some_and(|s| !s.is_empty())
}

impl LmcacheArgs {
    /// Checks the flags: `Err` for the first refused one, else the notes to log.
    ///
    /// # Errors
    /// [`Refused`] naming the first flag that asks for a feature kvtier does not have.
    pub fn resolve(&self) -> Result<Vec<Note>, Refused> {
        if self.transport.as_deref() == Some("grpc") {
            refuse(
                "--transport grpc",
                "kvtier speaks the ZeroMQ transport only",
            )?;
        }
        if self.null_block_id.is_some_and(|id| id != 0) {
            refuse(
                "--null-block-id",
                "kvtier's null block id is 0 (LMCache's default)",
            )?;
        }
        if self.engine_type.as_deref() == Some("blend") {
            refuse("--engine-type blend", "kvtier has no CacheBlend engine")?;
        }
        if self.isolated_ipc {
            refuse(
                "--isolated-ipc",
                "engines must share /dev/shm with kvtier: its L1 is a shared-memory segment",
            )?;
        }
        if self
            .runtime_plugin_locations
            .as_ref()
            .is_some_and(|v| !v.is_empty())
        {
            refuse("--runtime-plugin-locations", "runtime plugins are Python")?;
        }
        if self
            .runtime_plugin_config
            .as_deref()
            .is_some_and(|s| !matches!(s.trim(), "" | "{}"))
        {
            refuse("--runtime-plugin-config", "runtime plugins are Python")?;
        }
        if self.run_script_api_enabled {
            refuse(
                "--run-script-api-enabled",
                "kvtier has no /run_script endpoint",
            )?;
        }
        if self.separate_object_groups {
            refuse(
                "--separate-object-groups",
                "hybrid (sliding-window) KV layouts are not supported",
            )?;
        }
        if self.enable.as_ref().is_some_and(|v| !v.is_empty()) {
            refuse(
                "--enable",
                "LMCache's experimental transfer modules are Python",
            )?;
        }
        if !self.server_module.is_empty() {
            refuse("--server-module", "out-of-tree server modules are Python")?;
        }
        if non_empty(&self.p2p_advertise_url) {
            refuse("--p2p-advertise-url", "kvtier has no peer-to-peer sharing")?;
        }
        if non_empty(&self.p2p_listen_url) {
            refuse("--p2p-listen-url", "kvtier has no peer-to-peer sharing")?;
        }
        if non_empty(&self.coordinator_url) {
            refuse(
                "--coordinator-url",
                "kvtier does not join an LMCache coordinator",
            )?;
        }
        if non_empty(&self.lookup_hash_log_dir) {
            refuse(
                "--lookup-hash-log-dir",
                "kvtier does not log lookup hashes to files",
            )?;
        }
        if given(&self.trace_level) {
            refuse(
                "--trace-level",
                "kvtier writes no storage/event traces for LMCache's replay tools",
            )?;
        }
        if !self.l1_manager.is_empty() {
            refuse(
                "--l1-manager",
                "tagged L1 managers (DRAM, DEVDAX, GDS); give --l1-size-gb instead",
            )?;
        }
        if self.l1_use_hugepages {
            refuse(
                "--l1-use-hugepages",
                "the L1 segment lives in /dev/shm without huge pages",
            )?;
        }
        if non_empty(&self.l1_devdax_path) {
            refuse("--l1-devdax-path", "kvtier has no DEVDAX tier")?;
        }
        if non_empty(&self.gds_l1_path) {
            refuse("--gds-l1-path", "kvtier has no GPUDirect Storage tier")?;
        }
        if self.l2_store_policy.as_deref() == Some("skip_l1") {
            refuse(
                "--l2-store-policy skip_l1",
                "stores always go to L1 first (policy `default`)",
            )?;
        }
        if self.l2_prefetch_policy.as_deref() == Some("retain") {
            refuse(
                "--l2-prefetch-policy retain",
                "prefetch uses policy `default` only",
            )?;
        }
        Ok(self.notes())
    }

    /// The flags given that have no effect, each with its reason.
    fn notes(&self) -> Vec<Note> {
        let flags: Vec<(&'static str, bool, &'static str)> = vec![
            (
                "--transport",
                given(&self.transport),
                "zmq is kvtier's only transport",
            ),
            (
                "--grpc-server-workers",
                given(&self.grpc_server_workers),
                "kvtier has no gRPC transport",
            ),
            (
                "--null-block-id",
                given(&self.null_block_id),
                "0 is kvtier's null block id already",
            ),
            (
                "--engine-type",
                given(&self.engine_type),
                "`default` is kvtier's only engine",
            ),
            (
                "--supported-transfer-mode",
                given(&self.supported_transfer_mode),
                "kvtier always serves both transfer modes (LMCache's `auto`)",
            ),
            ("--no-isolated-ipc", self.no_isolated_ipc, "the default"),
            (
                "--runtime-plugin-locations",
                given(&self.runtime_plugin_locations),
                "no plugin given",
            ),
            (
                "--runtime-plugin-config",
                given(&self.runtime_plugin_config),
                "no plugin configured",
            ),
            (
                "--script-allowed-imports",
                given(&self.script_allowed_imports),
                "kvtier has no /run_script endpoint",
            ),
            (
                "--no-run-script-api-enabled",
                self.no_run_script_api_enabled,
                "the default",
            ),
            (
                "--no-separate-object-groups",
                self.no_separate_object_groups,
                "the default",
            ),
            (
                "--enable-segmented-prefix",
                self.enable_segmented_prefix,
                BLEND_ONLY,
            ),
            (
                "--enable-dedup-content",
                self.enable_dedup_content,
                BLEND_ONLY,
            ),
            (
                "--enable-blend-reorder",
                self.enable_blend_reorder,
                BLEND_ONLY,
            ),
            ("--enable", given(&self.enable), "no module given"),
            (
                "--p2p-advertise-url",
                given(&self.p2p_advertise_url),
                P2P_OFF,
            ),
            ("--p2p-listen-url", given(&self.p2p_listen_url), P2P_OFF),
            (
                "--p2p-lookup-timeout",
                given(&self.p2p_lookup_timeout),
                P2P_OFF,
            ),
            ("--p2p-load-timeout", given(&self.p2p_load_timeout), P2P_OFF),
            (
                "--p2p-transfer-engine",
                given(&self.p2p_transfer_engine),
                P2P_OFF,
            ),
            (
                "--coordinator-url",
                given(&self.coordinator_url),
                "empty: no coordinator",
            ),
            (
                "--coordinator-advertise-ip",
                given(&self.coordinator_advertise_ip),
                COORD_OFF,
            ),
            (
                "--coordinator-heartbeat-interval",
                given(&self.coordinator_heartbeat_interval),
                COORD_OFF,
            ),
            (
                "--coordinator-event-reporting",
                self.coordinator_event_reporting,
                COORD_OFF,
            ),
            (
                "--coordinator-event-flush-interval",
                given(&self.coordinator_event_flush_interval),
                COORD_OFF,
            ),
            (
                "--coordinator-event-transport",
                given(&self.coordinator_event_transport),
                COORD_OFF,
            ),
            (
                "--coordinator-kafka-bootstrap-servers",
                given(&self.coordinator_kafka_bootstrap_servers),
                COORD_OFF,
            ),
            (
                "--coordinator-kafka-topic",
                given(&self.coordinator_kafka_topic),
                COORD_OFF,
            ),
            (
                "--coordinator-kafka-delivery-timeout",
                given(&self.coordinator_kafka_delivery_timeout),
                COORD_OFF,
            ),
            (
                "--coordinator-blend-timeout",
                given(&self.coordinator_blend_timeout),
                COORD_OFF,
            ),
            (
                "--coordinator-blend-match-concurrency",
                given(&self.coordinator_blend_match_concurrency),
                COORD_OFF,
            ),
            (
                "--coordinator-l2-event-reporting",
                self.coordinator_l2_event_reporting,
                COORD_OFF,
            ),
            (
                "--coordinator-l2-event-flush-interval",
                given(&self.coordinator_l2_event_flush_interval),
                COORD_OFF,
            ),
            (
                "--disable-observability",
                self.disable_observability,
                ALWAYS_ON,
            ),
            ("--disable-metrics", self.disable_metrics, ALWAYS_ON),
            (
                "--disable-grpc-metrics",
                self.disable_grpc_metrics,
                "kvtier has no gRPC transport",
            ),
            (
                "--disable-logging",
                self.disable_logging,
                "LMCache's event-bus log subscriber; kvtier logs with --log",
            ),
            ("--enable-tracing", self.enable_tracing, NO_OTEL),
            ("--otlp-endpoint", given(&self.otlp_endpoint), NO_OTEL),
            (
                "--event-bus-queue-size",
                given(&self.event_bus_queue_size),
                "kvtier has no event bus",
            ),
            (
                "--prometheus-port",
                given(&self.prometheus_port),
                "metrics are served at /metrics on the HTTP port, as `lmcache server` does",
            ),
            (
                "--metrics-sample-rate",
                given(&self.metrics_sample_rate),
                "kvtier counts every request",
            ),
            (
                "--lookup-hash-log-dir",
                given(&self.lookup_hash_log_dir),
                "empty: no lookup hash log",
            ),
            (
                "--enable-gc-monitor",
                self.enable_gc_monitor
                    || given(&self.gc_monitor_min_pause_ms)
                    || given(&self.gc_monitor_top_objects),
                "a CPython garbage-collector monitor; kvtier has no garbage collector",
            ),
            (
                "--enable-extra-logging",
                self.enable_extra_logging || given(&self.extra_logging_interval),
                "kvtier's state is always at /api/status and /metrics",
            ),
            (
                "--trace-output",
                given(&self.trace_output),
                "only used with --trace-level",
            ),
            (
                "--l1-use-lazy",
                self.l1_use_lazy || self.no_l1_use_lazy,
                "the L1 segment is a sparse shared-memory file whose pages are allocated on first use (--l1-prefault, --l1-init-size-gb)",
            ),
            (
                "--gds-l1-backend",
                self.gds_l1_use_direct_io
                    || self.no_gds_l1_use_direct_io
                    || given(&self.gds_l1_backend),
                GDS_OFF,
            ),
            (
                "--periodic-notifier-interval-ms",
                given(&self.periodic_notifier_interval_ms),
                "kvtier's threads wake on events, not on a notifier period",
            ),
        ];
        let mut notes: Vec<Note> = flags
            .into_iter()
            .filter(|(_, on, _)| *on)
            .map(|(flag, _, reason)| Note { flag, reason })
            .collect();
        let extra: Vec<(&'static str, bool, &'static str)> = vec![
            (
                "--lookup-hash-log-rotation-interval",
                given(&self.lookup_hash_log_rotation_interval),
                "only used with --lookup-hash-log-dir",
            ),
            (
                "--lookup-hash-log-rotation-max-size",
                given(&self.lookup_hash_log_rotation_max_size),
                "only used with --lookup-hash-log-dir",
            ),
            (
                "--lookup-hash-log-max-files",
                given(&self.lookup_hash_log_max_files),
                "only used with --lookup-hash-log-dir",
            ),
            (
                "--no-l1-use-hugepages",
                self.no_l1_use_hugepages,
                "the default",
            ),
            (
                "--l2-store-policy / --l2-prefetch-policy",
                given(&self.l2_store_policy) || given(&self.l2_prefetch_policy),
                "`default` is kvtier's behaviour",
            ),
            (
                "--format / --output / --quiet",
                given(&self.format) || given(&self.output) || self.quiet,
                "options of the lmcache CLI's reporting commands; a server prints no report (--log sets kvtier's logging)",
            ),
        ];
        notes.extend(
            extra
                .into_iter()
                .filter(|(_, on, _)| *on)
                .map(|(flag, _, reason)| Note { flag, reason }),
        );
        notes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_flag() {
        let a = LmcacheArgs {
            engine_type: Some("blend".into()),
            ..LmcacheArgs::default()
        };
        let e = a.resolve().expect_err("blend is refused");
        assert!(
            e.to_string()
                .starts_with("--engine-type blend: not supported")
        );
        let a = LmcacheArgs {
            p2p_listen_url: Some(String::new()),
            enable_tracing: true,
            ..LmcacheArgs::default()
        };
        let notes = a.resolve().expect("nothing refused");
        let flags: Vec<_> = notes.iter().map(|n| n.flag).collect();
        assert_eq!(flags, ["--p2p-listen-url", "--enable-tracing"]);
    }
}
