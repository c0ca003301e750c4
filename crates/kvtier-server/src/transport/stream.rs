//! Streamed replies (`subscribe_kv_events`): the table of open streams the poll thread owns.
//!
//! A stream is keyed by `(identity, uid)`. It holds one credit at open (the first item goes out
//! at once) and gains one per `[uid, "", "ack"]` control frame, so a client never has more than
//! one unread item (LMCache's client drops the stream if a second arrives early). `cancel`, a
//! source that ends (replaced or closed subscription) and shutdown end it with a bare
//! `[identity, uid, op]` reply; a reply the socket refuses (client gone) closes it silently.
//! Everything here runs on the poll thread; polling never blocks, so no thread waits per
//! subscriber. Sources wake the thread through a [`StreamWaker`].

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use kvtier_proto::StreamControl;

use super::TransportStats;

/// What a stream yields when the transport asks for its next batch.
#[derive(Debug)]
pub enum StreamItem {
    /// The next reply payload.
    Item(Vec<u8>),
    /// Nothing to send yet; the stream's source calls the [`StreamWaker`] when that changes.
    Pending,
    /// The stream is over: a bare `[identity, uid, op]` reply ends it on the wire.
    End,
}

/// A streamed reply (`subscribe_kv_events`): polled on the poll thread, one item per client
/// credit, so polling must never block.
pub trait ReplyStream: Send + std::fmt::Debug {
    /// The next item, without blocking.
    fn poll_next(&mut self) -> StreamItem;
    /// The client cancelled (or went away): the next poll ends the stream.
    fn cancel(&mut self);
}

/// Wakes the poll thread so it polls its open streams again. Cheap and non-blocking (one
/// eventfd write); safe to call under any lock.
#[derive(Clone)]
pub struct StreamWaker {
    pub(super) fd: Arc<OwnedFd>,
    pub(super) dirty: Arc<AtomicBool>,
}

impl StreamWaker {
    /// Marks the streams as worth polling and wakes the poll thread; a burst of calls costs
    /// one eventfd write (the poll thread clears the mark before it polls).
    pub fn wake(&self) {
        if !self.dirty.swap(true, Relaxed) {
            super::wake(&self.fd);
        }
    }
}

impl std::fmt::Debug for StreamWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamWaker")
    }
}

/// Most streams open at once; a further stream request is ended at once and counted.
pub const MAX_STREAMS: usize = 1024;

/// Sends `[identity, uid, op(, body)]`; whether the socket took it.
pub(super) type SendReply<'a> = dyn FnMut(Vec<u8>, Vec<u8>, Vec<u8>, Option<Vec<u8>>) -> bool + 'a;

type Key = (Vec<u8>, Vec<u8>);

#[derive(Debug)]
struct OpenStream {
    op_frame: Vec<u8>,
    stream: Box<dyn ReplyStream>,
    /// The client may receive one more item (the first is granted at open, then one per ack).
    credit: bool,
}

/// The open streams.
#[derive(Debug, Default)]
pub(super) struct Streams {
    table: HashMap<Key, OpenStream>,
}

impl Streams {
    /// Whether a new stream for `(identity, uid)` would exceed [`MAX_STREAMS`].
    pub(super) fn is_full(&self, identity: &[u8], uid: &[u8]) -> bool {
        self.table.len() >= MAX_STREAMS
            && !self.table.contains_key(&(identity.to_vec(), uid.to_vec()))
    }

    /// Registers a newly opened stream (or ends the request at once when `stream` is `None`)
    /// and sends its first item.
    pub(super) fn open(
        &mut self,
        key: Key,
        op_frame: Vec<u8>,
        stream: Option<Box<dyn ReplyStream>>,
        send: &mut SendReply<'_>,
        stats: &TransportStats,
    ) {
        let Some(stream) = stream else {
            let _delivered = send(key.0, key.1, op_frame, None);
            return;
        };
        let open = OpenStream {
            op_frame,
            stream,
            credit: true,
        };
        match self.table.insert(key.clone(), open) {
            Some(mut old) => old.stream.cancel(),
            None => stats.open_streams.add(1),
        }
        self.poll(key, send, stats);
    }

    /// A control frame for an open stream (none: dropped).
    pub(super) fn control(
        &mut self,
        key: Key,
        ctl: StreamControl,
        send: &mut SendReply<'_>,
        stats: &TransportStats,
    ) {
        let Some(open) = self.table.get_mut(&key) else {
            return;
        };
        match ctl {
            StreamControl::Ack => open.credit = true,
            StreamControl::Cancel => {
                open.stream.cancel();
                open.credit = true;
            }
        }
        self.poll(key, send, stats);
    }

    /// Sends what every stream with credit has ready; ends finished streams.
    pub(super) fn poll_all(&mut self, send: &mut SendReply<'_>, stats: &TransportStats) {
        let keys: Vec<Key> = self
            .table
            .iter()
            .filter(|(_, o)| o.credit)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.poll(k, send, stats);
        }
    }

    fn poll(&mut self, key: Key, send: &mut SendReply<'_>, stats: &TransportStats) {
        let Some(open) = self.table.get_mut(&key) else {
            return;
        };
        if !open.credit {
            return;
        }
        match open.stream.poll_next() {
            StreamItem::Pending => {}
            StreamItem::Item(body) => {
                open.credit = false;
                let op_frame = open.op_frame.clone();
                stats.stream_items.inc();
                if !send(key.0.clone(), key.1.clone(), op_frame, Some(body))
                    && let Some(mut gone) = self.table.remove(&key)
                {
                    // The client is gone: close its stream.
                    gone.stream.cancel();
                    stats.open_streams.sub(1);
                }
            }
            StreamItem::End => {
                if let Some(open) = self.table.remove(&key) {
                    stats.open_streams.sub(1);
                    let _delivered = send(key.0, key.1, open.op_frame, None);
                }
            }
        }
    }

    /// Ends every stream (shutdown).
    pub(super) fn end_all(&mut self, send: &mut SendReply<'_>, stats: &TransportStats) {
        for ((identity, uid), mut open) in self.table.drain() {
            open.stream.cancel();
            stats.open_streams.sub(1);
            let _delivered = send(identity, uid, open.op_frame, None);
        }
    }
}
