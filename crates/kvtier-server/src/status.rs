//! The root of the status tree and the list of every metric set, assembled from the running
//! components ([`StatusSource`]). Building either reads atomics and takes brief O(1) locks; it
//! never takes the L1 lock or walks cached objects.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use kvtier_core::metrics::MetricSet;
use kvtier_core::periodic::PeriodicThread;
use kvtier_core::status::{StatusNode, StatusReport};

use crate::analysis::hit_curve::{CurveReport, HitCurve};
use crate::analysis::lookup_log::LookupLog;
use crate::config::ServerConfig;
use crate::engine::Engine;
use crate::http::metrics::HttpStats;
use crate::prefault::Prefault;
use crate::stats::RpcStats;
use crate::telemetry::Telemetry;
use crate::transport::ZmqFrontEnd;

/// Shared view for the HTTP API: builds the status tree on demand.
#[derive(Debug, Clone)]
pub struct StatusSource {
    pub(crate) inner: Arc<StatusParts>,
}

/// What [`StatusSource`] reads.
#[derive(Debug)]
pub(crate) struct StatusParts {
    pub(crate) engine: Arc<Engine>,
    pub(crate) rpc: Arc<RpcStats>,
    pub(crate) token_arrays: crate::stats::TokenArrayMetrics,
    pub(crate) started: Instant,
    pub(crate) housekeeper: Arc<PeriodicThread>,
    pub(crate) config: ServerConfig,
    pub(crate) frontend: Arc<ZmqFrontEnd>,
    pub(crate) prefault: Arc<Prefault>,
    pub(crate) http: Arc<HttpStats>,
    pub(crate) telemetry: Arc<Telemetry>,
    pub(crate) hit_curve: Arc<HitCurve>,
    pub(crate) lookup_log: Option<Arc<LookupLog>>,
}

impl StatusSource {
    /// The whole status tree.
    pub fn status(&self) -> StatusNode {
        let p = &self.inner;
        let mut rpc = StatusNode::healthy();
        let mut unsupported = serde_json::Map::new();
        for (op, s) in p.rpc.iter() {
            let count = s.latency.count();
            if count == 0 {
                continue;
            }
            let un = s.unsupported.load(Relaxed);
            if un > 0 {
                unsupported.insert(op.name().to_owned(), un.into());
            }
            rpc = rpc.field(
                op.name(),
                serde_json::json!({
                    "count": count,
                    "ok": s.ok.load(Relaxed),
                    "malformed": s.malformed.load(Relaxed),
                    "unsupported": un,
                    "failed": s.failed.load(Relaxed),
                    "latency_p50_seconds": s.latency.quantile(0.5),
                    "latency_p99_seconds": s.latency.quantile(0.99),
                }),
            );
        }
        let mut root = p
            .engine
            .report_status()
            .child(
                "housekeeping",
                p.housekeeper.status_node().field(
                    "interval_seconds",
                    p.housekeeper.interval().map_or(0.0, |d| d.as_secs_f64()),
                ),
            )
            .child(
                "rpc",
                rpc.field("token_arrays", p.token_arrays.status_value()),
            )
            .field("unsupported_op_counts", unsupported);
        root = root.child("transport", p.frontend.report_status());
        root = root.child("l1_prefault", p.prefault.report_status());
        if p.config.http.is_some() {
            root = root.child("http", p.http.report_status());
        }
        root = root.child("telemetry", p.telemetry.report_status());
        root = root.child(
            "hit_rate_curve",
            p.hit_curve.status_node(p.engine.l1().capacity_bytes()),
        );
        if let Some(log) = &p.lookup_log {
            root = root.child("lookup_log", log.status_node());
        }
        if let Some(publisher) = p.engine.kv_events().publisher() {
            root = root.child("kv_events_publisher", publisher.status_node());
        }
        root.field("uptime_seconds", p.started.elapsed().as_secs_f64())
            .field("version", env!("CARGO_PKG_VERSION"))
            .field("instance_id", p.config.instance_id.as_str())
    }

    /// Every metric set of the server, for `/metrics` (the catalog test checks this list
    /// against the status tree).
    pub fn metric_sets(&self) -> Vec<&dyn MetricSet> {
        let p = &self.inner;
        let engine = &p.engine;
        let mut sets: Vec<&dyn MetricSet> = vec![p.rpc.as_ref(), &p.token_arrays];
        sets.extend(engine.metric_sets());
        sets.push(p.frontend.stats());
        sets.push(p.frontend.access().stats());
        if let Some(zap) = p.frontend.access().thread() {
            sets.push(zap);
        }
        sets.push(p.housekeeper.as_ref());
        sets.push(p.telemetry.as_ref());
        sets.push(p.telemetry.thread());
        sets.push(p.prefault.thread());
        sets.push(p.http.as_ref());
        sets.push(p.hit_curve.as_ref());
        if let Some(log) = &p.lookup_log {
            sets.push(log.as_ref());
        }
        if let Some(publisher) = engine.kv_events().publisher() {
            sets.push(publisher.as_ref());
        }
        sets
    }

    /// The effective configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.inner.engine
    }

    /// Per-op statistics.
    pub fn rpc(&self) -> &Arc<RpcStats> {
        &self.inner.rpc
    }

    /// The ZeroMQ front end (transport counters).
    pub fn frontend(&self) -> &Arc<ZmqFrontEnd> {
        &self.inner.frontend
    }

    /// Time since the server started.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Counters and liveness of the HTTP API.
    pub fn http_stats(&self) -> &Arc<HttpStats> {
        &self.inner.http
    }

    /// The live hit-rate curve at L1's sizes and each L2 adapter's capacity
    /// (`GET /api/hit-rate-curve`).
    pub fn hit_curve_report(&self) -> CurveReport {
        let engine = &self.inner.engine;
        let l2: Vec<(String, u64)> = engine.l2().map_or_else(Vec::new, |tier| {
            tier.adapters()
                .iter()
                .zip(tier.configs())
                .enumerate()
                .filter_map(|(i, (a, c))| {
                    let cap = a.usage().capacity_bytes;
                    (cap > 0).then(|| (format!("l2[{i}]:{}", c.kind()), cap))
                })
                .collect()
        });
        self.inner
            .hit_curve
            .report(engine.l1().capacity_bytes(), &l2)
    }

    /// The telemetry ring (the dashboard's time series).
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.inner.telemetry
    }
}
