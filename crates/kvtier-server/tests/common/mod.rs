//! Test client for end-to-end tests: a real ZeroMQ DEALER speaking LMCache 0.5.6's msgpack wire
//! format to an in-process kvtier server, plus a minimal HTTP GET and msgpack decoder.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use kvtier_server::{Server, ServerConfig};
use kvtier_storage::AdapterConfig;
use serde_json::{Value, json};

static N: AtomicU64 = AtomicU64::new(0);

/// Tokens per chunk in these tests.
pub const CHUNK: usize = 16;
/// Layers and hidden size of the test model: objects are 2*2*16*64*2 = 8192 bytes.
pub const LAYERS: u32 = 2;
/// Hidden size per token per layer.
pub const HIDDEN: u32 = 64;
/// Bytes per chunk object.
pub const OBJ: usize = 2 * LAYERS as usize * CHUNK * HIDDEN as usize * 2;

/// A server config on ephemeral ports with a unique segment name.
pub fn config(l2_adapters: Vec<AdapterConfig>) -> ServerConfig {
    let mut c = ServerConfig::ephemeral(format!(
        "kvtier_e2e_{}_{}",
        std::process::id(),
        N.fetch_add(1, Relaxed)
    ));
    c.engine.chunk_size = CHUNK;
    c.l1.size_bytes = 32 << 20;
    c.rpc.max_workers = 2;
    c.rpc.drain_timeout = Duration::from_secs(2);
    c.l2.adapters = l2_adapters;
    c
}

/// A runtime for the HTTP API.
pub fn http_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Starts a server.
pub fn start(cfg: ServerConfig, rt: &tokio::runtime::Runtime) -> Server {
    Server::start(cfg, rt.handle()).expect("server starts")
}

/// A DEALER client.
pub struct Client {
    _ctx: zmq::Context,
    sock: zmq::Socket,
    uid: u64,
}

fn enc_uint(v: u64) -> Vec<u8> {
    let mut b = Vec::new();
    rmp::encode::write_uint(&mut b, v).expect("vec");
    b
}

fn enc_str(s: &str) -> Vec<u8> {
    let mut b = Vec::new();
    rmp::encode::write_str(&mut b, s).expect("vec");
    b
}

/// Encodes a JSON value as msgpack (ints, strings, bools, nil, arrays, maps; `{"$bin": "hex"}`
/// is bin).
pub fn to_msgpack(v: &Value) -> Vec<u8> {
    let mut b = Vec::new();
    write_value(&mut b, v);
    b
}

fn write_value(b: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => rmp::encode::write_nil(b).expect("vec"),
        Value::Bool(x) => rmp::encode::write_bool(b, *x).expect("vec"),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                rmp::encode::write_uint(b, u).expect("vec");
            } else if let Some(i) = n.as_i64() {
                rmp::encode::write_sint(b, i).expect("vec");
            } else {
                rmp::encode::write_f64(b, n.as_f64().expect("number")).expect("vec");
            }
        }
        Value::String(s) => rmp::encode::write_str(b, s).expect("vec"),
        Value::Array(a) => {
            rmp::encode::write_array_len(b, a.len() as u32).expect("vec");
            for x in a {
                write_value(b, x);
            }
        }
        Value::Object(m) => {
            if let Some(Value::String(hex)) = m.get("$bin") {
                let bytes: Vec<u8> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                    .collect();
                rmp::encode::write_bin(b, &bytes).expect("vec");
                return;
            }
            rmp::encode::write_map_len(b, m.len() as u32).expect("vec");
            for (k, x) in m {
                rmp::encode::write_str(b, k).expect("vec");
                write_value(b, x);
            }
        }
    }
}

/// Decodes one msgpack document into JSON (bin becomes an array of byte values).
pub fn from_msgpack(mut buf: &[u8]) -> Value {
    let v = read_value(&mut buf);
    assert!(buf.is_empty(), "trailing bytes in reply");
    v
}

fn read_value(buf: &mut &[u8]) -> Value {
    use rmp::Marker as M;
    use rmp::decode::*;
    let m = read_marker(buf).expect("marker");
    let take = |buf: &mut &[u8], n: usize| -> Vec<u8> {
        let (a, rest) = buf.split_at(n);
        *buf = rest;
        a.to_vec()
    };
    match m {
        M::Null => Value::Null,
        M::True => Value::Bool(true),
        M::False => Value::Bool(false),
        M::FixPos(n) => json!(n),
        M::FixNeg(n) => json!(n),
        M::U8 => json!(buf.read_data_u8().expect("u8")),
        M::U16 => json!(buf.read_data_u16().expect("u16")),
        M::U32 => json!(buf.read_data_u32().expect("u32")),
        M::U64 => json!(buf.read_data_u64().expect("u64")),
        M::I8 => json!(buf.read_data_i8().expect("i8")),
        M::I16 => json!(buf.read_data_i16().expect("i16")),
        M::I32 => json!(buf.read_data_i32().expect("i32")),
        M::I64 => json!(buf.read_data_i64().expect("i64")),
        M::F32 => json!(buf.read_data_f32().expect("f32")),
        M::F64 => json!(buf.read_data_f64().expect("f64")),
        M::FixStr(n) => Value::String(String::from_utf8(take(buf, n as usize)).expect("utf8")),
        M::Str8 => {
            let n = buf.read_data_u8().expect("len") as usize;
            Value::String(String::from_utf8(take(buf, n)).expect("utf8"))
        }
        M::Str16 => {
            let n = buf.read_data_u16().expect("len") as usize;
            Value::String(String::from_utf8(take(buf, n)).expect("utf8"))
        }
        M::Bin8 => {
            let n = buf.read_data_u8().expect("len") as usize;
            json!(take(buf, n))
        }
        M::FixArray(n) => Value::Array((0..n).map(|_| read_value(buf)).collect()),
        M::Array16 => {
            let n = buf.read_data_u16().expect("len");
            Value::Array((0..n).map(|_| read_value(buf)).collect())
        }
        M::FixMap(n) => read_map(buf, n as u32),
        M::Map16 => {
            let n = buf.read_data_u16().expect("len");
            read_map(buf, u32::from(n))
        }
        other => panic!("unexpected msgpack marker {other:?}"),
    }
}

fn read_map(buf: &mut &[u8], n: u32) -> Value {
    let mut m = serde_json::Map::new();
    for _ in 0..n {
        let Value::String(k) = read_value(buf) else {
            panic!("non-string map key")
        };
        m.insert(k, read_value(buf));
    }
    Value::Object(m)
}

impl Client {
    /// Connects to `endpoint`.
    pub fn connect(endpoint: &str) -> Self {
        let ctx = zmq::Context::new();
        let sock = ctx.socket(zmq::DEALER).expect("socket");
        sock.set_rcvtimeo(30_000).expect("rcvtimeo");
        sock.set_linger(0).expect("linger");
        sock.connect(endpoint).expect("connect");
        Self {
            _ctx: ctx,
            sock,
            uid: 0,
        }
    }

    /// Sends `op` with msgpack payload frames; returns the response frame (None = bare reply).
    pub fn call(&mut self, op: &str, payloads: &[Vec<u8>]) -> Option<Vec<u8>> {
        let uid = enc_uint(self.uid);
        self.uid += 1;
        let mut frames: Vec<Vec<u8>> = vec![uid.clone(), enc_str(op)];
        frames.extend(payloads.iter().cloned());
        self.sock.send_multipart(frames, 0).expect("send");
        let reply = self.sock.recv_multipart(0).expect("reply within 30 s");
        assert_eq!(reply[0], uid, "uid echoed");
        assert!(
            reply.len() == 2 || reply.len() == 3,
            "reply frames: {}",
            reply.len()
        );
        reply.get(2).cloned()
    }

    /// Like [`call`](Self::call), decoding the response.
    pub fn call_json(&mut self, op: &str, payloads: &[Value]) -> Option<Value> {
        let frames: Vec<Vec<u8>> = payloads.iter().map(to_msgpack).collect();
        self.call(op, &frames).map(|r| from_msgpack(&r))
    }

    /// Registers an engine-driven context for `model`.
    pub fn register(&mut self, instance_id: i64, model: &str) {
        let r = self
            .call_json(
                "register_kv_cache_engine_driven_context",
                &[json!({
                    "instance_id": instance_id, "model_name": model, "world_size": 1,
                    "block_size": CHUNK, "num_layers": LAYERS, "hidden_dim_size": HIDDEN,
                    "dtype_str": "bfloat16", "use_mla": false, "num_physical_slots": CHUNK,
                })],
            )
            .expect("register reply");
        assert!(r["shm_name"].is_string(), "{r}");
    }
}

/// An IPC key for `tokens[start..end]`.
pub fn key(
    model: &str,
    tokens: &[u32],
    start: usize,
    end: usize,
    worker: Option<u32>,
    request_id: &str,
) -> Value {
    json!({
        "model_name": model, "world_size": 1, "worker_id": worker, "token_ids": tokens,
        "start": start, "end": end, "request_id": request_id, "cache_salt": "",
        "num_kv_readers": 1,
    })
}

/// [`key`] with a `cache_salt` (tenant).
pub fn key_salted(
    model: &str,
    tokens: &[u32],
    start: usize,
    end: usize,
    worker: Option<u32>,
    request_id: &str,
    salt: &str,
) -> Value {
    let mut k = key(model, tokens, start, end, worker, request_id);
    k["cache_salt"] = json!(salt);
    k
}

/// Deterministic chunk contents.
pub fn chunk_bytes(seed: u64, i: usize) -> Vec<u8> {
    (0..OBJ)
        .map(|j| ((seed * 31 + i as u64 * 7 + j as u64 * 13) % 251) as u8)
        .collect()
}

/// Stores `tokens` (whole chunks) through prepare_store / commit_store, chunk `i` holding
/// `chunk_bytes(seed, i)`. Returns the chunk indices the server asked for.
pub fn store(
    c: &mut Client,
    server: &Server,
    instance: i64,
    model: &str,
    tokens: &[u32],
    seed: u64,
    rid: &str,
) -> Vec<u64> {
    store_as(c, server, instance, model, tokens, seed, rid, "")
}

/// [`store`] as the tenant `salt`.
#[expect(clippy::too_many_arguments, reason = "test helper mirroring store()")]
pub fn store_as(
    c: &mut Client,
    server: &Server,
    instance: i64,
    model: &str,
    tokens: &[u32],
    seed: u64,
    rid: &str,
    salt: &str,
) -> Vec<u64> {
    let k = key_salted(model, tokens, 0, tokens.len(), Some(0), rid, salt);
    let r = c
        .call_json("prepare_store", &[k.clone(), json!(instance)])
        .expect("prepare_store reply");
    let slots = r["context"]["slots"].as_array().expect("slots").clone();
    let idx: Vec<u64> = r["context"]["chunk_indices"]
        .as_array()
        .expect("indices")
        .iter()
        .map(|v| v.as_u64().expect("u64"))
        .collect();
    let seg = server.engine().segment();
    for (slot, &i) in slots.iter().zip(&idx) {
        assert_eq!(slot["length"], OBJ);
        let off = slot["offset"].as_u64().expect("offset") as usize;
        seg.copy_in(off, &chunk_bytes(seed, i as usize))
            .expect("copy");
    }
    if !slots.is_empty() {
        let ok = c
            .call_json("commit_store", &[k, json!(instance), json!({"$bin": ""})])
            .expect("commit reply");
        assert_eq!(ok, json!(true), "commit_store");
    }
    c.call_json("end_session", &[json!(rid)]);
    idx
}

/// lookup + polling query_prefetch_status until it answers an int (nil means pending).
pub fn lookup(c: &mut Client, model: &str, tokens: &[u32], rid: &str) -> u64 {
    lookup_as(c, model, tokens, rid, "")
}

/// [`lookup`] as the tenant `salt`.
pub fn lookup_as(c: &mut Client, model: &str, tokens: &[u32], rid: &str, salt: &str) -> u64 {
    let k = key_salted(model, tokens, 0, tokens.len(), None, rid, salt);
    assert!(
        c.call_json("lookup", &[k, json!(1)]).is_none(),
        "lookup replies bare"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = c.call_json("query_prefetch_status", &[json!(rid)]) {
            return v.as_u64().expect("int");
        }
        assert!(Instant::now() < deadline, "prefetch never finished");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// prepare_retrieve + commit_retrieve of `chunks` chunks; returns each chunk's bytes.
pub fn retrieve(
    c: &mut Client,
    server: &Server,
    instance: i64,
    model: &str,
    tokens: &[u32],
    chunks: usize,
    rid: &str,
) -> Vec<Vec<u8>> {
    let k = key(model, tokens, 0, chunks * CHUNK, Some(0), rid);
    let r = c
        .call_json("prepare_retrieve", &[k.clone(), json!(instance)])
        .expect("prepare_retrieve reply");
    assert_eq!(r["success"], json!(true), "{r}");
    let seg = server.engine().segment();
    let out = r["context"]["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .map(|s| {
            let mut v = vec![0u8; OBJ];
            seg.copy_out(s["offset"].as_u64().expect("offset") as usize, &mut v)
                .expect("copy");
            v
        })
        .collect();
    let ok = c
        .call_json("commit_retrieve", &[k, json!(instance)])
        .expect("commit_retrieve reply");
    assert_eq!(ok, json!(true));
    out
}

/// Tokens for `chunks` whole chunks, distinct per `seed`.
pub fn tokens(seed: u32, chunks: usize) -> Vec<u32> {
    (0..(chunks * CHUNK) as u32)
        .map(|t| seed * 100_000 + t)
        .collect()
}

/// `GET path` on the HTTP API: `(status, json body)`.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).expect("http connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
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
    // Chunked encoding is not used by axum for fixed JSON bodies.
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Waits until `f` holds.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The L1 object count.
pub fn l1_objects(server: &Server) -> u64 {
    server.engine().l1().counters().objects.get()
}
