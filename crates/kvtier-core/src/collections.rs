//! The hash map and set kvtier uses for keys that are already well mixed (chunk hashes, ids,
//! object keys, request ids): foldhash with a per-process random seed instead of std's SipHash.
//! SipHash over such keys cost ~1.5 % of an engine cycle's CPU (perf, `kv_events` bench);
//! foldhash is several times cheaper, and the random seed keeps collisions unpredictable to
//! clients. Written once here so every crate means the same thing by "fast map".

/// A `HashMap` hashed with a randomly seeded foldhash.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A `HashSet` hashed with a randomly seeded foldhash.
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
