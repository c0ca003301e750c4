//! The reply side's first step: a msgpack reply parsed into a [`Value`] tree, with bounded
//! depth and every length checked against the remaining input (a hostile length cannot make
//! it allocate), before the typed readers in `decode` look at it.

use std::fmt;

use rmp::Marker;

/// Deepest nesting [`Value::decode`] accepts.
const MAX_DEPTH: usize = 32;

/// A decoded msgpack value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `nil`.
    Nil,
    /// A bool.
    Bool(bool),
    /// Any integer (every msgpack int fits an `i128`).
    Int(i128),
    /// A float32 or float64.
    Float(f64),
    /// A str (invalid UTF-8 is a decode error).
    Str(String),
    /// A bin.
    Bin(Vec<u8>),
    /// An array.
    Array(Vec<Value>),
    /// A map, in wire order.
    Map(Vec<(Value, Value)>),
    /// An extension value: type and data.
    Ext(i8, Vec<u8>),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Nil => f.write_str("nil"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Bin(b) => write!(f, "bin[{}]", b.len()),
            Value::Array(a) => write!(f, "array[{}]", a.len()),
            Value::Map(m) => write!(f, "map[{}]", m.len()),
            Value::Ext(t, d) => write!(f, "ext({t})[{}]", d.len()),
        }
    }
}

struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.rest.len() {
            return Err(format!(
                "truncated: need {n} bytes, {} left",
                self.rest.len()
            ));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(u8::from_be_bytes(self.be::<1>()?))
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.be::<2>()?))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.be::<4>()?))
    }

    fn len(&mut self, n: u32) -> Result<usize, String> {
        usize::try_from(n).map_err(|_| format!("length {n} does not fit in memory"))
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err(format!("nesting deeper than {MAX_DEPTH}"));
        }
        let marker = Marker::from_u8(self.u8()?);
        Ok(match marker {
            Marker::Null => Value::Nil,
            Marker::True => Value::Bool(true),
            Marker::False => Value::Bool(false),
            Marker::FixPos(v) => Value::Int(i128::from(v)),
            Marker::FixNeg(v) => Value::Int(i128::from(v)),
            Marker::U8 => Value::Int(i128::from(self.u8()?)),
            Marker::U16 => Value::Int(i128::from(self.u16()?)),
            Marker::U32 => Value::Int(i128::from(self.u32()?)),
            Marker::U64 => Value::Int(i128::from(u64::from_be_bytes(self.be::<8>()?))),
            Marker::I8 => Value::Int(i128::from(i8::from_be_bytes(self.be::<1>()?))),
            Marker::I16 => Value::Int(i128::from(i16::from_be_bytes(self.be::<2>()?))),
            Marker::I32 => Value::Int(i128::from(i32::from_be_bytes(self.be::<4>()?))),
            Marker::I64 => Value::Int(i128::from(i64::from_be_bytes(self.be::<8>()?))),
            Marker::F32 => Value::Float(f64::from(f32::from_be_bytes(self.be::<4>()?))),
            Marker::F64 => Value::Float(f64::from_be_bytes(self.be::<8>()?)),
            Marker::FixStr(n) => self.str(u32::from(n))?,
            Marker::Str8 => {
                let n = self.u8()?;
                self.str(u32::from(n))?
            }
            Marker::Str16 => {
                let n = self.u16()?;
                self.str(u32::from(n))?
            }
            Marker::Str32 => {
                let n = self.u32()?;
                self.str(n)?
            }
            Marker::Bin8 => {
                let n = self.u8()?;
                self.bin(u32::from(n))?
            }
            Marker::Bin16 => {
                let n = self.u16()?;
                self.bin(u32::from(n))?
            }
            Marker::Bin32 => {
                let n = self.u32()?;
                self.bin(n)?
            }
            Marker::FixArray(n) => self.array(u32::from(n), depth)?,
            Marker::Array16 => {
                let n = self.u16()?;
                self.array(u32::from(n), depth)?
            }
            Marker::Array32 => {
                let n = self.u32()?;
                self.array(n, depth)?
            }
            Marker::FixMap(n) => self.map(u32::from(n), depth)?,
            Marker::Map16 => {
                let n = self.u16()?;
                self.map(u32::from(n), depth)?
            }
            Marker::Map32 => {
                let n = self.u32()?;
                self.map(n, depth)?
            }
            Marker::FixExt1 => self.ext(1)?,
            Marker::FixExt2 => self.ext(2)?,
            Marker::FixExt4 => self.ext(4)?,
            Marker::FixExt8 => self.ext(8)?,
            Marker::FixExt16 => self.ext(16)?,
            Marker::Ext8 => {
                let n = self.u8()?;
                self.ext(u32::from(n))?
            }
            Marker::Ext16 => {
                let n = self.u16()?;
                self.ext(u32::from(n))?
            }
            Marker::Ext32 => {
                let n = self.u32()?;
                self.ext(n)?
            }
            Marker::Reserved => return Err("reserved marker 0xc1".to_owned()),
        })
    }

    fn str(&mut self, n: u32) -> Result<Value, String> {
        let n = self.len(n)?;
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes)
            .map(|s| Value::Str(s.to_owned()))
            .map_err(|e| format!("invalid UTF-8 in str: {e}"))
    }

    fn bin(&mut self, n: u32) -> Result<Value, String> {
        let n = self.len(n)?;
        Ok(Value::Bin(self.take(n)?.to_vec()))
    }

    fn ext(&mut self, n: u32) -> Result<Value, String> {
        let ty = i8::from_be_bytes(self.be::<1>()?);
        let n = self.len(n)?;
        Ok(Value::Ext(ty, self.take(n)?.to_vec()))
    }

    fn array(&mut self, n: u32, depth: usize) -> Result<Value, String> {
        let n = self.len(n)?;
        // Every element takes at least one byte: a longer claim is a lie, not an allocation.
        if n > self.rest.len() {
            return Err(format!("array of {n} items in {} bytes", self.rest.len()));
        }
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, n: u32, depth: usize) -> Result<Value, String> {
        let n = self.len(n)?;
        if n > self.rest.len() / 2 {
            return Err(format!("map of {n} entries in {} bytes", self.rest.len()));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.value(depth + 1)?;
            let v = self.value(depth + 1)?;
            entries.push((k, v));
        }
        Ok(Value::Map(entries))
    }
}

impl Value {
    /// Decodes exactly one msgpack document; trailing bytes are an error.
    ///
    /// # Errors
    /// A description of the first problem (truncation, bad UTF-8, trailing bytes, too deep).
    pub fn decode(bytes: &[u8]) -> Result<Value, String> {
        let mut c = Cursor { rest: bytes };
        let v = c.value(0)?;
        if !c.rest.is_empty() {
            return Err(format!("{} trailing bytes", c.rest.len()));
        }
        Ok(v)
    }

    /// The entry for `key` in a map with str keys (`None` if absent or not a map).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    fn as_i128(&self, what: &str) -> Result<i128, String> {
        match self {
            Value::Int(i) => Ok(*i),
            other => Err(format!("{what}: expected an int, got {other}")),
        }
    }

    /// This int as a `u64`.
    ///
    /// # Errors
    /// If it is not an int or is negative or too large.
    pub fn as_u64(&self, what: &str) -> Result<u64, String> {
        let i = self.as_i128(what)?;
        u64::try_from(i).map_err(|_| format!("{what}: {i} is not a u64"))
    }

    /// This int as an `i64`.
    ///
    /// # Errors
    /// If it is not an int or does not fit.
    pub fn as_i64(&self, what: &str) -> Result<i64, String> {
        let i = self.as_i128(what)?;
        i64::try_from(i).map_err(|_| format!("{what}: {i} is not an i64"))
    }

    /// This bool.
    ///
    /// # Errors
    /// If it is not a bool.
    pub fn as_bool(&self, what: &str) -> Result<bool, String> {
        match self {
            Value::Bool(b) => Ok(*b),
            other => Err(format!("{what}: expected a bool, got {other}")),
        }
    }

    /// This str.
    ///
    /// # Errors
    /// If it is not a str.
    pub fn as_str(&self, what: &str) -> Result<&str, String> {
        match self {
            Value::Str(s) => Ok(s),
            other => Err(format!("{what}: expected a str, got {other}")),
        }
    }

    /// This array's items.
    ///
    /// # Errors
    /// If it is not an array.
    pub fn as_array(&self, what: &str) -> Result<&[Value], String> {
        match self {
            Value::Array(a) => Ok(a),
            other => Err(format!("{what}: expected an array, got {other}")),
        }
    }

    pub(super) fn require(&self, key: &str, what: &str) -> Result<&Value, String> {
        match self {
            Value::Map(_) => self
                .get(key)
                .ok_or_else(|| format!("{what}: required key {key:?} missing")),
            other => Err(format!("{what}: expected a map, got {other}")),
        }
    }
}
