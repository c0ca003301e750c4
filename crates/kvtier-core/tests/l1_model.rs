//! Model-based test: random sequences of L1 operations are applied both to the real
//! [`L1Manager`] and to a deliberately simple reference model; every result and the set of
//! readable keys must agree, and the manager's invariants (no leaked bytes, counters equal a
//! recount) must hold after every step. It runs once per eviction policy, each against a naive
//! reference implementation of that policy (vectors and linear scans, written from the policy's
//! description in `kvtier_core::l1::eviction`), so eviction victims must agree too. Keys belong
//! to three tenants (`cache_salt` t0, t1, t2).

mod common;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use kvtier_core::key::ObjectKey;
use kvtier_core::l1::eviction::Verdict;
use kvtier_core::l1::{
    Clock, EvictionPolicyKind, L1Config, L1Error, L1Manager, ReadLease, WriteTicket,
};
use proptest::prelude::*;

/// Key `n`, in tenant `t{n % 3}`.
fn key(n: u32) -> ObjectKey {
    let mut k = common::key(n);
    k.cache_salt = Arc::from(format!("t{}", n % 3).as_str());
    k
}

/// The reference side of an eviction policy (model ids, keys 0..12).
trait RefPolicy: std::fmt::Debug {
    fn ready(&mut self, id: u64, key: u8);
    fn access(&mut self, id: u64);
    fn remove(&mut self, id: u64, evicted: bool);
    /// `tenants`: drain order for isolated policies.
    fn select(&mut self, tenants: &[u8], visit: &mut dyn FnMut(u64) -> Verdict);
}

fn remove_from(v: &mut Vec<u64>, id: u64) -> bool {
    let before = v.len();
    v.retain(|&x| x != id);
    v.len() != before
}

/// Ghost FIFO (the contract of `kvtier_core::l1::ghost`): the keys pushed by the list's last
/// `bound` pushes (`bound` given at each push; the window never widens again), minus those taken
/// since. A push adds a copy and a take removes the newest one (the policies only push a key
/// that is absent: it is taken whenever its object becomes ready again).
#[derive(Debug, Default)]
struct RefGhost {
    /// (key, push time), oldest first.
    q: VecDeque<(u8, u64)>,
    next: u64,
    floor: u64,
}

impl RefGhost {
    fn push(&mut self, key: u8, bound: usize) {
        self.q.push_back((key, self.next));
        self.next += 1;
        self.floor = self
            .floor
            .max(self.next.saturating_sub(bound.max(1) as u64));
        let floor = self.floor;
        self.q.retain(|&(_, t)| t >= floor);
    }

    fn take(&mut self, key: u8) -> bool {
        let newest = self.q.iter().rposition(|&(k, _)| k == key);
        newest.and_then(|i| self.q.remove(i)).is_some()
    }

    fn len(&self) -> usize {
        self.q.len()
    }
}

#[derive(Debug, Default)]
struct RefLru(Vec<u64>);

impl RefPolicy for RefLru {
    fn ready(&mut self, id: u64, _key: u8) {
        self.0.push(id);
    }
    fn access(&mut self, id: u64) {
        if remove_from(&mut self.0, id) {
            self.0.push(id);
        }
    }
    fn remove(&mut self, id: u64, _evicted: bool) {
        remove_from(&mut self.0, id);
    }
    fn select(&mut self, _tenants: &[u8], visit: &mut dyn FnMut(u64) -> Verdict) {
        for id in self.0.clone() {
            if visit(id) == Verdict::Stop {
                return;
            }
        }
    }
}

#[derive(Debug, Default)]
struct RefNoop;

impl RefPolicy for RefNoop {
    fn ready(&mut self, _id: u64, _key: u8) {}
    fn access(&mut self, _id: u64) {}
    fn remove(&mut self, _id: u64, _evicted: bool) {}
    fn select(&mut self, _tenants: &[u8], _visit: &mut dyn FnMut(u64) -> Verdict) {}
}

/// One LRU list per tenant, drained in the given tenant order.
#[derive(Debug, Default)]
struct RefIsolated(BTreeMap<u8, Vec<u64>>);

impl RefPolicy for RefIsolated {
    fn ready(&mut self, id: u64, key: u8) {
        self.0.entry(key % 3).or_default().push(id);
    }
    fn access(&mut self, id: u64) {
        for l in self.0.values_mut() {
            if remove_from(l, id) {
                l.push(id);
            }
        }
    }
    fn remove(&mut self, id: u64, _evicted: bool) {
        for l in self.0.values_mut() {
            remove_from(l, id);
        }
    }
    fn select(&mut self, tenants: &[u8], visit: &mut dyn FnMut(u64) -> Verdict) {
        for t in tenants {
            for id in self.0.get(t).cloned().unwrap_or_default() {
                if visit(id) == Verdict::Stop {
                    return;
                }
            }
        }
    }
}

/// ARC: T1 (seen once), T2 (seen again), ghosts B1/B2 bounded by the resident count, target p.
#[derive(Debug, Default)]
struct RefArc {
    t1: Vec<u64>,
    t2: Vec<u64>,
    b1: RefGhost,
    b2: RefGhost,
    p: usize,
    keys: HashMap<u64, u8>,
}

impl RefPolicy for RefArc {
    fn ready(&mut self, id: u64, key: u8) {
        self.keys.insert(id, key);
        let c = self.t1.len() + self.t2.len() + 1;
        let (l1, l2) = (self.b1.len().max(1), self.b2.len().max(1));
        if self.b1.take(key) {
            self.p = (self.p + (l2 / l1).max(1)).min(c);
            self.t2.push(id);
        } else if self.b2.take(key) {
            self.p = self.p.saturating_sub((l1 / l2).max(1));
            self.t2.push(id);
        } else {
            self.t1.push(id);
        }
    }
    fn access(&mut self, id: u64) {
        if remove_from(&mut self.t1, id) || remove_from(&mut self.t2, id) {
            self.t2.push(id);
        }
    }
    fn remove(&mut self, id: u64, evicted: bool) {
        let in_t1 = remove_from(&mut self.t1, id);
        let in_t2 = !in_t1 && remove_from(&mut self.t2, id);
        if evicted && (in_t1 || in_t2) {
            let bound = (self.t1.len() + self.t2.len()).max(1);
            let key = self.keys[&id];
            if in_t1 { &mut self.b1 } else { &mut self.b2 }.push(key, bound);
        }
    }
    fn select(&mut self, _tenants: &[u8], visit: &mut dyn FnMut(u64) -> Verdict) {
        let (t1, t2) = (self.t1.clone(), self.t2.clone());
        let (mut i1, mut i2, mut t1_left) = (0, 0, t1.len());
        loop {
            let from_t1 = match (i1 < t1.len(), i2 < t2.len()) {
                (false, false) => return,
                (true, false) => true,
                (false, true) => false,
                (true, true) => t1_left > self.p,
            };
            let id = if from_t1 { t1[i1] } else { t2[i2] };
            if from_t1 {
                i1 += 1;
            } else {
                i2 += 1;
            }
            match visit(id) {
                Verdict::Stop => return,
                Verdict::Evict if from_t1 => t1_left -= 1,
                _ => {}
            }
        }
    }
}

/// S3-FIFO: small and main FIFOs, 2-bit frequencies, a ghost FIFO of keys evicted from small.
#[derive(Debug, Default)]
struct RefS3Fifo {
    small: Vec<u64>,
    main: Vec<u64>,
    freq: HashMap<u64, u8>,
    ghost: RefGhost,
    keys: HashMap<u64, u8>,
}

impl RefS3Fifo {
    /// The element after `id` in whichever queue holds it.
    fn next(&self, id: u64) -> Option<u64> {
        for q in [&self.small, &self.main] {
            if let Some(p) = q.iter().position(|&x| x == id) {
                return q.get(p + 1).copied();
            }
        }
        None
    }
}

impl RefPolicy for RefS3Fifo {
    fn ready(&mut self, id: u64, key: u8) {
        self.keys.insert(id, key);
        self.freq.insert(id, 0);
        if self.ghost.take(key) {
            self.main.push(id);
        } else {
            self.small.push(id);
        }
    }
    fn access(&mut self, id: u64) {
        if self.small.contains(&id) || self.main.contains(&id) {
            let f = self.freq.entry(id).or_default();
            *f = (*f + 1).min(3);
        }
    }
    fn remove(&mut self, id: u64, evicted: bool) {
        let in_small = remove_from(&mut self.small, id);
        remove_from(&mut self.main, id);
        if evicted && in_small {
            let bound = (self.small.len() + self.main.len()).max(1);
            let key = self.keys[&id];
            self.ghost.push(key, bound);
        }
    }
    fn select(&mut self, _tenants: &[u8], visit: &mut dyn FnMut(u64) -> Verdict) {
        let resident = self.small.len() + self.main.len();
        let small_target = resident / 10;
        let mut small_left = self.small.len();
        let mut cs = self.small.first().copied();
        let mut cm = self.main.first().copied();
        for _ in 0..4 * resident + 8 {
            let from_small = match (cs, cm) {
                (None, None) => return,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(_), Some(_)) => small_left > small_target,
            };
            if from_small {
                let Some(id) = cs else { return };
                cs = self.next(id);
                if self.freq[&id] > 1 {
                    self.freq.insert(id, 0);
                    remove_from(&mut self.small, id);
                    self.main.push(id);
                    small_left -= 1;
                    if cm.is_none() {
                        cm = Some(id);
                    }
                    continue;
                }
                match visit(id) {
                    Verdict::Stop => return,
                    Verdict::Evict => small_left -= 1,
                    Verdict::Skip => {}
                }
            } else {
                let Some(id) = cm else { return };
                let next = self.next(id);
                let f = self.freq[&id];
                if f > 0 {
                    self.freq.insert(id, f - 1);
                    remove_from(&mut self.main, id);
                    self.main.push(id);
                    cm = next.or(Some(id));
                    continue;
                }
                cm = next;
                if visit(id) == Verdict::Stop {
                    return;
                }
            }
        }
    }
}

fn reference(kind: EvictionPolicyKind) -> Box<dyn RefPolicy> {
    match kind {
        EvictionPolicyKind::Lru => Box::new(RefLru::default()),
        EvictionPolicyKind::Arc => Box::new(RefArc::default()),
        EvictionPolicyKind::IsolatedLru => Box::new(RefIsolated::default()),
        EvictionPolicyKind::S3Fifo => Box::new(RefS3Fifo::default()),
        EvictionPolicyKind::Noop => Box::new(RefNoop),
    }
}

const OBJ: u64 = 4096;
const SLOTS: u64 = 8;
const WRITE_TTL: u64 = 10;
const READ_TTL: u64 = 5;
/// Quarantine budget in objects.
const QUARANTINE: u64 = 2;

#[derive(Debug, Clone)]
enum Op {
    ReserveWrite(Vec<u8>, bool),
    FinishWrite(usize),
    FinishWriteAndRead(usize, u32),
    AbortWrite(usize),
    ReserveRead(Vec<u8>, u32),
    ReadPrefix(Vec<u8>, u32, usize),
    FinishRead(usize, u32),
    Delete(u8),
    Evict(u64),
    Advance(u64),
    Expire,
    Clear(bool),
    Contains(Vec<u8>),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let keys = prop::collection::vec(0u8..12, 1..5);
    prop_oneof![
        4 => (keys.clone(), any::<bool>()).prop_map(|(k, t)| Op::ReserveWrite(k, t)),
        4 => (0usize..64).prop_map(Op::FinishWrite),
        1 => (0usize..64, 1u32..3).prop_map(|(i, c)| Op::FinishWriteAndRead(i, c)),
        1 => (0usize..64).prop_map(Op::AbortWrite),
        3 => (keys.clone(), 1u32..4).prop_map(|(k, c)| Op::ReserveRead(k, c)),
        2 => (keys.clone(), 1u32..3, 1usize..3).prop_map(|(k, c, g)| Op::ReadPrefix(k, c, g)),
        3 => (0usize..64, 1u32..4).prop_map(|(i, c)| Op::FinishRead(i, c)),
        1 => (0u8..12).prop_map(Op::Delete),
        1 => (0u64..4).prop_map(|n| Op::Evict(n * OBJ)),
        2 => (0u64..8).prop_map(Op::Advance),
        1 => Just(Op::Expire),
        1 => any::<bool>().prop_map(Op::Clear),
        1 => keys.prop_map(Op::Contains),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Staging,
    Ready,
    Quarantined,
}

#[derive(Debug, Clone)]
struct MObj {
    key: u8,
    phase: Phase,
    readers: u32,
    epoch: u32,
    deadline: Option<u64>,
    temporary: bool,
    doomed: bool,
}

/// The reference model: a map of objects with a reference policy, no allocator (all objects
/// have the same size, so "fits" is a count).
#[derive(Debug)]
struct Model {
    now: u64,
    next_id: u64,
    objs: BTreeMap<u64, MObj>,
    index: HashMap<u8, u64>,
    pol: Box<dyn RefPolicy>,
    isolated: bool,
    /// Quarantined objects freed by the budget.
    forced: u64,
}

impl Model {
    fn used(&self) -> u64 {
        self.objs.len() as u64
    }

    fn remove_as(&mut self, id: u64, evicted: bool) {
        if let Some(o) = self.objs.remove(&id)
            && !o.doomed
            && o.phase != Phase::Quarantined
        {
            self.index.remove(&o.key);
        }
        self.pol.remove(id, evicted);
    }

    fn remove(&mut self, id: u64) {
        self.remove_as(id, false);
    }

    fn touch(&mut self, id: u64) {
        self.pol.access(id);
    }

    fn quarantined(&self) -> Vec<u64> {
        self.objs
            .iter()
            .filter(|(_, o)| o.phase == Phase::Quarantined)
            .map(|(&id, _)| id)
            .collect()
    }

    /// A staging object's write TTL lapsed: its key goes, its memory stays quarantined; over
    /// the budget, the oldest reservations (lowest ids) are freed.
    fn expire_staging(&mut self, id: u64) {
        let o = self.objs.get_mut(&id).expect("model object");
        let (key, doomed) = (o.key, o.doomed);
        o.phase = Phase::Quarantined;
        o.doomed = false;
        o.deadline = None;
        if !doomed {
            self.index.remove(&key);
        }
        let q = self.quarantined();
        for &victim in q.iter().take(q.len().saturating_sub(QUARANTINE as usize)) {
            self.remove(victim);
            self.forced += 1;
        }
    }

    /// IsolatedLRU's drain order without quotas: tenants by bytes held (every object, staging
    /// and doomed ones included), largest first, ties by salt.
    fn tenant_order(&self) -> Vec<u8> {
        let mut used: BTreeMap<u8, u64> = BTreeMap::new();
        for o in self.objs.values() {
            *used.entry(o.key % 3).or_default() += 1;
        }
        let mut order: Vec<(std::cmp::Reverse<u64>, u8)> = used
            .into_iter()
            .map(|(t, n)| (std::cmp::Reverse(n), t))
            .collect();
        order.sort();
        order.into_iter().map(|(_, t)| t).collect()
    }

    fn expire_readers(&mut self, id: u64) {
        let o = self.objs.get_mut(&id).expect("model object");
        o.readers = 0;
        o.epoch += 1;
        o.deadline = None;
        if o.temporary || o.doomed {
            self.remove(id);
        }
    }

    fn readable(&mut self, k: u8) -> Result<u64, L1Error> {
        let &id = self.index.get(&k).ok_or(L1Error::KeyNotExist)?;
        let o = &self.objs[&id];
        let lapsed = o.deadline.is_some_and(|d| d <= self.now);
        match o.phase {
            Phase::Staging if lapsed => {
                self.expire_staging(id);
                Err(L1Error::KeyNotExist)
            }
            Phase::Staging => Err(L1Error::KeyNotReadable),
            Phase::Quarantined => Err(L1Error::KeyNotExist),
            Phase::Ready => {
                if o.readers > 0 && lapsed {
                    self.expire_readers(id);
                    if !self.objs.contains_key(&id) {
                        return Err(L1Error::KeyNotExist);
                    }
                }
                Ok(id)
            }
        }
    }

    fn lock(&mut self, id: u64, count: u32) -> u32 {
        let now = self.now;
        let o = self.objs.get_mut(&id).expect("model object");
        o.readers += count;
        o.deadline = Some(now + READ_TTL);
        let e = o.epoch;
        self.touch(id);
        e
    }

    fn evict(&mut self, goal: u64) -> u64 {
        let mut planned = 0;
        let mut victims = Vec::new();
        let order = if self.isolated {
            self.tenant_order()
        } else {
            Vec::new()
        };
        let objs = &self.objs;
        self.pol.select(&order, &mut |id| {
            if planned >= goal {
                return Verdict::Stop;
            }
            let o = &objs[&id];
            if o.phase == Phase::Ready && o.readers == 0 && !o.doomed {
                victims.push(id);
                planned += OBJ;
                Verdict::Evict
            } else {
                Verdict::Skip
            }
        });
        for &id in &victims {
            self.remove_as(id, true);
        }
        victims.len() as u64
    }
}

fn kind<T>(r: &Result<T, L1Error>) -> Result<(), L1Error> {
    r.as_ref().map(|_| ()).map_err(|e| *e)
}

fn run(ops: Vec<Op>, policy: EvictionPolicyKind) -> Result<(), TestCaseError> {
    let clock = Clock::manual();
    let mut cfg = L1Config::with_capacity(SLOTS * OBJ);
    cfg.write_ttl = Duration::from_secs(WRITE_TTL);
    cfg.read_ttl = Duration::from_secs(READ_TTL);
    cfg.quarantine_budget_bytes = QUARANTINE * OBJ;
    cfg.eviction.policy = policy;
    let l1 = L1Manager::with_clock(cfg, clock.clone());
    let mut m = Model {
        now: 0,
        next_id: 0,
        objs: BTreeMap::new(),
        index: HashMap::new(),
        pol: reference(policy),
        isolated: policy == EvictionPolicyKind::IsolatedLru,
        forced: 0,
    };
    let keys: Vec<ObjectKey> = (0..12).map(key).collect();
    let mut tickets: Vec<(WriteTicket, u64)> = Vec::new();
    let mut leases: Vec<(ReadLease, u64, u32)> = Vec::new();

    for op in ops {
        match op {
            Op::ReserveWrite(ks, temporary) => {
                let items: Vec<(ObjectKey, u64)> = ks
                    .iter()
                    .map(|&k| (keys[k as usize].clone(), OBJ - 7))
                    .collect();
                let got = l1.reserve_write(&items, temporary);
                // Model.
                let mut expect: Vec<Result<(), L1Error>> = Vec::new();
                let mut new_keys = Vec::new();
                for (i, &k) in ks.iter().enumerate() {
                    if let Some(&id) = m.index.get(&k) {
                        let o = &m.objs[&id];
                        if o.phase == Phase::Staging && o.deadline.is_some_and(|d| d <= m.now) {
                            m.expire_staging(id);
                        } else {
                            expect.push(Err(L1Error::KeyNotWritable));
                            continue;
                        }
                    }
                    if ks[..i].contains(&k) {
                        expect.push(Err(L1Error::KeyNotWritable));
                        continue;
                    }
                    expect.push(Ok(()));
                    new_keys.push(i);
                }
                let need = new_keys.len() as u64;
                let mut fits = need == 0 || m.used() + need <= SLOTS;
                if !fits && need <= SLOTS {
                    loop {
                        let goal = (need - (SLOTS - m.used()).min(need)).max(1) * OBJ;
                        let freed = m.evict(goal);
                        if m.used() + need <= SLOTS {
                            fits = true;
                            break;
                        }
                        if freed == 0 {
                            break;
                        }
                    }
                }
                for &i in &new_keys {
                    if !fits {
                        expect[i] = Err(L1Error::OutOfMemory);
                        continue;
                    }
                    let id = m.next_id;
                    m.next_id += 1;
                    m.objs.insert(
                        id,
                        MObj {
                            key: ks[i],
                            phase: Phase::Staging,
                            readers: 0,
                            epoch: 0,
                            deadline: Some(m.now + WRITE_TTL),
                            temporary,
                            doomed: false,
                        },
                    );
                    m.index.insert(ks[i], id);
                    if let Ok(t) = &got[i] {
                        tickets.push((*t, id));
                    }
                }
                let got_kinds: Vec<_> = got.iter().map(kind).collect();
                prop_assert_eq!(got_kinds, expect);
            }
            Op::FinishWrite(i) | Op::FinishWriteAndRead(i, _) | Op::AbortWrite(i) => {
                if tickets.is_empty() {
                    continue;
                }
                let (t, id) = tickets[i % tickets.len()];
                let expect = match m.objs.get(&id) {
                    None => Err(L1Error::KeyNotExist),
                    // The writer is back after its TTL: freed, and its write is void.
                    Some(o) if o.phase == Phase::Quarantined => {
                        m.remove(id);
                        Err(L1Error::KeyNotExist)
                    }
                    Some(o) if o.phase != Phase::Staging => Err(L1Error::KeyInWrongState),
                    Some(o) if matches!(op, Op::AbortWrite(_)) => {
                        let _ = o;
                        m.remove(id);
                        Ok(())
                    }
                    Some(o) if o.doomed || o.deadline.is_some_and(|d| d <= m.now) => {
                        m.remove(id);
                        Err(L1Error::KeyNotExist)
                    }
                    Some(_) => {
                        let o = m.objs.get_mut(&id).expect("present");
                        o.phase = Phase::Ready;
                        o.deadline = None;
                        let k = o.key;
                        m.pol.ready(id, k);
                        Ok(())
                    }
                };
                match op {
                    Op::FinishWrite(_) => {
                        let got = l1.finish_write(&[t]);
                        prop_assert_eq!(kind(&got[0]), expect);
                    }
                    Op::AbortWrite(_) => {
                        let got = l1.abort_write(&[t]);
                        prop_assert_eq!(kind(&got[0]), expect);
                    }
                    Op::FinishWriteAndRead(_, c) => {
                        let got = l1.finish_write_and_reserve_read(&[t], c);
                        prop_assert_eq!(kind(&got[0]), expect);
                        if let Ok(lease) = got[0] {
                            let epoch = m.lock(id, c);
                            leases.push((lease, id, epoch));
                        }
                    }
                    _ => unreachable!(),
                }
            }
            Op::ReserveRead(ks, c) => {
                let req: Vec<ObjectKey> = ks.iter().map(|&k| keys[k as usize].clone()).collect();
                let got = l1.reserve_read(&req, c);
                for (j, &k) in ks.iter().enumerate() {
                    let expect = m.readable(k);
                    prop_assert_eq!(kind(&got[j]), expect.map(|_| ()));
                    if let (Ok(id), Ok(lease)) = (expect, got[j]) {
                        let epoch = m.lock(id, c);
                        leases.push((lease, id, epoch));
                    }
                }
            }
            Op::ReadPrefix(ks, c, group) => {
                let req: Vec<ObjectKey> = ks.iter().map(|&k| keys[k as usize].clone()).collect();
                let got = l1.reserve_read_prefix(&req, c, group);
                let mut ids = Vec::new();
                'g: for chunk in ks.chunks(group) {
                    if chunk.len() < group {
                        break;
                    }
                    let start = ids.len();
                    for &k in chunk {
                        match m.readable(k) {
                            Ok(id) => ids.push(id),
                            Err(_) => {
                                ids.truncate(start);
                                break 'g;
                            }
                        }
                    }
                }
                prop_assert_eq!(got.len(), ids.len());
                for (lease, id) in got.into_iter().zip(ids) {
                    let epoch = m.lock(id, c);
                    leases.push((lease, id, epoch));
                }
            }
            Op::FinishRead(i, c) => {
                if leases.is_empty() {
                    continue;
                }
                let (lease, id, epoch) = leases[i % leases.len()];
                let expect = match m.objs.get(&id) {
                    None => Err(L1Error::KeyNotExist),
                    Some(o) if o.epoch != epoch || o.readers == 0 => Err(L1Error::KeyInWrongState),
                    Some(_) => {
                        let o = m.objs.get_mut(&id).expect("present");
                        o.readers = o.readers.saturating_sub(c);
                        if o.readers == 0 {
                            o.deadline = None;
                            if o.temporary || o.doomed {
                                m.remove(id);
                            } else {
                                m.touch(id);
                            }
                        } else {
                            m.touch(id);
                        }
                        Ok(())
                    }
                };
                let got = l1.finish_read(&[lease], c);
                prop_assert_eq!(kind(&got[0]), expect);
            }
            Op::Delete(k) => {
                let got = l1.delete(&[keys[k as usize].clone()]);
                let expect = match m.index.get(&k).copied() {
                    None => Err(L1Error::KeyNotExist),
                    Some(id) => {
                        let o = &m.objs[&id];
                        if o.phase == Phase::Staging || o.readers > 0 {
                            Err(L1Error::KeyIsLocked)
                        } else {
                            m.remove(id);
                            Ok(())
                        }
                    }
                };
                prop_assert_eq!(kind(&got[0]), expect);
            }
            Op::Evict(goal) => {
                let got = l1.evict(goal);
                let n = m.evict(goal);
                prop_assert_eq!(got.objects, n);
            }
            Op::Advance(s) => {
                clock.advance(Duration::from_secs(s));
                m.now += s;
            }
            Op::Expire => {
                l1.expire_locks();
                let now = m.now;
                let lapsed: Vec<u64> = m
                    .objs
                    .iter()
                    .filter(|(_, o)| o.deadline.is_some_and(|d| d <= now))
                    .map(|(&id, _)| id)
                    .collect();
                for id in lapsed {
                    if m.objs[&id].phase == Phase::Staging {
                        m.expire_staging(id);
                    } else {
                        m.expire_readers(id);
                    }
                }
            }
            Op::Clear(force) => {
                let out = l1.clear(force);
                let ids: Vec<u64> = m.objs.keys().copied().collect();
                let mut removed = 0;
                for id in ids {
                    let o = m.objs[&id].clone();
                    if o.doomed || o.phase == Phase::Quarantined {
                        continue;
                    }
                    if o.phase == Phase::Ready && o.readers == 0 {
                        m.remove(id);
                        removed += 1;
                    } else if force {
                        m.index.remove(&o.key);
                        m.pol.remove(id, false);
                        m.objs.get_mut(&id).expect("present").doomed = true;
                    }
                }
                prop_assert_eq!(out.removed, removed);
            }
            Op::Contains(ks) => {
                let req: Vec<ObjectKey> = ks.iter().map(|&k| keys[k as usize].clone()).collect();
                let got = l1.contains(&req);
                let expect: Vec<bool> = ks.iter().map(|&k| m.readable(k).is_ok()).collect();
                prop_assert_eq!(got, expect);
            }
        }
        if let Err(e) = l1.check_invariants() {
            return Err(TestCaseError::fail(e));
        }
        let c = l1.counters();
        prop_assert_eq!(c.objects.get(), m.objs.len() as u64);
        prop_assert_eq!(c.quarantined_objects.get(), m.quarantined().len() as u64);
        prop_assert_eq!(c.quarantine_forced_reuses_total.get(), m.forced);
    }
    // Drain: releasing everything and clearing must return every byte (the quarantine only
    // once the writers' tickets come back).
    l1.clear(true);
    clock.advance(Duration::from_secs(WRITE_TTL + READ_TTL + 1));
    l1.expire_locks();
    let all: Vec<WriteTicket> = tickets.iter().map(|&(t, _)| t).collect();
    l1.abort_write(&all);
    l1.check_invariants().map_err(TestCaseError::fail)?;
    prop_assert_eq!(l1.usage().0, 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn l1_matches_reference_model(ops in prop::collection::vec(op_strategy(), 1..120)) {
        run(ops, EvictionPolicyKind::Lru)?;
    }

    #[test]
    fn l1_with_arc_matches_reference_arc(ops in prop::collection::vec(op_strategy(), 1..120)) {
        run(ops, EvictionPolicyKind::Arc)?;
    }

    #[test]
    fn l1_with_s3fifo_matches_reference_s3fifo(ops in prop::collection::vec(op_strategy(), 1..120)) {
        run(ops, EvictionPolicyKind::S3Fifo)?;
    }

    #[test]
    fn l1_with_isolated_lru_matches_reference(ops in prop::collection::vec(op_strategy(), 1..120)) {
        run(ops, EvictionPolicyKind::IsolatedLru)?;
    }

    #[test]
    fn l1_with_noop_matches_reference(ops in prop::collection::vec(op_strategy(), 1..120)) {
        run(ops, EvictionPolicyKind::Noop)?;
    }
}
