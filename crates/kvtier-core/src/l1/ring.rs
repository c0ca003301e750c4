//! S3-FIFO's main queue: a FIFO with reinsertion, kept as a ring of entry ids.
//!
//! **Why not the shared linked lists (`l1::list`).** The main queue's work is the reinsertion
//! walk in `select`: look at the head, move it to the tail while its frequency is above 0. In a
//! linked list, learning the next id means loading the current id's link first, so a walk over
//! `k` objects is a chain of `k` dependent cache misses (at 65 k objects the link table does not
//! fit in L1). In a ring the next ids are the next cells: sequential reads that the hardware
//! prefetches, and the loads of successive objects' frequency bytes do not depend on each other,
//! so they overlap. Moving the head to the tail is two sequential cell writes and one position
//! write nobody waits for.
//!
//! **Invariants** (positions are `u64` counters that only grow; a counter's cell is
//! `counter & (cap − 1)`):
//! - The cells of `[head, tail)` hold the queue, oldest first. A cell there is an id or [`HOLE`]
//!   (an id removed in place: dropped, or moved to the tail while an older object was skipped
//!   because it was locked). Cells outside `[head, tail)` mean nothing.
//! - `head` is never a hole while `head < tail` (removals at the head move it past holes).
//! - `pos[id]` is the cell of `id` while it is queued; `len` counts the queued ids.
//! - `tail − head ≤ cap`, a power of two (0 before the first push). A push into a full ring
//!   copies the queued ids in order into a new ring of at least `2 × (len + 1)` cells, so there
//!   are at least `cap / 2` pushes between two copies: amortised O(1), and holes never make
//!   the ring grow without bound.
//!
//! A walker (S3-FIFO's `select`) keeps a cursor, a position in `[head, tail]`; [`MainRing::push`]
//! and [`MainRing::reinsert`] keep it on the same object when they copy the ring.

use super::eviction::EntryId;

/// A cell that holds no id.
const HOLE: u32 = u32::MAX;
/// The smallest ring, in cells.
const MIN_CELLS: usize = 64;

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct MainRing {
    cells: Vec<u32>,
    /// Per id: its cell while queued.
    pos: Vec<u32>,
    head: u64,
    tail: u64,
    len: usize,
}

impl MainRing {
    /// Queued ids.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// A cursor at the oldest id.
    pub(crate) fn start(&self) -> u64 {
        self.head
    }

    #[inline(always)]
    fn cell(&self, at: u64) -> u32 {
        let mask = self.cells.len().wrapping_sub(1);
        self.cells.get(at as usize & mask).copied().unwrap_or(HOLE)
    }

    #[inline(always)]
    fn set_cell(&mut self, at: u64, id: u32) {
        let mask = self.cells.len().wrapping_sub(1);
        if let Some(c) = self.cells.get_mut(at as usize & mask) {
            *c = id;
        }
    }

    /// The oldest id at or after `cursor`, moving `cursor` onto it; `None` at the tail.
    #[inline(always)]
    pub(crate) fn peek(&self, cursor: &mut u64) -> Option<EntryId> {
        *cursor = (*cursor).max(self.head);
        while *cursor < self.tail {
            let id = self.cell(*cursor);
            if id != HOLE {
                return Some(id);
            }
            *cursor += 1;
        }
        None
    }

    /// Appends `id` (not queued) at the tail; `cursor` stays on its object.
    #[inline(always)]
    pub(crate) fn push(&mut self, id: EntryId, cursor: &mut u64) {
        self.append(id, cursor);
        self.len += 1;
    }

    /// Writes `id` at the tail without counting it (a push, or the second half of a
    /// reinsertion, which leaves `len` as it was).
    #[inline(always)]
    fn append(&mut self, id: EntryId, cursor: &mut u64) {
        if (self.tail - self.head) as usize >= self.cells.len() {
            self.copy(cursor);
        }
        let at = self.tail;
        self.set_cell(at, id);
        let cell = (at as usize & (self.cells.len() - 1)) as u32;
        let idx = id as usize;
        if idx >= self.pos.len() {
            grow(&mut self.pos, idx);
        }
        if let Some(p) = self.pos.get_mut(idx) {
            *p = cell;
        }
        self.tail += 1;
    }

    /// Moves the id under `cursor` (as returned by [`peek`](Self::peek)) to the tail; `cursor`
    /// moves to the next cell.
    #[inline(always)]
    pub(crate) fn reinsert(&mut self, cursor: &mut u64) {
        let at = *cursor;
        let id = self.cell(at);
        if id == HOLE || at < self.head || at >= self.tail {
            return;
        }
        if at == self.head {
            // The common case (nothing older was skipped): the ring stays dense.
            self.head += 1;
            self.skip_holes();
        } else {
            self.set_cell(at, HOLE);
        }
        // `len` is unchanged: not written at all, because a write of it here followed by
        // `push`'s read of the neighbouring `tail` measured as a store-forwarding stall (the
        // compiler reads and writes `tail` and `len` as one 16-byte word).
        *cursor = at + 1;
        self.append(id, cursor);
    }

    /// Removes a queued `id` (anywhere in the queue).
    #[inline(always)]
    pub(crate) fn remove(&mut self, id: EntryId) {
        let Some(&cell) = self.pos.get(id as usize) else {
            return;
        };
        let Some(c) = self.cells.get_mut(cell as usize) else {
            return;
        };
        if *c != id {
            return;
        }
        *c = HOLE;
        self.len -= 1;
        self.skip_holes();
    }

    /// Gives back `pos` beyond `ids` (no id at or above it is queued), and the cells when the
    /// ring is empty.
    pub(crate) fn shrink(&mut self, ids: usize) {
        self.pos.truncate(ids);
        self.pos.shrink_to_fit();
        if self.len == 0 {
            self.cells = Vec::new();
            self.head = 0;
            self.tail = 0;
        }
    }

    /// Moves `head` past holes (keeps "head is never a hole").
    #[inline(always)]
    fn skip_holes(&mut self) {
        while self.head < self.tail && self.cell(self.head) == HOLE {
            self.head += 1;
        }
    }

    /// Copies the queued ids, in order, into a new ring of at least `2 × (len + 1)` cells;
    /// `cursor` stays on its object.
    #[cold]
    #[inline(never)]
    fn copy(&mut self, cursor: &mut u64) {
        let cap = (2 * (self.len + 1)).max(MIN_CELLS).next_power_of_two();
        let mut cells = vec![HOLE; cap];
        let mut j = 0u64;
        let mut moved = None;
        for at in self.head..self.tail {
            if at == *cursor {
                moved = Some(j);
            }
            let id = self.cell(at);
            if id == HOLE {
                continue;
            }
            if let (Some(c), Some(p)) = (cells.get_mut(j as usize), self.pos.get_mut(id as usize)) {
                *c = id;
                *p = j as u32;
            }
            j += 1;
        }
        *cursor = match moved {
            Some(m) => m,
            None if *cursor < self.head => 0,
            None => j,
        };
        self.cells = cells;
        self.head = 0;
        self.tail = j;
    }
}

#[cold]
#[inline(never)]
fn grow(v: &mut Vec<u32>, idx: usize) {
    v.resize(idx + 1, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn items(r: &MainRing) -> Vec<u32> {
        let mut v = Vec::new();
        let mut c = r.start();
        while let Some(id) = r.peek(&mut c) {
            v.push(id);
            c += 1;
        }
        v
    }

    #[test]
    fn ring_is_a_fifo_with_reinsertion() {
        // Random pushes, removals and walks that skip some ids and reinsert others, against a
        // VecDeque; small sizes so the ring is copied often.
        let mut r = MainRing::default();
        let mut q: VecDeque<u32> = VecDeque::new();
        let mut x = 5u64;
        let mut next_id = 0u32;
        for step in 0..100_000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1442695040888963407);
            match (x >> 33) % 4 {
                0 | 1 if q.len() < 200 => {
                    let id = next_id % 512;
                    next_id += 1;
                    if !q.contains(&id) {
                        r.push(id, &mut 0);
                        q.push_back(id);
                    }
                }
                2 if !q.is_empty() => {
                    let i = (x >> 40) as usize % q.len();
                    let id = q.remove(i).unwrap_or_default();
                    r.remove(id);
                }
                _ => {
                    // Walk: skip ids divisible by 3, reinsert those divisible by 2, stop at
                    // the first other one (as S3-FIFO's select does with locked, hot, cold).
                    let mut c = r.start();
                    let mut i = 0;
                    let mut n = q.len();
                    while n > 0 {
                        n -= 1;
                        let Some(id) = r.peek(&mut c) else { break };
                        assert_eq!(Some(&id), q.get(i), "step {step}");
                        if id % 3 == 0 {
                            c += 1;
                            i += 1;
                        } else if id % 2 == 0 {
                            r.reinsert(&mut c);
                            let moved = q.remove(i).unwrap_or_default();
                            q.push_back(moved);
                        } else {
                            break;
                        }
                    }
                }
            }
            assert_eq!(
                items(&r),
                q.iter().copied().collect::<Vec<_>>(),
                "step {step}"
            );
            assert_eq!(r.len(), q.len());
            assert!(r.tail - r.head <= r.cells.len() as u64);
        }
    }
}
