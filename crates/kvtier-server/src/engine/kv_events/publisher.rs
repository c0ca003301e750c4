//! The router-facing KV-event publisher (`--kv-events-publisher`): the KV-event log, L1 and L2
//! records alike, republished on a ZeroMQ PUB socket in vLLM's KV-event format
//! ([`kvtier_proto::vllm_events`]), with the replay socket vLLM's publisher offers.
//!
//! Wire (the same as vLLM's `ZmqEventPublisher`, so its subscribers work unchanged):
//! - PUB, bound to the configured endpoint: one multipart message per batch,
//!   `[topic, seq (8-byte big-endian, 0, 1, 2, ...), payload]`. The topic is the
//!   `--kv-events-topic` template with `{model}` and `{instance}` filled in; a batch never mixes
//!   models, so a router learns the model from the topic.
//! - ROUTER (optional), bound to the replay endpoint: a request `[start_seq (8-byte big-endian)]`
//!   from a REQ (or DEALER with an empty delimiter) socket is answered with every buffered batch
//!   whose seq is ≥ `start_seq`, each as `[seq, payload]`, then the end marker `[-1 (8-byte
//!   big-endian, signed), ""]`. Malformed requests are counted and ignored.
//!
//! The publisher is one named background thread (`kvtier-kv-pub`, a [`PeriodicThread`]): it
//! reads the log after its cursor ([`KvEvents::read_all`]) every round, so nothing is added to
//! the request path but the wake-up: an append wakes it once per burst (an atomic flag in front
//! of the thread's condition variable). Rounds also run every `interval` to answer replay
//! requests. Both sockets are owned by the thread (ZeroMQ sockets are not thread-safe).
//!
//! Bounds and full policies: the replay buffer keeps the newest `replay_buffer_batches` batches
//! and at most `replay_buffer_bytes` bytes (the oldest are dropped first); PUB never blocks (at
//! its high-water mark ZeroMQ drops messages for the slow subscriber, which sees a sequence gap
//! and replays); a replay that meets a full peer pipe stops early (counted) and still sends the
//! end marker when it can. If the publisher falls behind the log by more than the log holds
//! (records were dropped before it read them), it sends `AllBlocksCleared` on every topic it has
//! published (so routers forget rather than trust stale state), counts it, and goes on.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvtier_core::metrics::{MetricDesc, MetricSet, MetricVisitor};
use kvtier_core::periodic::PeriodicThread;
use kvtier_core::status::StatusNode;
use kvtier_proto::KvEventRecord;
use kvtier_proto::vllm_events::{Encoding, VllmEvent, encode_batch};

use super::KvEvents;

/// Records read from the log per batch at most.
const MAX_RECORDS_PER_READ: usize = 1024;

/// Topics remembered for `AllBlocksCleared` after a loss (one per model published).
const MAX_TOPICS: usize = 1024;

/// vLLM's end-of-replay marker: -1 as a signed 8-byte big-endian integer.
const END_SEQ: [u8; 8] = (-1i64).to_be_bytes();

/// Settings (`--kv-events-*` flags).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PublisherConfig {
    /// PUB endpoint to bind, e.g. `tcp://*:5557` (`*` as port picks a free one).
    pub endpoint: String,
    /// ROUTER endpoint for replay requests, if any.
    pub replay_endpoint: Option<String>,
    /// Topic template: `{model}` and `{instance}` are replaced.
    pub topic: String,
    /// vLLM encoding to write.
    #[serde(serialize_with = "encoding_name")]
    pub encoding: Encoding,
    /// Batches kept for replay.
    pub replay_buffer_batches: usize,
    /// Bytes kept for replay.
    pub replay_buffer_bytes: usize,
    /// PUB send high-water mark (messages per subscriber).
    pub send_hwm: i32,
    /// How often a round runs without a wake-up (answers replay requests).
    #[serde(
        rename = "interval_seconds",
        serialize_with = "crate::config::as_seconds"
    )]
    pub interval: Duration,
}

fn encoding_name<S: serde::Serializer>(e: &Encoding, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(e.as_str())
}

impl PublisherConfig {
    /// Defaults for `endpoint` (vLLM's buffer size and high-water mark, 20 ms rounds).
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            replay_endpoint: None,
            topic: "kv@{instance}@{model}".into(),
            encoding: Encoding::Map,
            replay_buffer_batches: 10_000,
            replay_buffer_bytes: 64 << 20,
            send_hwm: 100_000,
            interval: Duration::from_millis(20),
        }
    }
}

/// Why the publisher could not start.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    /// A socket could not be created or bound.
    #[error("--{flag} {endpoint}: {source}")]
    Socket {
        /// The flag that named the endpoint.
        flag: &'static str,
        /// The endpoint.
        endpoint: String,
        /// ZeroMQ's error.
        source: zmq::Error,
    },
    /// The KV-event log is disabled, so there is nothing to publish.
    #[error("--kv-events-publisher needs the KV-event log: --kv-event-log-size must be > 0")]
    LogDisabled,
    /// The thread could not be spawned.
    #[error("spawning kvtier-kv-pub: {0}")]
    Spawn(#[from] std::io::Error),
}

kvtier_core::metric_set! {
    /// Publisher counters (status `kv_events_publisher`, Prometheus `kvtier_kv_events_pub_*`).
    pub struct PublisherCounters {
        /// Batches published on the PUB socket.
        batches_total: Counter => "kvtier_kv_events_pub_batches",
        /// Events (records and clear markers) published.
        events_total: Counter => "kvtier_kv_events_pub_events",
        /// Bytes of batch payloads published.
        bytes_total: Counter[Bytes] => "kvtier_kv_events_pub_bytes",
        /// PUB sends that failed.
        send_errors_total: Counter => "kvtier_kv_events_pub_send_errors",
        /// Times the publisher fell behind the log and sent `AllBlocksCleared`.
        lost_total: Counter => "kvtier_kv_events_pub_lost",
        /// Replay requests answered.
        replay_requests_total: Counter => "kvtier_kv_events_pub_replay_requests",
        /// Batches re-sent by replays.
        replayed_batches_total: Counter => "kvtier_kv_events_pub_replayed_batches",
        /// Replays cut short by a full peer pipe.
        replay_truncated_total: Counter => "kvtier_kv_events_pub_replay_truncated",
        /// Malformed replay requests (ignored).
        invalid_replay_requests_total: Counter => "kvtier_kv_events_pub_invalid_replay_requests",
        /// Batches dropped from the replay buffer (age or size).
        buffer_evicted_total: Counter => "kvtier_kv_events_pub_buffer_evicted",
    }
}

#[derive(Debug, Default)]
struct Gauges {
    next_seq: AtomicU64,
    cursor: AtomicU64,
    buffer_batches: AtomicU64,
    buffer_bytes: AtomicU64,
}

/// The publisher. See the module docs.
#[derive(Debug)]
pub struct KvEventPublisher {
    cfg: PublisherConfig,
    bound: String,
    replay_bound: Option<String>,
    dirty: AtomicBool,
    counters: PublisherCounters,
    gauges: Gauges,
    thread: OnceLock<PeriodicThread>,
}

impl KvEventPublisher {
    /// Binds the sockets, starts the thread and attaches the publisher to `events` (whose
    /// appends then wake it). It publishes the whole log, from its first record.
    ///
    /// # Errors
    /// [`PublisherError`] naming the flag and endpoint that failed.
    pub fn start(
        cfg: PublisherConfig,
        events: &Arc<KvEvents>,
        instance: &str,
    ) -> Result<Arc<Self>, PublisherError> {
        if !events.enabled() {
            return Err(PublisherError::LogDisabled);
        }
        let ctx = zmq::Context::new();
        let sock_err = |flag: &'static str, endpoint: &str| {
            let endpoint = endpoint.to_owned();
            move |source| PublisherError::Socket {
                flag,
                endpoint,
                source,
            }
        };
        let publish = ctx
            .socket(zmq::PUB)
            .map_err(sock_err("kv-events-publisher", &cfg.endpoint))?;
        publish
            .set_sndhwm(cfg.send_hwm)
            .and_then(|()| publish.set_linger(0))
            .and_then(|()| publish.bind(&cfg.endpoint))
            .map_err(sock_err("kv-events-publisher", &cfg.endpoint))?;
        let bound = last_endpoint(&publish).unwrap_or_else(|| cfg.endpoint.clone());
        let replay = match &cfg.replay_endpoint {
            Some(ep) => {
                let r = ctx
                    .socket(zmq::ROUTER)
                    .map_err(sock_err("kv-events-replay", ep))?;
                r.set_linger(0)
                    .and_then(|()| r.bind(ep))
                    .map_err(sock_err("kv-events-replay", ep))?;
                Some(r)
            }
            None => None,
        };
        let replay_bound = replay.as_ref().and_then(last_endpoint);
        let this = Arc::new(Self {
            cfg: cfg.clone(),
            bound,
            replay_bound,
            dirty: AtomicBool::new(false),
            counters: PublisherCounters::default(),
            gauges: Gauges::default(),
            thread: OnceLock::new(),
        });
        // From the start of the log: what L2 adapters announced while they opened (an index
        // rebuilt from disk) precedes the publisher.
        let cursor = 0;
        let mut pump = Pump {
            _ctx: ctx,
            publish,
            replay,
            events: Arc::downgrade(events),
            publisher: Arc::downgrade(&this),
            cursor,
            seq: 0,
            buffer: VecDeque::new(),
            buffer_bytes: 0,
            topics: HashSet::new(),
            instance: instance.to_owned(),
        };
        let thread = PeriodicThread::builder("kvtier-kv-pub")
            .interval(cfg.interval)
            .description("KV-event publisher thread")
            .spawn(move || pump.round())?;
        let _set = this.thread.set(thread);
        events.attach_publisher(Arc::clone(&this));
        tracing::info!(
            endpoint = this.bound,
            replay = this.replay_bound.as_deref(),
            topic = cfg.topic,
            encoding = cfg.encoding.as_str(),
            "KV-event publisher bound"
        );
        Ok(this)
    }

    /// The PUB endpoint actually bound (the port filled in).
    pub fn endpoint(&self) -> &str {
        &self.bound
    }

    /// The replay endpoint actually bound.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_bound.as_deref()
    }

    /// Counters.
    pub fn counters(&self) -> &PublisherCounters {
        &self.counters
    }

    /// The publisher thread.
    pub fn thread(&self) -> Option<&PeriodicThread> {
        self.thread.get()
    }

    /// Asks for a round (one condition-variable signal per burst; safe under the log mutex).
    pub fn wake(&self) {
        if !self.dirty.swap(true, Relaxed)
            && let Some(t) = self.thread.get()
        {
            t.wake();
        }
    }

    /// Waits (at most `timeout`) until every record appended so far is published: shutdown
    /// uses it so routers hear the final removals.
    pub fn drain(&self, events: &KvEvents, timeout: Duration) -> bool {
        let target = events.next_seq().saturating_sub(1);
        let deadline = Instant::now() + timeout;
        loop {
            if self.gauges.cursor.load(Relaxed) >= target {
                return true;
            }
            if Instant::now() >= deadline || !self.thread.get().is_some_and(|t| t.is_alive()) {
                return false;
            }
            self.wake();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the thread (closing both sockets).
    pub fn stop(&self) {
        if let Some(t) = self.thread.get() {
            t.stop();
        }
    }

    /// The status node `kv_events_publisher`: the thread's fields, settings, counters and
    /// gauges; unhealthy when the thread died.
    pub fn status_node(&self) -> StatusNode {
        let node = match self.thread.get() {
            Some(t) => t.status_node(),
            None => StatusNode::healthy(),
        };
        node.field("endpoint", self.bound.as_str())
            .field("replay_endpoint", self.replay_bound.as_deref())
            .field("topic", self.cfg.topic.as_str())
            .field("encoding", self.cfg.encoding.as_str())
            .field("next_seq", self.gauges.next_seq.load(Relaxed))
            .field("log_cursor", self.gauges.cursor.load(Relaxed))
            .field(
                "replay_buffer_batches",
                self.gauges.buffer_batches.load(Relaxed),
            )
            .field(
                "replay_buffer_bytes",
                self.gauges.buffer_bytes.load(Relaxed),
            )
            .field(
                "replay_buffer_limit_batches",
                self.cfg.replay_buffer_batches,
            )
            .field("replay_buffer_limit_bytes", self.cfg.replay_buffer_bytes)
            .fields(kvtier_core::metrics::status_fields(&self.counters))
    }
}

impl MetricSet for KvEventPublisher {
    fn descriptors(&self) -> &'static [MetricDesc] {
        self.counters.descriptors()
    }

    fn visit(&self, v: &mut dyn MetricVisitor) {
        self.counters.visit(v);
        if let Some(t) = self.thread.get() {
            t.visit(v);
        }
    }
}

fn last_endpoint(s: &zmq::Socket) -> Option<String> {
    s.get_last_endpoint().ok()?.ok()
}

/// The thread's state: both sockets, the log cursor, the batch sequence and the replay buffer.
/// It holds the log and the publisher weakly (they own the thread), upgrading once per round.
struct Pump {
    /// Kept alive for the sockets' sake (dropped after them: field order).
    publish: zmq::Socket,
    replay: Option<zmq::Socket>,
    _ctx: zmq::Context,
    events: Weak<KvEvents>,
    publisher: Weak<KvEventPublisher>,
    cursor: u64,
    seq: u64,
    buffer: VecDeque<(u64, Vec<u8>)>,
    buffer_bytes: usize,
    topics: HashSet<Arc<str>>,
    instance: String,
}

impl Pump {
    fn round(&mut self) -> Result<(), String> {
        let (Some(events), Some(publisher)) = (self.events.upgrade(), self.publisher.upgrade())
        else {
            return Ok(()); // the server is going away; its shutdown stops this thread
        };
        let p = &publisher;
        p.dirty.store(false, Relaxed);
        loop {
            let (records, lost, next) = events.read_all(self.cursor, MAX_RECORDS_PER_READ);
            if lost {
                p.counters.lost_total.inc();
                tracing::warn!(
                    cursor = self.cursor,
                    "the KV-event publisher fell behind the log; sending AllBlocksCleared"
                );
                self.clear_all(p);
            }
            self.cursor = next;
            let full = records.len() == MAX_RECORDS_PER_READ;
            for run in records.chunk_by(|a, b| a.model_name == b.model_name) {
                self.publish_run(p, run);
            }
            p.gauges.cursor.store(self.cursor, Relaxed);
            if !full {
                break;
            }
        }
        self.serve_replays(p);
        let g = &p.gauges;
        g.next_seq.store(self.seq, Relaxed);
        g.buffer_batches.store(self.buffer.len() as u64, Relaxed);
        g.buffer_bytes.store(self.buffer_bytes as u64, Relaxed);
        Ok(())
    }

    fn topic(&self, p: &KvEventPublisher, model: &str) -> String {
        p.cfg
            .topic
            .replace("{model}", model)
            .replace("{instance}", &self.instance)
    }

    fn publish_run(&mut self, p: &KvEventPublisher, run: &[KvEventRecord]) {
        let Some(first) = run.first() else { return };
        if self.topics.len() < MAX_TOPICS {
            self.topics.insert(Arc::clone(&first.model_name));
        }
        let topic = self.topic(p, &first.model_name);
        let payload = encode_batch(
            p.cfg.encoding,
            now_seconds(),
            run.iter().map(VllmEvent::Record),
        );
        self.send(p, &topic, payload, run.len());
    }

    fn clear_all(&mut self, p: &KvEventPublisher) {
        let models: Vec<Arc<str>> = self.topics.iter().cloned().collect();
        for model in models {
            let topic = self.topic(p, &model);
            let payload = encode_batch(
                p.cfg.encoding,
                now_seconds(),
                std::iter::once(VllmEvent::AllCleared),
            );
            self.send(p, &topic, payload, 1);
        }
    }

    fn send(&mut self, p: &KvEventPublisher, topic: &str, payload: Vec<u8>, events: usize) {
        let c = &p.counters;
        let seq = self.seq;
        self.seq += 1;
        let frames: [&[u8]; 3] = [topic.as_bytes(), &seq.to_be_bytes(), &payload];
        match self.publish.send_multipart(frames, zmq::DONTWAIT) {
            Ok(()) => {
                c.batches_total.inc();
                c.events_total.add(events as u64);
                c.bytes_total.add(payload.len() as u64);
            }
            Err(e) => {
                c.send_errors_total.inc();
                tracing::debug!(error = %e, seq, "KV-event PUB send failed");
            }
        }
        self.buffer_bytes += payload.len();
        self.buffer.push_back((seq, payload));
        let cfg = &p.cfg;
        while self.buffer.len() > cfg.replay_buffer_batches
            || (self.buffer_bytes > cfg.replay_buffer_bytes && self.buffer.len() > 1)
        {
            if let Some((_, old)) = self.buffer.pop_front() {
                self.buffer_bytes -= old.len();
                c.buffer_evicted_total.inc();
            }
        }
    }

    /// Answers every pending replay request (non-blocking).
    fn serve_replays(&mut self, p: &KvEventPublisher) {
        let Some(replay) = &self.replay else { return };
        let c = &p.counters;
        while let Ok(frames) = replay.recv_multipart(zmq::DONTWAIT) {
            let [id, delim, start] = frames.as_slice() else {
                c.invalid_replay_requests_total.inc();
                continue;
            };
            let Ok(start) = <[u8; 8]>::try_from(start.as_slice()) else {
                c.invalid_replay_requests_total.inc();
                continue;
            };
            if !delim.is_empty() {
                c.invalid_replay_requests_total.inc();
                continue;
            }
            c.replay_requests_total.inc();
            let start = u64::from_be_bytes(start);
            let mut complete = true;
            for (seq, payload) in self.buffer.iter().filter(|(s, _)| *s >= start) {
                let frames: [&[u8]; 4] = [id, b"", &seq.to_be_bytes(), payload];
                if replay.send_multipart(frames, zmq::DONTWAIT).is_err() {
                    complete = false;
                    break;
                }
                c.replayed_batches_total.inc();
            }
            if !complete {
                c.replay_truncated_total.inc();
            }
            let end: [&[u8]; 4] = [id, b"", &END_SEQ, b""];
            let _sent = replay.send_multipart(end, zmq::DONTWAIT);
        }
    }
}

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
