//! Deferred replies: requests answered later by the poll thread without any thread waiting for
//! them (`wait_prefetch_status`, which may wait up to a minute for an L2 prefetch).
//!
//! The handler turns such a request into a [`DeferredReply`] ([`super::Handler::defer`]); the
//! poll thread keeps it in [`Deferreds`] and polls every entry when woken by a source (the same
//! [`StreamWaker`](super::StreamWaker) streams use: an L2 prefetch completed) and the entries whose
//! deadline passed; the `zmq_poll` timeout is shortened to the earliest deadline. Polling never
//! blocks. At most [`MAX_DEFERRED`] wait at once; one more is answered at once with its current
//! state (counted in `deferred_full_total`). Shutdown answers every entry at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::TransportStats;
use super::stream::SendReply;

/// Most deferred replies held at once.
pub const MAX_DEFERRED: usize = 4096;

/// A reply the poll thread sends later. Must never block.
pub trait DeferredReply: Send + std::fmt::Debug {
    /// The reply body once there is an answer (`Some(None)`: a bare reply); `None` while
    /// waiting. With `force` it must answer now.
    fn poll(&mut self, force: bool) -> Option<Option<Vec<u8>>>;
    /// When [`poll`](Self::poll) answers at the latest.
    fn deadline(&self) -> Instant;
}

type Key = (Vec<u8>, Vec<u8>);

#[derive(Debug)]
struct Entry {
    op_frame: Vec<u8>,
    reply: Box<dyn DeferredReply>,
}

/// The waiting replies (owned by the poll thread).
#[derive(Debug, Default)]
pub(super) struct Deferreds {
    table: HashMap<Key, Entry>,
}

impl Deferreds {
    /// Whether another entry fits.
    pub(super) fn is_full(&self) -> bool {
        self.table.len() >= MAX_DEFERRED
    }

    /// Keeps `reply` (answering at once if it is ready already). A client reusing a uid that is
    /// still waiting replaces the older entry, which is answered now.
    pub(super) fn add(
        &mut self,
        key: Key,
        op_frame: Vec<u8>,
        mut reply: Box<dyn DeferredReply>,
        send: &mut SendReply<'_>,
        stats: &TransportStats,
    ) {
        if let Some(body) = reply.poll(false) {
            let _delivered = send(key.0, key.1, op_frame, body);
            return;
        }
        stats.deferred.add(1);
        if let Some(mut old) = self.table.insert(key.clone(), Entry { op_frame, reply }) {
            stats.deferred.sub(1);
            let body = old.reply.poll(true).unwrap_or(None);
            let _delivered = send(key.0, key.1, old.op_frame, body);
        }
    }

    /// Polls every entry (`all`) or only those past their deadline, sending the answers.
    pub(super) fn poll(
        &mut self,
        all: bool,
        force: bool,
        send: &mut SendReply<'_>,
        stats: &TransportStats,
    ) {
        if self.table.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut ready = Vec::new();
        for (key, e) in &mut self.table {
            if !(all || force || e.reply.deadline() <= now) {
                continue;
            }
            if let Some(body) = e.reply.poll(force) {
                ready.push((key.clone(), body));
            }
        }
        for (key, body) in ready {
            if let Some(e) = self.table.remove(&key) {
                stats.deferred.sub(1);
                let _delivered = send(key.0, key.1, e.op_frame, body);
            }
        }
    }

    /// Time until the earliest deadline (`None` when nothing waits).
    pub(super) fn next_timeout(&self, now: Instant) -> Option<Duration> {
        self.table
            .values()
            .map(|e| e.reply.deadline().saturating_duration_since(now))
            .min()
    }
}
