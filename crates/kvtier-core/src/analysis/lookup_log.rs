//! The lookup log: one record per lookup, written by `kvtier serve --lookup-log-dir` and
//! replayed by `kvtier simulate`. This module is the format (encoder and reader); the server's
//! writer thread and rotation live in `kvtier-server` (`lookup_log.rs`).
//!
//! Format (all integers little-endian), one file = `MAGIC` then records:
//!
//! ```text
//! file    := "KVTLOG" 0x00 0x01            (8 bytes: magic, format version 1)
//!            record*
//! record  := body_len: u32                 (bytes of body, at most 16 MiB)
//!            checksum: u32                 (first 4 bytes of BLAKE3(body), LE)
//!            body
//! body    := unix_micros: u64              (wall-clock time of the lookup)
//!            chunk_bytes: u64              (bytes of one chunk in L1 across the lookup's ranks;
//!                                           0 when the server did not know yet)
//!            kv_rank: u32                  (packed rank of a one-worker lookup; ALL_RANKS for a
//!                                           lookup over every rank at once)
//!            ranks: u32                    (objects per chunk: the ranks looked up at once)
//!            salt_len: u16, cache_salt     (UTF-8; empty when the request had none)
//!            model_len: u16, model         (UTF-8)
//!            n: u32, chunk: u64 × n        (first 8 bytes of each chunk hash, LE, in order)
//! ```
//!
//! A record costs 40 + salt + model + 8 × chunks bytes (a 32-chunk lookup of a 20-byte model
//! name: about 320 bytes). Files are named `lookups-<unix ms>-<seq>.kvtlog`, so name order is
//! time order. A record is written whole or not at all by the writer, but a crash can cut the
//! last one short: the reader reports that as [`LogReader::truncated_at`] instead of an error.
//! Every other inconsistency is a [`LogError`] naming the file and the byte offset of the
//! record.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File magic and format version.
pub const MAGIC: &[u8; 8] = b"KVTLOG\x00\x01";
/// Extension of log files.
pub const FILE_EXT: &str = "kvtlog";
/// Largest body a record may have.
pub const MAX_BODY_BYTES: u32 = 16 << 20;
/// `kv_rank` of a lookup over every rank at once.
pub const ALL_RANKS: u32 = u32::MAX;

/// One lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupRecord {
    /// Wall-clock time, microseconds since the Unix epoch.
    pub unix_micros: u64,
    /// Bytes of one chunk across the lookup's ranks (0: unknown).
    pub chunk_bytes: u64,
    /// Packed rank of a one-worker lookup, or [`ALL_RANKS`].
    pub kv_rank: u32,
    /// Objects per chunk (ranks looked up at once), at least 1.
    pub ranks: u32,
    /// The tenant (`cache_salt`), empty when none.
    pub cache_salt: Arc<str>,
    /// The model name.
    pub model: Arc<str>,
    /// First 8 bytes of each chunk hash, in order.
    pub chunks: Vec<u64>,
}

/// The first 8 bytes of a chunk hash as the log's chunk id.
pub fn chunk_id(hash: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = hash.len().min(8);
    b[..n].copy_from_slice(&hash[..n]);
    u64::from_le_bytes(b)
}

fn checksum(body: &[u8]) -> u32 {
    let h = blake3::hash(body);
    let b = h.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Appends one framed record to `out`. Strings longer than 65535 bytes are cut (at a char
/// boundary); they cannot occur for valid model names and salts.
pub fn encode(rec: &LookupRecord, out: &mut Vec<u8>) {
    fn short(s: &str) -> &str {
        let mut end = s.len().min(u16::MAX as usize);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        &s[..end]
    }
    let salt = short(&rec.cache_salt);
    let model = short(&rec.model);
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&rec.unix_micros.to_le_bytes());
    out.extend_from_slice(&rec.chunk_bytes.to_le_bytes());
    out.extend_from_slice(&rec.kv_rank.to_le_bytes());
    out.extend_from_slice(&rec.ranks.to_le_bytes());
    out.extend_from_slice(&(salt.len() as u16).to_le_bytes());
    out.extend_from_slice(salt.as_bytes());
    out.extend_from_slice(&(model.len() as u16).to_le_bytes());
    out.extend_from_slice(model.as_bytes());
    out.extend_from_slice(&(rec.chunks.len() as u32).to_le_bytes());
    for c in &rec.chunks {
        out.extend_from_slice(&c.to_le_bytes());
    }
    let body_len = (out.len() - start - 8) as u32;
    let sum = checksum(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&sum.to_le_bytes());
}

/// Why a log could not be read. Every variant names the file; record errors name the byte
/// offset of the record's frame.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The file or directory could not be read.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error (in the message, not a separate cause, so it is printed once).
        error: io::Error,
    },
    /// A directory holds no `*.kvtlog` file.
    #[error("{}: no lookup log files (*.{FILE_EXT}) in this directory", path.display())]
    NoFiles {
        /// The directory.
        path: PathBuf,
    },
    /// The file does not start with the magic.
    #[error("{}: not a kvtier lookup log (bad magic at offset 0; expected \"KVTLOG\\0\\x01\")", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// A record is inconsistent.
    #[error("{}: corrupt record at offset {offset}: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Byte offset of the record's frame.
        offset: u64,
        /// What is wrong.
        what: String,
    },
}

/// The log files of `path`: the file itself, or a directory's `*.kvtlog` files in name (time)
/// order.
///
/// # Errors
/// [`LogError::Io`] when `path` cannot be read, [`LogError::NoFiles`] for a directory without
/// log files.
pub fn log_files(path: &Path) -> Result<Vec<PathBuf>, LogError> {
    let io_err = |error| LogError::Io {
        path: path.to_owned(),
        error,
    };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io_err)? {
        let p = entry.map_err(io_err)?.path();
        if p.extension().is_some_and(|e| e == FILE_EXT) && p.is_file() {
            files.push(p);
        }
    }
    if files.is_empty() {
        return Err(LogError::NoFiles {
            path: path.to_owned(),
        });
    }
    files.sort();
    Ok(files)
}

/// Reads one log file record by record.
#[derive(Debug)]
pub struct LogReader {
    path: PathBuf,
    input: BufReader<File>,
    offset: u64,
    truncated_at: Option<u64>,
    body: Vec<u8>,
}

impl LogReader {
    /// Opens `path` and checks its magic.
    ///
    /// # Errors
    /// [`LogError::Io`] or [`LogError::BadMagic`].
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let file = File::open(path).map_err(|error| LogError::Io {
            path: path.to_owned(),
            error,
        })?;
        let mut input = BufReader::with_capacity(1 << 16, file);
        let mut magic = [0u8; 8];
        match read_full(&mut input, &mut magic) {
            Ok(8) if &magic == MAGIC => {}
            Ok(_) => {
                return Err(LogError::BadMagic {
                    path: path.to_owned(),
                });
            }
            Err(error) => {
                return Err(LogError::Io {
                    path: path.to_owned(),
                    error,
                });
            }
        }
        Ok(Self {
            path: path.to_owned(),
            input,
            offset: 8,
            truncated_at: None,
            body: Vec::new(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the file ends in the middle of a record (a writer that stopped mid-record), once
    /// [`next_record`](Self::next_record) returned `None`.
    pub fn truncated_at(&self) -> Option<u64> {
        self.truncated_at
    }

    /// The next record, `None` at the end of the file.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] (with the record's offset) or [`LogError::Io`].
    pub fn next_record(&mut self) -> Result<Option<LookupRecord>, LogError> {
        let at = self.offset;
        let mut frame = [0u8; 8];
        let n = read_full(&mut self.input, &mut frame).map_err(|e| self.io(e))?;
        if n == 0 {
            return Ok(None);
        }
        if n < 8 {
            self.truncated_at = Some(at);
            return Ok(None);
        }
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
        let sum = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        if len > MAX_BODY_BYTES {
            return Err(self.corrupt(at, format!("record length {len} exceeds 16 MiB")));
        }
        self.body.resize(len as usize, 0);
        let mut body = std::mem::take(&mut self.body);
        let got = read_full(&mut self.input, &mut body).map_err(|e| self.io(e))?;
        if got < body.len() {
            self.truncated_at = Some(at);
            self.body = body;
            return Ok(None);
        }
        let res = if checksum(&body) != sum {
            Err(self.corrupt(at, "checksum mismatch".into()))
        } else {
            decode_body(&body).map_err(|what| self.corrupt(at, what))
        };
        self.body = body;
        self.offset = at + 8 + u64::from(len);
        res.map(Some)
    }

    fn io(&self, error: io::Error) -> LogError {
        LogError::Io {
            path: self.path.clone(),
            error,
        }
    }

    fn corrupt(&self, offset: u64, what: String) -> LogError {
        LogError::Corrupt {
            path: self.path.clone(),
            offset,
            what,
        }
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("body ends inside {what}"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn str(&mut self, what: &str) -> Result<Arc<str>, String> {
        let n = self.u16(what)? as usize;
        let b = self.take(n, what)?;
        std::str::from_utf8(b)
            .map(Arc::from)
            .map_err(|_| format!("{what} is not UTF-8"))
    }
}

fn decode_body(body: &[u8]) -> Result<LookupRecord, String> {
    let mut c = Cursor(body);
    let unix_micros = c.u64("the time")?;
    let chunk_bytes = c.u64("chunk_bytes")?;
    let kv_rank = c.u32("kv_rank")?;
    let ranks = c.u32("ranks")?;
    if ranks == 0 {
        return Err("ranks is 0".into());
    }
    let cache_salt = c.str("the cache salt")?;
    let model = c.str("the model name")?;
    let n = c.u32("the chunk count")? as usize;
    if c.0.len() != n * 8 {
        return Err(format!(
            "{n} chunks announced but {} bytes of chunks follow",
            c.0.len()
        ));
    }
    let chunks = (0..n).map(|_| c.u64("a chunk")).collect::<Result<_, _>>()?;
    Ok(LookupRecord {
        unix_micros,
        chunk_bytes,
        kv_rank,
        ranks,
        cache_salt,
        model,
        chunks,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn rec(i: u64) -> LookupRecord {
        LookupRecord {
            unix_micros: 1_700_000_000_000_000 + i,
            chunk_bytes: 1 << 20,
            kv_rank: ALL_RANKS,
            ranks: 2,
            cache_salt: Arc::from(if i.is_multiple_of(2) { "" } else { "tenant-a" }),
            model: Arc::from("meta/llama"),
            chunks: (0..i).map(|c| c * 7 + i).collect(),
        }
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        let mut f = File::create(&p).expect("create");
        f.write_all(bytes).expect("write");
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kvtier-log-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn round_trip_truncation_and_corruption() {
        let dir = tmpdir("rt");
        let mut bytes = MAGIC.to_vec();
        for i in 0..5 {
            encode(&rec(i), &mut bytes);
        }
        let good = write(&dir, "a.kvtlog", &bytes);
        let mut r = LogReader::open(&good).expect("open");
        for i in 0..5 {
            assert_eq!(r.next_record().expect("ok"), Some(rec(i)));
        }
        assert_eq!(r.next_record().expect("ok"), None);
        assert_eq!(r.truncated_at(), None);

        // Cut inside the last record: 4 records and the offset of the fifth.
        let cut = write(&dir, "b.kvtlog", &bytes[..bytes.len() - 3]);
        let mut r = LogReader::open(&cut).expect("open");
        let mut n = 0;
        while r.next_record().expect("ok").is_some() {
            n += 1;
        }
        assert_eq!(n, 4);
        let last = (bytes.len() - (40 + 10 + 4 * 8)) as u64; // record 4: no salt, 4 chunks
        assert_eq!(r.truncated_at(), Some(last));

        // A flipped byte in record 1's body: a checksum error naming its offset.
        let mut bad = bytes.clone();
        let second = 8 + 40 + 10; // record 0 has no chunks and no salt
        bad[second + 12] ^= 0xff;
        let p = write(&dir, "c.kvtlog", &bad);
        let mut r = LogReader::open(&p).expect("open");
        assert!(r.next_record().expect("first").is_some());
        let e = r.next_record().expect_err("corrupt").to_string();
        assert!(
            e.contains("c.kvtlog") && e.contains(&format!("offset {second}")),
            "{e}"
        );

        let p = write(&dir, "d.kvtlog", b"hello world");
        let e = LogReader::open(&p).expect_err("magic").to_string();
        assert!(e.contains("d.kvtlog") && e.contains("bad magic"), "{e}");

        let files = log_files(&dir).expect("files");
        assert_eq!(files.len(), 4);
        assert!(files.windows(2).all(|w| w[0] < w[1]));
        let empty = tmpdir("empty");
        assert!(matches!(log_files(&empty), Err(LogError::NoFiles { .. })));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&empty);
    }
}
