//! L1 settings and the clock the TTLs are measured with ([`Clock::manual`] lets tests expire
//! locks without sleeping).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use super::super::eviction::EvictionPolicyKind;

/// The default quarantine budget is the pool size divided by this.
pub const DEFAULT_QUARANTINE_DIVISOR: u64 = 10;

/// Time source, injectable so tests can expire TTLs without sleeping.
#[derive(Debug, Clone)]
pub struct Clock {
    pub(super) base: Instant,
    manual: Option<Arc<AtomicU64>>,
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl Clock {
    /// The real monotonic clock.
    pub fn system() -> Self {
        Self {
            base: Instant::now(),
            manual: None,
        }
    }

    /// A clock that only moves when [`advance`](Self::advance) is called.
    pub fn manual() -> Self {
        Self {
            base: Instant::now(),
            manual: Some(Arc::new(AtomicU64::new(0))),
        }
    }

    /// Moves a manual clock forward (no-op on the system clock).
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.manual {
            m.fetch_add(u64::try_from(by.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        }
    }

    /// Current instant.
    pub fn now(&self) -> Instant {
        match &self.manual {
            Some(m) => self.base + Duration::from_nanos(m.load(Relaxed)),
            None => Instant::now(),
        }
    }
}

/// Eviction settings (LMCache's `EvictionConfig`).
#[derive(Debug, Clone, Copy)]
pub struct EvictionConfig {
    /// The ordering policy.
    pub policy: EvictionPolicyKind,
    /// Background eviction starts when `used / total` reaches this ratio (default 0.8).
    pub trigger_watermark: f64,
    /// Each background round frees this fraction of the used **bytes** (default 0.2).
    pub eviction_ratio: f64,
}

impl Default for EvictionConfig {
    fn default() -> Self {
        Self {
            policy: EvictionPolicyKind::Lru,
            trigger_watermark: 0.8,
            eviction_ratio: 0.2,
        }
    }
}

/// L1 manager settings.
#[derive(Debug, Clone)]
pub struct L1Config {
    /// Most bytes held by quarantined reservations (write TTL lapsed, writer not back yet) before
    /// the oldest are freed for reuse (default: a tenth of the pool; 0 frees at expiry).
    pub quarantine_budget_bytes: u64,
    /// Pool size in bytes (rounded down to `align_bytes`).
    pub capacity_bytes: u64,
    /// Alignment of every object (default 4096).
    pub align_bytes: u64,
    /// Write-lock TTL (default 600 s).
    pub write_ttl: Duration,
    /// Read-lock TTL (default 300 s).
    pub read_ttl: Duration,
    /// Eviction settings.
    pub eviction: EvictionConfig,
}

impl L1Config {
    /// Defaults for a pool of `capacity_bytes`.
    pub fn with_capacity(capacity_bytes: u64) -> Self {
        Self {
            capacity_bytes,
            quarantine_budget_bytes: capacity_bytes / DEFAULT_QUARANTINE_DIVISOR,
            align_bytes: 4096,
            write_ttl: Duration::from_secs(600),
            read_ttl: Duration::from_secs(300),
            eviction: EvictionConfig::default(),
        }
    }
}
