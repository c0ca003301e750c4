"""`subscribe_kv_events` on the wire, decoded with msgspec structs written from LMCache 0.5.6's
`KVEventBatch` / `KVEventRecord`: the stream's framing (first batch at once, one batch per
`ack`, a bare reply ends it), `cancel`, refusals, and control frames for unknown streams."""

from __future__ import annotations

import msgspec
import numpy as np

from conftest import Server, fresh_tokens, new_iid
from kvclient import EngineContext, KVClient, enc, op_frame

MODEL = "kve-wire-model"


class Record(msgspec.Struct):
    seq: int
    kind: str
    medium: str
    model_name: str
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]


class Batch(msgspec.Struct):
    enabled: bool
    incarnation: int
    next_cursor: int
    lost: bool
    events: list[Record]


DEC = msgspec.msgpack.Decoder(Batch)


def subscribe(c: KVClient, iid: int, cursor: int = 0, max_events: int = 64) -> tuple[bytes, bytes]:
    return c.send("subscribe_kv_events", iid, MODEL, cursor, max_events)


def next_msg(c: KVClient, uid: bytes, timeout: float = 5.0) -> list[bytes]:
    frames = c.recv_any(timeout)
    assert frames is not None, "no stream message"
    assert frames[0] == uid, frames
    return frames


def ack(c: KVClient, uid: bytes, what: bytes = b"ack") -> None:
    c.send_frames([uid, b"", what])


def test_stream_framing_ack_credit_and_cancel(server: Server, rng: np.random.Generator) -> None:
    with server.client() as c, server.client() as w:
        uid, opf = subscribe(c, new_iid())
        first = next_msg(c, uid)
        assert first[1] == opf == enc("subscribe_kv_events")
        b = DEC.decode(first[2])
        assert b.enabled and not b.lost and b.events == [] and b.next_cursor >= 0

        ctx = EngineContext(w, new_iid(), MODEL, num_layers=2, hidden_dim_size=64)
        tokens = fresh_tokens(rng, 2 * 256)
        ctx.store(tokens, 0, 512, ctx.random_chunks(rng, 2))
        # No credit yet: nothing is sent until the client acks.
        c.expect_no_reply(0.3)
        ack(c, uid)
        b = DEC.decode(next_msg(c, uid)[2])
        assert [(e.kind, e.medium, e.model_name, e.token_ids) for e in b.events] == [
            ("stored", "CPU", MODEL, list(tokens[:256])),
            ("stored", "CPU", MODEL, list(tokens[256:])),
        ]
        assert b.events[1].parent_block_hash == b.events[0].block_hashes[0]
        assert b.next_cursor == b.events[-1].seq
        # Cancel ends the stream with a bare reply.
        ack(c, uid)
        ack(c, uid, b"cancel")
        end = next_msg(c, uid)
        assert end == [uid, opf], end
        ctx.close()
        st = server.status()["kv_events"]
        assert st["subscribers"] == 0 and st["stored_total"] >= 2


def test_refused_subscriptions_end_at_once_and_stray_controls_get_no_reply(server: Server) -> None:
    with server.client() as c:
        for cursor, max_events in ((0, 0), (0, 1025), (-1, 8)):
            uid, opf = subscribe(c, new_iid(), cursor, max_events)
            assert next_msg(c, uid) == [uid, opf], (cursor, max_events)
        # A control frame for a stream that is not open is dropped silently.
        ack(c, enc(424242))
        ack(c, enc(424243), b"cancel")
        c.expect_no_reply(0.3)
        assert c.noop() == "OK"
        # Both op encodings open a stream (the op has no legacy id, so "int" style sends the str).
        uid = enc(999)
        c.send_frames([uid, op_frame("subscribe_kv_events", "str"), enc(new_iid()), enc(MODEL), enc(0), enc(4)])
        assert DEC.decode(next_msg(c, uid)[2]).enabled is True
        ack(c, uid, b"cancel")
        assert len(next_msg(c, uid)) == 2
