//! The ZeroMQ front end: one ROUTER socket, one thread that owns it, and two worker pools.
//!
//! ```text
//!  clients (DEALER) ──tcp──► ROUTER ── kvtier-zmq thread ──┬── inline ops: handled here
//!                                 ▲                         ├── affinity ops ─► kvtier-xfer-N (one queue
//!                                 │                         │     per worker, chosen by client identity)
//!                                 │                         └── other ops ───► kvtier-rpc-N (shared queue)
//!                                 └──── replies ◄── channel + eventfd ◄── workers
//! ```
//! - The handler decides what runs inline ([`Handler::run_inline`]): the op table's SYNC ops and,
//!   for kvtier's engine, the short bookkeeping and transfer-control ops (lookup, query,
//!   prepare/commit store and retrieve, ...) when their payload is small, because a thread
//!   hand-off (two wake-ups) costs more than the work itself.
//! - Per-client order of transfer (affinity) ops holds across both paths: an affinity op runs
//!   inline only while none of its client's earlier affinity ops waits in or runs on a worker
//!   (`PollLoop::affinity_queued`, one count per client identity with jobs queued, bounded by
//!   the queues' capacity); otherwise it queues behind them.
//! - The socket is touched only by the `kvtier-zmq` thread (libzmq sockets are not thread-safe).
//!   Workers hand replies back through a channel and wake the thread with an eventfd that sits in
//!   the same `zmq_poll` set as the socket.
//! - Transfer operations of one client always run on the same worker, in arrival order; a slow
//!   client therefore delays only the clients that hash to its worker, never the whole server.
//!   Replies may go out of order; clients match them by uid.
//! - Every queue is bounded. When a pool's queue is full the request is answered at once with the
//!   operation's failure value and counted (`rejected_busy`), so the poll thread never blocks.
//! - Every request whose frames carry an identity, a uid and an op gets exactly one reply; only
//!   messages too short to address a reply are dropped (and counted).
//! - Requests that wait (`wait_prefetch_status`) hold no thread: the handler turns them into
//!   deferred replies ([`Handler::defer`], [`deferred`]) that the poll thread answers when their
//!   source wakes it or their deadline passes.
//! - Message size (`--max-message-bytes`, default [`DEFAULT_MAX_MESSAGE_BYTES`]): libzmq's
//!   `ZMQ_MAXMSGSIZE` is set to the limit, so a *frame* larger than it makes libzmq close that
//!   peer's connection as soon as the frame's length header arrives, before allocating anything
//!   for it; the request is never seen and gets no reply (the client's libzmq reconnects). A
//!   request whose frames are each within the limit but *together* exceed it is answered at
//!   once with its operation's failure value, unread (`oversized_rejected_total`). libzmq
//!   reports a dropped connection like any other disconnect (a socket-monitor
//!   `DISCONNECTED` event without a reason), so such drops are counted in
//!   `peer_disconnects_total` together with peers that left; `connections_accepted_total`
//!   counts the other side.
//! - Who may connect ([`access`]): a non-loopback `--host` without `--rpc-allow` is reported as
//!   open to any peer (a WARN at start, `transport.access.open_to_any_peer`); `--rpc-allow`
//!   installs a ZAP handler that refuses other peers during the handshake.
//! - Shutdown: stop reading the socket, wait for in-flight requests up to the drain timeout while
//!   still sending their replies, then close the socket and join the workers.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded, unbounded};

pub mod access;
mod deferred;
mod poll;
mod stream;

use poll::{PollLoop, zmq_sys_event};

use access::{Access, Cidr};
use deferred::Deferreds;
pub use deferred::{DeferredReply, MAX_DEFERRED};
use kvtier_core::status::{StatusNode, StatusReport};
use kvtier_proto::{Op, RequestFrames, Scheduling, decode_op};
use parking_lot::Mutex;
use rustix::event::{EventfdFlags, eventfd};
use stream::Streams;
pub use stream::{MAX_STREAMS, ReplyStream, StreamItem, StreamWaker};

/// Something that answers one request. Implemented by the engine service; must never panic.
pub trait Handler: Send + Sync + 'static {
    /// Handles `op` with its payload frames and returns the reply payload (`None` = bare reply).
    fn handle(&self, op: Op, payloads: &[&[u8]]) -> Option<Vec<u8>>;

    /// Whether this request runs inline on the poll thread instead of a pool. Inline saves two
    /// thread hand-offs (tens of microseconds on a small VM) but blocks every client while it
    /// runs, so only bounded, non-blocking work may say yes. Default: the op table's SYNC ops.
    fn run_inline(&self, op: Op, _payloads: &[Vec<u8>]) -> bool {
        op.scheduling() == Scheduling::Sync
    }

    /// Opens the stream of a streaming op (`subscribe_kv_events`), on the poll thread; `None`
    /// ends it at once (a bare reply). Default: no streams.
    fn open_stream(&self, _op: Op, _payloads: &[&[u8]]) -> Option<Box<dyn ReplyStream>> {
        None
    }

    /// Turns a request whose answer may take long (a wait) into a reply the poll thread sends
    /// later, without a thread waiting for it; `None`: handle it as usual. Called on the poll
    /// thread, so it must not block. Default: nothing is deferred.
    fn defer(&self, _op: Op, _payloads: &[&[u8]]) -> Option<Box<dyn DeferredReply>> {
        None
    }

    /// Receives, once at start, the waker its stream sources (and deferred replies' sources)
    /// call when a stream has news.
    fn attach_waker(&self, _waker: StreamWaker) {}

    /// A counter the handler bumps when freed memory should be given back to the OS; the poll
    /// thread calls [`release_memory`](Self::release_memory) once per new value, when it has
    /// been idle for a poll interval (100 ms). Default: never.
    fn memory_epoch(&self) -> u64 {
        0
    }

    /// Gives the poll thread's freed memory back to the OS (see
    /// [`memory_epoch`](Self::memory_epoch)).
    fn release_memory(&self) {}
}

/// Default of `--max-message-bytes`: 64 MiB, far above the largest request an LMCache 0.5.6
/// client sends (a lookup or store of a 10M-token context is about 50 MB of msgpack token ids;
/// registrations and block lists are kilobytes; kvtier refuses pickled KV data).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Front-end settings.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// ZeroMQ endpoint to bind, e.g. `tcp://127.0.0.1:5555`.
    pub bind: String,
    /// The host part of `bind` as configured (`--host`), for the exposure rule.
    pub host: String,
    /// Networks whose peers may connect (`--rpc-allow`); empty: no filter.
    pub allow: Vec<Cidr>,
    /// Largest frame, and largest sum of a request's frames, accepted (`--max-message-bytes`).
    pub max_message_bytes: usize,
    /// Workers of the transfer (affinity) pool.
    pub workers: usize,
    /// Workers of the normal pool.
    pub normal_workers: usize,
    /// Queue capacity of each affinity worker and of the normal pool.
    pub queue_capacity: usize,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
}

/// Transport errors (start-up only; the running loop logs and counts instead).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// ZeroMQ refused an operation.
    #[error("zeromq {op} failed for {endpoint}: {source}")]
    Zmq {
        /// What was attempted.
        op: &'static str,
        /// The endpoint.
        endpoint: String,
        /// libzmq's error.
        source: zmq::Error,
    },
    /// The peer filter (`--rpc-allow`) could not start.
    #[error(transparent)]
    Access(#[from] access::AccessError),
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

kvtier_core::metric_set! {
    /// Front-end counters (status `transport`, Prometheus `kvtier_transport_*`).
    pub struct TransportStats {
        /// ZeroMQ messages received.
        received: Counter as "received_total" => "kvtier_transport_received_messages",
        /// Replies sent.
        replied: Counter as "replied_total" => "kvtier_transport_replied_messages",
        /// Messages dropped for having too few frames to address a reply.
        too_few_frames: Counter as "too_few_frames_total" => "kvtier_transport_too_few_frames",
        /// Requests naming an operation outside the table (answered with a bare reply).
        unknown_op: Counter as "unknown_op_total" => "kvtier_transport_unknown_ops",
        /// Stream control frames (ack/cancel) received.
        control_frames: Counter as "control_frames_total" => "kvtier_transport_control_frames",
        /// Requests answered with a failure at once because a worker queue was full.
        rejected_busy: Counter as "rejected_busy_total" => "kvtier_transport_rejected_busy",
        /// Replies that could not be sent (peer gone or not reading).
        send_failures: Counter as "send_failures_total" => "kvtier_transport_send_failures",
        /// Requests received and not yet answered.
        in_flight: Gauge as "in_flight" => "kvtier_transport_in_flight_requests",
        /// Streams open (subscribe_kv_events).
        open_streams: Gauge as "open_streams" => "kvtier_transport_open_streams",
        /// Stream items sent.
        stream_items: Counter as "stream_items_total" => "kvtier_transport_stream_items",
        /// Streams ended at once because MAX_STREAMS were open.
        streams_refused: Counter as "streams_refused_total" => "kvtier_transport_streams_refused",
        /// Replies waiting on the poll thread without a worker (wait_prefetch_status).
        deferred: Gauge as "deferred_replies" => "kvtier_transport_deferred_replies",
        /// Deferrable requests answered at once because MAX_DEFERRED were waiting.
        deferred_full: Counter as "deferred_full_total" => "kvtier_transport_deferred_full",
        /// Requests whose frames together exceed --max-message-bytes (answered with the op's
        /// failure value, unread).
        oversized: Counter as "oversized_rejected_total" => "kvtier_transport_oversized_rejected",
        /// TCP connections accepted (socket monitor).
        accepted: Counter as "connections_accepted_total" => "kvtier_transport_connections_accepted",
        /// Peer connections closed: the peer left, or libzmq dropped it for a frame over
        /// --max-message-bytes or a protocol error (socket monitor; libzmq gives no reason).
        disconnects: Counter as "peer_disconnects_total" => "kvtier_transport_peer_disconnects",
    }
}

struct Job {
    identity: Vec<u8>,
    uid: Vec<u8>,
    op_frame: Vec<u8>,
    op: Op,
    payloads: Vec<Vec<u8>>,
    /// Queued on the client's affinity worker (counted in `PollLoop::affinity_queued`).
    affinity: bool,
}

struct Outgoing {
    identity: Vec<u8>,
    uid: Vec<u8>,
    op_frame: Vec<u8>,
    body: Option<Vec<u8>>,
    /// The job came from an affinity worker.
    affinity: bool,
}

/// The running front end.
#[derive(Debug)]
pub struct ZmqFrontEnd {
    /// Declared first: stopped (ZAP socket closed) before the context below terminates.
    access: Arc<Access>,
    stop: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    stats: Arc<TransportStats>,
    poll_thread: Mutex<Option<JoinHandle<()>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    alive: Arc<AtomicBool>,
    config: TransportConfig,
    endpoint: String,
    /// Keeps the context alive until every socket of it (the ZAP socket too) is closed:
    /// dropping the last handle terminates it, which waits for them.
    _ctx: ContextHandle,
}

/// A handle on the front end's ZeroMQ context (`zmq::Context` has no `Debug`).
struct ContextHandle(#[expect(dead_code, reason = "held for its drop order only")] zmq::Context);

impl std::fmt::Debug for ContextHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("zmq::Context")
    }
}

/// Socket-monitor endpoint of the ROUTER (per context).
const MONITOR_ENDPOINT: &str = "inproc://kvtier-router-monitor";

fn wake(fd: &OwnedFd) {
    // A full eventfd counter still wakes the poller, so a failed write is harmless.
    let _written = rustix::io::write(fd, &1u64.to_ne_bytes());
}

impl ZmqFrontEnd {
    /// Binds the socket and starts the poll thread and the worker pools.
    pub fn start(
        config: TransportConfig,
        handler: Arc<dyn Handler>,
    ) -> Result<Self, TransportError> {
        let zerr = |op, source| TransportError::Zmq {
            op,
            endpoint: config.bind.clone(),
            source,
        };
        let ctx = zmq::Context::new();
        // The ZAP handler is bound before the ROUTER can accept anyone.
        let access = Arc::new(Access::start(&ctx, &config.host, config.allow.clone())?);
        let socket = ctx.socket(zmq::ROUTER).map_err(|e| zerr("socket", e))?;
        access
            .configure(&socket)
            .map_err(|e| zerr("setsockopt", e))?;
        socket
            .set_maxmsgsize(i64::try_from(config.max_message_bytes).unwrap_or(i64::MAX))
            .map_err(|e| zerr("setsockopt", e))?;
        socket
            .monitor(
                MONITOR_ENDPOINT,
                (zmq_sys_event::ACCEPTED | zmq_sys_event::DISCONNECTED) as i32,
            )
            .map_err(|e| zerr("monitor", e))?;
        let monitor = ctx.socket(zmq::PAIR).map_err(|e| zerr("socket", e))?;
        monitor
            .connect(MONITOR_ENDPOINT)
            .map_err(|e| zerr("connect monitor", e))?;
        socket
            .set_router_mandatory(true)
            .map_err(|e| zerr("setsockopt", e))?;
        socket.set_linger(0).map_err(|e| zerr("setsockopt", e))?;
        socket
            .set_sndhwm(100_000)
            .map_err(|e| zerr("setsockopt", e))?;
        socket
            .set_rcvhwm(100_000)
            .map_err(|e| zerr("setsockopt", e))?;
        socket.bind(&config.bind).map_err(|e| zerr("bind", e))?;
        let endpoint = socket
            .get_last_endpoint()
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| config.bind.clone());

        let wake_fd = Arc::new(
            eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC).map_err(|e| {
                TransportError::Io {
                    op: "eventfd",
                    source: e.into(),
                }
            })?,
        );
        let stats = Arc::new(TransportStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        let (reply_tx, reply_rx) = unbounded::<Outgoing>();
        let n = config.workers.max(1);
        let cap = config.queue_capacity.max(1);

        let mut workers = Vec::new();
        let spawn_worker = |name: String, rx: Receiver<Job>| {
            let handler = Arc::clone(&handler);
            let reply_tx = reply_tx.clone();
            let wake_fd = Arc::clone(&wake_fd);
            std::thread::Builder::new()
                .name(name)
                .spawn(move || worker_loop(&*handler, &rx, &reply_tx, &wake_fd))
                .map_err(|e| TransportError::Io {
                    op: "spawn worker",
                    source: e,
                })
        };
        let mut affinity_tx = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = bounded::<Job>(cap);
            affinity_tx.push(tx);
            workers.push(spawn_worker(format!("kvtier-xfer-{i}"), rx)?);
        }
        let (normal_tx, normal_rx) = bounded::<Job>(cap);
        for i in 0..config.normal_workers.max(1) {
            workers.push(spawn_worker(format!("kvtier-rpc-{i}"), normal_rx.clone())?);
        }
        drop(normal_rx);

        let streams_dirty = Arc::new(AtomicBool::new(false));
        handler.attach_waker(StreamWaker {
            fd: Arc::clone(&wake_fd),
            dirty: Arc::clone(&streams_dirty),
        });
        let poll = PollLoop {
            socket,
            monitor,
            _ctx: ctx.clone(),
            handler,
            affinity_tx,
            normal_tx,
            reply_rx,
            wake_fd: Arc::clone(&wake_fd),
            stats: Arc::clone(&stats),
            stop: Arc::clone(&stop),
            alive: Arc::clone(&alive),
            drain_timeout: config.drain_timeout,
            hasher: foldhash_state(),
            streams: Streams::default(),
            deferreds: Deferreds::default(),
            streams_dirty,
            memory_epoch: 0,
            max_message_bytes: config.max_message_bytes,
            affinity_queued: HashMap::new(),
        };
        let poll_thread = std::thread::Builder::new()
            .name("kvtier-zmq".into())
            .spawn(move || poll.run())
            .map_err(|e| TransportError::Io {
                op: "spawn poll thread",
                source: e,
            })?;
        tracing::info!(%endpoint, workers = n, "zeromq front end listening");
        Ok(Self {
            access,
            stop,
            wake: wake_fd,
            stats,
            poll_thread: Mutex::new(Some(poll_thread)),
            workers: Mutex::new(workers),
            alive,
            config,
            endpoint,
            _ctx: ContextHandle(ctx),
        })
    }

    /// The bound endpoint (with the real port when binding port 0).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The counters.
    pub fn stats(&self) -> &TransportStats {
        &self.stats
    }

    /// The peer-access rule (exposure, `--rpc-allow`).
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Stops intake, drains in-flight requests (bounded by the drain timeout), closes the socket,
    /// then stops the ZAP handler and joins every thread. Idempotent.
    pub fn shutdown(&self) {
        self.stop.store(true, Relaxed);
        wake(&self.wake);
        if let Some(h) = self.poll_thread.lock().take() {
            let _joined = h.join();
        }
        // The ROUTER is closed now: no handshake can need the ZAP handler any more.
        self.access.stop();
        // The poll thread owned the job senders; with them gone the workers finish and exit.
        for h in self.workers.lock().drain(..) {
            let _joined = h.join();
        }
    }
}

impl Drop for ZmqFrontEnd {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn foldhash_state() -> foldhash::fast::FixedState {
    foldhash::fast::FixedState::with_seed(0x6b76_7469_6572)
}

fn worker_loop(
    handler: &dyn Handler,
    rx: &Receiver<Job>,
    tx: &Sender<Outgoing>,
    wake_fd: &OwnedFd,
) {
    while let Ok(job) = rx.recv() {
        let payloads: Vec<&[u8]> = job.payloads.iter().map(Vec::as_slice).collect();
        let body = handler.handle(job.op, &payloads);
        let out = Outgoing {
            identity: job.identity,
            uid: job.uid,
            op_frame: job.op_frame,
            body,
            affinity: job.affinity,
        };
        if tx.send(out).is_err() {
            return;
        }
        wake(wake_fd);
    }
}

impl StatusReport for ZmqFrontEnd {
    fn report_status(&self) -> StatusNode {
        let s = &self.stats;
        let alive = self.alive.load(Relaxed) || self.stop.load(Relaxed);
        StatusNode::healthy()
            .require_live(alive, "zeromq poll thread is not running")
            .field("endpoint", &self.endpoint)
            .field("thread_alive", self.alive.load(Relaxed))
            .field("workers_per_pool", self.config.workers.max(1))
            .field("queue_capacity", self.config.queue_capacity)
            .field("max_message_bytes", self.config.max_message_bytes)
            .fields(kvtier_core::metrics::status_fields(s.as_ref()))
            .child("access", self.access.status_node())
    }
}
