"""Every op of a request carries its whole token list; kvtier reuses the ids it decoded for the
request's earlier ops (`kvtier_proto::TokenArrays`). Through the wire: a long prompt's store,
lookup and retrieve reuse the decoded list (`rpc.token_arrays.hits_total`), a grown prompt reuses its
start (`prefix_hits_total`), and two prompts that differ in one id in the middle (same length, same
last bytes) never share ids: each retrieves its own bytes."""

from __future__ import annotations

import re
import urllib.request

from conftest import Server, fresh_tokens, new_iid
from kvclient import EngineContext, lookup_key

MODEL = "token-array-model"
PROMPT = 8192


def token_arrays(server: Server) -> dict:
    return server.status()["rpc"]["token_arrays"]


def test_ops_of_one_request_reuse_its_token_ids(server: Server, rng):
    before = token_arrays(server)
    with server.client(timeout=10) as c:
        ctx = EngineContext(c, new_iid(), MODEL, num_layers=1, hidden_dim_size=8, dtype_str="float16")
        try:
            tokens = fresh_tokens(rng, PROMPT)
            data = ctx.random_chunks(rng, 5)
            # prepare_store decodes the 8192 ids; commit_store sends the same list.
            assert ctx.store(tokens, 0, 1024, data, "r1") == [0, 1, 2, 3]
            assert c.lookup_hits(lookup_key(MODEL, tokens, "r1", end=1024)) == 4
            assert ctx.retrieve(tokens, 0, 1024, "r1") == data[:4]
            mid = token_arrays(server)
            assert mid["hits_total"] >= before["hits_total"] + 4, (before, mid)

            # The prompt grows by one chunk: its start is reused, the new ids decoded.
            grown = tokens + fresh_tokens(rng, 256)
            assert ctx.store(grown, 1024, 1280, data, "r1") == [0]
            after = token_arrays(server)
            assert after["prefix_hits_total"] >= mid["prefix_hits_total"] + 1, (mid, after)
            assert c.lookup_hits(lookup_key(MODEL, grown, "r1", end=1280)) == 5
            assert ctx.retrieve(grown, 0, 1280, "r1") == data[:5]
            c.end_session("r1")

            # Same length, same tail, one id apart in the middle: separate ids, separate data.
            other = list(tokens)
            other[100] = (other[100] + 1) % 100_000
            other_data = ctx.random_chunks(rng, 4)
            assert ctx.store(other, 0, 1024, other_data, "r2") == [0, 1, 2, 3]
            assert c.lookup_hits(lookup_key(MODEL, other, "r2", end=1024)) == 4
            assert ctx.retrieve(other, 0, 1024, "r2") == other_data
            assert c.lookup_hits(lookup_key(MODEL, tokens, "r3", end=1024)) == 4
            assert ctx.retrieve(tokens, 0, 1024, "r3") == data[:4]
            c.end_session("r2")
            c.end_session("r3")
        finally:
            ctx.close()
    final = token_arrays(server)
    assert final["entries"] <= final["max_entries"]
    assert final["bytes"] <= final["max_bytes"]
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^kvtier_rpc_token_arrays_hits_total (\d+)$", text, re.M)
    assert m and int(m.group(1)) >= final["hits_total"], text[:2000]
