"""The fault matrix: for each of LMCache's known failure modes, inject it into a running `kvtier
serve` (real redis-server, real filesystems), then check that

- `/api/status` names the failing node with a reason within a bound,
- readiness (`/api/healthcheck?probe=ready`) turns 503 and liveness stays 200 unless the
  process no longer works,
- what is not affected keeps serving (a noop, a retrieve of cached chunks),
- it all recovers (readiness 200 again) once the fault is removed, without a restart; a dead
  essential thread is the exception, where the defined recovery is the orchestrator's restart on
  the failed liveness probe.

Each row records its time to detect and to recover; the table is printed at the end and written
to $KVTIER_FAULT_MATRIX_OUT when set (docs/fault-matrix.md quotes one run).

Filesystem rows mount a tmpfs (disk full) and a loop-mounted ext4 image (`fsfreeze`), which needs
root, as `scripts/test` runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from conftest import Server, free_port, fresh_tokens, new_iid, start_server, stop_and_check
from kvclient import EngineContext, lookup_key

MODEL = "fault-matrix-model"
ROWS: list[tuple[str, str, float, str, float]] = []


@dataclass
class Probe:
    code: int
    body: dict


def probe(srv: Server, kind: str) -> Probe:
    try:
        with urllib.request.urlopen(f"{srv.http_url}/api/healthcheck?probe={kind}", timeout=5) as r:
            return Probe(r.status, json.loads(r.read()))
    except urllib.error.HTTPError as e:
        return Probe(e.code, json.loads(e.read()))


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `pred()` holds (fails after `timeout`)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def unready_because(srv: Server, path_part: str, reason_part: str) -> bool:
    p = probe(srv, "ready")
    if p.code != 503:
        return False
    return any(path_part in u["path"] and reason_part in u["reason"] for u in p.body.get("unhealthy", []))


def ready(srv: Server) -> bool:
    return probe(srv, "ready").code == 200


def record(fault: str, node: str, detect: float, recovery: str, recover: float) -> None:
    ROWS.append((fault, node, detect, recovery, recover))


@pytest.fixture(scope="module", autouse=True)
def matrix() -> Iterator[None]:
    yield
    lines = [
        "| fault | node named in /api/status | detected after | recovery | recovered after |",
        "|---|---|---|---|---|",
    ]
    for fault, node, d, how, r in ROWS:
        lines.append(f"| {fault} | `{node}` | {d:.1f} s | {how} | {r:.1f} s |")
    table = "\n".join(lines)
    print("\n" + table)
    out = os.environ.get("KVTIER_FAULT_MATRIX_OUT")
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")


class Redis:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kvtier-fault-redis-")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self.ping, 10, "redis-server answers PING")

    def ping(self) -> bool:
        r = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True)
        return r.stdout.strip() == "PONG"

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def inject_fault(srv: Server, body: dict) -> None:
    """POST /api/debug/fault (servers started with --enable-fault-injection)."""
    req = urllib.request.Request(
        f"{srv.http_url}/api/debug/fault", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


def engine(srv: Server, c, layers: int = 2, hidden: int = 64) -> EngineContext:
    return EngineContext(c, new_iid(), MODEL, num_layers=layers, hidden_dim_size=hidden)


def serves(srv: Server, ctx: EngineContext, tokens: list[int], n: int) -> bool:
    """The unaffected path: a noop and a retrieve of `n` cached chunks."""
    c = ctx.client
    assert c.noop() == "OK"
    rid = f"serve-{time.monotonic_ns()}"
    assert c.lookup_hits(lookup_key(MODEL, tokens[: n * 256], rid)) == n
    got = ctx.retrieve(tokens, 0, n * 256, rid)
    c.end_session(rid)
    return got is not None and len(got) == n


def test_lock_leak_starves_l1_and_recovers_when_the_locks_end(rng: np.random.Generator) -> None:
    # 64 MiB L1 of 2 MiB chunks, no background eviction: 30 stored and read-locked by a lookup
    # that is never ended leave room for 2; a store of 3 is refused.
    srv = start_server(["--l1-size-gb", "0.0625", "--eviction-trigger-watermark", "1.0", "--no-l1-prefault"])
    try:
        with srv.client() as c:
            ctx = engine(srv, c, layers=8, hidden=256)
            assert ctx.nbytes == 2 << 20
            tokens = fresh_tokens(rng, 30 * 256)
            chunks = ctx.random_chunks(rng, 30)
            for i in range(0, 30, 10):
                ctx.store(tokens, i * 256, (i + 10) * 256, chunks)
            assert c.lookup_hits(lookup_key(MODEL, tokens, "leak")) == 30  # chunks; locks all 30
            more = fresh_tokens(rng, 3 * 256)
            t0 = time.monotonic()
            assert ctx.store(more, 0, 3 * 256, ctx.random_chunks(rng, 3)) == []  # refused
            wait_for(lambda: unready_because(srv, "l1_manager", "refused every store"), 5, "L1 starved")
            detect = time.monotonic() - t0
            assert probe(srv, "live").code == 200
            assert serves(srv, ctx, tokens, 4)
            st = srv.l1()
            assert st["store_starved_seconds"] > 0 and st["read_locked_count"] == 30
            # The leak ends: the next store gets room and readiness comes back at once.
            t1 = time.monotonic()
            c.end_session("leak")
            assert len(ctx.store(more, 0, 3 * 256, ctx.random_chunks(rng, 3))) == 3
            wait_for(lambda: ready(srv), 5, "ready again")
            recover = time.monotonic() - t1
            record("lock leak (lookups never ended), L1 full of pinned objects",
                   "engine.storage_manager.l1_manager", detect, "the locks end, a store succeeds", recover)
            ctx.close()
    finally:
        stop_and_check(srv)


def resp_server(port: int, extra: list[str] | None = None) -> Server:
    adapter = json.dumps({"type": "resp", "host": "127.0.0.1", "port": port})
    return start_server(["--l2-adapter", adapter, "--l2-stuck-op-seconds", "1"] + (extra or []))


def l2_fault_row(srv: Server, rng: np.random.Generator, *, fault: str, inject: Callable[[], None],
                 reason: str, detect_within: float, remove: Callable[[], None], recovery: str,
                 recover_within: float) -> None:
    """One L2 row: chunks cached and written behind, then `inject`; a store whose write-behind
    meets the fault; readiness names an L2 adapter (with `reason` in its reason) while L1 keeps
    serving; then `remove` and readiness comes back."""
    with srv.client() as c:
        ctx = engine(srv, c)
        tokens = fresh_tokens(rng, 2 * 256)
        ctx.store(tokens, 0, 512, ctx.random_chunks(rng, 2))
        wait_for(lambda: ready(srv), 10, "ready before the fault")
        t0 = time.monotonic()
        inject()
        ctx.store(fresh_tokens(rng, 256), 0, 256, ctx.random_chunks(rng, 1))  # meets the fault behind
        wait_for(lambda: unready_because(srv, "l2_adapters", reason), detect_within, f"{fault} reported")
        detect = time.monotonic() - t0
        assert probe(srv, "live").code == 200
        assert serves(srv, ctx, tokens, 2)
        t1 = time.monotonic()
        remove()
        wait_for(lambda: ready(srv), recover_within, f"ready after: {recovery}")
        record(fault, "engine.storage_manager.l2_adapters[0]", detect, recovery, time.monotonic() - t1)
        ctx.close()


def test_hung_redis_is_stuck_work_and_recovers_when_it_answers(rng: np.random.Generator) -> None:
    redis = Redis()
    srv = resp_server(redis.port)
    try:
        l2_fault_row(srv, rng, fault="L2 hung (redis-server stopped with SIGSTOP)",
                     inject=lambda: redis.signal(signal.SIGSTOP), reason="in flight", detect_within=10,
                     remove=lambda: redis.signal(signal.SIGCONT), recovery="redis answers again",
                     recover_within=30)
    finally:
        redis.close()
        stop_and_check(srv)


def test_redis_down_is_reported_and_recovers_when_it_is_back(rng: np.random.Generator) -> None:
    redis = Redis()
    srv = resp_server(redis.port)
    try:
        l2_fault_row(srv, rng, fault="L2 down (redis-server killed)", inject=redis.kill, reason="",
                     detect_within=30, remove=redis.start, recovery="redis is back", recover_within=60)
    finally:
        redis.close()
        stop_and_check(srv)


def mount(kind: str) -> tuple[str, Callable[[], None]]:
    """A fresh mount point: a 4 MiB tmpfs ("full") or a loop-mounted ext4 image ("ext4")."""
    mnt = tempfile.mkdtemp(prefix=f"kvtier-fault-{kind}-")
    if kind == "full":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt], check=True)
        img = None
    else:
        img = mnt + ".img"
        subprocess.run(["truncate", "-s", "64M", img], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
        subprocess.run(["mount", "-o", "loop", img, mnt], check=True)

    def cleanup() -> None:
        subprocess.run(["fsfreeze", "-u", mnt], capture_output=True)
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(mnt, ignore_errors=True)
        if img:
            os.unlink(img)

    return mnt, cleanup


def fs_server(path: str) -> Server:
    adapter = json.dumps({"type": "fs", "base_path": path})
    return start_server(["--l2-adapter", adapter, "--l2-stuck-op-seconds", "1"])


def test_frozen_disk_is_stuck_work_and_recovers_when_thawed(rng: np.random.Generator) -> None:
    mnt, cleanup = mount("ext4")
    srv = fs_server(mnt)
    try:
        l2_fault_row(srv, rng, fault="disk frozen (fsfreeze on the fs adapter's filesystem)",
                     inject=lambda: subprocess.run(["fsfreeze", "-f", mnt], check=True), reason="in flight",
                     detect_within=15, remove=lambda: subprocess.run(["fsfreeze", "-u", mnt], check=True),
                     recovery="the filesystem is thawed", recover_within=30)
    finally:
        subprocess.run(["fsfreeze", "-u", mnt], capture_output=True)
        stop_and_check(srv)
        cleanup()


def test_full_disk_is_reported_and_recovers_when_space_returns(rng: np.random.Generator) -> None:
    mnt, cleanup = mount("full")
    ballast = os.path.join(mnt, "ballast")

    def fill() -> None:
        with open(ballast, "wb", buffering=0) as f:  # unbuffered: close cannot fail
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
            except OSError:
                pass

    srv = fs_server(mnt)
    try:
        l2_fault_row(srv, rng, fault="disk full (tmpfs filled)", inject=fill, reason="", detect_within=15,
                     remove=lambda: os.unlink(ballast), recovery="space is freed", recover_within=60)
    finally:
        stop_and_check(srv)
        cleanup()


def test_a_dead_eviction_thread_fails_liveness(rng: np.random.Generator) -> None:
    srv = start_server(["--enable-fault-injection"])
    try:
        with srv.client() as c:
            ctx = engine(srv, c)
            tokens = fresh_tokens(rng, 256)
            ctx.store(tokens, 0, 256, ctx.random_chunks(rng, 1))
            assert probe(srv, "live").code == 200
            t0 = time.monotonic()
            inject_fault(srv, {"component": "l1_eviction_controller"})
            wait_for(lambda: probe(srv, "live").code == 503, 5, "not live")
            detect = time.monotonic() - t0
            body = probe(srv, "live").body
            assert any("l1_eviction_controller" in p["path"] and "not running" in p["reason"] for p in body["not_live"])
            assert probe(srv, "ready").code == 503
            assert serves(srv, ctx, tokens, 1)  # requests are still answered meanwhile
            ctx.close()
        record("dead eviction thread (crash injected)", "engine.storage_manager.l1_eviction_controller",
               detect, "liveness 503: the orchestrator restarts the process", 0.0)
    finally:
        stop_and_check(srv)


def test_a_stalled_eviction_thread_is_reported_until_its_round_ends(rng: np.random.Generator) -> None:
    srv = start_server(["--enable-fault-injection"])
    try:
        with srv.client() as c:
            ctx = engine(srv, c)
            tokens = fresh_tokens(rng, 256)
            ctx.store(tokens, 0, 256, ctx.random_chunks(rng, 1))
            t0 = time.monotonic()
            inject_fault(srv, {"component": "l1_eviction_controller", "stall_seconds": 8})
            # The eviction thread's stall threshold is 30 rounds of 100 ms, at least 5 s.
            wait_for(lambda: unready_because(srv, "l1_eviction_controller", "stalled"), 10, "stall reported")
            detect = time.monotonic() - t0
            assert probe(srv, "live").code == 200  # a stalled round may still end
            assert serves(srv, ctx, tokens, 1)
            wait_for(lambda: ready(srv), 15, "ready once the round ends")
            recover = time.monotonic() - t0 - 8.0
            record("stalled eviction thread (a round hung for 8 s)", "engine.storage_manager.l1_eviction_controller",
                   detect, "the round ends", max(recover, 0.0))
            ctx.close()
    finally:
        stop_and_check(srv)


def test_a_dead_engine_is_reaped_and_its_reservations_released(rng: np.random.Generator) -> None:
    # A dead engine is not the server's fault: readiness stays 200 (taking the server out of
    # service because one client died would hurt every other client). The status names it by
    # counting the reaping, and what the engine held is released.
    srv = start_server(["--worker-reap-timeout-seconds", "30"])
    try:
        with srv.client() as c, srv.client() as other:
            ctx = engine(srv, c)
            alive = engine(srv, other)
            assert c.ping(ctx.instance_id) is True
            tokens = fresh_tokens(rng, 512)
            c.prepare_store(ctx.key(tokens, 0, 512, "dying"), ctx.instance_id)  # never committed
            assert srv.l1()["write_locked_count"] == 2
            t0 = time.monotonic()  # the engine stops pinging here
            mine = fresh_tokens(rng, 256)
            deadline = time.monotonic() + 45
            while srv.status()["worker_liveness"]["reaped_instances_total"] < 1:
                assert time.monotonic() < deadline, "the dead engine was not reaped"
                assert other.ping(alive.instance_id) is True
                time.sleep(0.5)
            detect = time.monotonic() - t0
            assert srv.l1()["write_locked_count"] == 0
            assert ready(srv)
            alive.store(mine, 0, 256, alive.random_chunks(rng, 1))
            assert serves(srv, alive, mine, 1)
            record("dead engine (stops pinging; reap timeout 30 s)", "engine.worker_liveness",
                   detect, "reaped: its reservations are released; readiness stays 200", 0.0)
            alive.close()
    finally:
        stop_and_check(srv)


def test_probe_parameter_is_checked() -> None:
    srv = start_server()
    try:
        assert probe(srv, "live").body == {"status": "live"}
        assert probe(srv, "ready").code == 200
        try:
            urllib.request.urlopen(f"{srv.http_url}/api/healthcheck?probe=sideways", timeout=5)
            raise AssertionError("expected 400")
        except urllib.error.HTTPError as e:
            assert e.code == 400 and "sideways" in e.read().decode()
    finally:
        stop_and_check(srv)
