"""Byte-exact store -> lookup -> retrieve round trips over the SHM pool (world_size 1 and 2)."""

from __future__ import annotations

import pytest

from conftest import Server, fresh_tokens, new_iid
from kvclient import EngineContext, KVClient, decode_reply, lookup_key, retrieve_context, store_context
from lmcache_types import PrepareStoreResponse

MODEL = "rt-model"

SHAPES = {
    # name: (num_layers, hidden_dim_size, dtype, use_mla)  -> bytes per chunk
    "small-24x128-fp16": (24, 128, "float16", False),  # 3 MiB
    "4x512-bf16": (4, 512, "bfloat16", False),  # 2 MiB
    "mla-8x576-fp16": (8, 576, "float16", True),  # 2.25 MiB
}


@pytest.fixture(autouse=True)
def _clean(server: Server):
    yield
    # every test ends its sessions: nothing may stay locked
    l1 = server.l1()
    assert l1["read_locked_count"] == 0, l1
    assert l1["write_locked_count"] == 0, l1
    with server.client() as c:
        c.end_session("store")  # EngineContext.store's default request id
        c.clear(True)


class Ranks:
    """world_size engine contexts, one client (DEALER) and instance id per rank, like vLLM workers."""

    def __init__(self, server: Server, world_size: int, shape: tuple, model: str = MODEL):
        layers, hidden, dtype, mla = shape
        self.clients = [server.client() for _ in range(world_size)]
        self.ctx = [
            EngineContext(c, new_iid(), model, world_size=world_size, rank=r, num_layers=layers, hidden_dim_size=hidden, dtype_str=dtype, use_mla=mla)
            for r, c in enumerate(self.clients)
        ]
        self.ws = world_size
        self.model = model

    @property
    def sched(self) -> KVClient:
        return self.clients[0]

    def hits(self, tokens: list[int], rid: str, end: int | None = None) -> int:
        return self.sched.lookup_hits(lookup_key(self.model, tokens, rid, world_size=self.ws, end=end))

    def close(self) -> None:
        for c in self.ctx:
            c.close()
        for c in self.clients:
            c.close()


@pytest.fixture
def ranks_factory(server: Server):
    made: list[Ranks] = []

    def make(ws: int, shape_name: str = "small-24x128-fp16") -> Ranks:
        r = Ranks(server, ws, SHAPES[shape_name])
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.mark.parametrize("ws", [1, 2])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_roundtrip(server: Server, ranks_factory, rng, shape_name: str, ws: int):
    R = ranks_factory(ws, shape_name)
    n = 4
    tokens = fresh_tokens(rng, n * 256 + 17)  # trailing partial chunk is never stored
    data = [c.random_chunks(rng, n) for c in R.ctx]  # different bytes per rank
    for r, c in enumerate(R.ctx):
        assert c.store(tokens, 0, n * 256, data[r], request_id="rt") == list(range(n))
    l1 = server.l1()
    assert l1["total_object_count"] == n * ws
    assert l1["memory_used_bytes"] == n * ws * R.ctx[0].nbytes

    assert R.hits(tokens, "rt") == n
    for r, c in enumerate(R.ctx):
        got = c.retrieve(tokens, 0, n * 256, "rt")
        assert got is not None, f"prepare_retrieve failed for rank {r}"
        assert len(got) == n
        for i in range(n):
            assert got[i] == data[r][i], f"rank {r} chunk {i}: bytes differ"
    assert server.l1()["read_locked_count"] == 0  # commit_retrieve released every lock
    R.sched.end_session("rt")

    # a second, independent request: retrieve a sub-range starting mid-sequence
    assert R.hits(tokens, "rt2") == n
    for r, c in enumerate(R.ctx):
        assert c.retrieve(tokens, 256, 768, "rt2") == data[r][1:3]
    R.sched.end_session("rt2")
    assert server.l1()["read_locked_count"] == 0
    assert server.status()["active_sessions"] == 0


def test_ws2_missing_rank_counts_only_complete_chunks(server: Server, ranks_factory, rng):
    R = ranks_factory(2)
    tokens = fresh_tokens(rng, 4 * 256)
    d0, d1 = R.ctx[0].random_chunks(rng, 3), R.ctx[1].random_chunks(rng, 3)
    assert R.ctx[0].store(tokens, 0, 768, d0) == [0, 1, 2]
    assert R.ctx[1].store(tokens, 0, 512, d1) == [0, 1]  # rank 1 is missing chunk 2
    assert server.l1()["total_object_count"] == 5

    assert R.hits(tokens, "part") == 2
    assert R.ctx[0].retrieve(tokens, 0, 512, "part") == d0[:2]
    assert R.ctx[1].retrieve(tokens, 0, 512, "part") == d1[:2]
    R.sched.end_session("part")
    l1 = server.l1()
    assert l1["read_locked_count"] == 0, f"lock left behind (partial chunk 2 of rank 0?): {l1}"

    # chunk 2 is resident for rank 0 but was not counted, so it is not retrievable
    assert R.hits(tokens, "part2") == 2
    assert R.ctx[0].retrieve(tokens, 0, 768, "part2") is None
    R.sched.end_session("part2")
    assert server.l1()["read_locked_count"] == 0

    # rank 1 missing chunk 0 -> no prefix at all
    t2 = fresh_tokens(rng, 512)
    R.ctx[0].store(t2, 0, 512, d0)
    R.ctx[1].store(t2, 256, 512, d1)
    assert R.hits(t2, "part3") == 0
    R.sched.end_session("part3")
    assert server.l1()["read_locked_count"] == 0

    # completing rank 1 makes all three chunks hit
    assert R.ctx[1].store(tokens, 0, 768, d1[:2] + [b"\x07" * R.ctx[1].nbytes]) == [2]
    assert R.hits(tokens, "full") == 3
    assert R.ctx[1].retrieve(tokens, 0, 768, "full") == d1[:2] + [b"\x07" * R.ctx[1].nbytes]
    assert R.ctx[0].retrieve(tokens, 0, 768, "full") == d0
    R.sched.end_session("full")


def test_partial_hit_prefix(server: Server, ranks_factory, rng):
    R = ranks_factory(1)
    c = R.ctx[0]
    tokens = fresh_tokens(rng, 5 * 256)
    data = c.random_chunks(rng, 5)
    assert c.store(tokens, 0, 768, data) == [0, 1, 2]
    assert R.hits(tokens, "p1") == 3
    R.sched.end_session("p1")
    # chunk 4 without chunk 3: the prefix is still 3 chunks
    assert c.store(tokens, 1024, 1280, data) == [0]
    assert R.hits(tokens, "p2") == 3
    assert c.retrieve(tokens, 0, 768, "p2") == data[:3]
    R.sched.end_session("p2")
    # lookup of a shorter range only counts within it
    assert R.hits(tokens, "p3", end=512) == 2
    R.sched.end_session("p3")
    # fill the gap: 5 hits, and chunk 4 is the one stored earlier
    assert c.store(tokens, 0, 1280, data) == [3]
    assert R.hits(tokens, "p4") == 5
    assert c.retrieve(tokens, 0, 1280, "p4") == data
    R.sched.end_session("p4")


def test_retrieve_beyond_hit_prefix_fails(server: Server, ranks_factory, rng):
    R = ranks_factory(1, "4x512-bf16")
    c = R.ctx[0]
    tokens = fresh_tokens(rng, 4 * 256)
    data = c.random_chunks(rng, 2)
    c.store(tokens, 0, 512, data)
    assert R.hits(tokens, "b1") == 2
    assert c.retrieve(tokens, 0, 768, "b1") is None
    assert c.retrieve(tokens, 512, 768, "b1") is None
    R.sched.end_session("b1")
    assert server.l1()["read_locked_count"] == 0
    assert R.hits(tokens, "b2") == 2
    assert c.retrieve(tokens, 0, 512, "b2") == data
    R.sched.end_session("b2")
    # resident, but no lookup in this session
    assert c.retrieve(tokens, 0, 512, "b3") is None


def test_already_cached_chunks_are_skipped_not_overwritten(server: Server, ranks_factory, rng):
    R = ranks_factory(1, "mla-8x576-fp16")
    c = R.ctx[0]
    tokens = fresh_tokens(rng, 4 * 256)
    a = c.random_chunks(rng, 4)
    b = c.random_chunks(rng, 4)
    assert c.store(tokens, 0, 512, a) == [0, 1]
    assert c.store(tokens, 0, 1024, b) == [2, 3]
    assert c.store(tokens, 0, 1024, b) == []
    assert server.l1()["total_object_count"] == 4
    assert R.hits(tokens, "s") == 4
    assert c.retrieve(tokens, 0, 1024, "s") == a[:2] + b[2:]
    R.sched.end_session("s")


def test_same_tokens_different_salt_are_distinct(server: Server, ranks_factory, rng):
    R = ranks_factory(1, "4x512-bf16")
    c = R.ctx[0]
    tokens = fresh_tokens(rng, 512)
    a, b = c.random_chunks(rng, 2), c.random_chunks(rng, 2)
    c.store(tokens, 0, 512, a)
    k = c.key(tokens, 0, 512, "salt")
    k.cache_salt = "tenant-b"
    sc = store_context(c.client.prepare_store(k, c.instance_id))
    assert sc.chunk_indices == [0, 1]
    for s, i in zip(sc.slots, sc.chunk_indices):
        c.pool.write(s, b[i])
    assert c.client.commit_store(k, c.instance_id, b"") is True
    lk = lookup_key(MODEL, tokens, "salt")
    lk.cache_salt = "tenant-b"
    assert R.sched.lookup_hits(lk) == 2
    resp = c.client.prepare_retrieve(k, c.instance_id)
    assert resp.success
    assert [c.pool.read(s) for s in retrieve_context(resp).slots] == b
    assert c.client.commit_retrieve(k, c.instance_id) is True
    R.sched.end_session("salt")
    assert R.hits(tokens, "nosalt") == 2
    assert c.retrieve(tokens, 0, 512, "nosalt") == a
    R.sched.end_session("nosalt")


def test_two_sessions_lock_the_same_chunks_independently(server: Server, ranks_factory, rng):
    R = ranks_factory(1, "4x512-bf16")
    c = R.ctx[0]
    tokens = fresh_tokens(rng, 512)
    data = c.random_chunks(rng, 2)
    c.store(tokens, 0, 512, data)
    assert R.hits(tokens, "A") == 2
    assert R.hits(tokens, "B") == 2
    R.sched.end_session("A")
    assert server.l1()["read_locked_count"] == 2  # B still holds both chunks
    assert c.retrieve(tokens, 0, 512, "A") is None
    assert c.retrieve(tokens, 0, 512, "B") == data
    R.sched.end_session("B")
    assert server.l1()["read_locked_count"] == 0


def test_pipelined_data_ops_on_one_dealer(server: Server, ranks_factory, rng):
    """Many prepare/commit/lookup requests in flight on one socket; replies matched by uid."""
    R = ranks_factory(1, "4x512-bf16")
    c = R.ctx[0]
    cl = c.client
    seqs = [(fresh_tokens(rng, 512), c.random_chunks(rng, 2)) for _ in range(8)]
    keys = [c.key(t, 0, 512, f"pipe{i}") for i, (t, _) in enumerate(seqs)]
    sent = [cl.send("prepare_store", k, c.instance_id) for k in keys]
    for (uid, opf), (_, data) in zip(sent, seqs):
        sc = store_context(decode_reply(cl.wait(uid, opf), PrepareStoreResponse))
        assert sc.chunk_indices == [0, 1]
        for s, i in zip(sc.slots, sc.chunk_indices):
            c.pool.write(s, data[i])
    sent = [cl.send("commit_store", k, c.instance_id, b"") for k in keys]
    assert [decode_reply(cl.wait(u, o), bool) for u, o in reversed(sent)] == [True] * 8
    sent = [cl.send("lookup", lookup_key(MODEL, t, f"pipe{i}"), 1) for i, (t, _) in enumerate(seqs)]
    for u, o in sent:
        assert cl.wait(u, o).bare
    sent = [cl.send("wait_prefetch_status", f"pipe{i}", 5.0) for i in range(8)]
    assert [decode_reply(cl.wait(u, o), int | None) for u, o in sent] == [2] * 8
    for i, (t, data) in enumerate(seqs):
        assert c.retrieve(t, 0, 512, f"pipe{i}") == data
        R.sched.end_session(f"pipe{i}")


def test_free_lookup_locks_only_touches_its_own_session(server: Server, ranks_factory, rng):
    R = ranks_factory(1, "4x512-bf16")
    c = R.ctx[0]
    tokens = fresh_tokens(rng, 512)
    data = c.random_chunks(rng, 2)
    c.store(tokens, 0, 512, data)
    assert R.hits(tokens, "A") == 2
    assert R.hits(tokens, "B") == 2
    assert R.sched.free_lookup_locks(lookup_key(MODEL, tokens, "A"), 1) is None
    assert server.l1()["read_locked_count"] == 2
    assert c.retrieve(tokens, 0, 512, "A") is None
    assert c.retrieve(tokens, 0, 512, "B") == data
    R.sched.end_session("A")
    R.sched.end_session("B")
    assert server.l1()["read_locked_count"] == 0
