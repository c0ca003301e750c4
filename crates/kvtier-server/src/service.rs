//! The wire edge of the RPC path: decode → [`Engine::handle`] → encode, plus the failure
//! reply and the outcome classification of every request.
//!
//! The engine returns typed [`Response`]s and [`EngineError`]s and knows no msgpack; this
//! module turns them into reply payloads. On any error the reply is the op's defined failure
//! value ([`Op::failure_reply`]), except `store`/`retrieve`, whose failure reply always echoes
//! the client's event handle (`(handle, false)`). Every request is counted once in
//! [`RpcStats`] under its real outcome: a transfer that did not happen is `failed`, never `ok`.
//!
//! Which ops may run inline on the poll thread is decided here too ([`Service::run_inline`]).

use std::sync::Arc;
use std::time::Instant;

use kvtier_proto::{Op, Response, Scheduling, TokenArrays, decode_request, decode_request_with};

use crate::engine::kv_events::{StreamPoll, Subscription, Waker};
use crate::engine::lookup::PrefetchWait;
use crate::engine::{Engine, EngineError};
use crate::stats::{Outcome, RpcStats};
use crate::transport::{DeferredReply, Handler, ReplyStream, StreamItem, StreamWaker};

/// Largest payload (all frames) of a bookkeeping op (lookup, query, ...) that may run inline
/// on the poll thread: a 64 KiB key carries about 16k tokens, which hash in well under 100 µs.
pub const INLINE_PAYLOAD_LIMIT: usize = 64 << 10;

/// Largest payload of a transfer control (prepare/commit store and retrieve) that may run
/// inline: 16 KiB is 3,200–5,400 tokens (3–5 bytes each in msgpack), 12–21 chunks of 256.
/// These ops do more per chunk than a lookup (L1 reservations with synchronous eviction, KV
/// events, lock moves), and while one runs inline every other client waits: with
/// `kvtier bench --neighbour-chunks 64` (a client storing 16k-token batches back to back) run
/// inline, the other clients' noop p99 rose 16× against 2.7× when those batches went to the
/// transfer pool (`docs/performance.md`, issue 18). Typical engine batches (a few chunks) stay
/// inline; big ones keep the pool's isolation.
pub const INLINE_TRANSFER_PAYLOAD_LIMIT: usize = 16 << 10;

/// The statistics bucket of an engine error.
pub fn outcome_of(e: &EngineError) -> Outcome {
    match e {
        EngineError::Malformed(_) => Outcome::Malformed,
        EngineError::Unsupported(_) => Outcome::Unsupported,
        EngineError::Failed(_) => Outcome::Failed,
    }
}

/// The request handler behind the front end: decode, run, account, and always reply.
#[derive(Debug)]
pub struct Service {
    engine: Arc<Engine>,
    rpc: Arc<RpcStats>,
    /// Recently decoded token arrays, shared by the poll thread and the pools' workers (every
    /// op of a request carries the request's whole token list; see `kvtier_proto::TokenArrays`).
    token_arrays: Arc<TokenArrays>,
}

impl Service {
    /// A service over `engine`, counting into `rpc`, reusing token arrays from `token_arrays`.
    pub fn new(engine: Arc<Engine>, rpc: Arc<RpcStats>, token_arrays: Arc<TokenArrays>) -> Self {
        Self {
            engine,
            rpc,
            token_arrays,
        }
    }

    /// Handles one request: `(reply payload, outcome)`.
    pub fn call(&self, op: Op, payloads: &[&[u8]]) -> (Option<Vec<u8>>, Outcome) {
        let req = match decode_request_with(op, payloads, Some(&self.token_arrays)) {
            Ok(req) => req,
            Err(e) => {
                tracing::warn!(%op, error = %e, "malformed request; answering with the failure value");
                return (op.failure_reply(), Outcome::Malformed);
            }
        };
        let echo = req.reply_event_handle().map(<[u8]>::to_vec);
        match self.engine.handle(req) {
            Ok(r) => (r.encode(), Outcome::Ok),
            Err(e) => {
                let outcome = outcome_of(&e);
                if outcome == Outcome::Failed {
                    tracing::debug!(%op, error = %e, "request failed");
                } else {
                    tracing::warn!(%op, error = %e, "request refused");
                }
                let reply = match echo {
                    Some(handle) => Response::Transfer { handle, ok: false }.encode(),
                    None => op.failure_reply(),
                };
                (reply, outcome)
            }
        }
    }
}

impl Handler for Service {
    /// Besides the SYNC ops, the ops whose work is bounded by their (small) payload and never
    /// waits: lookups (hash + L1 prefix lock, or an L2 submission), result queries, lock
    /// releases, pings, and the engine-driven transfer controls (`prepare_store` reserves L1
    /// ranges, evicting synchronously at most what the request needs; `commit_store`
    /// publishes and submits to the bounded write-behind queue without waiting;
    /// `prepare_retrieve`/`commit_retrieve` move and release locks; the engine copies, not the
    /// server). `clear` (walks L1) and the LMCache-driven `store`/`retrieve` (the server copies)
    /// go to the pools; `wait_prefetch_status` goes to neither: it is deferred
    /// ([`Handler::defer`]). The transport keeps a client's affinity ops in order across the
    /// inline and pool paths.
    fn run_inline(&self, op: Op, payloads: &[Vec<u8>]) -> bool {
        let size = || payloads.iter().map(Vec::len).sum::<usize>();
        match op {
            _ if op.scheduling() == Scheduling::Sync => true,
            Op::Lookup
            | Op::QueryPrefetchStatus
            | Op::EndSession
            | Op::FreeLookupLocks
            | Op::Ping
            | Op::ReportBlockAllocation => size() <= INLINE_PAYLOAD_LIMIT,
            Op::PrepareStore | Op::CommitStore | Op::PrepareRetrieve | Op::CommitRetrieve => {
                size() <= INLINE_TRANSFER_PAYLOAD_LIMIT
            }
            _ => false,
        }
    }

    fn memory_epoch(&self) -> u64 {
        self.engine.memory().epoch()
    }

    fn release_memory(&self) {
        self.engine.memory().run();
    }

    fn handle(&self, op: Op, payloads: &[&[u8]]) -> Option<Vec<u8>> {
        let t = Instant::now();
        let (reply, outcome) = self.call(op, payloads);
        self.rpc.record(op, outcome, t.elapsed());
        reply
    }

    /// `wait_prefetch_status` waits on the poll thread's deferred table instead of a pool
    /// worker (a request that does not decode is answered like any other).
    fn defer(&self, op: Op, payloads: &[&[u8]]) -> Option<Box<dyn DeferredReply>> {
        if op != Op::WaitPrefetchStatus {
            return None;
        }
        let t = Instant::now();
        match decode_request(op, payloads) {
            Ok(kvtier_proto::Request::WaitPrefetchStatus {
                request_id,
                timeout,
            }) => Some(Box::new(WaitReply {
                wait: self.engine.start_prefetch_wait(request_id, timeout),
                engine: Arc::clone(&self.engine),
                rpc: Arc::clone(&self.rpc),
                started: t,
            })),
            _ => None,
        }
    }

    /// `subscribe_kv_events`: decodes, opens the engine's subscription and wraps it. A request
    /// the engine refuses (bad frames, negative cursor, `max_events` outside 1..=1024) ends at
    /// once with a bare reply and is counted; LMCache leaves such a client waiting instead.
    fn open_stream(&self, op: Op, payloads: &[&[u8]]) -> Option<Box<dyn ReplyStream>> {
        let t = Instant::now();
        let opened = decode_request(op, payloads)
            .map_err(|e| EngineError::Malformed(e.to_string()))
            .and_then(|req| match req {
                kvtier_proto::Request::SubscribeKvEvents {
                    instance_id,
                    model_name,
                    cursor,
                    max_events,
                } => self
                    .engine
                    .subscribe_kv_events(instance_id, model_name, cursor, max_events),
                other => Err(EngineError::Unsupported(other.op().name())),
            });
        let (stream, outcome) = match opened {
            Ok(sub) => (
                Some(Box::new(KvEventStream(sub)) as Box<dyn ReplyStream>),
                Outcome::Ok,
            ),
            Err(e) => {
                tracing::warn!(%op, error = %e, "stream refused; ending it at once");
                (None, outcome_of(&e))
            }
        };
        self.rpc.record(op, outcome, t.elapsed());
        stream
    }

    fn attach_waker(&self, waker: StreamWaker) {
        let prefetch_waker = waker.clone();
        self.engine
            .set_prefetch_waker(Arc::new(move || prefetch_waker.wake()));
        self.engine
            .kv_events()
            .set_waker(Waker(std::sync::Arc::new(move || waker.wake())));
    }
}

/// A `subscribe_kv_events` subscription as a transport stream: each batch encoded as
/// LMCache's `KVEventBatch`.
#[derive(Debug)]
struct KvEventStream(Subscription);

impl ReplyStream for KvEventStream {
    fn poll_next(&mut self) -> StreamItem {
        match self.0.poll() {
            StreamPoll::Item(batch) => match Response::KvEvents(batch).encode() {
                Some(body) => StreamItem::Item(body),
                None => StreamItem::End,
            },
            StreamPoll::Pending => StreamItem::Pending,
            StreamPoll::End => StreamItem::End,
        }
    }

    fn cancel(&mut self) {
        self.0.cancel();
    }
}

/// A `wait_prefetch_status` held by the transport: answered with the lookup's result once the
/// prefetch is done, or nil at its deadline; counted in the RPC stats when answered.
#[derive(Debug)]
struct WaitReply {
    wait: PrefetchWait,
    engine: Arc<Engine>,
    rpc: Arc<RpcStats>,
    started: Instant,
}

impl DeferredReply for WaitReply {
    fn poll(&mut self, force: bool) -> Option<Option<Vec<u8>>> {
        let answer = self.engine.poll_prefetch_wait(&self.wait, force)?;
        self.rpc
            .record(Op::WaitPrefetchStatus, Outcome::Ok, self.started.elapsed());
        Some(Response::PrefixHits(answer).encode())
    }

    fn deadline(&self) -> Instant {
        self.wait.deadline()
    }
}
