//! The start-up scan: the index rebuilt from the files under `base_path` (headers and sizes
//! checked, the checksum later on load), oldest modification first, leftover temp files
//! removed, and what was found reported in the status tree ([`RebuildReport`]).

use super::*;

/// What the start-up scan found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RebuildReport {
    /// Objects indexed.
    pub objects: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Files whose header or size was wrong (removed).
    pub corrupt_removed: u64,
    /// Leftover temp files removed.
    pub tmp_removed: u64,
    /// `.data` files whose name is not a key (left alone).
    pub foreign_files: u64,
    /// Objects evicted because the capacity shrank.
    pub evicted: u64,
    /// Scan duration.
    pub seconds: f64,
}

impl FsBackend {
    pub(super) fn rebuild(
        base: &Path,
        tmp: &Path,
        index: &mut ObjectIndex,
    ) -> io::Result<RebuildReport> {
        let t = Instant::now();
        let mut report = RebuildReport::default();
        for entry in fs::read_dir(tmp)? {
            let entry = entry?;
            if entry.file_type()?.is_file() && fs::remove_file(entry.path()).is_ok() {
                report.tmp_removed += 1;
            }
        }
        let mut found: Vec<(SystemTime, ObjectKey, u64)> = Vec::new();
        for entry in fs::read_dir(base)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SUFFIX)) else {
                continue;
            };
            let Ok(key) = stem.parse::<ObjectKey>() else {
                report.foreign_files += 1;
                continue;
            };
            let path = entry.path();
            match Self::scan_header(&path, stem) {
                Ok((len, mtime)) => found.push((mtime, key, len)),
                Err(why) => {
                    tracing::warn!(file = %path.display(), %why, "removing corrupt l2 object file");
                    if fs::remove_file(&path).is_ok() {
                        report.corrupt_removed += 1;
                    }
                }
            }
        }
        found.sort_by_key(|(mtime, _, _)| *mtime);
        for (_, key, len) in found {
            report.objects += 1;
            report.bytes += len;
            index.insert(key, len);
        }
        // The capacity may have shrunk since the files were written.
        for (key, _) in index.trim_to_capacity() {
            let _removed = fs::remove_file(base.join(format!("{key}{SUFFIX}")));
            report.evicted += 1;
        }
        report.seconds = t.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Reads and checks a file's header and size; returns the payload length and mtime.
    pub(super) fn scan_header(path: &Path, stem: &str) -> Result<(u64, SystemTime), String> {
        let mut f = File::open(path).map_err(|e| e.to_string())?;
        let meta = f.metadata().map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; HEADER_FIXED + stem.len()];
        f.read_exact(&mut buf)
            .map_err(|_| "file is shorter than its header".to_owned())?;
        let h = parse_header(&buf, stem)?;
        let expected = h.payload_offset as u64 + h.payload_len;
        if meta.len() != expected {
            return Err(format!(
                "file is {} bytes, header says {expected}",
                meta.len()
            ));
        }
        Ok((
            h.payload_len,
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        ))
    }
}
