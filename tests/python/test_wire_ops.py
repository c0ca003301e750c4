"""Every implemented op, both op encodings, byte-for-byte echo of uid/op frames, strict typed replies."""

from __future__ import annotations

import os

import msgspec
import numpy as np
import pytest
import zmq

from conftest import L1_BYTES, Server, fresh_tokens, new_iid
from kvclient import (
    EngineContext,
    KVClient,
    decode_reply,
    enc,
    lookup_key,
    make_key,
    retrieve_context,
    store_context,
)
from lmcache_types import (
    BlockAllocationRecord,
    PrepareRetrieveResponse,
    PrepareStoreResponse,
    RegisterEngineDrivenContextPayload,
    RegisterEngineDrivenContextResponse,
    slot_nbytes,
    slot_shape,
)

MODEL = "wire-model"


@pytest.fixture
def ctx(client: KVClient):
    c = EngineContext(client, new_iid(), MODEL, num_layers=2, hidden_dim_size=64, dtype_str="float16")
    yield c
    c.close()


def _stored(ctx: EngineContext, rng: np.random.Generator, n_chunks: int, n_tokens: int | None = None):
    tokens = fresh_tokens(rng, n_tokens or n_chunks * 256)
    data = ctx.random_chunks(rng, n_chunks)
    assert ctx.store(tokens, 0, n_chunks * 256, data) == list(range(n_chunks))
    return tokens, data


# --- control ops -------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["int", "str"])
def test_get_chunk_size(client: KVClient, style: str):
    r = client.request("get_chunk_size", op_style=style)
    assert r.payload == b"\xcd\x01\x00"
    assert decode_reply(r, int) == 256


@pytest.mark.parametrize("style", ["int", "str"])
def test_noop(client: KVClient, style: str):
    r = client.request("noop", op_style=style)
    assert r.payload == b"\xa2OK"
    assert decode_reply(r, str) == "OK"


@pytest.mark.parametrize("style", ["int", "str"])
def test_ping(client: KVClient, style: str):
    assert client.ping(None, op_style=style) is True
    assert client.ping(987654, op_style=style) is True
    r = client.request("ping", 1, op_style=style)
    assert r.payload == b"\xc3"


def test_ping_registered(ctx: EngineContext):
    assert ctx.client.ping(ctx.instance_id) is True


def test_get_experimental(client: KVClient):
    r = client.request("get_experimental")
    assert decode_reply(r, list[str]) == ["kv_event_stream"]
    assert r.payload == b"\x91\xafkv_event_stream"


def test_status_tree(server: Server):
    st = server.status()
    assert st["is_healthy"] is True
    assert isinstance(st["active_sessions"], int)
    l1 = st["storage_manager"]["l1_manager"]
    for k in ("total_object_count", "write_locked_count", "read_locked_count", "temporary_count", "memory_used_bytes", "memory_total_bytes"):
        assert isinstance(l1[k], int) and not isinstance(l1[k], bool), (k, l1)
    assert l1["memory_total_bytes"] >= L1_BYTES


# --- framing -----------------------------------------------------------------------------------------


UID_FRAMES = [
    b"\x00",  # 0
    b"\x7f",  # 127
    b"\xcc\xff",  # 255
    b"\xcd\x01\x00",  # 256
    b"\xce\x00\x01\x00\x00",  # 65536
    b"\xcf\x00\x00\x00\x01\x00\x00\x00\x00",  # 2**32
    b"\xcd\x00\x05",  # 5, non-minimal encoding: still echoed verbatim
]
NOOP_OP_FRAMES = [b"\x18", b"\xa4noop", b"\xd0\x18", b"\xcc\x18"]


def test_uid_and_op_echoed_byte_for_byte(server: Server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.rpc_url)
    try:
        # one at a time: the same uid frame is reused across op encodings
        for uid, op in [(u, o) for o in NOOP_OP_FRAMES for u in UID_FRAMES]:
            sock.send_multipart([uid, op])
            assert sock.poll(5000), f"no reply to noop uid={uid.hex()} op={op.hex()}"
            assert sock.recv_multipart() == [uid, op, b"\xa2OK"]
        # get_chunk_size as int 21 and as str
        for op in (b"\x15", enc("get_chunk_size")):
            sock.send_multipart([b"\xcd\x01\x00", op])
            assert sock.poll(5000)
            assert sock.recv_multipart() == [b"\xcd\x01\x00", op, b"\xcd\x01\x00"]
        # a bare (None) reply also echoes both frames: unregister of an unknown instance id
        for op in (b"\x0f", enc("unregister_kv_cache_engine_driven_context")):
            sock.send_multipart([b"\xcc\xff", op, enc(424242)])
            assert sock.poll(5000)
            assert sock.recv_multipart() == [b"\xcc\xff", op]
    finally:
        sock.close(0)


def test_client_uid_counter_starts_at_zero(server: Server):
    with server.client() as c:
        uids = [c.send("noop")[0] for _ in range(258)]
        assert uids[0] == b"\x00" and uids[255] == b"\xcc\xff" and uids[256] == b"\xcd\x01\x00"
        for u in reversed(uids):  # matched by uid regardless of the order we wait in
            assert c.wait(u).payload == b"\xa2OK"


def test_pipelined_mixed_ops_match_by_uid(server: Server, rng):
    with server.client() as c:
        pending = []
        for i in range(40):
            kind = i % 4
            if kind == 0:
                pending.append((c.send("noop"), str, "OK"))
            elif kind == 1:
                pending.append((c.send("query_prefetch_status", f"unknown-{i}"), int | None, 0))
            elif kind == 2:
                pending.append((c.send("get_chunk_size"), int, 256))
            else:
                pending.append((c.send("ping", None), bool, True))
        for (uid, opf), tp, want in reversed(pending):
            assert decode_reply(c.wait(uid, opf), tp) == want


# --- registration ------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["int", "str"])
def test_register_unregister(server: Server, client: KVClient, style: str):
    iid = new_iid()
    p = RegisterEngineDrivenContextPayload(iid, MODEL, 1, 16, 2, 64, "float16", False, None)
    r = client.request("register_kv_cache_engine_driven_context", p, op_style=style)
    raw = msgspec.msgpack.decode(r.payload)
    assert isinstance(raw, dict) and {"shm_name", "pool_size"} <= raw.keys(), raw
    reg = decode_reply(r, RegisterEngineDrivenContextResponse)
    assert not reg.shm_name.startswith("/")
    assert reg.shm_name == server.shm_name
    assert reg.pool_size >= L1_BYTES and reg.pool_size % 4096 == 0
    assert os.path.getsize("/dev/shm/" + reg.shm_name) >= reg.pool_size
    assert server.l1()["memory_total_bytes"] == reg.pool_size
    for _ in range(2):  # unregistering twice is fine
        r = client.request("unregister_kv_cache_engine_driven_context", iid, op_style=style)
        assert r.bare, r.frames


def test_register_twice_same_iid_is_idempotent(client: KVClient):
    iid = new_iid()
    p = RegisterEngineDrivenContextPayload(iid, MODEL, 1, 16, 2, 64, "float16", False, None)
    a = client.register_context(p)
    b = client.register_context(p)
    assert a == b
    assert client.unregister_context(iid) is None


# --- store path --------------------------------------------------------------------------------------

GEOMETRIES = [
    # num_layers, hidden, dtype, use_mla, num_physical_slots
    (2, 64, "float16", False, None),
    (3, 96, "bfloat16", True, None),
    (2, 32, "float32", False, 272),
    (1, 128, "bfloat16", True, 128),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: f"L{g[0]}-H{g[1]}-{g[2]}-mla{int(g[3])}-S{g[4]}")
def test_prepare_store_slot_geometry(client: KVClient, rng, geom):
    layers, hidden, dtype, mla, nps = geom
    iid = new_iid()
    ctx = EngineContext(client, iid, MODEL + "-geom", num_layers=layers, hidden_dim_size=hidden, dtype_str=dtype, use_mla=mla, num_physical_slots=nps)
    try:
        want_shape = slot_shape(layers, hidden, mla, nps)
        want_len = slot_nbytes(want_shape, dtype)
        tokens = fresh_tokens(rng, 3 * 256)
        key = ctx.key(tokens, 0, 768, "geom")
        resp = client.prepare_store(key, iid)
        assert isinstance(resp, PrepareStoreResponse)
        sc = store_context(resp)
        assert sc.chunk_indices == [0, 1, 2]
        spans = []
        for s in sc.slots:
            assert s.shape == want_shape and s.dtype == dtype and s.length == want_len, s
            assert s.offset % 4096 == 0 and s.offset + s.length <= ctx.reg.pool_size
            spans.append((s.offset, s.offset + s.length))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"overlapping slots {spans}"
        for s in sc.slots:
            ctx.pool.write(s, rng.integers(0, 256, s.length, dtype=np.uint8).tobytes())
        assert client.commit_store(key, iid, b"") is True
        # fully cached now
        again = client.prepare_store(ctx.key(tokens, 0, 768, "geom2"), iid)
        assert again.context == {"slots": [], "chunk_indices": []}
    finally:
        ctx.close()


def test_prepare_store_skips_cached_chunks(ctx: EngineContext, rng):
    tokens = fresh_tokens(rng, 5 * 256)
    data = ctx.random_chunks(rng, 5)
    assert ctx.store(tokens, 0, 512, data) == [0, 1]
    # 4 chunks with the first 2 cached -> [2, 3]
    key = ctx.key(tokens, 0, 1024, "skip")
    sc = store_context(ctx.client.prepare_store(key, ctx.instance_id))
    assert sc.chunk_indices == [2, 3]
    for s, i in zip(sc.slots, sc.chunk_indices):
        ctx.pool.write(s, data[i])
    assert ctx.client.commit_store(key, ctx.instance_id, b"") is True
    # indices are relative to start's chunk: [256, 1280) with chunks 1..3 cached -> only chunk 4 -> [3]
    assert ctx.store(tokens, 256, 1280, data) == [3]


def test_commit_store_without_prepare_is_false(ctx: EngineContext, rng):
    tokens = fresh_tokens(rng, 512)
    key = ctx.key(tokens, 0, 512, "nocommit")
    assert ctx.client.commit_store(key, ctx.instance_id, b"") is False
    # a second commit of an already committed store has no pending reservation either
    ctx.store(tokens, 0, 512, ctx.random_chunks(rng, 2))
    assert ctx.client.commit_store(key, ctx.instance_id, b"") is False


def test_store_accounting(server: Server, ctx: EngineContext, rng):
    before = server.l1()
    _stored(ctx, rng, 3)
    after = server.l1()
    assert after["total_object_count"] == before["total_object_count"] + 3
    assert after["memory_used_bytes"] == before["memory_used_bytes"] + 3 * ctx.nbytes
    assert after["write_locked_count"] == 0
    assert after["temporary_count"] == 0


# --- lookup ------------------------------------------------------------------------------------------


def test_lookup_and_query_exactly_once(ctx: EngineContext, rng):
    tokens, _ = _stored(ctx, rng, 3, n_tokens=3 * 256 + 100)  # trailing partial chunk is ignored
    c = ctx.client
    key = lookup_key(MODEL, tokens, "q-once")
    assert key.end == 768
    r = c.request("lookup", key, 1)
    assert r.bare, f"lookup must reply [uid, op], got {r.frames}"
    hits = None
    for _ in range(5000):
        hits = c.query_prefetch_status("q-once")
        if hits is not None:
            break
    assert hits == 3
    assert c.query_prefetch_status("q-once") == 0
    assert c.query_prefetch_status("never-looked-up") == 0
    assert c.end_session("q-once") is None


@pytest.mark.parametrize("style", ["int", "str"])
def test_wait_prefetch_status(ctx: EngineContext, rng, style: str):
    tokens, _ = _stored(ctx, rng, 2)
    c = ctx.client
    rid = f"wait-{style}"
    c.lookup(lookup_key(MODEL, tokens, rid), 1, op_style=style)
    r = c.request("wait_prefetch_status", rid, 5.0, op_style=style)
    assert decode_reply(r, int | None) == 2
    assert c.wait_prefetch_status("never-looked-up-" + style, 0.5, op_style=style) == 0
    c.end_session(rid)


def test_lookup_miss_is_zero(client: KVClient, rng):
    tokens = fresh_tokens(rng, 1024)
    assert client.lookup_hits(lookup_key(MODEL, tokens, "miss")) == 0
    client.end_session("miss")


def test_lookup_other_model_or_salt_misses(ctx: EngineContext, rng):
    tokens, _ = _stored(ctx, rng, 2)
    c = ctx.client
    assert c.lookup_hits(lookup_key(MODEL + "-other", tokens, "other-model")) == 0
    k = lookup_key(MODEL, tokens, "other-salt")
    k.cache_salt = "tenant1"
    assert c.lookup_hits(k) == 0
    k = lookup_key(MODEL, tokens, "ws2")
    k.world_size = 2
    assert c.lookup_hits(k) == 0
    k = lookup_key(MODEL, tokens, "same")
    k.request_configs = {"anything": 1}  # not part of identity
    assert c.lookup_hits(k) == 2
    for rid in ("other-model", "other-salt", "ws2", "same"):
        c.end_session(rid)


# --- retrieve ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["int", "str"])
def test_full_cycle(server: Server, rng, style: str):
    with server.client(op_style=style) as c:
        ctx = EngineContext(c, new_iid(), MODEL, num_layers=2, hidden_dim_size=64)
        try:
            tokens = fresh_tokens(rng, 768)
            data = ctx.random_chunks(rng, 3)
            assert ctx.store(tokens, 0, 768, data) == [0, 1, 2]
            assert c.lookup_hits(lookup_key(MODEL, tokens, "cycle")) == 3
            key = ctx.key(tokens, 0, 768, "cycle")
            resp = c.prepare_retrieve(key, ctx.instance_id)
            assert isinstance(resp, PrepareRetrieveResponse)
            assert resp.success is True and resp.data == b""
            got = [ctx.pool.read(s) for s in retrieve_context(resp).slots]
            assert got == data
            assert c.commit_retrieve(key, ctx.instance_id) is True
            assert c.end_session("cycle") is None
            assert server.l1()["read_locked_count"] == 0
        finally:
            ctx.close()


def test_prepare_retrieve_without_lookup_fails(ctx: EngineContext, rng):
    tokens, _ = _stored(ctx, rng, 2)
    resp = ctx.client.prepare_retrieve(ctx.key(tokens, 0, 512, "nolookup"), ctx.instance_id)
    assert resp == PrepareRetrieveResponse(False, b"", {})


def test_commit_retrieve_without_prepare_is_false(ctx: EngineContext, rng):
    tokens, _ = _stored(ctx, rng, 1)
    assert ctx.client.commit_retrieve(ctx.key(tokens, 0, 256, "nocr"), ctx.instance_id) is False


def test_end_session_releases_locks(server: Server, ctx: EngineContext, rng):
    tokens, _ = _stored(ctx, rng, 3)
    c = ctx.client
    assert c.lookup_hits(lookup_key(MODEL, tokens, "es")) == 3
    assert server.l1()["read_locked_count"] == 3
    r = c.request("end_session", "es")
    assert r.bare
    assert server.l1()["read_locked_count"] == 0
    assert ctx.retrieve(tokens, 0, 768, "es") is None


def test_free_lookup_locks(server: Server, ctx: EngineContext, rng):
    tokens, data = _stored(ctx, rng, 3)
    c = ctx.client
    assert c.lookup_hits(lookup_key(MODEL, tokens, "fl")) == 3
    k = make_key(MODEL, tokens, 0, 256, "fl", worker_id=None, num_kv_readers=1)
    r = c.request("free_lookup_locks", k, 1)
    assert r.bare
    assert server.l1()["read_locked_count"] == 2
    assert ctx.retrieve(tokens, 0, 256, "fl") is None  # chunk 0 no longer locked
    assert ctx.retrieve(tokens, 256, 768, "fl") == data[1:]
    # free the rest (already released by commit_retrieve; must be harmless)
    assert c.free_lookup_locks(make_key(MODEL, tokens, 0, 768, "fl", worker_id=None, num_kv_readers=1), 1) is None
    assert server.l1()["read_locked_count"] == 0
    c.end_session("fl")


def test_clear(server: Server, ctx: EngineContext, rng):
    tokens, _ = _stored(ctx, rng, 2)
    c = ctx.client
    r = c.request("clear", False)
    assert r.bare
    assert c.lookup_hits(lookup_key(MODEL, tokens, "clr")) == 0
    c.end_session("clr")
    tokens, _ = _stored(ctx, rng, 2)
    assert c.clear(True) is None
    assert c.lookup_hits(lookup_key(MODEL, tokens, "clr2")) == 0
    c.end_session("clr2")
    assert server.l1()["total_object_count"] == 0


def test_report_block_allocation(client: KVClient):
    recs = [BlockAllocationRecord("req-1", [[1, 2, 3]], [5, 6, 7]), BlockAllocationRecord("req-2", [[], [9]], [])]
    r = client.request("report_block_allocation", new_iid(), MODEL, recs)
    assert r.bare
    assert client.report_block_allocation(new_iid(), MODEL, []) is None


# --- not implemented / unknown ops -------------------------------------------------------------------


def test_unimplemented_ops_reply_with_failure_values(client: KVClient, rng):
    tokens = fresh_tokens(rng, 256)
    key = make_key(MODEL, tokens, 0, 256, "unimpl")
    # A failed transfer echoes the client's event handle, as a successful one does.
    assert client.call("store", key, 1, [[0, 1]], b"stub_ipc_handle", rtype=tuple[bytes, bool]) == (b"stub_ipc_handle", False)
    assert client.call("retrieve", key, 1, [[0, 1]], b"evt", 0, rtype=tuple[bytes, bool]) == (b"evt", False)
    assert client.call("p2p_lookup_and_lock", [], {}, rtype=int) == 0
    assert client.call("cb_reorder_plan", key, 0, 10, rtype=list[int]) == []
    r = client.request("register_kv_cache", new_iid(), [], MODEL, 1, "vllm", {"kv_layout": "NHD"}, [])
    assert r.bare, r.frames


@pytest.mark.parametrize("op", [99, "no_such_op"])
def test_unknown_op_gets_bare_reply(client: KVClient, op):
    r = client.request(op)
    assert r.bare and r.op == enc(op), r.frames
    r = client.request(op, 1, "x")
    assert r.bare and r.op == enc(op), r.frames


def test_end_session_and_free_locks_without_lookup(client: KVClient, rng):
    assert client.request("end_session", "never-started").bare
    tokens = fresh_tokens(rng, 512)
    assert client.request("free_lookup_locks", lookup_key(MODEL, tokens, "never-started"), 1).bare
