"""Self-tests of the test client and the type replicas against an in-test fake ROUTER (no kvtier needed)."""

from __future__ import annotations

import threading

import msgspec
import pytest
import zmq

from kvclient import KVClient, NoReply, ProtocolError, enc, make_key
from lmcache_types import (
    NONE_HASH,
    BlockAllocationRecord,
    IPCCacheServerKey,
    PrepareRetrieveResponse,
    RegisterEngineDrivenContextPayload,
    chunk_hashes,
    kv_rank,
)


def test_key_encodes_as_map_of_all_fields_in_order():
    k = IPCCacheServerKey("m", 2, None, (1, 2, 3), 0, 256, "req1")
    b = enc(k)
    assert b[0] == 0x8A  # fixmap with 10 entries
    assert b.startswith(b"\x8a\xaamodel_name\xa1m\xaaworld_size\x02\xa9worker_id\xc0\xa9token_ids\x93\x01\x02\x03")
    d = msgspec.msgpack.decode(b)
    assert list(d) == ["model_name", "world_size", "worker_id", "token_ids", "start", "end", "request_id", "cache_salt", "request_configs", "num_kv_readers"]
    assert d["end"] == 256 and d["cache_salt"] == "" and d["request_configs"] is None and d["num_kv_readers"] == 0
    assert b == (
        b"\x8a\xaamodel_name\xa1m\xaaworld_size\x02\xa9worker_id\xc0\xa9token_ids\x93\x01\x02\x03"
        b"\xa5start\x00\xa3end\xcd\x01\x00\xaarequest_id\xa4req1"
        b"\xaacache_salt\xa0\xafrequest_configs\xc0\xaenum_kv_readers\x00"
    )


def test_payload_and_record_encoding():
    p = RegisterEngineDrivenContextPayload(7, "m", 1, 16, 2, 64, "float16", False)
    d = msgspec.msgpack.decode(enc(p))
    assert enc(p)[0] == 0x89
    assert list(d) == ["instance_id", "model_name", "world_size", "block_size", "num_layers", "hidden_dim_size", "dtype_str", "use_mla", "num_physical_slots"]
    assert d["num_physical_slots"] is None
    r = BlockAllocationRecord("r", [[1]], [2])
    assert list(msgspec.msgpack.decode(enc(r))) == ["req_id", "new_block_ids", "new_token_ids"]


def test_hash_vectors():
    assert NONE_HASH.hex() == "7e3eff9ef7613a50340eb12677ee03b83ac759fcba9bb32705f07248d56d473b"
    assert [h.hex() for h in chunk_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)] == [
        "6309ed506b8721905753f5c73c070bb21c3aafbd9b474b1e231f41368b71123c",
        "98efc76eafb06cfe774c31ff151f300b61a614c27982a211bb8cdbd83a8c0e19",
    ]
    assert [h.hex() for h in chunk_hashes(list(range(512)))] == [
        "084547b6c40ed5b05ba8cd0305db5bf74d5617673948d9ed193ab7d6cbc484d4",
        "e5ffee45c2b9db326814c9692dc594369887ba3b0df5761817820b60f864c8e0",
    ]
    assert chunk_hashes([7] + [9906] * 255)[0].hex() == "b88afa1d1488b5722a1cd80b4ba3d022f8e8954c5191e5964d8090eb0d3211c9"
    assert len(chunk_hashes(list(range(300)))) == 1
    assert kv_rank(2, 1) == 0x02010201


BARE = object()


class FakeRouter:
    """Collects `batch` requests, then answers them in reverse order with reply_fn(op, payloads):
    bytes -> [uid, op, bytes]; BARE -> [uid, op]; None -> no reply."""

    def __init__(self, reply_fn, batch: int = 1):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.url = f"tcp://127.0.0.1:{port}"
        self.reply_fn = reply_fn
        self.batch = batch
        self.seen: list[list[bytes]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        held = []
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            msg = self.sock.recv_multipart()
            self.seen.append(msg[1:])
            held.append(msg)
            if len(held) >= self.batch:
                for m in reversed(held):
                    ident, uid, op, *payloads = m
                    resp = self.reply_fn(msgspec.msgpack.decode(op), payloads)
                    if resp is BARE:
                        self.sock.send_multipart([ident, uid, op])
                    elif resp is not None:
                        self.sock.send_multipart([ident, uid, op, resp])
                held = []
        self.sock.close(0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def _reply(op, payloads):
    if op == 24:
        return enc("OK")
    if op == 21:
        return enc(256)
    if op == "noop":
        return BARE
    if op == 18:
        return enc({"success": False, "data": b"", "context": {}})
    if op == 22:
        return enc(1)  # an int where a bool is expected
    if op == 13:
        return BARE
    return None


@pytest.fixture
def fake():
    f = FakeRouter(_reply, batch=1)
    yield f
    f.close()


def test_fake_router_roundtrip(fake):
    with KVClient(fake.url, timeout=2) as c:
        assert c.noop() == "OK"
        assert c.get_chunk_size() == 256
        assert c.end_session("x") is None
        k = make_key("m", list(range(256)), 0, 256, "r")
        assert c.prepare_retrieve(k, 1) == PrepareRetrieveResponse(False, b"", {})
        with pytest.raises(ProtocolError):
            c.ping(None)  # 1 is not a bool: strict decoding
        with pytest.raises(ProtocolError):
            c.call("noop", rtype=str, op_style="str")  # bare reply where a str is required
    assert [m[0] for m in fake.seen[:3]] == [b"\x00", b"\x01", b"\x02"]
    assert [m[1] for m in fake.seen[:2]] == [b"\x18", b"\x15"]
    assert fake.seen[2] == [b"\x02", b"\x0d", enc("x")]
    assert fake.seen[3][2:] == [enc(k), b"\x01"]


def test_fake_router_out_of_order_and_timeout():
    f = FakeRouter(lambda op, p: enc("OK") if op == 24 else None, batch=4)
    try:
        with KVClient(f.url, timeout=2) as c:
            pending = [c.send("noop") for _ in range(4)]
            for uid, opf in pending:
                assert c.wait(uid, opf).payload == enc("OK")
        with KVClient(f.url, timeout=0.3) as c:
            with pytest.raises(NoReply):
                c.noop()  # the fake holds it until 4 requests arrived
    finally:
        f.close()
