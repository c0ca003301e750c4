"""The router-facing KV-event publisher (`--kv-events-publisher`), read the way a vLLM KV-event
subscriber reads vLLM's own publisher: a ZeroMQ SUB socket, `[topic, seq, payload]` messages,
payloads decoded with msgspec structs written from vLLM's `vllm/distributed/kv_events.py`, and
a REQ socket on the replay endpoint to recover missed batches."""

from __future__ import annotations

import json
import tempfile
import time

import msgspec
import numpy as np
import pytest
import zmq

from conftest import Server, free_port, fresh_tokens, new_iid, start_server, stop_and_check, wait_until
from kvclient import EngineContext

MODEL = "kve-pub-model"
INSTANCE = "node-a"


# vLLM's current structs (maps, tag key "type", omit_defaults).
class EventBatch(msgspec.Struct, omit_defaults=True, gc=False):
    ts: float
    events: list
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list | None = None
    group_idx: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


# vLLM's older structs (array_like=True; hashes are ints; no lora_name).
class OldEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list


class OldEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class OldBlockStored(OldEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class OldBlockRemoved(OldEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None


class OldAllBlocksCleared(OldEvent, tag="AllBlocksCleared"):
    pass


class OldKVEventBatch(OldEventBatch):
    events: list[OldBlockStored | OldBlockRemoved | OldAllBlocksCleared]


DEC = msgspec.msgpack.Decoder(KVEventBatch)
OLD_DEC = msgspec.msgpack.Decoder(OldKVEventBatch)
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class Sub:
    """A vLLM-style subscriber: SUB for live batches and a DEALER for replays (a replay answers one
    request with many messages, `[b"", seq, payload]`, which a REQ socket cannot read past the
    first; the frames are the same)."""

    def __init__(self, pub: str, replay: str, topic: str = "", start: int | None = None) -> None:
        """`start`: the first sequence number this subscriber must see. When given, `collect`
        fills any gap in the live stream (a slow joiner's first batches, a dropped message)
        from the replay socket, as a vLLM subscriber does, so no assertion depends on how fast
        the subscription reaches the server."""
        self.next = start
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt_string(zmq.SUBSCRIBE, topic)
        self.sub.connect(pub)
        self.req = self.ctx.socket(zmq.DEALER)
        self.req.setsockopt(zmq.LINGER, 0)
        self.req.connect(replay)
        time.sleep(0.3)  # PUB/SUB slow joiner (a gap is replayed when `start` is known)

    def recv(self, timeout: float = 5.0) -> tuple[str, int, bytes] | None:
        if not self.sub.poll(int(timeout * 1000)):
            return None
        topic, seq, payload = self.sub.recv_multipart()
        return topic.decode(), int.from_bytes(seq, "big"), payload

    def collect(self, pred, timeout: float = 10.0) -> list[tuple[str | None, int, bytes]]:
        """Messages until `pred(all events so far)` holds. A message that came from the replay
        socket (filling a gap) has topic None."""
        out: list[tuple[str | None, int, bytes]] = []
        events: list = []
        deadline = time.monotonic() + timeout
        while not pred(events):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; got {events}"
            for m in self._next_messages(min(left, 1.0)):
                out.append(m)
                events.extend(DEC.decode(m[2]).events)
        return out

    def _next_messages(self, timeout: float) -> list[tuple[str | None, int, bytes]]:
        m = self.recv(timeout)
        if self.next is None:
            if m is not None:
                self.next = m[1] + 1
            return [m] if m is not None else []
        if m is None:
            # Nothing live for a while: ask for whatever was published since.
            got = [(None, s, p) for s, p in self.replay(self.next) if s >= self.next]
        elif m[1] < self.next:
            return []  # already replayed
        else:
            got = [(None, s, p) for s, p in self.replay(self.next) if self.next <= s < m[1]] if m[1] > self.next else []
            got.append(m)
        if got:
            self.next = got[-1][1] + 1
        return got

    def replay(self, start: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
        self.req.send_multipart([b"", start.to_bytes(8, "big")])
        got = []
        while True:
            assert self.req.poll(int(timeout * 1000)), "no replay answer"
            delim, seq, payload = self.req.recv_multipart()
            assert delim == b""
            if seq == END_SEQ:
                assert payload == b""
                return got
            got.append((int.from_bytes(seq, "big"), payload))

    def close(self) -> None:
        self.sub.close()
        self.req.close()
        self.ctx.term()


def publisher_server(extra: list[str] | None = None) -> tuple[Server, str, str]:
    pub, rep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    srv = start_server(
        ["--kv-events-publisher", pub, "--kv-events-replay", rep, "--instance-id", INSTANCE] + (extra or [])
    )
    return srv, pub, rep


def of(events, cls, medium=None):
    return [e for e in events if isinstance(e, cls) and (medium is None or e.medium == medium)]


def test_l1_and_l2_changes_are_published_in_vllm_format_and_replayable(rng: np.random.Generator) -> None:
    base = tempfile.mkdtemp(prefix="kvtier-pub-fs-")
    # Room for two chunks on disk: the third store evicts the oldest file (BlockRemoved DISK).
    fs = json.dumps({"type": "fs", "base_path": base, "max_capacity_gb": 280e3 / (1 << 30)})
    srv, pub, rep = publisher_server(["--l2-adapter", fs])
    sub = Sub(pub, rep, topic=f"kv@{INSTANCE}@", start=0)
    try:
        with srv.client() as w:
            ctx = EngineContext(w, new_iid(), MODEL, num_layers=2, hidden_dim_size=64)
            tokens = fresh_tokens(rng, 3 * 256)
            ctx.store(tokens, 0, 512, ctx.random_chunks(rng, 2))
            msgs = sub.collect(lambda ev: len(of(ev, BlockStored, "CPU")) >= 2 and len(of(ev, BlockStored, "DISK")) >= 2)
            seqs = [s for _, s, _ in msgs]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
            events = [e for _, _, p in msgs for e in DEC.decode(p).events]
            cpu = of(events, BlockStored, "CPU")
            assert [e.token_ids for e in cpu] == [list(tokens[:256]), list(tokens[256:512])]
            assert all(e.block_size == 256 and e.lora_id is None and e.lora_name is None for e in cpu)
            assert all(len(e.block_hashes) == 1 and len(e.block_hashes[0]) == 32 for e in cpu)
            assert cpu[0].parent_block_hash is None
            assert cpu[1].parent_block_hash == cpu[0].block_hashes[0]
            disk = of(events, BlockStored, "DISK")
            assert sorted(e.block_hashes[0] for e in disk) == sorted(e.block_hashes[0] for e in cpu)

            # A third chunk pushes the first one off the disk.
            ctx.store(tokens, 512, 768, {2: ctx.random_chunks(rng, 1)[0]})
            more = sub.collect(lambda ev: len(of(ev, BlockRemoved, "DISK")) >= 1)
            removed = of([e for _, _, p in more for e in DEC.decode(p).events], BlockRemoved, "DISK")
            assert removed[0].block_hashes[0] in {e.block_hashes[0] for e in disk}

            # A forced clear removes every L1 chunk (the disk keeps its copies).
            w.clear(force=True)
            cleared = sub.collect(lambda ev: len(of(ev, BlockRemoved, "CPU")) >= 3)
            gone = of([e for _, _, p in cleared for e in DEC.decode(p).events], BlockRemoved, "CPU")
            assert len({e.block_hashes[0] for e in gone}) == 3
            # Every message that came live (not filled from the replay socket) had the topic.
            topics = [t for t, _, _ in msgs + more + cleared if t is not None]
            assert topics and all(t == f"kv@{INSTANCE}@{MODEL}" for t in topics), topics
            ctx.close()

        # Replay from the first sequence returns every batch, byte for byte, then the end marker.
        live = {s: p for _, s, p in msgs + more + cleared}
        replayed = sub.replay(min(live))
        seqs = [s for s, _ in replayed]
        assert seqs == list(range(min(live), min(live) + len(seqs))) and set(live) <= set(seqs)
        for s, p in replayed:
            if s in live:
                assert live[s] == p
        # A start past the end: only the end marker.
        assert sub.replay(max(live) + 100) == []
        # A malformed request is ignored (counted); the socket keeps working.
        raw = sub.ctx.socket(zmq.DEALER)
        raw.connect(rep)
        raw.send_multipart([b"", b"bad"])
        raw.close(linger=2000)
        assert sub.replay(max(live)) and True
        assert wait_until(lambda: srv.status()["kv_events_publisher"]["invalid_replay_requests_total"] >= 1,
                          timeout=10), srv.status()["kv_events_publisher"]

        st = srv.status()
        node = st["kv_events_publisher"]
        assert node["is_healthy"] is True and node["thread_alive"] is True
        assert node["endpoint"] == pub and node["replay_endpoint"] == rep
        assert node["batches_total"] >= len(live) and node["replay_requests_total"] >= 3
        assert node["invalid_replay_requests_total"] >= 1
        media = st["kv_events"]["records_by_medium"]
        assert media["CPU"]["stored"] >= 3 and media["CPU"]["removed"] >= 3
        assert media["DISK"]["stored"] >= 3 and media["DISK"]["removed"] >= 1
        with urllib_open(srv.http_url + "/metrics") as body:
            assert 'kvtier_kv_events_records_total{kind="stored",medium="DISK"}' in body
            assert "kvtier_kv_events_pub_batches_total" in body
    finally:
        sub.close()
        stop_and_check(srv)


def test_objects_already_on_disk_at_start_are_announced(rng: np.random.Generator) -> None:
    base = tempfile.mkdtemp(prefix="kvtier-pub-fs-restart-")
    fs = json.dumps({"type": "fs", "base_path": base})
    first = start_server(["--l2-adapter", fs])
    try:
        with first.client() as w:
            ctx = EngineContext(w, new_iid(), MODEL, num_layers=2, hidden_dim_size=64)
            ctx.store(fresh_tokens(rng, 512), 0, 512, ctx.random_chunks(rng, 2))
            ctx.close()
        deadline = time.monotonic() + 20
        while first.status()["storage_manager"]["l2_adapters"][0]["stored_object_count"] < 2:
            assert time.monotonic() < deadline, "write-behind did not finish"
            time.sleep(0.05)
    finally:
        stop_and_check(first)
    srv, pub, rep = publisher_server(["--l2-adapter", fs])
    sub = Sub(pub, rep)
    try:
        # Announced while the server started, before anyone subscribed: the replay has them.
        events = [e for _, p in sub.replay(0) for e in DEC.decode(p).events]
        disk = of(events, BlockStored, "DISK")
        assert len(disk) == 2 and all(e.token_ids == [] and e.block_size == 0 for e in disk), events
    finally:
        sub.close()
        stop_and_check(srv)


def test_a_subscriber_that_missed_batches_recovers_them_through_replay(rng: np.random.Generator) -> None:
    srv, pub, rep = publisher_server()
    try:
        with srv.client() as w:
            ctx = EngineContext(w, new_iid(), MODEL, num_layers=2, hidden_dim_size=64)
            early = fresh_tokens(rng, 256)
            ctx.store(early, 0, 256, ctx.random_chunks(rng, 1))  # published before anyone listens
            time.sleep(0.3)
            sub = Sub(pub, rep)
            try:
                late = fresh_tokens(rng, 256)
                ctx.store(late, 0, 256, ctx.random_chunks(rng, 1))
                _, seq, payload = sub.collect(lambda ev: len(ev) >= 1)[0]
                assert seq >= 1, "the first batch was published before the subscriber joined"
                assert DEC.decode(payload).events[0].token_ids == list(late)
                # The gap (seq 0 .. seq-1) comes back from the replay socket.
                missed = [(s, DEC.decode(p)) for s, p in sub.replay(0) if s < seq]
                assert [s for s, _ in missed] == list(range(seq))
                assert any(e.token_ids == list(early) for _, b in missed for e in b.events)
            finally:
                sub.close()
            ctx.close()
    finally:
        stop_and_check(srv)


def test_array_encoding_decodes_with_vllms_array_like_structs(rng: np.random.Generator) -> None:
    srv, pub, rep = publisher_server(["--kv-events-encoding", "array", "--kv-events-topic", "{model}"])
    sub = Sub(pub, rep, topic=MODEL)
    try:
        with srv.client() as w:
            ctx = EngineContext(w, new_iid(), MODEL, num_layers=2, hidden_dim_size=64)
            tokens = fresh_tokens(rng, 512)
            ctx.store(tokens, 0, 512, ctx.random_chunks(rng, 2))
            got = []
            deadline = time.monotonic() + 10
            while len(got) < 2 and time.monotonic() < deadline:
                m = sub.recv(1.0)
                if m:
                    assert m[0] == MODEL
                    got.extend(OLD_DEC.decode(m[2]).events)
            assert [type(e) for e in got] == [OldBlockStored, OldBlockStored], got
            assert got[1].parent_block_hash == got[0].block_hashes[0]
            assert [e.token_ids for e in got] == [list(tokens[:256]), list(tokens[256:])]
            assert all(isinstance(h, int) for e in got for h in e.block_hashes)
            ctx.close()
    finally:
        sub.close()
        stop_and_check(srv)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kv-events-replay", "tcp://127.0.0.1:1"], "--kv-events-replay needs --kv-events-publisher"),
        (["--kv-events-publisher", "udp://x:1"], "--kv-events-publisher"),
        (["--kv-events-publisher", "tcp://127.0.0.1:5", "--kv-event-log-size", "0"], "--kv-event-log-size must be > 0"),
        (["--kv-events-publisher", "tcp://127.0.0.1:5", "--kv-events-encoding", "json"], "json"),
    ],
)
def test_bad_publisher_flags_exit_2_naming_the_flag(flags: list[str], message: str) -> None:
    import subprocess

    from conftest import kvtier_bin

    r = subprocess.run([kvtier_bin(), "serve", *flags], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr, r.stderr


def test_a_busy_endpoint_fails_start_up_with_the_flag_named() -> None:
    import subprocess

    from conftest import kvtier_bin

    ctx = zmq.Context()
    s = ctx.socket(zmq.PUB)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    try:
        r = subprocess.run(
            [kvtier_bin(), "serve", "--port", str(free_port()), "--http-port", "0", "--no-l1-prefault",
             "--l1-size-gb", "0.0625", "--kv-events-publisher", f"tcp://127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=30,
        )
        assert r.returncode != 0
        assert f"--kv-events-publisher tcp://127.0.0.1:{port}" in r.stderr, r.stderr
    finally:
        s.close(0)
        ctx.term()


def urllib_open(url: str):
    import contextlib
    import urllib.request

    @contextlib.contextmanager
    def _cm():
        with urllib.request.urlopen(url, timeout=5) as r:
            yield r.read().decode()

    return _cm()
