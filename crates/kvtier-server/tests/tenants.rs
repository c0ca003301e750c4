//! Per-`cache_salt` quotas through the wire: a real server (shared-memory L1, ZeroMQ, HTTP on
//! ephemeral ports, IsolatedLRU). Tenant B's hot set is stored and read; tenant A gets a quota
//! through `PUT /quota/tenant-a` and then stores twice its quota. Tenant A must stay within
//! its quota (its own objects are evicted first, then its stores are refused), and tenant B
//! must lose nothing. The LMCache-compatible quota routes' answers are checked on the way.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use kvtier_core::l1::EvictionPolicyKind;
use serde_json::{Value, json};

const MODEL: &str = "org/tenants-model";
const GIB: f64 = (1u64 << 30) as f64;

fn tenant<'a>(status: &'a Value, name: &str) -> &'a Value {
    &status["storage_manager"]["l1_manager"]["tenants"][name]
}

#[test]
fn a_tenant_over_its_quota_evicts_only_its_own_objects() {
    let rt = http_runtime();
    let mut cfg = config(Vec::new());
    cfg.l1.eviction_policy = EvictionPolicyKind::IsolatedLru;
    cfg.l1.size_bytes = 8 << 20;
    let server = start(cfg, &rt);
    let http = server.http_addr().expect("http");
    let mut c = Client::connect(server.rpc_endpoint());
    c.register(1, MODEL);

    // Tenant B's hot set: 64 chunks (512 KiB), stored and read back.
    let hot: Vec<Vec<u32>> = (0..4).map(|s| tokens(100 + s, 16)).collect();
    for (i, t) in hot.iter().enumerate() {
        assert_eq!(
            store_as(
                &mut c, &server, 1, MODEL, t, i as u64, "b-store", "tenant-b"
            )
            .len(),
            16
        );
        assert_eq!(lookup_as(&mut c, MODEL, t, "b-look", "tenant-b"), 16);
        c.call_json("end_session", &[json!("b-look")]);
    }

    // Quota routes, LMCache 0.5.6 shapes.
    let limit_bytes: u64 = 1 << 20;
    let limit_gb = limit_bytes as f64 / GIB;
    let (code, body) = http_call(
        http,
        "PUT",
        "/quota/tenant-a",
        Some(&json!({ "limit_gb": limit_gb }).to_string()),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        json!({"cache_salt": "tenant-a", "limit_gb": limit_gb, "status": "ok"})
    );
    for bad in [
        r#"{"limit_gb": -1}"#,
        r#"{"limit": 1}"#,
        "not json",
        r#"{"limit_gb": "x"}"#,
    ] {
        let (code, body) = http_call(http, "PUT", "/quota/tenant-a", Some(bad));
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    let (code, body) = http_call(http, "PUT", "/quota/_default", Some(r#"{"limit_gb": 1}"#));
    assert_eq!((code, &body["cache_salt"]), (200, &json!("_default")));

    // Tenant A stores 2 MiB (twice its quota), 16 chunks at a time.
    let mut accepted = 0;
    for s in 0..16u32 {
        let t = tokens(1000 + s, 16);
        accepted += store_as(&mut c, &server, 1, MODEL, &t, u64::from(s), "a", "tenant-a").len();
        let (_, q) = http_get(http, "/quota/tenant-a");
        let used = q["current_usage_gb"].as_f64().expect("usage") * GIB;
        assert!(used <= limit_bytes as f64, "tenant-a over its quota: {q}");
    }
    assert_eq!(
        accepted,
        16 * 16,
        "tenant-a's stores fit by evicting its own objects"
    );

    // Tenant B lost nothing, byte for byte.
    for (i, t) in hot.iter().enumerate() {
        assert_eq!(lookup_as(&mut c, MODEL, t, "b-again", "tenant-b"), 16);
        let mut k = key_salted(MODEL, t, 0, t.len(), Some(0), "b-again", "tenant-b");
        let r = c
            .call_json("prepare_retrieve", &[k.clone(), json!(1)])
            .expect("prepare_retrieve reply");
        assert_eq!(r["success"], json!(true), "{r}");
        let seg = server.engine().segment();
        for (j, slot) in r["context"]["slots"]
            .as_array()
            .expect("slots")
            .iter()
            .enumerate()
        {
            let mut v = vec![0u8; OBJ];
            let off = slot["offset"].as_u64().expect("offset") as usize;
            seg.copy_out(off, &mut v).expect("copy");
            assert!(
                v == chunk_bytes(i as u64, j),
                "tenant-b chunk {i}/{j} changed"
            );
        }
        k["request_id"] = json!("b-again");
        assert_eq!(
            c.call_json("commit_retrieve", &[k, json!(1)]),
            Some(json!(true))
        );
        c.call_json("end_session", &[json!("b-again")]);
    }
    // Un-salted traffic is the `_default` tenant (quota 1 GiB above).
    let plain = tokens(7000, 2);
    assert_eq!(store(&mut c, &server, 1, MODEL, &plain, 3, "d").len(), 2);
    assert_eq!(lookup(&mut c, MODEL, &plain, "d-look"), 2);
    assert_eq!(
        retrieve(&mut c, &server, 1, MODEL, &plain, 2, "d-look").len(),
        2
    );
    c.call_json("end_session", &[json!("d-look")]);
    wait_until("objects counted", Duration::from_secs(5), || {
        l1_objects(&server) >= 64 + 2
    });
    let (_, status) = http_get(http, "/api/status");
    let b = tenant(&status, "tenant-b");
    assert_eq!(b["evicted_objects_total"], 0, "{b}");
    assert_eq!(b["objects"], 64, "{b}");
    assert_eq!(b["hits_total"], 128, "{b}");
    let a = tenant(&status, "tenant-a");
    assert!(a["evicted_objects_total"].as_u64() >= Some(128), "{a}");
    assert_eq!(a["limit_bytes"], limit_bytes, "{a}");

    // GET /quota lists both quotas; metrics carry the tenant label.
    let (code, list) = http_get(http, "/quota");
    assert_eq!(code, 200);
    assert_eq!(
        list["users"]["tenant-a"]["limit_gb"],
        json!(limit_gb),
        "{list}"
    );
    assert!(list["users"]["_default"].is_object(), "{list}");
    let (code, one) = http_get(http, "/quota/nobody");
    assert_eq!(code, 200);
    assert_eq!(
        one,
        json!({"cache_salt": "nobody", "limit_gb": 0.0, "current_usage_gb": 0.0, "exists": false})
    );
    let metrics = server_metrics(http);
    assert!(
        metrics.contains("kvtier_l1_tenant_used_bytes{tenant=\"tenant-b\"}"),
        "tenant gauge missing"
    );
    assert!(metrics.contains("kvtier_l1_tenant_hits_total{tenant=\"other\"}"));

    // A quota too small for one store refuses that tenant's keys only.
    let (code, _) = http_call(http, "PUT", "/quota/tenant-a", Some(r#"{"limit_gb": 0}"#));
    assert_eq!(code, 200);
    let refused = store_as(
        &mut c,
        &server,
        1,
        MODEL,
        &tokens(5000, 4),
        9,
        "a2",
        "tenant-a",
    );
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(
        store_as(
            &mut c,
            &server,
            1,
            MODEL,
            &tokens(6000, 4),
            9,
            "c",
            "tenant-c"
        )
        .len(),
        4
    );

    let (code, body) = http_call(http, "DELETE", "/quota/tenant-a", None);
    assert_eq!(
        (code, body),
        (200, json!({"cache_salt": "tenant-a", "status": "removed"}))
    );
    let (_, body) = http_call(http, "DELETE", "/quota/tenant-a", None);
    assert_eq!(body["status"], "not_found");
    server.shutdown();
}

/// `METHOD path` with an optional JSON body on the HTTP API: `(status, json body)`.
fn http_call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).expect("http connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("http write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("http read");
    let status: u16 = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn server_metrics(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}
