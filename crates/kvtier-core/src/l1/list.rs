//! Intrusive doubly-linked lists over entry ids, several lists sharing one link table.
//!
//! Invariants: an id is in at most one list at a time; `ends[l].len` is the number of ids linked
//! into list `l`; every operation is O(1) (growing the link table to a new id is amortised O(1)).
//! Used by every eviction policy (LRU: one list; ARC: T1/T2; S3-FIFO: small/main; IsolatedLRU:
//! one list per tenant) and by the L1 manager's per-tenant recency lists. No locking of its own:
//! its owner holds the L1 lock.

use super::eviction::EntryId;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
    /// The list holding the id, or `NIL` when unlinked.
    list: u32,
}

const UNLINKED: Link = Link {
    prev: NIL,
    next: NIL,
    list: NIL,
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

    /// The list `id` is in, if any.
    pub(crate) fn list_of(&self, id: EntryId) -> Option<u32> {
        self.links
            .get(id as usize)
            .map(|l| l.list)
            .filter(|&l| l != NIL)
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
            .filter(|&n| n != NIL)
    }

    /// Removes `id` from its list; returns the list it was in.
    pub(crate) fn unlink(&mut self, id: EntryId) -> Option<u32> {
        let l = *self.links.get(id as usize)?;
        if l.list == NIL {
            return None;
        }
        let ends = &mut self.ends[l.list as usize];
        if l.prev == NIL {
            ends.head = l.next;
        } else {
            self.links[l.prev as usize].next = l.next;
        }
        let ends = &mut self.ends[l.list as usize];
        if l.next == NIL {
            ends.tail = l.prev;
        } else {
            self.links[l.next as usize].prev = l.prev;
        }
        self.ends[l.list as usize].len -= 1;
        self.links[id as usize] = UNLINKED;
        Some(l.list)
    }

    /// Appends `id` (newest end) to `list`, unlinking it from wherever it was.
    pub(crate) fn push_back(&mut self, list: u32, id: EntryId) {
        self.unlink(id);
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
            list,
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

    /// Gives back the links of ids at or above `ids`, none of which may be linked.
    pub(crate) fn shrink(&mut self, ids: usize) {
        if ids < self.links.len() {
            debug_assert!(self.links[ids..].iter().all(|l| l.list == NIL));
            self.links.truncate(ids);
        }
        self.links.shrink_to_fit();
    }

    /// Moves a linked `id` to the newest end of its own list (no-op when unlinked).
    pub(crate) fn touch(&mut self, id: EntryId) {
        if let Some(list) = self.list_of(id) {
            self.push_back(list, id);
        }
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
        l.touch(5);
        assert_eq!(items(&l, 0), vec![1, 9, 5]);
        l.push_back(1, 9);
        assert_eq!(items(&l, 0), vec![1, 5]);
        assert_eq!(items(&l, 1), vec![3, 9]);
        assert_eq!(l.unlink(3), Some(1));
        assert_eq!(l.unlink(3), None);
        assert_eq!((l.len(0), l.len(1)), (2, 1));
        l.push_back(4, 7);
        assert_eq!(l.list_of(7), Some(4));
        assert_eq!(l.len(3), 0);
    }
}
