"""Independent replicas of the LMCache 0.5.6 wire types used by the multiprocess server.

Written from the observed wire format (shared/reference/lmcache-observed.md §5), not from LMCache's
code. msgspec encodes a dataclass as a msgpack map holding *all* fields in declaration order, which is
exactly what LMCache's own client sends, so the field order below is part of the wire format.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import blake3

CHUNK_SIZE = 256
PAGE = 4096

# ---------------------------------------------------------------------------------------------------
# Request payload types (encoded by the client)
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class IPCCacheServerKey:
    model_name: str
    world_size: int
    worker_id: int | None
    token_ids: tuple[int, ...]
    start: int
    end: int
    request_id: str
    cache_salt: str = ""
    request_configs: dict | None = None
    num_kv_readers: int = 0


@dataclasses.dataclass
class RegisterEngineDrivenContextPayload:
    instance_id: int
    model_name: str
    world_size: int
    block_size: int
    num_layers: int
    hidden_dim_size: int
    dtype_str: str
    use_mla: bool
    num_physical_slots: int | None = None


@dataclasses.dataclass
class BlockAllocationRecord:
    req_id: str
    new_block_ids: list[list[int]]
    new_token_ids: list[int]


# ---------------------------------------------------------------------------------------------------
# Response types (decoded strictly by the client)
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RegisterEngineDrivenContextResponse:
    shm_name: str
    pool_size: int


@dataclasses.dataclass
class PrepareStoreResponse:
    context: dict


@dataclasses.dataclass
class PrepareRetrieveResponse:
    success: bool
    data: bytes
    context: dict


@dataclasses.dataclass
class Slot:
    """One SHM slot descriptor inside a prepare_store / prepare_retrieve context."""

    offset: int
    length: int
    shape: list[int]
    dtype: str


@dataclasses.dataclass
class StoreContext:
    slots: list[Slot]
    chunk_indices: list[int]


@dataclasses.dataclass
class RetrieveContext:
    slots: list[Slot]


# ---------------------------------------------------------------------------------------------------
# Operation table (lmcache 0.5.6 legacy wire ids; ops without an id travel as their name)
# ---------------------------------------------------------------------------------------------------

OP_IDS: dict[str, int] = {
    "register_kv_cache": 1,
    "unregister_kv_cache": 2,
    "register_q_cache": 3,
    "unregister_q_cache": 4,
    "store_q": 5,
    "store": 6,
    "retrieve": 7,
    "lookup": 8,
    "query_prefetch_status": 9,
    "wait_prefetch_status": 10,
    "free_lookup_locks": 12,
    "end_session": 13,
    "register_kv_cache_engine_driven_context": 14,
    "unregister_kv_cache_engine_driven_context": 15,
    "prepare_store": 16,
    "commit_store": 17,
    "prepare_retrieve": 18,
    "commit_retrieve": 19,
    "clear": 20,
    "get_chunk_size": 21,
    "ping": 22,
    "report_block_allocation": 23,
    "noop": 24,
    "cb_register_rope": 25,
    "cb_unregister_rope": 26,
    "cb_retrieve_pre_computed": 27,
    "cb_unified_lookup": 28,
    "p2p_lookup_and_lock": 29,
    "p2p_query_lookup_results": 30,
    "p2p_unlock_objects": 31,
    "get_experimental": 32,
    "cb_protocol_handshake": 33,
}

# Operations that only exist as a string on the wire.
NAME_ONLY_OPS = ("cb_reorder_plan", "subscribe_kv_events", "server_module_call")

# Payload arity of each operation (the client always sends the full arity).
OP_ARITY: dict[str, int] = {
    "register_kv_cache": 7,
    "unregister_kv_cache": 1,
    "store": 4,
    "retrieve": 5,
    "lookup": 2,
    "query_prefetch_status": 1,
    "wait_prefetch_status": 2,
    "free_lookup_locks": 2,
    "end_session": 1,
    "register_kv_cache_engine_driven_context": 1,
    "unregister_kv_cache_engine_driven_context": 1,
    "prepare_store": 2,
    "commit_store": 3,
    "prepare_retrieve": 2,
    "commit_retrieve": 2,
    "clear": 1,
    "get_chunk_size": 0,
    "ping": 1,
    "report_block_allocation": 3,
    "noop": 0,
    "p2p_lookup_and_lock": 2,
    "get_experimental": 0,
    "cb_reorder_plan": 3,
}

# ---------------------------------------------------------------------------------------------------
# dtypes and chunk geometry
# ---------------------------------------------------------------------------------------------------

DTYPE_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def slot_shape(
    num_layers: int,
    hidden_dim_size: int,
    use_mla: bool,
    num_physical_slots: int | None,
    chunk_size: int = CHUNK_SIZE,
) -> list[int]:
    s = num_physical_slots if num_physical_slots is not None else chunk_size
    if use_mla:
        return [num_layers, s, hidden_dim_size]
    return [2, num_layers, s, hidden_dim_size]


def slot_nbytes(shape: list[int], dtype_str: str) -> int:
    n = DTYPE_ITEMSIZE[dtype_str]
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------------------------------------------
# Chunk hash chain (identity of a chunk; lmcache-observed.md §5.6)
# ---------------------------------------------------------------------------------------------------

NONE_HASH = blake3.blake3(bytes(12)).digest()


def chunk_hashes(tokens: list[int] | tuple[int, ...], chunk_size: int = CHUNK_SIZE) -> list[bytes]:
    """Hash chain over the full chunks of ``tokens``."""
    out: list[bytes] = []
    prev = NONE_HASH
    for i in range(len(tokens) // chunk_size):
        chunk = tokens[i * chunk_size : (i + 1) * chunk_size]
        h = blake3.blake3(prev)
        h.update(struct.pack(f">{len(chunk)}I", *chunk))
        prev = h.digest()
        out.append(prev)
    return out


def kv_rank(world_size: int, rank: int) -> int:
    return (world_size << 24) | (rank << 16) | (world_size << 8) | rank


def as_plain(obj: Any) -> Any:
    """dataclass -> dict (for readable assertion messages)."""
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return obj
