//! The observability catalog: every counter, gauge and histogram kvtier exports is declared
//! once, with its name, help text, unit and kind, and every surface is generated from that
//! declaration: the status tree (`GET /api/status`), the Prometheus exposition (`GET /metrics`),
//! the dashboard's time series and the Grafana dashboard check.
//!
//! - [`metric_set!`](crate::metric_set) declares a struct of [`Counter`]s and [`Gauge`]s (relaxed
//!   atomics; recording never takes a lock) together with its static [`MetricDesc`] table.
//! - [`MetricSet`] is what every component that owns metrics implements: it visits its current
//!   values (with bounded labels) through a [`MetricVisitor`]. Macro-declared structs implement
//!   it; components with computed gauges (a map's length, a thread's liveness) or labelled
//!   families implement it by hand over `static` descriptors.
//! - [`status_fields`] turns the unlabelled values of a set into status-tree fields keyed by
//!   [`MetricDesc::status_key`], so the status tree cannot name a counter the catalog lacks.
//! - [`histogram::LatencyHistogram`] is the one latency histogram of the workspace.
//!
//! Naming: [`MetricDesc::name`] is the Prometheus family name *before* the encoder adds the
//! unit suffix and `_total` (`kvtier_l1_evicted` + bytes + counter → `kvtier_l1_evicted_bytes_total`);
//! [`MetricDesc::exposed_name`] gives the final name.

pub mod histogram;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub use histogram::{HistogramSnapshot, LatencyHistogram};

/// The kind of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic count (Prometheus `counter`, name gains `_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A latency distribution.
    Histogram,
}

/// The unit of a metric (Prometheus appends it to the name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricUnit {
    /// Dimensionless (counts of things).
    None,
    /// Bytes.
    Bytes,
    /// Seconds.
    Seconds,
}

impl MetricUnit {
    /// The suffix Prometheus appends (`""` for none).
    pub fn suffix(self) -> &'static str {
        match self {
            Self::None => "",
            Self::Bytes => "bytes",
            Self::Seconds => "seconds",
        }
    }
}

/// One declared metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDesc {
    /// Prometheus family name without unit suffix and `_total` (`kvtier_<subsystem>_<name>`).
    pub name: &'static str,
    /// Key of the value in the status tree (for unlabelled metrics).
    pub status_key: &'static str,
    /// Help text (HELP line, dashboard tooltips).
    pub help: &'static str,
    /// Unit.
    pub unit: MetricUnit,
    /// Kind.
    pub kind: MetricKind,
}

impl MetricDesc {
    /// The name as exposed in the Prometheus text: with unit suffix and, for counters, `_total`.
    pub fn exposed_name(&self) -> String {
        let mut n = self.name.to_owned();
        let suffix = self.unit.suffix();
        if !suffix.is_empty() {
            n.push('_');
            n.push_str(suffix);
        }
        if self.kind == MetricKind::Counter {
            n.push_str("_total");
        }
        n
    }

    /// The help text with its whitespace normalised (doc comments span lines).
    pub fn help_text(&self) -> String {
        self.help.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// Label pairs of one sample. Label values must come from bounded sets (operation names,
/// adapter names, result classes); never from client input.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// Receives the values of a [`MetricSet`].
pub trait MetricVisitor {
    /// A counter value.
    fn counter(&mut self, desc: &'static MetricDesc, labels: Labels<'_>, value: u64);
    /// A gauge value.
    fn gauge(&mut self, desc: &'static MetricDesc, labels: Labels<'_>, value: f64);
    /// A histogram reading.
    fn histogram(
        &mut self,
        desc: &'static MetricDesc,
        labels: Labels<'_>,
        value: &HistogramSnapshot,
    );
}

/// A component's metrics: visits every value it exports, reading atomics only (no lock on the
/// request path; a brief O(1) lock is allowed for computed gauges).
pub trait MetricSet {
    /// Every descriptor this set can visit (for catalog checks and documentation).
    fn descriptors(&self) -> &'static [MetricDesc];
    /// Visits the current values.
    fn visit(&self, v: &mut dyn MetricVisitor);
}

/// A monotonic counter (relaxed atomic).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    /// The current value.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A gauge (relaxed atomic, unsigned).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Sets the value.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    /// Subtracts `n` (saturating at 0 is the caller's invariant; a gauge never goes negative).
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.fetch_sub(n, Relaxed);
    }

    /// The current value.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Collects the unlabelled counter and gauge values of a set as status-tree fields
/// (`status_key → value`), in declaration order.
pub fn status_fields(set: &dyn MetricSet) -> serde_json::Map<String, serde_json::Value> {
    struct Fields(serde_json::Map<String, serde_json::Value>);
    impl MetricVisitor for Fields {
        fn counter(&mut self, desc: &'static MetricDesc, labels: Labels<'_>, value: u64) {
            if labels.is_empty() {
                self.0.insert(desc.status_key.to_owned(), value.into());
            }
        }
        fn gauge(&mut self, desc: &'static MetricDesc, labels: Labels<'_>, value: f64) {
            if labels.is_empty() {
                let v = if value.fract() == 0.0 && value >= 0.0 && value < u64::MAX as f64 {
                    serde_json::Value::from(value as u64)
                } else {
                    serde_json::Value::from(value)
                };
                self.0.insert(desc.status_key.to_owned(), v);
            }
        }
        fn histogram(&mut self, _: &'static MetricDesc, _: Labels<'_>, _: &HistogramSnapshot) {}
    }
    let mut f = Fields(serde_json::Map::new());
    set.visit(&mut f);
    f.0
}

/// Reads one unlabelled value of a set by status key (tests, telemetry); `None` if absent.
pub fn value_of(set: &dyn MetricSet, status_key: &str) -> Option<f64> {
    status_fields(set)
        .get(status_key)
        .and_then(serde_json::Value::as_f64)
}

/// Declares a struct of [`Counter`]s and [`Gauge`]s with its catalog entries, and implements
/// [`MetricSet`] for it.
///
/// ```
/// kvtier_core::metric_set! {
///     /// Counters of a component.
///     pub struct DemoCounters {
///         /// Requests served.
///         requests_total: Counter => "kvtier_demo_requests",
///         /// Bytes in the queue.
///         queued_bytes: Gauge[Bytes] => "kvtier_demo_queued",
///     }
/// }
/// let c = DemoCounters::default();
/// c.requests_total.inc();
/// let f = kvtier_core::metrics::status_fields(&c);
/// assert_eq!(f["requests_total"], 1);
/// ```
#[macro_export]
macro_rules! metric_set {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $kind:ident $([$unit:ident])? => $prom:literal
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        $vis struct $name {
            $(
                $(#[doc = $doc])*
                pub $field: $crate::metrics::$kind,
            )*
        }

        impl $name {
            /// The catalog entries of this set, in declaration order.
            pub const DESCRIPTORS: &'static [$crate::metrics::MetricDesc] = &[
                $(
                    $crate::metrics::MetricDesc {
                        name: $prom,
                        status_key: stringify!($field),
                        help: concat!($($doc, " "),*),
                        unit: $crate::metric_set!(@unit $($unit)?),
                        kind: $crate::metric_set!(@kind $kind),
                    },
                )*
            ];
        }

        impl $crate::metrics::MetricSet for $name {
            fn descriptors(&self) -> &'static [$crate::metrics::MetricDesc] {
                Self::DESCRIPTORS
            }

            fn visit(&self, v: &mut dyn $crate::metrics::MetricVisitor) {
                // One descriptor per field, in declaration order.
                let mut descs = Self::DESCRIPTORS.iter();
                let _used = (&mut descs, &v);
                $(
                    if let Some(d) = descs.next() {
                        $crate::metric_set!(@visit v, d, self.$field, $kind);
                    }
                )*
            }
        }
    };
    (@unit) => { $crate::metrics::MetricUnit::None };
    (@unit $unit:ident) => { $crate::metrics::MetricUnit::$unit };
    (@kind Counter) => { $crate::metrics::MetricKind::Counter };
    (@kind Gauge) => { $crate::metrics::MetricKind::Gauge };
    (@visit $v:ident, $d:expr, $f:expr, Counter) => { $v.counter($d, &[], $f.get()) };
    (@visit $v:ident, $d:expr, $f:expr, Gauge) => { $v.gauge($d, &[], $f.get() as f64) };
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::metric_set! {
        /// Test set.
        pub struct T {
            /// First
            /// counter.
            a_total: Counter => "kvtier_t_a",
            /// Bytes.
            b_bytes: Gauge[Bytes] => "kvtier_t_b",
        }
    }

    #[test]
    fn declarations_drive_every_surface() {
        let t = T::default();
        t.a_total.add(3);
        t.b_bytes.set(7);
        let f = status_fields(&t);
        assert_eq!(f["a_total"], 3);
        assert_eq!(f["b_bytes"], 7);
        let d = t.descriptors();
        assert_eq!(d[0].exposed_name(), "kvtier_t_a_total");
        assert_eq!(d[0].help_text(), "First counter.");
        assert_eq!(d[1].exposed_name(), "kvtier_t_b_bytes");
        assert_eq!(d[1].kind, MetricKind::Gauge);
        assert_eq!(value_of(&t, "a_total"), Some(3.0));
    }
}
