//! Arrays of `u32` ints (token ids): the one hot decode loop of the protocol, branch-free while
//! eight bytes are left and exact down to the element that fails.
//!
//! **Several chains at once.** Decoding is one long dependency chain: an element's marker
//! gives its width, which gives the next marker's position, ~19 cycles per id on this
//! project's test VM whatever the loop does besides. Long arrays are therefore cut into
//! [`CHAINS`] stretches decoded in the same loop, so the CPU overlaps their chains: the first
//! stretch from the array's start (the true chain), each other one from a byte offset guessed
//! from the first [`SAMPLE`] ids' average width. A guessed offset may fall inside an element;
//! a speculative chain then reads payload bytes as markers (anything that is not a marker
//! counts as one byte) until it lands on a real marker, after which it walks the true element
//! boundaries, because a msgpack value decodes the same wherever its first byte is reached from.
//! Each speculative chain records the offset of every element it read. When the true chain
//! arrives at an offset the next stretch recorded, the stretch's values from there on are the
//! array's (the true chain carries on through them); where it never arrives, it decodes that
//! stretch itself. A speculative element whose marker was not a `u32` marker is never taken:
//! the exact loop decodes from there and reports the error with its index. So the chained
//! decode returns exactly what the one-chain loop returns, for every input
//! (`chained_decode_equals_the_plain_loop` checks it on random, text-like, misaligned and broken
//! arrays).

use std::cell::RefCell;

use super::{Path, Reader};
use crate::error::ProtoError;

impl Reader<'_> {
    /// Reads an array of ints that each fit in `u32`.
    ///
    /// # Errors
    /// A decode error naming the first offending index and value.
    pub fn read_u32_array(&mut self, path: &Path<'_>) -> Result<Vec<u32>, ProtoError> {
        let len = self.read_array_len(path)?;
        let mut out = Vec::with_capacity(self.capacity_hint(len));
        self.read_u32_elements(0..len, &mut out, path)?;
        Ok(out)
    }

    /// Reads the elements `indices` of an array of ints that each fit in `u32` (the header and
    /// any earlier elements already read), appending them to `out`; `path` is the array's.
    ///
    /// # Errors
    /// A decode error naming the first offending index and value.
    pub fn read_u32_elements(
        &mut self,
        indices: std::ops::Range<u32>,
        out: &mut Vec<u32>,
        path: &Path<'_>,
    ) -> Result<(), ProtoError> {
        // Token ids: the element path is built only for an element the fast paths decline.
        let mut indices = indices;
        let buf = self.rest;
        let mut pos = 0usize;
        if indices.len() >= CHAINED_MIN {
            let (decoded, used) = decode_chained(buf, indices.len(), out);
            let decoded = u32::try_from(decoded).unwrap_or(u32::MAX);
            indices = indices.start.saturating_add(decoded)..indices.end;
            pos = used;
        }
        // Branch-free while 8 bytes are left: the marker's row of `UINT_DECODE` gives the
        // width, shift and mask, so no branch depends on the id's width (random widths
        // mispredict about every other id in the branchy form; docs/performance.md). The
        // position is an index into one slice, so the only work between one id's marker and
        // the next one's load is the table lookup and an add.
        let fast_end = buf.len().saturating_sub(7);
        while pos < fast_end {
            let Some(word) = buf.get(pos..pos + 8).and_then(|w| w.first_chunk::<8>()) else {
                break;
            };
            let x = u64::from_be_bytes(*word);
            let d = UINT_DECODE[(x >> 56) as usize];
            if d.width == 0 || indices.next().is_none() {
                break;
            }
            out.push((x >> d.shift) as u32 & d.mask);
            pos += usize::from(d.width);
        }
        self.rest = buf.get(pos..).unwrap_or_default();
        for i in indices {
            if let Some((v, used)) = small_uint(self.rest) {
                self.rest = &self.rest[used..];
                out.push(v);
            } else {
                let index = usize::try_from(i).unwrap_or(usize::MAX);
                out.push(self.read_u32(&path.index(index))?);
            }
        }
        Ok(())
    }
}

/// Arrays with at least this many elements left are decoded by [`decode_chained`].
const CHAINED_MIN: usize = 256;

/// Dependency chains decoded at once (the true one and `CHAINS - 1` speculative ones).
const CHAINS: usize = 4;

/// Elements the true chain decodes alone first; their average width places the other chains.
const SAMPLE: usize = 32;

/// One element at `pos` (which must be below `fast_end`, so 8 bytes are readable):
/// `(value, width)`, width 0 for a marker that is not a `u32` int's.
#[inline(always)]
fn decode_at(buf: &[u8], pos: usize) -> (u32, usize) {
    match buf.get(pos..pos + 8).and_then(|w| w.first_chunk::<8>()) {
        Some(word) => {
            let x = u64::from_be_bytes(*word);
            let d = UINT_DECODE[(x >> 56) as usize];
            ((x >> d.shift) as u32 & d.mask, usize::from(d.width))
        }
        None => (0, 0),
    }
}

/// A speculative chain: from a guessed offset, every element's offset and value, and the
/// indices of the elements whose marker was not a `u32` int's (read as one byte).
struct Stretch {
    offsets: Vec<usize>,
    values: Vec<u32>,
    not_uint: Vec<usize>,
    /// Where the element after the last one starts.
    end: usize,
}

thread_local! {
    /// The speculative chains' buffers, kept per thread between decodes (a fresh allocation
    /// and its first touch cost as much as the chains save on a 1,024-id array).
    static STRETCHES: RefCell<Vec<Stretch>> = const { RefCell::new(Vec::new()) };
}

/// A thread's kept [`Stretch`] buffers are dropped past this many elements.
const STRETCH_KEEP_MAX: usize = 1 << 16;

impl Stretch {
    /// Empties `self` for a chain from `start`, keeping the buffers' memory.
    fn reset(&mut self, start: usize, capacity: usize) {
        self.offsets.clear();
        self.values.clear();
        self.not_uint.clear();
        self.offsets.reserve(capacity);
        self.values.reserve(capacity);
        self.end = start;
    }

    #[inline(always)]
    fn step(&mut self, buf: &[u8], fast_end: usize) {
        let pos = self.end;
        if pos < fast_end {
            let (v, w) = decode_at(buf, pos);
            if w == 0 {
                self.not_uint.push(self.values.len());
            }
            self.offsets.push(pos);
            self.values.push(v);
            self.end = pos + w.max(1);
        }
    }

    /// Where the element with index `i` (at most `values.len()`) starts.
    fn offset(&self, i: usize) -> usize {
        self.offsets.get(i).copied().unwrap_or(self.end)
    }
}

/// Decodes up to `count` elements of a `u32` array from the start of `buf` into `out` with
/// [`CHAINS`] dependency chains (module docs); returns `(elements, bytes)` decoded. It stops
/// early, leaving the rest (and any error) to the exact loop, never decoding anything that loop
/// would not.
fn decode_chained(buf: &[u8], count: usize, out: &mut Vec<u32>) -> (usize, usize) {
    STRETCHES.with(|kept| match kept.try_borrow_mut() {
        Ok(mut stretches) => {
            let r = decode_chained_with(buf, count, out, &mut stretches);
            if stretches
                .iter()
                .any(|s| s.values.capacity() > STRETCH_KEEP_MAX)
            {
                stretches.clear();
                stretches.shrink_to_fit();
            }
            r
        }
        Err(_) => decode_chained_with(buf, count, out, &mut Vec::new()),
    })
}

fn decode_chained_with(
    buf: &[u8],
    count: usize,
    out: &mut Vec<u32>,
    stretches: &mut Vec<Stretch>,
) -> (usize, usize) {
    let fast_end = buf.len().saturating_sub(7);
    let mut t = TrueChain { pos: 0, done: 0 };
    // The true chain alone, for the sample.
    while t.done < SAMPLE.min(count) {
        if !t.step(buf, fast_end, out) {
            return (t.done, t.pos);
        }
    }
    let (done, pos) = (t.done, t.pos);
    if done < SAMPLE || count - done < CHAINS * SAMPLE {
        return (done, pos);
    }
    // Place the speculative chains `per` elements apart at the sample's average width; each
    // runs a little longer than `per` so that the chain before it can find it.
    let per = (count - done) / CHAINS;
    let steps = (per + per / 16 + 8).min(count - done);
    let starts = (1..CHAINS)
        .map(|c| pos + c * per * pos / done)
        .take_while(|&start| start < fast_end);
    let mut used = 0;
    for start in starts {
        if stretches.len() == used {
            stretches.push(Stretch {
                offsets: Vec::new(),
                values: Vec::new(),
                not_uint: Vec::new(),
                end: start,
            });
        }
        stretches[used].reset(start, steps);
        used += 1;
    }
    let stretches = &mut stretches[..used];
    // The lockstep loop: the true chain writes `out` directly.
    for n in 0..steps {
        if n < per && !t.step(buf, fast_end, out) {
            return (t.done, t.pos);
        }
        for s in stretches.iter_mut() {
            s.step(buf, fast_end);
        }
    }
    // Join the stretches in order: carry the true chain on until it stands on an element a
    // stretch read, then take the stretch's values from there.
    for s in stretches.iter() {
        let mut j = 0usize;
        while t.done < count {
            while j < s.offsets.len() && s.offsets[j] < t.pos {
                j += 1;
            }
            if j == s.offsets.len() {
                // This stretch ends before the true chain: nothing to take from it.
                break;
            }
            if s.offsets[j] == t.pos {
                let want = (count - t.done).min(s.values.len() - j);
                let first_bad = s.not_uint.partition_point(|&i| i < j);
                let take = s
                    .not_uint
                    .get(first_bad)
                    .map_or(want, |&bad| want.min(bad - j));
                out.extend_from_slice(&s.values[j..j + take]);
                t.done += take;
                t.pos = s.offset(j + take);
                if take < want {
                    // A non-u32 marker: the exact loop takes it from here.
                    return (t.done, t.pos);
                }
                break;
            }
            // Not on the stretch's path (yet): one more element of the true chain.
            if !t.step(buf, fast_end, out) {
                return (t.done, t.pos);
            }
        }
    }
    (t.done, t.pos)
}

/// The true chain of [`decode_chained`]: where its next element starts and how many it has
/// decoded into `out`.
struct TrueChain {
    pos: usize,
    done: usize,
}

impl TrueChain {
    /// Decodes one element into `out`; `false`, decoding nothing, at a marker that is not a
    /// `u32` int's or where fewer than 8 bytes are left (the exact loop's cases).
    #[inline(always)]
    fn step(&mut self, buf: &[u8], fast_end: usize, out: &mut Vec<u32>) -> bool {
        if self.pos >= fast_end {
            return false;
        }
        let (v, w) = decode_at(buf, self.pos);
        if w == 0 {
            return false;
        }
        out.push(v);
        self.pos += w;
        self.done += 1;
        true
    }
}

/// How to read a msgpack unsigned int of at most 32 bits from the 8 bytes starting at its
/// marker, taken big-endian as a `u64`: `(x >> shift) as u32 & mask`, `width` bytes long;
/// `width == 0` for every other marker.
#[derive(Clone, Copy)]
struct UintDecode {
    width: u8,
    shift: u8,
    mask: u32,
}

/// [`UintDecode`] by marker byte.
static UINT_DECODE: [UintDecode; 256] = {
    let mut t = [UintDecode {
        width: 0,
        shift: 0,
        mask: 0,
    }; 256];
    let mut m = 0;
    while m < 0x80 {
        // positive fixint: the marker is the value
        t[m] = UintDecode {
            width: 1,
            shift: 56,
            mask: 0x7f,
        };
        m += 1;
    }
    t[0xcc] = UintDecode {
        width: 2,
        shift: 48,
        mask: 0xff,
    };
    t[0xcd] = UintDecode {
        width: 3,
        shift: 40,
        mask: 0xffff,
    };
    t[0xce] = UintDecode {
        width: 5,
        shift: 24,
        mask: u32::MAX,
    };
    t
};

/// A msgpack unsigned int of at most 32 bits at the start of `buf`: `(value, bytes used)`;
/// `None` for any other marker or a truncated value.
#[inline]
pub(super) fn small_uint(buf: &[u8]) -> Option<(u32, usize)> {
    match *buf.first()? {
        b @ 0x00..=0x7f => Some((u32::from(b), 1)),
        0xcc => Some((u32::from(*buf.get(1)?), 2)),
        0xcd => {
            let b: [u8; 2] = buf.get(1..3)?.try_into().ok()?;
            Some((u32::from(u16::from_be_bytes(b)), 3))
        }
        0xce => {
            let b: [u8; 4] = buf.get(1..5)?.try_into().ok()?;
            Some((u32::from_be_bytes(b), 5))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reference: every element through the generic `read_u32`, one at a time.
    fn one_by_one(bytes: &[u8]) -> (Result<Vec<u32>, String>, usize) {
        let mut r = Reader::new(bytes);
        let path = root();
        let out = (|| {
            let len = r.read_array_len(&path)?;
            (0..len)
                .map(|i| r.read_u32(&path.index(i as usize)))
                .collect::<Result<Vec<u32>, ProtoError>>()
        })();
        (out.map_err(|e| e.to_string()), r.remaining().len())
    }

    /// One element: an int in some encoding, or (rarely) something that is not a u32.
    fn element() -> impl Strategy<Value = Vec<u8>> {
        let minimal = |v: u64| {
            let mut e = Vec::new();
            rmp::encode::write_uint(&mut e, v).expect("vec write");
            e
        };
        prop_oneof![
            40 => (0u64..128_000).prop_map(minimal),
            30 => (0u32..17).prop_map(move |b| minimal(1u64 << b)),
            10 => (0u64..128).prop_map(minimal),
            3 => any::<u32>().prop_map(|v| { let mut e = vec![0xce]; e.extend_from_slice(&v.to_be_bytes()); e }),
            1 => any::<u64>().prop_map(|v| { let mut e = vec![0xcf]; e.extend_from_slice(&(v >> (v % 64)).to_be_bytes()); e }),
            1 => Just(vec![0xc0]),
            1 => any::<i8>().prop_map(|v| vec![0xd0, v.to_be_bytes()[0]]),
            1 => (0u8..=255).prop_map(|b| vec![b]),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// Whatever the array (long enough to be chained or not, broken anywhere, followed by
        /// anything), the chained decode answers exactly what decoding one element at a time
        /// does: the same ids, or the same error at the same index, and the same bytes left.
        #[test]
        fn chained_decode_equals_the_plain_loop(
            elements in proptest::collection::vec(element(), 0..1500),
            valid_prefix in any::<prop::sample::Index>(),
            declared_extra in 0u32..3,
            trailer in proptest::collection::vec(any::<u8>(), 0..24),
        ) {
            // Mostly valid arrays (errors only after `valid_prefix`), so long chained runs occur.
            let cut = valid_prefix.index(elements.len() + 1);
            let mut buf = Vec::new();
            let n = u32::try_from(elements.len()).expect("small") + declared_extra;
            rmp::encode::write_array_len(&mut buf, n).expect("vec write");
            for (i, e) in elements.iter().enumerate() {
                let valid = small_uint(e).is_some_and(|(_, used)| used == e.len());
                if i < cut && !valid {
                    buf.push(0x05);
                } else {
                    buf.extend_from_slice(e);
                }
            }
            buf.extend_from_slice(&trailer);
            let mut r = Reader::new(&buf);
            let got = r.read_u32_array(&root()).map_err(|e| e.to_string());
            let (want, left) = one_by_one(&buf);
            prop_assert_eq!(&got, &want);
            if got.is_ok() {
                prop_assert_eq!(r.remaining().len(), left);
            }
        }
    }

    #[test]
    fn chained_decode_of_long_valid_arrays() {
        // Widths that change by region (the guessed offsets are far off) and uniform ones.
        let regions: Vec<u32> = (0..20_000u32)
            .map(|i| match (i / 3000) % 3 {
                0 => i % 100,
                1 => 70_000 + i,
                _ => 300 + i % 1000,
            })
            .collect();
        for ids in [
            regions,
            (0..5000).collect(),
            vec![7; 4096],
            (0..4096).map(|i| i * 40_000).collect(),
        ] {
            let mut buf = Vec::new();
            rmp::encode::write_array_len(&mut buf, ids.len() as u32).expect("vec write");
            for &v in &ids {
                rmp::encode::write_uint(&mut buf, u64::from(v)).expect("vec write");
            }
            buf.extend_from_slice(&[0xa1, b'x']);
            let mut r = Reader::new(&buf);
            assert_eq!(r.read_u32_array(&root()).expect("decodes"), ids);
            assert_eq!(r.remaining(), &[0xa1, b'x']);
        }
    }

    fn root() -> Path<'static> {
        Path::Root("v")
    }

    #[test]
    fn u32_array_every_width_in_both_decode_paths() {
        // Each boundary value in every encoding that holds it (fixint, uint8, uint16, uint32,
        // and the wider forms the slow path takes), followed by nothing or by enough bytes for
        // the branch-free path.
        let values = [0u32, 1, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x1_0000, u32::MAX];
        let mut elems: Vec<(Vec<u8>, u32)> = Vec::new();
        for &v in &values {
            let mut e = Vec::new();
            rmp::encode::write_uint(&mut e, u64::from(v)).expect("vec write");
            elems.push((e, v));
            if let Ok(b) = u8::try_from(v) {
                elems.push((vec![0xcc, b], v));
            }
            if let Ok(h) = u16::try_from(v) {
                let mut e = vec![0xcd];
                e.extend_from_slice(&h.to_be_bytes());
                elems.push((e, v));
            }
            let mut e = vec![0xce];
            e.extend_from_slice(&v.to_be_bytes());
            elems.push((e, v));
            let mut e = vec![0xcf];
            e.extend_from_slice(&u64::from(v).to_be_bytes());
            elems.push((e, v));
            if let Ok(n) = i8::try_from(v) {
                elems.push((vec![0xd0, n.to_be_bytes()[0]], v));
            }
        }
        for trailer in [0usize, 9] {
            let mut buf = Vec::new();
            rmp::encode::write_array_len(&mut buf, elems.len() as u32).expect("vec write");
            for (e, _) in &elems {
                buf.extend_from_slice(e);
            }
            buf.extend(std::iter::repeat_n(0xc0, trailer));
            let mut r = Reader::new(&buf);
            let got = r.read_u32_array(&root()).expect("decodes");
            let want: Vec<u32> = elems.iter().map(|&(_, v)| v).collect();
            assert_eq!(got, want, "trailer {trailer}");
            assert_eq!(r.remaining().len(), trailer);
        }
        // Out-of-range and non-int elements are refused in the fast path's reach too.
        for bad in [
            vec![0xcfu8, 0, 0, 0, 1, 0, 0, 0, 0],
            vec![0xd0, 0xff],
            vec![0xc2],
        ] {
            let mut buf = vec![0x92, 0x05];
            buf.extend_from_slice(&bad);
            buf.extend(std::iter::repeat_n(0xc0, 9));
            let e = Reader::new(&buf).read_u32_array(&root());
            assert!(
                e.as_ref().is_err_and(|e| e.to_string().contains("v[1]")),
                "{bad:x?}: {e:?}"
            );
        }
    }
}
