//! The object file (format version 1, layout in the `fs` module docs) and the file primitives
//! every store and load goes through: the header's encoding and strict parsing, a whole-file
//! read that verifies magic, version, key, lengths, size and checksum before anything is
//! served, the temp-file write with `fsync`, the directory `fsync`, and which I/O errors mean a
//! full device.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use rustix::io::Errno;

use crate::error::L2Error;

/// File magic.
pub const MAGIC: [u8; 8] = *b"KVTIERL2";

/// File format version.
pub const FORMAT_VERSION: u32 = 1;

/// Bytes of the fixed part of the header.
pub const HEADER_FIXED: usize = 56;

/// File name suffix.
pub const SUFFIX: &str = ".data";

/// Encodes the header of an object file.
pub fn encode_header(key: &str, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_FIXED + key.len());
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&(key.len() as u32).to_le_bytes());
    h.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut hasher = blake3::Hasher::new();
    hasher.update(key.as_bytes());
    hasher.update(payload);
    h.extend_from_slice(hasher.finalize().as_bytes());
    h.extend_from_slice(key.as_bytes());
    h
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Offset of the payload in the file.
    pub payload_offset: usize,
    /// Payload length.
    pub payload_len: u64,
    /// Stored checksum.
    pub checksum: [u8; 32],
}

pub(super) fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub(super) fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses and checks the header at the start of `buf` against the expected key text.
pub fn parse_header(buf: &[u8], expected_key: &str) -> Result<Header, String> {
    if buf.len() < HEADER_FIXED {
        return Err(format!(
            "file has {} bytes, shorter than a header",
            buf.len()
        ));
    }
    if buf.get(..8) != Some(&MAGIC[..]) {
        return Err("bad magic".to_owned());
    }
    let version = le_u32(buf, 8).ok_or("short header")?;
    if version != FORMAT_VERSION {
        return Err(format!("unsupported format version {version}"));
    }
    let key_len = le_u32(buf, 12).ok_or("short header")? as usize;
    let payload_len = le_u64(buf, 16).ok_or("short header")?;
    let checksum: [u8; 32] = buf
        .get(24..56)
        .and_then(|s| s.try_into().ok())
        .ok_or("short header")?;
    let key = buf
        .get(HEADER_FIXED..HEADER_FIXED + key_len)
        .ok_or("header truncated inside the key")?;
    if key != expected_key.as_bytes() {
        return Err("header key does not match the file name".to_owned());
    }
    Ok(Header {
        payload_offset: HEADER_FIXED + key_len,
        payload_len,
        checksum,
    })
}

fn is_full(e: &io::Error) -> bool {
    let full = [Errno::NOSPC, Errno::DQUOT, Errno::FBIG, Errno::ROFS];
    e.raw_os_error()
        .is_some_and(|c| full.iter().any(|f| f.raw_os_error() == c))
}

pub(super) fn classify(e: &io::Error, what: &str) -> L2Error {
    if is_full(e) {
        L2Error::NoSpace(format!("{what}: {e}"))
    } else {
        L2Error::Io(format!("{what}: {e}"))
    }
}

/// Reads a whole object file into `buf` and verifies it. Returns the payload offset.
pub(super) fn read_verified(
    path: &Path,
    key: &str,
    expected_len: u64,
    buf: &mut Vec<u8>,
) -> Result<usize, L2Error> {
    buf.clear();
    let read = File::open(path).and_then(|mut f| f.read_to_end(buf));
    match read {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(L2Error::NotFound),
        Err(e) => return Err(classify(&e, "reading")),
    }
    let buf = &buf[..];
    let h = parse_header(buf, key).map_err(L2Error::Corrupt)?;
    let end = (h.payload_offset as u64)
        .checked_add(h.payload_len)
        .ok_or_else(|| L2Error::Corrupt("payload length overflows".to_owned()))?;
    if buf.len() as u64 != end {
        return Err(L2Error::Corrupt(format!(
            "file is {} bytes, header says {end} (truncated or extended)",
            buf.len()
        )));
    }
    if h.payload_len != expected_len {
        return Err(L2Error::Corrupt(format!(
            "payload is {} bytes, index says {expected_len}",
            h.payload_len
        )));
    }
    let payload = buf.get(h.payload_offset..).unwrap_or_default();
    let mut hasher = blake3::Hasher::new();
    hasher.update(key.as_bytes());
    hasher.update(payload);
    if hasher.finalize().as_bytes() != &h.checksum {
        return Err(L2Error::Corrupt("checksum mismatch".to_owned()));
    }
    Ok(h.payload_offset)
}

/// Writes and fsyncs a new temp file; removes it on failure.
pub(super) fn write_tmp(path: &Path, key: &str, payload: &[u8]) -> io::Result<()> {
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
        f.write_all(&encode_header(key, payload))?;
        f.write_all(payload)?;
        f.sync_data()
    };
    let r = write();
    if r.is_err() {
        let _removed = fs::remove_file(path);
    }
    r
}

pub(super) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_checks() {
        let key = "m@0x01010000@0@00ff";
        let payload = b"hello world";
        let mut file = encode_header(key, payload);
        file.extend_from_slice(payload);
        let h = parse_header(&file, key).expect("valid");
        assert_eq!(h.payload_len, payload.len() as u64);
        assert_eq!(&file[h.payload_offset..], payload);
        assert!(parse_header(&file, "other").is_err());
        assert!(parse_header(&file[..20], key).is_err());
        let mut bad = file.clone();
        bad[0] ^= 1;
        assert!(parse_header(&bad, key).is_err());
        let mut v2 = file.clone();
        v2[8] = 2;
        assert!(
            parse_header(&v2, key)
                .expect_err("v2 rejected")
                .contains("version")
        );
    }
}
