//! The client against a real in-process kvtier server (real ZeroMQ sockets, real shared
//! memory), and against a scripted ROUTER socket for reply ordering, timeouts and bad replies.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kvtier_client::{CacheKey, Client, ClientError, Op, RegisterPayload, ShmPool};
use kvtier_server::{Server, ServerConfig};

const TIMEOUT: Duration = Duration::from_secs(10);

struct Fixture {
    server: Option<Server>,
    _runtime: tokio::runtime::Runtime,
}

impl Fixture {
    fn start() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let config = {
            let mut c =
                ServerConfig::ephemeral(format!("kvtier_client_test_{}_{n}", std::process::id()));
            c.l1.size_bytes = 64 << 20;
            c.rpc.max_workers = 2;
            c.http = None;
            c
        };
        let server = Server::start(config, runtime.handle()).expect("server starts");
        Self {
            server: Some(server),
            _runtime: runtime,
        }
    }

    fn url(&self) -> String {
        self.server
            .as_ref()
            .expect("running")
            .rpc_endpoint()
            .to_owned()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

fn payload(iid: i64) -> RegisterPayload {
    RegisterPayload {
        instance_id: iid,
        model_name: "client-test".into(),
        world_size: 1,
        block_size: 16,
        num_layers: 2,
        hidden_dim_size: 64,
        dtype_str: "float16".into(),
        use_mla: false,
        num_physical_slots: None,
    }
}

/// Bytes of one chunk for `payload`: 2 (K,V) × layers × 256 tokens × hidden × 2 bytes.
const CHUNK_BYTES: usize = 2 * 2 * 256 * 64 * 2;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn management_ops() {
    let fx = Fixture::start();
    let mut c = Client::connect(&fx.url(), TIMEOUT).expect("connect");
    assert_eq!(c.noop().expect("noop"), "OK");
    assert_eq!(c.get_chunk_size().expect("chunk size"), 256);
    assert!(c.ping(None).expect("ping"));
    assert!(c.get_experimental().is_ok());
    c.clear(false).expect("clear");
    assert_eq!(c.in_flight(), 0);
    assert_eq!(c.discarded_replies(), 0);
}

#[test]
fn engine_driven_round_trip_is_byte_exact() {
    let fx = Fixture::start();
    let mut c = Client::connect(&fx.url(), TIMEOUT).expect("connect");
    let reg = c.register_engine_driven(&payload(11)).expect("register");
    assert!(!reg.shm_name.is_empty());
    assert_eq!(reg.pool_size, 64 << 20);
    let pool = ShmPool::open(&reg.shm_name, reg.pool_size).expect("map pool");

    let tokens: Vec<u32> = (0..768).map(|i| i * 7 + 1).collect();
    let key = CacheKey::new("client-test", 1, tokens.clone(), 0, 768, "req-1");
    let store_key = key.clone().with_worker(Some(0));

    let prep = c.prepare_store(&store_key, 11).expect("prepare_store");
    assert_eq!(prep.chunk_indices, [0, 1, 2]);
    let data: Vec<Vec<u8>> = (0..3).map(|i| pattern(i, CHUNK_BYTES)).collect();
    for (slot, &ix) in prep.slots.iter().zip(&prep.chunk_indices) {
        assert_eq!(slot.length, CHUNK_BYTES as u64);
        assert_eq!(slot.shape, [2, 2, 256, 64]);
        assert_eq!(slot.dtype, "float16");
        assert_eq!(slot.offset % 4096, 0);
        pool.copy_in(slot.offset, &data[ix as usize])
            .expect("in bounds");
    }
    assert!(c.commit_store(&store_key, 11).expect("commit_store"));
    // Everything is cached now: nothing to write, and a commit without reservation fails.
    let again = c
        .prepare_store(&store_key, 11)
        .expect("prepare_store again");
    assert!(again.slots.is_empty() && again.chunk_indices.is_empty());
    assert!(!c.commit_store(&store_key, 11).expect("commit_store again"));

    assert_eq!(c.lookup_and_wait(&key, 1).expect("lookup"), 3);
    let ret = c
        .prepare_retrieve(&store_key, 11)
        .expect("prepare_retrieve");
    assert!(ret.success);
    assert_eq!(ret.slots.len(), 3);
    for (i, slot) in ret.slots.iter().enumerate() {
        let mut out = vec![0u8; slot.length as usize];
        pool.copy_out(slot.offset, &mut out).expect("in bounds");
        assert!(out == data[i], "chunk {i} differs");
    }
    assert!(c.commit_retrieve(&store_key, 11).expect("commit_retrieve"));
    c.end_session("req-1").expect("end_session");

    // A miss, and a retrieve with no lookup.
    let other: Vec<u32> = (0..256).map(|i| i + 100_000).collect();
    let miss = CacheKey::new("client-test", 1, other, 0, 256, "req-2");
    assert_eq!(c.lookup_and_wait(&miss, 1).expect("lookup miss"), 0);
    c.end_session("req-2").expect("end_session");
    let unlocked = CacheKey::new("client-test", 1, tokens, 0, 768, "req-3").with_worker(Some(0));
    assert!(!c.prepare_retrieve(&unlocked, 11).expect("prepare").success);

    // Bounds are checked.
    let mut buf = [0u8; 16];
    assert!(pool.copy_out(pool.len() - 8, &mut buf).is_err());
    assert!(pool.copy_in(u64::MAX, &buf).is_err());
    c.unregister_engine_driven(11).expect("unregister");
}

#[test]
fn pipelined_requests_are_matched_by_uid() {
    let fx = Fixture::start();
    let mut c = Client::connect(&fx.url(), TIMEOUT).expect("connect");
    c.register_engine_driven(&payload(5)).expect("register");
    let mut noops = Vec::new();
    let mut stores = Vec::new();
    for i in 0..50u32 {
        noops.push(c.submit_noop().expect("send"));
        let tokens: Vec<u32> = (0..256).map(|t| t + i * 1000).collect();
        let key =
            CacheKey::new("client-test", 1, tokens, 0, 256, format!("p{i}")).with_worker(Some(0));
        stores.push(c.submit_prepare_store(&key, 5).expect("send"));
    }
    assert_eq!(c.in_flight(), 100);
    // Collect in reverse order of sending.
    for p in stores.into_iter().rev() {
        assert_eq!(c.wait(p).expect("prepare_store").slots.len(), 1);
    }
    for p in noops.into_iter().rev() {
        assert_eq!(c.wait(p).expect("noop"), "OK");
    }
    assert_eq!(c.in_flight(), 0);
}

/// A ROUTER socket standing in for a server, so the test decides what is sent back and when.
struct FakeServer {
    socket: zmq::Socket,
    url: String,
}

impl FakeServer {
    fn bind() -> Self {
        let ctx = zmq::Context::new();
        let socket = ctx.socket(zmq::ROUTER).expect("router");
        socket.bind("tcp://127.0.0.1:*").expect("bind");
        socket.set_rcvtimeo(5000).expect("rcvtimeo");
        let url = socket
            .get_last_endpoint()
            .expect("endpoint")
            .expect("utf-8");
        Self { socket, url }
    }

    fn recv(&self) -> Vec<Vec<u8>> {
        self.socket.recv_multipart(0).expect("request arrives")
    }
}

#[test]
fn out_of_order_replies_stale_replies_and_bad_op_echo() {
    let fake = FakeServer::bind();
    let mut c = Client::connect(&fake.url, TIMEOUT).expect("connect");
    let a = c.submit_noop().expect("send");
    let b = c.submit_noop().expect("send");
    let ra = fake.recv();
    let rb = fake.recv();
    // [identity, uid, op]: uids 0 and 1, op 24 (noop).
    assert_eq!(ra.len(), 3);
    assert_eq!(
        (ra[1].as_slice(), ra[2].as_slice()),
        (&[0x00][..], &[24][..])
    );
    assert_eq!(rb[1], [0x01]);
    let ok = [0xa2, b'O', b'K'];
    // Answer b first, then a stale uid, then a.
    let reply = |r: &Vec<Vec<u8>>, body: &[u8]| {
        fake.socket
            .send_multipart([&r[0][..], &r[1][..], &r[2][..], body], 0)
            .expect("reply");
    };
    reply(&rb, &ok);
    fake.socket
        .send_multipart([&ra[0][..], &[0x63][..], &[24][..], &ok[..]], 0)
        .expect("stale reply");
    reply(&ra, &ok);
    assert_eq!(c.wait(a).expect("a"), "OK");
    assert_eq!(c.wait(b).expect("b"), "OK");
    assert_eq!(c.discarded_replies(), 1);

    // A reply echoing another op is a protocol error, not a silent success.
    let p = c.submit_noop().expect("send");
    let r = fake.recv();
    fake.socket
        .send_multipart([&r[0][..], &r[1][..], &[21][..], &[0x05][..]], 0)
        .expect("reply");
    assert!(matches!(
        c.wait(p),
        Err(ClientError::Protocol { op: Op::Noop, .. })
    ));

    // A body of the wrong type is a decode error.
    let p = c.submit_noop().expect("send");
    let r = fake.recv();
    fake.socket
        .send_multipart([&r[0][..], &r[1][..], &r[2][..], &[0xc3][..]], 0)
        .expect("reply");
    assert!(matches!(c.wait(p), Err(ClientError::Decode { .. })));
}

#[test]
fn unanswered_requests_time_out_and_late_replies_are_discarded() {
    let fake = FakeServer::bind();
    let mut c = Client::connect(&fake.url, Duration::from_millis(200)).expect("connect");
    let p = c.submit_noop().expect("send");
    let r = fake.recv();
    let t = Instant::now();
    let err = c.wait(p).expect_err("no reply");
    assert!(err.is_timeout(), "{err}");
    assert!(t.elapsed() >= Duration::from_millis(150));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(c.in_flight(), 0);
    // The late reply does not confuse the next request.
    fake.socket
        .send_multipart(
            [&r[0][..], &r[1][..], &r[2][..], &[0xa2, b'O', b'K'][..]],
            0,
        )
        .expect("late reply");
    let p = c.submit_noop().expect("send");
    let r = fake.recv();
    assert_eq!(r[1], [0x01]);
    fake.socket
        .send_multipart(
            [&r[0][..], &r[1][..], &r[2][..], &[0xa2, b'O', b'K'][..]],
            0,
        )
        .expect("reply");
    assert_eq!(c.wait(p).expect("answered"), "OK");
    assert_eq!(c.discarded_replies(), 1);
}

#[test]
fn no_server_is_a_timeout_not_a_hang() {
    // Bind and drop a socket to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut c = Client::connect(
        &format!("tcp://127.0.0.1:{port}"),
        Duration::from_millis(100),
    )
    .expect("connect is asynchronous");
    let t = Instant::now();
    assert!(c.noop().expect_err("nobody answers").is_timeout());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(matches!(
        c.wait_frames(12345),
        Err(ClientError::NotInFlight(12345))
    ));
}
