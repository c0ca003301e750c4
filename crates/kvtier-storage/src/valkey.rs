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
    BoxFuture, KeyResults, L2Backend, Usage, all_err, copy_in, status_head, visit_adapter_metrics,
};
use crate::config::{EvictionPolicyName, ValkeyConfig, gib_to_bytes};
use crate::error::{ConfigError, L2Error};
use crate::health::{Health, Prober};
use crate::index::{ObjectIndex, StorePlan};
use crate::instrumented::Instrumented;
use crate::metrics::{
    AdapterEvents, Labelled, VALKEY_NODE_LATENCY, ValkeyNodeCounters, ValkeyTopologyEvents,
    ValkeyTopologyGauges,
};

/// Most nodes whose statistics one adapter keeps (bounds the `node` label).
pub const MAX_NODES: usize = 256;
/// Hash slots of a cluster.
pub const CLUSTER_SLOTS: u32 = 16384;
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

/// The cluster slot of `key` (CRC16/XMODEM of the key or of its hash tag, mod 16384), for
/// accounting only.
pub fn slot_of(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % CLUSTER_SLOTS as u16
}

fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

/// A standalone or cluster connection (both multiplexed; clones share the socket(s)).
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Conn::Single",
            Self::Cluster(_) => "Conn::Cluster",
        })
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// How to connect.
enum Target {
    Single(Client),
    Cluster(redis::cluster::ClusterClient),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Target::Single",
            Self::Cluster(_) => "Target::Cluster",
        })
    }
}

/// One slot range and who serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SlotRange {
    start: u16,
    end: u16,
    master: String,
    replicas: Vec<String>,
}

/// The last topology read.
#[derive(Debug, Default)]
struct Topology {
    ranges: Vec<SlotRange>,
    /// Masters that did not answer the last probe, with why.
    unreachable: BTreeMap<String, String>,
    read_once: bool,
}

impl Topology {
    fn nodes(&self) -> BTreeSet<String> {
        self.ranges
            .iter()
            .flat_map(|r| std::iter::once(&r.master).chain(&r.replicas))
            .cloned()
            .collect()
    }

    fn masters(&self) -> BTreeSet<String> {
        self.ranges.iter().map(|r| r.master.clone()).collect()
    }

    fn master_of(&self, slot: u16) -> Option<&str> {
        let i = self.ranges.partition_point(|r| r.end < slot);
        self.ranges
            .get(i)
            .filter(|r| r.start <= slot)
            .map(|r| r.master.as_str())
    }

    fn slots_served(&self) -> u64 {
        self.ranges
            .iter()
            .filter(|r| !self.unreachable.contains_key(&r.master))
            .map(|r| u64::from(r.end - r.start) + 1)
            .sum()
    }

    /// Why the deployment is degraded (empty when it is not).
    fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .unreachable
            .iter()
            .map(|(n, why)| format!("valkey node {n} is unavailable: {why}"))
            .collect();
        let covered: u64 = self
            .ranges
            .iter()
            .map(|r| u64::from(r.end - r.start) + 1)
            .sum();
        if self.read_once && covered < u64::from(CLUSTER_SLOTS) {
            out.push(format!(
                "{} of {CLUSTER_SLOTS} cluster slots have no master",
                u64::from(CLUSTER_SLOTS) - covered
            ));
        }
        out
    }
}

fn value_str(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn value_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        _ => value_str(v)?.parse().ok(),
    }
}

/// `host:port` of a `CLUSTER SLOTS` node entry (`[host, port, id, ...]`).
fn node_addr(v: &Value) -> Option<String> {
    let Value::Array(f) = v else { return None };
    let host = value_str(f.first()?)?;
    let port = value_int(f.get(1)?)?;
    (!host.is_empty() && host != "?").then(|| format!("{host}:{port}"))
}

/// Parses a `CLUSTER SLOTS` reply into ranges sorted by start slot.
fn parse_cluster_slots(v: &Value) -> Result<Vec<SlotRange>, String> {
    let Value::Array(rows) = v else {
        return Err(format!("unexpected CLUSTER SLOTS reply: {v:?}"));
    };
    let mut ranges = Vec::with_capacity(rows.len());
    for row in rows {
        let Value::Array(f) = row else {
            return Err("unexpected CLUSTER SLOTS row".to_owned());
        };
        let (Some(start), Some(end), Some(master)) = (
            f.first().and_then(value_int),
            f.get(1).and_then(value_int),
            f.get(2).and_then(node_addr),
        ) else {
            return Err("malformed CLUSTER SLOTS row".to_owned());
        };
        let (Ok(start), Ok(end)) = (u16::try_from(start), u16::try_from(end)) else {
            return Err("CLUSTER SLOTS slot out of range".to_owned());
        };
        let replicas = f.iter().skip(3).filter_map(node_addr).collect();
        ranges.push(SlotRange {
            start,
            end,
            master,
            replicas,
        });
    }
    ranges.sort_by_key(|r| r.start);
    Ok(ranges)
}

/// Statistics of one node.
#[derive(Debug, Default)]
struct NodeStats {
    counters: ValkeyNodeCounters,
    latency: LatencyHistogram,
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

fn read_pem(what: &str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::Open {
        kind: "valkey",
        reason: format!("cannot read {what} {path:?}: {e}"),
    })
}

fn open_err(e: impl fmt::Display) -> ConfigError {
    ConfigError::Open {
        kind: "valkey",
        reason: e.to_string(),
    }
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
                EvictionPolicyName::Lru,
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

    fn target(cfg: &ValkeyConfig, seeds: &[(String, u16)]) -> Result<Target, ConfigError> {
        // rustls needs a process-wide crypto provider; ours is ring (an error only means one is
        // installed already).
        let _already = rustls::crypto::ring::default_provider().install_default();
        let certs = if cfg.tls_enable
            && (cfg.tls_ca_file.is_some() || cfg.tls_client_cert_file.is_some())
        {
            let root_cert = match &cfg.tls_ca_file {
                Some(p) => Some(read_pem("tls_ca_file", p)?),
                None => None,
            };
            let client_tls = match (&cfg.tls_client_cert_file, &cfg.tls_client_key_file) {
                (Some(c), Some(k)) => Some(ClientTlsConfig {
                    client_cert: read_pem("tls_client_cert_file", c)?,
                    client_key: read_pem("tls_client_key_file", k)?,
                }),
                _ => None,
            };
            Some(TlsCertificates {
                client_tls,
                root_cert,
            })
        } else {
            None
        };
        let addr = |host: &str, port: u16| {
            if cfg.tls_enable {
                ConnectionAddr::TcpTls {
                    host: host.to_owned(),
                    port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(host.to_owned(), port)
            }
        };
        let mut settings = redis::RedisConnectionInfo::default();
        if !cfg.username.is_empty() {
            settings = settings.set_username(&cfg.username);
        }
        if !cfg.password.is_empty() {
            settings = settings.set_password(&cfg.password);
        }
        if cfg.cluster_mode {
            let infos = seeds
                .iter()
                .map(|(h, p)| {
                    addr(h, *p)
                        .into_connection_info()
                        .map(|i| i.set_redis_settings(settings.clone()))
                })
                .collect::<RedisResult<Vec<_>>>()
                .map_err(open_err)?;
            let mut b = ClusterClientBuilder::new(infos)
                .connection_timeout(Duration::from_secs_f64(cfg.connection_timeout))
                .response_timeout(Duration::from_secs_f64(cfg.request_timeout))
                .retries(3)
                .min_retry_wait(20)
                .max_retry_wait(500);
            if !cfg.username.is_empty() {
                b = b.username(&cfg.username);
            }
            if !cfg.password.is_empty() {
                b = b.password(&cfg.password);
            }
            if cfg.tls_enable {
                b = b.tls(redis::TlsMode::Secure);
            }
            if let Some(c) = certs {
                b = b.certs(c);
            }
            Ok(Target::Cluster(b.build().map_err(open_err)?))
        } else {
            let (h, p) = &seeds[0];
            if let Some(db) = cfg.database_id {
                settings = settings.set_db(db);
            }
            let info = addr(h, *p)
                .into_connection_info()
                .map(|i| i.set_redis_settings(settings))
                .map_err(open_err)?;
            let client = match certs {
                Some(c) => Client::build_with_tls(info, c),
                None => Client::open(info),
            }
            .map_err(open_err)?;
            Ok(Target::Single(client))
        }
    }

    fn standalone_addr(&self) -> String {
        self.seeds
            .first()
            .map(|(h, p)| format!("{h}:{p}"))
            .unwrap_or_default()
    }

    /// Opens fresh connections, checks them, reads the topology, and installs them.
    async fn reconnect(&self) -> Result<(), String> {
        let _one = self.reconnecting.lock().await;
        let timeout = Duration::from_secs_f64(self.cfg.connection_timeout);
        let fresh = match &self.target {
            Target::Single(client) => {
                let acfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(Duration::from_secs_f64(self.cfg.request_timeout)));
                let mut fresh = Vec::with_capacity(self.cfg.num_workers);
                for _ in 0..self.cfg.num_workers {
                    let mut c = client
                        .get_multiplexed_async_connection_with_config(&acfg)
                        .await
                        .map_err(|e| {
                            format!(
                                "cannot connect to valkey at {}: {e}",
                                self.standalone_addr()
                            )
                        })?;
                    redis::cmd("PING")
                        .query_async::<()>(&mut c)
                        .await
                        .map_err(|e| {
                            format!(
                                "valkey at {} does not answer PING: {e}",
                                self.standalone_addr()
                            )
                        })?;
                    fresh.push(Conn::Single(c));
                }
                fresh
            }
            Target::Cluster(client) => {
                let c = tokio::time::timeout(timeout, client.get_async_connection())
                    .await
                    .map_err(|_| {
                        format!(
                            "cannot connect to the valkey cluster at {} within {timeout:?}",
                            self.cfg.startup_nodes
                        )
                    })?
                    .map_err(|e| {
                        format!(
                            "cannot connect to the valkey cluster at {}: {e}",
                            self.cfg.startup_nodes
                        )
                    })?;
                vec![Conn::Cluster(c)]
            }
        };
        *self.conns.lock() = fresh;
        if let Err(e) = self.check_deployment().await {
            self.conns.lock().clear();
            return Err(e);
        }
        Ok(())
    }

    /// Standalone: `PING`. Cluster: reads the topology and `PING`s every master; `Err` only when
    /// no node answers.
    async fn check_deployment(&self) -> Result<(), String> {
        let conn = self.conns.lock().first().cloned();
        match conn {
            None => Err("not connected".to_owned()),
            Some(Conn::Single(mut c)) => {
                let addr = self.standalone_addr();
                let t = Instant::now();
                let r = redis::cmd("PING").query_async::<()>(&mut c).await;
                self.account(&addr, t, r.is_ok());
                r.map_err(|e| format!("valkey at {addr} does not answer PING: {e}"))
            }
            Some(Conn::Cluster(mut c)) => self.refresh_topology(&mut c).await,
        }
    }

    async fn refresh_topology(&self, c: &mut ClusterConnection) -> Result<(), String> {
        let slots_cmd = || {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SLOTS");
            cmd
        };
        // Ask the known nodes first (any one that answers), then any node.
        let mut candidates: Vec<String> = {
            let t = self.topology.lock();
            let masters = t.masters();
            let mut v: Vec<String> = masters.iter().cloned().collect();
            v.extend(t.nodes().into_iter().filter(|n| !masters.contains(n)));
            v
        };
        candidates.truncate(16);
        let mut last_err = String::from("no node answered");
        let mut reply = None;
        for addr in candidates.iter().map(Some).chain(std::iter::once(None)) {
            let routing = match addr.and_then(|a| a.rsplit_once(':')) {
                Some((host, port)) => match port.parse() {
                    Ok(port) => SingleNodeRoutingInfo::ByAddress {
                        host: host.to_owned(),
                        port,
                    },
                    Err(_) => continue,
                },
                None => SingleNodeRoutingInfo::Random,
            };
            match c
                .route_command(slots_cmd(), RoutingInfo::SingleNode(routing))
                .await
            {
                Ok(v) => {
                    reply = Some(v);
                    break;
                }
                Err(e) => last_err = e.to_string(),
            }
        }
        let Some(reply) = reply else {
            return Err(format!(
                "no node of the valkey cluster at {} answers: {last_err}",
                self.cfg.startup_nodes
            ));
        };
        let ranges = parse_cluster_slots(&reply)?;
        // PING every master (concurrently, each bounded by the response timeout).
        let masters: BTreeSet<String> = ranges.iter().map(|r| r.master.clone()).collect();
        let pings = masters.iter().map(|m| {
            let mut c = c.clone();
            async move {
                let (host, port) = m.rsplit_once(':')?;
                let routing = SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port: port.parse().ok()?,
                };
                let t = Instant::now();
                let r = c
                    .route_command(redis::cmd("PING"), RoutingInfo::SingleNode(routing))
                    .await;
                self.account(m, t, r.is_ok());
                r.err().map(|e| (m.clone(), e.to_string()))
            }
        });
        let unreachable: BTreeMap<String, String> =
            join_all(pings).await.into_iter().flatten().collect();
        self.install_topology(ranges, unreachable);
        Ok(())
    }

    /// Replaces the topology, counting what changed.
    fn install_topology(&self, ranges: Vec<SlotRange>, unreachable: BTreeMap<String, String>) {
        let ev = &self.topo_events;
        ev.topology_refreshes_total.inc();
        let (added, removed, newly_down) = {
            let mut t = self.topology.lock();
            let (mut added, mut removed) = (Vec::new(), Vec::new());
            if t.read_once {
                let old_nodes = t.nodes();
                let fresh = Topology {
                    ranges: ranges.clone(),
                    ..Topology::default()
                };
                let new_nodes = fresh.nodes();
                added = new_nodes.difference(&old_nodes).cloned().collect();
                removed = old_nodes.difference(&new_nodes).cloned().collect();
                let mut failovers = BTreeSet::new();
                for slot in 0..CLUSTER_SLOTS as u16 {
                    let (a, b) = (t.master_of(slot), fresh.master_of(slot));
                    if let (Some(a), Some(b)) = (a, b)
                        && a != b
                    {
                        ev.slot_moves_total.inc();
                        let was_replica = t
                            .ranges
                            .iter()
                            .any(|r| r.master == a && r.replicas.iter().any(|x| x == b));
                        if was_replica {
                            failovers.insert((a.to_owned(), b.to_owned()));
                        }
                    }
                }
                for (old, new) in &failovers {
                    ev.failovers_total.inc();
                    tracing::warn!(old_master = %old, new_master = %new, "valkey cluster failover seen");
                }
            }
            let newly_down: Vec<(String, String)> = unreachable
                .iter()
                .filter(|(n, _)| !t.unreachable.contains_key(*n))
                .map(|(n, w)| (n.clone(), w.clone()))
                .collect();
            *t = Topology {
                ranges,
                unreachable,
                read_once: true,
            };
            (added, removed, newly_down)
        };
        ev.nodes_added_total.add(added.len() as u64);
        ev.nodes_removed_total.add(removed.len() as u64);
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(?added, ?removed, "valkey cluster nodes changed");
        }
        for (n, why) in newly_down {
            self.health
                .record_error(format!("valkey node {n} is unavailable: {why}"));
        }
    }

    /// The stats of `node` (created on first use, at most [`MAX_NODES`]).
    fn node(&self, node: &str) -> Option<Arc<NodeStats>> {
        let mut nodes = self.nodes.lock();
        if let Some(s) = nodes.get(node) {
            return Some(Arc::clone(s));
        }
        if nodes.len() >= MAX_NODES {
            return None;
        }
        let s = Arc::new(NodeStats::default());
        nodes.insert(node.to_owned(), Arc::clone(&s));
        Some(s)
    }

    fn account(&self, node: &str, started: Instant, ok: bool) {
        if let Some(s) = self.node(node) {
            s.counters.requests_total.inc();
            if !ok {
                s.counters.errors_total.inc();
            }
            s.latency.record(started.elapsed());
        }
    }

    /// The node a key's requests go to (for accounting).
    fn node_of(&self, key: &str) -> String {
        if !self.cfg.cluster_mode {
            return self.standalone_addr();
        }
        let slot = slot_of(key.as_bytes());
        self.topology
            .lock()
            .master_of(slot)
            .map_or_else(|| "unknown".to_owned(), str::to_owned)
    }

    /// A connection (round-robin), or `Unavailable` at once while down.
    fn conn(&self) -> Result<Conn, L2Error> {
        self.health.gate()?;
        let conns = self.conns.lock();
        if conns.is_empty() {
            return Err(L2Error::Unavailable(format!(
                "not connected to valkey at {}",
                self.cfg.startup_nodes
            )));
        }
        let i = self.rr.fetch_add(1, Relaxed) % conns.len();
        conns
            .get(i)
            .cloned()
            .ok_or_else(|| L2Error::Unavailable("no connection".to_owned()))
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
        if !self.cfg.cluster_mode && is_connection_error(e) {
            self.conns.lock().clear();
            let reason = format!("valkey at {node} unreachable ({what}): {e}");
            self.health.mark_down("valkey", reason.clone());
            L2Error::Unavailable(reason)
        } else if is_connection_error(e) {
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

    /// The per-node status entries.
    fn nodes_status(&self) -> serde_json::Value {
        let topo = self.topology.lock();
        let masters = topo.masters();
        let mut roles: BTreeMap<String, &'static str> = topo
            .nodes()
            .into_iter()
            .map(|n| {
                let r = if masters.contains(&n) {
                    "master"
                } else {
                    "replica"
                };
                (n, r)
            })
            .collect();
        if !self.cfg.cluster_mode {
            roles.insert(self.standalone_addr(), "standalone");
        }
        let stats = self.nodes.lock();
        let mut out = serde_json::Map::new();
        for (addr, role) in roles {
            let mut m = serde_json::Map::new();
            m.insert("role".into(), role.into());
            let slots: u64 = topo
                .ranges
                .iter()
                .filter(|r| r.master == addr)
                .map(|r| u64::from(r.end - r.start) + 1)
                .sum();
            m.insert("slots".into(), slots.into());
            m.insert(
                "reachable".into(),
                (!topo.unreachable.contains_key(&addr)).into(),
            );
            if let Some(s) = stats.get(&addr) {
                m.extend(status_fields(&s.counters));
                let n = s.latency.count();
                m.insert(
                    "latency_p50_seconds".into(),
                    (n > 0).then(|| s.latency.quantile(0.5)).into(),
                );
                m.insert(
                    "latency_p99_seconds".into(),
                    (n > 0).then(|| s.latency.quantile(0.99)).into(),
                );
            }
            out.insert(addr, m.into());
        }
        out.into()
    }

    fn topology_gauges(&self) -> ValkeyTopologyGauges {
        let g = ValkeyTopologyGauges::default();
        if self.cfg.cluster_mode {
            let t = self.topology.lock();
            g.nodes_known_count.set(t.nodes().len() as u64);
            g.masters_count.set(t.masters().len() as u64);
            g.slots_covered_count.set(t.slots_served());
            g.unreachable_masters_count.set(t.unreachable.len() as u64);
        } else {
            let up = self.health.is_up();
            g.nodes_known_count.set(1);
            g.masters_count.set(1);
            g.slots_covered_count
                .set(if up { u64::from(CLUSTER_SLOTS) } else { 0 });
            g.unreachable_masters_count.set(u64::from(!up));
        }
        g
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
        Box::pin(async move {
            if let Err(e) = self.health.gate() {
                return all_err(keys.len(), &e);
            }
            let results: KeyResults = join_all(
                keys.iter()
                    .zip(dst)
                    .map(|(k, a)| self.load_one(k, segment, *a)),
            )
            .await;
            let mut corrupt = Vec::new();
            for (k, r) in keys.iter().zip(&results) {
                match r {
                    Err(L2Error::Corrupt(why)) => {
                        self.events.corrupt_objects_total.inc();
                        tracing::warn!(key = %k, %why, "corrupt valkey l2 object: treating as a miss and deleting it");
                        self.health
                            .record_error(format!("corrupt object {k}: {why}"));
                        corrupt.push(k.clone());
                    }
                    Err(L2Error::NotFound) => {
                        self.events.vanished_objects_total.inc();
                        self.index.lock().remove(k);
                    }
                    _ => {}
                }
            }
            if !corrupt.is_empty() {
                let _deleted = self.del_keys(&corrupt).await;
                let mut ix = self.index.lock();
                for k in &corrupt {
                    ix.remove(k);
                }
            }
            results
        })
    }

    fn store<'a>(
        &'a self,
        keys: &'a [ObjectKey],
        segment: &'a Arc<ShmSegment>,
        src: &'a [Allocation],
    ) -> BoxFuture<'a, KeyResults> {
        Box::pin(async move {
            let n = keys.len();
            if let Err(e) = self.health.gate() {
                return all_err(n, &e);
            }
            let mut plan = StorePlan::new(
                &self.index,
                keys,
                src,
                &self.events.store_skipped_existing_total,
            );
            self.evict(std::mem::take(&mut plan.victims)).await;
            let written = join_all(
                plan.jobs
                    .iter()
                    .map(|&i| self.store_one(&keys[i], segment, src[i])),
            )
            .await;
            plan.record(written);
            let (results, more) = plan.finish(&self.index, keys, src);
            self.evict(more).await;
            results
        })
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

    #[test]
    fn slots_follow_the_cluster_spec() {
        // Values from the Redis Cluster specification / `CLUSTER KEYSLOT`.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"123456789"), 12739);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
    }

    #[test]
    fn topology_lookup_and_problems() {
        let t = Topology {
            ranges: vec![
                SlotRange {
                    start: 0,
                    end: 8191,
                    master: "a:1".into(),
                    replicas: vec!["b:1".into()],
                },
                SlotRange {
                    start: 8192,
                    end: 16000,
                    master: "c:1".into(),
                    replicas: vec![],
                },
            ],
            unreachable: BTreeMap::from([("c:1".to_owned(), "refused".to_owned())]),
            read_once: true,
        };
        assert_eq!(t.master_of(0), Some("a:1"));
        assert_eq!(t.master_of(8192), Some("c:1"));
        assert_eq!(t.master_of(16100), None);
        assert_eq!(t.slots_served(), 8192);
        let p = t.problems();
        assert!(p[0].contains("c:1") && p[0].contains("refused"), "{p:?}");
        assert!(p[1].contains("383 of 16384"), "{p:?}");
        assert_eq!(t.nodes().len(), 3);
    }
}
