//! `--l2-adapter '<JSON>'` parsing (LMCache's syntax and type names).
//!
//! Each flag value is one JSON object with a `"type"` and that type's keys. Adapter order on the
//! command line is adapter index order (the prefetch plan prefers the lowest index).
//!
//! | type | keys (required in bold) |
//! |---|---|
//! | `mock` | **`max_size_gb`** (> 0), **`mock_bandwidth_gb`** (GiB/s, > 0), `eviction` |
//! | `fs` | **`base_path`**, `max_capacity_gb` (0 = unlimited), `relative_tmp_dir` (`.kvtier-tmp`), `num_workers` (4, concurrent file operations), `use_odirect` (only `false`), `eviction` |
//! | `resp` | **`host`**, **`port`**, `username`, `password`, `key_prefix` (`""`), `max_capacity_gb` (0 = unlimited), `num_workers` (8, concurrent requests and connections), `eviction` |
//! | `valkey` | **`startup_nodes`** (`"host:port[,host:port...]"`), `cluster_mode` (false), `username`, `password`, `key_prefix` (`""`, no `@`), `tls_enable` (false), `database_id` (standalone only), `request_timeout` (5.0 s), `connection_timeout` (10.0 s), `max_capacity_gb` (0 = unlimited), `ttl_seconds` (none; a positive integer), `num_workers` (8), `eviction`; kvtier additions: `tls_ca_file`, `tls_client_cert_file` + `tls_client_key_file` |
//!
//! `eviction` is `{"eviction_policy": "LRU"|"FIFO", "trigger_watermark": 0.8, "eviction_ratio":
//! 0.2}`: with it, the adapter also evicts in the background of stores once its usage reaches
//! the watermark; without it, it evicts only what a store needs (mock: FIFO, fs/resp: LRU).
//! Sizes are GiB (2^30 bytes), like `--l1-size-gb`.
//!
//! Unknown keys are rejected with an error naming the key (a typo never passes silently); missing
//! required keys are named too; an unknown `"type"` is refused with the list of the types kvtier
//! has ([`ADAPTER_TYPES`]). Passwords are never printed (`Debug` and `Serialize` redact them).
//!
//! `valkey` follows LMCache 0.5.6's meaning and validation of each key: `startup_nodes` entries
//! are `host:port` with a positive port (empty entries between commas are skipped; in standalone
//! mode only the first is used); `key_prefix` must not contain `@` (it is joined to the key with
//! `@`); `num_workers` must be a positive integer; `request_timeout`/`connection_timeout` must be
//! positive; `max_capacity_gb` must not be negative; `ttl_seconds`, when given, must be a
//! positive integer; `database_id` is ignored (with a warning) in cluster mode. kvtier is
//! stricter in three documented places: `num_workers` at most 256 (like every adapter),
//! `key_prefix` must not contain `{` or `}` (a hash tag would pin every key to one cluster
//! slot), and the TLS file options need `tls_enable` (client certificate and key go together).

use std::fmt;

use kvtier_core::l1::EvictionPolicyKind;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::error::ConfigError;

mod redis;

pub use redis::{
    RespConfig, ValkeyConfig, default_max_value_bytes, default_part_bytes, parse_startup_nodes,
};

use redis::check_key_prefix;

const GIB: f64 = (1u64 << 30) as f64;

/// Eviction order of an adapter's own capacity management: one of L1's policies
/// ([`EvictionPolicyKind`]: LMCache 0.5.6's L2 names `LRU`, `ARC`, `IsolatedLRU`, `noop`, and
/// kvtier's `S3FIFO`) run over the adapter's index, or `FIFO` (oldest stored first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionPolicyName {
    /// Oldest stored first (LRU without the hits).
    Fifo,
    /// The L1 policy of that name.
    Policy(EvictionPolicyKind),
}

impl EvictionPolicyName {
    /// Least recently stored or loaded first.
    pub const LRU: Self = Self::Policy(EvictionPolicyKind::Lru);

    /// The name, as LMCache spells it (`FIFO` and `S3FIFO` are kvtier's).
    pub fn name(self) -> &'static str {
        match self {
            Self::Fifo => "FIFO",
            Self::Policy(kind) => kind.name(),
        }
    }
}

impl Serialize for EvictionPolicyName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for EvictionPolicyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.eq_ignore_ascii_case("FIFO") {
            return Ok(Self::Fifo);
        }
        s.parse().map(Self::Policy).map_err(|_| {
            serde::de::Error::custom(format!(
                "unknown eviction_policy {s:?}; supported: LRU, ARC, IsolatedLRU, noop \
                 (LMCache's), S3FIFO, FIFO"
            ))
        })
    }
}

/// The optional per-adapter `"eviction"` section.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvictionSettings {
    /// Eviction order.
    pub eviction_policy: EvictionPolicyName,
    /// Background eviction starts at this fraction of the capacity.
    #[serde(default = "default_watermark")]
    pub trigger_watermark: f64,
    /// Fraction of the used bytes each eviction round frees.
    #[serde(default = "default_ratio")]
    pub eviction_ratio: f64,
}

fn default_watermark() -> f64 {
    0.8
}

fn default_ratio() -> f64 {
    0.2
}

/// `{"type":"mock",...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockConfig {
    /// Capacity in GiB.
    pub max_size_gb: f64,
    /// Simulated bandwidth in GiB/s (each load and store is delayed by `bytes / bandwidth`).
    pub mock_bandwidth_gb: f64,
    /// Optional watermark eviction.
    #[serde(default)]
    pub eviction: Option<EvictionSettings>,
}

/// `{"type":"fs",...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// Directory holding the objects (created if missing).
    pub base_path: String,
    /// Capacity in GiB; 0 = unlimited.
    #[serde(default)]
    pub max_capacity_gb: f64,
    /// Directory for in-progress writes, relative to `base_path` (same filesystem, so the final
    /// rename is atomic).
    #[serde(default = "default_tmp_dir")]
    pub relative_tmp_dir: String,
    /// Concurrent file operations.
    #[serde(default = "default_fs_workers")]
    pub num_workers: usize,
    /// Accepted for LMCache compatibility; only `false` is supported.
    #[serde(default)]
    pub use_odirect: bool,
    /// Optional watermark eviction.
    #[serde(default)]
    pub eviction: Option<EvictionSettings>,
}

fn default_tmp_dir() -> String {
    ".kvtier-tmp".to_owned()
}

fn default_fs_workers() -> usize {
    4
}

impl FsConfig {
    /// A config for `base_path` with every default.
    pub fn new(base_path: impl Into<String>) -> Self {
        Self {
            base_path: base_path.into(),
            max_capacity_gb: 0.0,
            relative_tmp_dir: default_tmp_dir(),
            num_workers: default_fs_workers(),
            use_odirect: false,
            eviction: None,
        }
    }
}

/// One configured adapter.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum AdapterConfig {
    /// In-memory test adapter.
    Mock(MockConfig),
    /// Local filesystem.
    Fs(FsConfig),
    /// Redis/Valkey over RESP.
    Resp(RespConfig),
    /// Valkey/Redis, standalone or cluster, with TLS and ACLs (LMCache's `valkey`).
    Valkey(ValkeyConfig),
}

/// The adapter types kvtier has (the `"type"` values `--l2-adapter` accepts).
pub const ADAPTER_TYPES: [&str; 4] = ["mock", "fs", "resp", "valkey"];

impl AdapterConfig {
    /// The configured type name.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Mock(_) => "mock",
            Self::Fs(_) => "fs",
            Self::Resp(_) => "resp",
            Self::Valkey(_) => "valkey",
        }
    }

    /// The optional eviction section.
    pub fn eviction(&self) -> Option<&EvictionSettings> {
        match self {
            Self::Mock(c) => c.eviction.as_ref(),
            Self::Fs(c) => c.eviction.as_ref(),
            Self::Resp(c) => c.eviction.as_ref(),
            Self::Valkey(c) => c.eviction.as_ref(),
        }
    }
}

/// Capacity in bytes from a GiB figure (already validated as finite and non-negative).
pub(crate) fn gib_to_bytes(gb: f64) -> u64 {
    (gb * GIB) as u64
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

fn check_size(kind: &str, key: &str, v: f64, allow_zero: bool) -> Result<(), ConfigError> {
    let ok = v.is_finite() && (v > 0.0 || (allow_zero && v == 0.0)) && v * GIB < u64::MAX as f64;
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{kind} adapter: \"{key}\" must be a {} number of GiB, got {v}",
            if allow_zero {
                "non-negative"
            } else {
                "positive"
            }
        )))
    }
}

fn check_eviction(kind: &str, e: Option<&EvictionSettings>) -> Result<(), ConfigError> {
    let Some(e) = e else { return Ok(()) };
    for (key, v) in [
        ("trigger_watermark", e.trigger_watermark),
        ("eviction_ratio", e.eviction_ratio),
    ] {
        if !(v > 0.0 && v <= 1.0) {
            return Err(invalid(format!(
                "{kind} adapter: \"eviction.{key}\" must be in (0, 1], got {v}"
            )));
        }
    }
    Ok(())
}

fn check_workers(kind: &str, n: usize) -> Result<(), ConfigError> {
    if (1..=256).contains(&n) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{kind} adapter: \"num_workers\" must be between 1 and 256, got {n}"
        )))
    }
}

impl AdapterConfig {
    /// Checks value ranges (the JSON shape was checked by serde).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let kind = self.kind();
        check_eviction(kind, self.eviction())?;
        match self {
            Self::Mock(c) => {
                check_size(kind, "max_size_gb", c.max_size_gb, false)?;
                if !(c.mock_bandwidth_gb.is_finite() && c.mock_bandwidth_gb > 0.0) {
                    return Err(invalid(format!(
                        "mock adapter: \"mock_bandwidth_gb\" must be a positive number of GiB/s, got {}",
                        c.mock_bandwidth_gb
                    )));
                }
            }
            Self::Fs(c) => {
                if c.base_path.trim().is_empty() {
                    return Err(invalid("fs adapter: \"base_path\" must not be empty"));
                }
                check_size(kind, "max_capacity_gb", c.max_capacity_gb, true)?;
                check_workers(kind, c.num_workers)?;
                let tmp = std::path::Path::new(&c.relative_tmp_dir);
                if c.relative_tmp_dir.is_empty()
                    || tmp.is_absolute()
                    || tmp
                        .components()
                        .any(|p| !matches!(p, std::path::Component::Normal(_)))
                {
                    return Err(invalid(format!(
                        "fs adapter: \"relative_tmp_dir\" must be a relative path inside base_path, got {:?}",
                        c.relative_tmp_dir
                    )));
                }
                if c.use_odirect {
                    return Err(invalid(
                        "fs adapter: \"use_odirect\": true is not supported (kvtier uses buffered I/O with fsync)",
                    ));
                }
            }
            Self::Resp(c) => {
                if c.host.trim().is_empty() {
                    return Err(invalid("resp adapter: \"host\" must not be empty"));
                }
                if c.port == 0 {
                    return Err(invalid(
                        "resp adapter: \"port\" must be between 1 and 65535",
                    ));
                }
                check_size(kind, "max_capacity_gb", c.max_capacity_gb, true)?;
                check_workers(kind, c.num_workers)?;
                check_key_prefix(kind, &c.key_prefix)?;
            }
            Self::Valkey(c) => {
                c.nodes()?;
                check_key_prefix(kind, &c.key_prefix)?;
                check_workers(kind, c.num_workers)?;
                check_size(kind, "max_capacity_gb", c.max_capacity_gb, true)?;
                for (key, v) in [
                    ("request_timeout", c.request_timeout),
                    ("connection_timeout", c.connection_timeout),
                ] {
                    if !(v.is_finite() && v > 0.0 && v < 86_400.0) {
                        return Err(invalid(format!(
                            "valkey adapter: \"{key}\" must be a positive number of seconds, got {v}"
                        )));
                    }
                }
                if c.ttl_seconds == Some(0) {
                    return Err(invalid(
                        "valkey adapter: \"ttl_seconds\" must be a positive integer or omitted",
                    ));
                }
                if c.database_id.is_some_and(|d| d < 0) {
                    return Err(invalid(
                        "valkey adapter: \"database_id\" must not be negative",
                    ));
                }
                let tls_files = [
                    ("tls_ca_file", &c.tls_ca_file),
                    ("tls_client_cert_file", &c.tls_client_cert_file),
                    ("tls_client_key_file", &c.tls_client_key_file),
                ];
                for (key, v) in tls_files {
                    if v.is_some() && !c.tls_enable {
                        return Err(invalid(format!(
                            "valkey adapter: \"{key}\" needs \"tls_enable\": true"
                        )));
                    }
                }
                if c.tls_client_cert_file.is_some() != c.tls_client_key_file.is_some() {
                    return Err(invalid(
                        "valkey adapter: \"tls_client_cert_file\" and \"tls_client_key_file\" go together",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Parses and validates one `--l2-adapter` value.
pub fn parse_adapter_json(json: &str) -> Result<AdapterConfig, ConfigError> {
    let value: Value =
        serde_json::from_str(json).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(invalid(
            "must be a JSON object such as {\"type\": \"fs\", ...}",
        ));
    };
    let kind = match map.remove("type") {
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(invalid(format!(
                "\"type\" must be a string (one of: {}), got {other}",
                ADAPTER_TYPES.join(", ")
            )));
        }
        None => {
            return Err(invalid(format!(
                "missing required key \"type\" (one of: {})",
                ADAPTER_TYPES.join(", ")
            )));
        }
    };
    let rest = Value::Object(map);
    let err = |kind: &str, e: serde_json::Error| invalid(format!("{kind} adapter: {e}"));
    let cfg = match kind.as_str() {
        "mock" => AdapterConfig::Mock(MockConfig::deserialize(rest).map_err(|e| err("mock", e))?),
        "fs" => AdapterConfig::Fs(FsConfig::deserialize(rest).map_err(|e| err("fs", e))?),
        "resp" => AdapterConfig::Resp(RespConfig::deserialize(rest).map_err(|e| err("resp", e))?),
        "valkey" => {
            AdapterConfig::Valkey(ValkeyConfig::deserialize(rest).map_err(|e| err("valkey", e))?)
        }
        other => {
            return Err(invalid(format!(
                "unknown adapter type {other:?}; kvtier has: {}",
                ADAPTER_TYPES.join(", ")
            )));
        }
    };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        parse_adapter_json(json)
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn parses_each_type_with_defaults() {
        let c = parse_adapter_json(r#"{"type":"fs","base_path":"/tmp/x"}"#).expect("valid");
        assert_eq!(c, AdapterConfig::Fs(FsConfig::new("/tmp/x")));
        let c = parse_adapter_json(
            r#"{"type":"resp","host":"h","port":6379,"password":"secret","num_workers":2,
                "eviction":{"eviction_policy":"lru"}}"#,
        )
        .expect("valid");
        let AdapterConfig::Resp(r) = &c else {
            panic!("resp expected")
        };
        assert_eq!(r.num_workers, 2);
        assert_eq!(r.part_bytes, default_part_bytes());
        let e = r.eviction.expect("eviction section");
        assert_eq!(e.eviction_policy, EvictionPolicyName::LRU);
        assert!((e.trigger_watermark - 0.8).abs() < 1e-12);
        // LMCache 0.5.6's L2 policy names, and kvtier's own.
        for (name, want) in [
            ("ARC", EvictionPolicyName::Policy(EvictionPolicyKind::Arc)),
            (
                "IsolatedLRU",
                EvictionPolicyName::Policy(EvictionPolicyKind::IsolatedLru),
            ),
            ("noop", EvictionPolicyName::Policy(EvictionPolicyKind::Noop)),
            (
                "S3FIFO",
                EvictionPolicyName::Policy(EvictionPolicyKind::S3Fifo),
            ),
            ("FIFO", EvictionPolicyName::Fifo),
        ] {
            let c = parse_adapter_json(&format!(
                r#"{{"type":"mock","max_size_gb":1,"mock_bandwidth_gb":10,"eviction":{{"eviction_policy":"{name}"}}}}"#
            ))
            .expect("valid");
            let AdapterConfig::Mock(m) = &c else {
                panic!("mock expected")
            };
            assert_eq!(m.eviction.map(|e| e.eviction_policy), Some(want), "{name}");
            assert!(
                serde_json::to_string(&c).is_ok_and(|s| s.contains(name)),
                "{name}"
            );
        }
        let lower = parse_adapter_json(
            r#"{"type":"mock","max_size_gb":1,"mock_bandwidth_gb":10,"eviction":{"eviction_policy":"isolated_lru"}}"#,
        );
        assert!(lower.is_ok_and(|c| matches!(c, AdapterConfig::Mock(m)
            if m.eviction.map(|e| e.eviction_policy) == Some(EvictionPolicyName::Policy(EvictionPolicyKind::IsolatedLru)))));
        let bad = parse_adapter_json(
            r#"{"type":"mock","max_size_gb":1,"mock_bandwidth_gb":10,"eviction":{"eviction_policy":"LFU"}}"#,
        );
        assert!(
            bad.is_err_and(|e| e.to_string().contains("\"LFU\"")),
            "an unknown policy is refused by name"
        );
        // The password never shows.
        let shown = serde_json::to_string(&c).expect("serialises");
        assert!(!shown.contains("secret") && shown.contains("\"type\":\"resp\""));
        assert!(!format!("{c:?}").contains("secret"));
        let c = parse_adapter_json(r#"{"type":"mock","max_size_gb":1,"mock_bandwidth_gb":10}"#)
            .expect("valid");
        assert_eq!(c.kind(), "mock");
    }

    #[test]
    fn names_unknown_and_missing_keys() {
        let e = err(r#"{"type":"fs","base_path":"/x","bogus_key":1}"#);
        assert!(e.contains("bogus_key") && e.contains("fs adapter"), "{e}");
        let e = err(r#"{"type":"resp","host":"h"}"#);
        assert!(e.contains("missing field `port`"), "{e}");
        let e = err(r#"{"type":"mock","max_size_gb":1}"#);
        assert!(e.contains("mock_bandwidth_gb"), "{e}");
        let e = err(r#"{"base_path":"/x"}"#);
        assert!(e.contains("\"type\""), "{e}");
        let e = err(r#"{"type":"s3"}"#);
        assert!(
            e.contains("s3") && e.contains("mock, fs, resp, valkey"),
            "{e}"
        );
        let e = err(r#"{"type":"fs","base_path":"/x","eviction":{"eviction_policy":"LRU","x":1}}"#);
        assert!(e.contains("`x`"), "{e}");
        let e = err(r#"{"type":"fs","base_path":"/x","eviction":{"eviction_policy":"LFU"}}"#);
        assert!(e.contains("LFU"), "{e}");
        let e = err(r#"{"type":"fs","base_path":"/x","max_capacity_gb":-1}"#);
        assert!(e.contains("max_capacity_gb"), "{e}");
        let e = err(r#"{"type":"fs","base_path":"/x","relative_tmp_dir":"../t"}"#);
        assert!(e.contains("relative_tmp_dir"), "{e}");
        let e = err(r#"{"type":"resp","host":"h","port":1,"part_bytes":5}"#);
        assert!(e.contains("part_bytes"), "{e}");
        let e = err("[1]");
        assert!(e.contains("JSON object"), "{e}");
        // Typos in a known type are named, for every type.
        let e = err(r#"{"type":"resp","host":"h","port":1,"key_prefx":"a"}"#);
        assert!(e.contains("key_prefx") && e.contains("resp adapter"), "{e}");
        let e = err(r#"{"type":"valkey","startup_nodes":"h:1","clustre_mode":true}"#);
        assert!(
            e.contains("clustre_mode") && e.contains("valkey adapter"),
            "{e}"
        );
        let e = err(r#"{"type":"mock","max_size_gb":1,"mock_bandwidth_gb":1,"x":1}"#);
        assert!(e.contains("`x`"), "{e}");
    }

    #[test]
    fn valkey_keys_follow_lmcache() {
        let c = parse_adapter_json(
            r#"{"type":"valkey","startup_nodes":" a:1 ,, b.example:6380 ","cluster_mode":true,
                "username":"u","password":"pw","key_prefix":"tenant-1","num_workers":3,
                "tls_enable":true,"tls_ca_file":"/ca.pem","database_id":2,"request_timeout":0.5,
                "connection_timeout":2,"max_capacity_gb":1.5,"ttl_seconds":600,
                "eviction":{"eviction_policy":"LRU"}}"#,
        )
        .expect("valid");
        let AdapterConfig::Valkey(v) = &c else {
            panic!("valkey expected")
        };
        assert_eq!(
            v.nodes().expect("nodes"),
            vec![("a".to_owned(), 1), ("b.example".to_owned(), 6380)]
        );
        assert!(v.cluster_mode && v.tls_enable);
        assert_eq!(v.ttl_seconds, Some(600));
        assert_eq!(v.max_value_bytes, default_max_value_bytes());
        let shown = serde_json::to_string(&c).expect("serialises");
        assert!(
            !shown.contains("pw") && shown.contains("\"type\":\"valkey\""),
            "{shown}"
        );
        assert!(!format!("{c:?}").contains("pw"));
        // Defaults.
        let c = parse_adapter_json(r#"{"type":"valkey","startup_nodes":"h:7000"}"#).expect("ok");
        assert_eq!(c, AdapterConfig::Valkey(ValkeyConfig::new("h:7000", false)));
        // LMCache's validation, each named.
        for (json, want) in [
            (r#"{"type":"valkey"}"#, "startup_nodes"),
            (r#"{"type":"valkey","startup_nodes":""}"#, "non-empty"),
            (r#"{"type":"valkey","startup_nodes":" , "}"#, "empty list"),
            (
                r#"{"type":"valkey","startup_nodes":"hostonly"}"#,
                "host:port",
            ),
            (r#"{"type":"valkey","startup_nodes":":7000"}"#, "host:port"),
            (
                r#"{"type":"valkey","startup_nodes":"h:x"}"#,
                "non-integer port",
            ),
            (
                r#"{"type":"valkey","startup_nodes":"h:0"}"#,
                "between 1 and 65535",
            ),
            (
                r#"{"type":"valkey","startup_nodes":"h:1","num_workers":0}"#,
                "num_workers",
            ),
            (
                r#"{"type":"valkey","startup_nodes":"h:1","num_workers":1.5}"#,
                "num_workers",
            ),
            (
                r#"{"type":"valkey","startup_nodes":"h:1","key_prefix":"a@b"}"#,
                "key_prefix",
            ),
            (
                r#"{"type":"valkey","startup_nodes":"h:1","key_prefix":"{t}"}"#,
                "hash tag",
            ),
            (
                r#"{"type":"valkey","startup_nodes":"h:1","request_timeout":0}"#,
                "request_timeout",
            ),
            (
                r#"{"type":"valkey","startup_nodes":"h:1","connection_timeout":-1}"#,
                "connection_timeout",
            ),
            (
                r#"{"type":"valkey","startup_nodes":"h:1","max_capacity_gb":-1}"#,
                "max_capacity_gb",
            ),
            (
                r#"{"type":"valkey","startup_nodes":"h:1","ttl_seconds":0}"#,
                "ttl_seconds",
            ),
            (
                r#"{"type":"valkey","startup_nodes":"h:1","ttl_seconds":1.5}"#,
                "ttl_seconds",
            ),
            (
                r#"{"type":"valkey","startup_nodes":"h:1","ttl_seconds":true}"#,
                "ttl_seconds",
            ),
            (
                r#"{"type":"valkey","startup_nodes":"h:1","tls_ca_file":"/ca"}"#,
                "tls_enable",
            ),
            (
                r#"{"type":"valkey","startup_nodes":"h:1","tls_enable":true,"tls_client_cert_file":"/c"}"#,
                "go together",
            ),
            (
                r#"{"type":"resp","host":"h","port":1,"key_prefix":"x@"}"#,
                "key_prefix",
            ),
        ] {
            let e = err(json);
            assert!(e.contains(want), "{json}: {e}");
        }
    }
}
