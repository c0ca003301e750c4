//! The session table: sessions by request id, and every live session once in an ordered map
//! keyed by `(deadline, serial)`, so that expiry takes the due entries in order and eviction
//! finds the least recently used idle session without scanning (rules in the `session` module
//! docs). Only `Sessions` (`mod.rs`) uses it, under the table mutex.

use super::*;

/// A session's place in the expiry order: `(deadline, serial)`, unique per session.
pub(super) type Due = (Instant, u64);

#[derive(Debug)]
pub(super) struct Slot {
    pub(super) session: SessionRef,
    pub(super) due: Due,
}

#[derive(Debug, Default)]
pub(super) struct Table {
    pub(super) map: HashMap<Arc<str>, Slot>,
    /// Every live session exactly once, at `map[id].due`.
    pub(super) order: BTreeMap<Due, Arc<str>>,
    pub(super) next_serial: u64,
}

/// What the table decided about the first entry of its order.
pub(super) enum Verdict {
    /// Remove it: idle and not used since its recorded deadline was written.
    Remove,
    /// Place it again at this deadline.
    Requeue(Instant),
}

impl Table {
    /// Removes `id` from both maps.
    pub(super) fn remove(&mut self, id: &str) -> Option<SessionRef> {
        let slot = self.map.remove(id)?;
        self.order.remove(&slot.due);
        Some(slot.session)
    }

    /// Moves `id` (whose entry at `due` was taken out of `order`) to `deadline`.
    pub(super) fn requeue(&mut self, id: Arc<str>, due: Due, deadline: Instant) {
        let next = (deadline, due.1);
        if let Some(slot) = self.map.get_mut(&id) {
            slot.due = next;
            self.order.insert(next, id);
        }
    }

    /// Removes the least recently used idle session (see the module docs); `None` when every
    /// entry looked at was in use.
    pub(super) fn evict_lru(&mut self, ttl: Duration) -> Option<(Arc<str>, SessionRef)> {
        let mut busy: Vec<(Due, Arc<str>)> = Vec::new();
        let mut oldest_idle: Option<(Instant, Arc<str>)> = None;
        let mut victim = None;
        for _ in 0..EVICTION_SCAN {
            let Some((due, id)) = self.order.pop_first() else {
                break;
            };
            let Some(session) = self.map.get(&id).map(|s| Arc::clone(&s.session)) else {
                continue;
            };
            let Some(g) = session.try_lock() else {
                busy.push((due, id));
                continue;
            };
            let deadline = g.last_used + ttl;
            if deadline <= due.0 {
                victim = Some(id);
                break;
            }
            if oldest_idle.as_ref().is_none_or(|(t, _)| g.last_used < *t) {
                oldest_idle = Some((g.last_used, Arc::clone(&id)));
            }
            drop(g);
            self.requeue(id, due, deadline);
        }
        for (due, id) in busy {
            self.order.insert(due, id);
        }
        let id = victim.or_else(|| oldest_idle.map(|(_, id)| id))?;
        let session = self.remove(&id)?;
        Some((id, session))
    }

    /// Shrinks the map once it uses under a quarter of its capacity (the ordered map frees
    /// its nodes as entries go); whether it did.
    pub(super) fn shrink(&mut self) -> bool {
        let cap = self.map.capacity();
        let shrink = cap > MIN_TABLE_CAPACITY && self.map.len() < cap / 4;
        if shrink {
            self.map
                .shrink_to((self.map.len() * 2).max(MIN_TABLE_CAPACITY));
        }
        shrink
    }
}
