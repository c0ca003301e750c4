//! The bench's yardsticks, measured in the bench process before any pass: a single-thread
//! memcpy of one client's pass, and copies into `/dev/shm` pages that do not exist yet, through a
//! fresh mapping, and through a warm one (what page faults cost on this machine).

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use kvtier_client::ShmPool;

use super::RunConfig;
use super::worker::{make_sources, source_index, touched};

/// Single-thread memcpy of one client's pass (same chunk sizes and sources), median of 3, GB/s.
pub fn measure_memcpy(cfg: &RunConfig) -> f64 {
    let sources = make_sources(cfg, usize::MAX >> 1);
    let total = cfg.requests * cfg.chunks * cfg.chunk_bytes;
    let mut dest = touched(total);
    let mut rates: Vec<f64> = (0..3)
        .map(|_| {
            let t = Instant::now();
            for (n, d) in dest.chunks_exact_mut(cfg.chunk_bytes).enumerate() {
                let src = &sources[source_index(cfg, n / cfg.chunks, n % cfg.chunks)];
                d.copy_from_slice(src);
            }
            black_box(&dest);
            total as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates.get(1).copied().unwrap_or(0.0)
}

/// Page-fault yardsticks, GB/s, copying up to 256 MiB of one client's chunks into a scratch
/// file in `/dev/shm` (removed afterwards): into pages that do not exist yet (tmpfs allocation
/// and page-table faults), through a fresh mapping of the now allocated pages (page-table
/// faults only), and again through that mapping (no faults: the client's own copy into shared
/// memory, `ShmPool::copy_in`, streaming stores for chunks of a MiB or more).
pub fn measure_page_faults(cfg: &RunConfig) -> anyhow::Result<[f64; 3]> {
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    let sources = make_sources(cfg, usize::MAX >> 2);
    let chunks = ((256usize << 20) / cfg.chunk_bytes).clamp(1, cfg.requests * cfg.chunks);
    let bytes = (chunks * cfg.chunk_bytes) as u64;
    let name = format!(
        "kvtier_bench_faults_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let path = std::path::Path::new("/dev/shm").join(&name);
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _removed = std::fs::remove_file(&self.0);
        }
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let _remove = Remove(path);
    file.set_len(bytes)?;
    let fill = |pool: &ShmPool| -> anyhow::Result<f64> {
        let t = Instant::now();
        for n in 0..chunks {
            let src = &sources[source_index(cfg, n / cfg.chunks, n % cfg.chunks)];
            pool.copy_in((n * cfg.chunk_bytes) as u64, src)?;
        }
        Ok(bytes as f64 / t.elapsed().as_secs_f64() / 1e9)
    };
    let first_touch = fill(&ShmPool::open(&name, bytes)?)?;
    let fresh = ShmPool::open(&name, bytes)?;
    let remapped = fill(&fresh)?;
    let warm = fill(&fresh)?;
    Ok([first_touch, remapped, warm])
}
