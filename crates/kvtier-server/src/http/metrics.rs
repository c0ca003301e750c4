//! `GET /metrics`: Prometheus (OpenMetrics text) exposition through `prometheus-client`.
//!
//! Every family is produced by one [`prometheus_client::collector::Collector`] that reads the
//! server's existing lock-free counters at scrape time. Nothing is recorded twice: the request
//! path keeps doing only its relaxed atomic increments (`RpcStats`, `L1Counters`,
//! `EngineCounters`, `TransportStats`), and a scrape turns them into families. In particular the
//! per-op latency histograms are the existing [`LatencyHistogram`](crate::stats::LatencyHistogram)s
//! read into exact power-of-two buckets: `prometheus_client`'s own `Histogram` takes a mutex on
//! every `observe`, which would put a lock shared by all workers on the request path.
//!
//! Naming: `kvtier_<subsystem>_<name>_<unit>[_total]`; the unit suffix and `_total` are added by
//! the encoder from the declared unit and type. Labels are bounded: `op` takes values from the
//! fixed operation table (an op appears once it has been requested), `result` is one of
//! `ok|malformed|unsupported|failed`, `route` is one of the fixed admin routes or `unmatched`,
//! and `code` is an HTTP status code. Every family carries HELP and TYPE (and UNIT when it has
//! one).
//!
//! Cost of a scrape: O(operations × buckets + admin routes), two brief O(1) engine lock
//! acquisitions (pending-transfer counts, context count) and one status-tree build for
//! `kvtier_status_healthy`; never a walk over cached objects.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use kvtier_core::status::{StatusNode, StatusReport};

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::registry::{Registry, Unit};

use crate::server::StatusSource;
use crate::stats::Outcome;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Counters and liveness of the admin API itself (reported in the status tree as `http` and
/// in `/metrics` as `kvtier_http_*`).
#[derive(Debug, Default)]
pub struct HttpStats {
    /// `(route, status code)` → requests. Bounded: routes are the fixed table plus `unmatched`.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Requests refused for a missing or wrong token.
    pub auth_failures: AtomicU64,
    /// Bound address, once listening.
    pub(crate) addr: OnceLock<SocketAddr>,
    /// Whether a token is required.
    pub(crate) authenticated: AtomicBool,
    /// True while the server task runs.
    pub(crate) serving: AtomicBool,
    /// Set before an orderly stop, so a stopped task is not reported as a failure.
    pub(crate) stopping: AtomicBool,
}

impl StatusReport for HttpStats {
    fn report_status(&self) -> StatusNode {
        let serving = self.serving.load(Relaxed);
        let requests: u64 = self.requests.lock().values().sum();
        StatusNode::healthy()
            .require(
                serving || self.stopping.load(Relaxed),
                "http server task is not running",
            )
            .field("address", self.addr.get().map(ToString::to_string))
            .field("serving", serving)
            .field("auth_required", self.authenticated.load(Relaxed))
            .field("requests_total", requests)
            .field("auth_failures_total", self.auth_failures.load(Relaxed))
    }
}

impl HttpStats {
    /// Counts one answered request.
    pub fn record(&self, route: &'static str, code: u16) {
        *self.requests.lock().entry((route, code)).or_insert(0) += 1;
    }

    /// A copy of the per-route counts.
    pub fn requests(&self) -> Vec<((&'static str, u16), u64)> {
        self.requests.lock().iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// Builds the registry served at `/metrics`.
pub fn registry(source: StatusSource, http: Arc<HttpStats>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(KvtierCollector { source, http }));
    registry
}

/// Renders the registry as OpenMetrics text.
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

#[derive(Debug)]
struct KvtierCollector {
    source: StatusSource,
    http: Arc<HttpStats>,
}

type NoExemplar<'a> = Option<&'a Exemplar<NoLabelSet, u64>>;

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    let none: NoExemplar<'_> = None;
    m.encode_counter(&value, none)
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: V,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    m.encode_gauge(&value)
}

fn labelled_counter(m: &mut MetricEncoder<'_>, labels: &[(&str, &str)], value: u64) -> fmt::Result {
    let mut f = m.encode_family(&labels)?;
    let none: NoExemplar<'_> = None;
    f.encode_counter(&value, none)
}

const RESULTS: [(Outcome, &str); 4] = [
    (Outcome::Ok, "ok"),
    (Outcome::Malformed, "malformed"),
    (Outcome::Unsupported, "unsupported"),
    (Outcome::Failed, "failed"),
];

impl KvtierCollector {
    fn rpc(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let rpc = self.source.rpc();
        let seen: Vec<_> = rpc.iter().filter(|(_, s)| s.latency.count() > 0).collect();
        {
            let mut m = enc.encode_descriptor(
                "kvtier_rpc_requests",
                "RPC requests answered, by operation and result (ok, malformed, unsupported, failed).",
                None,
                MetricType::Counter,
            )?;
            for (op, s) in &seen {
                for (outcome, result) in RESULTS {
                    let v = match outcome {
                        Outcome::Ok => s.ok.load(Relaxed),
                        Outcome::Malformed => s.malformed.load(Relaxed),
                        Outcome::Unsupported => s.unsupported.load(Relaxed),
                        Outcome::Failed => s.failed.load(Relaxed),
                    };
                    labelled_counter(&mut m, &[("op", op.name()), ("result", result)], v)?;
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "kvtier_rpc_request_duration",
            "RPC handler latency (decode + handle + encode, excluding queueing), by operation.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (op, s) in &seen {
            let snap = s.latency.exposition();
            let labels = [("op", op.name())];
            let mut f = m.encode_family(&labels)?;
            f.encode_histogram::<NoLabelSet>(snap.sum_seconds, snap.count, &snap.buckets, None)?;
        }
        Ok(())
    }

    fn l1(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let engine = self.source.engine();
        let l1 = engine.l1();
        let c = l1.counters();
        let (used, total) = l1.usage();
        let b = Some(&Unit::Bytes);
        gauge(
            enc,
            "kvtier_l1_used",
            "L1 bytes allocated to objects (staging included).",
            b,
            used,
        )?;
        gauge(enc, "kvtier_l1_capacity", "Usable L1 pool size.", b, total)?;
        let objects: [(&str, &str, &AtomicU64); 5] = [
            (
                "kvtier_l1_objects",
                "Objects in L1 (every phase).",
                &c.objects,
            ),
            (
                "kvtier_l1_read_locked_objects",
                "L1 objects holding at least one read lock.",
                &c.read_locked_objects,
            ),
            (
                "kvtier_l1_staging_objects",
                "L1 objects reserved for a store and not yet committed (write-locked).",
                &c.staging_objects,
            ),
            (
                "kvtier_l1_temporary_objects",
                "Temporary L1 objects (freed on their last read unlock).",
                &c.temporary_objects,
            ),
            (
                "kvtier_l1_doomed_objects",
                "Deleted L1 objects waiting for their readers to finish.",
                &c.doomed_objects,
            ),
        ];
        for (name, help, v) in objects {
            gauge(enc, name, help, None, v.load(Relaxed))?;
        }
        gauge(
            enc,
            "kvtier_l1_staging",
            "L1 bytes reserved for stores not yet committed.",
            b,
            c.staging_bytes.load(Relaxed),
        )?;
        let totals: [(&str, &str, Option<&Unit>, &AtomicU64); 9] = [
            (
                "kvtier_l1_evicted_objects",
                "Objects evicted from L1.",
                None,
                &c.evicted_objects_total,
            ),
            (
                "kvtier_l1_evicted",
                "Bytes evicted from L1.",
                b,
                &c.evicted_bytes_total,
            ),
            (
                "kvtier_l1_sync_evictions",
                "Synchronous evictions run by an allocation that did not fit.",
                None,
                &c.sync_evictions_total,
            ),
            (
                "kvtier_l1_oom_keys",
                "Keys whose store was rejected because L1 had no room even after eviction.",
                None,
                &c.oom_keys_total,
            ),
            (
                "kvtier_l1_writes_committed",
                "L1 writes published.",
                None,
                &c.writes_committed_total,
            ),
            (
                "kvtier_l1_writes_aborted",
                "L1 writes aborted before being published.",
                None,
                &c.writes_aborted_total,
            ),
            (
                "kvtier_l1_read_locks",
                "L1 read locks granted.",
                None,
                &c.read_locks_total,
            ),
            (
                "kvtier_l1_expired_write_locks",
                "Store reservations discarded because their write TTL lapsed.",
                None,
                &c.expired_write_locks_total,
            ),
            (
                "kvtier_l1_expired_read_locks",
                "Read locks released because their TTL lapsed.",
                None,
                &c.expired_read_locks_total,
            ),
        ];
        for (name, help, unit, v) in totals {
            counter(enc, name, help, unit, v.load(Relaxed))?;
        }
        let evictor = engine.evictor();
        counter(
            enc,
            "kvtier_l1_eviction_rounds",
            "Background eviction rounds run.",
            None,
            evictor.rounds(),
        )?;
        counter(
            enc,
            "kvtier_l1_eviction_triggered_rounds",
            "Background eviction rounds that evicted something.",
            None,
            evictor.triggered_rounds(),
        )?;
        gauge(
            enc,
            "kvtier_l1_eviction_thread_up",
            "1 while the background eviction thread runs.",
            None,
            u64::from(evictor.is_alive()),
        )
    }

    fn engine(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let engine = self.source.engine();
        let c = engine.counters();
        let totals: [(&str, &str, &AtomicU64); 13] = [
            (
                "kvtier_store_chunks_reserved",
                "Chunks reserved by prepare_store.",
                &c.store_chunks_reserved,
            ),
            (
                "kvtier_store_chunks_skipped",
                "Chunks prepare_store skipped (already cached or being written).",
                &c.store_chunks_skipped,
            ),
            (
                "kvtier_store_chunks_rejected",
                "Chunks prepare_store rejected for lack of L1 memory.",
                &c.store_chunks_rejected,
            ),
            (
                "kvtier_store_chunks_committed",
                "Chunks published by commit_store.",
                &c.store_chunks_committed,
            ),
            ("kvtier_lookup_requests", "Lookups served.", &c.lookups),
            (
                "kvtier_lookup_chunks_requested",
                "Chunks asked for by lookups.",
                &c.lookup_chunks_requested,
            ),
            (
                "kvtier_lookup_chunks_hit",
                "Prefix chunks found by lookups.",
                &c.lookup_chunks_hit,
            ),
            (
                "kvtier_retrieve_chunks",
                "Chunks handed out by prepare_retrieve.",
                &c.retrieve_chunks,
            ),
            (
                "kvtier_retrieve_refused",
                "prepare_retrieve refusals (chunks not locked by the session's lookup).",
                &c.retrieve_refused,
            ),
            (
                "kvtier_engine_abandoned_transfers",
                "Prepared stores/retrieves dropped because the client never committed them.",
                &c.abandoned_transfers,
            ),
            (
                "kvtier_engine_unknown_prefetch_queries",
                "Prefetch status queries for an unknown request id.",
                &c.unknown_prefetch_queries,
            ),
            (
                "kvtier_engine_instances_reaped",
                "Engine instances unregistered after going silent.",
                &c.instances_reaped,
            ),
            (
                "kvtier_sessions_locks_released",
                "Read locks released by session end, TTL or free_lookup_locks.",
                &c.session_locks_released,
            ),
        ];
        for (name, help, v) in totals {
            counter(enc, name, help, None, v.load(Relaxed))?;
        }
        let (stores, retrieves) = engine.pending_transfer_counts();
        gauge(
            enc,
            "kvtier_engine_pending_stores",
            "Prepared stores awaiting commit_store.",
            None,
            stores,
        )?;
        gauge(
            enc,
            "kvtier_engine_pending_retrieves",
            "Prepared retrieves awaiting commit_retrieve.",
            None,
            retrieves,
        )?;
        gauge(
            enc,
            "kvtier_engine_registered_instances",
            "Registered engine instances (contexts).",
            None,
            engine.registered_instance_count(),
        )?;
        let s = engine.sessions();
        gauge(
            enc,
            "kvtier_sessions_active",
            "Open request sessions.",
            None,
            s.active_count(),
        )?;
        let sessions: [(&str, &str, &AtomicU64); 3] = [
            (
                "kvtier_sessions_created",
                "Request sessions created.",
                &s.created_total,
            ),
            (
                "kvtier_sessions_ended",
                "Request sessions ended by the client.",
                &s.ended_total,
            ),
            (
                "kvtier_sessions_expired",
                "Request sessions expired by TTL.",
                &s.expired_total,
            ),
        ];
        for (name, help, v) in sessions {
            counter(enc, name, help, None, v.load(Relaxed))?;
        }
        Ok(())
    }

    fn transport(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let t = self.source.frontend().stats();
        let totals: [(&str, &str, &AtomicU64); 7] = [
            (
                "kvtier_transport_received_messages",
                "ZeroMQ messages received.",
                &t.received,
            ),
            (
                "kvtier_transport_replied_messages",
                "Replies sent.",
                &t.replied,
            ),
            (
                "kvtier_transport_too_few_frames",
                "Messages dropped for having too few frames to address a reply.",
                &t.too_few_frames,
            ),
            (
                "kvtier_transport_unknown_ops",
                "Requests naming an operation outside the table.",
                &t.unknown_op,
            ),
            (
                "kvtier_transport_control_frames",
                "Stream control frames (ack/cancel) received.",
                &t.control_frames,
            ),
            (
                "kvtier_transport_rejected_busy",
                "Requests answered with a failure at once because a worker queue was full.",
                &t.rejected_busy,
            ),
            (
                "kvtier_transport_send_failures",
                "Replies that could not be sent.",
                &t.send_failures,
            ),
        ];
        for (name, help, v) in totals {
            counter(enc, name, help, None, v.load(Relaxed))?;
        }
        gauge(
            enc,
            "kvtier_transport_in_flight_requests",
            "Requests received and not yet answered.",
            None,
            t.in_flight.load(Relaxed),
        )
    }

    fn http_and_process(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        {
            let mut m = enc.encode_descriptor(
                "kvtier_http_requests",
                "Admin API requests answered, by route and status code.",
                None,
                MetricType::Counter,
            )?;
            let mut code = String::with_capacity(3);
            for ((route, status), v) in self.http.requests() {
                code.clear();
                write!(code, "{status}")?;
                labelled_counter(&mut m, &[("route", route), ("code", code.as_str())], v)?;
            }
        }
        counter(
            enc,
            "kvtier_http_auth_failures",
            "Admin API requests refused for a missing or wrong bearer token.",
            None,
            self.http.auth_failures.load(Relaxed),
        )?;
        gauge(
            enc,
            "kvtier_status_healthy",
            "1 when the whole status tree is healthy (see /api/healthcheck for the reasons).",
            None,
            u64::from(self.source.status().is_healthy()),
        )?;
        gauge(
            enc,
            "kvtier_process_uptime",
            "Time since the server started.",
            Some(&Unit::Seconds),
            self.source.uptime().as_secs_f64(),
        )?;
        let mut m = enc.encode_descriptor(
            "kvtier_build_info",
            "Build information; the value is always 1.",
            None,
            MetricType::Gauge,
        )?;
        let mut f = m.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?;
        f.encode_gauge(&1u64)
    }
}

impl Collector for KvtierCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        self.rpc(&mut enc)?;
        self.l1(&mut enc)?;
        self.engine(&mut enc)?;
        self.transport(&mut enc)?;
        self.http_and_process(&mut enc)
    }
}
