//! One bench client: a thread with its own socket, engine instance, source chunks and
//! retrieve buffer, running the phase list in lock-step with the others.
//!
//! All clients of one run share a single mapping of the pool (as threads of one engine
//! process would), so a page any client faulted in is warm for all of them: the second pass
//! then measures the server and the copy, not page-table population.
//!
//! Payloads: each client keeps `chunks + 1` distinct pseudo-random source chunks; chunk `i` of
//! request `r` is source `(r × chunks + i) mod (chunks + 1)` with its first 32 bytes replaced
//! by a tag naming (seed, client, pass, request, chunk). So verification catches both corrupted
//! bytes and chunks served for the wrong key. Sources and the retrieve buffer are written once
//! before the first phase, so no timed copy pays first-touch faults on the private side.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use kvtier_client::{CacheKey, Client, RegisterPayload, ShmPool};

use super::report::PhaseOut;
use super::{Pass, Phase, RunConfig, Shared, fill_shape};

/// Chunks per request in the status fill.
pub const FILL_CHUNKS: usize = 64;
/// Requests per batch in the status fill (prepare all, then commit all).
const FILL_BATCH: usize = 16;
const TAG_LEN: usize = 32;
const TAG_MAGIC: u64 = 0x6b76_7469_6572_6231;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub(super) fn make_sources(cfg: &RunConfig, idx: usize) -> Vec<Vec<u8>> {
    (0..=cfg.chunks)
        .map(|s| {
            let mut state = cfg.seed ^ ((idx as u64) << 40) ^ ((s as u64) << 20);
            let mut buf = vec![0u8; cfg.chunk_bytes];
            for word in buf.chunks_mut(8) {
                let v = splitmix(&mut state).to_le_bytes();
                word.copy_from_slice(&v[..word.len()]);
            }
            buf
        })
        .collect()
}

/// A retrieve buffer with every page already written.
pub(super) fn touched(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v.fill(0xa5);
    v
}

pub(super) fn source_index(cfg: &RunConfig, r: usize, i: usize) -> usize {
    (r * cfg.chunks + i) % (cfg.chunks + 1)
}

/// The thread body: set up, then run every phase between barriers. A failure stops this
/// client's work but never its barrier waits, so the others cannot deadlock.
pub fn thread_main(idx: usize, cfg: &RunConfig, shared: &Shared, phases: &[Phase]) {
    let mut worker = match Worker::setup(idx, cfg, shared) {
        Ok(w) => Some(w),
        Err(e) => {
            shared.fail(&format!("client {idx} setup"), &e);
            None
        }
    };
    for (i, phase) in phases.iter().enumerate() {
        shared.barrier.wait();
        if let Some(w) = worker.as_mut()
            && !shared.failed.load(Ordering::SeqCst)
        {
            match w.run(*phase, shared) {
                Ok(Some(out)) => {
                    if let Ok(mut r) = shared.results.lock() {
                        r.push((i, out));
                    }
                }
                Ok(None) => {}
                Err(e) => shared.fail(&format!("client {idx} {}", phase.label()), &e),
            }
        }
        shared.done[i].fetch_add(1, Ordering::SeqCst);
    }
    shared.barrier.wait();
    if let Some(mut w) = worker {
        // Best effort: the server reaps instances anyway.
        let _unregistered = w.client.unregister_engine_driven(w.iid);
    }
}

/// One client's state.
pub struct Worker<'a> {
    idx: usize,
    cfg: &'a RunConfig,
    client: Client,
    pool: Arc<ShmPool>,
    iid: i64,
    sources: Vec<Vec<u8>>,
    dest: Vec<u8>,
}

impl<'a> Worker<'a> {
    fn setup(idx: usize, cfg: &'a RunConfig, shared: &Shared) -> anyhow::Result<Self> {
        let mut client = Client::connect(&cfg.url, cfg.timeout)?;
        let iid = instance_id(cfg, idx);
        let reg = client
            .register_engine_driven(&register_payload(cfg, iid, &cfg.shape))
            .context("register_kv_cache_engine_driven_context")?;
        if reg.shm_name.is_empty() || reg.pool_size == 0 {
            bail!("the server has no shared-memory pool (pickle mode); start it with a shm name");
        }
        let pool = {
            let mut slot = shared
                .pool
                .lock()
                .map_err(|_| anyhow::anyhow!("pool lock poisoned"))?;
            match slot.as_ref() {
                Some(p)
                    if p.name() == reg.shm_name.trim_start_matches('/')
                        && p.len() == reg.pool_size =>
                {
                    Arc::clone(p)
                }
                _ => {
                    let p = Arc::new(ShmPool::open(&reg.shm_name, reg.pool_size)?);
                    *slot = Some(Arc::clone(&p));
                    p
                }
            }
        };
        if idx == 0 {
            let per_pass = (cfg.requests * cfg.chunks) as u64 * align(cfg.chunk_bytes as u64);
            // All clients store at once; stay clear of the eviction watermark.
            let need = per_pass.saturating_mul(cfg.clients as u64);
            let fill = cfg.status_objects.div_ceil(FILL_CHUNKS as u64)
                * FILL_CHUNKS as u64
                * align(fill_shape().chunk_bytes(cfg.chunk_size));
            ensure!(
                (need + fill) as f64 <= 0.7 * reg.pool_size as f64,
                "one pass stores {need} bytes (plus {fill} of status fill) but the pool has \
                 {} bytes: stay under 70% (eviction would turn hits into misses); lower \
                 --requests, --clients or --status-objects, or give the server more L1",
                reg.pool_size
            );
        }
        Ok(Self {
            idx,
            cfg,
            client,
            pool,
            iid,
            sources: make_sources(cfg, idx),
            dest: touched(cfg.requests * cfg.chunks * cfg.chunk_bytes),
        })
    }

    fn run(&mut self, phase: Phase, shared: &Shared) -> anyhow::Result<Option<PhaseOut>> {
        Ok(match phase {
            Phase::NoopSeq => Some(self.noop_seq(shared)?),
            Phase::NoopBesideHeavy => Some(self.noops(shared)?),
            Phase::NoopPipelined => Some(self.noop_pipelined(shared)?),
            Phase::Store(pass) => Some(self.store(pass, shared)?),
            Phase::StoreLoad => {
                let out = self.store(2, shared)?;
                for r in 0..self.cfg.requests {
                    let id = self.key(2, r).request_id;
                    self.client.end_session(&id)?;
                }
                Some(out)
            }
            Phase::Retrieve(pass) => Some(self.retrieve(pass, shared)?),
            Phase::Verify(pass) => {
                self.verify(pass, shared)?;
                None
            }
            Phase::Clear => {
                if self.idx == 0 {
                    self.client.clear(true).context("clear(force=True)")?;
                }
                None
            }
            Phase::Fill => {
                if self.idx == 0 {
                    Some(self.fill(shared)?)
                } else {
                    None
                }
            }
            Phase::StatusIdle => None,
        })
    }

    fn key(&self, pass: Pass, r: usize) -> CacheKey {
        let n = self.cfg.chunks * self.cfg.chunk_size as usize;
        let head = [
            self.cfg.seed as u32,
            (self.cfg.seed >> 32) as u32,
            self.idx as u32,
            pass,
            r as u32,
        ];
        let tokens: Vec<u32> = (0..n)
            .map(|i| head.get(i).copied().unwrap_or(i as u32))
            .collect();
        CacheKey::new(
            self.cfg.model.clone(),
            1,
            tokens,
            0,
            n as i64,
            format!("kvb-{:x}-{}-{pass}-{r}", self.cfg.seed, self.idx),
        )
    }

    fn tag(&self, pass: Pass, r: usize, i: usize) -> [u8; TAG_LEN] {
        let mut t = [0u8; TAG_LEN];
        let words = [
            TAG_MAGIC,
            self.cfg.seed,
            ((self.idx as u64) << 32) | u64::from(pass),
            ((r as u64) << 32) | i as u64,
        ];
        for (dst, w) in t.chunks_exact_mut(8).zip(words) {
            dst.copy_from_slice(&w.to_le_bytes());
        }
        t
    }

    /// `--noops` sequential noops, sampled as `noop`.
    fn noops(&mut self, shared: &Shared) -> anyhow::Result<PhaseOut> {
        let mut out = PhaseOut::start();
        for _ in 0..self.cfg.noops {
            let t = Instant::now();
            let r = self.client.noop()?;
            out.sample("noop", t.elapsed());
            ensure!(r == "OK", "noop answered {r:?}");
            shared.progress.inc(1);
        }
        out.ops = self.cfg.noops as u64;
        Ok(out.finish())
    }

    fn noop_seq(&mut self, shared: &Shared) -> anyhow::Result<PhaseOut> {
        let mut out = self.noops(shared)?;
        // `ping` runs on the server's worker pool (in kvtier and LMCache alike): its round trip
        // minus noop's is the cost of dispatching to a pool. Not part of the noop rate.
        for _ in 0..self.cfg.noops.min(1000) {
            let t = Instant::now();
            let ok = self.client.ping(Some(self.iid))?;
            out.sample("ping", t.elapsed());
            ensure!(ok, "ping answered false");
        }
        // A noop sent right after the client copied one request's bytes (as a commit is): the
        // client's caches are cold and the server's threads have slept through the copy, so
        // this round trip pays the wake-ups a back-to-back noop never does. It is the floor of
        // commit_store and commit_retrieve.
        let cfg = self.cfg;
        let request_bytes = cfg.chunks * cfg.chunk_bytes;
        for r in 0..cfg.requests {
            let base = r * request_bytes;
            for i in 0..cfg.chunks {
                let at = base + i * cfg.chunk_bytes;
                let dst = self
                    .dest
                    .get_mut(at..at + cfg.chunk_bytes)
                    .context("retrieve buffer too small")?;
                dst.copy_from_slice(&self.sources[source_index(cfg, r, i)]);
            }
            black_box(&self.dest);
            let t = Instant::now();
            let reply = self.client.noop()?;
            out.sample("noop_after_copy", t.elapsed());
            ensure!(reply == "OK", "noop answered {reply:?}");
        }
        Ok(out)
    }

    fn noop_pipelined(&mut self, shared: &Shared) -> anyhow::Result<PhaseOut> {
        let mut out = PhaseOut::start();
        let mut window = std::collections::VecDeque::with_capacity(self.cfg.depth);
        let mut sent = 0;
        while sent < self.cfg.noops || !window.is_empty() {
            while sent < self.cfg.noops && window.len() < self.cfg.depth {
                window.push_back(self.client.submit_noop()?);
                sent += 1;
            }
            if let Some(p) = window.pop_front() {
                let r = self.client.wait(p)?;
                ensure!(r == "OK", "noop answered {r:?}");
                shared.progress.inc(1);
            }
        }
        out.ops = self.cfg.noops as u64;
        Ok(out.finish())
    }

    fn store(&mut self, pass: Pass, shared: &Shared) -> anyhow::Result<PhaseOut> {
        let cfg = self.cfg;
        let cb = cfg.chunk_bytes;
        let mut out = PhaseOut::start();
        for r in 0..cfg.requests {
            let key = self.key(pass, r).with_worker(Some(0));
            let t0 = Instant::now();
            let prep = self.client.prepare_store(&key, self.iid)?;
            let t1 = Instant::now();
            ensure!(
                prep.slots.len() == cfg.chunks,
                "prepare_store gave {} slots for {} new chunks (L1 full?)",
                prep.slots.len(),
                cfg.chunks
            );
            for (slot, &ix) in prep.slots.iter().zip(&prep.chunk_indices) {
                let ix = usize::try_from(ix)?;
                ensure!(ix < cfg.chunks, "chunk index {ix} out of range");
                ensure!(
                    slot.length == cb as u64,
                    "slot of {} bytes for {cb}-byte chunks",
                    slot.length
                );
                if cfg.client_populate {
                    self.pool.populate_write(slot.offset, slot.length)?;
                }
                let src = &self.sources[source_index(cfg, r, ix)];
                self.pool.copy_in(slot.offset, src)?;
                self.pool.copy_in(slot.offset, &self.tag(pass, r, ix))?;
            }
            let t2 = Instant::now();
            ensure!(
                self.client.commit_store(&key, self.iid)?,
                "commit_store returned false"
            );
            let t3 = Instant::now();
            out.sample("prepare_store", t1 - t0);
            out.sample("copy_in", t2 - t1);
            out.sample("commit_store", t3 - t2);
            out.bytes += (cfg.chunks * cb) as u64;
            shared.progress.inc(1);
        }
        out.ops = cfg.requests as u64;
        Ok(out.finish())
    }

    fn retrieve(&mut self, pass: Pass, shared: &Shared) -> anyhow::Result<PhaseOut> {
        let cfg = self.cfg;
        let cb = cfg.chunk_bytes;
        let mut out = PhaseOut::start();
        for r in 0..cfg.requests {
            let all = self.key(pass, r);
            let rank = all.clone().with_worker(Some(0));
            let t0 = Instant::now();
            let (hit, polls) = self.client.lookup_and_poll(&all, 1)?;
            let t1 = Instant::now();
            out.polls += u64::from(polls);
            ensure!(
                hit == cfg.chunks as u64,
                "lookup hit {hit} of {} chunks",
                cfg.chunks
            );
            let prep = self.client.prepare_retrieve(&rank, self.iid)?;
            let t2 = Instant::now();
            ensure!(
                prep.success && prep.slots.len() == cfg.chunks,
                "prepare_retrieve: success={} with {} slots",
                prep.success,
                prep.slots.len()
            );
            let base = r * cfg.chunks * cb;
            for (i, slot) in prep.slots.iter().enumerate() {
                ensure!(slot.length == cb as u64, "slot of {} bytes", slot.length);
                let at = base + i * cb;
                let dst = self
                    .dest
                    .get_mut(at..at + cb)
                    .context("retrieve buffer too small")?;
                self.pool.copy_out(slot.offset, dst)?;
            }
            let t3 = Instant::now();
            ensure!(
                self.client.commit_retrieve(&rank, self.iid)?,
                "commit_retrieve returned false"
            );
            let t4 = Instant::now();
            self.client.end_session(&all.request_id)?;
            let t5 = Instant::now();
            out.sample("lookup", t1 - t0);
            out.sample("prepare_retrieve", t2 - t1);
            out.sample("copy_out", t3 - t2);
            out.sample("commit_retrieve", t4 - t3);
            out.sample("end_session", t5 - t4);
            out.bytes += (cfg.chunks * cb) as u64;
            shared.progress.inc(1);
        }
        out.ops = cfg.requests as u64;
        Ok(out.finish())
    }

    fn verify(&self, pass: Pass, shared: &Shared) -> anyhow::Result<()> {
        let cfg = self.cfg;
        let mut bad = Vec::new();
        for r in 0..cfg.requests {
            for i in 0..cfg.chunks {
                let at = (r * cfg.chunks + i) * cfg.chunk_bytes;
                let got = self
                    .dest
                    .get(at..at + cfg.chunk_bytes)
                    .context("retrieve buffer too small")?;
                let src = &self.sources[source_index(cfg, r, i)];
                let tag_ok = got.get(..TAG_LEN) == Some(&self.tag(pass, r, i)[..]);
                if !tag_ok || got.get(TAG_LEN..) != src.get(TAG_LEN..) {
                    bad.push((r, i, tag_ok));
                }
            }
            shared.progress.inc(1);
        }
        if let Some(&(r, i, tag_ok)) = bad.first() {
            bail!(
                "{} of {} retrieved chunks differ from what was stored; first: request {r} \
                 chunk {i} ({})",
                bad.len(),
                cfg.requests * cfg.chunks,
                if tag_ok {
                    "payload bytes differ"
                } else {
                    "tag differs: another key's chunk or corrupted"
                }
            );
        }
        Ok(())
    }

    /// Adds `status_objects` objects of 4 KiB (rounded up to whole requests) without copying
    /// payloads, prepares and commits pipelined in batches.
    fn fill(&mut self, shared: &Shared) -> anyhow::Result<PhaseOut> {
        let cfg = self.cfg;
        let shape = fill_shape();
        let iid = instance_id(cfg, 9999);
        self.client
            .register_engine_driven(&register_payload(cfg, iid, &shape))
            .context("registering the fill context")?;
        let requests = usize::try_from(cfg.status_objects.div_ceil(FILL_CHUNKS as u64))?;
        let n = FILL_CHUNKS * cfg.chunk_size as usize;
        let key = |r: usize| {
            let head = [cfg.seed as u32, (cfg.seed >> 32) as u32, 0xf111, r as u32];
            let tokens: Vec<u32> = (0..n)
                .map(|i| head.get(i).copied().unwrap_or(i as u32))
                .collect();
            CacheKey::new(
                format!("{}-fill", cfg.model),
                1,
                tokens,
                0,
                n as i64,
                format!("kvb-fill-{r}"),
            )
            .with_worker(Some(0))
        };
        let mut out = PhaseOut::start();
        let mut r = 0;
        while r < requests {
            let batch: Vec<CacheKey> = (r..requests.min(r + FILL_BATCH)).map(key).collect();
            let prepares = batch
                .iter()
                .map(|k| self.client.submit_prepare_store(k, iid))
                .collect::<Result<Vec<_>, _>>()?;
            for p in prepares {
                let prep = self.client.wait(p)?;
                ensure!(
                    prep.slots.len() == FILL_CHUNKS,
                    "fill: prepare_store gave {} slots for {FILL_CHUNKS} chunks (L1 full?)",
                    prep.slots.len()
                );
            }
            let commits = batch
                .iter()
                .map(|k| self.client.submit_commit_store(k, iid))
                .collect::<Result<Vec<_>, _>>()?;
            for p in commits {
                ensure!(self.client.wait(p)?, "fill: commit_store returned false");
            }
            // As an engine does when a request finishes: the server may drop its session.
            let ends = batch
                .iter()
                .map(|k| self.client.submit_end_session(&k.request_id))
                .collect::<Result<Vec<_>, _>>()?;
            for p in ends {
                self.client.wait(p)?;
                shared.progress.inc(1);
            }
            r += batch.len();
        }
        out.ops = (requests * FILL_CHUNKS) as u64;
        let _unregistered = self.client.unregister_engine_driven(iid);
        Ok(out.finish())
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(4096) * 4096
}

pub(super) fn instance_id(cfg: &RunConfig, idx: usize) -> i64 {
    (((cfg.seed >> 8) & 0xff_ffff) * 100_000 + idx as u64) as i64
}

pub(super) fn register_payload(cfg: &RunConfig, iid: i64, shape: &super::Shape) -> RegisterPayload {
    RegisterPayload {
        instance_id: iid,
        model_name: if shape.label == fill_shape().label {
            format!("{}-fill", cfg.model)
        } else {
            cfg.model.clone()
        },
        world_size: 1,
        block_size: 16,
        num_layers: shape.layers as i64,
        hidden_dim_size: shape.hidden as i64,
        dtype_str: shape.dtype.clone(),
        use_mla: false,
        num_physical_slots: None,
    }
}
