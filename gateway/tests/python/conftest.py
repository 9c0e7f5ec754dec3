"""Fixtures and helpers for the independent-client tests of parleyd.

Nothing here imports or calls Parley's Rust code: tokens are minted with hmac/hashlib,
the daemon is driven only through its command line, its WebSocket listener, its QUIC
listener and its admin HTTP listener.

The binary is $PARLEYD if set, else <repo>/target/debug/parleyd, where <repo> is three
directories above this file. Build it with:

    cargo build -p parley-gateway -p parley-tools

Every daemon a fixture starts is stopped at teardown with SIGTERM: one whose drain does
not end within STOP_TIMEOUT_S (it is then killed), or that exits with a status other than
0, is an error of the test at teardown, naming the daemon, its status and its stderr's
tail. A test that collects a daemon's exit itself (`terminate`, `wait_exit`, `kill`)
owns that outcome and is not reported twice.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import connect

REPO_ROOT = Path(__file__).resolve().parents[3]
SECRET = "independent-client-secret"
STARTUP_TIMEOUT_S = 10.0
# Longer than drain_timeout_ms (10 s by default), after which parleyd exits anyway.
STOP_TIMEOUT_S = 15.0
# Lines of stderr quoted when a daemon fails.
STDERR_TAIL_LINES = 40
# start_parleyd passes --shards SHARDS; per-shard metrics have shard="0".."SHARDS-1".
SHARDS = 2
# Every exchange with the gateway is bounded by this (seconds).
IO_TIMEOUT_S = 5.0

_LISTENING = re.compile(r"listening ws=(\S+):(\d+) admin=(\S+):(\d+)(?: quic=(\S+):(\d+))?")
# Logged before `listening`: the QUIC certificate's file and SHA-256 fingerprint (of its DER).
_QUIC_CERT = re.compile(r"QUIC certificate.* cert=(\S+) sha256=([0-9A-Fa-f:]+)")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def parleyd_binary() -> Path:
    override = os.environ.get("PARLEYD")
    path = Path(override) if override else REPO_ROOT / "target" / "debug" / "parleyd"
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"parleyd binary not found at {path}: run "
            f"`cd {REPO_ROOT} && cargo build -p parley-gateway -p parley-tools` "
            "(or set PARLEYD to the binary)",
            pytrace=False,
        )
    return path


# ---------------------------------------------------------------- tokens


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_token(
    sub: str,
    *,
    secret: str = SECRET,
    exp: int | None = None,
    dev: str | None = None,
) -> str:
    """An HS256 JWT, built by hand so the client is independent of parley's signer."""
    header = {"alg": "HS256", "typ": "JWT"}
    claims: dict = {"sub": sub, "exp": int(time.time()) + 3600 if exp is None else exp}
    if dev is not None:
        claims["dev"] = dev
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    signature = hmac.new(secret.encode("utf-8"), signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + _b64url(signature)


# ---------------------------------------------------------------- the daemon


@dataclass
class Parleyd:
    """One running parleyd; stderr is drained by a thread so the pipe never fills."""

    proc: subprocess.Popen
    ws_port: int = 0
    admin_port: int = 0
    secret: str = SECRET
    data_dir: Path | None = None
    # The QUIC listener, and the certificate it serves (as logged at start).
    quic_port: int = 0
    quic_cert_path: Path | None = None
    quic_cert_sha256: str | None = None
    log: list[str] = field(default_factory=list)
    _lines: "queue.Queue[str | None]" = field(default_factory=queue.Queue)
    _pump: threading.Thread | None = None
    # The test (or the harness) collected the exit: teardown does not report it again.
    exit_collected: bool = False

    @property
    def name(self) -> str:
        where = self.data_dir.name if self.data_dir is not None else "?"
        return f"parleyd pid {self.proc.pid} ({where}, ws port {self.ws_port})"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/v1/ws"

    def url(self, path: str = "/v1/ws", query: str = "") -> str:
        return f"ws://127.0.0.1:{self.ws_port}{path}" + (f"?{query}" if query else "")

    def stderr_text(self) -> str:
        return "".join(self.log)

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> str:
        # After an exit, let the pump read what the process wrote last.
        if self.proc.poll() is not None and self._pump is not None:
            self._pump.join(timeout=2.0)
        return "".join(self.log[-lines:])

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.log.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_listening(self) -> None:
        self._pump = threading.Thread(target=self._pump_stderr, daemon=True)
        self._pump.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                pytest.fail(
                    f"parleyd did not log 'listening ws=... admin=...' within "
                    f"{STARTUP_TIMEOUT_S}s; stderr:\n{self.stderr_text()}",
                    pytrace=False,
                )
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait(timeout=STOP_TIMEOUT_S)
                self.exit_collected = True
                pytest.fail(
                    f"parleyd exited with {code} before listening; stderr:\n{self.stderr_text()}",
                    pytrace=False,
                )
            cert = _QUIC_CERT.search(line)
            if cert:
                self.quic_cert_path = Path(cert.group(1))
                self.quic_cert_sha256 = cert.group(2).upper()
            match = _LISTENING.search(line)
            if match:
                self.ws_port = int(match.group(2))
                self.admin_port = int(match.group(4))
                if match.group(6) is not None:
                    self.quic_port = int(match.group(6))
                return

    def send_sigterm(self) -> None:
        """Start the drain. The exit is still checked at teardown unless the test
        collects it (`wait_exit`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop_problem(self, timeout: float = STOP_TIMEOUT_S) -> str | None:
        """Wait for the exit after SIGTERM (SIGKILL past `timeout`); what went wrong, if
        anything: the drain did not end in time, or the status was not 0."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return (
                f"{self.name} did not exit within {timeout}s of SIGTERM (killed); "
                f"stderr tail:\n{self.stderr_tail()}"
            )
        finally:
            self.exit_collected = True
        if code != 0:
            signalled = f" (signal {signal.Signals(-code).name})" if code < 0 else ""
            return f"{self.name} exited with status {code}{signalled}; stderr tail:\n{self.stderr_tail()}"
        return None

    def wait_exit(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """After `send_sigterm`: fail unless the daemon exits with 0 within `timeout`."""
        problem = self.stop_problem(timeout)
        if problem:
            pytest.fail(problem, pytrace=False)

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM; fail unless the drain ends with status 0 within `timeout`."""
        self.send_sigterm()
        self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL (a deliberate kill: teardown reports nothing)."""
        self.exit_collected = True
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    # admin listener

    def admin_get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        # No proxy: the admin listener is local.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=IO_TIMEOUT_S) as response:
                return response.status, response.read().decode("utf-8")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode("utf-8")

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{labels}': value}."""
        status, body = self.admin_get("/metrics")
        assert status == 200, f"/metrics returned {status}: {body}"
        samples: dict[str, float] = {}
        for line in body.splitlines():
            if not line or line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
        return samples

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of `name`, as (labels, value)."""
        found = []
        for key, value in self.metrics().items():
            metric, _, rest = key.partition("{")
            if metric == name:
                found.append((dict(_LABEL.findall(rest)), value))
        return found

    def metric_sum(self, name: str, **labels: str) -> float:
        """Sum of `name` over every sample whose labels include `labels` (e.g. all
        shards). A missing metric fails: it is never read as 0."""
        matching = [value for have, value in self.samples(name) if all(have.get(k) == v for k, v in labels.items())]
        assert matching, f"no sample of {name} with labels {labels} in /metrics"
        return sum(matching)

    def wait_metric(self, name: str, expected: float, timeout: float = IO_TIMEOUT_S, **labels: str) -> None:
        """Poll /metrics (bounded) until `metric_sum(name, **labels)` equals `expected`:
        a counter moves when the server has done the work, not when the client saw it."""
        deadline = time.monotonic() + timeout
        while (value := self.metric_sum(name, **labels)) != expected:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{name}{labels} is {value}, not {expected}, after {timeout}s")
            time.sleep(0.05)


def start_parleyd(data_dir: Path, *extra: str, secret: str = SECRET) -> Parleyd:
    binary = parleyd_binary()
    args = [
        str(binary),
        "--data-dir", str(data_dir),
        "--ws-listen", "127.0.0.1:0",
        "--admin-listen", "127.0.0.1:0",
        "--quic-listen", "127.0.0.1:0",
        "--jwt-secret", secret,
        "--shards", "2",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    env["PARLEY_LOG"] = "info"
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    daemon = Parleyd(proc=proc, secret=secret, data_dir=data_dir)
    daemon.wait_listening()
    return daemon


def stop_at_teardown(daemons: list[Parleyd]) -> None:
    """Drain every daemon whose exit no test collected; fail (an error at teardown) for
    each one that hangs or exits with a status other than 0. All are gone afterwards."""
    pending = [daemon for daemon in daemons if not daemon.exit_collected]
    for daemon in pending:
        daemon.send_sigterm()  # all at once: the drains run side by side
    problems = []
    for daemon in pending:
        problem = daemon.stop_problem()
        if problem:
            problems.append(problem)
    for daemon in daemons:
        daemon.kill()  # whatever happened above, none is left running
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def spawn_parleyd(tmp_path_factory):
    """Start a parleyd with extra flags; every one started is stopped at teardown."""
    started: list[Parleyd] = []

    def spawn(*extra: str) -> Parleyd:
        daemon = start_parleyd(tmp_path_factory.mktemp("parleyd-data"), *extra)
        started.append(daemon)
        return daemon

    yield spawn
    stop_at_teardown(started)


# ---------------------------------------------------------------- the client


def run(coro, timeout: float = 30.0):
    """Run one test coroutine with an overall bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def ws_connect(url: str, *, token: str | None = None, subprotocols=None, headers=None):
    """websockets client with no proxy, no compression and no client keepalive pings
    (they would count as inbound traffic), bounded handshake and close."""
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    return connect(
        url,
        additional_headers=all_headers or None,
        subprotocols=subprotocols,
        compression=None,
        proxy=None,
        ping_interval=None,
        open_timeout=IO_TIMEOUT_S,
        close_timeout=IO_TIMEOUT_S,
        max_size=None,
    )


class Client:
    """Splits every text frame into its `\\n`-separated documents and buffers them."""

    def __init__(self, ws):
        self.ws = ws
        self.pending: list[dict] = []
        self.frames = 0

    async def send(self, *documents: dict | str) -> None:
        """Send the documents in one text frame, joined by `\\n`."""
        parts = [d if isinstance(d, str) else json.dumps(d) for d in documents]
        await self.ws.send("\n".join(parts))

    async def next_doc(self, timeout: float = IO_TIMEOUT_S) -> dict:
        while not self.pending:
            try:
                frame = await asyncio.wait_for(self.ws.recv(), timeout)
            except asyncio.TimeoutError:
                # Say what was waited for: a bare TimeoutError names nothing.
                raise AssertionError(f"no document from parleyd within {timeout}s ({self.frames} frames so far)") from None
            assert isinstance(frame, str), f"server sent a binary frame: {frame!r}"
            self.frames += 1
            self.pending.extend(json.loads(doc) for doc in frame.split("\n") if doc.strip())
        return self.pending.pop(0)

    async def request(self, document: dict, timeout: float = IO_TIMEOUT_S) -> dict:
        """Send one command and return its reply (the next document; no events are
        expected on these connections)."""
        await self.send(document)
        reply = await self.next_doc(timeout)
        assert reply.get("re") == document["id"], f"reply {reply} does not answer {document}"
        return reply

    async def expect_close(self, timeout: float = IO_TIMEOUT_S):
        """Wait for the server's close; fail on any document before it.
        Returns the received close frame (code, reason)."""
        try:
            doc = await self.next_doc(timeout)
        except websockets.exceptions.ConnectionClosed as closed:
            assert closed.rcvd is not None, f"connection ended without a close frame: {closed!r}"
            return closed.rcvd
        raise AssertionError(f"expected a close, got document {doc}")
