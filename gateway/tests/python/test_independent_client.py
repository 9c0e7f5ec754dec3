"""parleyd through an independent client: Python `websockets`, hand-minted JWTs.

Covers PROTOCOL.md sections 1-3 (transport, authentication, envelope) and the admin
listener. Run from the repo root:

    cargo build -p parley-gateway -p parley-tools
    python3 -m pip install -r gateway/tests/python/requirements.txt
    python3 -m pytest -q gateway/tests/python
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
import websockets

from conftest import (
    IO_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Client,
    mint_token,
    run,
    start_parleyd,
    ws_connect,
)

MAX_FRAME_BYTES = 1024
MAX_FRAME_HARD_BYTES = 4096
NODE = "pytest-node"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """One parleyd shared by every test here whose flags allow it."""
    daemon = start_parleyd(
        tmp_path_factory.mktemp("parleyd-shared"),
        "--max-frame-bytes", str(MAX_FRAME_BYTES),
        "--max-frame-hard-bytes", str(MAX_FRAME_HARD_BYTES),
        "--node-name", NODE,
    )
    yield daemon
    try:
        code = daemon.terminate()
    except subprocess.TimeoutExpired:
        pytest.fail(f"shared parleyd did not exit within {STOP_TIMEOUT_S}s of SIGTERM")
    assert code == 0, f"shared parleyd exited {code}; stderr:\n{daemon.stderr_text()}"


def now_ms() -> int:
    return int(time.time() * 1000)


def assert_err(reply: dict, re, code: str) -> None:
    assert reply.get("re", "missing") == re, reply
    assert "ok" not in reply, reply
    assert reply["err"]["code"] == code, reply
    assert isinstance(reply["err"].get("msg"), str), reply


async def assert_ping_works(client: Client, id_: int = 99) -> None:
    before = now_ms()
    reply = await client.request({"id": id_, "op": "ping"})
    assert set(reply) == {"re", "ok"}, reply
    server_ts = reply["ok"]["server_ts"]
    assert isinstance(server_ts, int)
    # Same host: the server clock is ours, give or take scheduling.
    assert before - 5_000 <= server_ts <= now_ms() + 5_000, (before, server_ts)


# ---------------------------------------------------------------- authentication


def test_header_auth_hello_and_ping(gateway):
    async def scenario():
        token = mint_token("alice")
        async with ws_connect(gateway.ws_url, token=token) as ws:
            client = Client(ws)
            before = now_ms()
            reply = await client.request({"id": 1, "op": "hello", "device": "laptop"})
            ok = reply["ok"]
            assert set(ok) >= {"user", "device", "session", "node", "heartbeat_ms", "server_ts"}, ok
            assert ok["user"] == "alice"
            assert ok["device"] == "laptop"
            assert ok["node"] == NODE
            assert isinstance(ok["session"], str) and ok["session"]
            assert ok["heartbeat_ms"] == 30_000  # the default heartbeat_interval_ms
            assert before - 5_000 <= ok["server_ts"] <= now_ms() + 5_000
            await assert_ping_works(client, 2)

    run(scenario())


def test_token_device_claim_wins_over_hello_device(gateway):
    async def scenario():
        async with ws_connect(gateway.ws_url, token=mint_token("alice", dev="phone")) as ws:
            reply = await Client(ws).request({"id": 1, "op": "hello", "device": "laptop"})
            assert reply["ok"]["device"] == "phone", reply

    run(scenario())


def test_query_token_auth(gateway):
    async def scenario():
        url = gateway.url(query=f"token={mint_token('bob')}")
        async with ws_connect(url) as ws:
            client = Client(ws)
            await assert_ping_works(client, 1)
            reply = await client.request({"id": 2, "op": "hello"})
            assert reply["ok"]["user"] == "bob"
            assert reply["ok"]["device"] == "default"

    run(scenario())


def test_hello_token_auth(gateway):
    async def scenario():
        async with ws_connect(gateway.ws_url) as ws:
            client = Client(ws)
            reply = await client.request({"id": 1, "op": "hello", "token": mint_token("carol")})
            assert reply["ok"]["user"] == "carol"
            assert reply["ok"]["device"] == "default"
            await assert_ping_works(client, 2)

    run(scenario())


def test_second_hello_is_a_conflict(gateway):
    async def scenario():
        async with ws_connect(gateway.ws_url) as ws:
            client = Client(ws)
            await client.request({"id": 1, "op": "hello", "token": mint_token("carol")})
            assert_err(await client.request({"id": 2, "op": "hello"}), 2, "conflict")
            await assert_ping_works(client, 3)

    run(scenario())


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(mint_token("mallory", secret="not-the-secret"), id="wrong-secret"),
        pytest.param(mint_token("alice", exp=int(time.time()) - 60), id="expired"),
        pytest.param("not.a.jwt", id="garbage"),
    ],
)
def test_bad_upgrade_token_closes_4001(gateway, token):
    async def scenario():
        # The upgrade itself succeeds; the session is then closed at once, no reply.
        async with ws_connect(gateway.ws_url, token=token) as ws:
            close = await Client(ws).expect_close()
            assert close.code == 4001, close

    run(scenario())


def test_bad_hello_token_replies_unauthorized_then_closes_4001(gateway):
    async def scenario():
        async with ws_connect(gateway.ws_url) as ws:
            client = Client(ws)
            bad = mint_token("mallory", secret="not-the-secret")
            await client.send({"id": 1, "op": "hello", "token": bad})
            assert_err(await client.next_doc(), 1, "unauthorized")
            close = await client.expect_close()
            assert close.code == 4001, close

    run(scenario())


def test_command_before_auth_is_unauthorized_then_4001(gateway):
    async def scenario():
        async with ws_connect(gateway.ws_url) as ws:
            client = Client(ws)
            await client.send({"id": 5, "op": "ping"})
            assert_err(await client.next_doc(), 5, "unauthorized")
            close = await client.expect_close()
            assert close.code == 4001, close

    run(scenario())


def test_auth_timeout_closes_4002(spawn_parleyd):
    daemon = spawn_parleyd("--auth-timeout-ms", "300")

    async def scenario():
        started = time.monotonic()
        async with ws_connect(daemon.ws_url) as ws:
            close = await Client(ws).expect_close(timeout=IO_TIMEOUT_S)
        elapsed = time.monotonic() - started
        assert close.code == 4002, close
        # The window runs from accept; allow a little clock slack below 300 ms.
        assert elapsed >= 0.25, f"closed after {elapsed:.3f}s, before auth_timeout_ms=300"

    run(scenario())


# ---------------------------------------------------------------- envelope


def test_malformed_json_then_ping_still_works(gateway):
    async def scenario():
        async with ws_connect(gateway.ws_url, token=mint_token("alice")) as ws:
            client = Client(ws)
            await client.send('{"id": 1, "op": "ping"')  # truncated
            assert_err(await client.next_doc(), None, "bad_request")
            await assert_ping_works(client, 2)

    run(scenario())


def test_document_without_op_gets_re_null(gateway):
    async def scenario():
        async with ws_connect(gateway.ws_url, token=mint_token("alice")) as ws:
            client = Client(ws)
            await client.send({"id": 1, "nop": "ping"})
            assert_err(await client.next_doc(), None, "bad_request")
            await assert_ping_works(client, 2)

    run(scenario())


def test_unknown_op_is_bad_request_with_re(gateway):
    async def scenario():
        async with ws_connect(gateway.ws_url, token=mint_token("alice")) as ws:
            client = Client(ws)
            assert_err(await client.request({"id": 7, "op": "frobnicate"}), 7, "bad_request")
            await assert_ping_works(client, 8)

    run(scenario())


def test_unknown_fields_are_ignored(gateway):
    async def scenario():
        async with ws_connect(gateway.ws_url, token=mint_token("alice")) as ws:
            reply = await Client(ws).request({"id": 3, "op": "ping", "extra": {"x": [1, 2]}})
            assert "server_ts" in reply["ok"], reply

    run(scenario())


def test_oversized_frame_is_too_large_and_session_survives(gateway):
    async def scenario():
        async with ws_connect(gateway.ws_url, token=mint_token("alice")) as ws:
            client = Client(ws)
            # Valid JSON, but the frame is over max_frame_bytes (and under the hard limit).
            big = '{"id":1,"op":"ping","pad":"' + "x" * (MAX_FRAME_BYTES + 200) + '"}'
            assert MAX_FRAME_BYTES < len(big) < MAX_FRAME_HARD_BYTES
            await client.send(big)
            assert_err(await client.next_doc(), None, "too_large")
            await assert_ping_works(client, 2)

    run(scenario())


def test_frame_over_hard_limit_closes_1009(gateway):
    async def scenario():
        async with ws_connect(gateway.ws_url, token=mint_token("alice")) as ws:
            client = Client(ws)
            await client.send("x" * (MAX_FRAME_HARD_BYTES * 2))
            close = await client.expect_close()
            assert close.code == 1009, close

    run(scenario())


def test_two_documents_in_one_frame_get_two_replies(gateway):
    async def scenario():
        async with ws_connect(gateway.ws_url, token=mint_token("alice")) as ws:
            client = Client(ws)
            await client.send({"id": 1, "op": "ping"}, {"id": 2, "op": "frobnicate"})
            first, second = await client.next_doc(), await client.next_doc()
            assert first["re"] == 1 and "server_ts" in first["ok"], first
            assert_err(second, 2, "bad_request")
            # Trailing and blank separators are allowed too.
            await client.send('{"id":3,"op":"ping"}\n\n{"id":4,"op":"ping"}\n')
            assert [(await client.next_doc())["re"] for _ in range(2)] == [3, 4]

    run(scenario())


# ---------------------------------------------------------------- upgrade


def test_subprotocol_is_echoed(gateway):
    async def scenario():
        async with ws_connect(gateway.ws_url, token=mint_token("alice"), subprotocols=["parley.v1"]) as ws:
            assert ws.subprotocol == "parley.v1"
            await assert_ping_works(Client(ws), 1)
        async with ws_connect(gateway.ws_url, token=mint_token("alice")) as ws:
            assert ws.subprotocol is None
            await assert_ping_works(Client(ws), 1)

    run(scenario())


def test_wrong_path_is_404(gateway):
    async def scenario():
        with pytest.raises(websockets.exceptions.InvalidStatus) as raised:
            async with ws_connect(gateway.url("/nope"), token=mint_token("alice")):
                pass
        assert raised.value.response.status_code == 404

    run(scenario())


# ---------------------------------------------------------------- policy


def test_abuse_strikes_close_4008(spawn_parleyd):
    daemon = spawn_parleyd("--abuse-strikes", "3")

    async def scenario():
        async with ws_connect(daemon.ws_url, token=mint_token("alice")) as ws:
            client = Client(ws)
            # Two rejections are answered; a valid command resets the count.
            for _ in range(2):
                await client.send("{nope")
                assert_err(await client.next_doc(), None, "bad_request")
            await assert_ping_works(client, 1)
            for _ in range(2):
                await client.send("{nope")
                assert_err(await client.next_doc(), None, "bad_request")
            # The third consecutive one is answered, then the session is closed.
            await client.send("{nope")
            assert_err(await client.next_doc(), None, "bad_request")
            close = await client.expect_close()
            assert close.code == 4008, close

    run(scenario())


# ---------------------------------------------------------------- admin


def test_admin_health_and_readiness(gateway):
    status, body = gateway.admin_get("/healthz")
    assert status == 200, body
    status, body = gateway.admin_get("/readyz")
    assert status == 200, body
    status, _ = gateway.admin_get("/no-such-page")
    assert status == 404


def test_metrics_count_bad_request_errors(gateway):
    before_errors = gateway.metric_sum("parley_errors_total", code="bad_request")
    before_frames = gateway.metric_sum("parley_frames_in_total")

    async def scenario():
        async with ws_connect(gateway.ws_url, token=mint_token("alice")) as ws:
            client = Client(ws)
            await client.send("this is not json")
            assert_err(await client.next_doc(), None, "bad_request")
            # The reply is out, so the error was counted; the session is still open.
            assert gateway.metric_sum("parley_connections") >= 1
            assert gateway.metric_sum("parley_sessions") >= 1

    run(scenario())
    assert gateway.metric_sum("parley_errors_total", code="bad_request") == before_errors + 1
    assert gateway.metric_sum("parley_frames_in_total") >= before_frames + 1
    # Both families the dashboards use are exported, per shard and per code.
    assert gateway.metric_sum("parley_closes_total", code="4001") >= 0


# ---------------------------------------------------------------- drain


def test_sigterm_drains_with_1001_and_exits_0(spawn_parleyd):
    daemon = spawn_parleyd()

    async def scenario():
        async with ws_connect(daemon.ws_url, token=mint_token("alice")) as ws:
            client = Client(ws)
            await assert_ping_works(client, 1)
            daemon.proc.terminate()  # SIGTERM
            close = await client.expect_close(timeout=10.0)
            assert close.code == 1001, close

    run(scenario())
    try:
        code = daemon.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        daemon.kill()
        pytest.fail(f"parleyd did not exit within {STOP_TIMEOUT_S}s of SIGTERM; stderr:\n{daemon.stderr_text()}")
    assert code == 0, f"parleyd exited {code} after drain; stderr:\n{daemon.stderr_text()}"
