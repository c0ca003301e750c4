//! Aggregation of per-client phase results into named figures, and their table/JSON output.
//!
//! Figure names are stable: `scripts/compare-lmcache` and the Python client bench use the same
//! keys. Rates are decimal (GB = 1e9 bytes); latencies are in microseconds unless the name
//! says otherwise; `*_frac_memcpy` is a throughput divided by the same run's memcpy rate.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::{Pass, Phase, Shape, pass_name};

/// What one client did in one phase.
#[derive(Debug)]
pub struct PhaseOut {
    pub start: Instant,
    pub end: Instant,
    pub bytes: u64,
    pub ops: u64,
    /// `query_prefetch_status` calls made by lookups.
    pub polls: u64,
    pub samples: BTreeMap<&'static str, Vec<Duration>>,
}

impl PhaseOut {
    pub fn start() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            end: now,
            bytes: 0,
            ops: 0,
            polls: 0,
            samples: BTreeMap::new(),
        }
    }

    pub fn sample(&mut self, what: &'static str, d: Duration) {
        self.samples.entry(what).or_default().push(d);
    }

    pub fn finish(mut self) -> Self {
        self.end = Instant::now();
        self
    }
}

/// Named figures in insertion order.
#[derive(Debug, Default)]
pub struct Metrics {
    values: Vec<(String, f64)>,
}

impl Metrics {
    pub fn set(&mut self, name: impl Into<String>, v: f64) {
        let name = name.into();
        match self.values.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = v,
            None => self.values.push((name, v)),
        }
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// Quantile `q` (nearest rank) of `samples`, in microseconds.
pub fn quantile_us(samples: &mut [Duration], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let idx = ((samples.len() - 1) as f64 * q).round() as usize;
    samples
        .get(idx.min(samples.len() - 1))
        .map(|d| d.as_secs_f64() * 1e6)
}

struct Merged {
    wall: f64,
    bytes: u64,
    ops: u64,
    polls: u64,
    samples: BTreeMap<&'static str, Vec<Duration>>,
}

fn merge<'a>(outs: impl Iterator<Item = &'a PhaseOut>) -> Option<Merged> {
    let mut start: Option<Instant> = None;
    let mut end: Option<Instant> = None;
    let mut m = Merged {
        wall: 0.0,
        bytes: 0,
        ops: 0,
        polls: 0,
        samples: BTreeMap::new(),
    };
    for o in outs {
        start = Some(start.map_or(o.start, |s| s.min(o.start)));
        end = Some(end.map_or(o.end, |e| e.max(o.end)));
        m.bytes += o.bytes;
        m.ops += o.ops;
        m.polls += o.polls;
        for (k, v) in &o.samples {
            m.samples.entry(k).or_default().extend_from_slice(v);
        }
    }
    m.wall = end?.duration_since(start?).as_secs_f64();
    Some(m)
}

impl Merged {
    fn p(&mut self, what: &str, q: f64) -> Option<f64> {
        self.samples.get_mut(what).and_then(|s| quantile_us(s, q))
    }

    /// Bytes over the summed time of one step (per-thread rate of that step), GB/s.
    fn step_gbps(&self, what: &str) -> Option<f64> {
        let t: f64 = self
            .samples
            .get(what)?
            .iter()
            .map(Duration::as_secs_f64)
            .sum();
        (t > 0.0).then(|| self.bytes as f64 / t / 1e9)
    }
}

fn put(m: &mut Metrics, name: String, v: Option<f64>) {
    if let Some(v) = v {
        m.set(name, v);
    }
}

/// Turns the per-client phase results into figures.
pub fn aggregate(m: &mut Metrics, phases: &[Phase], results: &[(usize, PhaseOut)], memcpy: f64) {
    let mut lookups: Vec<Duration> = Vec::new();
    let (mut polls, mut lookup_ops) = (0u64, 0u64);
    for (i, phase) in phases.iter().enumerate() {
        let Some(mut g) = merge(results.iter().filter(|(p, _)| *p == i).map(|(_, o)| o)) else {
            continue;
        };
        let wall = g.wall;
        let rate = |x: u64| (wall > 0.0).then(|| x as f64 / wall);
        match *phase {
            Phase::NoopSeq => {
                put(m, "noop_rtt_p50_us".into(), g.p("noop", 0.5));
                put(m, "noop_rtt_p99_us".into(), g.p("noop", 0.99));
                put(m, "noop_seq_ops_per_s".into(), rate(g.ops));
                put(m, "ping_rtt_p50_us".into(), g.p("ping", 0.5));
                put(
                    m,
                    "noop_after_copy_p50_us".into(),
                    g.p("noop_after_copy", 0.5),
                );
                put(
                    m,
                    "noop_after_copy_p99_us".into(),
                    g.p("noop_after_copy", 0.99),
                );
            }
            Phase::NoopBesideHeavy => {
                put(m, "noop_beside_heavy_p50_us".into(), g.p("noop", 0.5));
                put(m, "noop_beside_heavy_p99_us".into(), g.p("noop", 0.99));
                put(m, "heavy_batch_p50_us".into(), g.p("heavy_batch", 0.5));
                put(m, "heavy_batch_p99_us".into(), g.p("heavy_batch", 0.99));
            }
            Phase::NoopPipelined => put(m, "noop_pipelined_ops_per_s".into(), rate(g.ops)),
            Phase::Store(pass) => store_figures(m, pass, &mut g, memcpy),
            Phase::StoreLoad => put(m, "store_load_gbps".into(), rate(g.bytes).map(|r| r / 1e9)),
            Phase::Retrieve(pass) => {
                let n = pass_name(pass);
                let gbps = rate(g.bytes).map(|r| r / 1e9);
                put(m, format!("retrieve_{n}_gbps"), gbps);
                put(
                    m,
                    format!("retrieve_{n}_frac_memcpy"),
                    gbps.map(|r| r / memcpy),
                );
                op_latencies(
                    m,
                    &mut g,
                    n,
                    &["lookup", "prepare_retrieve", "commit_retrieve"],
                );
                put(m, format!("copy_out_{n}_gbps"), g.step_gbps("copy_out"));
                if let Some(s) = g.samples.get("lookup") {
                    lookups.extend_from_slice(s);
                }
                polls += g.polls;
                lookup_ops += g.ops;
            }
            Phase::Fill => put(
                m,
                "fill_objects_per_s".into(),
                rate(g.ops).filter(|_| g.ops > 0),
            ),
            Phase::Verify(_) | Phase::Clear | Phase::StatusIdle => {}
        }
    }
    put(m, "lookup_p50_us".into(), quantile_us(&mut lookups, 0.5));
    put(m, "lookup_p99_us".into(), quantile_us(&mut lookups, 0.99));
    if lookup_ops > 0 {
        m.set("lookup_polls_mean", polls as f64 / lookup_ops as f64);
    }
}

fn store_figures(m: &mut Metrics, pass: Pass, g: &mut Merged, memcpy: f64) {
    let n = pass_name(pass);
    let gbps = (g.wall > 0.0).then(|| g.bytes as f64 / g.wall / 1e9);
    put(m, format!("store_{n}_gbps"), gbps);
    put(
        m,
        format!("store_{n}_frac_memcpy"),
        gbps.map(|r| r / memcpy),
    );
    op_latencies(m, g, n, &["prepare_store", "commit_store"]);
    put(m, format!("copy_in_{n}_gbps"), g.step_gbps("copy_in"));
}

/// `<op>_<pass>_p50_us` and `<op>_<pass>_p99_us` of each op's samples in the pass.
fn op_latencies(m: &mut Metrics, g: &mut Merged, pass: &str, ops: &[&str]) {
    for op in ops {
        put(m, format!("{op}_{pass}_p50_us"), g.p(op, 0.5));
        put(m, format!("{op}_{pass}_p99_us"), g.p(op, 0.99));
    }
}

/// Control operations whose latency is compared with the same run's floor, as
/// `(figure stem, label)`: `<stem>_p50_us` and `<stem>_p99_us` must exist.
const CONTROL_OPS: [(&str, &str); 5] = [
    ("prepare_store_warm", "prepare_store"),
    ("commit_store_warm", "commit_store"),
    ("prepare_retrieve_warm", "prepare_retrieve"),
    ("commit_retrieve_warm", "commit_retrieve"),
    ("lookup", "lookup→result"),
];

/// The ratios of each control operation's p50 and p99 to the same run's noop (p50 to p50, p99
/// to p99), to the bare ZeroMQ echo's p50 and to the p50 of a noop sent right after a copy
/// (the wake-up floor of the commits), and of noop to echo: `<stem>_p50_x_noop`,
/// `<stem>_p99_x_noop`, `<stem>_p50_x_echo`, `<stem>_p50_x_noop_after_copy`,
/// `noop_p50_x_echo`. Only ratios within one run mean anything on a shared machine. Skipped
/// when a base figure is missing or zero.
pub fn floor_ratios(m: &mut Metrics) {
    let base = |m: &Metrics, key: &str| m.get(key).filter(|v| *v > 0.0);
    let noop50 = base(m, "noop_rtt_p50_us");
    let noop99 = base(m, "noop_rtt_p99_us");
    let echo50 = base(m, "zmq_echo_rtt_p50_us");
    let after_copy50 = base(m, "noop_after_copy_p50_us");
    if let (Some(n), Some(e)) = (noop50, echo50) {
        m.set("noop_p50_x_echo", n / e);
    }
    for q in ["p50", "p99"] {
        let heavy = m.get(&format!("noop_beside_heavy_{q}_us"));
        if let (Some(h), Some(n)) = (heavy, base(m, &format!("noop_rtt_{q}_us"))) {
            m.set(format!("noop_beside_heavy_{q}_x_noop"), h / n);
        }
    }
    for (stem, _) in CONTROL_OPS {
        let p50 = m.get(&format!("{stem}_p50_us"));
        let p99 = m.get(&format!("{stem}_p99_us"));
        if let (Some(v), Some(n)) = (p50, noop50) {
            m.set(format!("{stem}_p50_x_noop"), v / n);
        }
        if let (Some(v), Some(n)) = (p99, noop99) {
            m.set(format!("{stem}_p99_x_noop"), v / n);
        }
        if let (Some(v), Some(e)) = (p50, echo50) {
            m.set(format!("{stem}_p50_x_echo"), v / e);
        }
        if let (Some(v), Some(c)) = (p50, after_copy50) {
            m.set(format!("{stem}_p50_x_noop_after_copy"), v / c);
        }
    }
}

/// The floor table: each control operation's p50 and p99 against the same run's noop and bare
/// echo (empty when the run has no noop figure).
pub fn floor_table(m: &Metrics) -> String {
    let mut s = String::new();
    let Some(noop) = m.get("noop_rtt_p50_us") else {
        return s;
    };
    let _w = writeln!(
        s,
        "  against the floor (noop p50 {noop:.1} µs{}{}):",
        m.get("zmq_echo_rtt_p50_us")
            .map(|e| format!(", bare echo p50 {e:.1} µs"))
            .unwrap_or_default(),
        m.get("noop_after_copy_p50_us")
            .map(|e| format!(", noop after a copy p50 {e:.1} µs"))
            .unwrap_or_default()
    );
    let cell = |k: &str, dec: usize| {
        m.get(k)
            .map_or_else(|| "-".to_owned(), |v| format!("{v:.dec$}"))
    };
    // One line: label, p50, p99, p50÷noop, p99÷noop, p50÷echo, p50÷noop-after-copy.
    let mut row = |cols: [&str; 7]| {
        let [label, p50, p99, xn50, xn99, xe, xc] = cols;
        let _w = writeln!(
            s,
            "    {label:<18} {p50:>9} {p99:>9} {xn50:>10} {xn99:>10} {xe:>10} {xc:>12}"
        );
    };
    row([
        "op",
        "p50 µs",
        "p99 µs",
        "p50÷noop",
        "p99÷noop",
        "p50÷echo",
        "p50÷copynoop",
    ]);
    if m.get("noop_p50_x_echo").is_some() {
        let (p50, p99, xe) = (
            cell("noop_rtt_p50_us", 1),
            cell("noop_rtt_p99_us", 1),
            cell("noop_p50_x_echo", 2),
        );
        row(["noop", &p50, &p99, "1.00", "1.00", &xe, "-"]);
    }
    if m.get("noop_after_copy_p50_us").is_some() {
        let (p50, p99) = (
            cell("noop_after_copy_p50_us", 1),
            cell("noop_after_copy_p99_us", 1),
        );
        row(["noop after a copy", &p50, &p99, "-", "-", "-", "1.00"]);
    }
    if m.get("noop_beside_heavy_p50_us").is_some() {
        let (p50, p99, xn50, xn99) = (
            cell("noop_beside_heavy_p50_us", 1),
            cell("noop_beside_heavy_p99_us", 1),
            cell("noop_beside_heavy_p50_x_noop", 2),
            cell("noop_beside_heavy_p99_x_noop", 2),
        );
        row(["noop beside heavy", &p50, &p99, &xn50, &xn99, "-", "-"]);
    }
    for (stem, label) in CONTROL_OPS {
        let c = |suffix: &str, dec| cell(&format!("{stem}_{suffix}"), dec);
        let cols = [
            c("p50_us", 1),
            c("p99_us", 1),
            c("p50_x_noop", 2),
            c("p99_x_noop", 2),
            c("p50_x_echo", 2),
            c("p50_x_noop_after_copy", 2),
        ];
        let [p50, p99, xn50, xn99, xe, xc] = &cols;
        row([label, p50, p99, xn50, xn99, xe, xc]);
    }
    s
}

/// Status-endpoint figures (milliseconds).
pub fn status_metrics(m: &mut Metrics, idle: &[Duration], load: &[Duration], objects: u64) {
    let ms = |s: &[Duration], q: f64| {
        let mut v = s.to_vec();
        quantile_us(&mut v, q).map(|us| us / 1e3)
    };
    m.set("status_objects", objects as f64);
    put(m, "status_idle_p50_ms".into(), ms(idle, 0.5));
    put(m, "status_load_p50_ms".into(), ms(load, 0.5));
    put(m, "status_load_p99_ms".into(), ms(load, 0.99));
    m.set("status_load_samples", load.len() as f64);
}

/// What was run.
#[derive(Debug)]
pub struct Header {
    pub url: String,
    pub shape: Shape,
    pub chunk_size: u64,
    pub chunk_bytes: u64,
    pub clients: usize,
    pub requests: usize,
    pub chunks: usize,
    pub pass_bytes: u64,
    pub seed: u64,
}

/// The JSON report: `{"config": {...}, "metrics": {...}, "errors": [...]}`.
pub fn json(h: &Header, m: &Metrics, errors: &[String]) -> String {
    let mut metrics = serde_json::Map::new();
    for (k, v) in &m.values {
        if let Some(n) = serde_json::Number::from_f64(*v) {
            metrics.insert(k.clone(), serde_json::Value::Number(n));
        }
    }
    let v = serde_json::json!({
        "config": {
            "url": h.url,
            "shape": h.shape.label,
            "layers": h.shape.layers,
            "hidden": h.shape.hidden,
            "dtype": h.shape.dtype,
            "chunk_size": h.chunk_size,
            "chunk_bytes": h.chunk_bytes,
            "clients": h.clients,
            "requests": h.requests,
            "chunks_per_request": h.chunks,
            "pass_bytes": h.pass_bytes,
            "seed": h.seed,
        },
        "metrics": metrics,
        "errors": errors,
    });
    v.to_string()
}

/// (key, label, unit, decimals) of the table rows, in order.
const ROWS: &[(&str, &str, &str, usize)] = &[
    ("startup_ms", "start to first answer", "ms", 1),
    ("memcpy_gbps", "memcpy, 1 thread", "GB/s", 2),
    ("shm_first_touch_gbps", "copy to new shm pages", "GB/s", 2),
    ("shm_remapped_gbps", "copy via fresh mapping", "GB/s", 2),
    ("shm_warm_gbps", "copy via faulted mapping", "GB/s", 2),
    ("zmq_echo_rtt_p50_us", "bare ZeroMQ echo RTT p50", "µs", 1),
    ("noop_rtt_p50_us", "noop RTT p50", "µs", 1),
    ("noop_rtt_p99_us", "noop RTT p99", "µs", 1),
    ("noop_seq_ops_per_s", "noop sequential", "ops/s", 0),
    ("ping_rtt_p50_us", "ping RTT p50 (worker pool)", "µs", 1),
    ("noop_pipelined_ops_per_s", "noop pipelined", "ops/s", 0),
    ("lookup_p50_us", "lookup→result p50", "µs", 1),
    ("lookup_p99_us", "lookup→result p99", "µs", 1),
    ("lookup_polls_mean", "  status queries per lookup", "", 2),
    ("store_cold_gbps", "store, cold pages", "GB/s", 2),
    ("store_cold_frac_memcpy", "  ÷ memcpy", "", 2),
    ("store_warm_gbps", "store, warm pages", "GB/s", 2),
    ("store_warm_frac_memcpy", "  ÷ memcpy", "", 2),
    ("copy_in_cold_gbps", "client copy in, cold", "GB/s", 2),
    ("copy_in_warm_gbps", "client copy in, warm", "GB/s", 2),
    (
        "prepare_store_warm_p50_us",
        "prepare_store p50 (warm)",
        "µs",
        1,
    ),
    (
        "commit_store_warm_p50_us",
        "commit_store p50 (warm)",
        "µs",
        1,
    ),
    ("retrieve_cold_gbps", "retrieve, 1st pass", "GB/s", 2),
    ("retrieve_cold_frac_memcpy", "  ÷ memcpy", "", 2),
    ("retrieve_warm_gbps", "retrieve, 2nd pass", "GB/s", 2),
    ("retrieve_warm_frac_memcpy", "  ÷ memcpy", "", 2),
    ("copy_out_warm_gbps", "client copy out (2nd)", "GB/s", 2),
    (
        "prepare_retrieve_warm_p50_us",
        "prepare_retrieve p50",
        "µs",
        1,
    ),
    (
        "commit_retrieve_warm_p50_us",
        "commit_retrieve p50",
        "µs",
        1,
    ),
    ("fill_objects_per_s", "status fill", "objects/s", 0),
    ("status_objects", "status: objects added", "", 0),
    ("status_idle_p50_ms", "status p50, idle", "ms", 2),
    ("status_load_p50_ms", "status p50, under store", "ms", 2),
    ("status_load_p99_ms", "status p99, under store", "ms", 2),
    ("status_load_samples", "status samples under store", "", 0),
    ("store_load_gbps", "store during status polls", "GB/s", 2),
    (
        "server_rss_excl_shm_filled_mib",
        "server RSS − shm, filled",
        "MiB",
        1,
    ),
    ("server_rss_excl_shm_mib", "server RSS − shm, end", "MiB", 1),
    ("server_rss_mib", "server RSS", "MiB", 1),
    ("errors", "errors", "", 0),
];

/// A human-readable table.
pub fn table(h: &Header, m: &Metrics) -> String {
    let mut s = String::new();
    let _w = writeln!(
        s,
        "kvtier bench {}: shape {} ({} layers × {} hidden, {}), {} tokens/chunk = {:.2} MiB; \
         {} client(s) × {} requests × {} chunks = {:.0} MiB per pass",
        h.url,
        h.shape.label,
        h.shape.layers,
        h.shape.hidden,
        h.shape.dtype,
        h.chunk_size,
        h.chunk_bytes as f64 / (1 << 20) as f64,
        h.clients,
        h.requests,
        h.chunks,
        h.pass_bytes as f64 / (1 << 20) as f64,
    );
    let mut shown = std::collections::HashSet::new();
    for &(key, label, unit, dec) in ROWS {
        if let Some(v) = m.get(key) {
            shown.insert(key);
            let _w = writeln!(s, "  {label:<30} {v:>12.dec$} {unit}");
        }
    }
    let in_floor_table = |k: &str| {
        k.contains("_x_noop")
            || k.contains("_x_echo")
            || CONTROL_OPS
                .iter()
                .any(|(stem, _)| k.strip_suffix("_p99_us") == Some(stem))
    };
    for (k, v) in &m.values {
        if !shown.contains(k.as_str()) && !in_floor_table(k) {
            let _w = writeln!(s, "  {k:<30} {v:>12.2}");
        }
    }
    s.push_str(&floor_table(m));
    s
}
