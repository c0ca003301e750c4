//! The catalog check: every counter the status tree shows and every metric the Grafana
//! dashboard queries must be exported at `/metrics`.
//!
//! A real server (shared-memory L1, one mock L2 adapter, the KV-event publisher, ZeroMQ, HTTP on
//! ephemeral ports) is
//! driven through a store, a lookup and a retrieve so counters move, then:
//! - (a) every numeric leaf of `/api/status` whose key ends in `_total` must match an exposed
//!   sample name `kvtier_…_<key>`, allowing a unit infix (`evicted_total` matches
//!   `kvtier_x_evicted_bytes_total`);
//! - (b) every `kvtier_*` identifier in the dashboard's queries must be an exposed sample name
//!   (`_bucket`/`_sum`/`_count` of a histogram count as its family);
//! - (c) so must every `kvtier_*` identifier of the Prometheus alert rules
//!   (`deploy/prometheus/kvtier-alerts.yml`).
//!
//! All misses are collected and reported in one assertion message.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use kvtier_storage::AdapterConfig;
use kvtier_storage::config::MockConfig;
use prometheus_parse::{Scrape, Value as Sample};
use serde_json::{Value, json};

const MODEL: &str = "org/catalog-model";

/// Unit suffixes the encoder may put between a name and `_total`.
const UNIT_INFIXES: [&str; 2] = ["bytes", "seconds"];

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../deploy/grafana/kvtier.json"
);

const ALERTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../deploy/prometheus/kvtier-alerts.yml"
);

fn get_text(addr: std::net::SocketAddr, path: &str) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut r = agent
        .get(format!("http://{addr}{path}"))
        .call()
        .expect("request answered");
    assert_eq!(r.status(), 200, "GET {path}");
    r.body_mut().read_to_string().expect("utf-8 body")
}

/// What `/metrics` exposes: every sample name, and the histogram families apart.
struct Exposed {
    names: BTreeSet<String>,
    histograms: BTreeSet<String>,
}

fn exposed(text: &str) -> Exposed {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("exposition parses");
    let mut names = BTreeSet::new();
    let mut histograms = BTreeSet::new();
    for s in &scrape.samples {
        if matches!(s.value, Sample::Histogram(_)) {
            histograms.insert(s.metric.clone());
        }
        names.insert(s.metric.clone());
    }
    Exposed { names, histograms }
}

/// Whether some exposed name is `kvtier_…_<key>` or `kvtier_…_<stem>_<unit>_total`.
fn counter_exported(key: &str, names: &BTreeSet<String>) -> bool {
    let stem = key.strip_suffix("_total").unwrap_or(key);
    let mut suffixes = vec![format!("_{key}")];
    suffixes.extend(UNIT_INFIXES.iter().map(|u| format!("_{stem}_{u}_total")));
    names
        .iter()
        .any(|n| n.starts_with("kvtier_") && suffixes.iter().any(|s| n.ends_with(s.as_str())))
}

/// Every numeric leaf whose key ends in `_total`, as `(path, key)`.
fn total_leaves(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if child.is_number() && k.ends_with("_total") {
                    out.push((p, k.clone()));
                } else {
                    total_leaves(child, &p, out);
                }
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                total_leaves(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The `kvtier_*` identifiers of a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = expr[i..].find("kvtier_") {
        let start = i + off;
        let mut end = start + "kvtier_".len();
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !preceded {
            out.push(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// Every target expression of every panel (rows' nested panels included) and of the
/// templating queries, as `(panel title, expr)`.
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((title.clone(), e.to_owned()));
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dash["panels"], &mut out);
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = var["definition"].as_str() {
            out.push((format!("variable {}", var["name"]), q.to_owned()));
        }
    }
    out
}

fn dashboard_name_exported(name: &str, e: &Exposed) -> bool {
    if e.names.contains(name) {
        return true;
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|s| name.strip_suffix(s))
        .any(|family| e.histograms.contains(family))
}

#[test]
fn status_counters_and_dashboard_queries_are_all_exported() {
    let rt = http_runtime();
    let mock = AdapterConfig::Mock(MockConfig {
        max_size_gb: 0.1,
        mock_bandwidth_gb: 10.0,
        eviction: None,
    });
    let mut cfg = config(vec![mock]);
    // The router-facing publisher too, so its counters are checked.
    cfg.engine.kv_events_publisher = Some(kvtier_server::engine::kv_events::PublisherConfig::new(
        "tcp://127.0.0.1:*",
    ));
    let server = start(cfg, &rt);
    let addr = server.http_addr().expect("http enabled");

    // Move the counters: a store (written behind to L2), a lookup, a retrieve.
    let mut c = Client::connect(server.rpc_endpoint());
    c.register(1, MODEL);
    let toks = tokens(3, 4);
    let stored = store(&mut c, &server, 1, MODEL, &toks, 3, "store-1");
    assert_eq!(stored, vec![0, 1, 2, 3]);
    assert_eq!(l1_objects(&server), 4);
    let l2 = server.engine().l2().expect("l2 configured");
    assert!(
        l2.wait_store_idle(Duration::from_secs(20)),
        "write-behind did not finish"
    );
    assert_eq!(lookup(&mut c, MODEL, &toks, "read-1"), 4);
    let got = retrieve(&mut c, &server, 1, MODEL, &toks, 4, "read-1");
    assert_eq!(got.len(), 4);
    c.call_json("end_session", &[json!("read-1")]);
    // At least one telemetry sample, so its counters are not all zero.
    wait_until("a telemetry sample", Duration::from_secs(10), || {
        server.telemetry().since(None).latest_seq > 0
    });

    let (code, status) = http_get(addr, "/api/status");
    assert_eq!(code, 200);
    let text = get_text(addr, "/metrics");
    let e = exposed(&text);
    assert!(
        e.names.contains("kvtier_rpc_requests_total"),
        "the driven requests are exported: {text}"
    );

    // (a) Status counters.
    let mut leaves = Vec::new();
    total_leaves(&status, "", &mut leaves);
    assert!(
        leaves.len() >= 10,
        "too few *_total status fields: {leaves:?}"
    );
    // The catalog: status key -> exposed names of every declared metric.
    let mut catalog: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for set in server.status_source().metric_sets() {
        for d in set.descriptors() {
            catalog
                .entry(d.status_key)
                .or_default()
                .push(d.exposed_name());
        }
    }
    // Every status counter is either declared in the catalog with an exported name, or (for
    // components whose metrics are visited without a status key of their own) exported under
    // a name that ends with the key.
    let mut status_misses: Vec<String> = leaves
        .iter()
        .filter(|(_, key)| {
            let declared = catalog
                .get(key.as_str())
                .is_some_and(|names| names.iter().any(|n| e.names.contains(n)));
            !declared && !counter_exported(key, &e.names)
        })
        .map(|(path, _)| path.clone())
        .collect();
    // And every declared counter and gauge that a set visited is exported.
    struct Seen(BTreeSet<String>);
    impl kvtier_core::metrics::MetricVisitor for Seen {
        fn counter(
            &mut self,
            d: &'static kvtier_core::metrics::MetricDesc,
            _: kvtier_core::metrics::Labels<'_>,
            _: u64,
        ) {
            self.0.insert(d.exposed_name());
        }
        fn gauge(
            &mut self,
            d: &'static kvtier_core::metrics::MetricDesc,
            _: kvtier_core::metrics::Labels<'_>,
            _: f64,
        ) {
            self.0.insert(d.exposed_name());
        }
        fn histogram(
            &mut self,
            d: &'static kvtier_core::metrics::MetricDesc,
            _: kvtier_core::metrics::Labels<'_>,
            _: &kvtier_core::metrics::HistogramSnapshot,
        ) {
            self.0.insert(format!("{}_count", d.exposed_name()));
        }
    }
    let mut seen = Seen(BTreeSet::new());
    for set in server.status_source().metric_sets() {
        set.visit(&mut seen);
    }
    status_misses.extend(
        seen.0
            .into_iter()
            .filter(|n| !e.names.contains(n))
            .map(|n| format!("catalog entry {n} is not in /metrics")),
    );

    // (b) Dashboard queries.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(DASHBOARD).expect("dashboard file is readable"),
    )
    .expect("dashboard is JSON");
    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 20, "too few dashboard queries: {exprs:?}");
    let mut dashboard_misses = BTreeSet::new();
    for (title, expr) in &exprs {
        for name in metric_names(expr) {
            if !dashboard_name_exported(&name, &e) {
                dashboard_misses.insert(format!("{name} (panel {title:?})"));
            }
        }
    }

    // (c) Alert rules: every `kvtier_*` name in an `expr:` line (multi-line `>` expressions
    // included: every line of the file that is not a comment or an annotation is scanned).
    let rules = std::fs::read_to_string(ALERTS).expect("alert rules are readable");
    let mut rule_names = 0;
    for line in rules.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with("summary:") || line.starts_with("description:")
        {
            continue;
        }
        for name in metric_names(line) {
            rule_names += 1;
            if !dashboard_name_exported(&name, &e) {
                dashboard_misses.insert(format!("{name} (alert rules)"));
            }
        }
    }
    assert!(rule_names >= 10, "too few metrics in the alert rules");

    server.shutdown();
    assert!(
        status_misses.is_empty() && dashboard_misses.is_empty(),
        "status counters without an exported kvtier_*_<key> ({}):\n  {}\n\
         dashboard metrics not in /metrics ({}):\n  {}",
        status_misses.len(),
        status_misses.join("\n  "),
        dashboard_misses.len(),
        dashboard_misses
            .into_iter()
            .collect::<Vec<_>>()
            .join("\n  "),
    );
}

#[test]
fn the_matchers_accept_unit_infixes_and_histogram_parts() {
    let names: BTreeSet<String> = [
        "kvtier_l1_evicted_bytes_total",
        "kvtier_http_requests_total",
        "kvtier_rpc_request_duration_seconds_sum",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert!(counter_exported("requests_total", &names));
    assert!(counter_exported("evicted_total", &names));
    assert!(counter_exported("evicted_bytes_total", &names));
    assert!(!counter_exported("samples_total", &names));
    let e = Exposed {
        names,
        histograms: ["kvtier_rpc_request_duration_seconds".to_owned()].into(),
    };
    assert!(dashboard_name_exported(
        "kvtier_rpc_request_duration_seconds_bucket",
        &e
    ));
    assert!(!dashboard_name_exported(
        "kvtier_l2_store_keys_submitted_total",
        &e
    ));
    assert_eq!(
        metric_names(
            "sum by (op) (rate(kvtier_rpc_requests_total{instance=~\"$i\"}[5m])) / x_kvtier_no"
        ),
        ["kvtier_rpc_requests_total"]
    );
}
