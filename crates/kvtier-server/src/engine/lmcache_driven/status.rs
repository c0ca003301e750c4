//! The `lmcache_driven` node of the status tree: every registration (or the reason it was
//! refused), with its geometry, mappings and liveness, and the path's counters.
//!
//! Each registration is a client node under `contexts`: a registration whose segment was
//! truncated under the server (see [`super::fault`]) is unhealthy, with the reason, until the
//! engine registers again or the instance goes; a refused one is healthy (it was never
//! serving, and its reason is in `reason`). Client nodes do not make the server unhealthy: one
//! engine's broken segment must not fail the readiness probe that every other engine relies on.

use std::collections::BTreeSet;

use kvtier_core::metrics::status_fields;
use kvtier_core::status::StatusNode;
use serde::Serialize;

use super::LmcacheDriven;
use super::layout;
use crate::engine::instances::WorkerSnapshot;

impl LmcacheDriven {
    /// The `lmcache_driven` status child: every registration (or refusal) and the counters.
    pub(in crate::engine) fn status(&self, workers: &[WorkerSnapshot]) -> StatusNode {
        let mut contexts = Vec::new();
        let (mut registered, mut refused, mut faulted) = (0u64, 0u64, 0u64);
        for w in workers {
            let Some(inst) = &w.lmcache_driven else {
                continue;
            };
            let mut fault = None;
            let state = match &inst.kv {
                Ok(kv) => {
                    registered += 1;
                    fault = kv.fault();
                    let runs: BTreeSet<&'static str> =
                        kv.layers().iter().map(|l| l.run.name()).collect();
                    ContextState::Registered {
                        geometry: kv.geometry().clone(),
                        object_bytes: kv.object_len(),
                        object_shape: kv.geometry().object_shape(),
                        num_groups: kv.num_groups(),
                        segments: kv.segment_names().count(),
                        mapped_bytes: kv.mapped_bytes(),
                        copy_granularity: runs.into_iter().collect(),
                    }
                }
                Err(reason) => {
                    refused += 1;
                    ContextState::Refused {
                        reason: reason.clone(),
                    }
                }
            };
            let status = ContextStatus {
                state,
                model_name: inst.model_name.clone(),
                world_size: inst.world_size,
                engine_type: inst.engine_type.clone(),
                registered_seconds_ago: w.liveness.registered_seconds_ago,
                idle_seconds: w.liveness.idle_seconds,
                pinged: w.liveness.pinged,
            };
            let fields = match serde_json::to_value(status) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => serde_json::Map::new(),
            };
            let node = match fault {
                Some(f) => {
                    faulted += 1;
                    StatusNode::unhealthy(f.to_string()).fields(fields)
                }
                None => StatusNode::healthy().fields(fields),
            };
            contexts.push((w.instance_id.to_string(), node));
        }
        StatusNode::healthy()
            .client_map("contexts", contexts)
            .field("registered_instances", registered)
            .field("refused_instances", refused)
            .field("faulted_instances", faulted)
            .field("sigbus_cured_faults", super::fault::cured_faults())
            .field("copy_threads", self.threads.get())
            .field("counters", status_fields(&self.counters))
    }
}

/// One registration in the status tree.
#[derive(Debug, Serialize)]
struct ContextStatus {
    #[serde(flatten)]
    state: ContextState,
    model_name: String,
    world_size: u32,
    engine_type: String,
    registered_seconds_ago: f64,
    idle_seconds: f64,
    pinged: bool,
}

#[derive(Debug, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum ContextState {
    Registered {
        geometry: layout::KvGeometry,
        object_bytes: usize,
        object_shape: Vec<u64>,
        num_groups: usize,
        segments: usize,
        mapped_bytes: usize,
        copy_granularity: Vec<&'static str>,
    },
    Refused {
        reason: String,
    },
}
