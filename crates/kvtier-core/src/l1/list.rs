//! Intrusive doubly-linked lists over entry ids, several lists sharing one link table.
//!
//! A link is 8 bytes (`prev`, `next`) per id: the list an id is in is not stored, the caller
//! names it in [`Lists::unlink`] and [`Lists::touch`] (every user knows it: the list is fixed,
//! the entry's tenant, or a flag the policy keeps anyway), which saves a third of the table
//! (issue 18: per-object memory).
//!
//! Invariants: an id is in at most one list at a time; `ends[l].len` is the number of ids linked
//! into list `l`; the caller names the list an id is in (a wrong list is detected when the id
//! is at an end of it and then changes nothing; in the middle it would miscount `len`); every
//! operation is O(1) (growing the link table to a new id is amortised O(1)). Ids and list
//! indexes stay below `u32::MAX - 1` (the two markers). Used by every eviction policy (LRU: one
//! list; ARC: T1/T2; S3-FIFO: small; IsolatedLRU: one list per tenant) and by the L1 manager's
//! per-tenant recency lists. No locking of its own: its owner holds the L1 lock.

use super::eviction::EntryId;

/// No neighbour (an end of a list), or an empty list's head and tail.
const NIL: u32 = u32::MAX;
/// `prev` and `next` of an id that is in no list.
const OUT: u32 = u32::MAX - 1;

#[derive(Debug, Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
}

const UNLINKED: Link = Link {
    prev: OUT,
    next: OUT,
};

#[derive(Debug, Clone, Copy)]
struct Ends {
    head: u32,
    tail: u32,
    len: usize,
}

const EMPTY: Ends = Ends {
    head: NIL,
    tail: NIL,
    len: 0,
};

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Lists {
    links: Vec<Link>,
    ends: Vec<Ends>,
}

impl Lists {
    /// `n` empty lists (more appear on demand when an id is pushed to a higher list index).
    pub(crate) fn new(n: usize) -> Self {
        Self {
            links: Vec::new(),
            ends: vec![EMPTY; n],
        }
    }

    /// Whether `id` is in a list.
    pub(crate) fn is_linked(&self, id: EntryId) -> bool {
        self.links.get(id as usize).is_some_and(|l| l.prev != OUT)
    }

    /// Number of ids in `list`.
    pub(crate) fn len(&self, list: u32) -> usize {
        self.ends.get(list as usize).map_or(0, |e| e.len)
    }

    /// Oldest id of `list`.
    pub(crate) fn head(&self, list: u32) -> Option<EntryId> {
        self.ends
            .get(list as usize)
            .map(|e| e.head)
            .filter(|&h| h != NIL)
    }

    /// The id after `id` in its list.
    pub(crate) fn next(&self, id: EntryId) -> Option<EntryId> {
        self.links
            .get(id as usize)
            .map(|l| l.next)
            .filter(|&n| n != NIL && n != OUT)
    }

    /// Removes `id` from `list`, the list it is in; whether it was linked.
    pub(crate) fn unlink(&mut self, list: u32, id: EntryId) -> bool {
        let Some(&l) = self.links.get(id as usize) else {
            return false;
        };
        if l.prev == OUT {
            return false;
        }
        let Some(&ends) = self.ends.get(list as usize) else {
            debug_assert!(
                false,
                "id {id} unlinked from list {list}, which does not exist"
            );
            return false;
        };
        if (l.prev == NIL && ends.head != id) || (l.next == NIL && ends.tail != id) {
            debug_assert!(false, "id {id} is not in list {list}");
            return false;
        }
        if l.prev == NIL {
            self.ends[list as usize].head = l.next;
        } else {
            self.links[l.prev as usize].next = l.next;
        }
        if l.next == NIL {
            self.ends[list as usize].tail = l.prev;
        } else {
            self.links[l.next as usize].prev = l.prev;
        }
        let e = &mut self.ends[list as usize];
        e.len = e.len.saturating_sub(1);
        self.links[id as usize] = UNLINKED;
        true
    }

    /// Appends `id`, which must be in no list, to the newest end of `list`.
    pub(crate) fn push_back(&mut self, list: u32, id: EntryId) {
        if id >= OUT || list >= OUT || self.is_linked(id) {
            debug_assert!(false, "push_back of a linked or out-of-range id {id}");
            return;
        }
        let idx = id as usize;
        if idx >= self.links.len() {
            self.links.resize(idx + 1, UNLINKED);
        }
        if list as usize >= self.ends.len() {
            self.ends.resize(list as usize + 1, EMPTY);
        }
        let ends = &mut self.ends[list as usize];
        self.links[idx] = Link {
            prev: ends.tail,
            next: NIL,
        };
        if ends.tail == NIL {
            ends.head = id;
        } else {
            let tail = ends.tail as usize;
            self.links[tail].next = id;
        }
        let ends = &mut self.ends[list as usize];
        ends.tail = id;
        ends.len += 1;
    }

    /// Moves `id`, linked into `list`, to the newest end of it (no-op when unlinked).
    pub(crate) fn touch(&mut self, list: u32, id: EntryId) {
        if self.unlink(list, id) {
            self.push_back(list, id);
        }
    }

    /// Gives back the links of ids at or above `ids`, none of which may be linked.
    pub(crate) fn shrink(&mut self, ids: usize) {
        if ids < self.links.len() {
            debug_assert!(self.links[ids..].iter().all(|l| l.prev == OUT));
            self.links.truncate(ids);
        }
        self.links.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(l: &Lists, list: u32) -> Vec<u32> {
        let mut v = Vec::new();
        let mut cur = l.head(list);
        while let Some(id) = cur {
            v.push(id);
            cur = l.next(id);
        }
        v
    }

    #[test]
    fn lists_keep_order_and_membership() {
        let mut l = Lists::new(2);
        for id in [5, 1, 9] {
            l.push_back(0, id);
        }
        l.push_back(1, 3);
        assert_eq!(items(&l, 0), vec![5, 1, 9]);
        l.touch(0, 5);
        assert_eq!(items(&l, 0), vec![1, 9, 5]);
        assert!(l.unlink(0, 9));
        l.push_back(1, 9);
        assert_eq!(items(&l, 0), vec![1, 5]);
        assert_eq!(items(&l, 1), vec![3, 9]);
        assert!(l.unlink(1, 3));
        assert!(!l.unlink(1, 3));
        assert!(!l.is_linked(3));
        assert_eq!((l.len(0), l.len(1)), (2, 1));
        l.push_back(4, 7);
        assert!(l.is_linked(7));
        assert_eq!(items(&l, 4), vec![7]);
        assert_eq!(l.len(3), 0);
        l.touch(0, 42); // unknown id: ignored
        assert!(l.unlink(4, 7));
        assert!(l.unlink(0, 1) && l.unlink(0, 5) && l.unlink(1, 9));
        l.shrink(0);
        assert!(l.links.is_empty());
        assert_eq!((l.len(0), l.len(1), l.head(0)), (0, 0, None));
    }
}
