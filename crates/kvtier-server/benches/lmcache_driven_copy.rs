//! lmcache_driven gather/scatter throughput for an 8B-like KV cache (32 layers, 8 KV heads x 128,
//! fp16, block size 16, chunk 256), against a plain memcpy of the same bytes in the same run.
//!
//! One iteration moves 4 chunks (4 x 32 MiB = 128 MiB) between engine blocks (one POSIX shm
//! segment per layer, distinct pseudo-random block ids) and chunk objects: `gather` is what
//! `store` does, `scatter` what `retrieve` does; each with every core and with one thread, for
//! the NHD layout (`[2, NB, BS, NH, HS]`: one 32 KiB copy per block) and the HND layout
//! (`[2, NB, NH, BS, HS]`: one 256-byte copy per token and head). Baselines: `memcpy` of 128 MiB
//! between two process buffers, and `memcpy_from_shm` from one shm mapping (4 KiB tmpfs pages,
//! like the engine's segments) into a process buffer. Every buffer is page-aligned, like L1
//! objects, and touched before timing, except in the first-touch variants, which gather (or
//! memcpy) into a fresh shm mapping, as the first stores into a new L1 do: with the server's
//! one-`madvise` populate first, or faulting page by page.
//!
//! The machine this runs on is usually shared, so instead of timing each variant for a while in
//! turn (which lets load changes between variants skew their ratio), the variants are
//! interleaved: each round times one iteration of every variant, and the report gives, per
//! variant, the median GB/s over the rounds and the median of its per-round ratio to `memcpy`.
//!
//! Run: `cargo bench -p kvtier-server --bench lmcache_driven_copy [-- ROUNDS]` (default 40).

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use kvtier_core::shm::populate_write;
use kvtier_proto::{CpuShmWrapper, DeviceIpcWrapper, TensorMetadata};
use kvtier_server::engine::lmcache_driven::KvCacheMap;

const LAYERS: usize = 32;
const NB: usize = 128;
const BS: usize = 16;
const NH: usize = 8;
const HS: usize = 128;
const CHUNK: usize = 256;
const CHUNKS: usize = 4;

/// Engine segments in /dev/shm, removed on drop.
struct Engine {
    names: Vec<String>,
    kv: KvCacheMap,
}

impl Drop for Engine {
    fn drop(&mut self) {
        for n in &self.names {
            let _gone = std::fs::remove_file(format!("/dev/shm/{n}"));
        }
    }
}

fn engine(hnd: bool) -> Engine {
    engine_named(hnd)
}

fn engine_named(hnd: bool) -> Engine {
    let shape: Vec<u64> = if hnd {
        vec![2, NB as u64, NH as u64, BS as u64, HS as u64]
    } else {
        vec![2, NB as u64, BS as u64, NH as u64, HS as u64]
    };
    let mut stride = vec![1u64; 5];
    for i in (0..4).rev() {
        stride[i] = stride[i + 1] * shape[i + 1];
    }
    let nbytes = shape.iter().product::<u64>() * 2;
    let mut names = Vec::new();
    let mut wrappers = Vec::new();
    for l in 0..LAYERS {
        // LMCache's name form (the only one registration accepts): /lmcache_kv_<pid>_<n>.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("lmcache_kv_{}_{seq}", std::process::id());
        let data: Vec<u8> = (0..nbytes as usize)
            .map(|i| (i.wrapping_mul(31) ^ l) as u8)
            .collect();
        std::fs::write(format!("/dev/shm/{name}"), data).expect("write segment");
        wrappers.push(DeviceIpcWrapper::CpuShm(CpuShmWrapper {
            version: 1,
            metadata: TensorMetadata {
                dtype: "float16".into(),
                shape: shape.clone(),
                stride: stride.clone(),
                storage_offset: 0,
                device_uuid: "cpu".into(),
            },
            shm_name: format!("/{name}"),
            nbytes,
        }));
        names.push(name);
    }
    let hint = if hnd { "HND" } else { "NHD" };
    let kv = KvCacheMap::map(
        &wrappers,
        &[("kv_layout".into(), hint.into())],
        &[],
        CHUNK,
        None,
    )
    .expect("map");
    Engine { names, kv }
}

/// A /dev/shm file of `len` bytes mapped shared (a baseline's source).
struct ShmBuf {
    name: String,
    ptr: *const u8,
    len: usize,
}

impl ShmBuf {
    fn new(len: usize) -> Self {
        let name = format!("kvtier_bench_lmd_src_{}", std::process::id());
        let path = format!("/dev/shm/{name}");
        std::fs::write(&path, vec![5u8; len]).expect("write segment");
        let file = std::fs::File::open(&path).expect("open segment");
        // SAFETY: a fresh kernel-chosen mapping of a file of exactly `len` bytes.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::SHARED,
                &file,
                0,
            )
        }
        .expect("mmap");
        Self {
            name,
            ptr: ptr.cast::<u8>().cast_const(),
            len,
        }
    }
}

impl Drop for ShmBuf {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`, no longer used.
        let _unmapped = unsafe { rustix::mm::munmap(self.ptr.cast_mut().cast(), self.len) };
        let _gone = std::fs::remove_file(format!("/dev/shm/{}", self.name));
    }
}

/// A new /dev/shm file of `len` bytes mapped read-write and shared, never touched: what a store
/// into fresh L1 memory writes to. `allocated` pre-allocates its pages (`--l1-prefault`).
struct FreshShm {
    path: String,
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl FreshShm {
    fn new(len: usize, allocated: bool) -> Self {
        let path = format!("/dev/shm/kvtier_bench_lmd_fresh_{}", std::process::id());
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        file.set_len(len as u64).expect("set_len");
        if allocated {
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, len as u64)
                .expect("fallocate");
        }
        // SAFETY: a fresh kernel-chosen mapping of a file of exactly `len` bytes.
        let raw = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &file,
                0,
            )
        }
        .expect("mmap");
        let ptr = std::ptr::NonNull::new(raw.cast::<u8>()).expect("mmap");
        Self { path, ptr, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: our private mapping of `len` bytes; no other reference to it exists.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for FreshShm {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`.
        let _unmapped = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
        let _gone = std::fs::remove_file(&self.path);
    }
}

/// A zeroed, page-aligned process buffer (L1 objects are page-aligned too; a buffer 16 bytes
/// off a page boundary makes every gather copy pay 4 KiB-aliasing stalls).
struct Aligned {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: `len > 0`.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).expect("alloc");
        let mut a = Self { ptr, len };
        a.as_mut().fill(fill);
        a
    }

    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `len` initialised bytes owned exclusively by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// Distinct pseudo-random block ids for `CHUNKS` chunks.
fn block_ids() -> Vec<Vec<u64>> {
    let mut ids: Vec<u64> = (1..NB as u64).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..ids.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids.swap(i, (x % (i as u64 + 1)) as usize);
    }
    ids.truncate(CHUNKS * CHUNK / BS);
    vec![ids]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A named measurement: runs one iteration and returns the time its copy took.
type Variant<'a> = (String, Box<dyn FnMut() -> Duration + 'a>);

fn timed(mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(40);
    let all = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
    let one = NonZeroUsize::MIN;
    let ids = block_ids();
    let mut nhd = engine(false);
    let mut hnd = engine(true);
    // Always split across threads when asked to (the server splits transfers >= 4 MiB).
    nhd.kv.set_parallel_min_bytes(0);
    hnd.kv.set_parallel_min_bytes(0);
    let bytes = CHUNKS * nhd.kv.object_len();
    assert_eq!(bytes, CHUNKS * hnd.kv.object_len());
    let src = Aligned::new(bytes, 2);
    let shm = ShmBuf::new(bytes);
    let mut bufs: Vec<Aligned> = (0..7).map(|i| Aligned::new(bytes, i as u8)).collect();
    let [b0, b1, b2, b3, b4, b5, b6] = &mut bufs[..] else {
        unreachable!("seven buffers")
    };
    let (b0, b1, b3, b4, b6) = (
        b0.as_mut(),
        b1.as_mut(),
        b3.as_mut(),
        b4.as_mut(),
        b6.as_mut(),
    );
    // Scatter sources hold real gathered chunks.
    nhd.kv.gather(&ids, b2.as_mut(), all).expect("gather");
    hnd.kv.gather(&ids, b5.as_mut(), all).expect("gather");
    let (b2, b5) = (b2.as_ref(), b5.as_ref());
    let (ids, nhd, hnd, src, shm) = (&ids, &nhd.kv, &hnd.kv, src.as_ref(), &shm);
    let mut variants: Vec<Variant<'_>> = vec![
        (
            "memcpy (1 thread)".into(),
            Box::new(|| timed(|| b0.copy_from_slice(black_box(src)))),
        ),
        (
            "memcpy_from_shm (1 thread)".into(),
            Box::new(|| {
                // SAFETY: `shm` maps `bytes` readable bytes nothing writes; `b6` is a distinct
                // buffer of the same length.
                timed(|| unsafe { std::ptr::copy_nonoverlapping(shm.ptr, b6.as_mut_ptr(), bytes) })
            }),
        ),
        (
            format!("nhd gather ({all} threads)"),
            Box::new(|| timed(|| nhd.gather(black_box(ids), b1, all).expect("gather"))),
        ),
        (
            "nhd gather (1 thread)".into(),
            Box::new(|| timed(|| nhd.gather(black_box(ids), b3, one).expect("gather"))),
        ),
        (
            format!("nhd scatter ({all} threads)"),
            Box::new(|| timed(|| nhd.scatter(black_box(ids), b2, 0, all).expect("scatter"))),
        ),
        (
            "nhd scatter (1 thread)".into(),
            Box::new(|| timed(|| nhd.scatter(black_box(ids), b2, 0, one).expect("scatter"))),
        ),
        (
            format!("hnd gather ({all} threads)"),
            Box::new(|| timed(|| hnd.gather(black_box(ids), b4, all).expect("gather"))),
        ),
        (
            format!("hnd scatter ({all} threads)"),
            Box::new(|| timed(|| hnd.scatter(black_box(ids), b5, 0, all).expect("scatter"))),
        ),
    ];
    // First touch: gathers into fresh, never-touched shm pages, as the first stores into a new
    // L1 do (sparse: pages allocated on first touch; allocated: `--l1-prefault`). The server
    // populates fresh L1 pages with one madvise before copying; "faulting" copies straight in.
    for allocated in [false, true] {
        let tag = if allocated { "allocated" } else { "sparse" };
        variants.push((
            format!("nhd gather, fresh {tag} L1"),
            Box::new(move || {
                let mut dst = FreshShm::new(bytes, allocated);
                timed(|| {
                    // SAFETY: `dst` is a live mapping of `bytes` bytes.
                    let _best_effort = unsafe { populate_write(dst.ptr, bytes) };
                    nhd.gather(ids, dst.as_mut(), all).expect("gather");
                })
            }),
        ));
        variants.push((
            "  same, faulting".to_owned(),
            Box::new(move || {
                let mut dst = FreshShm::new(bytes, allocated);
                timed(|| nhd.gather(ids, dst.as_mut(), all).expect("gather"))
            }),
        ));
        variants.push((
            format!("memcpy, fresh {tag} L1"),
            Box::new(move || {
                let mut dst = FreshShm::new(bytes, allocated);
                timed(|| dst.as_mut().copy_from_slice(black_box(src)))
            }),
        ));
    }
    for (_, f) in &mut variants {
        f(); // warm up: touch every page
    }
    let n = variants.len();
    let mut secs = vec![Vec::with_capacity(rounds); n];
    for round in 0..rounds {
        for k in 0..n {
            let v = (k + round) % n; // rotate the order so no variant always follows another
            secs[v].push((variants[v].1)().as_secs_f64());
        }
    }
    let base: Vec<f64> = secs[0].clone();
    println!(
        "lmcache_driven gather/scatter, 8B-like KV (32 layers, 8x128 heads, fp16, block 16), \
         {CHUNKS} chunks = {} MiB per iteration, {rounds} interleaved rounds, {all} cores\n",
        bytes >> 20
    );
    println!(
        "{:<30} {:>12} {:>12} {:>12}",
        "variant", "median GB/s", "best GB/s", "vs memcpy"
    );
    for (v, (name, _)) in variants.iter().enumerate() {
        let mut gbps: Vec<f64> = secs[v].iter().map(|s| bytes as f64 / s / 1e9).collect();
        let best = gbps.iter().copied().fold(0.0, f64::max);
        let mut ratio: Vec<f64> = base.iter().zip(&secs[v]).map(|(b, s)| b / s).collect();
        println!(
            "{name:<30} {:>12.2} {best:>12.2} {:>11.2}x",
            median(&mut gbps),
            median(&mut ratio)
        );
    }
}
