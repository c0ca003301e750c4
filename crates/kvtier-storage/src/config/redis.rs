//! The settings of the two Redis-family adapters, `resp` (one endpoint, values in parts) and
//! `valkey` (LMCache's adapter: standalone or cluster, TLS, ACL users): their keys, defaults,
//! the secrets `Debug` and `Serialize` redact, the seed list parser, and the `key_prefix` rule
//! both share.

use super::*;

/// `{"type":"resp",...}`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RespConfig {
    /// Redis/Valkey host.
    pub host: String,
    /// Redis/Valkey port.
    pub port: u16,
    /// ACL user name.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (never printed).
    #[serde(default, serialize_with = "redact")]
    pub password: Option<String>,
    /// Namespace joined in front of every key with `@` (must not contain `@`, `{` or `}`).
    #[serde(default)]
    pub key_prefix: String,
    /// Capacity in GiB that this adapter may use; 0 = unlimited. The adapter tracks and evicts
    /// only objects it wrote itself.
    #[serde(default)]
    pub max_capacity_gb: f64,
    /// Concurrent requests (and connections).
    #[serde(default = "default_resp_workers")]
    pub num_workers: usize,
    /// Optional watermark eviction.
    #[serde(default)]
    pub eviction: Option<EvictionSettings>,
    /// Values longer than this are split across several keys (not settable from JSON; tests
    /// lower it to exercise splitting).
    #[serde(skip, default = "default_part_bytes")]
    pub part_bytes: usize,
}

pub(super) fn default_resp_workers() -> usize {
    8
}

/// Default largest single RESP value (Redis accepts up to 512 MB; smaller parts keep one slow
/// value from monopolising a connection).
pub fn default_part_bytes() -> usize {
    64 << 20
}

pub(super) fn redact<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("***"),
        None => s.serialize_none(),
    }
}

impl fmt::Debug for RespConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RespConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("key_prefix", &self.key_prefix)
            .field("max_capacity_gb", &self.max_capacity_gb)
            .field("num_workers", &self.num_workers)
            .field("eviction", &self.eviction)
            .field("part_bytes", &self.part_bytes)
            .finish()
    }
}

impl RespConfig {
    /// A config for `host:port` with every default.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            username: None,
            password: None,
            key_prefix: String::new(),
            max_capacity_gb: 0.0,
            num_workers: default_resp_workers(),
            eviction: None,
            part_bytes: default_part_bytes(),
        }
    }
}

/// `{"type":"valkey",...}`: LMCache 0.5.6's keys (see the module docs) plus kvtier's TLS file
/// options.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValkeyConfig {
    /// `"host:port[,host:port...]"` seeds (parsed by [`ValkeyConfig::nodes`]).
    pub startup_nodes: String,
    /// Redis Cluster / Valkey Cluster (slots over several shards) instead of one server.
    #[serde(default)]
    pub cluster_mode: bool,
    /// ACL user name (`""` = the default user).
    #[serde(default)]
    pub username: String,
    /// Password (`""` = none; never printed).
    #[serde(default, serialize_with = "redact_str")]
    pub password: String,
    /// Namespace joined in front of every key with `@`.
    #[serde(default)]
    pub key_prefix: String,
    /// Concurrent requests (and standalone connections).
    #[serde(default = "default_resp_workers", deserialize_with = "de_num_workers")]
    pub num_workers: usize,
    /// TLS to every node (server certificates verified against the system roots or
    /// `tls_ca_file`).
    #[serde(default)]
    pub tls_enable: bool,
    /// kvtier addition: PEM file of the CA(s) that sign the servers' certificates.
    #[serde(default)]
    pub tls_ca_file: Option<String>,
    /// kvtier addition: PEM client certificate (mutual TLS; needs `tls_client_key_file`).
    #[serde(default)]
    pub tls_client_cert_file: Option<String>,
    /// kvtier addition: PEM private key of `tls_client_cert_file`.
    #[serde(default)]
    pub tls_client_key_file: Option<String>,
    /// Logical database (standalone only; ignored in cluster mode).
    #[serde(default)]
    pub database_id: Option<i64>,
    /// Per-request timeout in seconds.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: f64,
    /// Connection timeout in seconds.
    #[serde(default = "default_connection_timeout")]
    pub connection_timeout: f64,
    /// Capacity in GiB this adapter may use; 0 = unlimited (the adapter tracks and evicts only
    /// objects it wrote itself).
    #[serde(default)]
    pub max_capacity_gb: f64,
    /// Expiry of every written key in seconds (none by default).
    #[serde(default, deserialize_with = "de_ttl_seconds")]
    pub ttl_seconds: Option<u64>,
    /// Optional watermark eviction.
    #[serde(default)]
    pub eviction: Option<EvictionSettings>,
    /// Largest object stored (one value per object; larger ones are refused). Not settable from
    /// JSON; tests lower it.
    #[serde(skip, default = "default_max_value_bytes")]
    pub max_value_bytes: usize,
}

/// An integer JSON value (not a float, not a bool), or `None` for anything else.
pub(super) fn json_int(v: &Value) -> Option<i64> {
    v.as_i64().filter(|_| !v.is_f64())
}

pub(super) fn de_num_workers<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = Value::deserialize(d)?;
    json_int(&v)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            serde::de::Error::custom(format!("\"num_workers\" must be an integer, got {v}"))
        })
}

pub(super) fn de_ttl_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = Value::deserialize(d)?;
    if v.is_null() {
        return Ok(None);
    }
    json_int(&v)
        .and_then(|n| u64::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "\"ttl_seconds\" must be a positive integer or omitted, got {v}"
            ))
        })
}

pub(super) fn default_request_timeout() -> f64 {
    5.0
}

pub(super) fn default_connection_timeout() -> f64 {
    10.0
}

/// Default largest valkey value: Redis' and Valkey's default `proto-max-bulk-len` (512 MiB).
pub fn default_max_value_bytes() -> usize {
    512 << 20
}

pub(super) fn redact_str<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if v.is_empty() { "" } else { "***" })
}

impl fmt::Debug for ValkeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValkeyConfig")
            .field("startup_nodes", &self.startup_nodes)
            .field("cluster_mode", &self.cluster_mode)
            .field("username", &self.username)
            .field(
                "password",
                &if self.password.is_empty() { "" } else { "***" },
            )
            .field("key_prefix", &self.key_prefix)
            .field("num_workers", &self.num_workers)
            .field("tls_enable", &self.tls_enable)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_client_cert_file", &self.tls_client_cert_file)
            .field("tls_client_key_file", &self.tls_client_key_file)
            .field("database_id", &self.database_id)
            .field("request_timeout", &self.request_timeout)
            .field("connection_timeout", &self.connection_timeout)
            .field("max_capacity_gb", &self.max_capacity_gb)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("eviction", &self.eviction)
            .field("max_value_bytes", &self.max_value_bytes)
            .finish()
    }
}

impl ValkeyConfig {
    /// A config for `startup_nodes` with every default.
    pub fn new(startup_nodes: impl Into<String>, cluster_mode: bool) -> Self {
        Self {
            startup_nodes: startup_nodes.into(),
            cluster_mode,
            username: String::new(),
            password: String::new(),
            key_prefix: String::new(),
            num_workers: default_resp_workers(),
            tls_enable: false,
            tls_ca_file: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
            database_id: None,
            request_timeout: default_request_timeout(),
            connection_timeout: default_connection_timeout(),
            max_capacity_gb: 0.0,
            ttl_seconds: None,
            eviction: None,
            max_value_bytes: default_max_value_bytes(),
        }
    }

    /// The parsed `startup_nodes` (LMCache's rule: comma-separated `host:port`, the port after
    /// the last `:`, positive; empty entries skipped; at least one node).
    pub fn nodes(&self) -> Result<Vec<(String, u16)>, ConfigError> {
        parse_startup_nodes(&self.startup_nodes)
    }
}

/// Parses a `"host:port[,host:port...]"` string.
pub fn parse_startup_nodes(raw: &str) -> Result<Vec<(String, u16)>, ConfigError> {
    let bad = |m: String| invalid(format!("valkey adapter: \"startup_nodes\" {m}"));
    if raw.trim().is_empty() {
        return Err(bad(
            "must be a non-empty 'host:port[,host:port...]' string".to_owned()
        ));
    }
    let mut nodes = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((host, port)) = entry.rsplit_once(':') else {
            return Err(bad(format!("entry must be 'host:port', got {entry:?}")));
        };
        if host.is_empty() {
            return Err(bad(format!("entry must be 'host:port', got {entry:?}")));
        }
        let port: i64 = port
            .trim()
            .parse()
            .map_err(|_| bad(format!("entry has a non-integer port: {entry:?}")))?;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad(format!("port must be between 1 and 65535, got {entry:?}")))?;
        nodes.push((host.to_owned(), port));
    }
    if nodes.is_empty() {
        return Err(bad("parsed to an empty list".to_owned()));
    }
    Ok(nodes)
}

pub(super) fn check_key_prefix(kind: &str, prefix: &str) -> Result<(), ConfigError> {
    if let Some(c) = prefix.chars().find(|c| matches!(c, '@' | '{' | '}')) {
        return Err(invalid(format!(
            "{kind} adapter: \"key_prefix\" must not contain {c:?} (got {prefix:?}): '@' separates \
             the prefix from the key, and braces would form a hash tag that pins every key to one \
             cluster slot"
        )));
    }
    Ok(())
}
