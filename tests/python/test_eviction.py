"""Filling L1 past the eviction watermark (LRU): a full pool answers prepare_store with empty slots
and commit_store False (never an error) if it cannot make room, background eviction brings usage back under the watermark, locked chunks are never
evicted, and every chunk that still hits is retrieved byte-exact (no slot reused while referenced)."""

from __future__ import annotations

import pytest

from conftest import Server, fresh_tokens, new_iid, start_server, stop_and_check, wait_until
from kvclient import EngineContext, lookup_key, store_context

MODEL = "evict-model"
WATERMARK = 0.8


@pytest.fixture(scope="module")
def server():
    srv = start_server(["--eviction-policy", "LRU"])
    try:
        yield srv
    finally:
        stop_and_check(srv)


def test_lru_eviction_keeps_locked_and_intact(server: Server, rng):
    with server.client(timeout=10) as c:
        ctx = EngineContext(c, new_iid(), MODEL, num_layers=24, hidden_dim_size=128)  # 3 MiB chunks
        try:
            total = server.l1()["memory_total_bytes"]
            per_chunk = ctx.nbytes
            capacity = total // per_chunk
            # the first sequence is looked up (read-locked) before the pool fills up
            pinned_tokens = fresh_tokens(rng, 1024)
            pinned = ctx.random_chunks(rng, 4)
            assert ctx.store(pinned_tokens, 0, 1024, pinned) == [0, 1, 2, 3]
            assert c.lookup_hits(lookup_key(MODEL, pinned_tokens, "pinned")) == 4

            seqs = []
            refused = 0
            for i in range(capacity + 10):  # more than fits
                t = fresh_tokens(rng, 256)
                d = ctx.random_chunks(rng, 1)
                key = ctx.key(t, 0, 256, "fill")
                sc = store_context(c.prepare_store(key, ctx.instance_id))
                if sc.slots:
                    ctx.check_slot(sc.slots[0])
                    ctx.pool.write(sc.slots[0], d[0])
                    assert c.commit_store(key, ctx.instance_id, b"") is True
                    seqs.append((t, d))
                else:
                    refused += 1
                    assert c.commit_store(key, ctx.instance_id, b"") is False
            # (a server may evict on demand instead of refusing: refused == 0 is fine)

            def under() -> bool:
                l1 = server.l1()
                return l1["memory_used_bytes"] < WATERMARK * l1["memory_total_bytes"]

            assert wait_until(under, timeout=10, interval=0.2), server.l1()
            c.end_session("fill")

            # pinned chunks survived and are intact
            assert ctx.retrieve(pinned_tokens, 0, 1024, "pinned") == pinned
            c.end_session("pinned")

            # every surviving chunk is byte-exact; the most recent ones survived (LRU)
            hits = []
            for i, (t, d) in enumerate(seqs):
                rid = f"chk{i}"
                h = c.lookup_hits(lookup_key(MODEL, t, rid))
                hits.append(h)
                if h:
                    assert ctx.retrieve(t, 0, 256, rid) == d, f"chunk {i} corrupted after eviction"
                c.end_session(rid)
            print(f"\n{len(seqs)} stored, {refused} refused, {sum(hits)} survive; capacity {capacity}")
            assert 0 < sum(hits) < len(seqs), hits
            assert hits[-1] == 1, "the most recently stored chunk was evicted first"
            l1 = server.l1()
            assert l1["total_object_count"] == sum(hits) + 4, l1
            assert l1["memory_used_bytes"] == l1["total_object_count"] * per_chunk, l1
            assert l1["read_locked_count"] == 0 and l1["write_locked_count"] == 0, l1
        finally:
            ctx.close()
