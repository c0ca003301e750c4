"""16 concurrent clients (threads, each its own DEALER and instance id) doing store/lookup/retrieve cycles.

Cycles per client come from KVTIER_STRESS_CYCLES (default 500, the acceptance figure; about 10 s
against a debug build on 2 cores). Lower it when iterating, e.g. KVTIER_STRESS_CYCLES=50.

The object shape is tiny (1 layer x hidden 8, fp16 = 8 KiB per chunk) so that even 500 cycles x 16
clients x 2 chunks (128 MiB) stays below the 0.25 GiB pool's 80 % eviction watermark: nothing is
evicted, and memory accounting can be checked exactly.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from conftest import Server, new_iid, start_server, stop_and_check
from kvclient import EngineContext, lookup_key

N_CLIENTS = 16
CYCLES = int(os.environ.get("KVTIER_STRESS_CYCLES", "500"))
MODEL = "stress-model"
RSS_GROWTH_LIMIT = 16 << 20
# The KV-event replay log keeps each stored chunk's tokens until it holds --kv-event-log-size
# records (about 2 KiB each with allocator rounding, measured: far more than anything else this
# test stores). A small log is full long before the first RSS sample, so the growth measured
# afterwards is the server's own, and the log's wrap-around (dropping the oldest records and
# their token buffers) runs thousands of times under the same RSS bound.
KV_EVENT_LOG_SIZE = 1024


@pytest.fixture(scope="module")
def server():
    srv = start_server(["--l1-read-ttl-seconds", "300", "--kv-event-log-size", str(KV_EVENT_LOG_SIZE)])
    try:
        yield srv
    finally:
        stop_and_check(srv)


class Worker:
    def __init__(self, server: Server, idx: int):
        self.idx = idx
        self.client = server.client(timeout=30.0)
        self.ctx = EngineContext(self.client, new_iid(), MODEL, num_layers=1, hidden_dim_size=8, dtype_str="float16")
        self.rng = np.random.default_rng(1000 + idx)
        self.done = 0
        self.chunks = 0
        self.mismatches: list[str] = []
        self.error: BaseException | None = None

    def run(self, n: int) -> None:
        try:
            for _ in range(n):
                self.cycle(self.done)
                self.done += 1
        except BaseException as e:  # reported by the test thread
            self.error = e

    def cycle(self, k: int) -> None:
        c, ctx = self.client, self.ctx
        n_chunks = 1 + (k % 2)
        tokens = [self.idx, k] + self.rng.integers(0, 2**32, n_chunks * 256 - 2, dtype=np.uint64).tolist()
        data = ctx.random_chunks(self.rng, n_chunks)
        rid = f"c{self.idx}-{k}"
        idx = ctx.store(tokens, 0, n_chunks * 256, data, request_id=rid)
        if idx != list(range(n_chunks)):
            self.mismatches.append(f"{rid}: prepare_store chunk_indices {idx}")
            c.end_session(rid)
            return
        self.chunks += n_chunks
        hits = c.lookup_hits(lookup_key(MODEL, tokens, rid))
        if hits != n_chunks:
            self.mismatches.append(f"{rid}: {hits} hits, expected {n_chunks}")
        else:
            got = ctx.retrieve(tokens, 0, n_chunks * 256, rid)
            if got is None:
                self.mismatches.append(f"{rid}: prepare_retrieve failed")
            elif got != data:
                self.mismatches.append(f"{rid}: bytes differ")
        c.end_session(rid)

    def close(self) -> None:
        self.ctx.close()
        self.client.close()


def _phase(workers: list[Worker], n: int) -> None:
    threads = [threading.Thread(target=w.run, args=(n,), name=f"stress-{w.idx}") for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
        assert not t.is_alive(), "a stress client hung"
    for w in workers:
        if w.error is not None:
            raise AssertionError(f"client {w.idx} failed after {w.done} cycles: {w.error!r}") from w.error


def test_concurrent_clients(server: Server):
    assert CYCLES >= 4
    workers = [Worker(server, i) for i in range(N_CLIENTS)]
    obj_size = workers[0].ctx.nbytes
    try:
        t0 = time.monotonic()
        quarter = CYCLES // 4
        _phase(workers, quarter)
        rss_25 = server.rss_excluding_shm()
        assert server.status()["kv_events"]["log_depth"] == KV_EVENT_LOG_SIZE, "the KV-event log is not full yet"
        _phase(workers, CYCLES - quarter)
        rss_100 = server.rss_excluding_shm()
        elapsed = time.monotonic() - t0

        mismatches = [m for w in workers for m in w.mismatches]
        assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:5]}"
        assert all(w.done == CYCLES for w in workers)
        total_chunks = sum(w.chunks for w in workers)

        st = server.status()
        l1 = st["storage_manager"]["l1_manager"]
        assert l1["read_locked_count"] == 0, l1
        assert l1["write_locked_count"] == 0, l1
        assert st["active_sessions"] == 0, st["active_sessions"]
        assert l1["total_object_count"] == total_chunks, (l1, total_chunks)
        assert l1["memory_used_bytes"] == l1["total_object_count"] * obj_size, l1
        growth = rss_100 - rss_25
        print(
            f"\n{N_CLIENTS} clients x {CYCLES} cycles ({total_chunks} chunks) in {elapsed:.1f}s; "
            f"server RSS excl. shm {rss_25 >> 20} MiB at 25 %, {rss_100 >> 20} MiB at 100 %"
        )
        assert growth <= RSS_GROWTH_LIMIT, f"server RSS (excl. shm) grew by {growth / 2**20:.1f} MiB"
        assert st["kv_events"]["log_depth"] == KV_EVENT_LOG_SIZE, st["kv_events"]
    finally:
        for w in workers:
            w.close()
    assert server.alive()
