//! The cluster's shape as this adapter last read it: the slot map from `CLUSTER SLOTS` (which
//! master and replicas serve each range), the problems it shows (slots no master serves,
//! masters that did not answer), the failovers, slot moves and node changes counted between
//! two reads, and the per-node request statistics (bounded by [`MAX_NODES`](super::MAX_NODES)).
//! A request is attributed to the master of its key's slot in the last read; the slot is
//! computed for accounting only (the `redis` crate routes).

use super::*;

/// Hash slots of a cluster.
pub const CLUSTER_SLOTS: u32 = 16384;

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

/// One slot range and who serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SlotRange {
    pub(super) start: u16,
    pub(super) end: u16,
    pub(super) master: String,
    pub(super) replicas: Vec<String>,
}

/// The last topology read.
#[derive(Debug, Default)]
pub(super) struct Topology {
    pub(super) ranges: Vec<SlotRange>,
    /// Masters that did not answer the last probe, with why.
    pub(super) unreachable: BTreeMap<String, String>,
    pub(super) read_once: bool,
}

impl Topology {
    pub(super) fn nodes(&self) -> BTreeSet<String> {
        self.ranges
            .iter()
            .flat_map(|r| std::iter::once(&r.master).chain(&r.replicas))
            .cloned()
            .collect()
    }

    pub(super) fn masters(&self) -> BTreeSet<String> {
        self.ranges.iter().map(|r| r.master.clone()).collect()
    }

    pub(super) fn master_of(&self, slot: u16) -> Option<&str> {
        let i = self.ranges.partition_point(|r| r.end < slot);
        self.ranges
            .get(i)
            .filter(|r| r.start <= slot)
            .map(|r| r.master.as_str())
    }

    pub(super) fn slots_served(&self) -> u64 {
        self.ranges
            .iter()
            .filter(|r| !self.unreachable.contains_key(&r.master))
            .map(|r| u64::from(r.end - r.start) + 1)
            .sum()
    }

    /// Why the deployment is degraded (empty when it is not).
    pub(super) fn problems(&self) -> Vec<String> {
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

pub(super) fn value_str(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

pub(super) fn value_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        _ => value_str(v)?.parse().ok(),
    }
}

/// `host:port` of a `CLUSTER SLOTS` node entry (`[host, port, id, ...]`).
pub(super) fn node_addr(v: &Value) -> Option<String> {
    let Value::Array(f) = v else { return None };
    let host = value_str(f.first()?)?;
    let port = value_int(f.get(1)?)?;
    (!host.is_empty() && host != "?").then(|| format!("{host}:{port}"))
}

/// Parses a `CLUSTER SLOTS` reply into ranges sorted by start slot.
pub(super) fn parse_cluster_slots(v: &Value) -> Result<Vec<SlotRange>, String> {
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
pub(super) struct NodeStats {
    pub(super) counters: ValkeyNodeCounters,
    pub(super) latency: LatencyHistogram,
}

impl ValkeyBackend {
    pub(super) async fn refresh_topology(&self, c: &mut ClusterConnection) -> Result<(), String> {
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
    pub(super) fn install_topology(
        &self,
        ranges: Vec<SlotRange>,
        unreachable: BTreeMap<String, String>,
    ) {
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
    pub(super) fn node(&self, node: &str) -> Option<Arc<NodeStats>> {
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

    pub(super) fn account(&self, node: &str, started: Instant, ok: bool) {
        if let Some(s) = self.node(node) {
            s.counters.requests_total.inc();
            if !ok {
                s.counters.errors_total.inc();
            }
            s.latency.record(started.elapsed());
        }
    }

    /// The node a key's requests go to (for accounting).
    pub(super) fn node_of(&self, key: &str) -> String {
        if !self.cfg.cluster_mode {
            return self.standalone_addr();
        }
        let slot = slot_of(key.as_bytes());
        self.topology
            .lock()
            .master_of(slot)
            .map_or_else(|| "unknown".to_owned(), str::to_owned)
    }

    /// The per-node status entries.
    pub(super) fn nodes_status(&self) -> serde_json::Value {
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

    pub(super) fn topology_gauges(&self) -> ValkeyTopologyGauges {
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

#[cfg(test)]
mod tests {
    use super::*;

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
