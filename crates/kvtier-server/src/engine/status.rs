//! The engine's subtree of the status tree and its metric sets.
//!
//! Field names follow LMCache 0.5.6's `/status` where it has them (`storage_manager`,
//! `l1_manager`, `l1_eviction_controller`, `registered_non_cuda_instance_ids`, ...). Every
//! counter shown here comes from a catalog declaration ([`kvtier_core::metrics`]) through
//! `status_fields`, and [`Engine`]'s [`MetricSet`] visits the same declarations for
//! `/metrics`, so the two cannot drift apart. Building the subtree reads atomics and takes a
//! few brief O(1)/O(workers) locks; it never walks cached objects.

use std::collections::BTreeMap;

use kvtier_core::metrics::{
    MetricDesc, MetricKind, MetricSet, MetricUnit, MetricVisitor, status_fields,
};
use kvtier_core::status::{StatusNode, StatusReport};
use serde::Serialize;

use super::Engine;

/// One engine-driven context in `non_cuda_context_meta`.
#[derive(Debug, Serialize)]
struct ContextMeta<'a> {
    model_name: &'a str,
    world_size: u32,
    block_size: u32,
    use_mla: bool,
    num_layers: u32,
    hidden_dim_size: u32,
    dtype: &'a str,
    slot_shape: &'a [u64],
    object_bytes: u64,
    pinged: bool,
}

/// `worker_liveness`.
#[derive(Debug, Serialize)]
struct WorkerLivenessStatus {
    enabled: bool,
    reap_timeout_seconds: f64,
    registration_grace_seconds: f64,
    tracked_instances: usize,
    reaped_instances_total: u64,
}

/// Gauges computed at read time (not atomics of a set).
static ENGINE_GAUGES: [MetricDesc; 5] = [
    MetricDesc {
        name: "kvtier_engine_pending_stores",
        status_key: "pending_stores",
        help: "Engine-driven stores prepared and not yet committed.",
        unit: MetricUnit::None,
        kind: MetricKind::Gauge,
    },
    MetricDesc {
        name: "kvtier_engine_pending_retrieves",
        status_key: "pending_retrieves",
        help: "Engine-driven retrieves prepared and not yet committed.",
        unit: MetricUnit::None,
        kind: MetricKind::Gauge,
    },
    MetricDesc {
        name: "kvtier_l1_capacity",
        status_key: "memory_total_bytes",
        help: "Usable L1 pool size.",
        unit: MetricUnit::Bytes,
        kind: MetricKind::Gauge,
    },
    MetricDesc {
        name: "kvtier_l1_store_starved",
        status_key: "store_starved_seconds",
        help: "How long L1 has refused every store for lack of room (0 when it is not).",
        unit: MetricUnit::Seconds,
        kind: MetricKind::Gauge,
    },
    MetricDesc {
        name: "kvtier_engine_registered_instances",
        status_key: "tracked_instances",
        help: "Engine workers registered (either transfer mode).",
        unit: MetricUnit::None,
        kind: MetricKind::Gauge,
    },
];

impl Engine {
    /// Every metric set of the engine: its components' declared sets, then the engine's
    /// computed gauges (`self`), L1, L1's tenants (top N + `other`), the eviction controller and its thread, and L2.
    pub fn metric_sets(&self) -> Vec<&dyn MetricSet> {
        let cx = self.shared();
        let mut sets: Vec<&dyn MetricSet> = vec![
            &cx.counters,
            cx.sessions.metrics(),
            cx.l2.counters(),
            self.lmcache_driven().counters(),
            cx.events.counters(),
            cx.events.as_ref(),
            &cx.explain,
            self,
            cx.l1.counters(),
            &**cx.l1.tenants(),
            &cx.evictor,
            cx.evictor.thread(),
        ];
        if let Some(l2) = cx.l2.tier() {
            sets.push(l2);
        }
        sets
    }
}

impl MetricSet for Engine {
    fn descriptors(&self) -> &'static [MetricDesc] {
        &ENGINE_GAUGES
    }

    /// The computed gauges only; the components' sets are listed by [`Engine::metric_sets`].
    fn visit(&self, v: &mut dyn MetricVisitor) {
        let (stores, retrieves) = self.engine_driven().pending_counts();
        let [
            pending_stores,
            pending_retrieves,
            capacity,
            starved,
            registered,
        ] = &ENGINE_GAUGES;
        v.gauge(pending_stores, &[], stores as f64);
        v.gauge(pending_retrieves, &[], retrieves as f64);
        v.gauge(capacity, &[], self.shared().l1.capacity_bytes() as f64);
        let l1 = &self.shared().l1;
        v.gauge(
            starved,
            &[],
            l1.store_starved().map_or(0.0, |s| s.for_seconds),
        );
        v.gauge(registered, &[], self.shared().instances.len() as f64);
    }
}

impl Engine {
    /// `storage_manager.eviction_controller`: the L1 policy and its thresholds.
    fn eviction_summary(&self) -> StatusNode {
        let cfg = self.shared().evictor.report_status();
        let v = serde_json::to_value(&cfg).unwrap_or_default();
        let mut node = StatusNode::healthy();
        for k in ["eviction_policy", "trigger_watermark", "eviction_ratio"] {
            node = node.field(k, v.get(k).cloned().unwrap_or_default());
        }
        node
    }
}

impl StatusReport for Engine {
    fn report_status(&self) -> StatusNode {
        let cx = self.shared();
        let now = cx.l1.clock().now();
        let (used, total) = cx.l1.usage();
        let (store, prefetch, adapters, active_prefetch_jobs) = cx.l2.status();
        let num_adapters = adapters.len();
        let mut l2 = status_fields(cx.l2.counters());
        l2.insert("enabled".into(), cx.l2.tier().is_some().into());
        let storage = StatusNode::healthy()
            .child("l1_manager", cx.l1.report_status())
            .child("l1_eviction_controller", cx.evictor.report_status())
            // Where `lmcache describe kvcache` reads the policy (LMCache's own server names the
            // node `l1_eviction_controllers`, so that line is empty against LMCache itself).
            .child("eviction_controller", self.eviction_summary())
            .child("store_controller", store)
            .child("prefetch_controller", prefetch)
            .child_list("l2_adapters", adapters)
            .field("num_l2_adapters", num_adapters)
            .field("l1_usage", [used, total])
            .field("l2", l2);

        let workers = cx.instances.snapshot(now);
        let mut engine_driven_ids = Vec::new();
        let mut meta = BTreeMap::new();
        // LMCache's `cache_context_meta` (what `lmcache describe kvcache` reads for its model
        // sections), keyed by instance id: every registration of either transfer mode.
        let mut context_meta = serde_json::Map::new();
        for w in &workers {
            if let Some(l) = &w.lmcache_driven {
                context_meta.insert(
                    w.instance_id.to_string(),
                    serde_json::json!({
                        "model_name": l.model_name(),
                        "world_size": l.world_size(),
                        "transfer_mode": "lmcache_driven",
                        "kv_cache_layout": l.layout_meta(),
                    }),
                );
            }
            let Some(c) = &w.engine_driven else { continue };
            let per_token = c.object_len / cx.chunk_size.max(1) as u64;
            context_meta.insert(
                w.instance_id.to_string(),
                serde_json::json!({
                    "model_name": c.info.model_name,
                    "world_size": c.info.world_size,
                    "transfer_mode": "engine_driven",
                    "kv_cache_layout": {
                        "num_layers": c.info.num_layers,
                        "cache_size_per_token": per_token,
                        "kernel_groups": [{
                            "kernel_group_idx": 0,
                            "engine_group_idx": 0,
                            "object_group_idx": 0,
                            "num_layers": c.info.num_layers,
                            "tokens_per_block": c.info.block_size,
                            "dtype": c.info.dtype_str,
                            "is_mla": c.info.use_mla,
                            "engine_kv_shape": c.shape,
                        }],
                    },
                }),
            );
            engine_driven_ids.push(w.instance_id);
            meta.insert(
                w.instance_id.to_string(),
                ContextMeta {
                    model_name: &c.info.model_name,
                    world_size: c.info.world_size,
                    block_size: c.info.block_size,
                    use_mla: c.info.use_mla,
                    num_layers: c.info.num_layers,
                    hidden_dim_size: c.info.hidden_dim_size,
                    dtype: &c.info.dtype_str,
                    slot_shape: &c.shape,
                    object_bytes: c.object_len,
                    pinged: w.liveness.pinged,
                },
            );
        }
        let liveness = cx.instances.liveness();
        let worker_liveness = WorkerLivenessStatus {
            enabled: !liveness.reap_timeout.is_zero(),
            reap_timeout_seconds: liveness.reap_timeout.as_secs_f64(),
            registration_grace_seconds: liveness.registration_grace.as_secs_f64(),
            tracked_instances: workers.len(),
            reaped_instances_total: cx.counters.reaped_instances_total.get(),
        };

        let mut sessions = status_fields(cx.sessions.metrics());
        sessions.insert("ttl_seconds".into(), cx.sessions.ttl().as_secs_f64().into());
        sessions.insert("max_sessions".into(), cx.sessions.max_sessions().into());
        let (pending_stores, pending_retrieves) = self.engine_driven().pending_counts();
        let mut transfers = serde_json::Map::new();
        transfers.insert("pending_stores".into(), pending_stores.into());
        transfers.insert("pending_retrieves".into(), pending_retrieves.into());
        let mut counters = status_fields(&cx.counters);
        counters.remove("reaped_instances_total");
        transfers.extend(counters);

        StatusNode::healthy()
            .field("engine_type", "kvtier")
            .field("chunk_size", cx.chunk_size)
            .field("hash_algorithm", cx.sessions.hasher().hash_algorithm_name())
            .field("active_sessions", cx.sessions.active_count())
            .child("storage_manager", storage)
            .field("active_prefetch_jobs", active_prefetch_jobs)
            .child("lmcache_driven", self.lmcache_driven().status(&workers))
            .field("shm_name", cx.segment.name())
            .field("worker_liveness", json(&worker_liveness))
            .field("registered_non_cuda_instance_ids", engine_driven_ids)
            .field("non_cuda_context_meta", json(&meta))
            .field("cache_context_meta", context_meta)
            .field("sessions", sessions)
            .field("transfers", transfers)
            .field("kv_events", cx.events.status())
            .child("explanations", cx.explain.status())
    }
}

/// The status structs above as JSON. They cannot fail to serialise (plain fields, string map
/// keys); a failure would show as `null` rather than take the status down.
fn json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}
