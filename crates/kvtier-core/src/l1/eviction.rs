//! Eviction policies for L1.
//!
//! A policy only *orders* objects; the L1 manager decides which ones may go (it skips staging,
//! read-locked and doomed objects, so a locked head never stalls eviction) and how many bytes to
//! free. Policies are called with the L1 lock held and must do O(1) work per notification and
//! never call back into L1.

use std::fmt;
use std::str::FromStr;

/// Slot index of an object inside the L1 manager.
pub type EntryId = u32;

/// The ordering side of an eviction algorithm. A later ARC or S3-FIFO implements this too.
pub trait EvictionPolicy: Send + fmt::Debug {
    /// Name reported in the status tree (`eviction_policy`).
    fn name(&self) -> &'static str;
    /// The object became readable (it is now an eviction candidate).
    fn on_ready(&mut self, id: EntryId);
    /// The object was read (locked or released by a reader).
    fn on_access(&mut self, id: EntryId);
    /// The object left L1 (evicted, deleted, cleared or discarded).
    fn on_remove(&mut self, id: EntryId);
    /// Visits candidates in eviction order (first = evict first) until `visit` returns false.
    fn visit_candidates(&self, visit: &mut dyn FnMut(EntryId) -> bool);
}

/// Which policy to build, parsed case-insensitively from the CLI (`LRU`, `noop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum EvictionPolicyKind {
    /// Least recently used (default).
    #[serde(rename = "LRU")]
    Lru,
    /// Never evict; stores fail with out-of-memory when L1 is full.
    #[serde(rename = "noop")]
    Noop,
}

impl EvictionPolicyKind {
    /// Builds a fresh policy instance.
    pub fn build(self) -> Box<dyn EvictionPolicy> {
        match self {
            Self::Lru => Box::new(LruPolicy::default()),
            Self::Noop => Box::new(NoopPolicy),
        }
    }

    /// The canonical name (`LRU` or `noop`), as LMCache spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lru => "LRU",
            Self::Noop => "noop",
        }
    }
}

impl fmt::Display for EvictionPolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error for an unknown policy name.
#[derive(Debug, thiserror::Error)]
#[error("unknown eviction policy {0:?} (supported: LRU, noop)")]
pub struct UnknownPolicy(pub String);

impl FromStr for EvictionPolicyKind {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "lru" => Ok(Self::Lru),
            "noop" | "none" => Ok(Self::Noop),
            _ => Err(UnknownPolicy(s.to_owned())),
        }
    }
}

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
    linked: bool,
}

const UNLINKED: Link = Link {
    prev: NIL,
    next: NIL,
    linked: false,
};

/// Exact LRU as an intrusive doubly-linked list over entry ids: O(1) per notification, no
/// hashing, no allocation once the link table has grown to the number of slots.
#[derive(Debug)]
pub struct LruPolicy {
    links: Vec<Link>,
    head: u32,
    tail: u32,
    len: usize,
}

impl Default for LruPolicy {
    fn default() -> Self {
        Self {
            links: Vec::new(),
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }
}

impl LruPolicy {
    /// Number of linked candidates.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no candidate is linked.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn unlink(&mut self, id: EntryId) {
        let Some(l) = self.links.get(id as usize).copied() else {
            return;
        };
        if !l.linked {
            return;
        }
        if l.prev == NIL {
            self.head = l.next;
        } else {
            self.links[l.prev as usize].next = l.next;
        }
        if l.next == NIL {
            self.tail = l.prev;
        } else {
            self.links[l.next as usize].prev = l.prev;
        }
        self.links[id as usize] = UNLINKED;
        self.len -= 1;
    }

    fn push_back(&mut self, id: EntryId) {
        let idx = id as usize;
        if idx >= self.links.len() {
            self.links.resize(idx + 1, UNLINKED);
        }
        self.links[idx] = Link {
            prev: self.tail,
            next: NIL,
            linked: true,
        };
        if self.tail == NIL {
            self.head = id;
        } else {
            self.links[self.tail as usize].next = id;
        }
        self.tail = id;
        self.len += 1;
    }
}

impl EvictionPolicy for LruPolicy {
    fn name(&self) -> &'static str {
        "LRU"
    }

    fn on_ready(&mut self, id: EntryId) {
        self.unlink(id);
        self.push_back(id);
    }

    fn on_access(&mut self, id: EntryId) {
        if self.links.get(id as usize).is_some_and(|l| l.linked) {
            self.unlink(id);
            self.push_back(id);
        }
    }

    fn on_remove(&mut self, id: EntryId) {
        self.unlink(id);
    }

    fn visit_candidates(&self, visit: &mut dyn FnMut(EntryId) -> bool) {
        let mut cur = self.head;
        while cur != NIL {
            if !visit(cur) {
                return;
            }
            cur = self.links[cur as usize].next;
        }
    }
}

/// A policy that never proposes a victim.
#[derive(Debug, Default)]
pub struct NoopPolicy;

impl EvictionPolicy for NoopPolicy {
    fn name(&self) -> &'static str {
        "noop"
    }
    fn on_ready(&mut self, _id: EntryId) {}
    fn on_access(&mut self, _id: EntryId) {}
    fn on_remove(&mut self, _id: EntryId) {}
    fn visit_candidates(&self, _visit: &mut dyn FnMut(EntryId) -> bool) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(p: &LruPolicy) -> Vec<u32> {
        let mut v = Vec::new();
        p.visit_candidates(&mut |id| {
            v.push(id);
            true
        });
        v
    }

    #[test]
    fn lru_orders_by_recency() {
        let mut p = LruPolicy::default();
        for id in [3, 1, 7] {
            p.on_ready(id);
        }
        assert_eq!(order(&p), vec![3, 1, 7]);
        p.on_access(3);
        assert_eq!(order(&p), vec![1, 7, 3]);
        p.on_remove(7);
        assert_eq!(order(&p), vec![1, 3]);
        p.on_access(42); // unknown id: ignored
        p.on_remove(42);
        assert_eq!(order(&p), vec![1, 3]);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn policy_names_parse_case_insensitively() {
        assert_eq!(
            "lru".parse::<EvictionPolicyKind>().ok(),
            Some(EvictionPolicyKind::Lru)
        );
        assert_eq!(
            "LRU".parse::<EvictionPolicyKind>().ok(),
            Some(EvictionPolicyKind::Lru)
        );
        assert_eq!(
            "NoOp".parse::<EvictionPolicyKind>().ok(),
            Some(EvictionPolicyKind::Noop)
        );
        assert!("arc".parse::<EvictionPolicyKind>().is_err());
    }
}
