//! The L2 tier's entries in the observability catalog (`kvtier_core::metrics`).
//!
//! Every counter and gauge the L2 tier reports is declared here with
//! [`metric_set!`](kvtier_core::metric_set): per-adapter operation counters ([`OpCounters`],
//! one set per operation kind, labelled `op`), per-adapter events ([`AdapterEvents`]), health
//! counters ([`HealthCounters`]), space gauges ([`UsageGauges`]), and the counters of the two
//! controllers ([`StoreCounters`], [`StoreAdapterCounters`], [`PrefetchCounters`]). Latencies
//! go into the workspace's one histogram, [`LatencyHistogram`], described by [`OP_LATENCY`].
//!
//! Invariants:
//! - The status tree's counter maps are produced by [`status_fields`] from these sets, so a key
//!   in the tree always has a catalog entry (field name = status key).
//! - Recording is relaxed atomics only; nothing here takes a lock.
//! - Label values come from bounded sets: `adapter` is [`adapter_label`] (index and kind of a
//!   configured adapter, at most `MAX_ADAPTERS`), `op` is one of [`OP_NAMES`].

use std::sync::OnceLock;
use std::time::Duration;

use kvtier_core::metric_set;
use kvtier_core::metrics::{
    HistogramSnapshot, Labels, LatencyHistogram, MetricDesc, MetricKind, MetricSet, MetricUnit,
    MetricVisitor, status_fields,
};
use kvtier_core::status::StatusNode;

metric_set! {
    /// Counters of one operation kind of one adapter (labelled `op`).
    pub struct OpCounters {
        /// Batches (calls) of this operation.
        calls_total: Counter => "kvtier_l2_adapter_op_calls",
        /// Objects that succeeded (lookups: hits).
        objects_total: Counter => "kvtier_l2_adapter_op_objects",
        /// Payload bytes of the objects that succeeded.
        bytes_total: Counter[Bytes] => "kvtier_l2_adapter_op_payload",
        /// Objects that failed.
        failed_objects_total: Counter => "kvtier_l2_adapter_op_failed_objects",
    }
}

metric_set! {
    /// Events only the adapter itself sees.
    pub struct AdapterEvents {
        /// Stores skipped because the object was already held.
        store_skipped_existing_total: Counter => "kvtier_l2_adapter_store_skipped_existing",
        /// Objects removed by the adapter's own eviction.
        evicted_objects_total: Counter => "kvtier_l2_adapter_evicted_objects",
        /// Payload bytes removed by the adapter's own eviction.
        evicted_bytes_total: Counter[Bytes] => "kvtier_l2_adapter_evicted",
        /// Objects found corrupt (removed, never served).
        corrupt_objects_total: Counter => "kvtier_l2_adapter_corrupt_objects",
        /// Objects that vanished between lookup and load (or from the server).
        vanished_objects_total: Counter => "kvtier_l2_adapter_vanished_objects",
    }
}

metric_set! {
    /// Lookup misses of one adapter (recorded by the instrumentation around lookups).
    pub struct LookupCounters {
        /// Keys a lookup did not find.
        lookup_misses_total: Counter => "kvtier_l2_adapter_lookup_misses",
    }
}

metric_set! {
    /// Health counters of one adapter (status key `errors`).
    pub struct HealthCounters {
        /// Errors recorded (any kind).
        errors_total: Counter => "kvtier_l2_adapter_errors",
        /// Calls refused at once because the adapter was down.
        fast_failures_total: Counter => "kvtier_l2_adapter_fast_failures",
        /// Transitions from healthy to unhealthy.
        down_transitions_total: Counter => "kvtier_l2_adapter_down_transitions",
        /// Transitions back to healthy.
        recoveries_total: Counter => "kvtier_l2_adapter_recoveries",
        /// Probe attempts while down.
        probes_total: Counter => "kvtier_l2_adapter_probes",
        /// Heartbeats sent while up.
        heartbeats_total: Counter => "kvtier_l2_adapter_heartbeats",
    }
}

metric_set! {
    /// Space and connectivity of one adapter, read at visit time.
    pub struct UsageGauges {
        /// Stored objects.
        stored_object_count: Gauge => "kvtier_l2_adapter_stored_objects",
        /// Keys currently pinned by lookups.
        locked_key_count: Gauge => "kvtier_l2_adapter_locked_keys",
        /// Payload bytes stored.
        current_size_bytes: Gauge[Bytes] => "kvtier_l2_adapter_size",
        /// Capacity limit (0: unlimited).
        max_capacity_bytes: Gauge[Bytes] => "kvtier_l2_adapter_capacity",
        /// 1 while the backend is reachable.
        connected: Gauge => "kvtier_l2_adapter_connected",
    }
}

metric_set! {
    /// Counters and gauges of the write-behind controller.
    pub struct StoreCounters {
        /// Keys queued and not yet dispatched.
        pending_keys_count: Gauge => "kvtier_l2_store_controller_pending_keys",
        /// Adapter store calls running.
        in_flight_task_count: Gauge => "kvtier_l2_store_controller_in_flight_tasks",
        /// Keys submitted for write-behind.
        submitted_keys_total: Counter => "kvtier_l2_store_controller_submitted_keys",
        /// Keys dropped by the full-queue policy (or because the controller stopped).
        dropped_keys_total: Counter => "kvtier_l2_store_controller_dropped_keys",
        /// Keys not stored again because a store of them was running.
        coalesced_keys_total: Counter => "kvtier_l2_store_controller_coalesced_keys",
        /// Keys gone from L1 before their turn.
        skipped_gone_keys_total: Counter => "kvtier_l2_store_controller_skipped_gone_keys",
        /// Queued keys and running stores abandoned at the shutdown deadline.
        abandoned_at_shutdown_total: Counter => "kvtier_l2_store_controller_abandoned_at_shutdown",
    }
}

metric_set! {
    /// Write-behind counters per adapter (labelled `adapter`).
    pub struct StoreAdapterCounters {
        /// Keys stored by the adapter.
        stored_keys_total: Counter => "kvtier_l2_store_controller_adapter_stored_keys",
        /// Keys whose store failed.
        failed_keys_total: Counter => "kvtier_l2_store_controller_adapter_failed_keys",
        /// Failed keys refused at once because the adapter was down.
        fast_failed_keys_total: Counter => "kvtier_l2_store_controller_adapter_fast_failed_keys",
        /// Stores that outlived their L1 read lock (copies deleted).
        lease_expired_keys_total: Counter => "kvtier_l2_store_controller_adapter_lease_expired_keys",
    }
}

metric_set! {
    /// Counters and gauges of the prefetch controller.
    pub struct PrefetchCounters {
        /// Requests submitted and not yet picked up by the dispatcher.
        submission_queue_size: Gauge => "kvtier_l2_prefetch_controller_submission_queue",
        /// Requests waiting for an in-flight slot.
        pending_queue_size: Gauge => "kvtier_l2_prefetch_controller_pending_queue",
        /// Requests running.
        in_flight_request_count: Gauge => "kvtier_l2_prefetch_controller_in_flight_requests",
        /// Requests in their lookup phase.
        lookup_phase_count: Gauge => "kvtier_l2_prefetch_controller_lookup_phase",
        /// Requests in their load phase.
        load_phase_count: Gauge => "kvtier_l2_prefetch_controller_load_phase",
        /// Finished results not yet taken.
        completed_results_count: Gauge => "kvtier_l2_prefetch_controller_completed_results",
        /// Requests submitted.
        submitted_total: Counter => "kvtier_l2_prefetch_controller_submitted",
        /// Requests answered empty at once because the queue was full.
        rejected_total: Counter => "kvtier_l2_prefetch_controller_rejected",
        /// Requests completed.
        completed_total: Counter => "kvtier_l2_prefetch_controller_completed",
        /// Results released because nobody wanted them any more.
        cancelled_total: Counter => "kvtier_l2_prefetch_controller_cancelled",
        /// Results released because nobody took them in time.
        expired_results_total: Counter => "kvtier_l2_prefetch_controller_expired_results",
        /// Keys requested.
        keys_requested_total: Counter => "kvtier_l2_prefetch_controller_keys_requested",
        /// Keys found in some adapter (within the planned prefix).
        keys_found_total: Counter => "kvtier_l2_prefetch_controller_keys_found",
        /// Keys loaded into L1.
        keys_loaded_total: Counter => "kvtier_l2_prefetch_controller_keys_loaded",
        /// Keys already in L1 (read-locked instead of loaded).
        keys_already_in_l1_total: Counter => "kvtier_l2_prefetch_controller_keys_already_in_l1",
        /// Keys whose load failed.
        keys_load_failed_total: Counter => "kvtier_l2_prefetch_controller_keys_load_failed",
        /// Payload bytes loaded into L1.
        bytes_loaded_total: Counter[Bytes] => "kvtier_l2_prefetch_controller_loaded",
        /// Whole chunks returned to lookups.
        chunks_hit_total: Counter => "kvtier_l2_prefetch_controller_chunks_hit",
        /// Times a plan was halved because L1 could not fit it.
        l1_oom_trims_total: Counter => "kvtier_l2_prefetch_controller_l1_oom_trims",
        /// Adapter lookups that failed (counted as holding nothing).
        lookup_errors_total: Counter => "kvtier_l2_prefetch_controller_lookup_errors",
    }
}

metric_set! {
    /// Topology of a valkey adapter's deployment, read at visit time (standalone: one node).
    pub struct ValkeyTopologyGauges {
        /// Nodes known (masters and replicas) from the last topology read.
        nodes_known_count: Gauge => "kvtier_l2_valkey_nodes_known",
        /// Masters serving slots.
        masters_count: Gauge => "kvtier_l2_valkey_masters",
        /// Hash slots (of 16384) served by a master that answers.
        slots_covered_count: Gauge => "kvtier_l2_valkey_slots_covered",
        /// Masters that did not answer the last probe.
        unreachable_masters_count: Gauge => "kvtier_l2_valkey_unreachable_masters",
    }
}

metric_set! {
    /// Topology events a valkey adapter observed.
    pub struct ValkeyTopologyEvents {
        /// Topology reads (`CLUSTER SLOTS`) that succeeded.
        topology_refreshes_total: Counter => "kvtier_l2_valkey_topology_refreshes",
        /// Slots whose master address changed between two topology reads (each one sends the
        /// clients holding the old map a MOVED redirection, followed by the redis crate).
        slot_moves_total: Counter => "kvtier_l2_valkey_slot_moves",
        /// Failovers seen: a slot range whose new master was a replica of its old master.
        failovers_total: Counter => "kvtier_l2_valkey_failovers",
        /// Nodes that appeared in the topology after the first read.
        nodes_added_total: Counter => "kvtier_l2_valkey_nodes_added",
        /// Nodes that left the topology.
        nodes_removed_total: Counter => "kvtier_l2_valkey_nodes_removed",
    }
}

metric_set! {
    /// Data requests of a valkey adapter per node (labelled `node`, a `host:port` from the
    /// configuration or the cluster topology).
    pub struct ValkeyNodeCounters {
        /// Requests (one per key and command) sent to the node's slots.
        requests_total: Counter => "kvtier_l2_valkey_node_requests",
        /// Requests that failed (timeouts, refused connections, server errors).
        errors_total: Counter => "kvtier_l2_valkey_node_errors",
    }
}

/// Latency of one request to a valkey node (labelled `adapter`, `node`).
pub static VALKEY_NODE_LATENCY: MetricDesc = MetricDesc {
    name: "kvtier_l2_valkey_node_request_duration",
    status_key: "latency",
    help: "Latency of one valkey request, per node.",
    unit: MetricUnit::Seconds,
    kind: MetricKind::Histogram,
};

/// Per-call latency of an adapter operation (labelled `adapter`, `op`).
pub static OP_LATENCY: MetricDesc = MetricDesc {
    name: "kvtier_l2_adapter_op_duration",
    status_key: "latency",
    help: "Latency of one adapter call (a whole batch).",
    unit: MetricUnit::Seconds,
    kind: MetricKind::Histogram,
};

/// Age of the oldest call of an operation in flight (labelled `adapter`, `op`; 0 when none).
pub static OLDEST_IN_FLIGHT: MetricDesc = MetricDesc {
    name: "kvtier_l2_adapter_oldest_in_flight",
    status_key: "oldest_seconds",
    help: "Age of the oldest adapter call of this operation still in flight (0 when none).",
    unit: MetricUnit::Seconds,
    kind: MetricKind::Gauge,
};

/// Values of the `op` label, in status-tree order.
pub const OP_NAMES: [&str; 4] = ["store", "load", "lookup", "delete"];

/// The `adapter` label of the adapter at `index`: `<index>_<kind>` (`0_fs`), matching
/// `l2_adapters[index]` and its `kind` field in the status tree.
pub fn adapter_label(index: usize, kind: &str) -> String {
    format!("{index}_{kind}")
}

/// Every descriptor the L2 tier can visit, in a fixed order (usable without a running tier).
pub fn descriptors() -> &'static [MetricDesc] {
    static ALL: OnceLock<Vec<MetricDesc>> = OnceLock::new();
    ALL.get_or_init(|| {
        [
            StoreCounters::DESCRIPTORS,
            StoreAdapterCounters::DESCRIPTORS,
            PrefetchCounters::DESCRIPTORS,
            UsageGauges::DESCRIPTORS,
            OpCounters::DESCRIPTORS,
            std::slice::from_ref(&OP_LATENCY),
            std::slice::from_ref(&OLDEST_IN_FLIGHT),
            LookupCounters::DESCRIPTORS,
            AdapterEvents::DESCRIPTORS,
            HealthCounters::DESCRIPTORS,
            ValkeyTopologyGauges::DESCRIPTORS,
            ValkeyTopologyEvents::DESCRIPTORS,
            ValkeyNodeCounters::DESCRIPTORS,
            std::slice::from_ref(&VALKEY_NODE_LATENCY),
        ]
        .concat()
    })
}

/// Appends the unlabelled values of `set` to `node` as fields, in declaration order.
pub fn with_fields(node: StatusNode, set: &dyn MetricSet) -> StatusNode {
    status_fields(set)
        .into_iter()
        .fold(node, |n, (k, v)| n.field(k, v))
}

/// A visitor that adds fixed labels in front of every sample it forwards.
pub struct Labelled<'a> {
    inner: &'a mut dyn MetricVisitor,
    labels: Labels<'a>,
}

impl std::fmt::Debug for Labelled<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Labelled")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl<'a> Labelled<'a> {
    /// Forwards to `inner`, prefixing `labels`.
    pub fn new(inner: &'a mut dyn MetricVisitor, labels: Labels<'a>) -> Self {
        Self { inner, labels }
    }
}

impl MetricVisitor for Labelled<'_> {
    fn counter(&mut self, desc: &'static MetricDesc, labels: Labels<'_>, value: u64) {
        let l: Vec<(&str, &str)> = self.labels.iter().chain(labels).copied().collect();
        self.inner.counter(desc, &l, value);
    }

    fn gauge(&mut self, desc: &'static MetricDesc, labels: Labels<'_>, value: f64) {
        let l: Vec<(&str, &str)> = self.labels.iter().chain(labels).copied().collect();
        self.inner.gauge(desc, &l, value);
    }

    fn histogram(&mut self, desc: &'static MetricDesc, labels: Labels<'_>, h: &HistogramSnapshot) {
        let l: Vec<(&str, &str)> = self.labels.iter().chain(labels).copied().collect();
        self.inner.histogram(desc, &l, h);
    }
}

/// Counters and latency of one operation kind.
#[derive(Debug, Default)]
pub struct OpStats {
    /// Calls, objects, bytes, failures.
    pub counters: OpCounters,
    /// Per-call latency.
    pub latency: LatencyHistogram,
}

impl OpStats {
    /// Records one call.
    pub fn record(&self, ok_objects: u64, ok_bytes: u64, failed: u64, took: Duration) {
        let c = &self.counters;
        c.calls_total.inc();
        c.objects_total.add(ok_objects);
        c.bytes_total.add(ok_bytes);
        c.failed_objects_total.add(failed);
        self.latency.record(took);
    }

    /// JSON for the status tree: the counters, then mean/p50/p99 latency (`null` when empty).
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = status_fields(&self.counters);
        let h = &self.latency;
        let n = h.count();
        let q = |x: f64| (n > 0).then_some(x);
        m.insert(
            "latency_mean_seconds".into(),
            q(h.sum_seconds() / n.max(1) as f64).into(),
        );
        m.insert("latency_p50_seconds".into(), q(h.quantile(0.5)).into());
        m.insert("latency_p99_seconds".into(), q(h.quantile(0.99)).into());
        m.into()
    }
}

/// What the instrumentation around an adapter records: one [`OpStats`] per operation kind
/// and the lookup misses.
#[derive(Debug, Default)]
pub struct AdapterStats {
    /// Stores (objects written or already held).
    pub store: OpStats,
    /// Loads.
    pub load: OpStats,
    /// Lookups (`objects` = hits; misses are not failures, see `lookups`).
    pub lookup: OpStats,
    /// Deletes (`objects` = deleted).
    pub delete: OpStats,
    /// Lookup misses.
    pub lookups: LookupCounters,
}

impl AdapterStats {
    /// Accounts for one `lookup_and_pin` of `requested` keys whose per-key result is `found`.
    pub fn record_lookup(&self, requested: usize, found: &[Option<u64>], elapsed: Duration) {
        let hits = found.iter().flatten().count() as u64;
        self.lookups
            .lookup_misses_total
            .add((requested as u64).saturating_sub(hits));
        self.lookup.record(hits, 0, 0, elapsed);
    }

    fn ops(&self) -> [&OpStats; 4] {
        [&self.store, &self.load, &self.lookup, &self.delete]
    }

    /// JSON for the status tree (`ops`), with the adapter's own `events` after the op stats.
    pub fn to_json(&self, events: Option<&AdapterEvents>) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("store".into(), self.store.to_json());
        m.insert("load".into(), self.load.to_json());
        m.insert("lookup".into(), self.lookup.to_json());
        m.extend(status_fields(&self.lookups));
        m.insert("delete".into(), self.delete.to_json());
        m.extend(status_fields(events.unwrap_or(&AdapterEvents::default())));
        m.into()
    }

    /// Visits the op counters (labelled `op`), the latency histograms and the lookup misses.
    pub fn visit(&self, v: &mut dyn MetricVisitor) {
        for (name, op) in OP_NAMES.iter().zip(self.ops()) {
            let labels = [("op", *name)];
            op.counters.visit(&mut Labelled::new(v, &labels));
            v.histogram(&OP_LATENCY, &labels, &op.latency.exposition());
        }
        self.lookups.visit(v);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn catalog_names_are_unique() {
        let mut seen = HashSet::new();
        for d in descriptors() {
            assert!(seen.insert(d.exposed_name()), "{} twice", d.exposed_name());
            assert!(d.name.starts_with("kvtier_l2_"), "{}", d.name);
            assert!(!d.name.ends_with("_total"), "{}", d.name);
        }
    }

    #[test]
    fn empty_latency_reports_null() {
        let s = OpStats::default();
        let v = s.to_json();
        assert!(v["latency_p50_seconds"].is_null(), "{v}");
        assert!(v["latency_mean_seconds"].is_null(), "{v}");
        s.record(1, 10, 0, Duration::from_micros(100));
        let v = s.to_json();
        assert_eq!(v["calls_total"], 1);
        assert_eq!(v["bytes_total"], 10);
        let p50 = v["latency_p50_seconds"].as_f64().unwrap_or(0.0);
        assert!((100e-6..=125e-6).contains(&p50), "{p50}");
    }
}
