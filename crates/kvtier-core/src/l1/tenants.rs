//! Tenants of L1: one per `cache_salt`, with byte accounting, an optional quota and a recency
//! list of its own objects.
//!
//! # Rules
//! - A tenant exists while it has objects (staging, ready or doomed) or a quota; when both are
//!   gone it is retired and its cumulative counters are folded into the `other` aggregate, so the
//!   table never outgrows the objects plus the quotas.
//! - `used` counts every byte the tenant holds, staging included, so concurrent stores cannot
//!   overrun a quota. The manager checks a store against its tenant's quota *before* allocating:
//!   it first evicts the tenant's own unlocked objects (oldest first, from the tenant's list),
//!   and refuses the tenant's keys (`L1Error::QuotaExceeded`) if that cannot make room. It never
//!   evicts another tenant's objects for a store that is over its own quota.
//! - Salts without a quota are not limited (LMCache's IsolatedLRU instead evicts every byte of an
//!   unregistered salt; see docs/lmcache-compatibility.md).
//! - [`Tenants::isolation_order`] is the order IsolatedLRU drains tenants under global pressure:
//!   tenants over their quota (largest excess first), then tenants without a quota (largest
//!   first), then tenants within their quota (fullest relative to it first); ties by salt.
//!   O(T log T) in the number of tenants, never in objects, and no allocation once its scratch
//!   has grown to the tenant count (it runs on every eviction round).
//!
//! # Concurrency and lock order
//! [`Tenants`] lives inside the L1 lock. Readers (status, `/metrics`, `GET /quota`) never take
//! that lock: they read the [`Directory`], a leaf `parking_lot::Mutex` over `Arc`s of the
//! tenants' atomic counters, which the manager updates under the L1 lock when a tenant appears
//! or retires. Order: L1 lock → directory lock; nothing is taken under the directory lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

use super::eviction::{EntryId, TenantId};
use super::list::Lists;

/// How un-salted traffic (`cache_salt = ""`) is named in URLs, labels and the status tree.
pub const DEFAULT_SALT_NAME: &str = "_default";

/// The label of the aggregate of every tenant outside the top N.
pub const OTHER_TENANTS: &str = "other";

const NO_LIMIT: u64 = u64::MAX;

/// The external name of a salt (`""` → `_default`).
pub fn salt_name(salt: &str) -> &str {
    if salt.is_empty() {
        DEFAULT_SALT_NAME
    } else {
        salt
    }
}

crate::metric_set! {
    /// One tenant's counters (labelled `tenant` in `/metrics`, a child of `l1_manager.tenants`
    /// in the status tree).
    pub struct TenantCounters {
        /// L1 bytes held by the tenant (staging included).
        bytes: Gauge[Bytes] as "used_bytes" => "kvtier_l1_tenant_used",
        /// L1 objects held by the tenant.
        objects: Gauge as "objects" => "kvtier_l1_tenant_objects",
        /// Lookup keys of the tenant found in L1.
        hits_total: Counter => "kvtier_l1_tenant_hits",
        /// Lookup keys of the tenant not found in L1.
        misses_total: Counter => "kvtier_l1_tenant_misses",
        /// The tenant's objects evicted from L1.
        evicted_objects_total: Counter => "kvtier_l1_tenant_evicted_objects",
        /// The tenant's bytes evicted from L1.
        evicted_bytes_total: Counter[Bytes] => "kvtier_l1_tenant_evicted",
        /// The tenant's store keys refused because they did not fit within its quota.
        quota_rejected_keys_total: Counter => "kvtier_l1_tenant_quota_rejected_keys",
    }
}

impl TenantCounters {
    fn fold_into(&self, other: &TenantCounters) {
        other.hits_total.add(self.hits_total.get());
        other.misses_total.add(self.misses_total.get());
        other
            .evicted_objects_total
            .add(self.evicted_objects_total.get());
        other
            .evicted_bytes_total
            .add(self.evicted_bytes_total.get());
        other
            .quota_rejected_keys_total
            .add(self.quota_rejected_keys_total.get());
    }
}

/// One tenant as readers see it.
#[derive(Debug)]
pub struct TenantStats {
    /// The tenant's `cache_salt` (`""` for un-salted traffic).
    pub salt: Arc<str>,
    /// Its counters.
    pub counters: TenantCounters,
    limit: AtomicU64,
}

impl TenantStats {
    /// The quota in bytes, if one is set.
    pub fn limit(&self) -> Option<u64> {
        Some(self.limit.load(Relaxed)).filter(|&l| l != NO_LIMIT)
    }
}

/// What readers see of the tenant table (see the module docs).
#[derive(Debug, Default)]
pub struct Directory {
    live: Mutex<Vec<Option<Arc<TenantStats>>>>,
    /// Counters of retired tenants and misses of salts without a tenant.
    pub retired: TenantCounters,
}

impl Directory {
    /// Every live tenant (O(tenants), under the directory lock only).
    pub fn snapshot(&self) -> Vec<Arc<TenantStats>> {
        self.live.lock().iter().flatten().cloned().collect()
    }

    /// The live tenant with this salt.
    pub fn find(&self, salt: &str) -> Option<Arc<TenantStats>> {
        self.live
            .lock()
            .iter()
            .flatten()
            .find(|t| &*t.salt == salt)
            .cloned()
    }
}

/// How many tenants `/metrics` and the status tree show by name; the rest are summed into
/// [`OTHER_TENANTS`] (so label cardinality is at most `TOP_TENANTS + 1`).
pub const TOP_TENANTS: usize = 10;

impl TenantCounters {
    /// Values in declaration order (the order of [`TenantCounters::DESCRIPTORS`]).
    fn values(&self) -> [u64; 7] {
        [
            self.bytes.get(),
            self.objects.get(),
            self.hits_total.get(),
            self.misses_total.get(),
            self.evicted_objects_total.get(),
            self.evicted_bytes_total.get(),
            self.quota_rejected_keys_total.get(),
        ]
    }
}

/// One row of the bounded per-tenant view.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantRow {
    /// `_default` for un-salted traffic, the salt otherwise, or [`OTHER_TENANTS`].
    pub name: String,
    /// The quota in bytes (never for the aggregate).
    pub limit: Option<u64>,
    /// Counter values in [`TenantCounters::DESCRIPTORS`] order.
    pub values: [u64; 7],
}

/// A Prometheus-safe label value: characters outside `[A-Za-z0-9_.:-]` become `_`.
fn label_value(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Directory {
    /// The top [`TOP_TENANTS`] tenants by bytes held, then the [`OTHER_TENANTS`] aggregate (the
    /// rest, retired tenants and misses of salts without a tenant). A tenant whose salt is
    /// literally `other` is always part of the aggregate. O(tenants log tenants), directory lock
    /// only.
    pub fn rows(&self) -> Vec<TenantRow> {
        let mut all = self.snapshot();
        all.sort_by_key(|t| std::cmp::Reverse(t.counters.bytes.get()));
        let mut rows = Vec::with_capacity(TOP_TENANTS + 1);
        let mut other = self.retired.values();
        // Gauges of retired tenants are zero by construction; only counters carry over.
        for t in all {
            let name = salt_name(&t.salt);
            if rows.len() < TOP_TENANTS && name != OTHER_TENANTS {
                rows.push(TenantRow {
                    name: name.to_owned(),
                    limit: t.limit(),
                    values: t.counters.values(),
                });
            } else {
                for (o, v) in other.iter_mut().zip(t.counters.values()) {
                    *o += v;
                }
            }
        }
        rows.push(TenantRow {
            name: OTHER_TENANTS.to_owned(),
            limit: None,
            values: other,
        });
        rows
    }

    /// The `tenants` node of the L1 status: `{name: {used_bytes, objects, limit_bytes, ..._total}}`.
    pub fn status(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for row in self.rows() {
            let mut fields = serde_json::Map::new();
            for (d, v) in TenantCounters::DESCRIPTORS.iter().zip(row.values) {
                fields.insert(d.status_key.to_owned(), v.into());
            }
            if let Some(l) = row.limit {
                fields.insert("limit_bytes".to_owned(), l.into());
            }
            map.insert(row.name, fields.into());
        }
        map.into()
    }
}

impl crate::metrics::MetricSet for Directory {
    fn descriptors(&self) -> &'static [crate::metrics::MetricDesc] {
        TenantCounters::DESCRIPTORS
    }

    /// Labelled `tenant="<name>"`, top [`TOP_TENANTS`] plus `other`.
    fn visit(&self, v: &mut dyn crate::metrics::MetricVisitor) {
        for row in self.rows() {
            let name = label_value(&row.name);
            let labels = [("tenant", name.as_str())];
            for (d, value) in TenantCounters::DESCRIPTORS.iter().zip(row.values) {
                match d.kind {
                    crate::metrics::MetricKind::Counter => v.counter(d, &labels, value),
                    _ => v.gauge(d, &labels, value as f64),
                }
            }
        }
    }
}

#[derive(Debug)]
struct Tenant {
    stats: Arc<TenantStats>,
    used: u64,
    objects: u64,
}

/// The tenant table (inside the L1 lock; see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Tenants {
    by_salt: crate::collections::FastMap<Arc<str>, TenantId>,
    slots: Vec<Option<Tenant>>,
    free: Vec<TenantId>,
    /// Per-tenant recency of ready objects (list index = tenant id).
    lists: Lists,
    directory: Arc<Directory>,
    /// Scratch of [`Tenants::isolation_order`], kept so that an eviction allocates nothing:
    /// each live tenant's sort key (class, inverted size) and id, then the ids in order.
    order_keys: Vec<(u8, u64, TenantId)>,
    order: Vec<TenantId>,
}

impl Tenants {
    pub(crate) fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    pub(crate) fn find(&self, salt: &str) -> Option<TenantId> {
        self.by_salt.get(salt).copied()
    }

    /// The tenant of `salt`, created if needed.
    pub(crate) fn resolve(&mut self, salt: &Arc<str>) -> TenantId {
        if let Some(&t) = self.by_salt.get(salt) {
            return t;
        }
        let stats = Arc::new(TenantStats {
            salt: Arc::clone(salt),
            counters: TenantCounters::default(),
            limit: AtomicU64::new(NO_LIMIT),
        });
        let tenant = Tenant {
            stats: Arc::clone(&stats),
            used: 0,
            objects: 0,
        };
        let t = match self.free.pop() {
            Some(t) => {
                self.slots[t as usize] = Some(tenant);
                t
            }
            None => {
                self.slots.push(Some(tenant));
                (self.slots.len() - 1) as TenantId
            }
        };
        self.by_salt.insert(Arc::clone(salt), t);
        let mut live = self.directory.live.lock();
        if live.len() <= t as usize {
            live.resize(t as usize + 1, None);
        }
        live[t as usize] = Some(stats);
        t
    }

    fn get(&self, t: TenantId) -> Option<&Tenant> {
        self.slots.get(t as usize).and_then(Option::as_ref)
    }

    pub(crate) fn stats(&self, t: TenantId) -> Option<&TenantCounters> {
        self.get(t).map(|x| &x.stats.counters)
    }

    pub(crate) fn used(&self, t: TenantId) -> u64 {
        self.get(t).map_or(0, |x| x.used)
    }

    pub(crate) fn limit(&self, t: TenantId) -> Option<u64> {
        self.get(t).and_then(|x| x.stats.limit())
    }

    /// Sets or removes the quota of `salt`; returns the tenant and whether a quota existed.
    pub(crate) fn set_limit(
        &mut self,
        salt: &Arc<str>,
        limit: Option<u64>,
    ) -> (Option<TenantId>, bool) {
        let t = match (self.find(salt), limit) {
            (Some(t), _) => t,
            (None, Some(_)) => self.resolve(salt),
            (None, None) => return (None, false),
        };
        let Some(x) = self.get(t) else {
            return (None, false);
        };
        let old = x.stats.limit.swap(limit.unwrap_or(NO_LIMIT), Relaxed);
        self.retire_if_idle(t);
        (self.find(salt), old != NO_LIMIT)
    }

    /// An object of `bytes` was allocated for the tenant.
    pub(crate) fn charge(&mut self, t: TenantId, bytes: u64) {
        if let Some(x) = self.slots.get_mut(t as usize).and_then(Option::as_mut) {
            x.used += bytes;
            x.objects += 1;
            x.stats.counters.bytes.add(bytes);
            x.stats.counters.objects.add(1);
        }
    }

    /// An object of `bytes` left L1; retires the tenant if that was its last object.
    pub(crate) fn release(&mut self, t: TenantId, id: EntryId, bytes: u64, evicted: bool) {
        self.lists.unlink(t, id);
        if let Some(x) = self.slots.get_mut(t as usize).and_then(Option::as_mut) {
            x.used -= bytes;
            x.objects -= 1;
            let c = &x.stats.counters;
            c.bytes.sub(bytes);
            c.objects.sub(1);
            if evicted {
                c.evicted_objects_total.add(1);
                c.evicted_bytes_total.add(bytes);
            }
        }
        self.retire_if_idle(t);
    }

    /// Retires a tenant without objects and without a quota.
    pub(crate) fn retire_if_idle(&mut self, t: TenantId) {
        let idle = self
            .get(t)
            .is_some_and(|x| x.objects == 0 && x.stats.limit().is_none());
        if !idle {
            return;
        }
        if let Some(x) = self.slots.get_mut(t as usize).and_then(Option::take) {
            self.by_salt.remove(&x.stats.salt);
            self.free.push(t);
            x.stats.counters.fold_into(&self.directory.retired);
            if let Some(slot) = self.directory.live.lock().get_mut(t as usize) {
                *slot = None;
            }
        }
    }

    /// The object became readable: it is now a candidate of its tenant's list.
    pub(crate) fn on_ready(&mut self, t: TenantId, id: EntryId) {
        self.lists.push_back(t, id);
    }

    pub(crate) fn on_access(&mut self, t: TenantId, id: EntryId) {
        self.lists.touch(t, id);
    }

    /// Gives back the recency links of ids at or above `ids` (see [`Lists::shrink`]).
    pub(crate) fn shrink(&mut self, ids: usize) {
        self.lists.shrink(ids);
    }

    /// The object is no longer a candidate (doomed); its bytes stay charged until it is freed.
    pub(crate) fn unlink(&mut self, t: TenantId, id: EntryId) {
        self.lists.unlink(t, id);
    }

    /// The tenant's ready objects, oldest first, until `visit` returns false.
    pub(crate) fn walk(&self, t: TenantId, visit: &mut dyn FnMut(EntryId) -> bool) {
        let mut cur = self.lists.head(t);
        while let Some(id) = cur {
            cur = self.lists.next(id);
            if !visit(id) {
                return;
            }
        }
    }

    /// See the module docs.
    pub(crate) fn isolation_order(&mut self) -> &[TenantId] {
        let Self {
            slots,
            order_keys,
            order,
            ..
        } = self;
        order_keys.clear();
        order_keys.extend(slots.iter().enumerate().filter_map(|(t, x)| {
            let x = x.as_ref()?;
            let (class, key) = match x.stats.limit() {
                Some(l) if x.used > l => (0, u64::MAX - (x.used - l)),
                None => (1, u64::MAX - x.used),
                Some(0) => (2, 0),
                Some(l) => {
                    // Fullest relative to its quota first (parts per million).
                    let ppm = (u128::from(x.used) * 1_000_000 / u128::from(l)) as u64;
                    (2, u64::MAX - ppm)
                }
            };
            Some((class, key, t as TenantId))
        }));
        // Ties break by salt, so the order does not depend on slot reuse (a salt is looked up
        // only on a tie).
        let salt = |t: TenantId| {
            slots
                .get(t as usize)
                .and_then(Option::as_ref)
                .map(|x| &*x.stats.salt)
        };
        order_keys.sort_unstable_by(|a, b| {
            (a.0, a.1)
                .cmp(&(b.0, b.1))
                .then_with(|| salt(a.2).cmp(&salt(b.2)))
        });
        order.clear();
        order.extend(order_keys.iter().map(|k| k.2));
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_retire_when_idle_and_fold_counters() {
        let mut ts = Tenants::default();
        let a: Arc<str> = "a".into();
        let t = ts.resolve(&a);
        ts.charge(t, 100);
        ts.on_ready(t, 7);
        if let Some(c) = ts.stats(t) {
            c.hits_total.add(3);
        }
        assert_eq!(ts.directory().snapshot().len(), 1);
        ts.release(t, 7, 100, true);
        assert!(ts.find("a").is_none());
        assert_eq!(ts.directory().retired.hits_total.get(), 3);
        assert_eq!(ts.directory().retired.evicted_objects_total.get(), 1);
        // A quota keeps a tenant alive without objects.
        let (t, existed) = ts.set_limit(&a, Some(10));
        assert!(t.is_some() && !existed);
        assert_eq!(ts.directory().find("a").and_then(|s| s.limit()), Some(10));
        let (t, existed) = ts.set_limit(&a, None);
        assert!(t.is_none() && existed);
        assert!(ts.directory().snapshot().is_empty());
    }

    #[test]
    fn rows_are_bounded_and_sum_the_rest() {
        let mut ts = Tenants::default();
        for i in 0..(TOP_TENANTS as u64 + 5) {
            let t = ts.resolve(&Arc::from(format!("t\"{i}").as_str()));
            ts.charge(t, 100 + i);
        }
        let rows = ts.directory().rows();
        assert_eq!(rows.len(), TOP_TENANTS + 1);
        assert_eq!(rows[0].name, format!("t\"{}", TOP_TENANTS + 4));
        let other = &rows[TOP_TENANTS];
        assert_eq!(other.name, OTHER_TENANTS);
        assert_eq!(other.values[1], 5);
        assert_eq!(label_value("t\"1\n"), "t_1_");
    }

    #[test]
    fn isolation_order_puts_over_quota_first_and_within_quota_last() {
        let mut ts = Tenants::default();
        let names = ["within", "free-small", "over", "free-big"];
        let ids: Vec<TenantId> = names.iter().map(|n| ts.resolve(&Arc::from(*n))).collect();
        ts.set_limit(&Arc::from("within"), Some(1000));
        ts.set_limit(&Arc::from("over"), Some(10));
        for (t, bytes) in ids.iter().zip([500, 20, 50, 90]) {
            ts.charge(*t, bytes);
        }
        let order: Vec<&str> = ts
            .isolation_order()
            .iter()
            .map(|&t| names[t as usize])
            .collect();
        assert_eq!(order, vec!["over", "free-big", "free-small", "within"]);
    }
}
