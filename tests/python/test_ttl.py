"""Sessions and lookup read locks expire on their own (--session-ttl-seconds, --l1-read-ttl-seconds)
when a client never sends end_session / commit_retrieve; store reservations past their write TTL
(--l1-write-ttl-seconds) are quarantined until their writer returns
(--l1-write-quarantine-fraction)."""

from __future__ import annotations

import time
import urllib.request

import pytest

from conftest import Server, fresh_tokens, new_iid, start_server, stop_and_check, wait_until
from kvclient import EngineContext, lookup_key, store_context

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


WRITE_TTL = 1


@pytest.fixture(scope="module")
def wserver():
    srv = start_server(["--l1-write-ttl-seconds", str(WRITE_TTL)])
    try:
        yield srv
    finally:
        stop_and_check(srv)


def _metrics(srv: Server) -> str:
    with urllib.request.urlopen(srv.http_url + "/metrics", timeout=5) as r:
        return r.read().decode()


def test_a_late_writer_cannot_overwrite_the_next_writers_chunks(wserver: Server, rng):
    """Issue #13 finding 8: A's store reservation expires uncommitted, B stores the same chunks
    and commits, then A writes its old slots and commits. B's bytes must be what lookups serve,
    A's commit must answer false, and A's memory must not have been handed to B meanwhile."""
    with wserver.client() as ca, wserver.client() as cb:
        a = EngineContext(ca, new_iid(), MODEL, num_layers=1, hidden_dim_size=64)
        b = EngineContext(cb, new_iid(), MODEL, num_layers=1, hidden_dim_size=64)
        try:
            tokens = fresh_tokens(rng, 768)
            key_a = a.key(tokens, 0, 768, "writer-a")
            prep_a = store_context(ca.prepare_store(key_a, a.instance_id))
            assert prep_a.chunk_indices == [0, 1, 2]
            base = wserver.l1()
            # A stalls past its write TTL until the eviction thread's expiry pass (every 0.1 s)
            # has quarantined its memory (polled: a loaded machine can delay that pass).
            time.sleep(WRITE_TTL)
            assert wait_until(lambda: wserver.l1()["quarantined_objects"] == 3, timeout=15), wserver.l1()
            held = wserver.l1()

            # B stores the same chunks: the keys are free again, A's memory is not.
            data_b = b.random_chunks(rng, 3)
            key_b = b.key(tokens, 0, 768, "writer-b")
            prep_b = store_context(cb.prepare_store(key_b, b.instance_id))
            assert prep_b.chunk_indices == [0, 1, 2]
            a_ranges = [(s.offset, s.offset + s.length) for s in prep_a.slots]
            for s in prep_b.slots:
                assert all(s.offset + s.length <= lo or s.offset >= hi for lo, hi in a_ranges), \
                    f"B got A's memory: {s} overlaps {a_ranges}"
                b.pool.write(s, data_b[prep_b.slots.index(s)])
            assert cb.commit_store(key_b, b.instance_id) is True

            # A comes back: writes its old slots, commits. False, and B's chunks are untouched.
            for s in prep_a.slots:
                a.pool.write(s, b"\xa5" * s.length)
            assert ca.commit_store(key_a, a.instance_id) is False
            assert cb.lookup_hits(lookup_key(MODEL, tokens, "reader")) == 3
            assert b.retrieve(tokens, 0, 768, "reader") == data_b
            cb.end_session("reader")

            # Meanwhile A's memory was quarantined (no longer write-locked), and A's commit freed it.
            obj_bytes = -(-a.nbytes // 4096) * 4096
            assert held["quarantined_objects"] == 3 and held["quarantined_bytes"] == 3 * obj_bytes, held
            assert held["write_locked_count"] == 0
            l1 = wserver.l1()
            assert l1["quarantined_objects"] == 0 and l1["quarantined_bytes"] == 0
            assert l1["quarantine_released_total"] == base["quarantine_released_total"] + 3
            assert l1["quarantine_forced_reuses_total"] == base["quarantine_forced_reuses_total"]
            text = _metrics(wserver)
            for name in ("kvtier_l1_quarantined_objects", "kvtier_l1_quarantined_bytes",
                         "kvtier_l1_quarantine_released_total", "kvtier_l1_quarantine_forced_reuses_total"):
                assert f"\n{name}" in text, name
        finally:
            a.close()
            b.close()


def test_unregistering_the_late_writer_frees_its_quarantine(wserver: Server, rng):
    with wserver.client() as c:
        a = EngineContext(c, new_iid(), MODEL, num_layers=1, hidden_dim_size=64)
        try:
            tokens = fresh_tokens(rng, 512)
            prep = store_context(c.prepare_store(a.key(tokens, 0, 512, "stall"), a.instance_id))
            assert len(prep.slots) == 2
            assert wait_until(lambda: wserver.l1()["quarantined_objects"] == 2, timeout=WRITE_TTL + 5, interval=0.1)
        finally:
            a.close()  # unregisters: its reservations are its own to give back
        assert wait_until(lambda: wserver.l1()["quarantined_objects"] == 0, timeout=5)


def test_a_zero_quarantine_budget_reuses_expired_memory_at_once(rng):
    srv = start_server(["--l1-write-ttl-seconds", str(WRITE_TTL), "--l1-write-quarantine-fraction", "0"])
    try:
        assert srv.l1()["quarantine_budget_bytes"] == 0
        with srv.client() as c:
            a = EngineContext(c, new_iid(), MODEL, num_layers=1, hidden_dim_size=64)
            try:
                tokens = fresh_tokens(rng, 256)
                key_a = a.key(tokens, 0, 256, "a")
                assert len(store_context(c.prepare_store(key_a, a.instance_id)).slots) == 1
                assert wait_until(lambda: srv.l1()["quarantine_forced_reuses_total"] == 1, timeout=WRITE_TTL + 5, interval=0.1)
                assert srv.l1()["quarantined_objects"] == 0
                # The late commit still fails: a half-written object never becomes readable.
                assert c.commit_store(key_a, a.instance_id) is False
            finally:
                a.close()
    finally:
        stop_and_check(srv)
