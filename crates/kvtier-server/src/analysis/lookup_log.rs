//! The lookup log writer (`kvtier serve --lookup-log-dir DIR`): every lookup's time, tenant,
//! model, chunk ids and chunk size, in the format of [`kvtier_core::analysis::lookup_log`], for
//! `kvtier simulate` to replay against every eviction policy and size.
//!
//! Request path ([`LookupLog::record`]): builds one [`LookupRecord`] (one vector of 8 bytes per
//! chunk, two `Arc` clones) and `try_send`s it into a bounded queue of [`QUEUE_CAPACITY`]
//! records; a full queue drops the record and counts it (`dropped_records_total`). Never a
//! lock, never I/O, never a wait.
//!
//! Thread `kvtier-lookup-log` (a [`PeriodicThread`], every 100 ms) drains the queue, encodes
//! the records into one buffer and appends it to the current file with one `write_all`.
//! Rotation: a file that reached `--lookup-log-file-bytes` is closed and a new one started
//! (`lookups-<unix ms>-<seq>.kvtlog`); then the oldest `*.kvtlog` files of the directory are
//! deleted while the directory's log files together exceed `--lookup-log-max-bytes` (the
//! current file is never deleted). Files already in the directory at start count toward the
//! bound. A write error is counted (`write_errors_total`), reported as the round's error (the
//! node shows `last_error`), and the batch is dropped; the next round opens a new file.
//!
//! Bounds: disk, `max_bytes` plus one batch; memory, the queue (records of the lookups'
//! chunks) plus one encoded batch.
//!
//! Lock order: the writer mutex is a leaf, held by the thread for one round's I/O and by the
//! final flush at shutdown; the request path never takes it. Status readers take only the
//! leaf `files` mutex (O(1)).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use kvtier_core::analysis::lookup_log::{FILE_EXT, LookupRecord, MAGIC, encode};
use kvtier_core::metrics::{MetricDesc, MetricSet, MetricVisitor, status_fields};
use kvtier_core::periodic::PeriodicThread;
use kvtier_core::status::StatusNode;
use parking_lot::Mutex;
use serde::Serialize;

/// Records waiting for the thread at most.
pub const QUEUE_CAPACITY: usize = 16384;

kvtier_core::metric_set! {
    /// Lookup-log counters (status `lookup_log`, Prometheus `kvtier_lookup_log_*`).
    pub struct LookupLogCounters {
        /// Records written.
        records_written_total: Counter => "kvtier_lookup_log_records_written",
        /// Bytes written (file headers included).
        bytes_written_total: Counter[Bytes] => "kvtier_lookup_log_written",
        /// Records dropped because the queue was full or a write failed.
        dropped_records_total: Counter => "kvtier_lookup_log_dropped_records",
        /// Files started.
        files_created_total: Counter => "kvtier_lookup_log_files_created",
        /// Old files deleted to stay under the total bound.
        files_deleted_total: Counter => "kvtier_lookup_log_files_deleted",
        /// Failed writes, creations or deletions.
        write_errors_total: Counter => "kvtier_lookup_log_write_errors",
    }
}

/// Settings of the lookup log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LookupLogConfig {
    /// The directory (`--lookup-log-dir`).
    #[serde(rename = "lookup_log_dir")]
    pub dir: PathBuf,
    /// Bound on the directory's log files together (`--lookup-log-max-bytes`).
    #[serde(rename = "lookup_log_max_bytes")]
    pub max_bytes: u64,
    /// A file is closed and a new one started past this size (`--lookup-log-file-bytes`).
    #[serde(rename = "lookup_log_file_bytes")]
    pub file_bytes: u64,
}

impl LookupLogConfig {
    /// Default bounds: 1 GiB in all, 64 MiB per file.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            max_bytes: 1 << 30,
            file_bytes: 64 << 20,
        }
    }
}

/// Why the log could not start.
#[derive(Debug, thiserror::Error)]
pub enum LookupLogError {
    /// The directory or first file could not be created or listed.
    #[error("--lookup-log-dir {}: {error}", dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The OS error (in the message, not a separate cause, so it is printed once).
        error: std::io::Error,
    },
    /// The bounds are inconsistent.
    #[error("{0}")]
    Config(String),
}

/// The directory's files, oldest first, with their sizes.
#[derive(Debug, Default)]
struct Files {
    list: std::collections::VecDeque<(PathBuf, u64)>,
    total: u64,
}

/// The writer's state, owned by the thread (and the final flush).
#[derive(Debug)]
struct Writer {
    cfg: LookupLogConfig,
    rx: Receiver<LookupRecord>,
    file: Option<File>,
    seq: u64,
    buf: Vec<u8>,
    files: Arc<Mutex<Files>>,
    counters: Arc<LookupLogCounters>,
}

/// The running lookup log.
#[derive(Debug)]
pub struct LookupLog {
    cfg: LookupLogConfig,
    tx: Sender<LookupRecord>,
    writer: Arc<Mutex<Writer>>,
    files: Arc<Mutex<Files>>,
    counters: Arc<LookupLogCounters>,
    thread: PeriodicThread,
}

impl LookupLog {
    /// Creates the directory, lists the log files already there, opens the first file and
    /// starts the thread.
    ///
    /// # Errors
    /// [`LookupLogError`] naming the directory or the bound.
    pub fn start(cfg: LookupLogConfig) -> Result<Self, LookupLogError> {
        if cfg.file_bytes == 0 || cfg.max_bytes == 0 {
            return Err(LookupLogError::Config(
                "--lookup-log-max-bytes and --lookup-log-file-bytes must be positive".into(),
            ));
        }
        if cfg.file_bytes > cfg.max_bytes {
            return Err(LookupLogError::Config(format!(
                "--lookup-log-file-bytes {} exceeds --lookup-log-max-bytes {}",
                cfg.file_bytes, cfg.max_bytes
            )));
        }
        let io = |error| LookupLogError::Io {
            dir: cfg.dir.clone(),
            error,
        };
        std::fs::create_dir_all(&cfg.dir).map_err(io)?;
        let mut existing = Vec::new();
        for entry in std::fs::read_dir(&cfg.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let p = entry.path();
            if p.extension().is_some_and(|e| e == FILE_EXT) {
                let len = entry.metadata().map_err(io)?.len();
                existing.push((p, len));
            }
        }
        existing.sort();
        let files = Arc::new(Mutex::new(Files {
            total: existing.iter().map(|(_, l)| l).sum(),
            list: existing.into(),
        }));
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_CAPACITY);
        let counters = Arc::new(LookupLogCounters::default());
        let mut writer = Writer {
            cfg: cfg.clone(),
            rx,
            file: None,
            seq: 0,
            buf: Vec::with_capacity(1 << 16),
            files: Arc::clone(&files),
            counters: Arc::clone(&counters),
        };
        writer.open_next().map_err(io)?;
        let writer = Arc::new(Mutex::new(writer));
        let thread = {
            let writer = Arc::clone(&writer);
            PeriodicThread::builder("kvtier-lookup-log")
                .interval(Duration::from_millis(100))
                .description("lookup log writer thread")
                .spawn(move || writer.lock().round())
                .map_err(io)?
        };
        tracing::info!(dir = %cfg.dir.display(), max_bytes = cfg.max_bytes, file_bytes = cfg.file_bytes, "lookup log enabled");
        Ok(Self {
            cfg,
            tx,
            writer,
            files,
            counters,
            thread,
        })
    }

    /// Request path: queues one record, or drops and counts it when the queue is full.
    pub fn record(&self, rec: LookupRecord) {
        if self.tx.try_send(rec).is_err() {
            self.counters.dropped_records_total.inc();
        }
    }

    /// Stops the thread, then writes what is still queued (shutdown; after request intake
    /// stopped). Idempotent.
    pub fn stop(&self) {
        self.thread.stop();
        let mut w = self.writer.lock();
        if let Err(e) = w.round() {
            tracing::warn!(error = %e, "lookup log: final flush failed");
        }
        w.file = None;
    }

    /// The thread.
    pub fn thread(&self) -> &PeriodicThread {
        &self.thread
    }

    /// The status node `lookup_log`.
    pub fn status_node(&self) -> StatusNode {
        let (files, total, current) = {
            let f = self.files.lock();
            (
                f.list.len(),
                f.total,
                f.list
                    .back()
                    .map(|(p, _)| p.display().to_string())
                    .unwrap_or_default(),
            )
        };
        self.thread
            .status_node()
            .field("dir", self.cfg.dir.display().to_string())
            .field("max_bytes", self.cfg.max_bytes)
            .field("file_bytes", self.cfg.file_bytes)
            .field("files", files)
            .field("dir_bytes", total)
            .field("current_file", current)
            .field("queue_capacity", QUEUE_CAPACITY)
            .field("queued", self.tx.len())
            .fields(status_fields(self.counters.as_ref()))
    }
}

impl MetricSet for LookupLog {
    fn descriptors(&self) -> &'static [MetricDesc] {
        self.counters.descriptors()
    }

    fn visit(&self, v: &mut dyn MetricVisitor) {
        self.counters.visit(v);
        self.thread.visit(v);
    }
}

impl Writer {
    fn round(&mut self) -> Result<(), String> {
        self.buf.clear();
        let mut n = 0u64;
        while let Ok(rec) = self.rx.try_recv() {
            encode(&rec, &mut self.buf);
            n += 1;
            if self.buf.len() >= 1 << 22 {
                self.flush(n)?;
                n = 0;
                self.buf.clear();
            }
        }
        if n > 0 {
            self.flush(n)?;
        }
        Ok(())
    }

    /// Appends the buffer (`n` records) to the current file, then rotates if it is full.
    fn flush(&mut self, n: u64) -> Result<(), String> {
        if self.file.is_none()
            && let Err(e) = self.open_next()
        {
            return Err(self.failed(n, format!("opening a new log file: {e}")));
        }
        let Some(file) = self.file.as_mut() else {
            return Err(self.failed(n, "no log file".into()));
        };
        if let Err(e) = file.write_all(&self.buf) {
            self.file = None;
            return Err(self.failed(n, format!("writing: {e}")));
        }
        let len = self.buf.len() as u64;
        self.counters.records_written_total.add(n);
        self.counters.bytes_written_total.add(len);
        let full = {
            let mut f = self.files.lock();
            f.total += len;
            match f.list.back_mut() {
                Some((_, size)) => {
                    *size += len;
                    *size >= self.cfg.file_bytes
                }
                None => false,
            }
        };
        if full {
            self.file = None;
            if let Err(e) = self.open_next() {
                self.counters.write_errors_total.inc();
                return Err(format!("opening a new log file: {e}"));
            }
        }
        Ok(())
    }

    fn failed(&self, n: u64, msg: String) -> String {
        self.counters.write_errors_total.inc();
        self.counters.dropped_records_total.add(n);
        msg
    }

    /// Starts the next file (magic written), then deletes the oldest files over the bound.
    fn open_next(&mut self) -> std::io::Result<()> {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        self.seq += 1;
        let path = self
            .cfg
            .dir
            .join(format!("lookups-{ms:013}-{:06}.{FILE_EXT}", self.seq));
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        file.write_all(MAGIC)?;
        self.counters.files_created_total.inc();
        self.counters.bytes_written_total.add(MAGIC.len() as u64);
        self.file = Some(file);
        let doomed = {
            let mut f = self.files.lock();
            f.list.push_back((path, MAGIC.len() as u64));
            f.total += MAGIC.len() as u64;
            let mut doomed = Vec::new();
            while f.total > self.cfg.max_bytes && f.list.len() > 1 {
                if let Some((p, len)) = f.list.pop_front() {
                    f.total -= len;
                    doomed.push(p);
                }
            }
            doomed
        };
        for p in doomed {
            match std::fs::remove_file(&p) {
                Ok(()) => self.counters.files_deleted_total.inc(),
                Err(e) => {
                    self.counters.write_errors_total.inc();
                    tracing::warn!(file = %p.display(), error = %e, "lookup log: cannot delete an old file");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvtier_core::analysis::lookup_log::{LogReader, log_files};

    use super::*;

    fn rec(i: u64) -> LookupRecord {
        LookupRecord {
            unix_micros: i,
            chunk_bytes: 4096,
            kv_rank: 0,
            ranks: 1,
            cache_salt: Arc::from(""),
            model: Arc::from("m"),
            chunks: vec![i; 8],
        }
    }

    #[test]
    fn rotates_and_keeps_the_directory_under_its_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        // An old file from an earlier run counts toward the bound and goes first.
        let old = dir.path().join("lookups-0000000000000-000001.kvtlog");
        std::fs::write(&old, MAGIC).expect("old file");
        let cfg = LookupLogConfig {
            dir: dir.path().to_owned(),
            max_bytes: 2000,
            file_bytes: 400,
        };
        let log = LookupLog::start(cfg).expect("start");
        let mut written = 0;
        for round in 0..20u64 {
            for i in 0..3 {
                log.record(rec(round * 3 + i));
            }
            // One round per batch, so each file gets a few records and then rotates.
            log.writer.lock().round().expect("round");
            written += 3;
        }
        log.stop();
        let c = &log.counters;
        assert_eq!(c.records_written_total.get(), written);
        assert_eq!(c.dropped_records_total.get(), 0);
        assert!(c.files_created_total.get() > 3, "rotated");
        assert!(c.files_deleted_total.get() > 0, "deleted the oldest");
        assert!(!old.exists(), "the earlier run's file went first");
        let files = log_files(dir.path()).expect("files");
        let total: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(total <= 2000, "{total} bytes in {} files", files.len());
        // What is left reads back in order, newest records last.
        let mut last = None;
        for f in &files {
            let mut r = LogReader::open(f).expect("open");
            while let Some(rec) = r.next_record().expect("record") {
                assert!(last < Some(rec.unix_micros));
                last = Some(rec.unix_micros);
            }
            assert_eq!(r.truncated_at(), None);
        }
        assert_eq!(last, Some(written - 1));
        let node = log.status_node().to_value();
        assert_eq!(node["records_written_total"], written);
    }
}
