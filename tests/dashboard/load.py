"""Drives a live kvtier server like a small inference engine would, for the dashboard test and
its screenshots: registers an engine-driven context, then loops lookup -> retrieve the hit prefix
-> store the rest -> end_session over a pool of prompts (so the hit rate climbs as the pool
fills; a fraction of requests bring a new prompt, so stores and L1 eviction go on), through the
real ZeroMQ socket and shared memory.

Usage: load.py RPC_URL SECONDS [--prompts N] [--chunks N] [--fresh P]
Prints one JSON line with totals at the end; exits non-zero on any protocol error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

from kvclient import EngineContext, KVClient, lookup_key  # noqa: E402
from lmcache_types import CHUNK_SIZE  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("rpc_url")
    ap.add_argument("seconds", type=float)
    ap.add_argument("--prompts", type=int, default=48, help="distinct prompts in the pool")
    ap.add_argument("--chunks", type=int, default=4, help="chunks per prompt")
    ap.add_argument("--fresh", type=float, default=0.2, help="probability that a request brings a new prompt")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    model = "dashboard-load"
    n_tokens = args.chunks * CHUNK_SIZE
    def new_prompt() -> tuple[int, ...]:
        return tuple(int(t) for t in rng.integers(0, 50_000, n_tokens))

    prompts = [new_prompt() for _ in range(args.prompts)]
    totals = {"requests": 0, "stored_chunks": 0, "retrieved_chunks": 0, "hit_chunks": 0}
    with KVClient(args.rpc_url) as client:
        # 2 x 8 layers x 256 slots x 256 hidden x fp16 = 2 MiB per chunk object.
        ctx = EngineContext(client, instance_id=4242, model=model, num_layers=8, hidden_dim_size=256)
        payload = np.full(ctx.nbytes, 0x5A, dtype=np.uint8).tobytes()
        deadline = time.monotonic() + args.seconds
        i = 0
        try:
            while time.monotonic() < deadline:
                i += 1
                slot = int(rng.integers(0, len(prompts)))
                if rng.random() < args.fresh:
                    prompts[slot] = new_prompt()
                tokens = prompts[slot]
                rid = f"load-{i}"
                client.ping(ctx.instance_id)
                hits = client.lookup_hits(lookup_key(model, tokens, rid))
                totals["hit_chunks"] += hits
                if hits > 0:
                    got = ctx.retrieve(tokens, 0, hits * CHUNK_SIZE, rid)
                    if got is not None:
                        totals["retrieved_chunks"] += len(got)
                if hits < args.chunks:
                    stored = ctx.store(tokens, hits * CHUNK_SIZE, n_tokens, [payload] * args.chunks, request_id=rid)
                    totals["stored_chunks"] += len(stored)
                client.end_session(rid)
                totals["requests"] += 1
                time.sleep(0.01)
        finally:
            ctx.close(unregister=False)
    print(json.dumps(totals), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
