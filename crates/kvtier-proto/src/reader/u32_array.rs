//! Arrays of `u32` ints (token ids): the one hot decode loop of the protocol, branch-free while
//! eight bytes are left and exact down to the element that fails.

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
        // Branch-free while 8 bytes are left: the marker's row of `UINT_DECODE` gives the
        // width, shift and mask, so no branch depends on the id's width (random widths
        // mispredict about every other id in the branchy form; docs/performance.md). The
        // position is an index into one slice, so the only work between one id's marker and
        // the next one's load is the table lookup and an add.
        let buf = self.rest;
        let mut pos = 0usize;
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
