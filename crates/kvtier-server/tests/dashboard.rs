//! The dashboard's server side on a real server (real shared memory, real HTTP over loopback):
//! the embedded page and its assets, `/api/timeseries` fed by the `kvtier-telemetry` sampler,
//! the sampler in the status tree and its stop on shutdown, and the test-only fault route.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use kvtier_proto::Op;
use kvtier_server::stats::Outcome;
use kvtier_server::{Server, ServerConfig};
use serde_json::Value;

static SEQ: AtomicU64 = AtomicU64::new(0);

fn config(fault_injection: bool) -> ServerConfig {
    let mut c = ServerConfig::ephemeral(format!(
        "kvtier_dash_test_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Relaxed)
    ));
    c.fault_injection = fault_injection;
    c
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`; axum sends a length).
fn http(addr: SocketAddr, method: &str, path: &str, json_body: Option<&str>) -> Answer {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let body = json_body.unwrap_or("");
    let ctype = if json_body.is_some() {
        "Content-Type: application/json\r\n"
    } else {
        ""
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{ctype}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a full response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_page_and_its_assets_are_embedded() {
    let rt = runtime();
    let server = Server::start(config(false), rt.handle()).expect("server starts");
    let addr = server.http_addr().expect("http enabled");
    for (path, ctype, needle) in [
        ("/", "text/html", "/dashboard/app.js"),
        ("/dashboard", "text/html", "/dashboard/style.css"),
        ("/dashboard/app.js", "text/javascript", "/api/timeseries"),
        ("/dashboard/style.css", "text/css", "prefers-color-scheme"),
    ] {
        let a = http(addr, "GET", path, None);
        assert_eq!(a.status, 200, "{path}");
        assert!(
            a.header("content-type")
                .is_some_and(|c| c.starts_with(ctype)),
            "{path}: {}",
            a.head
        );
        assert!(a.body.contains(needle), "{path} lacks {needle}");
        let csp = a.header("content-security-policy").expect("CSP header");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert_eq!(a.header("referrer-policy"), Some("no-referrer"));
    }
    // The JSON API is unchanged beside it.
    assert_eq!(http(addr, "GET", "/api/status", None).status, 200);
    // Without the flag the fault route does not exist.
    assert_eq!(
        http(addr, "POST", "/api/debug/fault", Some("{}")).status,
        404
    );
    server.shutdown();
}

#[test]
fn timeseries_follows_the_counters_and_the_sampler_stops_on_shutdown() {
    let rt = runtime();
    let server = Server::start(config(false), rt.handle()).expect("server starts");
    let addr = server.http_addr().expect("http enabled");
    let telemetry = std::sync::Arc::clone(server.telemetry());

    // The sampler is in the status tree, alive.
    let tree = http(addr, "GET", "/api/status", None).json();
    assert_eq!(tree["telemetry"]["thread_alive"], true, "{tree}");
    assert_eq!(tree["telemetry"]["is_healthy"], true);
    assert_eq!(tree["telemetry"]["capacity"], 600);

    // 100 requests at 40 µs, recorded the way the RPC layer records them.
    for _ in 0..100 {
        server
            .rpc_stats()
            .record(Op::Noop, Outcome::Ok, Duration::from_micros(40));
    }
    // requests/s x interval, summed over the samples, gives back the 100 requests (they may
    // straddle two samples).
    let requests_in = |s: &Value| {
        s["rpc_requests_per_second"].as_f64().unwrap_or(0.0)
            * s["interval_seconds"].as_f64().unwrap_or(0.0)
    };
    let ts = wait_until("samples with the requests", Duration::from_secs(5), || {
        let ts = http(addr, "GET", "/api/timeseries", None).json();
        let n: f64 = ts["samples"].as_array()?.iter().map(requests_in).sum();
        ((n - 100.0).abs() < 1e-6).then_some(ts)
    });
    assert_eq!(ts["interval_seconds"], 1.0);
    assert_eq!(ts["capacity"], 600);
    for s in ts["samples"].as_array().expect("samples") {
        assert_eq!(s["l1_total_bytes"], 16 << 20);
        assert_eq!(s["hit_rate"], Value::Null, "no lookups yet");
        if requests_in(s) > 0.0 {
            let p99 = s["rpc_latency_p99_seconds"].as_f64().expect("p99");
            assert!((40e-6..=50e-6).contains(&p99), "interval p99 {p99}");
        } else {
            assert_eq!(s["rpc_latency_p99_seconds"], Value::Null);
        }
    }

    // Incremental fetch: only what is newer than `since`.
    let latest = ts["latest_seq"].as_u64().expect("latest_seq");
    let newer = wait_until("a newer sample", Duration::from_secs(5), || {
        let a = http(
            addr,
            "GET",
            &format!("/api/timeseries?since={latest}"),
            None,
        )
        .json();
        (a["latest_seq"].as_u64()? > latest).then_some(a)
    });
    assert_eq!(newer["epoch"], ts["epoch"]);
    let seqs: Vec<u64> = newer["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .filter_map(|s| s["seq"].as_u64())
        .collect();
    assert!(
        !seqs.is_empty() && seqs.iter().all(|&s| s > latest),
        "{seqs:?}"
    );
    // A quiet interval has no latency figure rather than a stale one.
    let quiet = newer["samples"]
        .as_array()
        .expect("samples")
        .last()
        .cloned();
    assert_eq!(
        quiet.expect("sample")["rpc_latency_p99_seconds"],
        Value::Null
    );

    // Bad input gets the API's JSON error.
    let bad = http(addr, "GET", "/api/timeseries?since=-1", None);
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["status"], "error");

    assert!(telemetry.is_alive());
    server.shutdown();
    assert!(
        !telemetry.is_alive(),
        "sampler still running after shutdown"
    );
}

#[test]
fn fault_injection_turns_the_evictor_unhealthy() {
    let rt = runtime();
    let server = Server::start(config(true), rt.handle()).expect("server starts");
    let addr = server.http_addr().expect("http enabled");
    let evictor = |tree: &Value| tree["storage_manager"]["l1_eviction_controller"].clone();
    assert_eq!(
        evictor(&http(addr, "GET", "/api/status", None).json())["is_healthy"],
        true
    );

    let unknown = http(
        addr,
        "POST",
        "/api/debug/fault",
        Some(r#"{"component":"nope"}"#),
    );
    assert_eq!(unknown.status, 400);
    assert!(unknown.body.contains("l1_eviction_controller"));

    let a = http(
        addr,
        "POST",
        "/api/debug/fault",
        Some(r#"{"component":"l1_eviction_controller"}"#),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let node = wait_until(
        "the evictor to be reported dead",
        Duration::from_secs(5),
        || {
            let e = evictor(&http(addr, "GET", "/api/status", None).json());
            (e["is_healthy"] == false).then_some(e)
        },
    );
    assert_eq!(node["unhealthy_reason"], "eviction thread is not running");
    let health = http(addr, "GET", "/api/healthcheck", None);
    assert_eq!(health.status, 503);
    server.shutdown();
}
