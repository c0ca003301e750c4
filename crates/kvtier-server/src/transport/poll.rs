//! The `kvtier-zmq` thread's loop ([`PollLoop`]): the only code that touches the ROUTER socket.
//! It polls the socket, the socket monitor and the workers' eventfd; reads and dispatches
//! requests (inline, to the client's affinity worker, or to the shared pool; oversized ones
//! answered at once unread); sends the workers' replies, answers deferred requests and streams
//! when they wake it; and drains in-flight requests on shutdown. The rules it keeps are in the
//! `transport` module docs.

use super::*;

/// Sends one reply frame set; whether the socket took it (a peer that is gone or not reading
/// is counted in `send_failures`).
pub(super) fn send_reply(
    socket: &zmq::Socket,
    stats: &TransportStats,
    identity: Vec<u8>,
    uid: Vec<u8>,
    op_frame: Vec<u8>,
    body: Option<Vec<u8>>,
) -> bool {
    let result = match body {
        Some(b) => socket.send_multipart([identity, uid, op_frame, b], zmq::DONTWAIT),
        None => socket.send_multipart([identity, uid, op_frame], zmq::DONTWAIT),
    };
    match result {
        Ok(()) => {
            stats.replied.inc();
            true
        }
        Err(e) => {
            stats.send_failures.inc();
            tracing::debug!(error = %e, "reply not delivered (client gone or not reading)");
            false
        }
    }
}

pub(super) struct PollLoop {
    pub(super) socket: zmq::Socket,
    /// PAIR end of the ROUTER's socket monitor (connections accepted and closed).
    pub(super) monitor: zmq::Socket,
    pub(super) _ctx: zmq::Context,
    pub(super) handler: Arc<dyn Handler>,
    pub(super) affinity_tx: Vec<Sender<Job>>,
    pub(super) normal_tx: Sender<Job>,
    pub(super) reply_rx: Receiver<Outgoing>,
    pub(super) wake_fd: Arc<OwnedFd>,
    pub(super) stats: Arc<TransportStats>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) alive: Arc<AtomicBool>,
    pub(super) drain_timeout: Duration,
    pub(super) hasher: foldhash::fast::FixedState,
    pub(super) streams: Streams,
    pub(super) streams_dirty: Arc<AtomicBool>,
    pub(super) deferreds: Deferreds,
    /// The handler's memory epoch this thread last released memory at.
    pub(super) memory_epoch: u64,
    pub(super) max_message_bytes: usize,
    /// Affinity jobs queued or running per client identity (no entry at zero). An affinity op
    /// of a client with an entry is never run inline, so it cannot overtake them.
    pub(super) affinity_queued: HashMap<Vec<u8>, u32>,
}

/// The socket-monitor events the front end counts (libzmq's `ZMQ_EVENT_*` values).
pub(super) mod zmq_sys_event {
    pub const ACCEPTED: u16 = 0x0020;
    pub const DISCONNECTED: u16 = 0x0200;
}

impl PollLoop {
    pub(super) fn run(mut self) {
        let mut drain_deadline: Option<Instant> = None;
        let mut buf = [0u8; 8];
        loop {
            let (sock_ready, wake_ready, monitor_ready) = {
                let mut items = [
                    self.socket.as_poll_item(zmq::POLLIN),
                    zmq::PollItem::from_fd(self.wake_fd.as_raw_fd(), zmq::POLLIN),
                    self.monitor.as_poll_item(zmq::POLLIN),
                ];
                let timeout = self
                    .deferreds
                    .next_timeout(Instant::now())
                    .map_or(100, |d| d.as_millis().clamp(1, 100) as i64);
                match zmq::poll(&mut items, timeout) {
                    Ok(0) => {
                        // Idle for a whole interval: a good moment for deferred memory release.
                        let epoch = self.handler.memory_epoch();
                        if epoch != self.memory_epoch {
                            self.memory_epoch = epoch;
                            self.handler.release_memory();
                        }
                        (false, false, false)
                    }
                    Ok(_) => (
                        items[0].is_readable(),
                        items[1].is_readable(),
                        items[2].is_readable(),
                    ),
                    Err(zmq::Error::EINTR) => (false, false, false),
                    Err(e) => {
                        tracing::error!(error = %e, "zmq_poll failed; front end stopping");
                        break;
                    }
                }
            };
            if wake_ready {
                let _drained = rustix::io::read(&*self.wake_fd, &mut buf);
            }
            if monitor_ready {
                self.read_monitor();
            }
            self.flush_replies();
            let dirty = self.streams_dirty.swap(false, Relaxed);
            let stopping = self.stop.load(Relaxed);
            {
                let (socket, stats) = (&self.socket, &*self.stats);
                let mut send = |i, u, o, b| send_reply(socket, stats, i, u, o, b);
                if dirty {
                    self.streams.poll_all(&mut send, stats);
                }
                // Waiters answer when their source woke us, at their deadline, or at shutdown.
                self.deferreds.poll(dirty, stopping, &mut send, stats);
            }
            if drain_deadline.is_none() && stopping {
                let deadline = Instant::now() + self.drain_timeout;
                tracing::info!(in_flight = self.stats.in_flight.get(), "front end draining");
                drain_deadline = Some(deadline);
            }
            if let Some(deadline) = drain_deadline {
                if self.stats.in_flight.get() == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        in_flight = self.stats.in_flight.get(),
                        "drain timeout; dropping unanswered requests"
                    );
                    break;
                }
                continue;
            }
            if sock_ready {
                self.read_requests();
            }
        }
        // End every open stream (best effort: the socket closes next).
        let (socket, stats) = (&self.socket, &*self.stats);
        self.streams.end_all(
            &mut |i, u, o, b| send_reply(socket, stats, i, u, o, b),
            stats,
        );
        self.alive.store(false, Relaxed);
    }

    fn flush_replies(&mut self) {
        while let Ok(out) = self.reply_rx.try_recv() {
            self.stats.in_flight.sub(1);
            if out.affinity {
                self.affinity_done(&out.identity);
            }
            let _delivered = self.send(out.identity, out.uid, out.op_frame, out.body);
        }
    }

    /// One of the client's affinity jobs has finished (or was never queued).
    fn affinity_done(&mut self, identity: &[u8]) {
        if let Some(n) = self.affinity_queued.get_mut(identity) {
            *n -= 1;
            if *n == 0 {
                self.affinity_queued.remove(identity);
            }
        }
    }

    /// Sends one reply; whether it was delivered to the socket.
    fn send(
        &self,
        identity: Vec<u8>,
        uid: Vec<u8>,
        op_frame: Vec<u8>,
        body: Option<Vec<u8>>,
    ) -> bool {
        send_reply(&self.socket, &self.stats, identity, uid, op_frame, body)
    }

    /// Counts the socket-monitor events queued (`[event u16 | value u32, endpoint]`).
    fn read_monitor(&mut self) {
        for _ in 0..1024 {
            let Ok(frames) = self.monitor.recv_multipart(zmq::DONTWAIT) else {
                return;
            };
            let event = frames
                .first()
                .and_then(|f| f.get(..2))
                .map(|b| u16::from_ne_bytes([b[0], b[1]]));
            match event {
                Some(zmq_sys_event::ACCEPTED) => self.stats.accepted.inc(),
                Some(zmq_sys_event::DISCONNECTED) => self.stats.disconnects.inc(),
                _ => {}
            }
        }
    }

    fn read_requests(&mut self) {
        // Bounded batch so replies keep flowing under a flood of requests.
        for _ in 0..256 {
            let frames = match self.socket.recv_multipart(zmq::DONTWAIT) {
                Ok(f) => f,
                Err(zmq::Error::EAGAIN) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "zmq receive failed");
                    return;
                }
            };
            self.stats.received.inc();
            if frames.iter().map(Vec::len).sum::<usize>() > self.max_message_bytes {
                self.reject_oversized(&frames);
                continue;
            }
            self.dispatch(frames);
            self.flush_replies();
        }
    }

    /// Answers a request whose frames together exceed the limit with its op's failure value
    /// (a bare reply for an unknown op), without decoding its payload.
    fn reject_oversized(&mut self, frames: &[Vec<u8>]) {
        self.stats.oversized.inc();
        let slices: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let Ok(parsed) = RequestFrames::parse(&slices) else {
            self.stats.too_few_frames.inc();
            return;
        };
        let size: usize = frames.iter().map(Vec::len).sum();
        tracing::warn!(
            size,
            limit = self.max_message_bytes,
            "request larger than --max-message-bytes; answered with its failure value"
        );
        if parsed.is_control() {
            return;
        }
        let body = decode_op(parsed.op_frame)
            .ok()
            .and_then(kvtier_proto::Op::failure_reply);
        let _delivered = self.send(
            parsed.identity.to_vec(),
            parsed.uid.to_vec(),
            parsed.op_frame.to_vec(),
            body,
        );
    }

    fn dispatch(&mut self, frames: Vec<Vec<u8>>) {
        // Classify with the protocol crate's framing; the owned frames are moved afterwards.
        let op = {
            let slices: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            let parsed = match RequestFrames::parse(&slices) {
                Ok(p) => p,
                Err(e) => {
                    self.stats.too_few_frames.inc();
                    tracing::warn!(error = %e, "message too short to answer; dropped");
                    return;
                }
            };
            if parsed.is_control() {
                // Stream control ([uid, "", ack|cancel]); a control frame gets no reply, and one
                // for a stream that is not open is counted and dropped.
                self.stats.control_frames.inc();
                match parsed.stream_control() {
                    Ok(Some(ctl)) => {
                        let key = (parsed.identity.to_vec(), parsed.uid.to_vec());
                        let (socket, stats) = (&self.socket, &*self.stats);
                        self.streams.control(
                            key,
                            ctl,
                            &mut |i, u, o, b| send_reply(socket, stats, i, u, o, b),
                            stats,
                        );
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %e, "malformed stream control frame"),
                }
                return;
            }
            decode_op(parsed.op_frame)
        };
        let mut it = frames.into_iter();
        let (Some(identity), Some(uid), Some(op_frame)) = (it.next(), it.next(), it.next()) else {
            return;
        };
        let payloads: Vec<Vec<u8>> = it.collect();
        let op = match op {
            Ok(op) => op,
            Err(e) => {
                self.stats.unknown_op.inc();
                tracing::warn!(error = %e, "unknown operation; answering with an empty reply");
                let _delivered = self.send(identity, uid, op_frame, None);
                return;
            }
        };
        if op.is_stream() {
            let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let stream = if self.streams.is_full(&identity, &uid) {
                self.stats.streams_refused.inc();
                tracing::warn!(%op, "too many open streams; ending the new one at once");
                None
            } else {
                self.handler.open_stream(op, &slices)
            };
            let (socket, stats) = (&self.socket, &*self.stats);
            self.streams.open(
                (identity, uid),
                op_frame,
                stream,
                &mut |i, u, o, b| send_reply(socket, stats, i, u, o, b),
                stats,
            );
            return;
        }
        let deferred = {
            let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            self.handler.defer(op, &slices)
        };
        if let Some(mut reply) = deferred {
            if self.deferreds.is_full() {
                self.stats.deferred_full.inc();
                let body = reply.poll(true).unwrap_or(None);
                let _delivered = self.send(identity, uid, op_frame, body);
                return;
            }
            let (socket, stats) = (&self.socket, &*self.stats);
            self.deferreds.add(
                (identity, uid),
                op_frame,
                reply,
                &mut |i, u, o, b| send_reply(socket, stats, i, u, o, b),
                stats,
            );
            return;
        }
        let affinity = op.scheduling() == Scheduling::Affinity;
        let ordered_behind = affinity && self.affinity_queued.contains_key(&identity);
        if !ordered_behind && self.handler.run_inline(op, &payloads) {
            let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let body = self.handler.handle(op, &slices);
            let _delivered = self.send(identity, uid, op_frame, body);
            return;
        }
        let target = match op.scheduling() {
            Scheduling::Sync => {
                // A handler that declines to run a SYNC op inline gets it on the normal pool.
                &self.normal_tx
            }
            Scheduling::Affinity => {
                let mut h = self.hasher.build_hasher();
                h.write(&identity);
                let idx = (h.finish() % self.affinity_tx.len() as u64) as usize;
                &self.affinity_tx[idx]
            }
            Scheduling::Normal => &self.normal_tx,
        };
        if affinity {
            *self.affinity_queued.entry(identity.clone()).or_insert(0) += 1;
        }
        let job = Job {
            identity,
            uid,
            op_frame,
            op,
            payloads,
            affinity,
        };
        self.stats.in_flight.add(1);
        match target.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                self.stats.in_flight.sub(1);
                if job.affinity {
                    self.affinity_done(&job.identity);
                }
                self.stats.rejected_busy.inc();
                tracing::warn!(op = %job.op, "worker queue full; answering with the failure value");
                let _delivered =
                    self.send(job.identity, job.uid, job.op_frame, job.op.failure_reply());
            }
        }
    }
}
