"""lmcache_driven transfers over CPU shared memory, checked byte for byte.

An engine registers its paged KV cache (one POSIX shared-memory tensor per layer, msgpack ext type 1
`cpu_shm` descriptors exactly as LMCache 0.5.6 sends them); `store`/`retrieve` then name engine
blocks and the server gathers/scatters them. The tests store through one transfer path and read
through the other (engine-driven slots in the server's L1 segment), in every supported KV layout,
and check every byte, including the bytes that must *not* change (skip_first_n_tokens, other blocks).

Self-contained: pyzmq, msgspec and numpy only. The server binary comes from $KVTIER_BIN
(default: target/debug/kvtier); a missing binary is a test failure, not a skip.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import msgspec
import numpy as np
import pytest
import zmq

from ports import free_port

REPO = Path(__file__).resolve().parents[2]
CHUNK = 256
MODEL = "lmd-test-model"
STUB = b"stub_ipc_handle"

# Engine geometry used throughout: small enough to be quick, large enough for multi-block chunks.
LAYERS, NB, BS, NH, HS = 4, 128, 16, 2, 32
BPC = CHUNK // BS  # engine blocks per chunk

OPS = {
    "register_kv_cache": 1,
    "unregister_kv_cache": 2,
    "store": 6,
    "retrieve": 7,
    "lookup": 8,
    "query_prefetch_status": 9,
    "end_session": 13,
    "register_kv_cache_engine_driven_context": 14,
    "unregister_kv_cache_engine_driven_context": 15,
    "prepare_store": 16,
    "commit_store": 17,
    "prepare_retrieve": 18,
    "commit_retrieve": 19,
    "get_chunk_size": 21,
    "ping": 22,
}

_seq = itertools.count()


def uniq(tag: str) -> str:
    return f"kvtier_lmd_{tag}_{os.getpid()}_{next(_seq)}"


def lmcache_shm_name() -> str:
    """A segment name of LMCache's form (/lmcache_kv_<pid>_<n>, the only one registration maps),
    unique to this process."""
    return f"lmcache_kv_{os.getpid()}_{700_000 + next(_seq)}"


# --------------------------------------------------------------------------------------------
# Wire types (LMCache 0.5.6 shapes; msgspec encodes Structs as maps in declaration order)
# --------------------------------------------------------------------------------------------


class Key(msgspec.Struct):
    model_name: str
    world_size: int
    worker_id: int | None
    token_ids: list[int]
    start: int
    end: int
    request_id: str
    cache_salt: str = ""
    request_configs: dict | None = None
    num_kv_readers: int = 0


class EngineGroupInfo(msgspec.Struct):
    engine_group_id: int
    layer_indices: list[int]
    tokens_per_block: int = 0
    sw_size_tokens: int = -1
    extra_object_group_tag: int = 0


class RegisterEngineDriven(msgspec.Struct):
    instance_id: int
    model_name: str
    world_size: int
    block_size: int
    num_layers: int
    hidden_dim_size: int
    dtype_str: str
    use_mla: bool
    num_physical_slots: int | None = None


class Slot(msgspec.Struct):
    offset: int
    length: int
    shape: list[int]
    dtype: str


class SlotsContext(msgspec.Struct):
    slots: list[Slot]
    chunk_indices: list[int] = []


class PrepareStoreResponse(msgspec.Struct):
    context: SlotsContext


class PrepareRetrieveResponse(msgspec.Struct):
    success: bool
    data: bytes
    context: dict


def cpu_shm_ext(shm_name: str, nbytes: int, dtype: str, shape, stride, offset: int) -> msgspec.msgpack.Ext:
    """A cpu_shm DeviceIPCWrapper as LMCache 0.5.6 puts it on the wire (lmcache-observed.md 5.4)."""
    body = {
        "type": "cpu_shm",
        "shm_name": shm_name,
        "nbytes": nbytes,
        "version": 1,
        "metadata": {
            "dtype": dtype,
            "shape": list(shape),
            "stride": list(stride),
            "storage_offset": offset,
            "device_uuid": "cpu",
        },
    }
    return msgspec.msgpack.Ext(1, msgspec.msgpack.encode(body))


def other_ext(kind: str) -> msgspec.msgpack.Ext:
    body = {
        "type": kind,
        "version": 1,
        "metadata": {"dtype": "float16", "shape": [2, NB, BS, NH, HS], "stride": [1, 1, 1, 1, 1],
                     "storage_offset": 0, "device_uuid": "GPU-0"},
        "handle": [0, b"\x00" * 64, 1024, 0, b"", 0, b"", False],
    }
    return msgspec.msgpack.Ext(1, msgspec.msgpack.encode(body))


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


class NoReply(AssertionError):
    pass


class Client:
    def __init__(self, url: str, timeout: float = 10.0):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self.timeout = timeout
        self.uids = itertools.count()

    def close(self) -> None:
        self.sock.close(linger=0)

    def call(self, op: str, *payloads: Any, rtype: Any = Any) -> Any:
        uid = msgspec.msgpack.encode(next(self.uids))
        opf = msgspec.msgpack.encode(OPS[op])
        self.sock.send_multipart([uid, opf] + [msgspec.msgpack.encode(p) for p in payloads])
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                raise NoReply(f"no reply to {op} within {self.timeout}s")
            frames = self.sock.recv_multipart()
            if frames[0] == uid:
                break
        assert frames[1] == opf, f"{op}: op frame echoed as {frames[1]!r}"
        if len(frames) == 2:
            return None
        assert len(frames) == 3, f"{op}: {len(frames)} frames"
        return msgspec.msgpack.decode(frames[2], type=rtype)

    # typed helpers
    def store(self, key: Key, iid: int, block_ids, handle: bytes = STUB) -> tuple[bytes, bool]:
        h, ok = self.call("store", key, iid, block_ids, handle, rtype=tuple[bytes, bool])
        return h, ok

    def retrieve(self, key: Key, iid: int, block_ids, skip: int = 0, handle: bytes = STUB) -> tuple[bytes, bool]:
        h, ok = self.call("retrieve", key, iid, block_ids, handle, skip, rtype=tuple[bytes, bool])
        return h, ok

    def lookup(self, key: Key) -> int:
        assert self.call("lookup", key, 1) is None
        return self.call("query_prefetch_status", key.request_id, rtype=int)


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


def kvtier_bin() -> str:
    b = os.environ.get("KVTIER_BIN") or str(REPO / "target" / "debug" / "kvtier")
    if not os.access(b, os.X_OK):
        pytest.fail(f"kvtier binary {b!r} is not executable: build it (cargo build -p kvtier) or set KVTIER_BIN")
    return b


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    http_port: int
    shm_name: str
    log_path: str
    l1: mmap.mmap | None = None
    clients: list[Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def client(self) -> Client:
        c = Client(self.url)
        self.clients.append(c)
        return c

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def status(self) -> dict:
        code, body = self.http("GET", "/status")
        assert code == 200
        return body

    def lmd(self) -> dict:
        return self.status()["lmcache_driven"]

    def maps(self) -> str:
        return Path(f"/proc/{self.proc.pid}/maps").read_text()

    def read_l1(self, offset: int, length: int) -> bytes:
        if self.l1 is None:
            fd = os.open(f"/dev/shm/{self.shm_name}", os.O_RDWR)
            try:
                self.l1 = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
        return self.l1[offset:offset + length]

    def write_l1(self, offset: int, data: bytes) -> None:
        self.read_l1(0, 0)
        assert self.l1 is not None
        self.l1[offset:offset + len(data)] = data


def start_server(*extra: str) -> Server:
    port, http_port = free_port(), free_port()
    shm = uniq("l1")
    fd, log_path = tempfile.mkstemp(prefix="kvtier-lmd-", suffix=".log")
    args = [kvtier_bin(), "serve", "--host", "127.0.0.1", "--port", str(port), "--http-port", str(http_port),
            "--l1-size-gb", "0.25", "--shm-name", shm, "--chunk-size", str(CHUNK), "--max-workers", "2", *extra]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env={**os.environ, "NO_COLOR": "1"})
    os.close(fd)
    srv = Server(proc, port, http_port, shm, log_path)
    c = Client(srv.url, timeout=0.25)
    deadline = time.monotonic() + 20
    try:
        while True:
            assert proc.poll() is None, f"server exited during start-up:\n{srv.log()[-3000:]}"
            try:
                assert c.call("get_chunk_size", rtype=int) == CHUNK
                break
            except NoReply:
                assert time.monotonic() < deadline, f"server not ready:\n{srv.log()[-3000:]}"
    finally:
        c.close()
    return srv


def stop_server(srv: Server) -> None:
    for c in srv.clients:
        c.close()
    if srv.l1 is not None:
        srv.l1.close()
    srv.proc.terminate()
    try:
        rc = srv.proc.wait(15)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait()
        raise AssertionError(f"server did not stop on SIGTERM:\n{srv.log()[-3000:]}")
    assert rc == 0, f"server exit code {rc}:\n{srv.log()[-3000:]}"
    assert "panicked" not in srv.log(), srv.log()[-3000:]
    os.unlink(srv.log_path)


@pytest.fixture(scope="module")
def lmd_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    srv = start_server()
    failed = request.session.testsfailed
    try:
        yield srv
    finally:
        if request.session.testsfailed > failed:
            print(f"--- kvtier server log (tail) ---\n{srv.log()[-8000:]}")
        stop_server(srv)


@pytest.fixture
def cli(lmd_server: Server) -> Client:
    return lmd_server.client()


# --------------------------------------------------------------------------------------------
# Engine KV caches in POSIX shared memory
# --------------------------------------------------------------------------------------------

# name -> (shape, hint); "strided" is flash-attn NHD with padded head vectors and a storage offset.
LAYOUTS = {
    "flash_nhd": ((2, NB, BS, NH, HS), "NHD"),
    "flashinfer_nhd": ((NB, 2, BS, NH, HS), "NHD"),
    "flash_hnd": ((2, NB, NH, BS, HS), "HND"),
    "flashinfer_hnd": ((NB, 2, NH, BS, HS), "HND"),
    "mla": ((NB, BS, HS), None),
    "strided": ((2, NB, BS, NH, HS), "NHD"),
}


class Segment:
    """A file in /dev/shm mapped into this process (the engine owns it and unlinks it)."""

    def __init__(self, nbytes: int):
        self.name = lmcache_shm_name()
        self.path = f"/dev/shm/{self.name}"
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            self.mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.nbytes = nbytes

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@dataclass
class EngineKV:
    """One registered engine: per-layer tensors in shm and a 5-D logical view [P, NB, BS, NH', HS]."""

    layout: str
    dtype: str
    arrays: list[np.ndarray]
    segments: list[Segment]
    wrappers: list[msgspec.msgpack.Ext]
    hints: dict

    @property
    def mla(self) -> bool:
        return self.layout == "mla"

    @property
    def hidden(self) -> int:
        return HS if self.mla else NH * HS

    def logical(self, layer: int) -> np.ndarray:
        """View [P, NB, BS, H, HS] of a layer (writes go through to shared memory)."""
        a = self.arrays[layer]
        if self.layout in ("flash_nhd", "strided"):
            return a
        if self.layout == "flashinfer_nhd":
            return a.transpose(1, 0, 2, 3, 4)
        if self.layout == "flash_hnd":
            return a.transpose(0, 1, 3, 2, 4)
        if self.layout == "flashinfer_hnd":
            return a.transpose(1, 0, 3, 2, 4)
        return a[np.newaxis, :, :, np.newaxis, :]  # mla

    def gather(self, blocks: list[int]) -> bytes:
        """Expected object bytes of one chunk: [P, L, CHUNK, hidden] (engine-driven layout)."""
        planes = []
        for p in range(1 if self.mla else 2):
            layers = [self.logical(l)[p, blocks].reshape(CHUNK, self.hidden) for l in range(LAYERS)]
            planes.append(np.stack(layers))
        return np.ascontiguousarray(np.stack(planes)).tobytes()

    def scatter(self, blocks: list[int], obj: bytes, first_token: int = 0) -> None:
        """Write an object into the blocks (tokens >= first_token only), like the server should."""
        p_n = 1 if self.mla else 2
        o = np.frombuffer(obj, dtype=self.arrays[0].dtype).reshape(p_n, LAYERS, CHUNK, self.hidden)
        for l in range(LAYERS):
            v = self.logical(l)
            for t in range(first_token, CHUNK):
                v[:, blocks[t // BS], t % BS] = o[:, l, t].reshape(p_n, -1, HS)

    def snapshot(self) -> list[np.ndarray]:
        return [a.copy() for a in self.arrays]

    def restore(self, snap: list[np.ndarray]) -> None:
        for a, s in zip(self.arrays, snap):
            a[...] = s

    def close(self) -> None:
        for s in self.segments:
            s.unlink()


def make_kv(layout: str, rng: np.random.Generator, dtype: str = "float16", leading_slash: bool = True) -> EngineKV:
    shape, hint = LAYOUTS[layout]
    np_dtype = np.float16 if dtype == "float16" else np.uint16  # bfloat16: same bytes, uint16 view
    item = 2
    arrays: list[np.ndarray] = []
    segments: list[Segment] = []
    wrappers: list[msgspec.msgpack.Ext] = []
    try:
        for _ in range(LAYERS):
            if layout == "strided":
                pad_hs, off = HS + 8, 24  # padded head vectors, view starts 24 elements in
                full = (2, NB, BS, NH, pad_hs)
                seg = Segment((int(np.prod(full)) + off) * item)
                segments.append(seg)
                a = np.frombuffer(seg.mm, dtype=np_dtype)[off:].reshape(full)[..., :HS]
            else:
                seg = Segment(int(np.prod(shape)) * item)
                segments.append(seg)
                a = np.frombuffer(seg.mm, dtype=np_dtype).reshape(shape)
            a[...] = rng.integers(0, 1 << 16, a.shape, dtype=np.uint16).view(np_dtype)
            base = np.frombuffer(seg.mm, dtype=np.uint8).__array_interface__["data"][0]
            offset = (a.__array_interface__["data"][0] - base) // item
            stride = [s // item for s in a.strides]
            name = ("/" if leading_slash else "") + seg.name
            wrappers.append(cpu_shm_ext(name, seg.nbytes, dtype, a.shape, stride, offset))
            arrays.append(a)
    except BaseException:
        for seg in segments:
            seg.unlink()
        raise
    hints = {"kv_layout": hint} if hint else {}
    return EngineKV(layout, dtype, arrays, segments, wrappers, hints)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


_iids = itertools.count(1)


def new_iid() -> int:
    return (os.getpid() % 10000) * 1000 + next(_iids)


def register_lmd(cli: Client, kv: EngineKV, iid: int, groups: list | None = None) -> None:
    if groups is None:
        groups = [EngineGroupInfo(0, list(range(LAYERS)), BS)]
    assert cli.call("register_kv_cache", iid, kv.wrappers, MODEL, 1, "vllm", kv.hints, groups) is None


def register_ed(cli: Client, kv: EngineKV, iid: int) -> None:
    resp = cli.call("register_kv_cache_engine_driven_context",
                    RegisterEngineDriven(iid, MODEL, 1, BS, LAYERS, kv.hidden, kv.dtype, kv.mla), rtype=dict)
    assert resp["pool_size"] > 0


def tokens(rng: np.random.Generator, n: int) -> list[int]:
    t = rng.integers(0, 2**31, n).tolist()
    t[0] = next(_seq) + 1_000_000  # never shared with another test
    return t


def key(toks: list[int], rid: str, start: int, end: int, worker: int | None = 0) -> Key:
    return Key(MODEL, 1, worker, toks, start, end, rid, num_kv_readers=1)


def pick_blocks(rng: np.random.Generator, n: int) -> list[int]:
    """n distinct engine blocks, never the null block 0."""
    return (rng.permutation(NB - 1)[:n] + 1).tolist()


@pytest.fixture
def engine(lmd_server: Server, cli: Client, request: pytest.FixtureRequest, rng: np.random.Generator):
    """Registers a KV cache of the requested layout on both paths; yields (kv, lmd_iid, ed_iid)."""
    layout = request.param
    kv = make_kv(layout, rng)
    a, b = new_iid(), new_iid()
    try:
        register_lmd(cli, kv, a)
        register_ed(cli, kv, b)
        ctx = lmd_server.lmd()["contexts"][str(a)]
        assert ctx["state"] == "registered", ctx
        yield kv, a, b
        assert cli.call("unregister_kv_cache", a) is None
        assert cli.call("unregister_kv_cache_engine_driven_context", b) is None
    finally:
        kv.close()


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", list(LAYOUTS), indirect=True)
def test_store_lmcache_driven_read_engine_driven(lmd_server: Server, cli: Client, engine, rng) -> None:
    kv, a, b = engine
    toks = tokens(rng, 4 * CHUNK + 77)  # 4 full chunks + a partial one (never stored)
    blocks = pick_blocks(rng, 4 * BPC)
    rid = uniq("req")
    # Chunks 0-2 in one store; chunk 3 in a store whose range starts at 768 (block ids of [768, 1024) only).
    assert cli.store(key(toks, rid, 0, 3 * CHUNK), a, [blocks[:3 * BPC]]) == (STUB, True)
    assert cli.store(key(toks, rid, 3 * CHUNK, 4 * CHUNK), a, [blocks[3 * BPC:]]) == (STUB, True)
    # Visible to a lookup the moment store replied.
    assert cli.lookup(key(toks, rid, 0, 4 * CHUNK, worker=None)) == 4
    resp = cli.call("prepare_retrieve", key(toks, rid, 0, 4 * CHUNK), b, rtype=PrepareRetrieveResponse)
    assert resp.success
    slots = [msgspec.convert(s, Slot) for s in resp.context["slots"]]
    assert len(slots) == 4
    want_shape = [LAYERS, CHUNK, HS] if kv.mla else [2, LAYERS, CHUNK, NH * HS]
    for i, s in enumerate(slots):
        assert s.shape == want_shape and s.length == (len(kv.gather(blocks[:BPC])))
        got = lmd_server.read_l1(s.offset, s.length)
        assert got == kv.gather(blocks[i * BPC:(i + 1) * BPC]), f"chunk {i} differs"
    assert cli.call("commit_retrieve", key(toks, rid, 0, 4 * CHUNK), b, rtype=bool)
    # Storing again: everything is cached, still a success, nothing re-copied.
    before = lmd_server.lmd()["counters"]["store_chunks_skipped_total"]
    assert cli.store(key(toks, rid, 0, 4 * CHUNK), a, [blocks]) == (STUB, True)
    assert lmd_server.lmd()["counters"]["store_chunks_skipped_total"] == before + 4
    assert cli.call("end_session", rid) is None


@pytest.mark.parametrize("skip", [0, 17, CHUNK, CHUNK + 44, 3 * CHUNK - 1])
@pytest.mark.parametrize("engine", list(LAYOUTS), indirect=True)
def test_store_engine_driven_retrieve_lmcache_driven(lmd_server: Server, cli: Client, engine, rng, skip: int) -> None:
    kv, a, b = engine
    n = 3
    toks = tokens(rng, n * CHUNK)
    rid = uniq("req")
    k = key(toks, rid, 0, n * CHUNK)
    prep = cli.call("prepare_store", k, b, rtype=PrepareStoreResponse)
    assert prep.context.chunk_indices == list(range(n))
    objects = []
    for s in prep.context.slots:
        obj = rng.integers(0, 256, s.length, dtype=np.uint8).tobytes()
        lmd_server.write_l1(s.offset, obj)
        objects.append(obj)
    assert cli.call("commit_store", k, b, b"", rtype=bool)

    rid2 = uniq("req")
    assert cli.lookup(key(toks, rid2, 0, n * CHUNK, worker=None)) == n
    blocks = pick_blocks(rng, n * BPC)
    original = kv.snapshot()
    assert cli.retrieve(key(toks, rid2, 0, n * CHUNK), a, [blocks], skip=skip) == (STUB, True)
    got = kv.snapshot()
    # Expected: the original memory with tokens >= skip of every chunk written into its blocks.
    kv.restore(original)
    for i in range(n):
        first = min(max(skip - i * CHUNK, 0), CHUNK)
        kv.scatter(blocks[i * BPC:(i + 1) * BPC], objects[i], first_token=first)
    want = kv.snapshot()
    kv.restore(got)
    for l in range(LAYERS):
        assert np.array_equal(got[l].view(np.uint16), want[l].view(np.uint16)), f"layer {l} differs (skip {skip})"
    # The lookup locks were consumed: a second retrieve with the same lookup fails.
    assert cli.retrieve(key(toks, rid2, 0, n * CHUNK), a, [blocks]) == (STUB, False)
    assert cli.call("end_session", rid2) is None


@pytest.mark.parametrize("engine", ["flash_nhd"], indirect=True)
def test_lmcache_driven_round_trip_into_other_blocks(cli: Client, engine, rng) -> None:
    kv, a, _ = engine
    toks = tokens(rng, 2 * CHUNK)
    src, dst = pick_blocks(rng, 4 * BPC)[:2 * BPC], None
    dst = [x for x in pick_blocks(rng, NB - 1) if x not in src][:2 * BPC]
    rid = uniq("req")
    assert cli.store(key(toks, rid, 0, 2 * CHUNK), a, [src]) == (STUB, True)
    assert cli.lookup(key(toks, rid, 0, 2 * CHUNK, worker=None)) == 2
    want = [kv.gather(src[i * BPC:(i + 1) * BPC]) for i in range(2)]
    assert cli.retrieve(key(toks, rid, 0, 2 * CHUNK), a, [dst]) == (STUB, True)
    assert [kv.gather(dst[i * BPC:(i + 1) * BPC]) for i in range(2)] == want
    # An event handle the client sends is echoed.
    rid = uniq("req")
    assert cli.lookup(key(toks, rid, 0, 2 * CHUNK, worker=None)) == 2
    assert cli.retrieve(key(toks, rid, 0, 2 * CHUNK), a, [dst], handle=b"evt-123") == (b"evt-123", True)
    cli.call("end_session", rid)


@pytest.mark.parametrize("engine", ["flash_nhd"], indirect=True)
def test_retrieve_needs_the_lookup_locks(lmd_server: Server, cli: Client, engine, rng) -> None:
    kv, a, _ = engine
    toks = tokens(rng, 3 * CHUNK)
    blocks = pick_blocks(rng, 3 * BPC)
    rid = uniq("req")
    assert cli.store(key(toks, rid, 0, 2 * CHUNK), a, [blocks[:2 * BPC]]) == (STUB, True)
    snap = kv.snapshot()
    # No lookup at all.
    assert cli.retrieve(key(toks, uniq("req"), 0, 2 * CHUNK), a, [blocks[:2 * BPC]]) == (STUB, False)
    # Lookup hits 2 chunks; a retrieve of 3 fails (chunk 2 missing) and consumes nothing.
    rid2 = uniq("req")
    assert cli.lookup(key(toks, rid2, 0, 3 * CHUNK, worker=None)) == 2
    assert cli.retrieve(key(toks, rid2, 0, 3 * CHUNK), a, [blocks]) == (STUB, False)
    assert all(np.array_equal(x.view(np.uint16), y.view(np.uint16)) for x, y in zip(kv.snapshot(), snap)), \
        "a failed retrieve wrote engine memory"
    assert cli.retrieve(key(toks, rid2, 0, 2 * CHUNK), a, [blocks[:2 * BPC]]) == (STUB, True)
    # Bad block ids fail before anything happens.
    rid3 = uniq("req")
    assert cli.lookup(key(toks, rid3, 0, 2 * CHUNK, worker=None)) == 2
    k = key(toks, rid3, 0, 2 * CHUNK)
    assert cli.retrieve(k, a, [blocks[:2 * BPC - 1]]) == (STUB, False)  # too few
    assert cli.retrieve(k, a, [blocks[:BPC] * 2]) == (STUB, False)  # a block written twice
    assert cli.retrieve(k, a, [blocks[:2 * BPC], blocks[:2 * BPC]]) == (STUB, False)  # two groups
    assert cli.retrieve(k, a, [[NB] + blocks[1:2 * BPC]]) == (STUB, False)  # out of range
    assert cli.retrieve(k, a, [blocks[:2 * BPC]]) == (STUB, True)  # locks still there
    for r in (rid, rid2, rid3):
        cli.call("end_session", r)
    # Store with bad block ids fails and stores nothing.
    toks2 = tokens(rng, CHUNK)
    rid4 = uniq("req")
    assert cli.store(key(toks2, rid4, 0, CHUNK), a, [blocks[:BPC - 1]]) == (STUB, False)
    assert cli.store(key(toks2, rid4, 0, CHUNK), a, [[NB + 5] * BPC]) == (STUB, False)
    assert cli.lookup(key(toks2, rid4, 0, CHUNK, worker=None)) == 0
    # All-null chunks (block 0 everywhere) are not stored, but the store succeeds.
    assert cli.store(key(toks2, rid4, 0, CHUNK), a, [[0] * BPC]) == (STUB, True)
    assert cli.lookup(key(toks2, rid4, 0, CHUNK, worker=None)) == 0
    cli.call("end_session", rid4)


def test_store_is_visible_to_the_very_next_lookup(lmd_server: Server, cli: Client, rng) -> None:
    kv = make_kv("flash_nhd", rng)
    iid = new_iid()
    register_lmd(cli, kv, iid)
    try:
        for i in range(20):
            toks = tokens(rng, 2 * CHUNK)
            rid = uniq("req")
            assert cli.store(key(toks, rid, 0, 2 * CHUNK), iid, [pick_blocks(rng, 2 * BPC)]) == (STUB, True)
            assert cli.lookup(key(toks, rid, 0, 2 * CHUNK, worker=None)) == 2, f"request {i}"
            cli.call("end_session", rid)
    finally:
        cli.call("unregister_kv_cache", iid)
        kv.close()


def test_refused_registrations_are_reported_and_harmless(lmd_server: Server, cli: Client, rng) -> None:
    good = make_kv("flash_nhd", rng)
    bad_rank = make_kv("flash_nhd", rng)
    fused = cpu_shm_ext("/" + bad_rank.segments[0].name, bad_rank.segments[0].nbytes, "float16",
                        (NB, BS, NH, 2 * HS), (BS * NH * 2 * HS, NH * 2 * HS, 2 * HS, 1), 0)
    small = cpu_shm_ext("/" + good.segments[0].name, good.segments[0].nbytes - 2, "float16",
                        (2, NB, BS, NH, HS), (NB * BS * NH * HS, BS * NH * HS, NH * HS, HS, 1), 0)
    cases = {
        "cuda": ([other_ext("cuda")] * LAYERS, '"cuda"'),
        "mixed": (good.wrappers[:-1] + [other_ext("cuda_vmm")], '"cuda_vmm"'),
        "npu": ([other_ext("npu")], '"npu"'),
        "rank4": ([fused], "rank-4"),
        "too_small": ([small] + good.wrappers[1:], "needs"),
        "missing": ([cpu_shm_ext("/" + lmcache_shm_name(), 4096, "float16", (NB, BS, HS), (BS * HS, HS, 1), 0)], "shm_open"),
        "l1_pool": ([cpu_shm_ext(lmd_server.shm_name, 4096, "float16", (4, 16, 32), (512, 32, 1), 0)], "is refused"),
        "bad_hint": (good.wrappers, "kv_layout"),
        "sliding_window": (good.wrappers, "sliding-window"),
    }
    try:
        for name, (wrappers, reason) in cases.items():
            iid = new_iid()
            hints = {"kv_layout": "XYZ"} if name == "bad_hint" else {"kv_layout": "NHD"}
            groups = [EngineGroupInfo(0, list(range(len(wrappers))), BS, 128 if name == "sliding_window" else -1)]
            assert cli.call("register_kv_cache", iid, wrappers, MODEL, 1, "vllm", hints, groups) is None
            ctx = lmd_server.lmd()["contexts"][str(iid)]
            assert ctx["state"] == "refused", (name, ctx)
            assert reason in ctx["reason"], (name, ctx["reason"])
            toks = tokens(rng, CHUNK)
            assert cli.store(key(toks, uniq("r"), 0, CHUNK), iid, [list(range(1, BPC + 1))]) == (STUB, False)
            assert cli.retrieve(key(toks, uniq("r"), 0, CHUNK), iid, [list(range(1, BPC + 1))]) == (STUB, False)
            assert cli.call("unregister_kv_cache", iid) is None
            assert str(iid) not in lmd_server.lmd()["contexts"]
        # Unknown instance.
        assert cli.store(key(tokens(rng, CHUNK), uniq("r"), 0, CHUNK), 999_999_999, [[1] * BPC]) == (STUB, False)
        # Nothing else was affected: a good registration on the same server works.
        iid = new_iid()
        register_lmd(cli, good, iid)
        toks = tokens(rng, CHUNK)
        rid = uniq("r")
        assert cli.store(key(toks, rid, 0, CHUNK), iid, [pick_blocks(rng, BPC)]) == (STUB, True)
        assert cli.lookup(key(toks, rid, 0, CHUNK, worker=None)) == 1
        cli.call("end_session", rid)
        cli.call("unregister_kv_cache", iid)
        assert lmd_server.status()["is_healthy"]
        assert lmd_server.proc.poll() is None
    finally:
        good.close()
        bad_rank.close()


def mapped(srv: Server, seg: Segment) -> bool:
    return f"/dev/shm/{seg.name}\n" in srv.maps()


def test_unregister_unmaps_the_engine_memory(lmd_server: Server, cli: Client, rng) -> None:
    kv = make_kv("flash_hnd", rng, leading_slash=False)
    iid = new_iid()
    register_lmd(cli, kv, iid)
    assert all(mapped(lmd_server, s) for s in kv.segments), "segments not mapped after register"
    # Re-registering replaces the registration (same segments, still mapped once per segment).
    register_lmd(cli, kv, iid)
    assert sum(lmd_server.maps().count(f"/dev/shm/{s.name}\n") for s in kv.segments) == LAYERS
    assert cli.call("unregister_kv_cache", iid) is None
    assert not any(mapped(lmd_server, s) for s in kv.segments), "segments still mapped after unregister"
    toks = tokens(rng, CHUNK)
    assert cli.store(key(toks, uniq("r"), 0, CHUNK), iid, [pick_blocks(rng, BPC)]) == (STUB, False)
    assert cli.call("unregister_kv_cache", iid) is None  # twice is fine
    kv.close()


def test_reaper_unmaps_silent_engines(rng) -> None:
    srv = start_server("--worker-reap-timeout-seconds", "30", "--worker-registration-grace-seconds", "3")
    kv = make_kv("mla", rng)
    try:
        cli = srv.client()
        iid = new_iid()
        register_lmd(cli, kv, iid)
        assert all(mapped(srv, s) for s in kv.segments)
        deadline = time.monotonic() + 10
        while str(iid) in srv.lmd()["contexts"]:
            assert time.monotonic() < deadline, "never-pinged instance not reaped"
            time.sleep(0.2)
        assert not any(mapped(srv, s) for s in kv.segments), "reaped instance still mapped"
        assert srv.lmd()["counters"]["reaped_total"] == 1
        assert cli.store(key(tokens(rng, CHUNK), uniq("r"), 0, CHUNK), iid, [pick_blocks(rng, BPC)]) == (STUB, False)
    finally:
        stop_server(srv)
        kv.close()


def _md5_blocks(kv: EngineKV, blocks: list[int], per_chunk: int, layerwise: bool):
    """LMCache's /cache/checksums: per chunk, each layer's index_select'ed blocks, bf16 widened to f32."""
    axis = 0 if kv.layout in ("flashinfer_nhd", "flashinfer_hnd", "mla") else 1

    def data(layer: int, ids: list[int]) -> bytes:
        x = np.ascontiguousarray(np.take(kv.arrays[layer], ids, axis=axis))
        if kv.dtype == "bfloat16":
            x = (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return x.tobytes()

    chunks = [blocks[i:i + per_chunk] for i in range(0, len(blocks), per_chunk)]
    if layerwise:
        return {f"layer_{l}": [hashlib.md5(data(l, c)).hexdigest() for c in chunks] for l in range(LAYERS)}
    out = []
    for c in chunks:
        h = hashlib.md5()
        for l in range(LAYERS):
            h.update(data(l, c))
        out.append(h.hexdigest())
    return out


@pytest.mark.parametrize("layout,dtype", [("flash_nhd", "float16"), ("flashinfer_hnd", "bfloat16"),
                                          ("strided", "float16"), ("mla", "bfloat16")])
def test_checksums_endpoint(lmd_server: Server, cli: Client, rng, layout: str, dtype: str) -> None:
    kv = make_kv(layout, rng, dtype=dtype)
    iid = new_iid()
    register_lmd(cli, kv, iid)
    try:
        blocks = pick_blocks(rng, 2 * BPC + 3)  # a partial last chunk, as LMCache allows
        for layerwise in (False, True):
            code, body = lmd_server.http("POST", "/cache/checksums",
                                         {"block_ids": blocks, "chunk_size": BPC, "instance_id": iid, "layerwise": layerwise})
            assert code == 200, body
            assert body["status"] == "success" and body["num_chunks"] == 3 and body["layerwise"] == layerwise
            assert body["chunk_checksums"] == _md5_blocks(kv, blocks, BPC, layerwise)
        code, body = lmd_server.http("POST", "/cache/checksums",
                                     {"block_ids": [1, 2, 3, 4, 9], "chunk_size": 2, "instance_id": iid})
        assert code == 200 and body["block_id_ranges"] == [[1, 4], 9]
        assert lmd_server.http("POST", "/cache/checksums", {"block_ids": [], "chunk_size": 1, "instance_id": iid})[0] == 400
        assert lmd_server.http("POST", "/cache/checksums", {"block_ids": [NB], "chunk_size": 1, "instance_id": iid})[0] == 400
        assert lmd_server.http("POST", "/cache/checksums", {"block_ids": [1], "chunk_size": 1, "instance_id": -5})[0] == 404
    finally:
        cli.call("unregister_kv_cache", iid)
        kv.close()


# --------------------------------------------------------------------------------------------
# Engine segments shrunk, unlinked or replaced under the server (issue #13, finding 1)
# --------------------------------------------------------------------------------------------


def truncate_segment(seg: Segment, size: int = 0) -> None:
    """The engine shrinks its own segment through its fd (what a buggy or hostile client can do).
    The test must not touch that segment's pages afterwards: it would get SIGBUS itself."""
    fd = os.open(seg.path, os.O_RDWR)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def test_a_truncated_segment_fails_its_instance_not_the_server(lmd_server: Server, cli: Client, rng) -> None:
    bad, good, fresh = make_kv("flash_nhd", rng), make_kv("flash_hnd", rng), make_kv("flash_nhd", rng)
    a, b = new_iid(), new_iid()
    other = lmd_server.client()
    try:
        register_lmd(cli, bad, a)
        register_lmd(other, good, b)
        # Stored before the truncation: these objects must come through it intact.
        toks = tokens(rng, 2 * CHUNK)
        blocks = pick_blocks(rng, 2 * BPC)
        want = [bad.gather(blocks[i * BPC:(i + 1) * BPC]) for i in range(2)]
        rid = uniq("req")
        assert cli.store(key(toks, rid, 0, 2 * CHUNK), a, [blocks]) == (STUB, True)
        cli.call("end_session", rid)
        before = lmd_server.lmd()["counters"]

        victim = bad.segments[LAYERS - 1]  # the last layer: the copy reaches it after the others
        truncate_segment(victim)

        # store: the defined failure reply, the server alive, nothing published.
        toks2 = tokens(rng, 2 * CHUNK)
        rid2 = uniq("req")
        assert cli.store(key(toks2, rid2, 0, 2 * CHUNK), a, [blocks]) == (STUB, False)
        assert lmd_server.proc.poll() is None, f"server died:\n{lmd_server.log()[-3000:]}"
        assert cli.lookup(key(toks2, rid2, 0, 2 * CHUNK, worker=None)) == 0
        cli.call("end_session", rid2)
        # retrieve into the truncated engine: fails too.
        rid3 = uniq("req")
        assert cli.lookup(key(toks, rid3, 0, 2 * CHUNK, worker=None)) == 2
        assert cli.retrieve(key(toks, rid3, 0, 2 * CHUNK), a, [blocks]) == (STUB, False)
        cli.call("end_session", rid3)

        # The instance is unhealthy with the reason; the failures are counted.
        st = lmd_server.status()
        ctxs = st["lmcache_driven"]["contexts"]
        assert ctxs[str(a)]["is_healthy"] is False, ctxs[str(a)]
        assert "truncated" in ctxs[str(a)]["unhealthy_reason"] and victim.name in ctxs[str(a)]["unhealthy_reason"]
        assert ctxs[str(b)]["is_healthy"] is True
        # A client's broken segment is not the server's failure: the server stays healthy.
        assert st["is_healthy"] is True and st["lmcache_driven"]["faulted_instances"] == 1
        c = st["lmcache_driven"]["counters"]
        assert c["segment_faults_total"] == before["segment_faults_total"] + 2
        assert c["stores_failed_total"] == before["stores_failed_total"] + 1
        assert c["retrieves_failed_total"] == before["retrieves_failed_total"] + 1
        assert "truncated" in lmd_server.log()
        # Still ready and live: the other engines keep being served.
        assert lmd_server.http("GET", "/api/healthcheck")[0] == 200
        assert lmd_server.http("GET", "/api/healthcheck?probe=live")[0] == 200

        # L1 is intact and the other client unaffected: the chunks stored before the fault come
        # back byte-exact through the other instance, and its own round trip works.
        rid4 = uniq("req")
        assert other.lookup(key(toks, rid4, 0, 2 * CHUNK, worker=None)) == 2
        dst = pick_blocks(rng, 2 * BPC)
        assert other.retrieve(key(toks, rid4, 0, 2 * CHUNK), b, [dst]) == (STUB, True)
        assert [good.gather(dst[i * BPC:(i + 1) * BPC]) for i in range(2)] == want
        other.call("end_session", rid4)
        toks5, src = tokens(rng, CHUNK), pick_blocks(rng, BPC)
        own = good.gather(src)
        rid5 = uniq("req")
        assert other.store(key(toks5, rid5, 0, CHUNK), b, [src]) == (STUB, True)
        assert other.lookup(key(toks5, rid5, 0, CHUNK, worker=None)) == 1
        dst5 = [x for x in pick_blocks(rng, NB - 1) if x not in src][:BPC]
        assert other.retrieve(key(toks5, rid5, 0, CHUNK), b, [dst5]) == (STUB, True)
        assert good.gather(dst5) == own
        other.call("end_session", rid5)

        # Recovery: the engine registers again with good memory; the old mapping goes.
        register_lmd(cli, fresh, a)
        assert not mapped(lmd_server, victim)
        st = lmd_server.status()
        assert st["lmcache_driven"]["contexts"][str(a)]["is_healthy"] is True
        assert st["is_healthy"], st.get("unhealthy_reason")
        assert lmd_server.http("GET", "/api/healthcheck")[0] == 200
        toks6, src6 = tokens(rng, CHUNK), pick_blocks(rng, BPC)
        rid6 = uniq("req")
        assert cli.store(key(toks6, rid6, 0, CHUNK), a, [src6]) == (STUB, True)
        assert cli.lookup(key(toks6, rid6, 0, CHUNK, worker=None)) == 1
        cli.call("end_session", rid6)
        assert cli.call("unregister_kv_cache", a) is None
        assert other.call("unregister_kv_cache", b) is None
    finally:
        for kv in (bad, good, fresh):
            kv.close()


def test_unlinked_or_replaced_segments_keep_serving_the_registered_memory(lmd_server: Server, cli: Client, rng) -> None:
    kv = make_kv("flash_nhd", rng)
    iid = new_iid()
    register_lmd(cli, kv, iid)
    try:
        kv.segments[0].unlink()
        # Replaced: a new, empty file under the old name.
        kv.segments[1].unlink()
        os.close(os.open(kv.segments[1].path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        # The server's mapping keeps the inode the engine registered (and still writes).
        toks, src = tokens(rng, 2 * CHUNK), pick_blocks(rng, 2 * BPC)
        want = [kv.gather(src[i * BPC:(i + 1) * BPC]) for i in range(2)]
        rid = uniq("req")
        assert cli.store(key(toks, rid, 0, 2 * CHUNK), iid, [src]) == (STUB, True)
        assert cli.lookup(key(toks, rid, 0, 2 * CHUNK, worker=None)) == 2
        dst = [x for x in pick_blocks(rng, NB - 1) if x not in src][:2 * BPC]
        assert cli.retrieve(key(toks, rid, 0, 2 * CHUNK), iid, [dst]) == (STUB, True)
        assert [kv.gather(dst[i * BPC:(i + 1) * BPC]) for i in range(2)] == want
        cli.call("end_session", rid)
        assert lmd_server.lmd()["contexts"][str(iid)]["is_healthy"] is True
        # A new registration maps by name: the unlinked segment is refused, naming the reason.
        register_lmd(cli, kv, iid)
        ctx = lmd_server.lmd()["contexts"][str(iid)]
        assert ctx["state"] == "refused" and "shm_open" in ctx["reason"], ctx
        assert cli.call("unregister_kv_cache", iid) is None
    finally:
        kv.close()
