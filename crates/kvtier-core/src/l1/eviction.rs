//! Eviction policies for L1: LRU, ARC, S3-FIFO, IsolatedLRU and noop.
//!
//! A policy only *orders* objects; the L1 manager decides which ones may go and how many bytes
//! to free. Rules every policy keeps:
//! - **The manager has the last word.** [`EvictionPolicy::select`] proposes ids in eviction order
//!   and the manager answers each with a [`Verdict`]: staging, read-locked and doomed objects are
//!   `Skip`ped (they stay where they are, so a locked head never stalls eviction), evictable ones
//!   are `Evict`ed (the manager removes them right after `select` returns and reports each with
//!   [`Removal::Evicted`]), and `Stop` ends the round once enough bytes are planned.
//! - **O(1) per notification, no allocation on the hit path** once the per-id tables have grown;
//!   `select` costs O(victims + skipped + reordered) — S3-FIFO's reinsertions are bounded by the
//!   3-bit frequency, so a round is at most `4 × resident + 8` steps. Nothing walks every object.
//! - **Called with the L1 lock held**; a policy never calls back into L1 and has no lock of its
//!   own, so there is no lock order to get wrong.
//! - Ghost entries (ARC's B1/B2, S3-FIFO's G) remember *fingerprints* of evicted keys
//!   ([`EntryMeta::fingerprint`]), never entry ids, because ids are reused; each ghost list is
//!   a window of its last `resident` pushes (see `l1::ghost` for the table and its
//!   approximations). A policy keeps no copy of the fingerprint: the manager passes the
//!   object's [`EntryMeta`] to `on_ready` and again to `on_remove`.
//!
//! Sizes: kvtier's objects are chunks of one size per model, so the adaptive targets (ARC's `p`,
//! S3-FIFO's 10 % small queue) are kept in objects; the manager still evicts in bytes.

use std::fmt;
use std::str::FromStr;

use super::ghost::{GhostList, GhostPair, ghost_key};
use super::list::Lists;
use super::ring::MainRing;

/// Slot index of an object inside the L1 manager.
pub type EntryId = u32;

/// Index of a tenant (one `cache_salt`) inside the L1 manager.
pub type TenantId = u32;

/// What a policy learns about an object when it becomes readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    /// The object's tenant (its `cache_salt`).
    pub tenant: TenantId,
    /// A stable 64-bit hash of the object's key (ghost lists remember keys by it).
    pub fingerprint: u64,
}

/// The manager's answer to a proposed victim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Evict it (removed after `select` returns, reported as [`Removal::Evicted`]).
    Evict,
    /// Not evictable now (locked, staging, doomed); leave it in place and go on.
    Skip,
    /// Enough bytes are planned; end the round.
    Stop,
}

/// Why an object left L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Chosen as an eviction victim (ghost lists remember it).
    Evicted,
    /// Deleted, cleared, discarded or freed after its last reader (not remembered).
    Dropped,
}

/// The ordering side of an eviction algorithm.
pub trait EvictionPolicy: Send + fmt::Debug {
    /// Name reported in the status tree (`eviction_policy`), as LMCache spells it.
    fn name(&self) -> &'static str;
    /// The object became readable (it is now an eviction candidate).
    fn on_ready(&mut self, id: EntryId, meta: EntryMeta);
    /// The object, of `tenant`, was read (locked or released by a reader).
    fn on_access(&mut self, id: EntryId, tenant: TenantId);
    /// The object left L1. `meta` is what [`on_ready`](Self::on_ready) was given (its
    /// fingerprint is 0 for an object that never became readable).
    fn on_remove(&mut self, id: EntryId, meta: EntryMeta, why: Removal);
    /// Proposes candidates in eviction order until `visit` says [`Verdict::Stop`] or none are
    /// left. `tenants` is the order in which to drain tenants; only isolated policies (see
    /// [`isolated`](Self::isolated)) use it, and the manager passes an empty slice to the others.
    fn select(&mut self, tenants: &[TenantId], visit: &mut dyn FnMut(EntryId) -> Verdict);
    /// Whether global eviction drains tenants one at a time in the manager's tenant order.
    fn isolated(&self) -> bool {
        false
    }
    /// No id at or above `ids` is an object any more (the manager dropped those slots at the
    /// end of a `clear`): give back the per-id arrays beyond it.
    fn shrink(&mut self, ids: usize) {
        let _ = ids;
    }
}

/// Which policy to build, parsed case-insensitively from the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum EvictionPolicyKind {
    /// Least recently used (default).
    #[serde(rename = "LRU")]
    Lru,
    /// Adaptive replacement cache: recency and frequency lists with ghost-driven balance.
    #[serde(rename = "ARC")]
    Arc,
    /// One LRU list per `cache_salt`; global eviction drains tenants over quota first.
    #[serde(rename = "IsolatedLRU")]
    IsolatedLru,
    /// S3-FIFO: small probationary FIFO, main FIFO with reinsertion, ghost FIFO (scan-resistant).
    #[serde(rename = "S3FIFO")]
    S3Fifo,
    /// Never evict; stores fail with out-of-memory when L1 is full.
    #[serde(rename = "noop")]
    Noop,
}

impl EvictionPolicyKind {
    /// Every policy, in documentation order.
    pub const ALL: [Self; 5] = [
        Self::Lru,
        Self::Arc,
        Self::IsolatedLru,
        Self::S3Fifo,
        Self::Noop,
    ];

    /// Builds a fresh policy instance.
    pub fn build(self) -> Box<dyn EvictionPolicy> {
        match self {
            Self::Lru => Box::new(LruPolicy::default()),
            Self::Arc => Box::new(ArcPolicy::default()),
            Self::IsolatedLru => Box::new(IsolatedLruPolicy::default()),
            Self::S3Fifo => Box::new(S3FifoPolicy::default()),
            Self::Noop => Box::new(NoopPolicy),
        }
    }

    /// The canonical name, as LMCache spells it (`S3FIFO` is kvtier's own).
    pub fn name(self) -> &'static str {
        match self {
            Self::Lru => "LRU",
            Self::Arc => "ARC",
            Self::IsolatedLru => "IsolatedLRU",
            Self::S3Fifo => "S3FIFO",
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
#[error("unknown eviction policy {0:?} (supported: LRU, ARC, IsolatedLRU, S3FIFO, noop)")]
pub struct UnknownPolicy(pub String);

impl FromStr for EvictionPolicyKind {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "lru" => Ok(Self::Lru),
            "arc" => Ok(Self::Arc),
            "isolatedlru" => Ok(Self::IsolatedLru),
            "s3fifo" => Ok(Self::S3Fifo),
            "noop" | "none" => Ok(Self::Noop),
            _ => Err(UnknownPolicy(s.to_owned())),
        }
    }
}

/// Walks one list from its head, asking `visit` about each id. Returns false on `Stop`.
fn walk(lists: &Lists, list: u32, visit: &mut dyn FnMut(EntryId) -> Verdict) -> bool {
    let mut cur = lists.head(list);
    while let Some(id) = cur {
        // The manager removes victims only after `select`, so `next` stays valid.
        cur = lists.next(id);
        if visit(id) == Verdict::Stop {
            return false;
        }
    }
    true
}

/// Exact LRU as an intrusive doubly-linked list over entry ids.
#[derive(Debug)]
pub struct LruPolicy {
    lists: Lists,
}

impl Default for LruPolicy {
    fn default() -> Self {
        Self {
            lists: Lists::new(1),
        }
    }
}

impl LruPolicy {
    /// Number of linked candidates.
    pub fn len(&self) -> usize {
        self.lists.len(0)
    }

    /// Whether no candidate is linked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl EvictionPolicy for LruPolicy {
    fn name(&self) -> &'static str {
        "LRU"
    }

    fn on_ready(&mut self, id: EntryId, _meta: EntryMeta) {
        self.lists.push_back(0, id);
    }

    fn on_access(&mut self, id: EntryId, _tenant: TenantId) {
        self.lists.touch(0, id);
    }

    fn on_remove(&mut self, id: EntryId, _meta: EntryMeta, _why: Removal) {
        self.lists.unlink(0, id);
    }

    fn select(&mut self, _tenants: &[TenantId], visit: &mut dyn FnMut(EntryId) -> Verdict) {
        walk(&self.lists, 0, visit);
    }

    fn shrink(&mut self, ids: usize) {
        self.lists.shrink(ids);
    }
}

/// One LRU list per tenant (LMCache's IsolatedLRU). Global eviction drains the tenants in the
/// order the manager gives (over quota first, see `l1::tenants`), each in LRU order.
#[derive(Debug, Default)]
pub struct IsolatedLruPolicy {
    lists: Lists,
}

impl EvictionPolicy for IsolatedLruPolicy {
    fn name(&self) -> &'static str {
        "IsolatedLRU"
    }

    fn on_ready(&mut self, id: EntryId, meta: EntryMeta) {
        self.lists.push_back(meta.tenant, id);
    }

    fn on_access(&mut self, id: EntryId, tenant: TenantId) {
        self.lists.touch(tenant, id);
    }

    fn on_remove(&mut self, id: EntryId, meta: EntryMeta, _why: Removal) {
        self.lists.unlink(meta.tenant, id);
    }

    fn select(&mut self, tenants: &[TenantId], visit: &mut dyn FnMut(EntryId) -> Verdict) {
        for &t in tenants {
            if !walk(&self.lists, t, visit) {
                return;
            }
        }
    }

    fn isolated(&self) -> bool {
        true
    }

    fn shrink(&mut self, ids: usize) {
        self.lists.shrink(ids);
    }
}

const T1: u32 = 0;
const T2: u32 = 1;

/// ARC (Megiddo & Modha, FAST '03) over objects: T1 holds objects seen once, T2 objects seen
/// again; B1/B2 remember what was evicted from each. A new object whose key is in B1 grows the
/// recency target `p`, one in B2 shrinks it, and it enters T2; otherwise it enters T1. Victims
/// come from T1 while its (remaining) length exceeds `p`, else from T2, each in LRU order.
/// Ghost lists are each bounded by the resident object count.
#[derive(Debug)]
pub struct ArcPolicy {
    lists: Lists,
    /// One bit per id: it is in T2 (the lists do not record which list an id is in).
    in_t2: Vec<u64>,
    /// B1 (list 0) and B2 (list 1), whose buckets for one key share a cache line.
    ghosts: GhostPair,
    p: usize,
}

impl Default for ArcPolicy {
    fn default() -> Self {
        Self {
            lists: Lists::new(2),
            in_t2: Vec::new(),
            ghosts: GhostPair::default(),
            p: 0,
        }
    }
}

impl ArcPolicy {
    /// The current recency target in objects (tests, status).
    pub fn target(&self) -> usize {
        self.p
    }

    fn resident(&self) -> usize {
        self.lists.len(T1) + self.lists.len(T2)
    }

    /// The list a linked `id` is in.
    fn list_of(&self, id: EntryId) -> u32 {
        let bit = self
            .in_t2
            .get(id as usize / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0);
        if bit { T2 } else { T1 }
    }

    fn set_list(&mut self, id: EntryId, list: u32) {
        let word = id as usize / 64;
        if list == T2 {
            if word >= self.in_t2.len() {
                grow(&mut self.in_t2, word);
            }
            if let Some(w) = self.in_t2.get_mut(word) {
                *w |= 1 << (id % 64);
            }
        } else if let Some(w) = self.in_t2.get_mut(word) {
            *w &= !(1 << (id % 64));
        }
    }
}

impl EvictionPolicy for ArcPolicy {
    fn shrink(&mut self, ids: usize) {
        self.lists.shrink(ids);
        self.in_t2.truncate(ids.div_ceil(64));
        self.in_t2.shrink_to_fit();
    }

    fn name(&self) -> &'static str {
        "ARC"
    }

    fn on_ready(&mut self, id: EntryId, meta: EntryMeta) {
        let fp = ghost_key(meta.fingerprint);
        // The ghost lengths in the `p` updates are those before the hit was taken out.
        let list = match self.ghosts.take(fp) {
            Some(0) => {
                let (l1, l2) = (self.ghosts.len(0) + 1, self.ghosts.len(1).max(1));
                self.p = (self.p + (l2 / l1).max(1)).min(self.resident() + 1);
                T2
            }
            Some(_) => {
                let (l1, l2) = (self.ghosts.len(0).max(1), self.ghosts.len(1) + 1);
                self.p = self.p.saturating_sub((l1 / l2).max(1));
                T2
            }
            None => T1,
        };
        self.lists.push_back(list, id);
        // An unlinked id's bit is clear (`on_remove` clears it), so only T2 sets it.
        if list == T2 {
            self.set_list(id, T2);
        }
    }

    fn on_access(&mut self, id: EntryId, _tenant: TenantId) {
        if self.list_of(id) == T2 {
            self.lists.touch(T2, id);
        } else if self.lists.unlink(T1, id) {
            self.lists.push_back(T2, id);
            self.set_list(id, T2);
        }
    }

    fn on_remove(&mut self, id: EntryId, meta: EntryMeta, why: Removal) {
        let list = self.list_of(id);
        if !self.lists.unlink(list, id) {
            return;
        }
        if list == T2 {
            self.set_list(id, T1);
        }
        if why == Removal::Evicted {
            let fp = ghost_key(meta.fingerprint);
            let bound = self.resident();
            self.ghosts.push(usize::from(list != T1), fp, bound);
        }
    }

    fn select(&mut self, _tenants: &[TenantId], visit: &mut dyn FnMut(EntryId) -> Verdict) {
        // T1 while its remaining length exceeds `p` (or T2 is empty); then T2, whose walk does
        // not change T1's length; then the rest of T1.
        let mut t1_left = self.lists.len(T1);
        let mut c1 = self.lists.head(T1);
        let t2_empty = self.lists.head(T2).is_none();
        while let Some(id) = c1 {
            if t1_left <= self.p && !t2_empty {
                break;
            }
            c1 = self.lists.next(id);
            match visit(id) {
                Verdict::Stop => return,
                Verdict::Evict => t1_left -= 1,
                Verdict::Skip => {}
            }
        }
        if walk(&self.lists, T2, visit) {
            while let Some(id) = c1 {
                c1 = self.lists.next(id);
                if visit(id) == Verdict::Stop {
                    return;
                }
            }
        }
    }
}

/// Stores `value` at `id`, growing `v` with zeros first when needed.
#[inline(always)]
fn set_grow<T: Copy + Default>(v: &mut Vec<T>, id: EntryId, value: T) {
    let idx = id as usize;
    if idx >= v.len() {
        grow(v, idx);
    }
    if let Some(slot) = v.get_mut(idx) {
        *slot = value;
    }
}

#[cold]
#[inline(never)]
fn grow<T: Copy + Default>(v: &mut Vec<T>, idx: usize) {
    v.resize(idx + 1, T::default());
}

const SMALL: u32 = 0;
/// Highest frequency S3-FIFO counts (2 bits).
const MAX_FREQ: u8 = 3;
/// Flag in an object's frequency byte: it is in SMALL or MAIN (so `on_access` need not look at
/// the queues).
const LINKED: u8 = 0x80;
/// Flag in an object's frequency byte: it is in MAIN.
const IN_MAIN: u8 = 0x40;

/// S3-FIFO (Yang et al., SOSP '23): new objects enter a small FIFO (about 10 % of the resident
/// objects); an object read at least twice while there (one engine read = lock + release = two
/// accesses) moves to the main FIFO when it reaches the head, others are evicted and remembered
/// in a ghost FIFO; a new object whose key is a ghost enters main directly. Main is a FIFO with
/// reinsertion: a head with frequency > 0 is reinserted with frequency − 1. One-off scans
/// therefore pass through the small queue without touching main.
///
/// The small queue is a linked list (`l1::list`); main, where `select` walks, is a ring of ids
/// (`l1::ring`, same order, no pointer chasing).
#[derive(Debug)]
pub struct S3FifoPolicy {
    /// The small queue (list [`SMALL`]).
    lists: Lists,
    main: MainRing,
    /// Per id: the frequency (low 2 bits), [`LINKED`] and [`IN_MAIN`].
    freq: Vec<u8>,
    ghost: GhostList<false>,
}

impl Default for S3FifoPolicy {
    fn default() -> Self {
        Self {
            lists: Lists::new(1),
            main: MainRing::default(),
            freq: Vec::new(),
            ghost: GhostList::default(),
        }
    }
}

impl S3FifoPolicy {
    fn resident(&self) -> usize {
        self.lists.len(SMALL) + self.main.len()
    }

    /// Whether `id` is in the main queue (tests).
    #[cfg(test)]
    fn in_main(&self, id: EntryId) -> bool {
        self.freq.get(id as usize).is_some_and(|f| f & IN_MAIN != 0)
    }
}

impl EvictionPolicy for S3FifoPolicy {
    fn shrink(&mut self, ids: usize) {
        self.lists.shrink(ids);
        self.main.shrink(ids);
        self.freq.truncate(ids);
        self.freq.shrink_to_fit();
    }

    fn name(&self) -> &'static str {
        "S3FIFO"
    }

    fn on_ready(&mut self, id: EntryId, meta: EntryMeta) {
        let fp = ghost_key(meta.fingerprint);
        if self.ghost.take(fp) {
            set_grow(&mut self.freq, id, LINKED | IN_MAIN);
            self.main.push(id, &mut 0);
        } else {
            set_grow(&mut self.freq, id, LINKED);
            self.lists.push_back(SMALL, id);
        }
    }

    fn on_access(&mut self, id: EntryId, _tenant: TenantId) {
        if let Some(f) = self.freq.get_mut(id as usize)
            && *f & LINKED != 0
        {
            *f += u8::from(*f & MAX_FREQ != MAX_FREQ);
        }
    }

    fn on_remove(&mut self, id: EntryId, meta: EntryMeta, why: Removal) {
        let Some(f) = self.freq.get_mut(id as usize) else {
            return;
        };
        let was = std::mem::take(f);
        if was & IN_MAIN != 0 {
            self.main.remove(id);
        } else if self.lists.unlink(SMALL, id) && why == Removal::Evicted {
            self.ghost
                .push(ghost_key(meta.fingerprint), self.resident());
        }
    }

    fn select(&mut self, _tenants: &[TenantId], visit: &mut dyn FnMut(EntryId) -> Verdict) {
        let resident = self.resident();
        let small_target = resident / 10;
        let mut small_left = self.lists.len(SMALL);
        let mut cs = self.lists.head(SMALL);
        let mut cm = self.main.start();
        let mut budget = 4 * resident + 8;
        while budget > 0 {
            budget -= 1;
            let main_head = self.main.peek(&mut cm);
            let from_small = match (cs, main_head) {
                (None, None) => return,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(_), Some(_)) => small_left > small_target,
            };
            if from_small {
                let Some(id) = cs else { return };
                cs = self.lists.next(id);
                if let Some(f) = self.freq.get_mut(id as usize)
                    && *f & MAX_FREQ > 1
                {
                    *f = LINKED | IN_MAIN;
                    self.lists.unlink(SMALL, id);
                    self.main.push(id, &mut cm);
                    small_left -= 1;
                    continue;
                }
                match visit(id) {
                    Verdict::Stop => return,
                    Verdict::Evict => small_left -= 1,
                    Verdict::Skip => {}
                }
            } else {
                let Some(id) = main_head else { return };
                if let Some(f) = self.freq.get_mut(id as usize)
                    && *f & MAX_FREQ > 0
                {
                    *f -= 1;
                    // To the tail; when `id` was the tail it is the tail again and is looked
                    // at once more.
                    self.main.reinsert(&mut cm);
                    continue;
                }
                cm += 1;
                if visit(id) == Verdict::Stop {
                    return;
                }
            }
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
    fn on_ready(&mut self, _id: EntryId, _meta: EntryMeta) {}
    fn on_access(&mut self, _id: EntryId, _tenant: TenantId) {}
    fn on_remove(&mut self, _id: EntryId, _meta: EntryMeta, _why: Removal) {}
    fn select(&mut self, _tenants: &[TenantId], _visit: &mut dyn FnMut(EntryId) -> Verdict) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: EntryId) -> EntryMeta {
        EntryMeta {
            tenant: id % 2,
            fingerprint: u64::from(id) + 1000,
        }
    }

    /// The order `select` proposes when nothing is evicted or stopped.
    fn order(p: &mut dyn EvictionPolicy, tenants: &[TenantId]) -> Vec<u32> {
        let mut v = Vec::new();
        p.select(tenants, &mut |id| {
            v.push(id);
            Verdict::Skip
        });
        v
    }

    /// Evicts `n` victims; returns them.
    fn evict(p: &mut dyn EvictionPolicy, n: usize) -> Vec<u32> {
        let mut v = Vec::new();
        p.select(&[0, 1], &mut |id| {
            if v.len() == n {
                return Verdict::Stop;
            }
            v.push(id);
            Verdict::Evict
        });
        for &id in &v {
            p.on_remove(id, meta(id), Removal::Evicted);
        }
        v
    }

    #[test]
    fn lru_orders_by_recency() {
        let mut p = LruPolicy::default();
        for id in [3, 1, 7] {
            p.on_ready(id, meta(id));
        }
        assert_eq!(order(&mut p, &[]), vec![3, 1, 7]);
        p.on_access(3, meta(3).tenant);
        assert_eq!(order(&mut p, &[]), vec![1, 7, 3]);
        p.on_remove(7, meta(7), Removal::Dropped);
        assert_eq!(order(&mut p, &[]), vec![1, 3]);
        p.on_access(42, meta(42).tenant); // unknown id: ignored
        p.on_remove(42, meta(42), Removal::Dropped);
        assert_eq!(order(&mut p, &[]), vec![1, 3]);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn isolated_lru_drains_tenants_in_the_given_order() {
        let mut p = IsolatedLruPolicy::default();
        for id in 0..6 {
            p.on_ready(id, meta(id));
        }
        p.on_access(1, meta(1).tenant);
        assert_eq!(order(&mut p, &[1, 0]), vec![3, 5, 1, 0, 2, 4]);
        assert_eq!(order(&mut p, &[0]), vec![0, 2, 4]);
    }

    #[test]
    fn arc_protects_reused_objects_from_a_scan() {
        let mut p = ArcPolicy::default();
        for id in 0..4 {
            p.on_ready(id, meta(id));
            p.on_access(id, meta(id).tenant); // hot: moves to T2
        }
        for id in 10..20 {
            p.on_ready(id, meta(id)); // scan: T1
        }
        assert_eq!(evict(&mut p, 10), (10..20).collect::<Vec<_>>());
        // A ghost hit in B1 (bounded by the 4 resident objects: 16..=19 remain) enlarges the
        // recency target and lands in T2.
        p.on_ready(30, meta(19));
        assert_eq!(p.target(), 1);
        assert_eq!(order(&mut p, &[]), vec![0, 1, 2, 3, 30]);
    }

    #[test]
    fn s3fifo_promotes_reused_and_remembers_ghosts() {
        let mut p = S3FifoPolicy::default();
        for id in 0..10 {
            p.on_ready(id, meta(id));
        }
        // Objects 0 and 1 are read (lock + release).
        for id in [0, 1, 0, 1] {
            p.on_access(id, meta(id).tenant);
        }
        // The small queue's head is promoted (freq 2), the rest are evicted.
        assert_eq!(evict(&mut p, 3), vec![2, 3, 4]);
        assert_eq!(order(&mut p, &[]), vec![5, 6, 7, 8, 9, 0, 1]);
        // A ghost comes back into main.
        p.on_ready(20, meta(2));
        assert!(p.in_main(20));
        assert!(!p.in_main(9));
        assert!(p.lists.is_linked(9) && !p.in_main(9));
    }

    #[test]
    fn select_terminates_when_everything_is_locked() {
        for kind in EvictionPolicyKind::ALL {
            let mut p = kind.build();
            for id in 0..50 {
                p.on_ready(id, meta(id));
                p.on_access(id, meta(id).tenant);
                p.on_access(id, meta(id).tenant);
            }
            let mut seen = 0;
            p.select(&[0, 1], &mut |_| {
                seen += 1;
                Verdict::Skip
            });
            assert!(seen <= 50 * 4 + 8, "{kind}: {seen} proposals");
        }
    }

    #[test]
    fn policy_names_parse_case_insensitively() {
        for kind in EvictionPolicyKind::ALL {
            assert_eq!(kind.name().parse::<EvictionPolicyKind>().ok(), Some(kind));
            assert_eq!(
                kind.name()
                    .to_ascii_lowercase()
                    .parse::<EvictionPolicyKind>()
                    .ok(),
                Some(kind)
            );
            assert_eq!(kind.build().name(), kind.name());
        }
        assert_eq!(
            "s3-fifo".parse::<EvictionPolicyKind>().ok(),
            Some(EvictionPolicyKind::S3Fifo)
        );
        assert!("lfu".parse::<EvictionPolicyKind>().is_err());
    }
}
