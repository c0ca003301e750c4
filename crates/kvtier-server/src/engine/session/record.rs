//! One session's own state: the read locks it holds per object ([`HeldLock`]; a retrieve takes
//! them all or nothing, see [`Sessions::take`](super::Sessions::take)), its incremental hash cache, and
//! the state of its last lookup's L2 prefetch. Only `Sessions` (`mod.rs`) changes it, under the
//! session's mutex.

use super::*;

/// A map keyed by object keys (see [`kvtier_core::collections`] for why not SipHash).
pub(super) use kvtier_core::collections::FastMap as KeyMap;

/// Read locks held on one object on behalf of a session.
#[derive(Debug, Clone, Copy)]
pub struct HeldLock {
    /// The L1 lease.
    pub lease: ReadLease,
    /// Locks not yet consumed by a retrieve or released.
    pub remaining: u32,
}

/// State of the session's last lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefetchState {
    /// No lookup result waiting.
    #[default]
    Idle,
    /// The lookup's L1 prefix is recorded; L2 prefetch request `job` is loading the rest.
    /// The session owns the job: whoever moves the state away from `Pending` takes its result
    /// (query/wait) or cancels it (end_session, expiry, a newer lookup).
    Pending {
        /// PrefetchController request id.
        job: u64,
        /// Chunks found in L1 (already locked and recorded).
        l1_chunks: u64,
    },
    /// The lookup finished with this many prefix chunks; consumed by the next query.
    Done(u64),
}

impl PrefetchState {
    /// The pending L2 job, if any.
    pub fn pending_job(&self) -> Option<u64> {
        match self {
            Self::Pending { job, .. } => Some(*job),
            _ => None,
        }
    }
}

/// Why [`Sessions::take`] refused (nothing was taken).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TakeError {
    /// A chunk has no lock left in the session.
    #[error("chunk {0} is not locked by the request's lookup")]
    NotLocked(usize),
    /// A chunk is cached with another object size than the caller expects.
    #[error("chunk {chunk}: cached object is {cached} bytes but the engine expects {expected}")]
    WrongSize {
        /// Chunk index in the range.
        chunk: usize,
        /// Cached object size.
        cached: u64,
        /// Expected object size.
        expected: u64,
    },
}

/// One request's state. Fields are private: every change goes through [`Sessions`].
#[derive(Debug)]
pub struct Session {
    pub(super) hashes: ChunkHashCache,
    pub(super) locks: KeyMap<ObjectKey, HeldLock>,
    pub(super) prefetch: PrefetchState,
    pub(super) last_used: Instant,
    /// Removed from the table (ended, expired, evicted or shut down): a request that still
    /// holds a reference records nothing more in it.
    pub(super) retired: bool,
}

impl Session {
    /// Records `leases` (one per key, `readers` locks each); returns the locks they replace (a
    /// previous lease on the same key that expired or whose object was replaced), or, for a
    /// retired session, the new locks themselves, for the caller to release.
    pub(super) fn record(
        &mut self,
        keys: impl IntoIterator<Item = ObjectKey>,
        leases: impl IntoIterator<Item = ReadLease>,
        readers: u32,
    ) -> Vec<HeldLock> {
        let mut stale = Vec::new();
        if self.retired {
            stale.extend(leases.into_iter().map(|lease| HeldLock {
                lease,
                remaining: readers,
            }));
            return stale;
        }
        for (k, lease) in keys.into_iter().zip(leases) {
            let fresh = HeldLock {
                lease,
                remaining: readers,
            };
            match self.locks.get_mut(&k) {
                Some(held) if held.lease == lease => held.remaining += readers,
                Some(held) => stale.push(std::mem::replace(held, fresh)),
                None => {
                    self.locks.insert(k, fresh);
                }
            }
        }
        stale
    }

    /// Takes one lock per occurrence of each key, all or nothing.
    pub(super) fn take(
        &mut self,
        keys: &[ObjectKey],
        object_len: u64,
    ) -> Result<Vec<ReadLease>, TakeError> {
        // Locks needed per distinct key (a key repeated in the range needs one per occurrence).
        let mut need: KeyMap<&ObjectKey, (u32, usize)> =
            KeyMap::with_capacity_and_hasher(keys.len(), Default::default());
        for (i, k) in keys.iter().enumerate() {
            need.entry(k).or_insert((0, i)).0 += 1;
        }
        for (i, k) in keys.iter().enumerate() {
            let (n, first) = need.get(k).copied().unwrap_or((1, i));
            if first != i {
                continue;
            }
            match self.locks.get(k) {
                Some(h) if h.remaining >= n && h.lease.alloc.len == object_len => {}
                Some(h) if h.remaining > 0 && h.lease.alloc.len != object_len => {
                    return Err(TakeError::WrongSize {
                        chunk: i,
                        cached: h.lease.alloc.len,
                        expected: object_len,
                    });
                }
                _ => return Err(TakeError::NotLocked(i)),
            }
        }
        let mut leases = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(h) = self.locks.get_mut(k) {
                h.remaining -= 1;
                leases.push(h.lease);
                if h.remaining == 0 {
                    self.locks.remove(k);
                }
            }
        }
        self.shrink_locks();
        Ok(leases)
    }

    /// Gives the lock map's memory back once it holds under a quarter of its capacity (O(len)
    /// under this session's mutex only, amortised over the removals that emptied it).
    pub(super) fn shrink_locks(&mut self) {
        if self.locks.capacity() > 64 && self.locks.len() < self.locks.capacity() / 4 {
            self.locks.shrink_to(self.locks.len() * 2);
        }
    }
}

/// A hashed range of a request: its object keys and, for KV events, its chunk hashes.
#[derive(Debug)]
pub struct ChunkSpan {
    /// Object keys (chunk-major; one per chunk for a single worker).
    pub keys: Vec<ObjectKey>,
    /// The chunk hashes of the range, in order.
    pub hashes: Vec<kvtier_core::hash::ChunkHash>,
    /// The hash of the chunk before the range (`None` for a range starting at token 0).
    pub parent: Option<kvtier_core::hash::ChunkHash>,
    /// The model name, shared.
    pub model: Arc<str>,
    /// The token offsets the span covers (`token_ids[tokens]`).
    pub tokens: std::ops::Range<usize>,
}

impl ChunkSpan {
    /// The span's tokens in `key`.
    pub fn token_ids<'k>(&self, key: &'k IpcKey) -> &'k [u32] {
        key.token_ids.get(self.tokens.clone()).unwrap_or(&[])
    }
}

/// A session shared between the table and the requests using it.
pub type SessionRef = Arc<Mutex<Session>>;
