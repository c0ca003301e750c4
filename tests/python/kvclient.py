"""A small, independent client for the LMCache 0.5.6 multiprocess wire protocol (ZMQ DEALER).

Uses only pyzmq, msgspec, numpy and the stdlib. Every receive has a timeout, so a missing reply raises
``NoReply`` instead of hanging the test. Responses are decoded strictly with typed msgspec decoders.
"""

from __future__ import annotations

import itertools
import mmap
import os
import time
import types
import typing
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import zmq

from lmcache_types import (
    CHUNK_SIZE,
    OP_IDS,
    BlockAllocationRecord,
    IPCCacheServerKey,
    PrepareRetrieveResponse,
    PrepareStoreResponse,
    RegisterEngineDrivenContextPayload,
    RegisterEngineDrivenContextResponse,
    RetrieveContext,
    Slot,
    StoreContext,
    slot_nbytes,
    slot_shape,
)

DEFAULT_TIMEOUT = 5.0

_ENC = msgspec.msgpack.Encoder()
_DECODERS: dict[Any, msgspec.msgpack.Decoder] = {}


def enc(obj: Any) -> bytes:
    return _ENC.encode(obj)


def decoder(tp: Any) -> msgspec.msgpack.Decoder:
    d = _DECODERS.get(tp)
    if d is None:
        d = msgspec.msgpack.Decoder(type=tp)
        _DECODERS[tp] = d
    return d


class NoReply(AssertionError):
    """The server did not answer within the timeout."""


class ProtocolError(AssertionError):
    """The reply violates the wire protocol (bad framing, wrong op echo, wrong type)."""


@dataclass(frozen=True)
class Raw:
    """A payload frame sent verbatim (already encoded, or deliberately malformed)."""

    data: bytes


@dataclass
class Reply:
    frames: list[bytes]

    @property
    def uid(self) -> bytes:
        return self.frames[0]

    @property
    def op(self) -> bytes:
        return self.frames[1]

    @property
    def bare(self) -> bool:
        return len(self.frames) == 2

    @property
    def payload(self) -> bytes | None:
        return self.frames[2] if len(self.frames) > 2 else None


def _allows_none(tp: Any) -> bool:
    if tp is None or tp is type(None):
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return type(None) in typing.get_args(tp)
    return False


def decode_reply(reply: Reply, tp: Any, what: str = "") -> Any:
    """Decode a reply the way the LMCache client does: bare reply -> None, else typed decode."""
    if reply.bare:
        if not _allows_none(tp):
            raise ProtocolError(f"{what}: bare reply {reply.frames!r} but response type is {tp!r}")
        return None
    try:
        return decoder(tp).decode(reply.payload)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"{what}: response {reply.payload!r} does not decode as {tp!r}: {e}") from e
    except msgspec.DecodeError as e:
        raise ProtocolError(f"{what}: response {reply.payload!r} is not msgpack: {e}") from e


def op_frame(op: int | str, style: str = "int") -> bytes:
    """Encode an op: a name becomes its legacy id (style "int") or stays a str (style "str")."""
    if isinstance(op, str) and style == "int" and op in OP_IDS:
        return enc(OP_IDS[op])
    return enc(op)


class KVClient:
    """One ZMQ DEALER; many requests may be in flight, replies are matched by the echoed uid frame."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, op_style: str = "int"):
        self.url = url
        self.timeout = timeout
        self.op_style = op_style
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # A DEALER whose only peer refused the handshake (ZAP denial: `--rpc-allow`) has no pipe
        # left and libzmq never reconnects it, so a blocking send would wait forever. Bound it.
        self.sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))
        self.sock.connect(url)
        self._uids = itertools.count()
        self._stash: dict[bytes, list[bytes]] = {}

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- framing -----------------------------------------------------------------------------------

    def send(self, op: int | str, *payloads: Any, op_style: str | None = None) -> tuple[bytes, bytes]:
        uid = enc(next(self._uids))
        opf = op_frame(op, op_style or self.op_style)
        frames = [uid, opf] + [p.data if isinstance(p, Raw) else enc(p) for p in payloads]
        self.send_frames(frames, what=str(op))
        return uid, opf

    def send_frames(self, frames: list[bytes], what: str = "request") -> None:
        try:
            self.sock.send_multipart(frames)
        except zmq.Again:
            raise NoReply(f"could not queue {what} within {self.timeout}s: no connected peer "
                          "(a refused handshake is never retried by libzmq)") from None

    def recv_any(self, timeout: float | None = None) -> list[bytes] | None:
        """Next message off the socket, or None if nothing arrives in time."""
        t = self.timeout if timeout is None else timeout
        if self.sock.poll(int(t * 1000), zmq.POLLIN):
            return self.sock.recv_multipart()
        return None

    def wait(self, uid: bytes, opf: bytes | None = None, timeout: float | None = None, what: str = "") -> Reply:
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        while uid not in self._stash:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                raise NoReply(f"no reply to {what or 'request'} uid={uid.hex()} within {t}s")
            frames = self.sock.recv_multipart()
            if len(frames) < 2 or len(frames) > 3:
                raise ProtocolError(f"reply with {len(frames)} frames: {frames!r}")
            if frames[0] in self._stash:
                raise ProtocolError(f"duplicate reply for uid {frames[0].hex()}")
            self._stash[frames[0]] = frames
        reply = Reply(self._stash.pop(uid))
        if opf is not None and reply.op != opf:
            raise ProtocolError(f"{what}: op frame echoed as {reply.op.hex()}, sent {opf.hex()}")
        return reply

    def request(self, op: int | str, *payloads: Any, timeout: float | None = None, op_style: str | None = None) -> Reply:
        uid, opf = self.send(op, *payloads, op_style=op_style)
        return self.wait(uid, opf, timeout, what=str(op))

    def call(self, op: int | str, *payloads: Any, rtype: Any, timeout: float | None = None, op_style: str | None = None) -> Any:
        return decode_reply(self.request(op, *payloads, timeout=timeout, op_style=op_style), rtype, str(op))

    def expect_no_reply(self, within: float = 0.5) -> None:
        frames = self.recv_any(within)
        if frames is not None:
            raise ProtocolError(f"unexpected message {frames!r}")

    # -- typed RPCs ----------------------------------------------------------------------------------

    def get_chunk_size(self, **kw: Any) -> int:
        return self.call("get_chunk_size", rtype=int, **kw)

    def noop(self, **kw: Any) -> str:
        return self.call("noop", rtype=str, **kw)

    def ping(self, instance_id: int | None, **kw: Any) -> bool:
        return self.call("ping", instance_id, rtype=bool, **kw)

    def get_experimental(self, **kw: Any) -> list[str]:
        return self.call("get_experimental", rtype=list[str], **kw)

    def register_context(self, payload: RegisterEngineDrivenContextPayload, **kw: Any) -> RegisterEngineDrivenContextResponse:
        return self.call("register_kv_cache_engine_driven_context", payload, rtype=RegisterEngineDrivenContextResponse, **kw)

    def unregister_context(self, instance_id: int, **kw: Any) -> None:
        return self.call("unregister_kv_cache_engine_driven_context", instance_id, rtype=None, **kw)

    def prepare_store(self, key: IPCCacheServerKey, instance_id: int, **kw: Any) -> PrepareStoreResponse:
        return self.call("prepare_store", key, instance_id, rtype=PrepareStoreResponse, **kw)

    def commit_store(self, key: IPCCacheServerKey, instance_id: int, data: bytes = b"", **kw: Any) -> bool:
        return self.call("commit_store", key, instance_id, data, rtype=bool, **kw)

    def prepare_retrieve(self, key: IPCCacheServerKey, instance_id: int, **kw: Any) -> PrepareRetrieveResponse:
        return self.call("prepare_retrieve", key, instance_id, rtype=PrepareRetrieveResponse, **kw)

    def commit_retrieve(self, key: IPCCacheServerKey, instance_id: int, **kw: Any) -> bool:
        return self.call("commit_retrieve", key, instance_id, rtype=bool, **kw)

    def lookup(self, key: IPCCacheServerKey, tp_size: int = 1, **kw: Any) -> None:
        return self.call("lookup", key, tp_size, rtype=None, **kw)

    def query_prefetch_status(self, request_id: str, **kw: Any) -> int | None:
        return self.call("query_prefetch_status", request_id, rtype=int | None, **kw)

    def wait_prefetch_status(self, request_id: str, timeout_s: float, **kw: Any) -> int | None:
        return self.call("wait_prefetch_status", request_id, float(timeout_s), rtype=int | None, **kw)

    def free_lookup_locks(self, key: IPCCacheServerKey, tp_size: int = 1, **kw: Any) -> None:
        return self.call("free_lookup_locks", key, tp_size, rtype=None, **kw)

    def end_session(self, request_id: str, **kw: Any) -> None:
        return self.call("end_session", request_id, rtype=None, **kw)

    def clear(self, force: bool = False, **kw: Any) -> None:
        return self.call("clear", force, rtype=None, **kw)

    def report_block_allocation(self, instance_id: int, model_name: str, records: list[BlockAllocationRecord], **kw: Any) -> None:
        return self.call("report_block_allocation", instance_id, model_name, records, rtype=None, **kw)

    # -- composite helpers ---------------------------------------------------------------------------

    def lookup_hits(self, key: IPCCacheServerKey, tp_size: int = 1, poll_timeout: float | None = None) -> int:
        """lookup + poll query_prefetch_status until it returns an int (None means still running)."""
        self.lookup(key, tp_size)
        deadline = time.monotonic() + (self.timeout if poll_timeout is None else poll_timeout)
        while True:
            r = self.query_prefetch_status(key.request_id)
            if r is not None:
                return r
            if time.monotonic() > deadline:
                raise NoReply(f"prefetch for {key.request_id!r} still running after the poll timeout")
            time.sleep(0.001)


def store_context(resp: PrepareStoreResponse) -> StoreContext:
    """Strictly validate a prepare_store context: {slots: [slot...], chunk_indices: [int...]}."""
    try:
        ctx = msgspec.convert(resp.context, StoreContext, strict=True)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"prepare_store context {resp.context!r} is malformed: {e}") from e
    if len(ctx.slots) != len(ctx.chunk_indices):
        raise ProtocolError(f"{len(ctx.slots)} slots but chunk_indices={ctx.chunk_indices}")
    return ctx


def retrieve_context(resp: PrepareRetrieveResponse) -> RetrieveContext:
    try:
        return msgspec.convert(resp.context, RetrieveContext, strict=True)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"prepare_retrieve context {resp.context!r} is malformed: {e}") from e


def make_key(
    model: str,
    tokens: list[int] | tuple[int, ...],
    start: int,
    end: int,
    request_id: str,
    *,
    world_size: int = 1,
    worker_id: int | None = 0,
    num_kv_readers: int = 0,
    cache_salt: str = "",
) -> IPCCacheServerKey:
    return IPCCacheServerKey(
        model_name=model,
        world_size=world_size,
        worker_id=worker_id,
        token_ids=tuple(tokens),
        start=start,
        end=end,
        request_id=request_id,
        cache_salt=cache_salt,
        num_kv_readers=num_kv_readers,
    )


def lookup_key(model: str, tokens: list[int] | tuple[int, ...], request_id: str, *, world_size: int = 1, end: int | None = None) -> IPCCacheServerKey:
    if end is None:
        end = len(tokens) // CHUNK_SIZE * CHUNK_SIZE
    return make_key(model, tokens, 0, end, request_id, world_size=world_size, worker_id=None, num_kv_readers=1)


class ShmPool:
    """The server's L1 pool, mapped read-write from /dev/shm (never unlinked by the client)."""

    def __init__(self, shm_name: str, pool_size: int):
        if shm_name.startswith("/"):
            raise ProtocolError(f"shm_name {shm_name!r} has a leading '/'")
        self.path = "/dev/shm/" + shm_name
        fd = os.open(self.path, os.O_RDWR)
        try:
            self.mm = mmap.mmap(fd, pool_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)
        self.size = pool_size

    def _check(self, slot: Slot) -> None:
        if slot.offset < 0 or slot.length < 0 or slot.offset + slot.length > self.size:
            raise ProtocolError(f"slot {slot} outside the pool of {self.size} bytes")

    def write(self, slot: Slot, data: bytes | np.ndarray) -> None:
        self._check(slot)
        arr = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data.view(np.uint8).reshape(-1)
        if arr.size != slot.length:
            raise ProtocolError(f"slot length {slot.length} != payload {arr.size}")
        self.buf[slot.offset : slot.offset + slot.length] = arr

    def read(self, slot: Slot) -> bytes:
        self._check(slot)
        return self.buf[slot.offset : slot.offset + slot.length].tobytes()

    def close(self) -> None:
        del self.buf
        self.mm.close()


class EngineContext:
    """One registered engine-driven context (one instance id = one rank) plus its SHM mapping."""

    def __init__(
        self,
        client: KVClient,
        instance_id: int,
        model: str,
        *,
        world_size: int = 1,
        rank: int = 0,
        num_layers: int = 2,
        hidden_dim_size: int = 64,
        dtype_str: str = "float16",
        use_mla: bool = False,
        num_physical_slots: int | None = None,
        block_size: int = 16,
    ):
        self.client = client
        self.instance_id = instance_id
        self.model = model
        self.world_size = world_size
        self.rank = rank
        self.dtype_str = dtype_str
        self.shape = slot_shape(num_layers, hidden_dim_size, use_mla, num_physical_slots)
        self.nbytes = slot_nbytes(self.shape, dtype_str)
        self.payload = RegisterEngineDrivenContextPayload(
            instance_id=instance_id,
            model_name=model,
            world_size=world_size,
            block_size=block_size,
            num_layers=num_layers,
            hidden_dim_size=hidden_dim_size,
            dtype_str=dtype_str,
            use_mla=use_mla,
            num_physical_slots=num_physical_slots,
        )
        self.reg = client.register_context(self.payload)
        self.pool = ShmPool(self.reg.shm_name, self.reg.pool_size)

    def close(self, unregister: bool = True) -> None:
        if unregister:
            self.client.unregister_context(self.instance_id)
        self.pool.close()

    def key(self, tokens: Any, start: int, end: int, request_id: str) -> IPCCacheServerKey:
        return make_key(self.model, tokens, start, end, request_id, world_size=self.world_size, worker_id=self.rank)

    def check_slot(self, slot: Slot) -> None:
        if slot.shape != self.shape or slot.dtype != self.dtype_str or slot.length != self.nbytes:
            raise ProtocolError(f"slot {slot} does not match shape {self.shape} {self.dtype_str} ({self.nbytes} bytes)")
        if slot.offset % 4096:
            raise ProtocolError(f"slot offset {slot.offset} not 4096-aligned")

    def random_chunks(self, rng: np.random.Generator, n: int) -> list[bytes]:
        return [rng.integers(0, 256, self.nbytes, dtype=np.uint8).tobytes() for _ in range(n)]

    def store(self, tokens: Any, start: int, end: int, chunks: list[bytes] | dict[int, bytes], request_id: str = "store") -> list[int]:
        """prepare_store + write + commit_store. ``chunks`` is indexed by absolute chunk number
        (list: chunk i of the token sequence). Returns the chunk_indices the server asked for."""
        key = self.key(tokens, start, end, request_id)
        ctx = store_context(self.client.prepare_store(key, self.instance_id))
        first = start // CHUNK_SIZE
        for slot, idx in zip(ctx.slots, ctx.chunk_indices):
            self.check_slot(slot)
            self.pool.write(slot, chunks[first + idx])
        ok = self.client.commit_store(key, self.instance_id, b"")
        if ctx.slots and ok is not True:
            raise ProtocolError(f"commit_store after a prepare with {len(ctx.slots)} slots returned {ok!r}")
        return ctx.chunk_indices

    def retrieve(self, tokens: Any, start: int, end: int, request_id: str) -> list[bytes] | None:
        """prepare_retrieve + copy out + commit_retrieve. None when prepare_retrieve fails."""
        key = self.key(tokens, start, end, request_id)
        resp = self.client.prepare_retrieve(key, self.instance_id)
        if not resp.success:
            if resp.data != b"" or resp.context != {}:
                raise ProtocolError(f"failed prepare_retrieve should be (False, b'', {{}}), got {resp!r}")
            return None
        if resp.data != b"":
            raise ProtocolError(f"prepare_retrieve data should be b'' in SHM mode, got {len(resp.data)} bytes")
        ctx = retrieve_context(resp)
        n = (end - start) // CHUNK_SIZE
        if len(ctx.slots) != n:
            raise ProtocolError(f"prepare_retrieve [{start},{end}) gave {len(ctx.slots)} slots, expected {n}")
        out = []
        for slot in ctx.slots:
            self.check_slot(slot)
            out.append(self.pool.read(slot))
        ok = self.client.commit_retrieve(key, self.instance_id)
        if ok is not True:
            raise ProtocolError(f"commit_retrieve after a successful prepare returned {ok!r}")
        return out
