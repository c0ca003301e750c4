"""Sessions and lookup read locks expire on their own (--session-ttl-seconds, --l1-read-ttl-seconds)
when a client never sends end_session / commit_retrieve."""

from __future__ import annotations

import pytest

from conftest import Server, fresh_tokens, new_iid, start_server, stop_and_check, wait_until
from kvclient import EngineContext, lookup_key

TTL = 2
MODEL = "ttl-model"


@pytest.fixture(scope="module")
def server():
    srv = start_server(["--session-ttl-seconds", str(TTL), "--l1-read-ttl-seconds", str(TTL)])
    try:
        yield srv
    finally:
        stop_and_check(srv)


def test_abandoned_lookup_locks_and_session_expire(server: Server, rng):
    with server.client() as c:
        ctx = EngineContext(c, new_iid(), MODEL, num_layers=1, hidden_dim_size=64)
        try:
            tokens = fresh_tokens(rng, 768)
            data = ctx.random_chunks(rng, 3)
            ctx.store(tokens, 0, 768, data, request_id="s")
            c.end_session("s")
            assert c.lookup_hits(lookup_key(MODEL, tokens, "abandoned")) == 3
            assert server.l1()["read_locked_count"] == 3
            assert server.status()["active_sessions"] >= 1
            # never ended: both the locks and the session must go away by themselves
            ok = wait_until(lambda: server.l1()["read_locked_count"] == 0 and server.status()["active_sessions"] == 0, timeout=TTL + 8, interval=0.2)
            assert ok, f"after {TTL + 8}s: {server.status()}"
            assert ctx.retrieve(tokens, 0, 768, "abandoned") is None
            c.end_session("abandoned")
            # the data itself is still there
            assert c.lookup_hits(lookup_key(MODEL, tokens, "again")) == 3
            assert ctx.retrieve(tokens, 0, 768, "again") == data
            c.end_session("again")
            assert server.l1()["read_locked_count"] == 0
        finally:
            ctx.close()
