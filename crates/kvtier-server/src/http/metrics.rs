//! `GET /metrics`: Prometheus (OpenMetrics text) exposition through `prometheus-client`.
//!
//! Every family comes from the observability catalog ([`kvtier_core::metrics`]): each
//! component declares its metrics once and implements `MetricSet`; one
//! [`prometheus_client::collector::Collector`] visits every set at scrape time
//! ([`StatusSource::metric_sets`]) and encodes one family per declaration, so `/metrics` cannot
//! fall behind the status tree. Nothing is recorded twice: the request path keeps doing only
//! its relaxed atomic increments. Latency histograms are the workspace's one
//! `LatencyHistogram`, read into exact power-of-two buckets (`prometheus_client`'s own
//! `Histogram` takes a mutex on every `observe`, which would put a lock shared by all workers
//! on the request path).
//!
//! Naming: `kvtier_<subsystem>_<name>_<unit>[_total]`; the unit suffix and `_total` are added by
//! the encoder from the declared unit and type. Labels are bounded: `op` takes values from the
//! fixed operation table (an op appears once it has been requested), `result` is one of
//! `ok|malformed|unsupported|failed`, `route` is one of the fixed admin routes or `unmatched`,
//! and `code` is an HTTP status code. Every family carries HELP and TYPE (and UNIT when it has
//! one).
//!
//! Cost of a scrape: O(metrics + operations × buckets + admin routes), a few brief O(1) engine
//! lock acquisitions and one status-tree build for `kvtier_status_healthy`; never a walk over
//! cached objects.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use kvtier_core::metrics::{
    HistogramSnapshot, Labels, MetricDesc, MetricKind, MetricSet, MetricUnit, MetricVisitor,
};
use kvtier_core::status::{StatusNode, StatusReport};

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::registry::{Registry, Unit};

use crate::server::StatusSource;

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
pub fn registry(source: StatusSource) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(KvtierCollector { source }));
    registry
}

/// Renders the registry as OpenMetrics text.
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

static HTTP_METRICS: [MetricDesc; 2] = [
    MetricDesc {
        name: "kvtier_http_requests",
        status_key: "requests_total",
        help: "Admin API requests answered, by route and status code.",
        unit: MetricUnit::None,
        kind: MetricKind::Counter,
    },
    MetricDesc {
        name: "kvtier_http_auth_failures",
        status_key: "auth_failures_total",
        help: "Admin API requests refused for a missing or wrong bearer token.",
        unit: MetricUnit::None,
        kind: MetricKind::Counter,
    },
];

impl MetricSet for HttpStats {
    fn descriptors(&self) -> &'static [MetricDesc] {
        &HTTP_METRICS
    }

    fn visit(&self, v: &mut dyn MetricVisitor) {
        let [requests, auth] = &HTTP_METRICS;
        for ((route, status), n) in self.requests() {
            let code = status.to_string();
            v.counter(requests, &[("route", route), ("code", &code)], n);
        }
        v.counter(auth, &[], self.auth_failures.load(Relaxed));
    }
}

/// Process-level metrics: health, uptime, build.
static PROCESS_METRICS: [MetricDesc; 3] = [
    MetricDesc {
        name: "kvtier_status_healthy",
        status_key: "is_healthy",
        help: "1 when the whole status tree is healthy (see /api/healthcheck for the reasons).",
        unit: MetricUnit::None,
        kind: MetricKind::Gauge,
    },
    MetricDesc {
        name: "kvtier_process_uptime",
        status_key: "uptime_seconds",
        help: "Time since the server started.",
        unit: MetricUnit::Seconds,
        kind: MetricKind::Gauge,
    },
    MetricDesc {
        name: "kvtier_build_info",
        status_key: "version",
        help: "Build information; the value is always 1.",
        unit: MetricUnit::None,
        kind: MetricKind::Gauge,
    },
];

/// The process-level metric set.
#[derive(Debug)]
pub struct ProcessMetrics<'a>(pub &'a StatusSource);

impl MetricSet for ProcessMetrics<'_> {
    fn descriptors(&self) -> &'static [MetricDesc] {
        &PROCESS_METRICS
    }

    fn visit(&self, v: &mut dyn MetricVisitor) {
        let [healthy, uptime, build] = &PROCESS_METRICS;
        v.gauge(
            healthy,
            &[],
            f64::from(u8::from(self.0.status().is_healthy())),
        );
        v.gauge(uptime, &[], self.0.uptime().as_secs_f64());
        v.gauge(
            build,
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("instance_id", self.0.config().instance_id.as_str()),
            ],
            1.0,
        );
    }
}

#[derive(Debug)]
struct KvtierCollector {
    source: StatusSource,
}

type NoExemplar<'a> = Option<&'a Exemplar<NoLabelSet, u64>>;

#[derive(Debug)]
enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(HistogramSnapshot),
}

/// One sample: owned label pairs and the value.
type Sample = (Vec<(String, String)>, Value);

/// Collects the samples of every visited set, grouped into families by descriptor name in
/// first-seen order.
#[derive(Debug, Default)]
struct Families {
    order: Vec<&'static MetricDesc>,
    samples: BTreeMap<&'static str, Vec<Sample>>,
}

impl Families {
    /// Declares families up front, so a labelled family with no samples yet still has its
    /// HELP and TYPE lines.
    fn declare(&mut self, descs: &'static [MetricDesc]) {
        for desc in descs {
            if !self.samples.contains_key(desc.name) {
                self.samples.insert(desc.name, Vec::new());
                self.order.push(desc);
            }
        }
    }

    fn push(&mut self, desc: &'static MetricDesc, labels: Labels<'_>, value: Value) {
        if !self.samples.contains_key(desc.name) {
            self.order.push(desc);
        }
        let entry = self.samples.entry(desc.name).or_default();
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        entry.push((labels, value));
    }

    fn encode(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        for desc in &self.order {
            let Some(samples) = self.samples.get(desc.name) else {
                continue;
            };
            let (unit, kind) = (unit_of(desc.unit), type_of(desc.kind));
            let help = desc.help_text();
            let mut m = enc.encode_descriptor(desc.name, &help, unit.as_ref(), kind)?;
            for (labels, value) in samples {
                if labels.is_empty() {
                    encode_value(&mut m, value)?;
                } else {
                    encode_value(&mut m.encode_family(labels)?, value)?;
                }
            }
        }
        Ok(())
    }
}

impl MetricVisitor for Families {
    fn counter(&mut self, desc: &'static MetricDesc, labels: Labels<'_>, value: u64) {
        self.push(desc, labels, Value::Counter(value));
    }

    fn gauge(&mut self, desc: &'static MetricDesc, labels: Labels<'_>, value: f64) {
        self.push(desc, labels, Value::Gauge(value));
    }

    fn histogram(
        &mut self,
        desc: &'static MetricDesc,
        labels: Labels<'_>,
        value: &HistogramSnapshot,
    ) {
        self.push(desc, labels, Value::Histogram(value.clone()));
    }
}

/// Writes one sample's value.
fn encode_value(m: &mut MetricEncoder<'_>, value: &Value) -> fmt::Result {
    let none: NoExemplar<'_> = None;
    match value {
        Value::Counter(n) => m.encode_counter(n, none),
        Value::Gauge(x) => match whole(*x) {
            Some(n) => m.encode_gauge(&n),
            None => m.encode_gauge(x),
        },
        Value::Histogram(h) => {
            m.encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)
        }
    }
}

/// A gauge that holds a whole number is written as an integer (`1`, not `1.0`).
fn whole(x: f64) -> Option<u64> {
    (x.fract() == 0.0 && (0.0..9_007_199_254_740_992.0).contains(&x)).then_some(x as u64)
}

fn unit_of(u: MetricUnit) -> Option<Unit> {
    match u {
        MetricUnit::None => None,
        MetricUnit::Bytes => Some(Unit::Bytes),
        MetricUnit::Seconds => Some(Unit::Seconds),
    }
}

fn type_of(k: MetricKind) -> MetricType {
    match k {
        MetricKind::Counter => MetricType::Counter,
        MetricKind::Gauge => MetricType::Gauge,
        MetricKind::Histogram => MetricType::Histogram,
    }
}

impl Collector for KvtierCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let mut families = Families::default();
        let process = ProcessMetrics(&self.source);
        let sets = self.source.metric_sets();
        for set in &sets {
            families.declare(set.descriptors());
        }
        families.declare(process.descriptors());
        for set in &sets {
            set.visit(&mut families);
        }
        process.visit(&mut families);
        families.encode(&mut enc)
    }
}
