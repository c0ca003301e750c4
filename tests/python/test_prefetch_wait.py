"""`wait_prefetch_status` holds no worker thread (issue #13, finding 5): many clients waiting on a
slow L2 must not delay another client's requests that run on the worker pool, and every waiter
still gets its answer (the prefix length once its prefetch is done, nil at its timeout)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from conftest import fresh_tokens, new_iid, start_server, stop_and_check, wait_until
from kvclient import EngineContext, lookup_key

MODEL = "prefetch-wait-model"
WAITERS = 8
CHUNKS = 2
TIMEOUT = 5.0


def test_waiters_hold_no_worker_and_all_get_answers(rng: np.random.Generator) -> None:
    # 128 KiB chunks through a 500 KB/s mock L2, one prefetch at a time: each waiter's 2-chunk
    # prefetch takes ~0.5 s and they queue behind each other, so the later ones time out.
    adapter = json.dumps({"type": "mock", "max_size_gb": 0.25, "mock_bandwidth_gb": 0.0005})
    srv = start_server(["--max-workers", "2", "--l2-adapter", adapter, "--l2-prefetch-max-in-flight", "1"])
    try:
        seqs = [fresh_tokens(rng, CHUNKS * 256) for _ in range(WAITERS)]
        with srv.client(timeout=30) as c:
            ctx = EngineContext(c, new_iid(), MODEL)
            for s in seqs:
                ctx.store(s, 0, CHUNKS * 256, ctx.random_chunks(rng, CHUNKS))
            assert wait_until(
                lambda: srv.status()["storage_manager"]["l2_adapters"][0]["stored_object_count"] == WAITERS * CHUNKS,
                timeout=60,
            ), "write-behind did not finish"
            c.clear(force=True)  # L1 empty: every lookup now needs L2
            ctx.close()

        answers: dict[int, tuple[int | None, float]] = {}

        def waiter(i: int) -> None:
            with srv.client(timeout=30) as w:
                rid = f"wait-{i}"
                w.lookup(lookup_key(MODEL, seqs[i], rid))
                t = time.monotonic()
                answers[i] = (w.wait_prefetch_status(rid, TIMEOUT), time.monotonic() - t)

        threads = [threading.Thread(target=waiter, args=(i,)) for i in range(WAITERS)]
        for t in threads:
            t.start()
        time.sleep(0.3)  # every waiter has sent its wait_prefetch_status
        # A lookup too big to run inline (20k tokens, > 64 KiB) goes to the worker pool: with the
        # waiters parked on the two workers it would wait seconds; now it is answered at once.
        with srv.client(timeout=30) as c:
            big = fresh_tokens(rng, 80 * 256)
            t = time.monotonic()
            c.lookup(lookup_key(MODEL, big, "big"))
            big_latency = time.monotonic() - t
            c.end_session("big")
        for t in threads:
            t.join(10)
        # Well under TIMEOUT: a waiter parked on a worker would hold the big lookup ~TIMEOUT s.
        assert big_latency < 2.5, f"a pool request waited {big_latency:.2f} s behind the waiters"
        assert len(answers) == WAITERS
        for i, (answer, took) in answers.items():
            assert answer in (None, CHUNKS), (i, answer)
            assert took < TIMEOUT + 3, (i, took)
            if answer is None:
                assert took >= TIMEOUT - 0.1, f"waiter {i} answered nil after {took:.2f} s, before its timeout"
        assert any(a == CHUNKS for a, _ in answers.values()), answers
        st = srv.status()
        assert st["transport"]["deferred_replies"] == 0
        assert st["transport"]["deferred_full_total"] == 0
    finally:
        stop_and_check(srv)
