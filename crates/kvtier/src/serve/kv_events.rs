//! The `--kv-events-*` flags: kvtier's router-facing KV-event publisher (vLLM's KV-event format
//! on a ZeroMQ PUB socket, with a replay socket). LMCache has no such flags; the LMCache stream
//! (`subscribe_kv_events`) is configured by `--kv-event-log-size` alone.

use anyhow::bail;
use clap::Args;
use kvtier_proto::vllm_events::Encoding;
use kvtier_server::engine::kv_events::PublisherConfig;

/// The publisher's flags (flattened into `kvtier serve`).
#[derive(Debug, Args)]
pub struct KvEventsArgs {
    /// Publish every change of what the cache holds (L1 and each L2 adapter) on a ZeroMQ PUB
    /// socket bound to this endpoint, in vLLM's KV-event format (BlockStored / BlockRemoved /
    /// AllBlocksCleared batches, msgpack, [topic, 8-byte sequence, payload]), e.g.
    /// tcp://*:5557 or tcp://127.0.0.1:5557. Off by default.
    #[arg(long, env = "KVTIER_KV_EVENTS_PUBLISHER", value_name = "ENDPOINT")]
    kv_events_publisher: Option<String>,

    /// Bind a ROUTER socket here that answers replay requests (an 8-byte big-endian start
    /// sequence) with the buffered batches, then an end marker, like vLLM's replay endpoint.
    #[arg(long, env = "KVTIER_KV_EVENTS_REPLAY", value_name = "ENDPOINT")]
    kv_events_replay: Option<String>,

    /// Topic frame of each published batch; `{model}` and `{instance}` (the --instance-id) are
    /// filled in. A batch holds one model's events.
    #[arg(
        long,
        env = "KVTIER_KV_EVENTS_TOPIC",
        default_value = "kv@{instance}@{model}"
    )]
    kv_events_topic: String,

    /// Encoding of the batches: `map` (current vLLM: tagged maps, 32-byte hashes as bytes) or
    /// `array` (vLLM releases with array_like structs: positional arrays, hashes as 64-bit ints).
    #[arg(long, env = "KVTIER_KV_EVENTS_ENCODING", default_value = "map", value_parser = ["map", "array"])]
    kv_events_encoding: String,

    /// Batches kept for replay (the oldest are dropped first).
    #[arg(long, env = "KVTIER_KV_EVENTS_REPLAY_BUFFER", default_value_t = 10_000)]
    kv_events_replay_buffer: usize,

    /// Most bytes of batches kept for replay.
    #[arg(
        long,
        env = "KVTIER_KV_EVENTS_REPLAY_BUFFER_BYTES",
        default_value_t = 64 << 20
    )]
    kv_events_replay_buffer_bytes: usize,
}

impl KvEventsArgs {
    /// The publisher's configuration (`None` without `--kv-events-publisher`).
    pub fn resolve(self, kv_event_log_size: usize) -> anyhow::Result<Option<PublisherConfig>> {
        let Some(endpoint) = self.kv_events_publisher else {
            if self.kv_events_replay.is_some() {
                bail!("--kv-events-replay needs --kv-events-publisher");
            }
            return Ok(None);
        };
        check_endpoint("kv-events-publisher", &endpoint)?;
        if let Some(r) = &self.kv_events_replay {
            check_endpoint("kv-events-replay", r)?;
            if *r == endpoint {
                bail!("--kv-events-replay must differ from --kv-events-publisher ({r})");
            }
        }
        if kv_event_log_size == 0 {
            bail!("--kv-events-publisher needs the KV-event log: --kv-event-log-size must be > 0");
        }
        if self.kv_events_replay_buffer == 0 {
            bail!("--kv-events-replay-buffer must be at least 1");
        }
        if self.kv_events_topic.len() > 1024 {
            bail!("--kv-events-topic must be at most 1024 bytes");
        }
        let mut cfg = PublisherConfig::new(endpoint);
        cfg.replay_endpoint = self.kv_events_replay;
        cfg.topic = self.kv_events_topic;
        cfg.encoding = match self.kv_events_encoding.as_str() {
            "array" => Encoding::Array,
            _ => Encoding::Map,
        };
        cfg.replay_buffer_batches = self.kv_events_replay_buffer;
        cfg.replay_buffer_bytes = self.kv_events_replay_buffer_bytes;
        Ok(Some(cfg))
    }
}

/// ZeroMQ endpoints the publisher can bind: `tcp://HOST:PORT` (PORT may be `*`) or
/// `ipc://PATH`.
fn check_endpoint(flag: &str, endpoint: &str) -> anyhow::Result<()> {
    let ok = match endpoint.split_once("://") {
        Some(("tcp", rest)) => rest.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && (port == "*" || port.parse::<u16>().is_ok())
        }),
        Some(("ipc", path)) => !path.is_empty(),
        _ => false,
    };
    if !ok {
        bail!("--{flag} {endpoint:?}: expected tcp://HOST:PORT (PORT may be *) or ipc://PATH");
    }
    Ok(())
}
