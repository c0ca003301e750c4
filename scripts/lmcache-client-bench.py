#!/usr/bin/env python3
"""The `kvtier bench` workloads driven by LMCache 0.5.6's own Python client.

Runs against any server speaking the LMCache 0.5.6 protocol (kvtier or `lmcache server`)
through the engine-driven shared-memory path, with the request client that engines use
(`lmcache.v1.multiprocess.transport.zmq_impl.create_request_client`), so the figures
include what that client costs. Run it with the Python of a virtualenv holding
lmcache==0.5.6 (see scripts/compare-lmcache).

Phases and figure names match `kvtier bench` (crates/kvtier/src/bench/report.rs):
memcpy (numpy, one thread), noop sequential and pipelined, then two passes of
store -> retrieve -> verify -> clear(force=True); "cold" is the first pass, "warm" the
second, on the pool pages the first one used. Store = prepare_store + copy into the slots
+ commit_store; retrieve = lookup + query_prefetch_status until an int (the lookup->result
latency) + prepare_retrieve + copy out + commit_retrieve + end_session. Every retrieved
byte is compared with what was stored, outside the timed region.

The bench clears the server's cache between passes.
"""

import argparse
import json
import mmap
import os
import resource
import statistics
import struct
import sys
import time

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np  # noqa: E402

from lmcache.v1.multiprocess.custom_types import (  # noqa: E402
    IPCCacheServerKey,
    RegisterEngineDrivenContextPayload,
)
from lmcache.v1.multiprocess.transport.zmq_impl import create_request_client  # noqa: E402

SHAPES = {"small": (24, 128, "float16"), "8b": (32, 1024, "float16")}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "uint8": 1}
TAG_MAGIC = 0x6B76746965726231
TAG_LEN = 32


def parse_shape(s):
    if s in SHAPES:
        return SHAPES[s]
    layers, hidden, dtype = s.split(":")
    if dtype not in ITEMSIZE:
        raise argparse.ArgumentTypeError(f"unknown dtype {dtype!r}")
    return int(layers), int(hidden), dtype


def quantile_us(samples, q):
    if not samples:
        return None
    s = sorted(samples)
    return s[min(len(s) - 1, round((len(s) - 1) * q))] * 1e6


class Bench:
    def __init__(self, args):
        self.args = args
        self.timeout = args.timeout_seconds
        self.client = create_request_client(args.url)
        self.seed = args.seed if args.seed is not None else (time.time_ns() ^ (os.getpid() << 32))
        self.seed &= (1 << 64) - 1
        self.iid = ((self.seed >> 8) & 0xFFFFFF) * 100_000 + 77
        self.layers, self.hidden, self.dtype = args.shape
        self.chunk_size = self.call(self.client.get_chunk_size())
        self.cb = 2 * self.layers * self.chunk_size * self.hidden * ITEMSIZE[self.dtype]
        self.C = args.chunks_per_request
        self.R = args.requests
        rng = np.random.default_rng(self.seed & 0xFFFFFFFF)
        self.sources = [rng.integers(0, 256, self.cb, dtype=np.uint8) for _ in range(self.C + 1)]
        self.dest = np.empty(self.R * self.C * self.cb, dtype=np.uint8)
        self.dest.fill(0xA5)
        self.metrics = {}
        self.errors = []
        self.polls = 0

    def call(self, fut):
        return fut.result(timeout=self.timeout)

    def register(self):
        payload = RegisterEngineDrivenContextPayload(
            instance_id=self.iid,
            model_name=self.args.model,
            world_size=1,
            block_size=16,
            num_layers=self.layers,
            hidden_dim_size=self.hidden,
            dtype_str=self.dtype,
            use_mla=False,
            num_physical_slots=None,
        )
        reg = self.call(self.client.register_kv_cache_engine_driven_context(payload))
        if not reg.shm_name or not reg.pool_size:
            raise SystemExit("the server has no shared-memory pool (pickle mode)")
        fd = os.open("/dev/shm/" + reg.shm_name.lstrip("/"), os.O_RDWR)
        try:
            self.mm = mmap.mmap(fd, reg.pool_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.pool = np.frombuffer(self.mm, dtype=np.uint8)
        need = self.R * self.C * -(-self.cb // 4096) * 4096
        if need > 0.7 * reg.pool_size:
            raise SystemExit(f"one pass stores {need} bytes; the pool has {reg.pool_size}")

    def src(self, r, i):
        return self.sources[(r * self.C + i) % (self.C + 1)]

    def tag(self, p, r, i):
        return np.frombuffer(
            struct.pack("<4Q", TAG_MAGIC, self.seed, p, (r << 32) | i), dtype=np.uint8
        )

    def key(self, p, r, worker):
        n = self.C * self.chunk_size
        head = [self.seed & 0xFFFFFFFF, self.seed >> 32, 0xB0, p, r]
        tokens = tuple(head + list(range(len(head), n)))
        return IPCCacheServerKey(
            model_name=self.args.model,
            world_size=1,
            worker_id=worker,
            token_ids=tokens,
            start=0,
            end=n,
            request_id=f"kvpy-{self.seed:x}-{p}-{r}",
            num_kv_readers=1,
        )

    def memcpy(self):
        rates = []
        total = self.R * self.C * self.cb
        for _ in range(3):
            t = time.perf_counter()
            for r in range(self.R):
                self.copy_request(r)
            rates.append(total / (time.perf_counter() - t) / 1e9)
        self.memcpy_gbps = statistics.median(rates)
        self.metrics["memcpy_gbps"] = self.memcpy_gbps

    def copy_request(self, r):
        """Copies request r's chunks from their sources into its place in `dest` (the memcpy
        yardstick's unit of work)."""
        for i in range(self.C):
            at = (r * self.C + i) * self.cb
            np.copyto(self.dest[at:at + self.cb], self.src(r, i))

    def noops(self):
        n = self.args.noops
        lat = []
        t0 = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            r = self.call(self.client.noop())
            lat.append(time.perf_counter() - t)
            assert r == "OK", r
        wall = time.perf_counter() - t0
        self.metrics["noop_rtt_p50_us"] = quantile_us(lat, 0.5)
        self.metrics["noop_rtt_p99_us"] = quantile_us(lat, 0.99)
        self.metrics["noop_seq_ops_per_s"] = n / wall
        lat = []
        for _ in range(min(n, 1000)):
            t = time.perf_counter()
            ok = self.call(self.client.ping(self.iid))
            lat.append(time.perf_counter() - t)
            assert ok is True, ok
        self.metrics["ping_rtt_p50_us"] = quantile_us(lat, 0.5)
        # A noop sent right after copying one request's bytes, as a commit is (`kvtier bench`'s
        # `noop_after_copy`): the client's caches are cold and the server has slept through the
        # copy, so this is the floor a commit cannot go below.
        lat = []
        for r in range(self.R):
            self.copy_request(r)
            t = time.perf_counter()
            ok = self.call(self.client.noop())
            lat.append(time.perf_counter() - t)
            assert ok == "OK", ok
        self.metrics["noop_after_copy_p50_us"] = quantile_us(lat, 0.5)
        self.metrics["noop_after_copy_p99_us"] = quantile_us(lat, 0.99)
        depth = self.args.pipeline_depth
        t0 = time.perf_counter()
        window = []
        sent = 0
        done = 0
        while done < n:
            while sent < n and len(window) < depth:
                window.append(self.client.noop())
                sent += 1
            r = self.call(window.pop(0))
            assert r == "OK", r
            done += 1
        self.metrics["noop_pipelined_ops_per_s"] = n / (time.perf_counter() - t0)

    def store(self, p):
        name = ("cold", "warm")[p]
        prep_l, copy_l, commit_l = [], [], []
        faults, offsets = 0, []
        t0 = time.perf_counter()
        for r in range(self.R):
            key = self.key(p, r, 0)
            a = time.perf_counter()
            resp = self.call(self.client.prepare_store(key, self.iid))
            b = time.perf_counter()
            ctx = resp.context or {}
            slots = ctx.get("slots", [])
            idx = ctx.get("chunk_indices", [])
            if len(slots) != self.C:
                raise RuntimeError(f"prepare_store gave {len(slots)} slots for {self.C} chunks")
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for slot, i in zip(slots, idx):
                off, length = slot["offset"], slot["length"]
                if length != self.cb:
                    raise RuntimeError(f"slot of {length} bytes")
                np.copyto(self.pool[off:off + self.cb], self.src(r, i))
                self.pool[off:off + TAG_LEN] = self.tag(p, r, i)
                offsets.append(off)
            c = time.perf_counter()
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            if not self.call(self.client.commit_store(key, self.iid, b"")):
                raise RuntimeError("commit_store returned False")
            d = time.perf_counter()
            prep_l.append(b - a)
            copy_l.append(c - b)
            commit_l.append(d - c)
        wall = time.perf_counter() - t0
        nbytes = self.R * self.C * self.cb
        gbps = nbytes / wall / 1e9
        m = self.metrics
        m[f"store_{name}_gbps"] = gbps
        m[f"store_{name}_frac_memcpy"] = gbps / self.memcpy_gbps
        for op, lat in (("prepare_store", prep_l), ("commit_store", commit_l)):
            m[f"{op}_{name}_p50_us"] = quantile_us(lat, 0.5)
            m[f"{op}_{name}_p99_us"] = quantile_us(lat, 0.99)
        m[f"copy_in_{name}_gbps"] = nbytes / sum(copy_l) / 1e9
        # Where the copies went: page faults taken (the whole process, so the client's RPC threads
        # add a few), slots not on a page boundary, and the span of the pool the pass touched.
        m[f"copy_in_{name}_minflt_per_mib"] = faults / (nbytes / (1 << 20))
        m[f"copy_in_{name}_unaligned_slots"] = sum(1 for o in offsets if o % 4096)
        m[f"copy_in_{name}_span_mib"] = (max(offsets) + self.cb - min(offsets)) / (1 << 20)
        m[f"copy_in_{name}_first_offset_mib"] = min(offsets) / (1 << 20)

    def retrieve(self, p, lookups):
        name = ("cold", "warm")[p]
        look_l, prep_l, copy_l, commit_l = [], [], [], []
        t0 = time.perf_counter()
        for r in range(self.R):
            key_all = self.key(p, r, None)
            key = self.key(p, r, 0)
            a = time.perf_counter()
            self.call(self.client.lookup(key_all, 1))
            while True:
                self.polls += 1
                hit = self.call(self.client.query_prefetch_status(key_all.request_id))
                if hit is not None:
                    break
                if time.perf_counter() - a > self.timeout:
                    raise RuntimeError("lookup did not finish")
            b = time.perf_counter()
            if hit != self.C:
                raise RuntimeError(f"lookup hit {hit} of {self.C} chunks")
            resp = self.call(self.client.prepare_retrieve(key, self.iid))
            c = time.perf_counter()
            slots = (resp.context or {}).get("slots", [])
            if not resp.success or len(slots) != self.C:
                raise RuntimeError(f"prepare_retrieve success={resp.success} slots={len(slots)}")
            base = r * self.C * self.cb
            for i, slot in enumerate(slots):
                off = slot["offset"]
                np.copyto(self.dest[base + i * self.cb:base + (i + 1) * self.cb], self.pool[off:off + self.cb])
            d = time.perf_counter()
            if not self.call(self.client.commit_retrieve(key, self.iid)):
                raise RuntimeError("commit_retrieve returned False")
            e = time.perf_counter()
            self.call(self.client.end_session(key_all.request_id))
            look_l.append(b - a)
            prep_l.append(c - b)
            copy_l.append(d - c)
            commit_l.append(e - d)
        wall = time.perf_counter() - t0
        nbytes = self.R * self.C * self.cb
        gbps = nbytes / wall / 1e9
        m = self.metrics
        m[f"retrieve_{name}_gbps"] = gbps
        m[f"retrieve_{name}_frac_memcpy"] = gbps / self.memcpy_gbps
        m[f"lookup_{name}_p50_us"] = quantile_us(look_l, 0.5)
        m[f"lookup_{name}_p99_us"] = quantile_us(look_l, 0.99)
        for op, lat in (("prepare_retrieve", prep_l), ("commit_retrieve", commit_l)):
            m[f"{op}_{name}_p50_us"] = quantile_us(lat, 0.5)
            m[f"{op}_{name}_p99_us"] = quantile_us(lat, 0.99)
        m[f"copy_out_{name}_gbps"] = nbytes / sum(copy_l) / 1e9
        lookups.extend(look_l)

    def verify(self, p):
        bad = 0
        for r in range(self.R):
            for i in range(self.C):
                at = (r * self.C + i) * self.cb
                got = self.dest[at:at + self.cb]
                if not (np.array_equal(got[:TAG_LEN], self.tag(p, r, i))
                        and np.array_equal(got[TAG_LEN:], self.src(r, i)[TAG_LEN:])):
                    bad += 1
        if bad:
            raise RuntimeError(f"{bad} of {self.R * self.C} retrieved chunks differ")

    def run(self):
        self.register()
        self.memcpy()
        self.noops()
        lookups = []
        for p in (0, 1):
            self.store(p)
            self.retrieve(p, lookups)
            self.verify(p)
            self.call(self.client.clear(True))
        self.metrics["lookup_p50_us"] = quantile_us(lookups, 0.5)
        self.metrics["lookup_p99_us"] = quantile_us(lookups, 0.99)
        self.metrics["lookup_polls_mean"] = self.polls / max(1, len(lookups))
        floor_ratios(self.metrics)
        try:
            self.call(self.client.unregister_kv_cache_engine_driven_context(self.iid))
        except Exception:  # best effort, the server reaps instances anyway
            pass


# The control operations whose latency is compared with the same run's noop.
CONTROL_OPS = ("prepare_store_warm", "commit_store_warm", "prepare_retrieve_warm",
               "commit_retrieve_warm", "lookup")


def floor_ratios(m):
    """Each control op's p50 and p99 as a multiple of the same run's noop p50 and p99, and its p50
    as a multiple of the p50 of a noop sent right after a copy, under the names `kvtier bench`
    uses (`<op>_p50_x_noop`, `<op>_p99_x_noop`, `<op>_p50_x_noop_after_copy`), so that
    scripts/compare-lmcache prints one floor table for both clients. Only ratios within one run
    mean anything on a shared machine."""
    for base_key, q, suffix in (("noop_rtt_p50_us", "p50", "p50_x_noop"), ("noop_rtt_p99_us", "p99", "p99_x_noop"),
                                ("noop_after_copy_p50_us", "p50", "p50_x_noop_after_copy")):
        base = m.get(base_key)
        if not base:
            continue
        for op in CONTROL_OPS:
            v = m.get(f"{op}_{q}_us")
            if v is not None:
                m[f"{op}_{suffix}"] = v / base


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="tcp://127.0.0.1:5555")
    ap.add_argument("--shape", type=parse_shape, default=SHAPES["small"])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--chunks-per-request", type=int, default=4)
    ap.add_argument("--noops", type=int, default=2000)
    ap.add_argument("--pipeline-depth", type=int, default=200)
    ap.add_argument("--timeout-seconds", type=float, default=60.0)
    ap.add_argument("--model", default="kvtier-bench-py")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    b = Bench(args)
    try:
        b.run()
    except Exception as e:  # report, then fail
        b.errors.append(f"{type(e).__name__}: {e}")
    b.metrics["errors"] = len(b.errors)
    metrics = {k: v for k, v in b.metrics.items() if v is not None}
    if args.json:
        print(json.dumps({
            "config": {"url": args.url, "client": "lmcache-python", "chunk_bytes": b.cb,
                       "requests": b.R, "chunks_per_request": b.C, "seed": b.seed},
            "metrics": metrics,
            "errors": b.errors,
        }))
    else:
        for k, v in metrics.items():
            print(f"  {k:<32} {v:>12.2f}")
        for e in b.errors:
            print(f"error: {e}", file=sys.stderr)
    b.client.close()
    # The client's polling thread may linger; exit without waiting for it.
    sys.stdout.flush()
    os._exit(1 if b.errors else 0)


if __name__ == "__main__":
    main()
