//! The L1 status node: counters, memory, starvation (unhealthy while every store is refused
//! for lack of room) and the tenants' table. Reads atomics only; never takes the L1 lock.

use super::*;

impl StatusReport for L1Manager {
    fn report_status(&self) -> StatusNode {
        let c = &self.counters;
        let (used, total) = self.usage();
        let ratio = if total == 0 {
            0.0
        } else {
            used as f64 / total as f64
        };
        let starved = self.store_starved();
        let node = match starved {
            Some(s) => StatusNode::unhealthy(format!(
                "L1 has refused every store for {:.1} s ({} keys) for lack of room: {} of {} \
                 objects read-locked, {} staging ({} bytes), {} quarantined ({} bytes), {} \
                 bytes used of {}",
                s.for_seconds,
                s.refused_keys,
                c.read_locked_objects.get(),
                c.objects.get(),
                c.staging_objects.get(),
                c.staging_bytes.get(),
                c.quarantined_objects.get(),
                c.quarantined_bytes.get(),
                used,
                total,
            )),
            None => StatusNode::healthy(),
        };
        node.fields(crate::metrics::status_fields(c))
            .field(
                "store_starved_seconds",
                starved.map_or(0.0, |s| s.for_seconds),
            )
            .field("staging_object_count", c.staging_objects.get())
            .field("memory_total_bytes", total)
            .field("memory_configured_bytes", self.config.capacity_bytes)
            .field(
                "capacity_bytes_by_backend",
                serde_json::json!({ "shm": total }),
            )
            .field("memory_usage_ratio", ratio)
            .field("write_ttl_seconds", self.config.write_ttl.as_secs())
            .field(
                "quarantine_budget_bytes",
                self.config.quarantine_budget_bytes,
            )
            .field("read_ttl_seconds", self.config.read_ttl.as_secs())
            .field("align_bytes", self.config.align_bytes)
            .field("tenants", self.directory.status())
    }
}
