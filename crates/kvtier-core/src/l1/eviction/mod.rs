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
//! - **Hints.** The manager calls [`EvictionPolicy::prefetch`] with an object's fingerprint
//!   when it reserves the object (its admission follows at `finish_write`), and for every
//!   object of a batch before publishing or removing the first; ARC and S3-FIFO start loading
//!   the ghost bucket that admission or eviction will touch, so the ghost-table misses overlap
//!   other work instead of stalling it (on a 1M-object L1 the tables are far larger than the
//!   caches; docs/performance.md, "Batch hints"). A hint changes no state.
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

use super::list::Lists;

mod arc;
mod s3fifo;

pub use arc::ArcPolicy;
pub use s3fifo::S3FifoPolicy;

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
    /// A hint: an object with this key fingerprint is about to become ready or to be removed
    /// (the manager calls it when it reserves an object, and for each object of a batch
    /// before handling the first). The policy may start loading the memory that call will
    /// touch; its state must not change.
    fn prefetch(&self, fingerprint: u64) {
        let _ = fingerprint;
    }
    /// Whether the policy reads key fingerprints (ghost lists). Only then does the manager
    /// compute them, for [`on_ready`](Self::on_ready), [`on_remove`](Self::on_remove) and
    /// [`prefetch`](Self::prefetch); the others are given 0.
    fn uses_fingerprints(&self) -> bool {
        false
    }
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
pub(crate) mod tests {
    use super::*;

    pub(super) fn meta(id: EntryId) -> EntryMeta {
        EntryMeta {
            tenant: id % 2,
            fingerprint: u64::from(id) + 1000,
        }
    }

    /// The order `select` proposes when nothing is evicted or stopped.
    pub(super) fn order(p: &mut dyn EvictionPolicy, tenants: &[TenantId]) -> Vec<u32> {
        let mut v = Vec::new();
        p.select(tenants, &mut |id| {
            v.push(id);
            Verdict::Skip
        });
        v
    }

    /// Evicts `n` victims; returns them.
    pub(super) fn evict(p: &mut dyn EvictionPolicy, n: usize) -> Vec<u32> {
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
