//! The HTTP admin API against a real in-process server: real shared memory, a real ZeroMQ
//! socket, a real axum listener on an ephemeral port, a real HTTP client.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kvtier_server::http::{AuthToken, HttpConfig};
use kvtier_server::{Server, ServerConfig, ServerError};
use serde_json::Value;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn config(token: Option<&str>) -> ServerConfig {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut c = ServerConfig::ephemeral(format!("kvtier_http_test_{}_{n}", std::process::id()));
    c.http = Some(HttpConfig {
        auth_token: token.map(|t| AuthToken::new(t).expect("valid token")),
        ..HttpConfig::local(0)
    });
    c
}

struct TestServer {
    server: Option<Server>,
    base: String,
    agent: ureq::Agent,
    // Declared last: dropped after the server is shut down.
    _rt: tokio::runtime::Runtime,
}

impl TestServer {
    fn start(token: Option<&str>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-http")
            .enable_all()
            .build()
            .expect("runtime");
        let server = Server::start(config(token), rt.handle()).expect("server starts");
        let addr = server.http_addr().expect("http enabled");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Self {
            server: Some(server),
            base: format!("http://{addr}"),
            agent,
            _rt: rt,
        }
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        Reply::from(req.call().expect("request answered"))
    }

    fn post(&self, path: &str, body: &str, token: Option<&str>) -> Reply {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json");
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        Reply::from(req.send(body).expect("request answered"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

struct Reply {
    code: u16,
    content_type: String,
    www_authenticate: Option<String>,
    body: String,
}

impl From<ureq::http::Response<ureq::Body>> for Reply {
    fn from(mut r: ureq::http::Response<ureq::Body>) -> Self {
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header("content-type").unwrap_or_default();
        let www_authenticate = header("www-authenticate");
        let code = r.status().as_u16();
        let body = r.body_mut().read_to_string().expect("body");
        Self {
            code,
            content_type,
            www_authenticate,
            body,
        }
    }
}

impl Reply {
    fn json(&self) -> Value {
        assert!(
            self.content_type.starts_with("application/json"),
            "content type {:?} for body {}",
            self.content_type,
            self.body
        );
        serde_json::from_str(&self.body).expect("JSON body")
    }
}

#[test]
fn every_route_and_alias_answers() {
    let t = TestServer::start(None);

    let root = t.get("/", None);
    assert_eq!(root.code, 200);
    assert!(
        root.body.contains("/dashboard/app.js"),
        "GET / is the dashboard"
    );

    for path in ["/api/status", "/status"] {
        let r = t.get(path, None);
        assert_eq!(r.code, 200, "{path}");
        let v = r.json();
        assert_eq!(v["is_healthy"], true, "{path}");
        assert_eq!(v["engine_type"], "kvtier");
        assert_eq!(v["chunk_size"], 256);
        let l1 = &v["storage_manager"]["l1_manager"];
        assert_eq!(l1["memory_total_bytes"], 16 << 20);
        assert!(v["storage_manager"]["l1_eviction_controller"]["thread_alive"] == true);
        assert!(v["transport"]["endpoint"].is_string());
        assert_eq!(v["http"]["is_healthy"], true);
        assert_eq!(v["http"]["serving"], true);
        assert_eq!(v["http"]["auth_required"], false);
        assert_eq!(
            v["http"]["address"],
            t.server().http_addr().expect("http").to_string()
        );
        assert!(v["rpc"].is_object());
        assert!(v["uptime_seconds"].is_f64());
    }

    for path in ["/api/healthcheck", "/healthcheck"] {
        let r = t.get(path, None);
        assert_eq!(r.code, 200, "{path}");
        assert_eq!(r.json(), serde_json::json!({"status": "healthy"}));
    }

    let v = t.get("/version", None);
    assert_eq!(v.code, 200);
    assert_eq!(v.json()["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v.json()["lmcache_protocol"], "0.5.6");

    let c = t.get("/config", None);
    assert_eq!(c.code, 200);
    let c = c.json();
    assert_eq!(c["l1_size_bytes"], 16 << 20);
    assert_eq!(c["session_ttl_seconds"], 600.0);
    assert_eq!(c["http"]["auth_token"], Value::Null);

    let m = t.get("/metrics", None);
    assert_eq!(m.code, 200);
    assert!(m.content_type.starts_with("application/openmetrics-text"));
    assert!(m.body.contains("kvtier_l1_capacity_bytes"));

    let clear = t.post("/api/clear-cache", "", None);
    assert_eq!(clear.code, 200);
    assert_eq!(clear.json()["status"], "ok");

    let clear = t.post("/cache/clear", r#"{"tier":"l1","force":false}"#, None);
    assert_eq!(clear.code, 200);
    assert_eq!(clear.json()["cleared"]["tier"], "l1");
    let clear = t.post("/cache/clear", "", None);
    assert_eq!(clear.code, 200, "an empty body means the defaults");
    let bad = t.post("/cache/clear", r#"{"tier":"l7"}"#, None);
    assert_eq!(bad.code, 400);
    assert!(
        bad.json()["reason"]
            .as_str()
            .expect("reason")
            .contains("l7")
    );
    let bad = t.post("/cache/clear", "{not json", None);
    assert_eq!(bad.code, 400);
    assert_eq!(bad.json()["status"], "error");

    let missing = t.get("/no/such/route", None);
    assert_eq!(missing.code, 404);
    assert_eq!(missing.json()["path"], "/no/such/route");
    let wrong_method = t.get("/cache/clear", None);
    assert_eq!(wrong_method.code, 405);
    assert_eq!(wrong_method.json()["status"], "error");
}

#[test]
fn clear_cache_really_clears_l1() {
    let t = TestServer::start(None);
    let l1 = t.server().engine().l1();
    let keys: Vec<_> = (0..4u8)
        .map(|i| {
            let mut h = [0u8; 32];
            h[0] = i;
            (
                kvtier_core::key::ObjectKey {
                    chunk_hash: kvtier_core::hash::ChunkHash::from_bytes(h),
                    model_name: "m".into(),
                    kv_rank: 0x0100_0100,
                    object_group_id: 0,
                    cache_salt: "".into(),
                },
                4096,
            )
        })
        .collect();
    let tickets: Vec<_> = l1
        .reserve_write(&keys, false)
        .into_iter()
        .map(|r| r.expect("fits"))
        .collect();
    assert!(l1.finish_write(&tickets).iter().all(Result::is_ok));
    let before = t.get("/api/status", None).json();
    assert_eq!(
        before["storage_manager"]["l1_manager"]["total_object_count"],
        4
    );
    let r = t.post("/cache/clear", r#"{"tier":"all","force":true}"#, None);
    assert_eq!(r.code, 200);
    assert_eq!(r.json()["cleared"]["removed"], 4);
    let after = t.get("/api/status", None).json();
    assert_eq!(
        after["storage_manager"]["l1_manager"]["total_object_count"],
        0
    );
}

#[test]
fn healthcheck_is_503_and_names_the_dead_component() {
    let t = TestServer::start(None);
    assert_eq!(t.get("/api/healthcheck", None).code, 200);
    t.server().engine().evictor().inject_crash();
    // The thread notices the fault on its next wake-up; wait for it (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = t.get("/api/healthcheck", None);
        if r.code != 200 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(r.code, 503, "{}", r.body);
    let v = r.json();
    assert_eq!(v["status"], "unhealthy");
    assert_eq!(v["reason"], "unhealthy: storage_manager");
    assert_eq!(
        v["unhealthy"],
        serde_json::json!([{
            "path": "engine.storage_manager.l1_eviction_controller",
            "reason": "eviction thread is not running",
        }])
    );
    assert_eq!(t.get("/healthcheck", None).code, 503);
    let tree = t.get("/api/status", None);
    assert_eq!(tree.code, 200, "the status itself still answers");
    let tree = tree.json();
    assert_eq!(tree["is_healthy"], false);
    assert_eq!(
        tree["storage_manager"]["l1_eviction_controller"]["unhealthy_reason"],
        "eviction thread is not running"
    );
    let m = t.get("/metrics", None);
    assert!(m.body.contains("\nkvtier_status_healthy 0\n"), "{}", m.body);
    assert!(m.body.contains("\nkvtier_l1_eviction_thread_up 0\n"));
}

const TOKEN: &str = "test-token-0123456789";

#[test]
fn token_is_required_everywhere_but_the_healthcheck() {
    let t = TestServer::start(Some(TOKEN));
    let protected = [
        "/api/status",
        "/api/timeseries",
        "/api/hit-rate-curve",
        "/status",
        "/version",
        "/config",
        "/metrics",
        "/unknown",
    ];
    for path in protected {
        let r = t.get(path, None);
        assert_eq!(r.code, 401, "{path} without a token");
        assert_eq!(
            r.www_authenticate.as_deref(),
            Some("Bearer realm=\"kvtier\"")
        );
        assert_eq!(r.json()["status"], "error");
        let r = t.get(path, Some("wrong-token"));
        assert_eq!(r.code, 401, "{path} with a wrong token");
        let r = t.get(path, Some(&TOKEN[..TOKEN.len() - 1]));
        assert_eq!(r.code, 401, "{path} with a prefix of the token");
    }
    for path in [
        "/api/status",
        "/status",
        "/version",
        "/config",
        "/metrics",
        "/api/timeseries",
        "/api/hit-rate-curve",
    ] {
        assert_eq!(t.get(path, Some(TOKEN)).code, 200, "{path} with the token");
    }
    // The dashboard's static files hold no data and a browser cannot attach the token when it
    // opens the page: they are served without it (the page then asks for the token).
    for path in [
        "/",
        "/dashboard",
        "/dashboard/app.js",
        "/dashboard/style.css",
    ] {
        assert_eq!(t.get(path, None).code, 200, "{path} without a token");
    }
    assert_eq!(t.get("/unknown", Some(TOKEN)).code, 404);
    for (path, body) in [
        ("/api/clear-cache", ""),
        ("/cache/clear", r#"{"tier":"l1"}"#),
    ] {
        assert_eq!(t.post(path, body, None).code, 401, "{path}");
        assert_eq!(t.post(path, body, Some(TOKEN)).code, 200, "{path}");
    }
    // Health checks stay open for orchestrator probes.
    for path in ["/api/healthcheck", "/healthcheck"] {
        assert_eq!(t.get(path, None).code, 200, "{path}");
    }
    // Wrong scheme.
    let r = t
        .agent
        .get(format!("{}/api/status", t.base))
        .header("Authorization", format!("Basic {TOKEN}"))
        .call()
        .expect("answered");
    assert_eq!(r.status().as_u16(), 401);

    // The secret appears nowhere in what the server shows.
    let config = t.get("/config", Some(TOKEN));
    assert!(!config.body.contains(TOKEN));
    assert_eq!(config.json()["http"]["auth_token"], "<redacted>");
    assert!(!format!("{:?}", t.server().config()).contains(TOKEN));
    let metrics = t.get("/metrics", Some(TOKEN)).body;
    assert!(
        metrics.contains("\nkvtier_http_auth_failures_total 27\n"),
        "{metrics}"
    );
    assert!(metrics.contains("kvtier_http_requests_total{route=\"/config\",code=\"401\"} 3\n"));
    assert!(metrics.contains("kvtier_http_requests_total{route=\"unmatched\",code=\"404\"} 1\n"));
}

#[test]
fn non_loopback_without_token_is_refused_before_anything_starts() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut cfg = config(None);
    let shm = cfg.l1.shm_name.clone();
    if let Some(h) = cfg.http.as_mut() {
        h.host = "0.0.0.0".into();
    }
    match Server::start(cfg, rt.handle()) {
        Err(ServerError::Http(e)) => {
            let msg = e.to_string();
            assert!(msg.contains("--http-auth-token"), "{msg}");
            assert!(msg.contains("--http-insecure"), "{msg}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(s) => {
            s.shutdown();
            panic!("bound 0.0.0.0 without a token");
        }
    }
    assert!(
        !std::path::Path::new("/dev/shm").join(&shm).exists(),
        "refused before creating the segment"
    );
    let allowed = HttpConfig {
        host: "0.0.0.0".into(),
        allow_insecure: true,
        ..HttpConfig::local(0)
    };
    assert!(allowed.check_exposure().is_ok());
    let with_token = HttpConfig {
        host: "0.0.0.0".into(),
        auth_token: Some(AuthToken::new("x").expect("valid")),
        ..HttpConfig::local(0)
    };
    assert!(with_token.check_exposure().is_ok());
}

/// One request over a real ZeroMQ DEALER socket; returns the reply frames.
fn rpc(endpoint: &str, frames: &[&[u8]]) -> Vec<Vec<u8>> {
    let ctx = zmq::Context::new();
    let s = ctx.socket(zmq::DEALER).expect("socket");
    s.set_linger(0).expect("linger");
    s.set_rcvtimeo(10_000).expect("timeout");
    s.connect(endpoint).expect("connect");
    s.send_multipart(frames.iter().copied(), 0).expect("send");
    s.recv_multipart(0).expect("reply")
}

/// The parts of an exposition the tests check: families with their HELP/TYPE, and samples.
struct Exposition {
    help: BTreeMap<String, String>,
    types: BTreeMap<String, String>,
    samples: BTreeMap<String, f64>,
}

/// Strict line-level checks on top of `prometheus-parse`: every sample belongs to a family
/// declared *before* it with both HELP and TYPE, names follow `kvtier_…`, and the text ends
/// with `# EOF`.
fn parse_exposition(text: &str) -> Exposition {
    let lines: Vec<std::io::Result<String>> = text.lines().map(|l| Ok(l.to_owned())).collect();
    let scrape = prometheus_parse::Scrape::parse(lines.into_iter()).expect("parses");
    assert!(!scrape.samples.is_empty());
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    let mut help = BTreeMap::new();
    let mut types = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest.split_once(' ').expect("HELP name text");
            assert!(!doc.trim().is_empty(), "empty HELP for {name}");
            assert!(
                help.insert(name.to_owned(), doc.to_owned()).is_none(),
                "HELP twice: {name}"
            );
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE name type");
            assert!(help.contains_key(name), "TYPE before HELP for {name}");
            assert!(
                ["counter", "gauge", "histogram"].contains(&ty),
                "type {ty} of {name}"
            );
            types.insert(name.to_owned(), ty.to_owned());
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
        } else {
            assert!(!line.starts_with('#'), "unexpected comment {line}");
            let (series, value) = line.rsplit_once(' ').expect("sample");
            let name = series.split('{').next().expect("name");
            assert!(name.starts_with("kvtier_"), "{name}");
            let family = types
                .iter()
                .filter(|(f, ty)| {
                    let suffixes: &[&str] = match ty.as_str() {
                        "counter" => &["_total"],
                        "histogram" => &["_bucket", "_sum", "_count"],
                        _ => &[""],
                    };
                    suffixes.iter().any(|s| name == format!("{f}{s}"))
                })
                .map(|(f, _)| f.clone())
                .next();
            assert!(family.is_some(), "sample {name} has no declared family");
            samples.insert(series.to_owned(), value.parse::<f64>().expect("number"));
        }
    }
    // Every family prometheus-parse saw a doc for is one we saw, and vice versa.
    let parsed: BTreeSet<_> = scrape.docs.keys().cloned().collect();
    let ours: BTreeSet<_> = help.keys().cloned().collect();
    assert_eq!(parsed, ours);
    assert_eq!(
        help.keys().collect::<Vec<_>>(),
        types.keys().collect::<Vec<_>>()
    );
    Exposition {
        help,
        types,
        samples,
    }
}

#[test]
fn metrics_parse_and_reflect_real_traffic() {
    let t = TestServer::start(None);
    let endpoint = t.server().rpc_endpoint().to_owned();
    // get_chunk_size (legacy id 21 = 0x15), uid 0: answered with 256 (cd 01 00).
    let reply = rpc(&endpoint, &[&[0x00], &[0x15]]);
    assert_eq!(reply, vec![vec![0x00], vec![0x15], vec![0xcd, 0x01, 0x00]]);
    // ping (legacy id 22) with an undecodable payload: malformed, answered with the failure value.
    let reply = rpc(&endpoint, &[&[0x01], &[0x16], &[0xc1]]);
    assert_eq!(&reply[..2], &[vec![0x01], vec![0x16]]);

    let m = t.get("/metrics", None);
    assert_eq!(m.code, 200);
    let e = parse_exposition(&m.body);

    for (family, ty) in [
        ("kvtier_rpc_requests", "counter"),
        ("kvtier_rpc_request_duration_seconds", "histogram"),
        ("kvtier_l1_used_bytes", "gauge"),
        ("kvtier_l1_capacity_bytes", "gauge"),
        ("kvtier_l1_objects", "gauge"),
        ("kvtier_l1_read_locked_objects", "gauge"),
        ("kvtier_l1_staging_objects", "gauge"),
        ("kvtier_l1_evicted_objects", "counter"),
        ("kvtier_l1_evicted_bytes", "counter"),
        ("kvtier_l1_oom_keys", "counter"),
        ("kvtier_store_chunks_rejected", "counter"),
        ("kvtier_sessions_active", "gauge"),
        ("kvtier_transport_received_messages", "counter"),
        ("kvtier_http_requests", "counter"),
        ("kvtier_status_healthy", "gauge"),
        ("kvtier_process_uptime_seconds", "gauge"),
    ] {
        assert_eq!(
            e.types.get(family).map(String::as_str),
            Some(ty),
            "{family}"
        );
        assert!(e.help.contains_key(family));
    }
    let s = &e.samples;
    assert_eq!(
        s["kvtier_rpc_requests_total{op=\"get_chunk_size\",result=\"ok\"}"],
        1.0
    );
    assert_eq!(
        s["kvtier_rpc_requests_total{op=\"ping\",result=\"malformed\"}"],
        1.0
    );
    assert_eq!(
        s["kvtier_rpc_requests_total{op=\"ping\",result=\"ok\"}"],
        0.0
    );
    assert_eq!(
        s["kvtier_rpc_request_duration_seconds_count{op=\"ping\"}"],
        1.0
    );
    assert_eq!(
        s["kvtier_rpc_request_duration_seconds_bucket{le=\"+Inf\",op=\"ping\"}"],
        1.0
    );
    // Ops never requested export no series (labels stay bounded by the op table).
    assert!(!s.keys().any(|k| k.contains("op=\"store\"")));
    assert_eq!(s["kvtier_transport_received_messages_total"], 2.0);
    assert_eq!(s["kvtier_l1_capacity_bytes"], (16u64 << 20) as f64);
    assert_eq!(s["kvtier_status_healthy"], 1.0);
    // Histogram buckets are cumulative and end at the count.
    let buckets: Vec<f64> = m
        .body
        .lines()
        .filter(|l| {
            l.starts_with("kvtier_rpc_request_duration_seconds_bucket{")
                && l.contains("op=\"get_chunk_size\"")
        })
        .map(|l| {
            l.rsplit_once(' ')
                .expect("value")
                .1
                .parse()
                .expect("number")
        })
        .collect();
    assert_eq!(buckets.len(), 26);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(buckets.last().copied(), Some(1.0));
}
