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

mod args;

pub use args::LmcacheArgs;

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
