"""KV events against `kvtier serve`, read with LMCache 0.5.6's own RequestClient.

Runs in the lmcache==0.5.6 virtualenv (scripts/lmcache-venv). Stores go through kvtier's wire
protocol from a small raw client (engine-driven prepare/commit, lmcache_driven register/store),
and the subscription is LMCache's `RequestClientFactory.create(url).subscribe_kv_events(...)`,
the call vLLM's MP adapter makes. Chunk hashes are checked against the blake3 prefix chain.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import blake3
import msgspec
import pytest
import zmq

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from lmcache.v1.multiprocess.transport.factory import RequestClientFactory  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "python"))
from ports import free_port  # noqa: E402  (stdlib only)

CHUNK = 256
MODEL = "kv-events-model"
LAYERS, HIDDEN = 2, 64  # engine-driven slots: 2 * LAYERS * CHUNK * HIDDEN * 2 B = 128 KiB
NB, BS, HS = 64, 16, 32  # lmcache_driven MLA cache [NB, BS, HS], one layer
OPS = {  # LMCache 0.5.6 legacy wire ids
    "register_kv_cache": 1,
    "store": 6,
    "register_kv_cache_engine_driven_context": 14,
    "prepare_store": 16,
    "commit_store": 17,
    "clear": 20,
    "get_chunk_size": 21,
}
_seq = itertools.count()
NONE_HASH = blake3.blake3(b"\x00" * 12).digest()


def chain(tokens: list[int]) -> list[bytes]:
    """LMCache's blake3 prefix chain over full chunks."""
    out, prefix = [], NONE_HASH
    for i in range(0, len(tokens) - len(tokens) % CHUNK, CHUNK):
        h = blake3.blake3(prefix)
        h.update(struct.pack(f">{CHUNK}I", *tokens[i:i + CHUNK]))
        prefix = h.digest()
        out.append(prefix)
    return out


def kvtier_bin() -> str:
    b = os.environ.get("KVTIER_BIN") or str(REPO / "target" / "debug" / "kvtier")
    if not os.access(b, os.X_OK):
        pytest.fail(f"kvtier binary {b} not found: build it or set KVTIER_BIN")
    return b


class Raw:
    """A minimal DEALER client for the stores (msgspec encoding, typed like LMCache's)."""

    def __init__(self, url: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self.uids = itertools.count()

    def call(self, op: str, *payloads: Any, timeout: float = 10.0) -> Any:
        uid = msgspec.msgpack.encode(next(self.uids))
        self.sock.send_multipart([uid, msgspec.msgpack.encode(OPS[op])] + [msgspec.msgpack.encode(p) for p in payloads])
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.sock.poll(int(left * 1000) + 1), f"no reply to {op}"
            frames = self.sock.recv_multipart()
            if frames[0] == uid:
                return msgspec.msgpack.decode(frames[2]) if len(frames) == 3 else None

    def close(self) -> None:
        self.sock.close(linger=0)


def key(tokens: list[int], start: int, end: int, rid: str, worker: int | None = 0) -> dict:
    return {"model_name": MODEL, "world_size": 1, "worker_id": worker, "token_ids": tokens, "start": start,
            "end": end, "request_id": rid, "cache_salt": "", "request_configs": None, "num_kv_readers": 1}


class Server:
    def __init__(self, *extra: str):
        self.port, self.http_port = free_port(), free_port()
        self.shm = f"kvtier_kve_{os.getpid()}_{next(_seq)}"
        fd, self.log_path = tempfile.mkstemp(prefix="kvtier-kve-", suffix=".log")
        args = [kvtier_bin(), "serve", "--port", str(self.port), "--http-port", str(self.http_port),
                "--l1-size-gb", "0.0625", "--shm-name", self.shm, "--chunk-size", str(CHUNK),
                "--no-l1-prefault", "--max-workers", "2", *extra]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd)
        os.close(fd)
        self.url = f"tcp://127.0.0.1:{self.port}"
        raw = Raw(self.url)
        try:
            deadline = time.monotonic() + 20
            while True:
                assert self.proc.poll() is None, Path(self.log_path).read_text()[-3000:]
                try:
                    assert raw.call("get_chunk_size", timeout=0.3) == CHUNK
                    break
                except AssertionError:
                    assert time.monotonic() < deadline, "server not ready"
        finally:
            raw.close()

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/api/status", timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        os.unlink(self.log_path)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


def next_batch(stream, timeout: float = 10.0):
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(next, stream).result(timeout=timeout)


def engine_driven_store(raw: Raw, iid: int, tokens: list[int], rid: str, new_chunks: int | None = None) -> None:
    resp = raw.call("register_kv_cache_engine_driven_context", {
        "instance_id": iid, "model_name": MODEL, "world_size": 1, "block_size": 16, "num_layers": LAYERS,
        "hidden_dim_size": HIDDEN, "dtype_str": "float16", "use_mla": False, "num_physical_slots": None})
    assert resp["pool_size"] > 0
    k = key(tokens, 0, len(tokens) - len(tokens) % CHUNK, rid)
    prep = raw.call("prepare_store", k, iid)
    if new_chunks is not None:
        assert len(prep["context"]["slots"]) == new_chunks
    assert raw.call("commit_store", k, iid, b"") is True


class Segment:
    def __init__(self, nbytes: int):
        # LMCache clients name their KV segments /lmcache_kv_<pid>_<n>; the server maps no other.
        self.name = f"lmcache_kv_{os.getpid()}_{next(_seq)}"
        fd = os.open(f"/dev/shm/{self.name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, nbytes)
        os.close(fd)

    def unlink(self) -> None:
        os.unlink(f"/dev/shm/{self.name}")


def lmcache_driven_store(raw: Raw, iid: int, tokens: list[int], rid: str) -> None:
    seg = Segment(NB * BS * HS * 2)
    try:
        body = {"type": "cpu_shm", "shm_name": "/" + seg.name, "nbytes": NB * BS * HS * 2, "version": 1,
                "metadata": {"dtype": "float16", "shape": [NB, BS, HS], "stride": [BS * HS, HS, 1],
                             "storage_offset": 0, "device_uuid": "cpu"}}
        ext = msgspec.msgpack.Ext(1, msgspec.msgpack.encode(body))
        assert raw.call("register_kv_cache", iid, [ext], MODEL, 1, "vllm", {}, []) is None
        chunks = len(tokens) // CHUNK
        blocks = list(range(1, 1 + chunks * (CHUNK // BS)))
        handle, ok = raw.call("store", key(tokens, 0, chunks * CHUNK, rid), iid, [blocks], b"")
        assert ok, "lmcache_driven store failed"
    finally:
        seg.unlink()


def test_capability_status_batch_and_stored_records_from_both_paths_and_removals(server: Server) -> None:
    client = RequestClientFactory.create(server.url)
    raw = Raw(server.url)
    try:
        assert client.get_experimental().result(timeout=10) == ["kv_event_stream"]
        stream = client.subscribe_kv_events(7, MODEL, 0, 64)
        first = next_batch(stream)
        assert first.enabled is True and first.lost is False and first.events == []
        incarnation = first.incarnation

        ed_tokens = list(range(1000, 1000 + 2 * CHUNK))
        engine_driven_store(raw, 1, ed_tokens, "ed", new_chunks=2)
        batch = next_batch(stream)
        assert batch.incarnation == incarnation and not batch.lost
        hashes = chain(ed_tokens)
        assert [(e.kind, e.medium, e.model_name) for e in batch.events] == [("stored", "CPU", MODEL)] * 2
        assert [e.block_hashes for e in batch.events] == [[h] for h in hashes]
        assert [e.parent_block_hash for e in batch.events] == [None, hashes[0]]
        assert [e.token_ids for e in batch.events] == [ed_tokens[:CHUNK], ed_tokens[CHUNK:]]

        lmd_tokens = list(range(5000, 5000 + CHUNK))
        lmcache_driven_store(raw, 2, lmd_tokens, "lmd")
        batch = next_batch(stream)
        assert [(e.kind, e.block_hashes, e.token_ids) for e in batch.events] == [
            ("stored", chain(lmd_tokens), lmd_tokens)]

        raw.call("clear", True)
        removed: set[bytes] = set()
        while len(removed) < 3:
            batch = next_batch(stream)
            assert all(e.kind == "removed" for e in batch.events), batch
            removed.update(h for e in batch.events for h in e.block_hashes)
        assert removed == set(hashes) | set(chain(lmd_tokens))

        # Eviction under pressure: a 64 MiB L1 of 128 KiB objects holds 512; store 700.
        many = list(range(100_000, 100_000 + 700 * CHUNK))
        for i in range(0, 700, 50):
            engine_driven_store(raw, 1, many[: (i + 50) * CHUNK], f"fill-{i}")
        stored, evicted = set(), set()
        deadline = time.monotonic() + 30
        while len(stored) < 700 or not evicted:
            assert time.monotonic() < deadline, (len(stored), len(evicted))
            for e in next_batch(stream).events:
                (stored if e.kind == "stored" else evicted).update(e.block_hashes)
        assert evicted and evicted <= stored
        kv = server.status()["kv_events"]
        assert kv["enabled"] is True and kv["subscribers"] == 1 and kv["removed_total"] >= 3 + len(evicted)
        stream.close()
    finally:
        raw.close()
        client.close()


def test_a_subscriber_behind_the_log_gets_lost_and_a_restart_changes_the_incarnation() -> None:
    srv = Server("--kv-event-log-size", "4")
    try:
        raw = Raw(srv.url)
        engine_driven_store(raw, 1, list(range(10 * CHUNK)), "ten")
        raw.close()
        client = RequestClientFactory.create(srv.url)
        stream = client.subscribe_kv_events(3, MODEL, 1, 64)
        batch = next_batch(stream)
        assert batch.lost is True, "records 2..6 fell off a 4-record log"
        assert [e.seq for e in batch.events] == [7, 8, 9, 10]
        assert batch.next_cursor == 10
        incarnation = batch.incarnation
        # A new subscription for the same instance closes the old stream.
        again = client.subscribe_kv_events(3, MODEL, 10, 64)
        assert next_batch(again).lost is False
        with pytest.raises(StopIteration):
            next_batch(stream)
        again.close()
        client.close()
    finally:
        srv.stop()
    srv = Server("--kv-event-log-size", "4")
    try:
        client = RequestClientFactory.create(srv.url)
        batch = next_batch(client.subscribe_kv_events(3, MODEL, 10, 64))
        assert batch.incarnation != incarnation and batch.lost is True
        client.close()
    finally:
        srv.stop()


def test_disabled_events_say_so_and_end_the_stream() -> None:
    srv = Server("--kv-event-log-size", "0")
    try:
        client = RequestClientFactory.create(srv.url)
        assert client.get_experimental().result(timeout=10) == []
        stream = client.subscribe_kv_events(1, MODEL, 0, 16)
        assert next_batch(stream).enabled is False
        with pytest.raises(StopIteration):
            next_batch(stream)
        client.close()
    finally:
        srv.stop()
