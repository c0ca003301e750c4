//! The request client: one ZeroMQ `DEALER` socket, pipelined requests matched by uid.
//!
//! Invariants:
//! - Every request is `[uid, op, payload_1, ..., payload_n]`, each frame one msgpack document;
//!   `uid` counts from 0 per client; `op` is the legacy int id (or the name for string-only
//!   operations), exactly as LMCache's client sends it.
//! - A reply is `[uid, op]` (the handler returned `None`) or `[uid, op, body]`; the op frame
//!   must echo the request's byte-for-byte. A reply is delivered to the request with its uid
//!   whatever order replies arrive in; replies for uids not in flight (late replies to
//!   timed-out requests, or garbage) are discarded and counted.
//! - Nothing blocks without a deadline: sends time out (`ZMQ_SNDTIMEO`), and each wait polls
//!   with the time left before [`Client::timeout`] expires.
//!
//! A `Client` is not `Sync` (libzmq sockets are single-threaded): use one per thread.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kvtier_proto::Op;

use crate::codec::{
    self, CacheKey, PrepareRetrieve, PrepareStore, RegisterPayload, Registration, Value, decode,
};
use crate::error::ClientError;

type Decoder<T> = fn(Option<&[u8]>) -> Result<T, String>;

/// A request in flight; pass it to [`Client::wait`] to get its typed result.
#[must_use = "a pending request must be waited for"]
#[derive(Debug)]
pub struct Pending<T> {
    uid: u64,
    op: Op,
    decode: Decoder<T>,
    _result: PhantomData<fn() -> T>,
}

impl<T> Pending<T> {
    /// The request uid.
    pub fn uid(&self) -> u64 {
        self.uid
    }

    /// The operation.
    pub fn op(&self) -> Op {
        self.op
    }
}

type Arrived = Result<Option<Vec<u8>>, ClientError>;

/// A client of one server. See the module docs.
pub struct Client {
    socket: zmq::Socket,
    url: String,
    timeout: Duration,
    next_uid: u64,
    in_flight: HashMap<u64, Op>,
    arrived: HashMap<u64, Arrived>,
    discarded: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .field("next_uid", &self.next_uid)
            .field("in_flight", &self.in_flight.len())
            .field("discarded", &self.discarded)
            .finish_non_exhaustive()
    }
}

/// The process-wide ZeroMQ context (one I/O thread), shared by every client.
fn context() -> &'static zmq::Context {
    static CTX: OnceLock<zmq::Context> = OnceLock::new();
    CTX.get_or_init(zmq::Context::new)
}

fn zmq_err(what: &'static str) -> impl FnOnce(zmq::Error) -> ClientError {
    move |source| ClientError::Zmq { what, source }
}

/// The op frame as LMCache's client sends it: the legacy id, or the name if there is none.
fn op_frame(op: Op) -> Vec<u8> {
    match op.legacy_id() {
        Some(id) => codec::encode_int(i64::from(id)),
        None => codec::encode_str(op.name()),
    }
}

fn millis(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

impl Client {
    /// Creates a `DEALER` socket connected to `url` (e.g. `tcp://127.0.0.1:5555`). Connecting
    /// is asynchronous: an unreachable server shows up as [`ClientError::Timeout`] on the first
    /// wait, after `timeout`.
    ///
    /// # Errors
    /// [`ClientError::Zmq`] if the socket cannot be created or the URL is invalid.
    pub fn connect(url: &str, timeout: Duration) -> Result<Self, ClientError> {
        let socket = context().socket(zmq::DEALER).map_err(zmq_err("socket"))?;
        socket.set_linger(0).map_err(zmq_err("set linger"))?;
        socket
            .set_sndtimeo(millis(timeout))
            .map_err(zmq_err("set send timeout"))?;
        socket
            .set_connect_timeout(5000)
            .map_err(zmq_err("set connect timeout"))?;
        // Retry quickly while a server starts (the default is 100 ms), back off to 1 s.
        socket
            .set_reconnect_ivl(5)
            .map_err(zmq_err("set reconnect interval"))?;
        socket
            .set_reconnect_ivl_max(1000)
            .map_err(zmq_err("set reconnect interval max"))?;
        socket.connect(url).map_err(zmq_err("connect"))?;
        Ok(Self {
            socket,
            url: url.to_owned(),
            timeout,
            next_uid: 0,
            in_flight: HashMap::new(),
            arrived: HashMap::new(),
            discarded: 0,
        })
    }

    /// The URL this client connected to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How long each wait (and each send) may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the wait timeout (sends keep the one set at connect).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Requests sent whose replies have not been collected or abandoned.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len() + self.arrived.len()
    }

    /// Replies discarded because no request with their uid was in flight.
    pub fn discarded_replies(&self) -> u64 {
        self.discarded
    }

    /// Sends `op` with already-encoded payload frames and returns its uid. The frame count is
    /// not checked, so tests can send malformed requests.
    ///
    /// # Errors
    /// [`ClientError::Zmq`] if the send fails or times out.
    pub fn submit_frames(&mut self, op: Op, payloads: &[&[u8]]) -> Result<u64, ClientError> {
        let uid = self.next_uid;
        let uid_frame = codec::encode_uid(uid);
        let op_bytes = op_frame(op);
        let mut frames: Vec<&[u8]> = Vec::with_capacity(2 + payloads.len());
        frames.push(&uid_frame);
        frames.push(&op_bytes);
        frames.extend_from_slice(payloads);
        self.socket
            .send_multipart(frames, 0)
            .map_err(zmq_err("send"))?;
        self.next_uid += 1;
        self.in_flight.insert(uid, op);
        Ok(uid)
    }

    /// Waits for the reply to `uid`: `None` for a bare `[uid, op]` reply, else the body frame.
    ///
    /// # Errors
    /// [`ClientError::Timeout`] after [`Client::timeout`] (the request is then abandoned),
    /// [`ClientError::Protocol`] for a malformed reply, [`ClientError::NotInFlight`] for an
    /// unknown uid, [`ClientError::Zmq`] if the socket fails.
    pub fn wait_frames(&mut self, uid: u64) -> Result<Option<Vec<u8>>, ClientError> {
        if let Some(r) = self.arrived.remove(&uid) {
            return r;
        }
        let Some(&op) = self.in_flight.get(&uid) else {
            return Err(ClientError::NotInFlight(uid));
        };
        let deadline = Instant::now() + self.timeout;
        loop {
            self.drain()?;
            if let Some(r) = self.arrived.remove(&uid) {
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                self.in_flight.remove(&uid);
                return Err(ClientError::Timeout {
                    op,
                    uid,
                    after: self.timeout,
                });
            }
            let left = deadline - now;
            // Round up so a sub-millisecond remainder still waits instead of spinning.
            let ms = i64::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i64::MAX);
            self.socket.poll(zmq::POLLIN, ms).map_err(zmq_err("poll"))?;
        }
    }

    /// Receives every message already queued on the socket and files it by uid.
    fn drain(&mut self) -> Result<(), ClientError> {
        loop {
            match self.socket.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => self.route(frames),
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(zmq::Error::EINTR) => continue,
                Err(e) => {
                    return Err(ClientError::Zmq {
                        what: "receive",
                        source: e,
                    });
                }
            }
        }
    }

    fn route(&mut self, mut frames: Vec<Vec<u8>>) {
        let uid = frames
            .first()
            .and_then(|f| Value::decode(f).ok())
            .and_then(|v| v.as_u64("uid").ok());
        let Some(uid) = uid else {
            self.discarded += 1;
            return;
        };
        let Some(op) = self.in_flight.remove(&uid) else {
            self.discarded += 1;
            return;
        };
        let protocol = |reason: String| ClientError::Protocol { op, uid, reason };
        let result = if frames.len() < 2 || frames.len() > 3 {
            Err(protocol(format!(
                "{} frames (expected [uid, op] or [uid, op, body])",
                frames.len()
            )))
        } else if frames.get(1).map(Vec::as_slice) != Some(op_frame(op).as_slice()) {
            Err(protocol(format!(
                "op frame {:02x?} does not echo the request's",
                frames.get(1)
            )))
        } else {
            Ok(if frames.len() == 3 {
                frames.pop()
            } else {
                None
            })
        };
        self.arrived.insert(uid, result);
    }

    fn submit<T>(
        &mut self,
        op: Op,
        payloads: &[&[u8]],
        decode: Decoder<T>,
    ) -> Result<Pending<T>, ClientError> {
        let uid = self.submit_frames(op, payloads)?;
        Ok(Pending {
            uid,
            op,
            decode,
            _result: PhantomData,
        })
    }

    /// Waits for a pending request and decodes its reply.
    ///
    /// # Errors
    /// As [`Client::wait_frames`], plus [`ClientError::Decode`] if the reply is not the
    /// operation's response type.
    pub fn wait<T>(&mut self, pending: Pending<T>) -> Result<T, ClientError> {
        let body = self.wait_frames(pending.uid)?;
        (pending.decode)(body.as_deref()).map_err(|reason| ClientError::Decode {
            op: pending.op,
            reason,
        })
    }

    /// Sends `noop` (answered inline by the server: the pure round trip).
    ///
    /// # Errors
    /// [`ClientError::Zmq`].
    pub fn submit_noop(&mut self) -> Result<Pending<String>, ClientError> {
        self.submit(Op::Noop, &[], decode::string)
    }

    /// `noop` → `"OK"`.
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn noop(&mut self) -> Result<String, ClientError> {
        let p = self.submit_noop()?;
        self.wait(p)
    }

    /// `get_chunk_size` → tokens per chunk.
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn get_chunk_size(&mut self) -> Result<u64, ClientError> {
        let p = self.submit(Op::GetChunkSize, &[], decode::uint)?;
        self.wait(p)
    }

    /// `get_experimental` → feature names.
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn get_experimental(&mut self) -> Result<Vec<String>, ClientError> {
        let p = self.submit(Op::GetExperimental, &[], decode::str_list)?;
        self.wait(p)
    }

    /// `ping(instance_id)` → whether the server took it (refreshes worker liveness).
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn ping(&mut self, instance_id: Option<i64>) -> Result<bool, ClientError> {
        let iid = codec::encode_opt_int(instance_id);
        let p = self.submit(Op::Ping, &[&iid], decode::boolean)?;
        self.wait(p)
    }

    /// `register_kv_cache_engine_driven_context(payload)` → the pool to map.
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn register_engine_driven(
        &mut self,
        payload: &RegisterPayload,
    ) -> Result<Registration, ClientError> {
        let body = payload.encode();
        let p = self.submit(
            Op::RegisterKvCacheEngineDrivenContext,
            &[&body],
            decode::registration,
        )?;
        self.wait(p)
    }

    /// `unregister_kv_cache_engine_driven_context(instance_id)`.
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn unregister_engine_driven(&mut self, instance_id: i64) -> Result<(), ClientError> {
        let iid = codec::encode_int(instance_id);
        let p = self.submit(
            Op::UnregisterKvCacheEngineDrivenContext,
            &[&iid],
            decode::unit,
        )?;
        self.wait(p)
    }

    /// Sends `prepare_store(key, instance_id)`; `key.worker_id` must name the rank.
    ///
    /// # Errors
    /// [`ClientError::Zmq`].
    pub fn submit_prepare_store(
        &mut self,
        key: &CacheKey,
        instance_id: i64,
    ) -> Result<Pending<PrepareStore>, ClientError> {
        let k = key.encode();
        let iid = codec::encode_int(instance_id);
        self.submit(Op::PrepareStore, &[&k, &iid], decode::prepare_store)
    }

    /// `prepare_store(key, instance_id)` → slots for the chunks not cached yet.
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn prepare_store(
        &mut self,
        key: &CacheKey,
        instance_id: i64,
    ) -> Result<PrepareStore, ClientError> {
        let p = self.submit_prepare_store(key, instance_id)?;
        self.wait(p)
    }

    /// Sends `commit_store(key, instance_id, b"")`.
    ///
    /// # Errors
    /// [`ClientError::Zmq`].
    pub fn submit_commit_store(
        &mut self,
        key: &CacheKey,
        instance_id: i64,
    ) -> Result<Pending<bool>, ClientError> {
        let k = key.encode();
        let iid = codec::encode_int(instance_id);
        let data = codec::encode_bin(b"");
        self.submit(Op::CommitStore, &[&k, &iid, &data], decode::boolean)
    }

    /// `commit_store(key, instance_id, b"")` → whether a reservation was published.
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn commit_store(&mut self, key: &CacheKey, instance_id: i64) -> Result<bool, ClientError> {
        let p = self.submit_commit_store(key, instance_id)?;
        self.wait(p)
    }

    /// `lookup(key, tp_size)`: starts a prefetch job under `key.request_id`.
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn lookup(&mut self, key: &CacheKey, tp_size: i64) -> Result<(), ClientError> {
        let k = key.encode();
        let tp = codec::encode_int(tp_size);
        let p = self.submit(Op::Lookup, &[&k, &tp], decode::unit)?;
        self.wait(p)
    }

    /// `query_prefetch_status(request_id)` → `None` while running, then the prefix chunks hit
    /// (once).
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn query_prefetch_status(&mut self, request_id: &str) -> Result<Option<u64>, ClientError> {
        let r = codec::encode_str(request_id);
        let p = self.submit(Op::QueryPrefetchStatus, &[&r], decode::opt_uint)?;
        self.wait(p)
    }

    /// `wait_prefetch_status(request_id, timeout_s)`: blocks server-side up to `timeout_s`.
    /// The client's own wait timeout still applies.
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn wait_prefetch_status(
        &mut self,
        request_id: &str,
        timeout_s: f64,
    ) -> Result<Option<u64>, ClientError> {
        let r = codec::encode_str(request_id);
        let t = codec::encode_f64(timeout_s);
        let p = self.submit(Op::WaitPrefetchStatus, &[&r, &t], decode::opt_uint)?;
        self.wait(p)
    }

    /// `lookup` and then `query_prefetch_status` until it is an int: the prefix chunks hit.
    /// Polls without pause, as LMCache's scheduler does.
    ///
    /// # Errors
    /// See [`Client::wait`]; [`ClientError::Timeout`] also if the job runs longer than the
    /// client timeout.
    pub fn lookup_and_wait(&mut self, key: &CacheKey, tp_size: i64) -> Result<u64, ClientError> {
        self.lookup_and_poll(key, tp_size).map(|(hit, _)| hit)
    }

    /// [`Client::lookup_and_wait`], also returning how many `query_prefetch_status` calls it
    /// took (1 when the result was ready at the first query).
    ///
    /// # Errors
    /// As [`Client::lookup_and_wait`].
    pub fn lookup_and_poll(
        &mut self,
        key: &CacheKey,
        tp_size: i64,
    ) -> Result<(u64, u32), ClientError> {
        let started = Instant::now();
        self.lookup(key, tp_size)?;
        let mut polls = 0u32;
        loop {
            polls = polls.saturating_add(1);
            if let Some(hit) = self.query_prefetch_status(&key.request_id)? {
                return Ok((hit, polls));
            }
            if started.elapsed() > self.timeout {
                return Err(ClientError::Timeout {
                    op: Op::QueryPrefetchStatus,
                    uid: self.next_uid.saturating_sub(1),
                    after: self.timeout,
                });
            }
        }
    }

    /// `prepare_retrieve(key, instance_id)` → the slots of the (lookup-locked) chunks.
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn prepare_retrieve(
        &mut self,
        key: &CacheKey,
        instance_id: i64,
    ) -> Result<PrepareRetrieve, ClientError> {
        let k = key.encode();
        let iid = codec::encode_int(instance_id);
        let p = self.submit(Op::PrepareRetrieve, &[&k, &iid], decode::prepare_retrieve)?;
        self.wait(p)
    }

    /// `commit_retrieve(key, instance_id)` → whether a pending retrieve was released.
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn commit_retrieve(
        &mut self,
        key: &CacheKey,
        instance_id: i64,
    ) -> Result<bool, ClientError> {
        let k = key.encode();
        let iid = codec::encode_int(instance_id);
        let p = self.submit(Op::CommitRetrieve, &[&k, &iid], decode::boolean)?;
        self.wait(p)
    }

    /// `free_lookup_locks(key, tp_size)`.
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn free_lookup_locks(&mut self, key: &CacheKey, tp_size: i64) -> Result<(), ClientError> {
        let k = key.encode();
        let tp = codec::encode_int(tp_size);
        let p = self.submit(Op::FreeLookupLocks, &[&k, &tp], decode::unit)?;
        self.wait(p)
    }

    /// Sends `end_session(request_id)`.
    ///
    /// # Errors
    /// [`ClientError::Zmq`].
    pub fn submit_end_session(&mut self, request_id: &str) -> Result<Pending<()>, ClientError> {
        let r = codec::encode_str(request_id);
        self.submit(Op::EndSession, &[&r], decode::unit)
    }

    /// `end_session(request_id)`: the request is over; its session (hash cache and any lookup
    /// locks left) is released.
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn end_session(&mut self, request_id: &str) -> Result<(), ClientError> {
        let p = self.submit_end_session(request_id)?;
        self.wait(p)
    }

    /// `clear(force)`: drops the cache contents.
    ///
    /// # Errors
    /// See [`Client::wait`].
    pub fn clear(&mut self, force: bool) -> Result<(), ClientError> {
        let f = codec::encode_bool(force);
        let p = self.submit(Op::Clear, &[&f], decode::unit)?;
        self.wait(p)
    }
}
