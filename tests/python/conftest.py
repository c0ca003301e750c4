"""Fixtures: start a kvtier server (binary from $KVTIER_BIN), talk to it, read its /api/status."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from kvclient import KVClient, NoReply  # noqa: E402
from ports import free_port  # noqa: E402,F401  (re-exported to the test modules)

REPO = Path(__file__).resolve().parents[2]
L1_SIZE_GB = 0.25
L1_BYTES = int(L1_SIZE_GB * (1 << 30))
_server_seq = itertools.count()


def kvtier_bin() -> str:
    b = os.environ.get("KVTIER_BIN")
    if b:
        if not os.access(b, os.X_OK):
            pytest.fail(f"KVTIER_BIN={b} is not an executable file")
        return b
    default = REPO / "target" / "debug" / "kvtier"
    if not default.exists():
        pytest.skip("no kvtier binary: build it or set KVTIER_BIN")
    return str(default)


def new_shm_name() -> str:
    return f"kvtier_test_{os.getpid()}_{next(_server_seq)}"


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    http_port: int
    shm_name: str
    log_path: str
    args: list[str] = field(default_factory=list)

    @property
    def rpc_url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def shm_path(self) -> str:
        return f"/dev/shm/{self.shm_name}"

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def client(self, **kw: Any) -> KVClient:
        return KVClient(self.rpc_url, **kw)

    def status(self) -> dict:
        with urllib.request.urlopen(self.http_url + "/api/status", timeout=5) as r:
            assert r.status == 200
            return json.loads(r.read())

    def l1(self) -> dict:
        return self.status()["storage_manager"]["l1_manager"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_excluding_shm(self) -> int:
        """VmRSS - RssShmem in bytes (the pool pages touched by clients are not the server's heap)."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssShmem"):
                fields[k] = int(v.split()[0]) * 1024
        return fields["VmRSS"] - fields.get("RssShmem", 0)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server did not exit within {timeout}s of signal {sig}\n{self.log()[-4000:]}")
        return self.proc.returncode


def spawn_server(extra: list[str] | None = None, shm_name: str | None = None) -> Server:
    """Start a server process (no readiness wait)."""
    port, http_port = free_port(), free_port()
    shm = shm_name or new_shm_name()
    extra = list(extra or [])
    args = [
        kvtier_bin(), "serve",
        "--port", str(port), "--http-port", str(http_port),
        "--shm-name", shm, "--chunk-size", "256",
    ]
    if "--host" not in extra:
        args += ["--host", "127.0.0.1"]
    for flag, default in (("--eviction-policy", "LRU"), ("--max-workers", "2"), ("--l1-size-gb", str(L1_SIZE_GB))):
        if flag not in extra:
            args += [flag, default]
    args += extra
    fd, log_path = tempfile.mkstemp(prefix="kvtier-server-", suffix=".log")
    env = dict(os.environ)
    env.setdefault("RUST_BACKTRACE", "1")
    env["NO_COLOR"] = "1"
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env)
    os.close(fd)
    return Server(proc, port, http_port, shm, log_path, args)


def wait_ready(srv: Server, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    with srv.client(timeout=0.25) as c:
        while True:
            if not srv.alive():
                raise AssertionError(f"server exited with {srv.proc.returncode} during start-up:\n{srv.log()[-4000:]}")
            try:
                cs = c.get_chunk_size()
                assert cs == 256, f"get_chunk_size -> {cs!r}"
                return
            except NoReply:
                pass
            if time.monotonic() > deadline:
                srv.stop(signal.SIGKILL, 5)
                raise AssertionError(f"server not answering get_chunk_size after {timeout}s:\n{srv.log()[-4000:]}")


def start_server(extra: list[str] | None = None) -> Server:
    srv = spawn_server(extra)
    wait_ready(srv)
    return srv


def stop_and_check(srv: Server) -> None:
    """SIGTERM, exit 0 within 10 s, shared segment gone."""
    rc = srv.stop(signal.SIGTERM, 10.0)
    log = srv.log()
    assert rc == 0, f"server exit code {rc} after SIGTERM:\n{log[-4000:]}"
    assert not os.path.exists(srv.shm_path), f"{srv.shm_path} still exists after shutdown"
    try:
        os.unlink(srv.log_path)
    except OSError:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = start_server()
    try:
        yield srv
    finally:
        stop_and_check(srv)


@pytest.fixture
def client(server: Server) -> Iterator[KVClient]:
    with server.client() as c:
        yield c


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("KVTIER_TEST_SEED", "0"))
    return np.random.default_rng(seed)


_uniq = itertools.count(1)
_iid_seq = itertools.count(1000)


def fresh_tokens(rng: np.random.Generator, n: int) -> list[int]:
    """Token ids unlikely to collide with any other test's (random, plus a unique first token)."""
    toks = rng.integers(0, 2**31, n, dtype=np.int64).tolist()
    toks[0] = next(_uniq)
    return toks


def new_iid() -> int:
    return next(_iid_seq) + (os.getpid() % 1000) * 100000


def wait_until(pred: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Attach the tail of the server's log to a failing test's report."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        srv = getattr(item, "funcargs", {}).get("server")
        if isinstance(srv, Server):
            rep.sections.append(("kvtier server log (tail)", srv.log()[-6000:]))
