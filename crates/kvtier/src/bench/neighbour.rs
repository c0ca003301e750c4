//! The heavy client of `--neighbour-chunks` (how much one client storing big batches back to
//! back raises the others' noop latency).

use std::time::Instant;

use anyhow::Context;
use kvtier_client::{CacheKey, Client};

use super::RunConfig;
use super::report::PhaseOut;
use super::worker::{instance_id, register_payload};

/// The heavy client of `--neighbour-chunks`: its own connection and engine instance, storing
/// batches of new chunks back to back without copying into them.
pub struct Neighbour<'a> {
    cfg: &'a RunConfig,
    client: Client,
    iid: i64,
    batches: u64,
}

impl Drop for Neighbour<'_> {
    fn drop(&mut self) {
        // Best effort: the server reaps instances anyway.
        let _unregistered = self.client.unregister_engine_driven(self.iid);
    }
}

impl<'a> Neighbour<'a> {
    /// Connects and registers (instance index `--clients`, after every client's).
    pub fn setup(cfg: &'a RunConfig) -> anyhow::Result<Self> {
        let mut client = Client::connect(&cfg.url, cfg.timeout)?;
        let iid = instance_id(cfg, cfg.clients);
        client
            .register_engine_driven(&register_payload(cfg, iid, &cfg.shape))
            .context("register_kv_cache_engine_driven_context")?;
        Ok(Self {
            cfg,
            client,
            iid,
            batches: 0,
        })
    }

    /// Stores batches until `done()`; samples each batch's prepare + commit as `heavy_batch`.
    /// A batch L1 cannot hold (fewer slots than chunks) is not an error: the load is the point.
    pub fn run(&mut self, done: impl Fn() -> bool) -> anyhow::Result<PhaseOut> {
        let cfg = self.cfg;
        let n = cfg.neighbour_chunks * cfg.chunk_size as usize;
        let mut out = PhaseOut::start();
        while !done() {
            let b = self.batches;
            self.batches += 1;
            let head = [
                cfg.seed as u32,
                (cfg.seed >> 32) as u32,
                u32::MAX,
                b as u32,
                (b >> 32) as u32,
            ];
            let tokens: Vec<u32> = (0..n)
                .map(|i| head.get(i).copied().unwrap_or(i as u32))
                .collect();
            let id = format!("kvb-{:x}-heavy-{b}", cfg.seed);
            let key = CacheKey::new(cfg.model.clone(), 1, tokens, 0, n as i64, id.clone())
                .with_worker(Some(0));
            let t = Instant::now();
            let prep = self.client.prepare_store(&key, self.iid)?;
            if !prep.slots.is_empty() {
                let _committed = self.client.commit_store(&key, self.iid)?;
            }
            out.sample("heavy_batch", t.elapsed());
            self.client.end_session(&id)?;
            out.ops += 1;
        }
        Ok(out.finish())
    }
}
