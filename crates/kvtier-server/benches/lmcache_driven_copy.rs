//! lmcache_driven gather/scatter throughput for an 8B-like KV cache (32 layers, 8 KV heads x 128,
//! fp16, block size 16, chunk 256), against a plain memcpy of the same bytes in the same run.
//!
//! One iteration moves 4 chunks (4 x 32 MiB = 128 MiB): engine blocks (one POSIX shm segment per
//! layer, random block ids) → chunk objects (gather, as `store` does) and back (scatter, as
//! `retrieve` does), with all cores and with one thread. Baselines in the same run: `memcpy`
//! copies 128 MiB between two process buffers (anonymous memory, possibly transparent huge
//! pages); `memcpy_from_shm` copies 128 MiB from one shm mapping (4 KiB tmpfs pages, like the
//! engine's segments) into a process buffer. Every buffer is touched before timing, so no page
//! faults are measured. `hnd` is the same with the HND layout (`[2, NB, NH, BS, HS]`), which can only copy one
//! 256-byte head vector at a time.
//!
//! Run: `cargo bench -p kvtier-server --bench lmcache_driven_copy`

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
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
        let name = format!("kvtier_bench_lmd_{}_{}_{l}", std::process::id(), hnd as u8);
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

/// A /dev/shm file of `len` bytes mapped shared (the baseline's source).
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

fn copies(c: &mut Criterion) {
    let all = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
    let one = NonZeroUsize::MIN;
    let ids = block_ids();
    let mut g = c.benchmark_group("lmcache_driven_copy");
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    for hnd in [false, true] {
        let e = engine(hnd);
        let bytes = CHUNKS * e.kv.object_len();
        g.throughput(Throughput::Bytes(bytes as u64));
        let mut obj = vec![1u8; bytes];
        let tag = if hnd { "hnd" } else { "nhd" };
        g.bench_function(format!("{tag}/gather_{all}_threads"), |b| {
            b.iter(|| e.kv.gather(black_box(&ids), &mut obj, all).expect("gather"));
        });
        g.bench_function(format!("{tag}/scatter_{all}_threads"), |b| {
            b.iter(|| {
                e.kv.scatter(black_box(&ids), &obj, 0, all)
                    .expect("scatter")
            });
        });
        if !hnd {
            g.bench_function(format!("{tag}/gather_1_thread"), |b| {
                b.iter(|| e.kv.gather(black_box(&ids), &mut obj, one).expect("gather"));
            });
            g.bench_function(format!("{tag}/scatter_1_thread"), |b| {
                b.iter(|| {
                    e.kv.scatter(black_box(&ids), &obj, 0, one)
                        .expect("scatter")
                });
            });
            let src = vec![2u8; bytes];
            let mut dst = vec![3u8; bytes];
            g.bench_function("memcpy_1_thread", |b| {
                b.iter(|| dst.copy_from_slice(black_box(&src)));
            });
            let shm = ShmBuf::new(bytes);
            g.bench_function("memcpy_from_shm_1_thread", |b| {
                // SAFETY: `shm` maps `bytes` readable bytes that nothing writes during the
                // benchmark; `dst` is a distinct process buffer of the same length.
                b.iter(|| unsafe {
                    std::ptr::copy_nonoverlapping(shm.ptr, dst.as_mut_ptr(), bytes);
                });
            });
        }
    }
    g.finish();
}

criterion_group!(benches, copies);
criterion_main!(benches);
