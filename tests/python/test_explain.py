"""Issue #17 part 1: every lookup is recorded with the reason its prefix ended where it did, and
`kvtier explain REQUEST_ID` names it. Each reason is produced on purpose through the wire against
a real server (and a real redis-server for the L2 reasons): never stored, evicted under pressure,
another cache_salt holds the tokens, a write lock expired, a cache clear, L2 down; plus a full hit
and a hit served from L2. The counters `kvtier_lookup_misses_total{reason}` follow."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import Server, fresh_tokens, kvtier_bin, new_iid, start_server, stop_and_check, wait_until
from kvclient import CHUNK_SIZE, EngineContext, make_key, store_context
from test_fault_matrix import Redis

MODEL = "explain-model"
WRITE_TTL = 1


def explain(srv: Server, request_id: str) -> tuple[int, str, str]:
    r = subprocess.run([kvtier_bin(), "explain", request_id, "--url", srv.http_url],
                       capture_output=True, text=True, timeout=20)
    return r.returncode, r.stdout, r.stderr


def records(srv: Server, request_id: str) -> list[dict]:
    r = subprocess.run([kvtier_bin(), "explain", request_id, "--url", srv.http_url, "--json"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["records"]


def reason_of(srv: Server, request_id: str) -> str:
    """The first-miss reason `kvtier explain` prints for the request's latest lookup."""
    code, out, err = explain(srv, request_id)
    assert code == 0, err
    found = re.findall(r"first miss: chunk \d+ \([0-9a-f]+…\): (\w+)", out)
    assert found, out
    return found[-1]


def misses(srv: Server) -> dict[str, float]:
    with urllib.request.urlopen(srv.http_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^kvtier_lookup_misses_total\{reason="(\w+)"\} (\S+)$', text, re.M)}


def redis_keys(redis: Redis) -> int:
    r = subprocess.run(["redis-cli", "-p", str(redis.port), "dbsize"], capture_output=True, text=True)
    return int(r.stdout.strip() or 0)


def lookup(c, tokens: list[int], rid: str, salt: str = "") -> int:
    key = make_key(MODEL, tokens, 0, len(tokens) // CHUNK_SIZE * CHUNK_SIZE, rid,
                   worker_id=None, num_kv_readers=1, cache_salt=salt)
    c.lookup(key)
    deadline = time.monotonic() + 10
    while True:
        r = c.query_prefetch_status(rid)
        if r is not None:
            c.end_session(rid)
            return r
        assert time.monotonic() < deadline, "prefetch still running"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def server():
    srv = start_server(["--l1-size-gb", "0.0625", "--l1-write-ttl-seconds", str(WRITE_TTL)])
    try:
        yield srv
    finally:
        stop_and_check(srv)


def test_full_hit_and_never_stored(server: Server, rng: np.random.Generator) -> None:
    before = misses(server)
    with server.client() as c:
        ctx = EngineContext(c, new_iid(), MODEL)
        try:
            tokens = fresh_tokens(rng, 4 * CHUNK_SIZE)
            ctx.store(tokens, 0, 2 * CHUNK_SIZE, ctx.random_chunks(rng, 2))
            assert lookup(c, tokens[: 2 * CHUNK_SIZE], "hit") == 2
            assert lookup(c, tokens, "half") == 2
            assert lookup(c, fresh_tokens(rng, 3 * CHUNK_SIZE), "cold") == 0
        finally:
            ctx.close()
    code, out, _ = explain(server, "hit")
    assert code == 0 and "no miss: every chunk asked was found" in out, out
    assert "asked 2 chunks: 2 from L1; prefix 2 (100.0 %)" in out, out
    (rec,) = records(server, "half")
    assert rec["chunks_requested"] == 4 and rec["hit_chunks_l1"] == 2, rec
    assert rec["miss"]["chunk_index"] == 2 and rec["miss"]["reason"] == "never_stored", rec
    assert reason_of(server, "cold") == "never_stored"
    after = misses(server)
    assert after["never_stored"] - before.get("never_stored", 0) == 2, after


def test_another_salt_holds_the_tokens(server: Server, rng: np.random.Generator) -> None:
    with server.client() as c:
        ctx = EngineContext(c, new_iid(), MODEL)
        try:
            tokens = fresh_tokens(rng, CHUNK_SIZE)
            key = make_key(MODEL, tokens, 0, CHUNK_SIZE, "salted-store", cache_salt="tenant-a")
            sc = store_context(c.prepare_store(key, ctx.instance_id))
            ctx.pool.write(sc.slots[0], ctx.random_chunks(rng, 1)[0])
            assert c.commit_store(key, ctx.instance_id, b"") is True
            assert lookup(c, tokens, "salt-a", salt="tenant-a") == 1
            assert lookup(c, tokens, "salt-b", salt="tenant-b") == 0
        finally:
            ctx.close()
    assert reason_of(server, "salt-b") == "other_model_or_salt"
    _, out, _ = explain(server, "salt-b")
    assert "cache_salt tenant-b" in out and "another model or cache_salt" in out, out


def test_evicted_under_pressure(server: Server, rng: np.random.Generator) -> None:
    with server.client(timeout=10) as c:
        ctx = EngineContext(c, new_iid(), MODEL, num_layers=24, hidden_dim_size=128)  # 3 MiB
        try:
            first = fresh_tokens(rng, CHUNK_SIZE)
            ctx.store(first, 0, CHUNK_SIZE, ctx.random_chunks(rng, 1))
            capacity = server.l1()["memory_total_bytes"] // ctx.nbytes
            for _ in range(capacity + 4):
                ctx.store(fresh_tokens(rng, CHUNK_SIZE), 0, CHUNK_SIZE, ctx.random_chunks(rng, 1))
            assert lookup(c, first, "evicted") == 0
        finally:
            ctx.close()
    assert reason_of(server, "evicted") == "evicted"
    (rec,) = records(server, "evicted")
    assert re.search(r"evicted from L1 \d+ s ago (to make room for a store|by the background "
                     r"eviction above the watermark) \(policy LRU\)", rec["miss"]["detail"]), rec


def test_a_lapsed_write_lock_discards_the_store(server: Server, rng: np.random.Generator) -> None:
    with server.client() as c:
        ctx = EngineContext(c, new_iid(), MODEL)
        try:
            tokens = fresh_tokens(rng, CHUNK_SIZE)
            key = ctx.key(tokens, 0, CHUNK_SIZE, "slow-writer")
            assert store_context(c.prepare_store(key, ctx.instance_id)).chunk_indices == [0]
            time.sleep(WRITE_TTL + 1.5)  # past the TTL and a housekeeping sweep
            assert lookup(c, tokens, "after-lapse") == 0
            assert c.commit_store(key, ctx.instance_id, b"") is False
        finally:
            ctx.close()
    assert reason_of(server, "after-lapse") == "discarded"
    _, out, _ = explain(server, "after-lapse")
    assert "write lock expired" in out, out


def test_a_clear_is_named(server: Server, rng: np.random.Generator) -> None:
    with server.client() as c:
        ctx = EngineContext(c, new_iid(), MODEL)
        try:
            tokens = fresh_tokens(rng, CHUNK_SIZE)
            ctx.store(tokens, 0, CHUNK_SIZE, ctx.random_chunks(rng, 1))
            c.clear()
            assert lookup(c, tokens, "after-clear") == 0
        finally:
            ctx.close()
    assert reason_of(server, "after-clear") == "cleared"


def test_unknown_request_and_bad_limit(server: Server) -> None:
    code, out, err = explain(server, "never-looked-up")
    assert code == 1 and "no lookup of request \"never-looked-up\" is recorded" in err, (out, err)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.http_url + "/api/lookups?limit=0", timeout=5)
    assert e.value.code == 400
    with urllib.request.urlopen(server.http_url + "/api/lookups?limit=3", timeout=5) as r:
        recent = json.loads(r.read())["records"]
    assert len(recent) == 3 and recent[0]["seq"] > recent[1]["seq"] > recent[2]["seq"], recent


def test_explain_cannot_reach_a_server() -> None:
    r = subprocess.run([kvtier_bin(), "explain", "x", "--url", "http://127.0.0.1:9", "--timeout-seconds", "2"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "cannot reach http://127.0.0.1:9/api/lookups" in r.stderr, r.stderr


def test_l2_reasons_with_a_real_redis(rng: np.random.Generator) -> None:
    redis = Redis()
    adapter = json.dumps({"type": "resp", "host": "127.0.0.1", "port": redis.port})
    srv = start_server(["--l2-adapter", adapter, "--l1-size-gb", "0.0625"])
    try:
        with srv.client(timeout=10) as c:
            ctx = EngineContext(c, new_iid(), MODEL, num_layers=24, hidden_dim_size=128)
            try:
                # A chunk written behind to Redis, then evicted from L1: the lookup loads it from
                # L2 (no miss), and a chunk Redis never had is "evicted ... and no L2 holds it".
                kept = fresh_tokens(rng, CHUNK_SIZE)
                ctx.store(kept, 0, CHUNK_SIZE, ctx.random_chunks(rng, 1))
                assert wait_until(lambda: redis_keys(redis) >= 1, timeout=10), "write-behind to Redis"
                capacity = srv.l1()["memory_total_bytes"] // ctx.nbytes
                for _ in range(capacity + 4):
                    ctx.store(fresh_tokens(rng, CHUNK_SIZE), 0, CHUNK_SIZE, ctx.random_chunks(rng, 1))
                assert lookup(c, kept, "from-l2") == 1
                (rec,) = records(srv, "from-l2")
                assert rec["hit_chunks_l1"] == 0 and rec["hit_chunks_l2"] == 1 and rec["miss"] is None, rec
                assert rec["l2_prefetch_ms"] is not None, rec

                assert lookup(c, fresh_tokens(rng, CHUNK_SIZE), "nowhere") == 0
                assert reason_of(srv, "nowhere") == "never_stored"
                _, out, _ = explain(srv, "nowhere")
                assert "no L2 adapter holds it" not in out  # never stored says nothing of L2

                # Redis hung: the request ends before its prefetch answers.
                redis.signal(signal.SIGSTOP)
                try:
                    t = fresh_tokens(rng, CHUNK_SIZE)
                    c.lookup(make_key(MODEL, t, 0, CHUNK_SIZE, "gave-up", worker_id=None, num_kv_readers=1))
                    assert c.query_prefetch_status("gave-up") is None  # still loading
                    c.end_session("gave-up")
                finally:
                    redis.signal(signal.SIGCONT)
                (rec,) = records(srv, "gave-up")
                assert rec["state"] == "abandoned" and rec["miss"]["reason"] == "prefetch_timeout", rec
                assert "the request ended before its L2 prefetch finished" in rec["miss"]["detail"], rec

                # Redis down: the L2 lookup fails, and that is the reason.
                redis.kill()
                assert lookup(c, fresh_tokens(rng, CHUNK_SIZE), "l2-down") == 0
                assert reason_of(srv, "l2-down") == "l2_unavailable"
                _, out, _ = explain(srv, "l2-down")
                assert "1 of 1 L2 adapters failed their lookup" in out, out
                assert misses(srv)["l2_unavailable"] >= 1
            finally:
                ctx.close()
    finally:
        stop_and_check(srv)
        redis.close()
