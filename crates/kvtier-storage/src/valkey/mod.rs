//! `valkey`: LMCache's Valkey/Redis adapter, standalone or Redis Cluster / Valkey Cluster, with
//! TLS (rustls) and ACL users, on the `redis` crate (`cluster-async` for cluster mode: slot
//! routing, MOVED/ASK redirections and slot-map refreshes are the crate's, not ours).
//!
//! # Keys and values (shared with LMCache 0.5.6's `valkey` adapter)
//! An object lives under one key, `[<key_prefix>@]<model>@<kv_rank as 8 hex digits>@<group as
//! hex>@<chunk hash as 64 hex digits>[@<cache_salt>]`, and its value is the raw payload (no
//! header), so kvtier and LMCache nodes sharing a deployment read each other's chunks. Keys carry
//! no hash tag (`key_prefix` may not contain braces), so the chunk hash spreads them uniformly
//! over the 16384 slots and therefore over every shard. An object is one value: objects larger
//! than `max_value_bytes` (512 MiB, the servers' default `proto-max-bulk-len`) are **refused**
//! (`Invalid`, counted as a failed store), never split. A value whose length differs from the
//! L1 range it is loaded into is corrupt (foreign or stale data): it is deleted and counted, and
//! the load fails. `SET` is atomic, so no reader sees half a value.
//!
//! # Pins, capacity, eviction
//! As in `resp`: pins are local to this process; with `max_capacity_gb` the adapter bounds and
//! evicts (LRU) only the objects it wrote itself; a lookup or load that misses an indexed key
//! un-indexes it. With `ttl_seconds` every key is written with that expiry, and the server may
//! expire it before this process evicts it (the index heals on the next miss).
//!
//! # Faults and health
//! - **Standalone**: like `resp`. A connection-level failure drops the `num_workers`
//!   connections and marks the adapter down (calls fail fast with `Unavailable`); the probe
//!   loop reconnects with backoff; a `PING` heartbeat runs every second while up.
//! - **Cluster**: one multiplexed cluster connection (clones share it); at most `num_workers`
//!   requests are in flight (semaphore). Every request is per key, so a batch spreads over the
//!   shards and each key's outcome is its own: a key whose shard is unavailable fails (load,
//!   store) or is a miss (lookup), and the other keys are served. The heartbeat reads the
//!   topology (`CLUSTER SLOTS`, from the first known node that answers) and `PING`s every
//!   master; a master that does not answer, or slots that no master serves, make the adapter
//!   **unhealthy with a reason naming the node** while it keeps serving the other shards. When
//!   no node answers at all the adapter is marked down, and the probe loop builds a fresh
//!   cluster connection until the cluster is back. Failovers (a slot range moving to a former
//!   replica of its master), slot moves and nodes added or removed are counted from successive
//!   topology reads.
//! - Per-node accounting: each request is attributed to the master serving its key's slot in
//!   the last topology read (the slot is computed for accounting only; the crate routes), and
//!   counted with its latency under the `node` label. At most [`MAX_NODES`] nodes are tracked.
//!
//! Invariants: no lock is held across an `.await` (topology, node stats, connections and the
//! index are parking_lot mutexes taken for O(keys) or O(nodes) work); every request is bounded
//! by `request_timeout`; queues: none (callers' batches, bounded by the semaphore).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::Allocation;
use kvtier_core::metrics::{LatencyHistogram, MetricSet, MetricVisitor, status_fields};
use kvtier_core::shm::ShmSegment;
use kvtier_core::status::StatusNode;
use parking_lot::Mutex;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, Cmd, ConnectionAddr, IntoConnectionInfo,
    Pipeline, RedisError, RedisFuture, RedisResult, TlsCertificates, Value,
};
use tokio::sync::Semaphore;

use crate::backend::{
    BoxFuture, KeyResults, L2Backend, Usage, copy_in, load_batch, status_head, store_batch,
    visit_adapter_metrics,
};
use crate::config::{EvictionPolicyName, ValkeyConfig, gib_to_bytes};
use crate::error::{ConfigError, L2Error, is_redis_connection_error};
use crate::health::{Health, Prober};
use crate::index::ObjectIndex;
use crate::instrumented::Instrumented;
use crate::metrics::{
    AdapterEvents, Labelled, VALKEY_NODE_LATENCY, ValkeyNodeCounters, ValkeyTopologyEvents,
    ValkeyTopologyGauges,
};

mod conn;
mod topology;

pub use topology::{CLUSTER_SLOTS, slot_of};

use conn::{Conn, Target};
use topology::{NodeStats, Topology};

/// Most nodes whose statistics one adapter keeps (bounds the `node` label).
pub const MAX_NODES: usize = 256;
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The key of `k` in LMCache's layout (see the module docs).
pub fn wire_key(prefix: &str, k: &ObjectKey) -> String {
    let mut s = String::with_capacity(prefix.len() + k.model_name.len() + 96);
    if !prefix.is_empty() {
        s.push_str(prefix);
        s.push('@');
    }
    s.push_str(&format!(
        "{}@{:08x}@{:x}@{}",
        k.model_name, k.kv_rank, k.object_group_id, k.chunk_hash
    ));
    if !k.cache_salt.is_empty() {
        s.push('@');
        s.push_str(&k.cache_salt);
    }
    s
}

/// The `valkey` adapter.
#[derive(Debug)]
pub struct ValkeyBackend {
    cfg: ValkeyConfig,
    /// Standalone: the one node; cluster: the seeds.
    seeds: Vec<(String, u16)>,
    target: Target,
    conns: Mutex<Vec<Conn>>,
    rr: AtomicUsize,
    permits: Semaphore,
    index: Mutex<ObjectIndex>,
    health: Health,
    events: AdapterEvents,
    topo_events: ValkeyTopologyEvents,
    topology: Mutex<Topology>,
    nodes: Mutex<BTreeMap<String, Arc<NodeStats>>>,
    reconnecting: tokio::sync::Mutex<()>,
}

impl ValkeyBackend {
    /// Builds the adapter, tries to connect once, and starts the probe loop on `handle`. An
    /// unreachable deployment (or refused credentials or certificates) does not fail start-up:
    /// the adapter starts unhealthy with the reason and connects when it can. Unreadable TLS
    /// files fail start-up.
    pub async fn open(
        cfg: ValkeyConfig,
        handle: &tokio::runtime::Handle,
    ) -> Result<Arc<Instrumented<Self>>, ConfigError> {
        let seeds = cfg.nodes()?;
        if !cfg.cluster_mode && seeds.len() > 1 {
            tracing::warn!(
                used = %format!("{}:{}", seeds[0].0, seeds[0].1),
                given = seeds.len(),
                "valkey l2 adapter: cluster_mode is false, only the first startup node is used"
            );
        }
        if cfg.cluster_mode && cfg.database_id.is_some() {
            tracing::warn!("valkey l2 adapter: database_id is ignored in cluster mode");
        }
        let target = Self::target(&cfg, &seeds)?;
        let capacity = gib_to_bytes(cfg.max_capacity_gb);
        let me = Arc::new(Instrumented::new(Self {
            permits: Semaphore::new(cfg.num_workers),
            index: Mutex::new(ObjectIndex::new(
                capacity,
                EvictionPolicyName::LRU,
                cfg.eviction.as_ref(),
            )),
            seeds,
            target,
            cfg,
            conns: Mutex::new(Vec::new()),
            rr: AtomicUsize::new(0),
            health: Health::new(),
            events: AdapterEvents::default(),
            topo_events: ValkeyTopologyEvents::default(),
            topology: Mutex::new(Topology::default()),
            nodes: Mutex::new(BTreeMap::new()),
            reconnecting: tokio::sync::Mutex::new(()),
        }));
        match me.reconnect().await {
            Ok(()) => tracing::info!(
                nodes = %me.cfg.startup_nodes,
                cluster_mode = me.cfg.cluster_mode,
                tls = me.cfg.tls_enable,
                "valkey l2 adapter connected"
            ),
            Err(e) => {
                me.health.mark_down("valkey", e);
            }
        }
        me.start_probe(handle, HEARTBEAT);
        Ok(me)
    }

    /// Runs one command for `key`, accounted to its node. Standalone connection-level failures
    /// mark the adapter down; in cluster mode a failure is that key's alone.
    async fn run<T: redis::FromRedisValue>(
        &self,
        key: &str,
        cmd: &Cmd,
        what: &str,
    ) -> Result<T, L2Error> {
        let _permit = self.permits.acquire().await.map_err(|_| L2Error::Closed)?;
        let mut conn = self.conn()?;
        let node = self.node_of(key);
        let t = Instant::now();
        let r: RedisResult<T> = cmd.query_async(&mut conn).await;
        self.account(&node, t, r.is_ok());
        r.map_err(|e| self.fail(&e, what, &node))
    }

    fn fail(&self, e: &RedisError, what: &str, node: &str) -> L2Error {
        if !self.cfg.cluster_mode && is_redis_connection_error(e) {
            self.conns.lock().clear();
            let reason = format!("valkey at {node} unreachable ({what}): {e}");
            self.health.mark_down("valkey", reason.clone());
            L2Error::Unavailable(reason)
        } else if is_redis_connection_error(e) {
            let msg = format!("valkey node {node} unreachable ({what}): {e}");
            self.health.record_error(msg.clone());
            L2Error::Unavailable(msg)
        } else {
            let msg = format!("valkey {what} on {node}: {e}");
            self.health.record_error(msg.clone());
            L2Error::Backend(msg)
        }
    }

    fn name(&self, k: &ObjectKey) -> String {
        wire_key(&self.cfg.key_prefix, k)
    }

    async fn del_keys(&self, keys: &[ObjectKey]) -> Vec<Result<i64, L2Error>> {
        join_all(keys.iter().map(|k| async move {
            let name = self.name(k);
            let mut cmd = redis::cmd("DEL");
            cmd.arg(&name);
            self.run::<i64>(&name, &cmd, "delete").await
        }))
        .await
    }

    async fn evict(&self, victims: Vec<(ObjectKey, u64)>) {
        if victims.is_empty() {
            return;
        }
        self.events.evicted_objects_total.add(victims.len() as u64);
        self.events
            .evicted_bytes_total
            .add(victims.iter().map(|(_, l)| l).sum());
        let keys: Vec<ObjectKey> = victims.into_iter().map(|(k, _)| k).collect();
        let failed = self
            .del_keys(&keys)
            .await
            .into_iter()
            .filter(Result::is_err)
            .count();
        if failed > 0 {
            tracing::warn!(
                objects = failed,
                "valkey l2 eviction could not delete objects"
            );
        }
    }

    async fn store_one(
        &self,
        key: &ObjectKey,
        segment: &Arc<ShmSegment>,
        a: Allocation,
    ) -> Result<(), L2Error> {
        if a.len > self.cfg.max_value_bytes as u64 {
            return Err(L2Error::Invalid(format!(
                "object of {} bytes is larger than the largest valkey value ({} bytes); \
                 objects are never split",
                a.len, self.cfg.max_value_bytes
            )));
        }
        let seg = Arc::clone(segment);
        let buf = tokio::task::spawn_blocking(move || crate::backend::copy_out(&seg, a))
            .await
            .map_err(|e| L2Error::Io(format!("copy task failed: {e}")))??;
        let name = self.name(key);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&name).arg(buf);
        if let Some(ttl) = self.cfg.ttl_seconds {
            cmd.arg("EX").arg(ttl);
        }
        self.run::<()>(&name, &cmd, "store").await
    }

    async fn load_one(
        &self,
        key: &ObjectKey,
        segment: &Arc<ShmSegment>,
        a: Allocation,
    ) -> Result<(), L2Error> {
        let name = self.name(key);
        let mut cmd = redis::cmd("GET");
        cmd.arg(&name);
        let value: Option<Vec<u8>> = self.run(&name, &cmd, "load").await?;
        let Some(value) = value else {
            return Err(L2Error::NotFound);
        };
        if value.len() as u64 != a.len {
            return Err(L2Error::Corrupt(format!(
                "value is {} bytes, L1 range is {}",
                value.len(),
                a.len
            )));
        }
        let seg = Arc::clone(segment);
        tokio::task::spawn_blocking(move || copy_in(&seg, a.offset, &value))
            .await
            .map_err(|e| L2Error::Io(format!("copy task failed: {e}")))?
    }

    /// Stored lengths (`STRLEN`; 0 = absent); a key whose request failed is `Err`.
    async fn lengths(&self, keys: &[ObjectKey]) -> Vec<Result<u64, L2Error>> {
        join_all(keys.iter().map(|k| async move {
            let name = self.name(k);
            let mut cmd = redis::cmd("STRLEN");
            cmd.arg(&name);
            self.run::<u64>(&name, &cmd, "lookup").await
        }))
        .await
    }
}

impl Prober for ValkeyBackend {
    fn probe_name(&self) -> &str {
        "valkey"
    }

    fn probe_health(&self) -> &Health {
        &self.health
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(self.reconnect())
    }

    fn heartbeat(&self) -> Option<BoxFuture<'_, Result<(), String>>> {
        Some(Box::pin(async move {
            match self.check_deployment().await {
                Ok(()) => Ok(()),
                Err(e) => {
                    self.conns.lock().clear();
                    Err(e)
                }
            }
        }))
    }
}

impl L2Backend for ValkeyBackend {
    fn type_name(&self) -> &'static str {
        "ValkeyL2Adapter"
    }

    fn kind(&self) -> &'static str {
        "valkey"
    }

    fn lookup_and_pin<'a>(
        &'a self,
        keys: &'a [ObjectKey],
    ) -> BoxFuture<'a, Result<Vec<Option<u64>>, L2Error>> {
        Box::pin(async move {
            self.health.gate()?;
            let lens = self.lengths(keys).await;
            // Standalone: a connection failure is batch-wide. Cluster: a key whose shard is
            // unavailable is a miss; the others are served.
            if !self.cfg.cluster_mode
                && let Some(Err(e @ L2Error::Unavailable(_))) = lens
                    .iter()
                    .find(|r| matches!(r, Err(L2Error::Unavailable(_))))
            {
                return Err(e.clone());
            }
            let mut ix = self.index.lock();
            Ok(keys
                .iter()
                .zip(lens)
                .map(|(k, r)| match r {
                    Ok(len) if len > 0 => {
                        ix.get(k);
                        ix.pin(k);
                        Some(len)
                    }
                    Ok(_) => {
                        if ix.remove(k).is_some() {
                            self.events.vanished_objects_total.inc();
                        }
                        None
                    }
                    Err(_) => None,
                })
                .collect())
        })
    }

    fn unpin<'a>(&'a self, keys: &'a [ObjectKey]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.index.lock().unpin_all(keys);
        })
    }

    fn load<'a>(
        &'a self,
        keys: &'a [ObjectKey],
        segment: &'a Arc<ShmSegment>,
        dst: &'a [Allocation],
    ) -> BoxFuture<'a, KeyResults> {
        Box::pin(load_batch(
            "valkey",
            keys,
            &self.health,
            &self.events,
            &self.index,
            move |i| self.load_one(&keys[i], segment, dst[i]),
            move |corrupt| async move {
                let _deleted = self.del_keys(&corrupt).await;
            },
        ))
    }

    fn store<'a>(
        &'a self,
        keys: &'a [ObjectKey],
        segment: &'a Arc<ShmSegment>,
        src: &'a [Allocation],
    ) -> BoxFuture<'a, KeyResults> {
        Box::pin(store_batch(
            keys,
            src,
            &self.health,
            &self.events,
            &self.index,
            move |victims| self.evict(victims),
            move |i| self.store_one(&keys[i], segment, src[i]),
        ))
    }

    fn delete<'a>(&'a self, keys: &'a [ObjectKey]) -> BoxFuture<'a, Result<u64, L2Error>> {
        Box::pin(async move {
            self.health.gate()?;
            let candidates: Vec<ObjectKey> = {
                let ix = self.index.lock();
                keys.iter().filter(|k| !ix.is_pinned(k)).cloned().collect()
            };
            let results = self.del_keys(&candidates).await;
            if let Some(Err(e)) = results.iter().find(|r| r.is_err())
                && results.iter().all(Result::is_err)
            {
                return Err(e.clone());
            }
            let mut deleted = 0;
            let mut ix = self.index.lock();
            for (k, r) in candidates.iter().zip(results) {
                if matches!(r, Ok(n) if n > 0) {
                    deleted += 1;
                    ix.remove(k);
                }
            }
            Ok(deleted)
        })
    }

    fn usage(&self) -> Usage {
        self.index.lock().usage()
    }

    fn set_listener(&self, listener: crate::listener::BoundListener) {
        self.index.lock().set_listener(listener);
    }

    fn health_state(&self) -> Option<&Health> {
        Some(&self.health)
    }

    fn events(&self) -> Option<&AdapterEvents> {
        Some(&self.events)
    }

    fn visit_metrics(&self, v: &mut dyn MetricVisitor) {
        visit_adapter_metrics(self, v);
        self.topology_gauges().visit(v);
        self.topo_events.visit(v);
        let nodes: Vec<(String, Arc<NodeStats>)> = self
            .nodes
            .lock()
            .iter()
            .map(|(k, s)| (k.clone(), Arc::clone(s)))
            .collect();
        for (node, s) in nodes {
            let labels = [("node", node.as_str())];
            s.counters.visit(&mut Labelled::new(v, &labels));
            v.histogram(&VALKEY_NODE_LATENCY, &labels, &s.latency.exposition());
        }
    }

    fn report_status(&self) -> StatusNode {
        let h = self.health.snapshot();
        let reason = h
            .reason
            .clone()
            .unwrap_or_else(|| format!("valkey at {} is unavailable", self.cfg.startup_nodes));
        let problems = self.topology.lock().problems();
        let g = self.topology_gauges();
        let mut node = status_head(self, &h)
            .require(h.connected, reason)
            .require(problems.is_empty(), problems.join("; "))
            .field("down_for_seconds", h.down_for_seconds)
            .field("startup_nodes", &self.cfg.startup_nodes)
            .field("cluster_mode", self.cfg.cluster_mode)
            .field("tls_enable", self.cfg.tls_enable)
            .field("username", &self.cfg.username)
            .field("key_prefix", &self.cfg.key_prefix)
            .field("database_id", self.cfg.database_id)
            .field("ttl_seconds", self.cfg.ttl_seconds)
            .field("num_workers", self.cfg.num_workers)
            .field("max_value_bytes", self.cfg.max_value_bytes)
            .field("eviction", self.cfg.eviction)
            .field("open_connections", self.conns.lock().len());
        for (k, v) in status_fields(&g)
            .into_iter()
            .chain(status_fields(&self.topo_events))
        {
            node = node.field(k, v);
        }
        node.field("nodes", self.nodes_status())
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.conns.lock().clear();
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvtier_core::hash::ChunkHash;

    use super::*;

    #[test]
    fn wire_key_matches_lmcache_layout() {
        let mut h = [0u8; 32];
        h[0] = 0xab;
        let k = ObjectKey {
            chunk_hash: ChunkHash::from_bytes(h),
            model_name: Arc::from("org/m"),
            kv_rank: 0x0100_0100,
            object_group_id: 10,
            cache_salt: Arc::from(""),
        };
        let hex = format!("ab{}", "00".repeat(31));
        assert_eq!(wire_key("", &k), format!("org/m@01000100@a@{hex}"));
        let salted = ObjectKey {
            cache_salt: Arc::from("s1"),
            ..k
        };
        assert_eq!(
            wire_key("p", &salted),
            format!("p@org/m@01000100@a@{hex}@s1")
        );
    }
}
