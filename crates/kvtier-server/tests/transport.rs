//! The ZeroMQ front end against real DEALER sockets, with a scripted handler: framing, dispatch,
//! out-of-order replies, the queue-full policy, malformed messages and draining shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use kvtier_proto::Op;
use kvtier_server::transport::{Handler, TransportConfig, ZmqFrontEnd};
use parking_lot::{Condvar, Mutex};

/// A gate a handler waits at until the test opens it (no clock in any assertion).
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock() = true;
        self.cv.notify_all();
    }

    fn wait(&self) {
        let mut open = self.open.lock();
        while !*open {
            self.cv.wait(&mut open);
        }
    }
}

/// Opens a gate when dropped, so a failing assertion cannot leave a worker blocked and the
/// front end's shutdown waiting for it.
struct OpenOnDrop<'a>(&'a Gate);

impl Drop for OpenOnDrop<'_> {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// noop → "OK"; get_chunk_size → 256 (sync); ping waits at `gate`; query_prefetch_status
/// waits at `slow_gate` and answers 7; end_session echoes its payload count.
#[derive(Default)]
struct Scripted {
    gate: Gate,
    slow_gate: Gate,
    handled: AtomicU64,
}

fn mp_int(v: u64) -> Vec<u8> {
    let mut b = Vec::new();
    rmp::encode::write_uint(&mut b, v).expect("vec write");
    b
}

fn mp_str(s: &str) -> Vec<u8> {
    let mut b = Vec::new();
    rmp::encode::write_str(&mut b, s).expect("vec write");
    b
}

impl Handler for Scripted {
    fn handle(&self, op: Op, payloads: &[&[u8]]) -> Option<Vec<u8>> {
        self.handled.fetch_add(1, Relaxed);
        match op {
            Op::Noop => Some(mp_str("OK")),
            Op::GetChunkSize => Some(mp_int(256)),
            Op::Ping => {
                self.gate.wait();
                Some(vec![0xc3])
            }
            Op::QueryPrefetchStatus => {
                self.slow_gate.wait();
                Some(mp_int(7))
            }
            Op::EndSession => Some(mp_int(payloads.len() as u64)),
            _ => None,
        }
    }
}

fn config(workers: usize, queue: usize) -> TransportConfig {
    TransportConfig {
        bind: "tcp://127.0.0.1:0".into(),
        host: "127.0.0.1".into(),
        allow: Vec::new(),
        max_message_bytes: kvtier_server::transport::DEFAULT_MAX_MESSAGE_BYTES,
        workers,
        normal_workers: workers,
        queue_capacity: queue,
        drain_timeout: Duration::from_secs(5),
    }
}

fn start(handler: Arc<Scripted>, workers: usize, queue: usize) -> ZmqFrontEnd {
    ZmqFrontEnd::start(config(workers, queue), handler).expect("front end starts")
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dealer(ctx: &zmq::Context, endpoint: &str) -> zmq::Socket {
    let s = ctx.socket(zmq::DEALER).expect("socket");
    s.set_rcvtimeo(5_000).expect("rcvtimeo");
    s.set_linger(0).expect("linger");
    s.connect(endpoint).expect("connect");
    s
}

fn send(s: &zmq::Socket, uid: u64, op: Op, payloads: &[Vec<u8>]) {
    let mut frames = vec![
        mp_int(uid),
        mp_int(u64::from(op.legacy_id().expect("legacy id"))),
    ];
    frames.extend(payloads.iter().cloned());
    s.send_multipart(frames, 0).expect("send");
}

fn recv(s: &zmq::Socket) -> Vec<Vec<u8>> {
    s.recv_multipart(0).expect("a reply within the timeout")
}

#[test]
fn replies_echo_uid_and_op_and_bare_none() {
    let fe = start(Arc::new(Scripted::default()), 2, 16);
    let ctx = zmq::Context::new();
    let c = dealer(&ctx, fe.endpoint());
    // uid 256 is `cd 01 00`: echoed byte for byte.
    send(&c, 256, Op::GetChunkSize, &[]);
    assert_eq!(
        recv(&c),
        vec![vec![0xcd, 0x01, 0x00], vec![21], mp_int(256)]
    );
    // An op sent by name is echoed as sent.
    c.send_multipart([mp_int(1), mp_str("noop")], 0)
        .expect("send");
    assert_eq!(recv(&c), vec![mp_int(1), mp_str("noop"), mp_str("OK")]);
    // A None result is a reply without a payload frame.
    send(&c, 2, Op::Clear, &[vec![0xc2]]);
    assert_eq!(recv(&c), vec![mp_int(2), mp_int(20)]);
    fe.shutdown();
}

#[test]
fn unknown_ops_get_a_bare_reply_and_short_messages_are_dropped() {
    let h = Arc::new(Scripted::default());
    let fe = start(Arc::clone(&h), 1, 16);
    let ctx = zmq::Context::new();
    let c = dealer(&ctx, fe.endpoint());
    send_raw(&c, vec![mp_int(5), mp_int(99)]);
    assert_eq!(recv(&c), vec![mp_int(5), mp_int(99)]);
    send_raw(&c, vec![mp_int(6), mp_str("no_such_op")]);
    assert_eq!(recv(&c), vec![mp_int(6), mp_str("no_such_op")]);
    // [uid] alone cannot be answered (no op to echo); the server must keep serving.
    send_raw(&c, vec![mp_int(7)]);
    send(&c, 8, Op::Noop, &[]);
    assert_eq!(recv(&c), vec![mp_int(8), mp_int(24), mp_str("OK")]);
    assert_eq!(fe.stats().too_few_frames.get(), 1);
    assert_eq!(fe.stats().unknown_op.get(), 2);
    assert_eq!(h.handled.load(Relaxed), 1);
    fe.shutdown();
}

fn send_raw(s: &zmq::Socket, frames: Vec<Vec<u8>>) {
    s.send_multipart(frames, 0).expect("send");
}

#[test]
fn a_slow_request_does_not_hold_back_other_clients_and_replies_may_reorder() {
    let h = Arc::new(Scripted::default());
    let fe = start(Arc::clone(&h), 2, 16);
    let release = OpenOnDrop(&h.slow_gate);
    let ctx = zmq::Context::new();
    let slow = dealer(&ctx, fe.endpoint());
    let fast = dealer(&ctx, fe.endpoint());
    send(&slow, 1, Op::QueryPrefetchStatus, &[mp_str("r")]);
    send(&slow, 2, Op::Noop, &[]);
    // The SYNC noop on the same socket overtakes the pooled request that is still blocked.
    assert_eq!(recv(&slow)[0], mp_int(2));
    // Another client is answered while that request is still blocked: nobody waits for it.
    send(&fast, 1, Op::EndSession, &[mp_str("x")]);
    assert_eq!(recv(&fast), vec![mp_int(1), mp_int(13), mp_int(1)]);
    drop(release);
    assert_eq!(recv(&slow), vec![mp_int(1), mp_int(9), mp_int(7)]);
    fe.shutdown();
}

#[test]
fn full_queue_is_answered_with_the_failure_value() {
    let h = Arc::new(Scripted::default());
    let fe = start(Arc::clone(&h), 1, 1);
    let ctx = zmq::Context::new();
    let c = dealer(&ctx, fe.endpoint());
    // Whatever happens below, release the blocked worker so shutdown can join it.
    let _release = OpenOnDrop(&h.gate);
    // The first ping blocks the only worker; the second fills the queue; the third must be
    // refused at once.
    send(&c, 0, Op::Ping, &[vec![0xc0]]);
    while h.handled.load(Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(2));
    }
    send(&c, 1, Op::Ping, &[vec![0xc0]]);
    send(&c, 2, Op::Ping, &[vec![0xc0]]);
    let refused = recv(&c);
    assert_eq!(
        refused,
        vec![mp_int(2), mp_int(22), vec![0xc2]],
        "ping's failure value is false"
    );
    assert_eq!(fe.stats().rejected_busy.get(), 1);
    h.gate.open();
    let mut uids: Vec<Vec<u8>> = (0..2).map(|_| recv(&c).remove(0)).collect();
    uids.sort();
    assert_eq!(uids, vec![mp_int(0), mp_int(1)]);
    fe.shutdown();
}

#[test]
fn shutdown_drains_in_flight_requests() {
    let h = Arc::new(Scripted::default());
    let fe = Arc::new(start(Arc::clone(&h), 1, 16));
    let ctx = zmq::Context::new();
    let c = dealer(&ctx, fe.endpoint());
    let release = OpenOnDrop(&h.slow_gate);
    send(&c, 1, Op::QueryPrefetchStatus, &[mp_str("r")]);
    // Let the request reach its worker, then stop while it is still running.
    while fe.stats().in_flight.get() == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let stopper = {
        let fe = Arc::clone(&fe);
        std::thread::spawn(move || fe.shutdown())
    };
    // The shutdown is under way (or about to be) with the request still running; let it end.
    std::thread::sleep(Duration::from_millis(100));
    drop(release);
    assert_eq!(
        recv(&c),
        vec![mp_int(1), mp_int(9), mp_int(7)],
        "in-flight reply delivered"
    );
    stopper.join().expect("shutdown thread");
    assert_eq!(fe.stats().in_flight.get(), 0);
}

#[test]
fn oversized_messages_are_dropped_or_answered_and_counted() {
    let mut cfg = config(1, 16);
    cfg.max_message_bytes = 1 << 20;
    let handler = Arc::new(Scripted::default());
    let fe = ZmqFrontEnd::start(cfg, Arc::clone(&handler) as Arc<dyn Handler>).expect("starts");
    let ctx = zmq::Context::new();
    let good = dealer(&ctx, fe.endpoint());
    send(&good, 1, Op::GetChunkSize, &[]);
    assert_eq!(recv(&good)[2], mp_int(256));
    let stats = fe.stats();
    wait_for("the connection counted", || stats.accepted.get() >= 1);

    // Frames within the limit that together exceed it: answered with the failure value, unread.
    let big = dealer(&ctx, fe.endpoint());
    let handled = handler.handled.load(Relaxed);
    big.send_multipart(
        [
            vec![7u8; 700 << 10],
            mp_str("get_chunk_size"),
            vec![0; 400 << 10],
        ],
        0,
    )
    .expect("send");
    let reply = recv(&big);
    assert_eq!(reply[1], mp_str("get_chunk_size"));
    assert_eq!(reply[2], mp_int(0), "get_chunk_size's failure value");
    assert_eq!(stats.oversized.get(), 1);
    assert_eq!(
        handler.handled.load(Relaxed),
        handled,
        "never handed to the handler"
    );

    // One frame over the limit: libzmq drops the sender's connection before allocating it.
    let disconnects = stats.disconnects.get();
    big.send_multipart([mp_int(2), mp_str("noop"), vec![0; 8 << 20]], 0)
        .expect("send");
    big.set_rcvtimeo(500).expect("rcvtimeo");
    assert!(
        big.recv_multipart(0).is_err(),
        "no reply to a dropped frame"
    );
    wait_for("the drop counted", || stats.disconnects.get() > disconnects);
    // Everyone else is unaffected, and the dropped client's libzmq reconnects.
    send(&good, 3, Op::GetChunkSize, &[]);
    assert_eq!(recv(&good)[2], mp_int(256));
    big.set_rcvtimeo(5_000).expect("rcvtimeo");
    send(&big, 4, Op::GetChunkSize, &[]);
    assert_eq!(recv(&big)[2], mp_int(256));
    fe.shutdown();
}

#[test]
fn rpc_allow_refuses_other_peers_during_the_handshake() {
    use kvtier_server::transport::access::parse_allow_list;
    let mut cfg = config(1, 16);
    cfg.allow = parse_allow_list("10.0.0.0/8").expect("cidr");
    let fe = ZmqFrontEnd::start(cfg, Arc::new(Scripted::default())).expect("starts");
    let ctx = zmq::Context::new();
    let c = dealer(&ctx, fe.endpoint());
    c.set_rcvtimeo(1_000).expect("rcvtimeo");
    send(&c, 1, Op::GetChunkSize, &[]);
    assert!(c.recv_multipart(0).is_err(), "a refused peer gets no reply");
    let access = fe.access();
    wait_for("the refusal counted", || access.stats().refused.get() >= 1);
    assert_eq!(access.stats().allowed.get(), 0);
    let node = serde_json::to_value(access.status_node()).expect("json");
    assert_eq!(node["last_refused_peer"], "127.0.0.1", "{node}");
    assert_eq!(node["zap_handler"]["thread_alive"], true, "{node}");
    fe.shutdown();
    assert!(!access.thread().expect("zap thread").is_alive());

    let mut cfg = config(1, 16);
    cfg.allow = parse_allow_list("10.0.0.0/8,127.0.0.0/8").expect("cidr");
    let fe = ZmqFrontEnd::start(cfg, Arc::new(Scripted::default())).expect("starts");
    let c = dealer(&ctx, fe.endpoint());
    send(&c, 1, Op::GetChunkSize, &[]);
    assert_eq!(recv(&c)[2], mp_int(256));
    assert_eq!(fe.access().stats().allowed.get(), 1);
    assert_eq!(fe.access().stats().refused.get(), 0);
    fe.shutdown();
}

/// Runs transfer controls inline when their payload is one frame of at most 8 bytes; a
/// `prepare_store` with a bigger payload goes to the affinity pool, says it started, and waits
/// at `gate`. Records the order in which requests finished.
#[derive(Default)]
struct InlineSmall {
    order: Mutex<Vec<(Op, Vec<u8>)>>,
    big_started: AtomicU64,
    gate: Gate,
}

impl Handler for InlineSmall {
    fn handle(&self, op: Op, payloads: &[&[u8]]) -> Option<Vec<u8>> {
        let tag = payloads.first().map(|p| p.to_vec()).unwrap_or_default();
        if op == Op::PrepareStore && tag.len() > 8 {
            self.big_started.fetch_add(1, Relaxed);
            self.gate.wait();
        }
        self.order.lock().push((op, tag));
        Some(vec![0xc3])
    }

    fn run_inline(&self, op: Op, payloads: &[Vec<u8>]) -> bool {
        op.scheduling() == kvtier_proto::Scheduling::Sync
            || (matches!(op, Op::PrepareStore | Op::CommitStore)
                && payloads.iter().map(Vec::len).sum::<usize>() <= 8)
    }
}

#[test]
fn an_inline_transfer_op_never_overtakes_the_same_clients_queued_one() {
    let h = Arc::new(InlineSmall::default());
    let fe = ZmqFrontEnd::start(config(1, 16), Arc::clone(&h) as Arc<dyn Handler>)
        .expect("front end starts");
    let ctx = zmq::Context::new();
    let release = OpenOnDrop(&h.gate);
    let a = dealer(&ctx, fe.endpoint());
    let b = dealer(&ctx, fe.endpoint());
    // Client a: a big prepare_store (pool, held at the gate), then a small commit_store that
    // alone would run inline: it must wait for the prepare.
    send(&a, 1, Op::PrepareStore, &[vec![b'p'; 64]]);
    send(&a, 2, Op::CommitStore, &[b"a".to_vec()]);
    wait_for("a's prepare to start", || h.big_started.load(Relaxed) == 1);
    // Client b has nothing queued: its small commit is answered while a's prepare is held.
    send(&b, 1, Op::CommitStore, &[b"b".to_vec()]);
    assert_eq!(recv(&b)[0], mp_int(1));
    a.set_rcvtimeo(200).expect("rcvtimeo");
    assert!(
        a.recv_multipart(0).is_err(),
        "a's commit must not overtake its held prepare"
    );
    a.set_rcvtimeo(5_000).expect("rcvtimeo");
    drop(release);
    assert_eq!(recv(&a)[0], mp_int(1));
    assert_eq!(recv(&a)[0], mp_int(2));
    // Once a's queue is empty, its small ops run inline again.
    send(&a, 3, Op::CommitStore, &[b"c".to_vec()]);
    assert_eq!(recv(&a)[0], mp_int(3));
    let order: Vec<(Op, Vec<u8>)> = h.order.lock().clone();
    assert_eq!(
        order,
        vec![
            (Op::CommitStore, b"b".to_vec()),
            (Op::PrepareStore, vec![b'p'; 64]),
            (Op::CommitStore, b"a".to_vec()),
            (Op::CommitStore, b"c".to_vec()),
        ]
    );
    fe.shutdown();
}
