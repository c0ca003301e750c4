//! The subscriber side of the log: opening a `subscribe_kv_events` stream (one per engine
//! instance; a new one closes the previous), reading batches after a cursor for one model
//! ([`Subscription::poll`]), the heartbeat that keeps a stream alive and the reaping of the
//! silent ones, and closing streams when an instance goes or the server stops. Cursor and loss
//! rules are in the `kv_events` module docs.

use super::*;

impl KvEvents {
    /// Opens the subscription of `instance_id` (closing its previous one).
    pub fn subscribe(
        self: &Arc<Self>,
        instance_id: i64,
        model_name: String,
        cursor: u64,
        max_events: usize,
        now: Instant,
    ) -> Subscription {
        let closed = Arc::new(AtomicBool::new(false));
        let id = {
            let mut s = self.state.lock();
            s.next_sub += 1;
            let id = s.next_sub;
            let old = s.subscriptions.insert(
                instance_id,
                SubEntry {
                    id,
                    closed: Arc::clone(&closed),
                    last_seen: now,
                },
            );
            if let Some(old) = old {
                old.closed.store(true, Relaxed);
            }
            id
        };
        self.counters.subscriptions_total.inc();
        self.wake();
        Subscription {
            events: Arc::clone(self),
            id,
            instance_id,
            model_name,
            cursor,
            max_events: max_events.max(1),
            first: true,
            closed,
        }
    }

    /// `ping(instance_id)`: keeps the instance's subscription alive.
    pub fn touch(&self, instance_id: i64, now: Instant) {
        if let Some(sub) = self.state.lock().subscriptions.get_mut(&instance_id) {
            sub.last_seen = sub.last_seen.max(now);
        }
    }

    /// Closes the subscription of an instance that was unregistered or reaped.
    pub fn close_instance(&self, instance_id: i64) {
        let removed = self.state.lock().subscriptions.remove(&instance_id);
        if let Some(sub) = removed {
            sub.closed.store(true, Relaxed);
            self.wake();
        }
    }

    /// Closes subscriptions silent (no ping) for longer than `timeout` (0 disables).
    pub fn reap(&self, now: Instant, timeout: Duration) {
        if timeout.is_zero() {
            return;
        }
        let mut closed = false;
        self.state.lock().subscriptions.retain(|_, sub| {
            let keep = now.saturating_duration_since(sub.last_seen) <= timeout;
            if !keep {
                sub.closed.store(true, Relaxed);
                closed = true;
            }
            keep
        });
        if closed {
            self.wake();
        }
    }

    /// Closes every subscription (shutdown).
    pub fn close_all(&self) {
        for (_, sub) in self.state.lock().subscriptions.drain() {
            sub.closed.store(true, Relaxed);
        }
        self.wake();
    }

    /// Up to `max` records of `model` after `cursor`, and the next cursor (LMCache's
    /// `read_kv_events`).
    pub(super) fn read(&self, model: &str, cursor: u64, max: usize) -> KvEventBatch {
        if !self.enabled() {
            return KvEventBatch {
                enabled: false,
                incarnation: self.incarnation,
                next_cursor: 0,
                lost: false,
                events: Vec::new(),
            };
        }
        let s = self.state.lock();
        let last = s.next_seq - 1;
        let first = s.log.front().map_or(last + 1, |r| r.seq);
        let lost = cursor + 1 < first || cursor > last;
        let mut next_cursor = cursor.min(last);
        let skip = usize::try_from((cursor + 1).saturating_sub(first)).unwrap_or(usize::MAX);
        let mut events = Vec::new();
        for r in s.log.iter().skip(skip) {
            next_cursor = r.seq;
            if r.medium == MEDIUM_CPU && &*r.model_name == model {
                events.push(r.clone());
                if events.len() == max {
                    break;
                }
            }
        }
        drop(s);
        if lost {
            self.counters.lost_batches_total.inc();
        }
        KvEventBatch {
            enabled: true,
            incarnation: self.incarnation,
            next_cursor,
            lost,
            events,
        }
    }

    /// Up to `max` records of every model and medium after `cursor` (the publisher's read):
    /// the records, whether records after `cursor` fell off the log (or `cursor` lies ahead of
    /// it), and the cursor to resume from.
    pub fn read_all(&self, cursor: u64, max: usize) -> (Vec<KvEventRecord>, bool, u64) {
        let s = self.state.lock();
        let last = s.next_seq - 1;
        let first = s.log.front().map_or(last + 1, |r| r.seq);
        let lost = cursor + 1 < first || cursor > last;
        let skip = usize::try_from((cursor + 1).saturating_sub(first)).unwrap_or(usize::MAX);
        let records: Vec<KvEventRecord> = s.log.iter().skip(skip).take(max).cloned().collect();
        let next = records.last().map_or(cursor.min(last), |r| r.seq);
        (records, lost, next)
    }

    pub(super) fn cancel(&self, instance_id: i64, id: u64) {
        let mut s = self.state.lock();
        if s.subscriptions
            .get(&instance_id)
            .is_some_and(|e| e.id == id)
        {
            s.subscriptions.remove(&instance_id);
        }
    }
}

/// What a stream poll yields.
#[derive(Debug)]
pub enum StreamPoll<T> {
    /// The next batch.
    Item(T),
    /// Nothing to send now; the transport is woken when that changes.
    Pending,
    /// The stream is over (cancelled, replaced, closed, or events disabled).
    End,
}

/// One open `subscribe_kv_events` stream.
#[derive(Debug)]
pub struct Subscription {
    events: Arc<KvEvents>,
    id: u64,
    instance_id: i64,
    model_name: String,
    cursor: u64,
    max_events: usize,
    first: bool,
    closed: Arc<AtomicBool>,
}

impl Subscription {
    /// The next batch, never blocking: the first poll always yields the status batch; later
    /// ones yield a batch when there are records for this model, a loss, or events are off.
    pub fn poll(&mut self) -> StreamPoll<KvEventBatch> {
        if self.closed.load(Relaxed) {
            return StreamPoll::End;
        }
        let batch = self
            .events
            .read(&self.model_name, self.cursor, self.max_events);
        self.cursor = batch.next_cursor;
        if !self.first && !batch.enabled {
            return StreamPoll::End;
        }
        if self.first || !batch.events.is_empty() || batch.lost || !batch.enabled {
            self.first = false;
            self.events.counters.batches_total.inc();
            return StreamPoll::Item(batch);
        }
        StreamPoll::Pending
    }

    /// Cancels the stream (client `cancel` or disconnect).
    pub fn cancel(&mut self) {
        self.closed.store(true, Relaxed);
        self.events.cancel(self.instance_id, self.id);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cancel();
    }
}
