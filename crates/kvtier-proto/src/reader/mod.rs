//! A strict, streaming msgpack reader over a borrowed byte slice.
//!
//! [`Reader`] is a cursor built on `rmp::decode` that reads exactly the msgpack types the
//! payload schemas allow, the way msgspec decodes typed values:
//! - an int is any msgpack int form (fixint, uint8..64, int8..64); bool, float and str are not ints;
//! - a bool is only a msgpack bool; a str is only a msgpack str (UTF-8 checked), never bin;
//!   bytes are only msgpack bin, never str;
//! - a float is float32, float64 or an int (msgspec's `float` accepts ints).
//!
//! Invariants:
//! - No method panics or overflows on any input. Lengths come from the input, so every
//!   `Vec::with_capacity` is capped by the bytes left in the frame (each element takes at least
//!   one byte), which bounds allocation by the frame size.
//! - Strings and bins are returned borrowed from the input (`&'a str`, `&'a [u8]`); the reader
//!   itself never allocates on success.
//! - [`Reader::skip_value`] is iterative and refuses containers nested deeper than [`MAX_DEPTH`],
//!   so hostile nesting cannot overflow the stack.
//! - Every error names the field path ([`Path`]) of the value being read; the path is rendered
//!   to a `String` only when an error is built.
//! - After an error the reader position is unspecified; callers abandon the frame.

use rmp::Marker;
use rmp::decode::{NumValueReadError, ValueReadError};

use crate::error::ProtoError;

mod path;
mod u32_array;

pub use path::Path;
use u32_array::small_uint;

/// Deepest container nesting [`Reader::skip_value`] accepts.
pub const MAX_DEPTH: usize = 64;

/// Builds a [`ProtoError::Decode`] for `path`.
pub(crate) fn decode_error(path: &Path<'_>, reason: impl Into<String>) -> ProtoError {
    ProtoError::Decode {
        path: path.to_string(),
        reason: reason.into(),
    }
}

fn eof(path: &Path<'_>) -> ProtoError {
    decode_error(path, "unexpected end of input")
}

fn type_error(path: &Path<'_>, expected: &str, found: Marker) -> ProtoError {
    decode_error(
        path,
        format!("expected {expected}, found {}", marker_type_name(found)),
    )
}

fn range_error(path: &Path<'_>, value: i128, target: &str) -> ProtoError {
    decode_error(path, format!("value {value} does not fit in {target}"))
}

/// The msgpack type family of a marker, for error messages.
#[must_use]
pub fn marker_type_name(marker: Marker) -> &'static str {
    match marker {
        Marker::Null => "nil",
        Marker::True | Marker::False => "bool",
        Marker::FixPos(_)
        | Marker::FixNeg(_)
        | Marker::U8
        | Marker::U16
        | Marker::U32
        | Marker::U64
        | Marker::I8
        | Marker::I16
        | Marker::I32
        | Marker::I64 => "int",
        Marker::F32 | Marker::F64 => "float",
        Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => "str",
        Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => "bin",
        Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => "array",
        Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => "map",
        Marker::FixExt1
        | Marker::FixExt2
        | Marker::FixExt4
        | Marker::FixExt8
        | Marker::FixExt16
        | Marker::Ext8
        | Marker::Ext16
        | Marker::Ext32 => "ext",
        Marker::Reserved => "reserved marker 0xc1",
    }
}

/// Whether `marker` starts an integer (the type families are listed once, in
/// [`marker_type_name`]).
fn is_int_marker(marker: Marker) -> bool {
    marker_type_name(marker) == "int"
}

fn is_str_marker(marker: Marker) -> bool {
    matches!(
        marker,
        Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32
    )
}

fn value_error<E: rmp::decode::RmpReadErr>(
    path: &Path<'_>,
    expected: &str,
    err: ValueReadError<E>,
) -> ProtoError {
    match err {
        ValueReadError::TypeMismatch(marker) => type_error(path, expected, marker),
        ValueReadError::InvalidMarkerRead(_) | ValueReadError::InvalidDataRead(_) => eof(path),
    }
}

/// A cursor over one msgpack frame (or one ext payload).
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader positioned at the start of `buf`.
    #[must_use]
    pub fn new(buf: &'a [u8]) -> Self {
        Self { rest: buf }
    }

    /// The bytes not read yet.
    #[must_use]
    pub fn remaining(&self) -> &'a [u8] {
        self.rest
    }

    /// Whether every byte has been read.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Checks that the whole input was consumed.
    ///
    /// # Errors
    /// [`ProtoError::TrailingBytes`] if bytes remain.
    pub fn finish(&self, path: &Path<'_>) -> Result<(), ProtoError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::TrailingBytes {
                path: path.to_string(),
            })
        }
    }

    /// An upper bound for the capacity of a `len`-element container: every msgpack value
    /// takes at least one byte, so no more than the remaining byte count can follow.
    #[must_use]
    pub fn capacity_hint(&self, len: u32) -> usize {
        usize::try_from(len)
            .unwrap_or(usize::MAX)
            .min(self.rest.len())
    }

    /// The marker of the next value, without consuming it.
    ///
    /// # Errors
    /// A decode error at end of input.
    pub fn peek_marker(&self, path: &Path<'_>) -> Result<Marker, ProtoError> {
        self.rest
            .first()
            .map(|&b| Marker::from_u8(b))
            .ok_or_else(|| eof(path))
    }

    /// Whether the next value is nil (false at end of input).
    #[must_use]
    pub fn peek_is_nil(&self) -> bool {
        self.rest.first() == Some(&Marker::Null.to_u8())
    }

    fn take(&mut self, len: u32, path: &Path<'_>) -> Result<&'a [u8], ProtoError> {
        let len = usize::try_from(len).map_err(|_| eof(path))?;
        let (head, tail) = self.rest.split_at_checked(len).ok_or_else(|| eof(path))?;
        self.rest = tail;
        Ok(head)
    }

    fn take_be<const N: usize>(&mut self, path: &Path<'_>) -> Result<[u8; N], ProtoError> {
        let (head, tail) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or_else(|| eof(path))?;
        self.rest = tail;
        Ok(*head)
    }

    fn read_marker(&mut self, path: &Path<'_>) -> Result<Marker, ProtoError> {
        rmp::decode::read_marker(&mut self.rest).map_err(|_| eof(path))
    }

    /// Reads an int in any msgpack int form, widened to `i128` (covers `i64::MIN..=u64::MAX`).
    ///
    /// # Errors
    /// A decode error for any non-int value (bool, float, str, ...) or truncated input.
    pub fn read_int(&mut self, path: &Path<'_>) -> Result<i128, ProtoError> {
        rmp::decode::read_int::<i128, _>(&mut self.rest).map_err(|e| match e {
            NumValueReadError::TypeMismatch(marker) => type_error(path, "int", marker),
            NumValueReadError::OutOfRange => decode_error(path, "int out of range"),
            NumValueReadError::InvalidMarkerRead(_) | NumValueReadError::InvalidDataRead(_) => {
                eof(path)
            }
        })
    }

    /// Reads an int that must fit in `u32`.
    ///
    /// # Errors
    /// A decode error naming the value when it is negative or ≥ 2^32, or not an int.
    pub fn read_u32(&mut self, path: &Path<'_>) -> Result<u32, ProtoError> {
        // Fast path for the encodings token ids take (positive fixint, uint8/16/32): a lookup
        // or store carries thousands of them, and the generic reader widens each to i128. Any
        // other marker (negative, int64, not an int, truncated) takes the generic path, which
        // names the error.
        if let Some((v, used)) = small_uint(self.rest) {
            self.rest = &self.rest[used..];
            return Ok(v);
        }
        let v = self.read_int(path)?;
        u32::try_from(v).map_err(|_| range_error(path, v, "u32"))
    }

    /// Reads an int that must fit in `u64`.
    ///
    /// # Errors
    /// A decode error naming the value when it is negative, or not an int.
    pub fn read_u64(&mut self, path: &Path<'_>) -> Result<u64, ProtoError> {
        let v = self.read_int(path)?;
        u64::try_from(v).map_err(|_| range_error(path, v, "u64"))
    }

    /// Reads an int that must fit in `i64`.
    ///
    /// # Errors
    /// A decode error naming the value when it is ≥ 2^63, or not an int.
    pub fn read_i64(&mut self, path: &Path<'_>) -> Result<i64, ProtoError> {
        let v = self.read_int(path)?;
        i64::try_from(v).map_err(|_| range_error(path, v, "i64"))
    }

    /// Reads a msgpack bool (ints are not accepted).
    ///
    /// # Errors
    /// A decode error for any other type.
    pub fn read_bool(&mut self, path: &Path<'_>) -> Result<bool, ProtoError> {
        rmp::decode::read_bool(&mut self.rest).map_err(|e| value_error(path, "bool", e))
    }

    /// Reads a bool the way Python's `bool()` coerces an untyped int or bool: a msgpack bool,
    /// or an int where any nonzero value is true. Used only for top-level `bool` frames.
    ///
    /// # Errors
    /// A decode error for any other type.
    pub fn read_bool_or_int(&mut self, path: &Path<'_>) -> Result<bool, ProtoError> {
        match self.peek_marker(path)? {
            Marker::True | Marker::False => self.read_bool(path),
            marker if is_int_marker(marker) => Ok(self.read_int(path)? != 0),
            marker => Err(type_error(path, "bool or int", marker)),
        }
    }

    /// Reads a msgpack str (not bin), borrowed from the input.
    ///
    /// # Errors
    /// A decode error for any other type or invalid UTF-8.
    pub fn read_str(&mut self, path: &Path<'_>) -> Result<&'a str, ProtoError> {
        let len =
            rmp::decode::read_str_len(&mut self.rest).map_err(|e| value_error(path, "str", e))?;
        let bytes = self.take(len, path)?;
        std::str::from_utf8(bytes).map_err(|_| decode_error(path, "str is not valid utf-8"))
    }

    /// Reads a msgpack bin (not str), borrowed from the input.
    ///
    /// # Errors
    /// A decode error for any other type or truncated input.
    pub fn read_bin(&mut self, path: &Path<'_>) -> Result<&'a [u8], ProtoError> {
        let len =
            rmp::decode::read_bin_len(&mut self.rest).map_err(|e| value_error(path, "bin", e))?;
        self.take(len, path)
    }

    /// Reads nil as `None`, otherwise decodes the value with `read`.
    ///
    /// # Errors
    /// Whatever `read` returns.
    pub fn read_nil_or<T>(
        &mut self,
        path: &Path<'_>,
        read: impl FnOnce(&mut Self, &Path<'_>) -> Result<T, ProtoError>,
    ) -> Result<Option<T>, ProtoError> {
        if self.peek_is_nil() {
            self.rest = self.rest.get(1..).unwrap_or_default();
            Ok(None)
        } else {
            read(self, path).map(Some)
        }
    }

    /// Reads an array header and returns the element count.
    ///
    /// # Errors
    /// A decode error for any other type.
    pub fn read_array_len(&mut self, path: &Path<'_>) -> Result<u32, ProtoError> {
        rmp::decode::read_array_len(&mut self.rest).map_err(|e| value_error(path, "array", e))
    }

    /// Reads a map header and returns the entry count.
    ///
    /// # Errors
    /// A decode error for any other type.
    pub fn read_map_len(&mut self, path: &Path<'_>) -> Result<u32, ProtoError> {
        rmp::decode::read_map_len(&mut self.rest).map_err(|e| value_error(path, "map", e))
    }

    /// Reads a float: float32, float64, or an int converted to `f64` (msgspec's `float`
    /// accepts ints).
    ///
    /// # Errors
    /// A decode error for any other type.
    pub fn read_f64(&mut self, path: &Path<'_>) -> Result<f64, ProtoError> {
        match self.peek_marker(path)? {
            Marker::F32 => rmp::decode::read_f32(&mut self.rest)
                .map(f64::from)
                .map_err(|e| value_error(path, "float", e)),
            Marker::F64 => {
                rmp::decode::read_f64(&mut self.rest).map_err(|e| value_error(path, "float", e))
            }
            // Lossy for |v| > 2^53 (nearest representable), like Python's float(int).
            marker if is_int_marker(marker) => Ok(self.read_int(path)? as f64),
            marker => Err(type_error(path, "float", marker)),
        }
    }

    /// Reads an ext value and returns its type code and payload, borrowed from the input.
    ///
    /// # Errors
    /// A decode error for any other type or truncated input.
    pub fn read_ext(&mut self, path: &Path<'_>) -> Result<(i8, &'a [u8]), ProtoError> {
        let meta =
            rmp::decode::read_ext_meta(&mut self.rest).map_err(|e| value_error(path, "ext", e))?;
        let data = self.take(meta.size, path)?;
        Ok((meta.typeid, data))
    }

    /// Reads an array of any length, decoding each element with `read` (whose path argument is
    /// the element's `path[i]`).
    ///
    /// # Errors
    /// A decode error if the value is not an array, or the first error `read` returns.
    pub fn read_array<T>(
        &mut self,
        path: &Path<'_>,
        mut read: impl FnMut(&mut Self, &Path<'_>) -> Result<T, ProtoError>,
    ) -> Result<Vec<T>, ProtoError> {
        let len = self.read_array_len(path)?;
        let mut out = Vec::with_capacity(self.capacity_hint(len));
        for i in 0..len {
            let index = usize::try_from(i).unwrap_or(usize::MAX);
            out.push(read(self, &path.index(index))?);
        }
        Ok(out)
    }

    /// Moves past the next `n` bytes, which the caller has already interpreted (at most the
    /// bytes left).
    pub fn advance(&mut self, n: usize) {
        self.rest = self.rest.get(n..).unwrap_or_default();
    }

    /// Reads an array of ints that each fit in `u64`.
    ///
    /// # Errors
    /// A decode error naming the first offending index and value.
    pub fn read_u64_array(&mut self, path: &Path<'_>) -> Result<Vec<u64>, ProtoError> {
        self.read_array(path, |r, p| r.read_u64(p))
    }

    /// Reads a struct encoded as a msgpack map keyed by field name (msgspec's default).
    ///
    /// `on_field(reader, key)` must either decode the value of a known field and return
    /// `Ok(true)`, or return `Ok(false)` without reading, in which case the value is skipped
    /// (unknown keys are ignored whatever their type). Key order is irrelevant; a duplicate key
    /// is simply handed to `on_field` again, so the last occurrence wins.
    ///
    /// # Errors
    /// A decode error if the value is not a map or a key is not a str, or the first error
    /// `on_field` or skipping returns.
    pub fn read_struct(
        &mut self,
        path: &Path<'_>,
        mut on_field: impl FnMut(&mut Self, &'a str) -> Result<bool, ProtoError>,
    ) -> Result<(), ProtoError> {
        let len = self.read_map_len(path)?;
        for _ in 0..len {
            let marker = self.peek_marker(path)?;
            if !is_str_marker(marker) {
                return Err(type_error(path, "str map key", marker));
            }
            let key = self.read_str(path)?;
            if !on_field(self, key)? {
                self.skip_value(&path.key(key))?;
            }
        }
        Ok(())
    }

    /// Skips one complete value of any type (nested containers and ext included).
    ///
    /// # Errors
    /// A decode error on truncated input, the reserved marker `0xc1`, or nesting deeper than
    /// [`MAX_DEPTH`].
    pub fn skip_value(&mut self, path: &Path<'_>) -> Result<(), ProtoError> {
        // open[d] = values still to skip in the d-th open container.
        let mut open = [0u64; MAX_DEPTH];
        let mut depth = 0usize;
        loop {
            let children = self.skip_header(path)?;
            if children > 0 {
                let slot = open.get_mut(depth).ok_or_else(|| {
                    decode_error(path, format!("nesting deeper than {MAX_DEPTH} levels"))
                })?;
                *slot = children;
                // `open[depth]` exists, so depth < MAX_DEPTH and this cannot overflow.
                depth += 1;
                continue;
            }
            // A complete value was consumed; close every container it completes.
            loop {
                let Some(parent) = depth.checked_sub(1) else {
                    return Ok(());
                };
                let Some(left) = open.get_mut(parent) else {
                    return Ok(());
                };
                *left = left.saturating_sub(1);
                if *left > 0 {
                    break;
                }
                depth = parent;
            }
        }
    }

    /// Consumes one marker and any scalar data it owns; returns the number of child values
    /// that follow (array elements, or 2 × map entries), 0 for scalars and empty containers.
    fn skip_header(&mut self, path: &Path<'_>) -> Result<u64, ProtoError> {
        let marker = self.read_marker(path)?;
        let skip_len = |r: &mut Self, len: u32| r.take(len, path).map(|_| 0);
        match marker {
            Marker::Null | Marker::True | Marker::False | Marker::FixPos(_) | Marker::FixNeg(_) => {
                Ok(0)
            }
            Marker::U8 | Marker::I8 => skip_len(self, 1),
            Marker::U16 | Marker::I16 => skip_len(self, 2),
            Marker::U32 | Marker::I32 | Marker::F32 => skip_len(self, 4),
            Marker::U64 | Marker::I64 | Marker::F64 => skip_len(self, 8),
            Marker::FixStr(n) => skip_len(self, u32::from(n)),
            Marker::Str8 | Marker::Bin8 => {
                let [n] = self.take_be::<1>(path)?;
                skip_len(self, u32::from(n))
            }
            Marker::Str16 | Marker::Bin16 => {
                let n = u16::from_be_bytes(self.take_be::<2>(path)?);
                skip_len(self, u32::from(n))
            }
            Marker::Str32 | Marker::Bin32 => {
                let n = u32::from_be_bytes(self.take_be::<4>(path)?);
                skip_len(self, n)
            }
            Marker::FixExt1 => skip_len(self, 1 + 1),
            Marker::FixExt2 => skip_len(self, 1 + 2),
            Marker::FixExt4 => skip_len(self, 1 + 4),
            Marker::FixExt8 => skip_len(self, 1 + 8),
            Marker::FixExt16 => skip_len(self, 1 + 16),
            Marker::Ext8 => {
                let [n] = self.take_be::<1>(path)?;
                skip_len(self, u32::from(n) + 1)
            }
            Marker::Ext16 => {
                let n = u16::from_be_bytes(self.take_be::<2>(path)?);
                skip_len(self, u32::from(n) + 1)
            }
            Marker::Ext32 => {
                let n = u32::from_be_bytes(self.take_be::<4>(path)?);
                self.take_be::<1>(path)?;
                skip_len(self, n)
            }
            Marker::FixArray(n) => Ok(u64::from(n)),
            Marker::Array16 => Ok(u64::from(u16::from_be_bytes(self.take_be::<2>(path)?))),
            Marker::Array32 => Ok(u64::from(u32::from_be_bytes(self.take_be::<4>(path)?))),
            Marker::FixMap(n) => Ok(2 * u64::from(n)),
            Marker::Map16 => Ok(2 * u64::from(u16::from_be_bytes(self.take_be::<2>(path)?))),
            Marker::Map32 => Ok(2 * u64::from(u32::from_be_bytes(self.take_be::<4>(path)?))),
            Marker::Reserved => Err(decode_error(path, "reserved msgpack marker 0xc1")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> Path<'static> {
        Path::Root("v")
    }

    #[test]
    fn path_display() {
        let r = Path::Root("key");
        let f = r.field("token_ids");
        let i = f.index(3);
        assert_eq!(i.to_string(), "key.token_ids[3]");
        let k = r.key("a\nb");
        assert_eq!(k.to_string(), "key.a\\nb");
    }

    /// `read_u32`'s fast path agrees with the generic int reader on every encoding, including
    /// non-minimal ones, truncated ones and values outside `u32`.
    #[test]
    fn read_u32_fast_path_matches_the_generic_reader() {
        let cases: &[&[u8]] = &[
            &[0x00],
            &[0x7f],
            &[0xcc, 0x00],
            &[0xcc, 0xff],
            &[0xcd, 0x00, 0x05],
            &[0xcd, 0xff, 0xff],
            &[0xce, 0x00, 0x00, 0x00, 0x07],
            &[0xce, 0xff, 0xff, 0xff, 0xff],
            &[0xcf, 0, 0, 0, 0, 0, 0, 0, 9],
            &[0xcf, 0, 0, 0, 1, 0, 0, 0, 0],
            &[0xd0, 0x05],
            &[0xd0, 0x80],
            &[0xff],
            &[0xcc],
            &[0xcd, 0x01],
            &[0xce, 0, 0, 0],
            &[0xc3],
            &[],
        ];
        for bytes in cases {
            let mut fast = Reader::new(bytes);
            let got = fast.read_u32(&root());
            let want = Reader::new(bytes)
                .read_int(&root())
                .and_then(|v| u32::try_from(v).map_err(|_| range_error(&root(), v, "u32")));
            assert_eq!(got.is_ok(), want.is_ok(), "{bytes:x?}");
            if let (Ok(g), Ok(w)) = (&got, &want) {
                assert_eq!(g, w, "{bytes:x?}");
                assert!(fast.is_empty(), "{bytes:x?}");
            }
        }
    }

    #[test]
    fn ints_all_forms() {
        let cases: &[(&[u8], i128)] = &[
            (&[0x05], 5),
            (&[0xff], -1),
            (&[0xcc, 0xff], 255),
            (&[0xcd, 0x01, 0x00], 256),
            (&[0xce, 0xff, 0xff, 0xff, 0xff], 4_294_967_295),
            (
                &[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                i128::from(u64::MAX),
            ),
            (&[0xd0, 0x80], -128),
            (&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0], i128::from(i64::MIN)),
        ];
        for (bytes, want) in cases {
            let mut r = Reader::new(bytes);
            assert_eq!(r.read_int(&root()), Ok(*want));
            assert!(r.is_empty());
        }
        for bad in [
            &[0xc3][..],
            &[0xcb, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0xa1, b'1'],
            &[0xcd, 0x01],
        ] {
            assert!(Reader::new(bad).read_int(&root()).is_err());
        }
    }

    #[test]
    fn range_errors_name_value() {
        let err = Reader::new(&[0xcf, 0, 0, 0, 1, 0, 0, 0, 0])
            .read_u32(&root())
            .expect_err("must fail");
        assert_eq!(err.to_string(), "v: value 4294967296 does not fit in u32");
        let err = Reader::new(&[0xff])
            .read_u64(&root())
            .expect_err("must fail");
        assert_eq!(err.to_string(), "v: value -1 does not fit in u64");
        let err = Reader::new(&[0xcf, 0x80, 0, 0, 0, 0, 0, 0, 0])
            .read_i64(&root())
            .expect_err("must fail");
        assert!(err.to_string().contains("does not fit in i64"));
    }

    #[test]
    fn str_bin_bool_float_strictness() {
        assert_eq!(Reader::new(b"\xa2hi").read_str(&root()), Ok("hi"));
        assert!(Reader::new(b"\xc4\x02hi").read_str(&root()).is_err());
        assert!(Reader::new(b"\xa2\xff\xfe").read_str(&root()).is_err());
        assert_eq!(Reader::new(b"\xc4\x02hi").read_bin(&root()), Ok(&b"hi"[..]));
        assert!(Reader::new(b"\xa2hi").read_bin(&root()).is_err());
        assert!(Reader::new(b"\xc4\x05hi").read_bin(&root()).is_err());
        assert_eq!(Reader::new(&[0xc3]).read_bool(&root()), Ok(true));
        assert!(Reader::new(&[0x01]).read_bool(&root()).is_err());
        assert_eq!(Reader::new(&[0x02]).read_bool_or_int(&root()), Ok(true));
        assert_eq!(Reader::new(&[0x00]).read_bool_or_int(&root()), Ok(false));
        assert!(Reader::new(&[0xc0]).read_bool_or_int(&root()).is_err());
        assert_eq!(Reader::new(&[0x03]).read_f64(&root()), Ok(3.0));
        assert_eq!(
            Reader::new(&[0xca, 0x3f, 0xc0, 0, 0]).read_f64(&root()),
            Ok(1.5)
        );
        assert!(Reader::new(&[0xc2]).read_f64(&root()).is_err());
        assert_eq!(
            Reader::new(&[0xc0]).read_nil_or(&root(), |r, p| r.read_int(p)),
            Ok(None)
        );
        assert_eq!(
            Reader::new(&[0x07]).read_nil_or(&root(), |r, p| r.read_int(p)),
            Ok(Some(7))
        );
    }

    #[test]
    fn skip_every_type() {
        // [nil, true, -1, u64, f32, "ab", bin "x", fixext1, ext8 len 2, {1: [2, {}]}, []]
        let mut buf = vec![0x9b, 0xc0, 0xc3, 0xff];
        buf.extend([0xcf, 0, 0, 0, 0, 0, 0, 0, 1]);
        buf.extend([0xca, 0, 0, 0, 0]);
        buf.extend(b"\xa2ab\xc4\x01x");
        buf.extend([0xd4, 0x05, 0x00]);
        buf.extend([0xc7, 0x02, 0x01, 0xaa, 0xbb]);
        buf.extend([0x81, 0x01, 0x92, 0x02, 0x80]);
        buf.extend([0x90]);
        buf.push(0x2a);
        let mut r = Reader::new(&buf);
        r.skip_value(&root()).expect("must succeed");
        assert_eq!(r.remaining(), &[0x2a]);
    }

    #[test]
    fn skip_depth_limit() {
        let ok: Vec<u8> = std::iter::repeat_n(0x91, MAX_DEPTH).chain([0xc0]).collect();
        assert!(Reader::new(&ok).skip_value(&root()).is_ok());
        let deep: Vec<u8> = std::iter::repeat_n(0x91, MAX_DEPTH + 1)
            .chain([0xc0])
            .collect();
        let err = Reader::new(&deep)
            .skip_value(&root())
            .expect_err("must fail");
        assert!(err.to_string().contains("nesting"));
        // Huge declared lengths fail on end of input, quickly.
        assert!(
            Reader::new(&[0xdd, 0xff, 0xff, 0xff, 0xff])
                .skip_value(&root())
                .is_err()
        );
        assert!(Reader::new(&[0xc1]).skip_value(&root()).is_err());
    }

    #[test]
    fn u32_array_errors_name_the_element() {
        // [1, 2, -1]: the third element is negative.
        let mut r = Reader::new(&[0x93, 0x01, 0x02, 0xff]);
        let e = r.read_u32_array(&root()).expect_err("negative token");
        assert!(e.to_string().contains("v[2]"), "{e}");
        let mut r = Reader::new(&[0x93, 0x01, 0xcd, 0x01, 0x00, 0x07]);
        assert_eq!(r.read_u32_array(&root()), Ok(vec![1, 256, 7]));
    }

    #[test]
    fn capacity_is_bounded_by_input() {
        let r = Reader::new(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert_eq!(r.capacity_hint(u32::MAX), 6);
        let mut r = Reader::new(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(r.read_u32_array(&root()).is_err());
    }

    #[test]
    fn finish_rejects_trailing() {
        let mut r = Reader::new(&[0x01, 0x02]);
        r.read_int(&root()).expect("must succeed");
        assert!(matches!(
            r.finish(&root()),
            Err(ProtoError::TrailingBytes { .. })
        ));
    }
}
