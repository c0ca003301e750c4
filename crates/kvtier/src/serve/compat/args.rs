//! The `lmcache server` 0.5.6 flags themselves: their names, types, choices, environment
//! variables and help texts (what `kvtier serve --help` shows under "LMCache 0.5.6
//! compatibility"). What each one does is decided in the parent module (`LmcacheArgs::resolve`).

use clap::Args;

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
