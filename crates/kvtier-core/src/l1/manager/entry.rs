//! One object's record in the slot table: [`Entry`], packed to 60 bytes (64 with its slot's
//! generation), its phase (staging, ready, quarantined) and flags in one word with the
//! namespace id, and its deadline or reservation number in one shared field. See the type docs
//! for which fields share storage in which phase.

use std::num::NonZeroU32;

use super::super::namespace::{MAX_NAMESPACES, NsId};
use crate::hash::ChunkHash;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Staging,
    Ready,
    /// A staging object whose write TTL lapsed: out of the index, memory held (module docs).
    Quarantined,
}

/// Bits of [`Entry::word`] above the namespace id: the phase (1..=3, so the word is never 0 and
/// `Option<Entry>` needs no tag), `temporary` and `doomed`.
const NS_MASK: u32 = MAX_NAMESPACES - 1;
const PHASE_SHIFT: u32 = 28;
const PHASE_MASK: u32 = 3 << PHASE_SHIFT;
pub(super) const TEMPORARY: u32 = 1 << 30;
const DOOMED: u32 = 1 << 31;
/// [`Entry::timer`] of an entry that is in no expiry queue.
pub(super) const NO_DEADLINE: u64 = u64::MAX;

/// One object. Packed to 60 bytes, 64 with its slot's generation (issue 18: at most 100 bytes
/// per object for everything the L1 keeps): the key is the chunk hash plus an interned
/// namespace (`l1::namespace`), the allocation is in alignment units and `u32` bytes, the
/// deadline is nanoseconds of the manager's [`Clock`](super::Clock), and fields that are never needed at the
/// same time share storage:
/// - `timer` is the deadline (or [`NO_DEADLINE`]) while staging or read-locked, and the full
///   reservation number while quarantined (which has no deadline);
/// - `epoch` is the low 32 bits of the reservation number while staging (no reader can hold a
///   lease on a staging object), and the read epoch from the publish on (starting at 0).
///
/// `repr(packed(4))` lets the `u64` sit at a 4-byte offset (no padding); only `timer` is
/// affected, and it is only ever read and written by value.
#[repr(C, packed(4))]
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub(super) hash: ChunkHash,
    /// Namespace id (low 28 bits) and flags, see [`NS_MASK`].
    pub(super) word: NonZeroU32,
    /// Offset in units of the allocator's alignment (`L1Manager::with_clock` keeps the pool
    /// below 2^32 units).
    pub(super) offset: u32,
    /// Object length in bytes (longer objects are refused).
    pub(super) len: u32,
    pub(super) timer: u64,
    pub(super) readers: u32,
    pub(super) epoch: u32,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 64);

impl Entry {
    pub(super) fn ns(&self) -> NsId {
        self.word.get() & NS_MASK
    }

    pub(super) fn key(&self) -> (ChunkHash, NsId) {
        (self.hash, self.ns())
    }

    pub(super) fn phase(&self) -> Phase {
        match (self.word.get() & PHASE_MASK) >> PHASE_SHIFT {
            1 => Phase::Staging,
            2 => Phase::Ready,
            _ => Phase::Quarantined,
        }
    }

    pub(super) fn set_word(&mut self, word: u32) {
        // The phase bits are never 0, see `Phase::bits`.
        if let Some(w) = NonZeroU32::new(word) {
            self.word = w;
        }
    }

    pub(super) fn set_phase(&mut self, phase: Phase) {
        self.set_word((self.word.get() & !PHASE_MASK) | phase.bits());
    }

    pub(super) fn temporary(&self) -> bool {
        self.word.get() & TEMPORARY != 0
    }

    pub(super) fn doomed(&self) -> bool {
        self.word.get() & DOOMED != 0
    }

    pub(super) fn set_doomed(&mut self, doomed: bool) {
        let w = self.word.get() & !DOOMED;
        self.set_word(if doomed { w | DOOMED } else { w });
    }

    /// The entry's current position in the expiry queue (write TTL while staging, read TTL
    /// while read-locked).
    pub(super) fn deadline(&self) -> Option<u64> {
        let t = self.timer;
        (self.phase() != Phase::Quarantined && t != NO_DEADLINE).then_some(t)
    }

    pub(super) fn take_deadline(&mut self) -> Option<u64> {
        let d = self.deadline();
        if d.is_some() {
            self.timer = NO_DEADLINE;
        }
        d
    }

    pub(super) fn replace_deadline(&mut self, deadline: u64) -> Option<u64> {
        let d = self.deadline();
        self.timer = deadline;
        d
    }

    /// Reservation number of a quarantined entry.
    pub(super) fn quarantine_seq(&self) -> u64 {
        self.timer
    }
}

impl Phase {
    pub(super) fn bits(self) -> u32 {
        let n = match self {
            Phase::Staging => 1,
            Phase::Ready => 2,
            Phase::Quarantined => 3,
        };
        n << PHASE_SHIFT
    }
}

/// Bytes reserved for an object of `len` bytes at alignment `align` (a power of two).
pub(super) fn reserved_of(len: u32, align: u64) -> u64 {
    (u64::from(len) + align - 1) & !(align - 1)
}

#[derive(Debug, Default)]
pub(super) struct Slot {
    pub(super) generation: u32,
    pub(super) entry: Option<Entry>,
}
