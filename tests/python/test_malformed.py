"""Malformed requests get the op's failure reply (or, for <2 frames, none) and never disturb other
clients: after each one a second, independent client runs noop and a full store/lookup/retrieve."""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest

from conftest import Server, fresh_tokens, new_iid
from kvclient import EngineContext, Raw, decode_reply, enc, lookup_key, make_key, store_context
from lmcache_types import PrepareRetrieveResponse, PrepareStoreResponse

MODEL = "mal-model"
EMPTY_STORE = {"slots": [], "chunk_indices": []}
FAILED_RETRIEVE = PrepareRetrieveResponse(False, b"", {})


def check_healthy(server: Server, rng) -> None:
    """A second, independent client gets correct answers."""
    with server.client() as c:
        assert c.noop() == "OK"
        assert c.get_chunk_size() == 256
        ctx = EngineContext(c, new_iid(), MODEL + "-healthy", num_layers=1, hidden_dim_size=64)
        try:
            tokens = fresh_tokens(rng, 512)
            data = ctx.random_chunks(rng, 2)
            assert ctx.store(tokens, 0, 512, data, request_id="h") == [0, 1]
            assert c.lookup_hits(lookup_key(ctx.model, tokens, "h")) == 2
            assert ctx.retrieve(tokens, 0, 512, "h") == data
            c.end_session("h")
        finally:
            ctx.close()
    assert server.alive()


class Env:
    def __init__(self, server: Server, rng):
        self.server = server
        self.rng = rng
        self.c = server.client()
        self.ctx = EngineContext(self.c, new_iid(), MODEL, num_layers=1, hidden_dim_size=64)
        self.iid = self.ctx.instance_id
        # resident data under the attacker's own context, for cases that need it
        self.tokens = fresh_tokens(rng, 768)
        self.data = self.ctx.random_chunks(rng, 3)
        self.ctx.store(self.tokens, 0, 768, self.data, request_id="setup")
        self.c.end_session("setup")

    def key(self, start: int = 0, end: int = 512, **kw) -> object:
        kw.setdefault("worker_id", 0)
        return make_key(MODEL, self.tokens, start, end, "mal", **kw)

    def prepare_store_fails(self, *payloads) -> None:
        r = decode_reply(self.c.request("prepare_store", *payloads), PrepareStoreResponse)
        assert r.context == EMPTY_STORE, r

    def prepare_retrieve_fails(self, *payloads) -> None:
        r = decode_reply(self.c.request("prepare_retrieve", *payloads), PrepareRetrieveResponse)
        assert r == FAILED_RETRIEVE, r

    def bool_false(self, op: str, *payloads) -> None:
        assert decode_reply(self.c.request(op, *payloads), bool) is False

    def bare(self, op, *payloads) -> None:
        r = self.c.request(op, *payloads)
        assert r.bare, r.frames

    def query_zero(self, rid: str) -> None:
        assert self.c.query_prefetch_status(rid) == 0

    def close(self) -> None:
        self.c.end_session("mal")
        self.ctx.close()
        self.c.close()


def _key_map_without(field: str) -> bytes:
    d = {
        "model_name": MODEL, "world_size": 1, "worker_id": 0, "token_ids": list(range(512)),
        "start": 0, "end": 512, "request_id": "mal", "cache_salt": "", "request_configs": None, "num_kv_readers": 0,
    }
    del d[field]
    return enc(d)


def _plain(key) -> dict:
    return dataclasses.asdict(key)


def _with(key, **changes):
    return dataclasses.replace(key, **changes)


def _fresh_key(e: Env, **kw):
    """A key for tokens nobody stored: a lenient server would hand out slots for it."""
    return make_key(MODEL, fresh_tokens(e.rng, 512), 0, 512, "mal", **kw)


def _locked(e: Env, fn: Callable[[], None]) -> None:
    """Take valid lookup locks first, so a failing prepare_retrieve fails only for the malformation."""
    assert e.c.lookup_hits(lookup_key(MODEL, e.tokens, "mal")) == 3
    try:
        fn()
    finally:
        e.c.end_session("mal")
    assert e.server.l1()["read_locked_count"] == 0


def _pending_store(e: Env, fn: Callable[[object], None]) -> None:
    """Make a valid reservation, send a malformed commit, then clean up with a valid commit."""
    key = _fresh_key(e)
    sc = store_context(e.c.prepare_store(key, e.iid))
    assert sc.chunk_indices == [0, 1]
    fn(key)
    e.c.commit_store(key, e.iid, b"")  # True or False: the reservation may be gone
    assert e.server.l1()["write_locked_count"] == 0


def _pending_retrieve(e: Env, fn: Callable[[object], None]) -> None:
    def inner() -> None:
        key = e.key()
        assert e.c.prepare_retrieve(key, e.iid).success
        fn(key)
        e.c.commit_retrieve(key, e.iid)

    _locked(e, inner)


def _lookup_fails(e: Env, **changes) -> None:
    k = _with(lookup_key(MODEL, e.tokens, "mal-lk"), **changes)
    e.bare("lookup", k, 1)
    e.query_zero("mal-lk")
    e.c.end_session("mal-lk")
    assert e.server.l1()["read_locked_count"] == 0


def _after_unregister(e: Env) -> None:
    ctx = EngineContext(e.c, new_iid(), MODEL, num_layers=1, hidden_dim_size=64)
    ctx.close()
    e.prepare_store_fails(_fresh_key(e), ctx.instance_id)
    _locked(e, lambda: e.prepare_retrieve_fails(e.key(), ctx.instance_id))


def _query_no_frames(e: Env) -> None:
    assert decode_reply(e.c.request("query_prefetch_status"), int | None) == 0


def _bare_echo(e: Env, op) -> None:
    uid, opf = e.c.send(op, 1)
    r = e.c.wait(uid, opf)
    assert r.frames == [uid, enc(op)], r.frames


def _bare_echo_raw(e: Env, opf: bytes) -> None:
    uid = enc(123456)
    e.c.send_frames([uid, opf])
    r = e.c.wait(uid, opf)
    assert r.frames == [uid, opf], r.frames


CASES: dict[str, Callable[[Env], None]] = {
    # undecodable payload frames
    "bad-msgpack-key": lambda e: e.prepare_store_fails(Raw(b"\xc1"), e.iid),
    "huge-declared-length": lambda e: e.prepare_store_fails(Raw(b"\xdb\xff\xff\xff\xff"), e.iid),
    "deeply-nested-key": lambda e: e.prepare_store_fails(Raw(b"\x91" * 200_000 + b"\xc0"), e.iid),
    "trailing-bytes-key": lambda e: e.prepare_store_fails(Raw(enc(_fresh_key(e)) + b"\x00"), e.iid),
    "truncated-key-commit": lambda e: _pending_store(e, lambda k: e.bool_false("commit_store", Raw(enc(k)[:40]), e.iid, b"")),
    "bad-msgpack-data": lambda e: _pending_store(e, lambda k: e.bool_false("commit_store", k, e.iid, Raw(b"\xc4\xff"))),
    "empty-frame-key-retrieve": lambda e: _locked(e, lambda: e.prepare_retrieve_fails(Raw(b""), e.iid)),
    "bad-msgpack-iid-retrieve": lambda e: _locked(e, lambda: e.prepare_retrieve_fails(e.key(), Raw(b"\xc1"))),
    "bad-msgpack-lookup": lambda e: e.bare("lookup", Raw(b"\xc1"), 1),
    # well-formed msgpack of the wrong type
    "key-is-str-commit_retrieve": lambda e: _pending_retrieve(e, lambda k: e.bool_false("commit_retrieve", "not a key", e.iid)),
    "key-missing-token_ids": lambda e: e.prepare_store_fails(Raw(_key_map_without("token_ids")), e.iid),
    "key-missing-model": lambda e: e.prepare_store_fails(Raw(_key_map_without("model_name")), e.iid),
    "iid-is-str": lambda e: e.prepare_store_fails(_fresh_key(e), "abc"),
    "tokens-are-str": lambda e: e.prepare_store_fails(Raw(enc({**_plain(_fresh_key(e)), "token_ids": "abc"})), e.iid),
    # wrong number of payload frames
    "prepare_store-1-frame": lambda e: e.prepare_store_fails(_fresh_key(e)),
    "prepare_store-3-frames": lambda e: e.prepare_store_fails(_fresh_key(e), e.iid, b""),
    "prepare_store-1000-frames": lambda e: e.prepare_store_fails(_fresh_key(e), e.iid, *([0] * 998)),
    "commit_store-2-frames": lambda e: _pending_store(e, lambda k: e.bool_false("commit_store", k, e.iid)),
    "commit_store-4-frames": lambda e: _pending_store(e, lambda k: e.bool_false("commit_store", k, e.iid, b"", b"")),
    "prepare_retrieve-0-frames": lambda e: _locked(e, lambda: e.prepare_retrieve_fails()),
    "prepare_retrieve-3-frames": lambda e: _locked(e, lambda: e.prepare_retrieve_fails(e.key(), e.iid, 0)),
    "lookup-1-frame": lambda e: (e.bare("lookup", _with(lookup_key(MODEL, e.tokens, "mal-lk"))), e.query_zero("mal-lk")),
    "lookup-3-frames": lambda e: (e.bare("lookup", _with(lookup_key(MODEL, e.tokens, "mal-lk")), 1, 1), e.query_zero("mal-lk")),
    "query-0-frames": _query_no_frames,
    # ranges
    "end-255": lambda e: e.prepare_store_fails(_with(_fresh_key(e), end=255), e.iid),
    "start-1-end-257": lambda e: e.prepare_store_fails(_with(_fresh_key(e), start=1, end=257), e.iid),
    "start-after-end": lambda e: e.prepare_store_fails(_with(_fresh_key(e), start=512, end=256), e.iid),
    "end-beyond-tokens": lambda e: e.prepare_store_fails(_with(_fresh_key(e), end=768), e.iid),
    "retrieve-misaligned": lambda e: _locked(e, lambda: e.prepare_retrieve_fails(e.key(0, 300), e.iid)),
    # token ids outside u32
    "token-2**32": lambda e: e.prepare_store_fails(_with(_fresh_key(e), token_ids=(2**32,) + tuple(range(511))), e.iid),
    "token-negative": lambda e: e.prepare_store_fails(_with(_fresh_key(e), token_ids=tuple(range(511)) + (-1,)), e.iid),
    "lookup-token-2**32": lambda e: _lookup_fails(e, token_ids=(2**32 + 5,) + tuple(e.tokens[1:])),
    "lookup-token-negative": lambda e: _lookup_fails(e, token_ids=tuple(e.tokens[:-1]) + (-7,)),
    # identity / registration problems
    "unknown-iid-prepare_store": lambda e: e.prepare_store_fails(_fresh_key(e), 99_999_999),
    "unknown-iid-commit_store": lambda e: _pending_store(e, lambda k: e.bool_false("commit_store", k, 99_999_999, b"")),
    "unknown-iid-prepare_retrieve": lambda e: _locked(e, lambda: e.prepare_retrieve_fails(e.key(), 99_999_999)),
    "worker_id-eq-world_size": lambda e: e.prepare_store_fails(_fresh_key(e, worker_id=1), e.iid),
    "worker_id-negative": lambda e: e.prepare_store_fails(_fresh_key(e, worker_id=-1), e.iid),
    "retrieve-worker_id-eq-world_size": lambda e: _locked(e, lambda: e.prepare_retrieve_fails(e.key(worker_id=1), e.iid)),
    "unregistered-iid": _after_unregister,
    "num_kv_readers-0": lambda e: _lookup_fails(e, num_kv_readers=0),
    # ops
    "unknown-op-id-99": lambda e: _bare_echo(e, 99),
    "unknown-op-name": lambda e: _bare_echo(e, "no_such_op"),
    "op-frame-garbage": lambda e: _bare_echo_raw(e, b"\xc1"),
    "op-frame-is-map": lambda e: _bare_echo_raw(e, enc({"op": 1})),
    "op-frame-is-float": lambda e: _bare_echo_raw(e, enc(24.0)),
}


@pytest.fixture(scope="module")
def env(server: Server, request):
    import numpy as np

    e = Env(server, np.random.default_rng(1234))
    yield e
    e.close()


@pytest.mark.parametrize("case", list(CASES))
def test_malformed(server: Server, env: Env, rng, case: str):
    CASES[case](env)
    # the malformed request's own client keeps working too
    assert env.c.noop() == "OK"
    check_healthy(server, rng)


@pytest.mark.parametrize(
    "frames",
    [[b"\x05"], [b""], [b"\xcd\x01\x00"]],
    ids=["uid-only", "empty-frame", "uid-256-only"],
)
def test_short_message_gets_no_reply(server: Server, env: Env, rng, frames: list[bytes]):
    env.c.send_frames(frames)
    env.c.expect_no_reply(0.5)
    check_healthy(server, rng)
    assert env.c.noop() == "OK"
    env.c.expect_no_reply(0.1)


def test_garbage_uid_frame_does_not_disturb(server: Server, env: Env, rng):
    # the uid frame is only echoed, never interpreted: a reply is optional, a crash is not
    env.c.send_frames([b"\xc1\xc1", enc(24)])
    frames = env.c.recv_any(0.5)
    assert frames in (None, [b"\xc1\xc1", b"\x18", b"\xa2OK"]), frames
    check_healthy(server, rng)


def test_many_clients_interleaved_with_garbage(server: Server, env: Env, rng):
    good = [server.client() for _ in range(4)]
    try:
        for round_ in range(20):
            env.c.send_frames([b"\x01"])
            env.c.send("prepare_store", Raw(b"\xc1"), env.iid)
            ids = [(c, c.send("noop")) for c in good]
            for c, (uid, opf) in ids:
                assert c.wait(uid, opf).payload == b"\xa2OK"
        # drain the attacker's failure replies
        for _ in range(20):
            frames = env.c.recv_any(5)
            assert frames is not None and len(frames) == 3
    finally:
        for c in good:
            c.close()
    check_healthy(server, rng)


def test_server_still_alive(server: Server, env: Env):
    assert server.alive()
    st = server.status()
    assert st["is_healthy"] is True
    env.c.end_session("mal")
    l1 = server.l1()
    assert l1["read_locked_count"] == 0 and l1["write_locked_count"] == 0, l1


def test_client_vanishing_with_requests_in_flight(server: Server, rng):
    """Replies to a DEALER that has gone away are dropped; the server keeps serving everyone else."""
    tokens = fresh_tokens(rng, 512)
    for _ in range(5):
        c = server.client()
        for i in range(50):
            c.send("noop")
            c.send("lookup", lookup_key(MODEL, tokens, f"vanish{i}"), 1)
            c.send("wait_prefetch_status", f"vanish{i}", 0.2)
        c.close()
    check_healthy(server, rng)
    with server.client() as c:
        for i in range(50):
            c.end_session(f"vanish{i}")
