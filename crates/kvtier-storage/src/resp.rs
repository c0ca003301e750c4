//! `resp`: Redis or Valkey over RESP, through the maintained `redis` crate (tokio, multiplexed
//! connections, pipelining).
//!
//! # Keys and values
//! An object is stored under its key's text form (the same names as the fs adapter), behind
//! `<key_prefix>@` when a `key_prefix` is configured. The value
//! is a 16-byte header followed by the payload:
//! ```text
//! 0  4  magic "KVT1"
//! 4  4  number of parts P (u32 LE, >= 1)
//! 8  8  payload length N (u64 LE)
//! 16 .. the first part of the payload
//! ```
//! Payloads longer than `part_bytes` (64 MiB) are split: part `p >= 1` lives under
//! `<key>@@<p>` (`@@` never occurs in a key, so part names cannot collide with object names).
//! Parts are written before the main key in one pipeline, so a visible main key implies its
//! parts were written; a load that finds a part missing or a length wrong treats the object as
//! a miss (counted as corrupt) and deletes it.
//!
//! # Pins, capacity, eviction
//! Pins are local to this process (a set in the [`ObjectIndex`]). The adapter indexes the
//! objects it wrote itself; with `max_capacity_gb` it keeps its own usage under the limit by
//! deleting unpinned objects it wrote (LRU), and with an `eviction` section also at the
//! watermark. Objects written by other processes are served but never evicted by this one. The
//! index can go stale when the server loses data (restart without persistence, its own
//! `maxmemory` eviction); a lookup or load that misses an indexed key un-indexes it, so usage
//! heals and the next store of that key rewrites it.
//!
//! # Concurrency and faults
//! `num_workers` multiplexed connections are used round-robin, and a semaphore bounds the
//! requests in flight to `num_workers`. Payload copies to and from L1 run on the blocking pool.
//! A connection-level failure (refused, reset, timeout) drops the connections and marks the
//! adapter down: every call then fails fast with `Unavailable`, and the probe loop reconnects
//! with backoff (100 ms doubling to 5 s). While up, a `PING` heartbeat every second notices an
//! outage even without traffic. Server errors (e.g. Redis `OOM`) fail the affected keys, are
//! counted and recorded as the last error, and do not mark the adapter down.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use kvtier_core::key::ObjectKey;
use kvtier_core::l1::Allocation;
use kvtier_core::shm::ShmSegment;
use kvtier_core::status::StatusNode;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisError};
use tokio::sync::Semaphore;

use crate::backend::{
    BoxFuture, KeyResults, L2Backend, Usage, copy_in, load_batch, status_head, store_batch,
    usize_len,
};
use crate::config::{EvictionPolicyName, RespConfig, gib_to_bytes};
use crate::error::{ConfigError, L2Error, is_redis_connection_error};
use crate::health::{Health, Prober};
use crate::index::ObjectIndex;
use crate::instrumented::Instrumented;
use crate::metrics::AdapterEvents;

/// Value header magic.
pub const VALUE_MAGIC: [u8; 4] = *b"KVT1";
/// Value header length.
pub const VALUE_HEADER: usize = 16;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The redis key of part `p` (`p >= 1`) of the object named `main`.
pub fn part_key(main: &str, p: u32) -> String {
    format!("{main}@@{p}")
}

fn encode_value_header(parts: u32, len: u64) -> [u8; VALUE_HEADER] {
    let mut h = [0u8; VALUE_HEADER];
    h[..4].copy_from_slice(&VALUE_MAGIC);
    h[4..8].copy_from_slice(&parts.to_le_bytes());
    h[8..16].copy_from_slice(&len.to_le_bytes());
    h
}

/// Parses a value header: `(parts, payload length)`.
pub fn parse_value_header(b: &[u8]) -> Option<(u32, u64)> {
    if b.get(..4)? != VALUE_MAGIC {
        return None;
    }
    let parts = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?);
    let len = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
    (parts >= 1).then_some((parts, len))
}

/// The `resp` adapter.
#[derive(Debug)]
pub struct RespBackend {
    cfg: RespConfig,
    endpoint: String,
    client: Client,
    conns: Mutex<Vec<MultiplexedConnection>>,
    rr: AtomicUsize,
    permits: Semaphore,
    index: Mutex<ObjectIndex>,
    health: Health,
    events: AdapterEvents,
    reconnecting: tokio::sync::Mutex<()>,
}

impl RespBackend {
    /// Builds the adapter, tries to connect once, and starts the probe loop on `handle`. An
    /// unreachable server does not fail start-up: the adapter starts unhealthy and connects when
    /// the server appears.
    pub async fn open(
        cfg: RespConfig,
        handle: &tokio::runtime::Handle,
    ) -> Result<Arc<Instrumented<Self>>, ConfigError> {
        let mut redis_info = redis::RedisConnectionInfo::default();
        if let Some(u) = &cfg.username {
            redis_info = redis_info.set_username(u);
        }
        if let Some(p) = &cfg.password {
            redis_info = redis_info.set_password(p);
        }
        let info = ConnectionAddr::Tcp(cfg.host.clone(), cfg.port)
            .into_connection_info()
            .map(|i| i.set_redis_settings(redis_info))
            .map_err(|e| ConfigError::Open {
                kind: "resp",
                reason: e.to_string(),
            })?;
        let client = Client::open(info).map_err(|e| ConfigError::Open {
            kind: "resp",
            reason: e.to_string(),
        })?;
        let capacity = gib_to_bytes(cfg.max_capacity_gb);
        let me = Arc::new(Instrumented::new(Self {
            endpoint: format!("{}:{}", cfg.host, cfg.port),
            permits: Semaphore::new(cfg.num_workers),
            index: Mutex::new(ObjectIndex::new(
                capacity,
                EvictionPolicyName::LRU,
                cfg.eviction.as_ref(),
            )),
            cfg,
            client,
            conns: Mutex::new(Vec::new()),
            rr: AtomicUsize::new(0),
            health: Health::new(),
            events: AdapterEvents::default(),
            reconnecting: tokio::sync::Mutex::new(()),
        }));
        if let Err(e) = me.reconnect().await {
            me.health.mark_down("resp", e);
        } else {
            tracing::info!(endpoint = %me.endpoint, connections = me.cfg.num_workers, "resp l2 adapter connected");
        }
        me.start_probe(handle, HEARTBEAT);
        Ok(me)
    }

    /// `host:port`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Opens `num_workers` fresh connections, checks them with `PING`, and installs them.
    async fn reconnect(&self) -> Result<(), String> {
        let _one = self.reconnecting.lock().await;
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let mut fresh = Vec::with_capacity(self.cfg.num_workers);
        for _ in 0..self.cfg.num_workers {
            let mut c = self
                .client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await
                .map_err(|e| format!("cannot connect to redis at {}: {e}", self.endpoint))?;
            redis::cmd("PING")
                .query_async::<()>(&mut c)
                .await
                .map_err(|e| format!("redis at {} does not answer PING: {e}", self.endpoint))?;
            fresh.push(c);
        }
        *self.conns.lock() = fresh;
        Ok(())
    }

    /// A connection (round-robin), or `Unavailable` at once while down.
    fn conn(&self) -> Result<MultiplexedConnection, L2Error> {
        self.health.gate()?;
        let conns = self.conns.lock();
        if conns.is_empty() {
            return Err(L2Error::Unavailable(format!(
                "not connected to redis at {}",
                self.endpoint
            )));
        }
        let i = self.rr.fetch_add(1, Relaxed) % conns.len();
        conns
            .get(i)
            .cloned()
            .ok_or_else(|| L2Error::Unavailable("no connection".to_owned()))
    }

    /// Classifies a redis error: connection-level errors mark the adapter down.
    fn fail(&self, e: &RedisError, what: &str) -> L2Error {
        if is_redis_connection_error(e) {
            self.conns.lock().clear();
            let reason = format!("redis at {} unreachable ({what}): {e}", self.endpoint);
            self.health.mark_down("resp", reason.clone());
            L2Error::Unavailable(reason)
        } else {
            let msg = format!("redis {what}: {e}");
            self.health.record_error(msg.clone());
            L2Error::Backend(msg)
        }
    }

    /// The redis key of an object: its text form, behind `<key_prefix>@` when one is set.
    fn name(&self, k: &ObjectKey) -> String {
        if self.cfg.key_prefix.is_empty() {
            k.to_string()
        } else {
            format!("{}@{k}", self.cfg.key_prefix)
        }
    }

    fn parts_for(&self, len: u64) -> u32 {
        let part = self.cfg.part_bytes.max(1) as u64;
        u32::try_from(len.div_ceil(part).max(1)).unwrap_or(u32::MAX)
    }

    /// Deletes objects (main key and parts) whose lengths are known.
    async fn del_known(&self, items: &[(ObjectKey, u64)]) -> Result<(), L2Error> {
        if items.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn()?;
        let mut pipe = redis::pipe();
        for (k, len) in items {
            let main = self.name(k);
            for p in 1..self.parts_for(*len) {
                pipe.cmd("DEL").arg(part_key(&main, p)).ignore();
            }
            pipe.cmd("DEL").arg(main).ignore();
        }
        let _permit = self.permits.acquire().await;
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.fail(&e, "delete"))
    }

    async fn evict(&self, victims: Vec<(ObjectKey, u64)>) {
        if victims.is_empty() {
            return;
        }
        self.events.evicted_objects_total.add(victims.len() as u64);
        self.events
            .evicted_bytes_total
            .add(victims.iter().map(|(_, l)| l).sum());
        if let Err(e) = self.del_known(&victims).await {
            tracing::warn!(error = %e, objects = victims.len(), "resp l2 eviction could not delete objects");
        }
    }

    async fn store_one(
        &self,
        key: &ObjectKey,
        segment: &Arc<ShmSegment>,
        a: Allocation,
    ) -> Result<(), L2Error> {
        let _permit = self.permits.acquire().await.map_err(|_| L2Error::Closed)?;
        let mut conn = self.conn()?;
        let parts = self.parts_for(a.len);
        let seg = Arc::clone(segment);
        // Header + payload in one buffer; the copy runs on the blocking pool.
        let buf = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, L2Error> {
            let mut buf = vec![0u8; VALUE_HEADER + usize_len(a.len)?];
            buf[..VALUE_HEADER].copy_from_slice(&encode_value_header(parts, a.len));
            seg.copy_out(usize_len(a.offset)?, &mut buf[VALUE_HEADER..])
                .map_err(|e| L2Error::Invalid(e.to_string()))?;
            Ok(buf)
        })
        .await
        .map_err(|e| L2Error::Io(format!("copy task failed: {e}")))??;
        let part = self.cfg.part_bytes.max(1);
        let main = self.name(key);
        let mut pipe = redis::pipe();
        let payload = &buf[VALUE_HEADER..];
        for p in 1..parts as usize {
            let start = p * part;
            let end = (start + part).min(payload.len());
            pipe.cmd("SET")
                .arg(part_key(&main, p as u32))
                .arg(&payload[start..end])
                .ignore();
        }
        let first_end = VALUE_HEADER + part.min(payload.len());
        pipe.cmd("SET").arg(&main).arg(&buf[..first_end]).ignore();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.fail(&e, "store"))
    }

    async fn load_one(
        &self,
        key: &ObjectKey,
        segment: &Arc<ShmSegment>,
        a: Allocation,
    ) -> Result<(), L2Error> {
        let _permit = self.permits.acquire().await.map_err(|_| L2Error::Closed)?;
        let mut conn = self.conn()?;
        let main = self.name(key);
        let first: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&main)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.fail(&e, "load"))?;
        let Some(first) = first else {
            return Err(L2Error::NotFound);
        };
        let (parts, len) = parse_value_header(&first)
            .ok_or_else(|| L2Error::Corrupt("bad value header".to_owned()))?;
        if len != a.len {
            return Err(L2Error::Corrupt(format!(
                "value is {len} bytes, L1 range is {}",
                a.len
            )));
        }
        let mut chunks = vec![first];
        if parts > 1 {
            let mut pipe = redis::pipe();
            for p in 1..parts {
                pipe.cmd("GET").arg(part_key(&main, p));
            }
            let rest: Vec<Option<Vec<u8>>> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| self.fail(&e, "load parts"))?;
            for (p, r) in rest.into_iter().enumerate() {
                chunks
                    .push(r.ok_or_else(|| L2Error::Corrupt(format!("part {} is missing", p + 1)))?);
            }
        }
        let total: u64 = chunks.iter().map(|c| c.len() as u64).sum::<u64>() - VALUE_HEADER as u64;
        if total != len {
            return Err(L2Error::Corrupt(format!(
                "parts hold {total} bytes, header says {len}"
            )));
        }
        let seg = Arc::clone(segment);
        tokio::task::spawn_blocking(move || -> Result<(), L2Error> {
            let mut offset = a.offset;
            for (i, c) in chunks.iter().enumerate() {
                let body = if i == 0 {
                    c.get(VALUE_HEADER..).unwrap_or_default()
                } else {
                    c.as_slice()
                };
                copy_in(&seg, offset, body)?;
                offset += body.len() as u64;
            }
            Ok(())
        })
        .await
        .map_err(|e| L2Error::Io(format!("copy task failed: {e}")))?
    }

    /// Reads the value headers of `keys`: `Some((parts, len))` per stored key.
    async fn headers(&self, keys: &[ObjectKey]) -> Result<Vec<Option<(u32, u64)>>, L2Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn()?;
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("GETRANGE")
                .arg(self.name(k))
                .arg(0)
                .arg(VALUE_HEADER - 1);
        }
        let _permit = self.permits.acquire().await;
        let raw: Vec<Vec<u8>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.fail(&e, "lookup"))?;
        Ok(raw
            .iter()
            .map(|b| {
                if b.is_empty() {
                    return None;
                }
                let h = parse_value_header(b);
                if h.is_none() {
                    self.events.corrupt_objects_total.inc();
                }
                h
            })
            .collect())
    }
}

impl Prober for RespBackend {
    fn probe_name(&self) -> &str {
        "resp"
    }

    fn probe_health(&self) -> &Health {
        &self.health
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(self.reconnect())
    }

    fn heartbeat(&self) -> Option<BoxFuture<'_, Result<(), String>>> {
        Some(Box::pin(async move {
            let mut conn = self.conn().map_err(|e| e.to_string())?;
            match redis::cmd("PING").query_async::<()>(&mut conn).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    self.conns.lock().clear();
                    Err(format!(
                        "redis at {} does not answer PING: {e}",
                        self.endpoint
                    ))
                }
            }
        }))
    }
}

impl L2Backend for RespBackend {
    fn type_name(&self) -> &'static str {
        "RESPL2Adapter"
    }

    fn kind(&self) -> &'static str {
        "resp"
    }

    fn lookup_and_pin<'a>(
        &'a self,
        keys: &'a [ObjectKey],
    ) -> BoxFuture<'a, Result<Vec<Option<u64>>, L2Error>> {
        Box::pin(async move {
            let headers = self.headers(keys).await?;
            let out: Vec<Option<u64>> = {
                let mut ix = self.index.lock();
                keys.iter()
                    .zip(headers)
                    .map(|(k, h)| {
                        let Some((_, len)) = h else {
                            // Gone from the server (restarted without persistence, evicted
                            // by its maxmemory policy, deleted by someone else): forget it,
                            // so its capacity is freed and the next store rewrites it.
                            if ix.remove(k).is_some() {
                                self.events.vanished_objects_total.inc();
                            }
                            return None;
                        };
                        ix.get(k);
                        ix.pin(k);
                        Some(len)
                    })
                    .collect()
            };
            Ok(out)
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
            "resp",
            keys,
            &self.health,
            &self.events,
            &self.index,
            move |i| self.load_one(&keys[i], segment, dst[i]),
            move |corrupt| async move {
                // Delete every part of each corrupt object: its header says how many.
                if let Ok(headers) = self.headers(&corrupt).await {
                    let items: Vec<(ObjectKey, u64)> = corrupt
                        .iter()
                        .zip(headers)
                        .map(|(k, h)| (k.clone(), h.map_or(0, |(_, len)| len)))
                        .collect();
                    let _deleted = self.del_known(&items).await;
                }
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
            let candidates: Vec<ObjectKey> = {
                let ix = self.index.lock();
                keys.iter().filter(|k| !ix.is_pinned(k)).cloned().collect()
            };
            let headers = self.headers(&candidates).await?;
            let items: Vec<(ObjectKey, u64)> = candidates
                .into_iter()
                .zip(headers)
                .filter_map(|(k, h)| h.map(|(_, len)| (k, len)))
                .collect();
            self.del_known(&items).await?;
            {
                let mut ix = self.index.lock();
                for (k, _) in &items {
                    ix.remove(k);
                }
            }
            Ok(items.len() as u64)
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

    fn report_status(&self) -> StatusNode {
        let h = self.health.snapshot();
        let reason = h
            .reason
            .clone()
            .unwrap_or_else(|| format!("redis at {} is unavailable", self.endpoint));
        status_head(self, &h)
            .require(h.connected, reason)
            .field("down_for_seconds", h.down_for_seconds)
            .field("host", &self.cfg.host)
            .field("port", self.cfg.port)
            .field("username", &self.cfg.username)
            .field("key_prefix", &self.cfg.key_prefix)
            .field("num_workers", self.cfg.num_workers)
            .field("open_connections", self.conns.lock().len())
            .field("value_part_bytes", self.cfg.part_bytes)
            .field("eviction", self.cfg.eviction)
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.conns.lock().clear();
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_header_round_trip() {
        let h = encode_value_header(3, 1 << 40);
        assert_eq!(parse_value_header(&h), Some((3, 1 << 40)));
        assert_eq!(parse_value_header(&h[..10]), None);
        let mut bad = h;
        bad[0] = b'X';
        assert_eq!(parse_value_header(&bad), None);
        assert_eq!(parse_value_header(&encode_value_header(0, 5)), None);
        assert_eq!(part_key("a@b", 2), "a@b@@2");
    }
}
