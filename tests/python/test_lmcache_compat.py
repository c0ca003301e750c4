"""kvtier as a drop-in for `lmcache server` 0.5.6 (docs/lmcache-compatibility.md).

- Every flag of LMCache's own `lmcache server --help` is accepted by `kvtier serve`: mapped,
  accepted without effect (logged at INFO), or refused with exit 2 naming it. A flag the help
  lists and this file does not know fails the test, so new upstream flags show up.
- The production command line of LMCache issue #4676 (sizes cut to fit) starts kvtier.
- LMCache's lenient wire semantics, one test per row of the compatibility table. With
  KVTIER_WIRE_TARGET=lmcache the same rows run against the real `lmcache server` (to keep the
  table honest); each row states both answers.
- LMCache's CLI tools (`describe kvcache`, `ping kvcache`, `kvcache clear`, `quota ...`) are
  conformance clients, checked field by field.

The lmcache==0.5.6 virtualenv comes from scripts/lmcache-venv ($LMCACHE_VENV overrides).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from conftest import REPO, free_port, kvtier_bin, new_shm_name, new_iid, fresh_tokens, wait_until
from kvclient import EngineContext, KVClient, NoReply, make_key, store_context

TELEMETRY_OFF = {"LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1", "LMCACHE_DISABLE_BANNER": "1",
                 "CUDA_VISIBLE_DEVICES": ""}


def lmcache_venv() -> Path:
    v = os.environ.get("LMCACHE_VENV")
    if not v:
        v = subprocess.run([str(REPO / "scripts" / "lmcache-venv")], check=True, capture_output=True,
                           text=True).stdout.strip()
    return Path(v)


def lmcache_env() -> dict[str, str]:
    return {**os.environ, **TELEMETRY_OFF}


# --- flags ------------------------------------------------------------------------------------------

# flag -> (disposition, arguments given with it). Values are valid for `lmcache server`.
FLAGS: dict[str, tuple[str, list[str]]] = {
    "--instance-id": ("mapped", ["node-a"]),
    "--transport": ("refused", ["grpc"]),
    "--host": ("mapped", ["127.0.0.1"]),
    "--port": ("mapped", ["{port}"]),
    "--chunk-size": ("mapped", ["256"]),
    "--null-block-id": ("noted", ["0"]),
    "--max-workers": ("mapped", ["2"]),
    "--max-gpu-workers": ("mapped", ["1"]),
    "--max-cpu-workers": ("mapped", ["3"]),
    "--grpc-server-workers": ("noted", ["32"]),
    "--hash-algorithm": ("mapped", ["blake3"]),
    "--engine-type": ("refused", ["blend"]),
    "--supported-transfer-mode": ("noted", ["auto"]),
    "--isolated-ipc": ("refused", []),
    "--no-isolated-ipc": ("noted", []),
    "--runtime-plugin-locations": ("refused", ["/opt/plugins"]),
    "--runtime-plugin-config": ("noted", ["{}"]),
    "--shm-name": ("mapped", ["{shm}"]),
    "--script-allowed-imports": ("noted", ["numpy"]),
    "--run-script-api-enabled": ("refused", []),
    "--no-run-script-api-enabled": ("noted", []),
    "--separate-object-groups": ("refused", []),
    "--no-separate-object-groups": ("noted", []),
    "--worker-reap-timeout-seconds": ("mapped", ["120"]),
    "--session-ttl-seconds": ("mapped", ["600"]),
    "--worker-registration-grace-seconds": ("mapped", ["3600"]),
    "--enable-segmented-prefix": ("noted", []),
    "--enable-dedup-content": ("noted", []),
    "--enable-blend-reorder": ("noted", []),
    "--enable": ("refused", ["transfer_query"]),
    "--kv-event-log-size": ("mapped", ["32768"]),
    "--server-module": ("refused", ['{"module_path":"m","factory_name":"f","config":{}}']),
    "--p2p-advertise-url": ("refused", ["tcp://10.0.0.1:7000"]),
    "--p2p-listen-url": ("refused", ["tcp://0.0.0.0:7000"]),
    "--p2p-lookup-timeout": ("noted", ["30"]),
    "--p2p-load-timeout": ("noted", ["30"]),
    "--p2p-transfer-engine": ("noted", ["nixl"]),
    "--l1-manager": ("refused", ['{"type":"DRAM","tag":"d","size_gb":1}']),
    "--l1-size-gb": ("mapped", ["0.0625"]),
    "--l1-use-lazy": ("noted", []),
    "--no-l1-use-lazy": ("noted", []),
    "--l1-init-size-gb": ("mapped", ["20"]),
    "--l1-align-bytes": ("mapped", ["4096"]),
    "--l1-use-hugepages": ("refused", []),
    "--no-l1-use-hugepages": ("noted", []),
    "--l1-devdax-path": ("refused", ["/dev/dax0.0"]),
    "--gds-l1-path": ("refused", ["/mnt/gds"]),
    "--gds-l1-use-direct-io": ("noted", []),
    "--no-gds-l1-use-direct-io": ("noted", []),
    "--gds-l1-backend": ("noted", ["auto"]),
    "--l1-write-ttl-seconds": ("mapped", ["600"]),
    "--l1-read-ttl-seconds": ("mapped", ["300"]),
    "--eviction-policy": ("mapped", ["LRU"]),
    "--eviction-trigger-watermark": ("mapped", ["0.8"]),
    "--eviction-ratio": ("mapped", ["0.2"]),
    "--l2-store-policy": ("refused", ["skip_l1"]),
    "--l2-prefetch-policy": ("refused", ["retain"]),
    "--l2-prefetch-max-in-flight": ("mapped", ["8"]),
    "--periodic-notifier-interval-ms": ("noted", ["5"]),
    "--l2-adapter": ("mapped", ['{"type":"mock","max_size_gb":0.0625,"mock_bandwidth_gb":10}']),
    "--http-host": ("mapped", ["127.0.0.1"]),
    "--http-port": ("mapped", ["{http_port}"]),
    "--disable-observability": ("noted", []),
    "--disable-metrics": ("noted", []),
    "--disable-grpc-metrics": ("noted", []),
    "--disable-logging": ("noted", []),
    "--enable-tracing": ("noted", []),
    "--otlp-endpoint": ("noted", ["http://127.0.0.1:4317"]),
    "--event-bus-queue-size": ("noted", ["10000"]),
    "--prometheus-port": ("noted", ["9090"]),
    "--metrics-sample-rate": ("noted", ["0.01"]),
    "--lookup-hash-log-dir": ("refused", ["/tmp/lookup-hashes"]),
    "--lookup-hash-log-rotation-interval": ("noted", ["21600"]),
    "--lookup-hash-log-rotation-max-size": ("noted", ["104857600"]),
    "--lookup-hash-log-max-files": ("noted", ["100"]),
    "--enable-gc-monitor": ("noted", []),
    "--gc-monitor-min-pause-ms": ("noted", ["1.0"]),
    "--gc-monitor-top-objects": ("noted", ["0"]),
    "--enable-extra-logging": ("noted", []),
    "--extra-logging-interval": ("noted", ["10"]),
    "--trace-level": ("refused", ["storage"]),
    "--trace-output": ("noted", ["/tmp/trace.out"]),
    "--coordinator-url": ("refused", ["http://10.0.0.1:9000"]),
    "--coordinator-advertise-ip": ("noted", ["10.0.0.2"]),
    "--coordinator-heartbeat-interval": ("noted", ["5"]),
    "--coordinator-event-reporting": ("noted", []),
    "--coordinator-event-flush-interval": ("noted", ["1"]),
    "--coordinator-event-transport": ("noted", ["http"]),
    "--coordinator-kafka-bootstrap-servers": ("noted", ["k:9092"]),
    "--coordinator-kafka-topic": ("noted", ["events"]),
    "--coordinator-kafka-delivery-timeout": ("noted", ["5"]),
    "--coordinator-blend-timeout": ("noted", ["5"]),
    "--coordinator-blend-match-concurrency": ("noted", ["4"]),
    "--coordinator-l2-event-reporting": ("noted", []),
    "--coordinator-l2-event-flush-interval": ("noted", ["1"]),
    # options of the `lmcache` CLI that `lmcache server --help` lists too
    "--format": ("noted", ["terminal"]),
    "--output": ("noted", ["/tmp/metrics.txt"]),
    "--quiet": ("noted", []),
}


@pytest.fixture(scope="module")
def lmcache_server_flags() -> list[str]:
    venv = lmcache_venv()
    r = subprocess.run([str(venv / "bin" / "lmcache"), "server", "--help"], capture_output=True, text=True,
                       env=lmcache_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    flags = []
    for line in r.stdout.splitlines():
        m = re.match(r"^  (-\w, )?(--[\w-]+)(, (--[\w-]+))?", line)
        if m:
            flags += [f for f in (m.group(2), m.group(4)) if f and f != "--help"]
    assert len(flags) > 80, r.stdout[:2000]
    return flags


def run_one(flag: str, disposition: str, values: list[str]) -> str | None:
    """Starts kvtier with `flag`; returns a failure message or None."""
    port, http_port, shm = free_port(), free_port(), new_shm_name()
    subst = {"{port}": str(port), "{http_port}": str(http_port), "{shm}": shm}
    base = {"--host": ["127.0.0.1"], "--port": [str(port)], "--http-port": [str(http_port)],
            "--l1-size-gb": ["0.0625"], "--shm-name": [shm], "--max-workers": ["1"]}
    base.pop(flag, None)
    args = [kvtier_bin(), "serve", "--no-l1-prefault"]
    for k, v in base.items():
        args += [k, *v]
    args += [flag, *[subst.get(v, v) for v in values]]
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if disposition == "refused":
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            return f"{flag}: expected a refusal, but kvtier started"
        if proc.returncode != 2 or flag not in out or "not supported" not in out:
            return f"{flag}: expected exit 2 naming it, got {proc.returncode}: {out[-500:]}"
        return None
    try:
        with KVClient(f"tcp://127.0.0.1:{port}", timeout=0.25) as c:
            deadline = time.monotonic() + 20
            while True:
                if proc.poll() is not None:
                    return f"{flag}: kvtier exited {proc.returncode}: {proc.stdout.read()[-800:]}"
                try:
                    c.get_chunk_size()
                    break
                except NoReply:
                    if time.monotonic() > deadline:
                        return f"{flag}: kvtier did not answer within 20 s"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    if proc.returncode != 0:
        return f"{flag}: exit {proc.returncode} after SIGTERM: {out[-800:]}"
    noted = "lmcache flag accepted without effect" in out
    if disposition == "noted" and not noted:
        return f"{flag}: no INFO line saying it has no effect: {out[-800:]}"
    if disposition == "mapped" and noted:
        return f"{flag}: mapped, but logged as having no effect"
    return None


def test_every_lmcache_server_flag_is_mapped_noted_or_refused(lmcache_server_flags: list[str]):
    unknown = [f for f in lmcache_server_flags if f not in FLAGS]
    assert not unknown, f"`lmcache server --help` lists flags this test does not know (new upstream?): {unknown}"
    with ThreadPoolExecutor(6) as pool:
        failures = [m for m in pool.map(lambda f: run_one(f, *FLAGS[f]), lmcache_server_flags) if m]
    assert not failures, "\n".join(failures)


def test_issue_4676_command_line():
    """The production line of LMCache issue #4676, sizes cut to fit (1800 -> 0.125 GiB, init 20 -> 0)."""
    port, http_port, shm = free_port(), free_port(), new_shm_name()
    args = [kvtier_bin(), "serve", "--port", str(port), "--http-port", str(http_port), "--l1-size-gb", "0.125",
            "--l1-init-size-gb", "0", "--max-gpu-workers", "1", "--max-cpu-workers", "8", "--chunk-size", "512",
            "--l1-align-bytes", "16384", "--supported-transfer-mode", "lmcache_driven", "--shm-name", shm,
            "--enable-extra-logging", "--extra-logging-interval", "30", "--enable-tracing",
            "--otlp-endpoint", "http://127.0.0.1:4317", "--host", "127.0.0.1", "--instance-id", "issue-4676"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "NO_COLOR": "1"})
    try:
        with KVClient(f"tcp://127.0.0.1:{port}", timeout=0.25) as c:
            deadline = time.monotonic() + 20
            while True:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    assert c.get_chunk_size() == 512
                    break
                except NoReply:
                    assert time.monotonic() < deadline, "no answer within 20 s"
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/status", timeout=5) as r:
            st = json.loads(r.read())
        assert st["instance_id"] == "issue-4676"
        assert st["chunk_size"] == 512
        assert st["storage_manager"]["l1_manager"]["align_bytes"] == 16384
        assert st["l1_prefault"]["total_bytes"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
            assert 'instance_id="issue-4676"' in r.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out[-2000:]
    for flag in ("--supported-transfer-mode", "--enable-extra-logging", "--enable-tracing", "--otlp-endpoint"):
        assert f'flag="{flag}"' in out, out[-3000:]


# --- lenient wire semantics --------------------------------------------------------------------------

class Target:
    def __init__(self, proc: subprocess.Popen, port: int, http_port: int, log: str, kind: str):
        self.proc, self.port, self.http_port, self.log, self.kind = proc, port, http_port, log, kind

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    kind = os.environ.get("KVTIER_WIRE_TARGET", "kvtier")
    port, http_port, shm = free_port(), free_port(), new_shm_name()
    common = ["--host", "127.0.0.1", "--port", str(port), "--http-port", str(http_port), "--l1-size-gb", "0.25",
              "--eviction-policy", "LRU", "--chunk-size", "256", "--shm-name", shm,
              # short, for the late-writer row; every other row commits at once
              "--l1-write-ttl-seconds", str(WRITE_TTL)]
    fd, log = tempfile.mkstemp(prefix=f"{kind}-wire-", suffix=".log")
    if kind == "lmcache":
        args = [str(lmcache_venv() / "bin" / "lmcache"), "server", *common, "--supported-transfer-mode", "auto"]
        env = lmcache_env()
    else:
        args = [kvtier_bin(), "serve", *common, "--no-l1-prefault"]
        env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.Popen(args, stdout=fd, stderr=fd, env=env)
    os.close(fd)
    t = Target(proc, port, http_port, log, kind)
    with KVClient(t.url, timeout=0.5) as c:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, Path(log).read_text()[-3000:]
            try:
                c.get_chunk_size()
                break
            except NoReply:
                assert time.monotonic() < deadline, "target not answering"
    yield t
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def wctx(target: Target) -> Iterator[EngineContext]:
    c = KVClient(target.url, timeout=5)
    ctx = EngineContext(c, new_iid(), "compat-model", num_layers=2, hidden_dim_size=64, dtype_str="float16")
    yield ctx
    ctx.close()
    c.close()


def expect(target: Target, *, lmcache: Any, kvtier: Any) -> Any:
    return lmcache if target.kind == "lmcache" else kvtier


NO_REPLY = "no reply"
WRITE_TTL = 2


def answer(f: Any) -> Any:
    try:
        return f()
    except NoReply:
        return NO_REPLY


def stored(ctx: EngineContext, rng: np.random.Generator, extra: int = 17):
    tokens = fresh_tokens(rng, 3 * 256 + extra)
    data = ctx.random_chunks(rng, 3)
    assert ctx.store(tokens, 0, 768, data, request_id=f"st-{tokens[0]}") == [0, 1, 2]
    return tokens, data


def lookup(ctx: EngineContext, tokens: list[int], end: int, rid: str, start: int = 0) -> Any:
    ctx.client.lookup(make_key(ctx.model, tokens, start, end, rid, worker_id=None, num_kv_readers=1))
    return ctx.client.wait_prefetch_status(rid, 5.0)


def test_lookup_unaligned_end_hits_whole_chunks_and_retrieves_exact(wctx: EngineContext, rng: np.random.Generator):
    tokens, data = stored(wctx, rng)
    assert lookup(wctx, tokens, 3 * 256 + 17, "ua") == 3  # LMCache 3, kvtier 3
    assert wctx.retrieve(tokens, 0, 768, "ua") == data
    wctx.client.end_session("ua")


def test_lookup_end_beyond_tokens_is_clamped(wctx: EngineContext, rng: np.random.Generator):
    tokens, _ = stored(wctx, rng)
    assert lookup(wctx, tokens, len(tokens) + 100, "eb") == 3
    wctx.client.end_session("eb")


def test_lookup_ignores_start(wctx: EngineContext, rng: np.random.Generator):
    tokens, _ = stored(wctx, rng)
    assert lookup(wctx, tokens, 768, "st", start=256) == 3
    wctx.client.end_session("st")


@pytest.mark.parametrize("n_tokens,end", [(0, 0), (100, 100)], ids=["empty", "sub-chunk"])
def test_lookup_without_a_whole_chunk_is_zero(wctx: EngineContext, rng: np.random.Generator, n_tokens: int, end: int):
    tokens = fresh_tokens(rng, n_tokens) if n_tokens else []
    assert lookup(wctx, tokens, end, f"z{n_tokens}") == 0
    wctx.client.end_session(f"z{n_tokens}")


def test_prepare_store_empty_tokens_is_an_empty_store(wctx: EngineContext):
    r = wctx.client.prepare_store(wctx.key([], 0, 0, "pe"), wctx.instance_id)
    assert (r.context["slots"], r.context["chunk_indices"]) == ([], [])


@pytest.mark.parametrize("span", ["unaligned-end", "end-beyond", "unaligned-start"])
def test_prepare_store_bad_span(wctx: EngineContext, rng: np.random.Generator, span: str, target: Target):
    tokens = fresh_tokens(rng, 3 * 256 + 17)
    start, end = {"unaligned-end": (0, 785), "end-beyond": (0, 1024), "unaligned-start": (17, 768)}[span]
    wctx.client.timeout = 2
    r = answer(lambda: wctx.client.prepare_store(wctx.key(tokens, start, end, f"bs-{span}"), wctx.instance_id))
    # LMCache: the handler raises and no reply comes; kvtier: the failure reply (nothing to store).
    if target.kind == "lmcache":
        assert r == NO_REPLY
    else:
        assert (r.context["slots"], r.context["chunk_indices"]) == ([], [])


def test_prepare_retrieve_unaligned_end(wctx: EngineContext, rng: np.random.Generator, target: Target):
    tokens, _ = stored(wctx, rng)
    wctx.client.timeout = 2
    r = answer(lambda: wctx.client.prepare_retrieve(wctx.key(tokens, 0, 785, "pr"), wctx.instance_id))
    assert r == NO_REPLY if target.kind == "lmcache" else r.success is False


@pytest.mark.parametrize("op", ["prepare_store", "prepare_retrieve", "commit_store", "commit_retrieve"])
def test_unknown_instance_id(wctx: EngineContext, rng: np.random.Generator, op: str, target: Target):
    tokens = fresh_tokens(rng, 256)
    key = wctx.key(tokens, 0, 256, f"ui-{op}")
    wctx.client.timeout = 2
    r = answer(lambda: getattr(wctx.client, op)(key, 987654321))
    expected = {"prepare_store": lambda r: r.context == {"slots": [], "chunk_indices": []},
                "prepare_retrieve": lambda r: r.success is False,
                "commit_store": lambda r: r is False, "commit_retrieve": lambda r: r is False}[op]
    assert r == NO_REPLY if target.kind == "lmcache" else expected(r)


def test_ping_and_unregister_unknown_instance(wctx: EngineContext):
    assert wctx.client.ping(987654321) is True  # both
    assert wctx.client.unregister_context(987654321) is None  # both


def test_unknown_request_ids(wctx: EngineContext):
    assert wctx.client.query_prefetch_status("never-looked-up") == 0  # both
    assert wctx.client.end_session("never-looked-up") is None  # both
    assert wctx.client.free_lookup_locks(make_key(wctx.model, [1] * 300, 0, 300, "never", worker_id=None,
                                                  num_kv_readers=1)) is None  # both (unaligned end too)


def test_end_session_with_end_info_frame(wctx: EngineContext, rng: np.random.Generator, target: Target):
    tokens, _ = stored(wctx, rng)
    assert lookup(wctx, tokens, 768, "ei") == 3
    r = answer(lambda: wctx.client.request("end_session", "ei", {"finish_reason": "stop"}, timeout=2))
    if target.kind == "lmcache":
        assert r == NO_REPLY  # 0.5.6 drops a request with a wrong frame count
    else:
        assert r.bare  # end_session's reply (nil), and the session ended: its locks are gone
        assert wctx.client.query_prefetch_status("ei") == 0


@pytest.mark.parametrize("op,payloads", [("noop", [1]), ("query_prefetch_status", ["x", 1])])
def test_other_ops_with_extra_frames(wctx: EngineContext, target: Target, op: str, payloads: list):
    r = answer(lambda: wctx.client.request(op, *payloads, timeout=2))
    if target.kind == "lmcache":
        assert r == NO_REPLY
    else:  # the op's failure reply ("OK" for noop, 0 for query_prefetch_status)
        assert r.payload == {"noop": b"\xa2OK", "query_prefetch_status": b"\x00"}[op]


def test_late_commit_after_the_write_ttl(wctx: EngineContext, rng: np.random.Generator, target: Target):
    """A prepares a store and stalls past the write TTL; B stores the same chunks; A then writes its
    old slots and commits. LMCache hands A's memory to B and answers A true, so lookups serve B's
    keys with A's bytes; kvtier keeps A's memory quarantined and answers A false."""
    b = EngineContext(KVClient(target.url, timeout=5), new_iid(), wctx.model, num_layers=2, hidden_dim_size=64,
                      dtype_str="float16")
    try:
        tokens = fresh_tokens(rng, 768)
        key_a = wctx.key(tokens, 0, 768, "late-a")
        slots_a = store_context(wctx.client.prepare_store(key_a, wctx.instance_id)).slots
        time.sleep(WRITE_TTL + 1.5)
        data_b = b.random_chunks(rng, 3)
        key_b = b.key(tokens, 0, 768, "late-b")
        prep_b = store_context(b.client.prepare_store(key_b, b.instance_id))
        assert prep_b.chunk_indices == [0, 1, 2]  # both: A's keys are free again
        for s, d in zip(prep_b.slots, data_b):
            b.pool.write(s, d)
        assert b.client.commit_store(key_b, b.instance_id) is True
        for s in slots_a:
            wctx.pool.write(s, b"\xa5" * s.length)
        late = wctx.client.commit_store(key_a, wctx.instance_id)
        assert lookup(b, tokens, 768, "late-r") == 3
        got = b.retrieve(tokens, 0, 768, "late-r")
        b.client.end_session("late-r")
        shared = {s.offset for s in slots_a} & {s.offset for s in prep_b.slots}
        if target.kind == "lmcache":
            assert late is True
            assert not shared or got != data_b  # B got A's memory: A's late bytes under B's keys
        else:
            assert late is False and not shared and got == data_b
    finally:
        b.close()
        b.client.close()


# --- LMCache's CLI tools as conformance clients ------------------------------------------------------

@pytest.fixture(scope="module")
def cli_results() -> Iterator[dict[str, dict]]:
    """One kvtier server with one engine-driven registration; the CLI calls batched in one process."""
    port, http_port, shm = free_port(), free_port(), new_shm_name()
    proc = subprocess.Popen([kvtier_bin(), "serve", "--host", "127.0.0.1", "--port", str(port), "--http-port",
                             str(http_port), "--l1-size-gb", "0.25", "--shm-name", shm, "--no-l1-prefault",
                             "--eviction-policy", "LRU"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with KVClient(f"tcp://127.0.0.1:{port}", timeout=0.25) as c:
            deadline = time.monotonic() + 20
            while True:
                try:
                    c.get_chunk_size()
                    break
                except NoReply:
                    assert time.monotonic() < deadline
        c = KVClient(f"tcp://127.0.0.1:{port}")
        ctx = EngineContext(c, 4242, "meta-llama/Llama-3-8B", num_layers=2, hidden_dim_size=64)
        rng = np.random.default_rng(5)
        tokens = fresh_tokens(rng, 512)
        ctx.store(tokens, 0, 512, ctx.random_chunks(rng, 2), "cli")
        url = f"http://127.0.0.1:{http_port}"
        calls = {
            "describe": ["describe", "kvcache", "--url", url, "--format", "json"],
            "describe_text": ["describe", "kvcache", "--url", url],
            "ping": ["ping", "kvcache", "--url", url, "--format", "json"],
            "clear": ["kvcache", "clear", "--url", url],  # (no --format option)
            "describe_after_clear": ["describe", "kvcache", "--url", url, "--format", "json"],
        }
        venv = lmcache_venv()
        r = subprocess.run([str(venv / "bin" / "python"), str(Path(__file__).with_name("lmcache_cli_driver.py")),
                            json.dumps(list(calls.values()))], capture_output=True, text=True, env=lmcache_env(),
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        results = dict(zip(calls, json.loads(r.stdout)))
        ctx.close()
        c.close()
        yield results
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def metrics_of(result: dict) -> dict:
    assert result["code"] == 0, result
    return json.loads(result["stdout"])["metrics"]


def test_describe_kvcache_fills_every_line(cli_results: dict):
    m = metrics_of(cli_results["describe"])
    assert m["health"] == "OK"
    assert m["engine_type"] == "kvtier"
    assert m["chunk_size"] == 256
    assert m["l1_capacity_gb"] == 0.25
    assert re.fullmatch(r"\d+\.\d\d \(\d+\.\d%\)", m["l1_used_gb"]), m
    assert m["eviction_policy"] == "LRU"
    assert m["cached_objects"] == 2
    assert m["active_sessions"] >= 0
    assert m["models"] == [{"model": "meta-llama/Llama-3-8B", "world_size": 1, "gpu_ids": "4242",
                            "num_layers": 2, "cache_size_per_token": 2 * 2 * 64 * 2}]
    (kg,) = m["kernel_groups"]
    assert kg["model"] == "meta-llama/Llama-3-8B"
    assert (kg["kernel_group_idx"], kg["num_layers"], kg["tokens_per_block"], kg["dtype"], kg["is_mla"]) == (
        0, 2, 16, "float16", False)
    for k, v in m.items():
        assert v is not None and v != "N/A", f"describe kvcache left {k} empty"
    text = cli_results["describe_text"]["stdout"]
    assert "N/A" not in text and "Eviction policy:" in text, text


def test_ping_kvcache(cli_results: dict):
    m = metrics_of(cli_results["ping"])
    assert m["status"] == "OK"
    assert m["round_trip_time_ms"] >= 0


def test_kvcache_clear(cli_results: dict):
    r = cli_results["clear"]
    assert r["code"] == 0, r
    assert re.search(r"^Status:\s+OK$", r["stdout"], re.M), r["stdout"]
    assert metrics_of(cli_results["describe_after_clear"])["cached_objects"] == 0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/api/healthcheck", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_quota_round_trip():
    port, http_port, shm = free_port(), free_port(), new_shm_name()
    proc = subprocess.Popen([kvtier_bin(), "serve", "--host", "127.0.0.1", "--port", str(port), "--http-port",
                             str(http_port), "--l1-size-gb", "0.0625", "--shm-name", shm, "--no-l1-prefault"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{http_port}"
        assert wait_until(lambda: _healthy(url), timeout=30), "kvtier serve did not come up"
        calls = [["quota", "set", "tenant-a", "--limit-gb", "0.01", "--url", url, "--format", "json"],
                 ["quota", "get", "tenant-a", "--url", url, "--format", "json"],
                 ["quota", "list", "--url", url, "--format", "json"],
                 ["quota", "delete", "tenant-a", "--url", url, "--format", "json"],
                 ["quota", "get", "tenant-a", "--url", url, "--format", "json"]]
        r = subprocess.run([str(lmcache_venv() / "bin" / "python"),
                            str(Path(__file__).with_name("lmcache_cli_driver.py")), json.dumps(calls)],
                           capture_output=True, text=True, env=lmcache_env(), timeout=300)
        s, g, ls, d, g2 = json.loads(r.stdout)
        assert s["code"] == 0 and g["code"] == 0 and ls["code"] == 0 and d["code"] == 0, (s, g, ls, d)
        assert "tenant-a" in g["stdout"] and "tenant-a" in ls["stdout"]
        # After delete, LMCache's GET answers the salt with "exists": false.
        assert g2["code"] == 0 and '"exists": false' in g2["stdout"], g2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def test_the_prefault_is_off_by_default_and_on_when_asked() -> None:
    """Pages are allocated by the engines' first writes unless --l1-prefault (or LMCache's
    --l1-init-size-gb) asks for a background allocation; --no-l1-prefault wins when last."""
    from conftest import L1_BYTES, start_server, stop_and_check, wait_until

    cases = [([], None), (["--l1-prefault"], L1_BYTES), (["--l1-init-size-gb", "0"], 0),
             (["--l1-prefault", "--no-l1-prefault"], None)]
    for extra, total in cases:
        srv = start_server(extra)
        try:
            pf = srv.status()["l1_prefault"]
            assert pf["enabled"] is (total is not None), (extra, pf)
            if total is None:
                time.sleep(0.2)
                assert srv.status()["l1_prefault"]["done_bytes"] == 0, (extra, pf)
            else:
                assert pf["total_bytes"] == total, (extra, pf)
                done = lambda: srv.status()["l1_prefault"]["done_bytes"] == total  # noqa: E731
                assert wait_until(done, timeout=30), srv.status()["l1_prefault"]
                assert srv.status()["l1_prefault"]["is_healthy"] is True
        finally:
            stop_and_check(srv)


def test_lmcache_client_bench_reports_each_control_op_against_its_noop() -> None:
    """scripts/lmcache-client-bench.py (LMCache's own client; what scripts/compare-lmcache runs
    for its python-* workloads) moves real chunks through kvtier, checks them, and reports each
    control op's p50 and p99 as a multiple of the same run's noop (and its p50 of a noop sent
    right after a copy) under `kvtier bench`'s names,
    so compare-lmcache's floor table has a row per op for the Python client too."""
    from conftest import start_server, stop_and_check

    srv = start_server()
    try:
        r = subprocess.run([str(lmcache_venv() / "bin" / "python"), str(REPO / "scripts" / "lmcache-client-bench.py"),
                            "--url", f"tcp://127.0.0.1:{srv.port}", "--requests", "2", "--noops", "50",
                            "--pipeline-depth", "10", "--json"],
                           capture_output=True, text=True, timeout=240, env=lmcache_env())
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["errors"] == [], out["errors"]
        m = out["metrics"]
        for op in ("prepare_store_warm", "commit_store_warm", "prepare_retrieve_warm", "commit_retrieve_warm",
                   "lookup"):
            for q in ("p50", "p99"):
                assert m[f"{op}_{q}_x_noop"] == pytest.approx(m[f"{op}_{q}_us"] / m[f"noop_rtt_{q}_us"]), (op, q)
            assert m[f"{op}_p50_x_noop_after_copy"] == pytest.approx(m[f"{op}_p50_us"] / m["noop_after_copy_p50_us"])
    finally:
        stop_and_check(srv)
