"""Shutdown and start-up conflicts: SIGTERM exits 0 and removes the segment; a second server on the same
--shm-name fails to start, names the segment, and leaves the first server's segment alone."""

from __future__ import annotations

import os
import signal

import numpy as np

from conftest import new_iid, spawn_server, start_server, stop_and_check
from kvclient import EngineContext, lookup_key, store_context


def test_sigterm_exits_zero_and_removes_segment():
    srv = start_server()
    try:
        assert os.path.exists(srv.shm_path), f"{srv.shm_path} missing while the server runs"
        rng = np.random.default_rng(7)
        with srv.client() as c:
            ctx = EngineContext(c, new_iid(), "shutdown-model", num_layers=2, hidden_dim_size=64)
            assert ctx.reg.shm_name == srv.shm_name
            tokens = rng.integers(0, 2**31, 1024).tolist()
            data = ctx.random_chunks(rng, 4)
            ctx.store(tokens, 0, 512, data)
            assert c.lookup_hits(lookup_key(ctx.model, tokens, "r")) == 2  # leave locks and a session behind
            store_context(c.prepare_store(ctx.key(tokens, 512, 1024, "pending"), ctx.instance_id))  # and a reservation
            ctx.pool.close()  # the client still has the segment open while the server stops: that is fine
    finally:
        stop_and_check(srv)


def test_second_server_same_shm_name_fails():
    first = start_server()
    try:
        st_before = os.stat(first.shm_path)
        second = spawn_server(shm_name=first.shm_name)
        try:
            rc = second.proc.wait(timeout=20)
        except Exception:
            second.stop(signal.SIGKILL, 5)
            raise AssertionError(f"second server with --shm-name {first.shm_name} kept running:\n{second.log()[-4000:]}")
        log = second.log()
        assert rc != 0, f"second server exited 0:\n{log[-4000:]}"
        assert first.shm_name in log, f"error message does not name the segment {first.shm_name!r}:\n{log[-4000:]}"
        # the failed start must not have removed or replaced the first server's segment
        st_after = os.stat(first.shm_path)
        assert (st_after.st_ino, st_after.st_size) == (st_before.st_ino, st_before.st_size)
        with first.client() as c:
            assert c.noop() == "OK"
            ctx = EngineContext(c, new_iid(), "shutdown-model", num_layers=1, hidden_dim_size=64)
            rng = np.random.default_rng(8)
            tokens = rng.integers(0, 2**31, 256).tolist()
            data = ctx.random_chunks(rng, 1)
            assert ctx.store(tokens, 0, 256, data) == [0]
            assert c.lookup_hits(lookup_key(ctx.model, tokens, "r")) == 1
            assert ctx.retrieve(tokens, 0, 256, "r") == data
            c.end_session("r")
            ctx.close()
        try:
            os.unlink(second.log_path)
        except OSError:
            pass
    finally:
        stop_and_check(first)
