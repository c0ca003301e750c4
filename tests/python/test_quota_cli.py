"""Quotas per cache_salt driven by LMCache 0.5.6's own `lmcache quota` CLI against a real kvtier.

`lmcache quota set tenant-a --limit-gb 0.5`, then tenant-a stores 1 GiB (256 chunks of 4 MiB)
while tenant-b's hot set (32 chunks) is resident: tenant-a must stay within 0.5 GiB (it evicts
its own chunks), and every chunk of tenant-b must still hit and read back byte-exact.
`get`, `list` and `delete` must understand kvtier's answers.

Needs the lmcache==0.5.6 virtualenv (LMCACHE_VENV, or scripts/lmcache-venv ensures it).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import pytest

from conftest import Server, fresh_tokens, new_iid, start_server, stop_and_check
from kvclient import EngineContext, make_key, retrieve_context, store_context

MODEL = "quota-model"
GIB = 1 << 30
# The real CLI is required, never skipped: scripts/test sets LMCACHE_VENV; without it the shared
# virtualenv is ensured here (scripts/lmcache-venv).
VENV = os.environ.get("LMCACHE_VENV") or subprocess.run(
    [os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "lmcache-venv")],
    check=True, capture_output=True, text=True).stdout.strip()
LMCACHE = os.path.join(VENV, "bin", "lmcache")


def quota_cli(server: Server, *args: str) -> dict:
    """Runs `lmcache quota ARGS --url <kvtier> --format json`; returns its JSON output."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        env = dict(os.environ, LMCACHE_TRACK_USAGE="false", DO_NOT_TRACK="1", LMCACHE_DISABLE_BANNER="1")
        p = subprocess.run(
            [LMCACHE, "quota", *args, "--url", server.http_url, "--format", "json", "--output", out, "-q"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert p.returncode == 0, f"lmcache quota {args}: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
        with open(out) as f:
            return json.load(f)


def flat(doc: dict) -> dict:
    """Every leaf of the CLI's JSON document, by key (its nesting is the CLI's business)."""
    leaves: dict = {}

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if isinstance(x, (dict, list)):
                    walk(x)
                else:
                    leaves.setdefault(k, x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(doc)
    return leaves


@pytest.fixture(scope="module")
def server():
    srv = start_server(["--eviction-policy", "IsolatedLRU", "--l1-size-gb", "2"])
    try:
        yield srv
    finally:
        stop_and_check(srv)


def store(ctx: EngineContext, tokens: list[int], data: bytes, salt: str, rid: str) -> int:
    key = make_key(MODEL, tokens, 0, len(tokens), rid, cache_salt=salt)
    sc = store_context(ctx.client.prepare_store(key, ctx.instance_id))
    for slot in sc.slots:
        ctx.pool.write(slot, data)
    if sc.slots:
        assert ctx.client.commit_store(key, ctx.instance_id, b"") is True
    ctx.client.end_session(rid)
    return len(sc.slots)


def test_quota_cli_keeps_a_flooding_tenant_within_its_quota(server: Server, rng):
    with server.client(timeout=30) as c:
        ctx = EngineContext(c, new_iid(), MODEL, num_layers=8, hidden_dim_size=512)  # 4 MiB chunks
        assert ctx.nbytes == 4 << 20
        try:
            hot = []
            for i in range(32):
                t = fresh_tokens(rng, 256)
                d = ctx.random_chunks(rng, 1)[0]
                assert store(ctx, t, d, "tenant-b", f"b{i}") == 1
                hot.append((t, d))

            doc = quota_cli(server, "set", "tenant-a", "--limit-gb", "0.5")
            assert flat(doc).get("cache_salt") == "tenant-a", doc

            filler = ctx.random_chunks(rng, 1)[0]
            accepted = sum(store(ctx, fresh_tokens(rng, 256), filler, "tenant-a", f"a{i}") for i in range(256))
            assert accepted == 256, "tenant-a's stores fit by evicting its own chunks"

            got = flat(quota_cli(server, "get", "tenant-a"))
            assert got.get("exists") is True, got
            assert got["current_usage_gb"] <= 0.5, got
            assert got["limit_gb"] == 0.5, got
            listed = quota_cli(server, "list")
            assert "tenant-a" in json.dumps(listed), listed

            for i, (t, d) in enumerate(hot):
                key = make_key(MODEL, t, 0, 256, f"check{i}", cache_salt="tenant-b", worker_id=None, num_kv_readers=1)
                assert c.lookup_hits(key) == 1, f"tenant-b chunk {i} was evicted"
                rkey = make_key(MODEL, t, 0, 256, f"check{i}", cache_salt="tenant-b")
                resp = c.prepare_retrieve(rkey, ctx.instance_id)
                assert resp.success
                assert ctx.pool.read(retrieve_context(resp).slots[0]) == d, f"tenant-b chunk {i} changed"
                assert c.commit_retrieve(rkey, ctx.instance_id) is True
                c.end_session(f"check{i}")
            tenants = server.l1()["tenants"]
            assert tenants["tenant-b"]["evicted_objects_total"] == 0, tenants
            assert tenants["tenant-a"]["used_bytes"] <= GIB // 2, tenants

            deleted = flat(quota_cli(server, "delete", "tenant-a"))
            assert deleted.get("status") == "removed", deleted
        finally:
            ctx.close()
