//! Model-based test: random sequences of L1 operations are applied both to the real
//! [`L1Manager`] and to a deliberately simple reference model; every result and the set of
//! readable keys must agree, and the manager's invariants (no leaked bytes, counters equal a
//! recount) must hold after every step.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::key;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::{Clock, L1Config, L1Error, L1Manager, ReadLease, WriteTicket};
use proptest::prelude::*;

const OBJ: u64 = 4096;
const SLOTS: u64 = 8;
const WRITE_TTL: u64 = 10;
const READ_TTL: u64 = 5;

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

/// The reference model: a map of objects with a recency list, no allocator (all objects have
/// the same size, so "fits" is a count).
#[derive(Debug, Default)]
struct Model {
    now: u64,
    next_id: u64,
    objs: BTreeMap<u64, MObj>,
    index: HashMap<u8, u64>,
    lru: Vec<u64>,
}

impl Model {
    fn used(&self) -> u64 {
        self.objs.len() as u64
    }

    fn remove(&mut self, id: u64) {
        if let Some(o) = self.objs.remove(&id)
            && !o.doomed
        {
            self.index.remove(&o.key);
        }
        self.lru.retain(|&x| x != id);
    }

    fn touch(&mut self, id: u64) {
        if let Some(p) = self.lru.iter().position(|&x| x == id) {
            self.lru.remove(p);
            self.lru.push(id);
        }
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
                self.remove(id);
                Err(L1Error::KeyNotExist)
            }
            Phase::Staging => Err(L1Error::KeyNotReadable),
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
        for &id in &self.lru {
            if planned >= goal {
                break;
            }
            let o = &self.objs[&id];
            if o.phase == Phase::Ready && o.readers == 0 && !o.doomed {
                victims.push(id);
                planned += OBJ;
            }
        }
        for &id in &victims {
            self.remove(id);
        }
        victims.len() as u64
    }
}

fn kind<T>(r: &Result<T, L1Error>) -> Result<(), L1Error> {
    r.as_ref().map(|_| ()).map_err(|e| *e)
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let clock = Clock::manual();
    let mut cfg = L1Config::with_capacity(SLOTS * OBJ);
    cfg.write_ttl = Duration::from_secs(WRITE_TTL);
    cfg.read_ttl = Duration::from_secs(READ_TTL);
    let l1 = L1Manager::with_clock(cfg, clock.clone());
    let mut m = Model::default();
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
                            m.remove(id);
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
                        m.lru.push(id);
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
                        m.remove(id);
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
                    if o.doomed {
                        continue;
                    }
                    if o.phase == Phase::Ready && o.readers == 0 {
                        m.remove(id);
                        removed += 1;
                    } else if force {
                        m.index.remove(&o.key);
                        m.lru.retain(|&x| x != id);
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
    }
    // Drain: releasing everything and clearing must return every byte.
    l1.clear(true);
    clock.advance(Duration::from_secs(WRITE_TTL + READ_TTL + 1));
    l1.expire_locks();
    l1.check_invariants().map_err(TestCaseError::fail)?;
    prop_assert_eq!(l1.usage().0, 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn l1_matches_reference_model(ops in prop::collection::vec(op_strategy(), 1..120)) {
        run(ops)?;
    }
}
