"""parleyd through an independent client: Python `websockets`, hand-minted JWTs.

Covers PROTOCOL.md sections 1-3 (transport, authentication, envelope) and the admin
listener. Run from the repo root:

    cargo build -p parley-gateway -p parley-tools
    python3 -m pip install -r gateway/tests/python/requirements.txt
    python3 -m pytest -q gateway/tests/python
"""

from __future__ import annotations

import asyncio
import time

import pytest
import websockets

from conftest import (
    IO_TIMEOUT_S,
    SHARDS,
    Client,
    mint_token,
    run,
    start_parleyd,
    stop_at_teardown,
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
    stop_at_teardown([daemon])


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


# Every code of docs/operations.md, each exported for every shard, zero or not.
ERROR_CODES = ["bad_request", "unauthorized", "forbidden", "not_found", "too_large",
               "rate_limited", "conflict", "unavailable", "internal"]
CLOSE_CODES = ["1001", "1009", "4000", "4001", "4002", "4008", "4009"]


def assert_every_shard_and_code(daemon, name: str, codes: list[str]) -> None:
    have = sorted((labels.get("shard"), labels.get("code")) for labels, _ in daemon.samples(name))
    wanted = sorted((str(shard), code) for shard in range(SHARDS) for code in codes)
    assert have == wanted, f"{name}: samples {have}, expected one per shard and code {wanted}"


def test_metrics_count_bad_request_errors(spawn_parleyd):
    daemon = spawn_parleyd()  # fresh: the gauges count this test's connection alone
    before_errors = daemon.metric_sum("parley_errors_total", code="bad_request")
    before_frames = daemon.metric_sum("parley_frames_in_total")

    async def scenario():
        async with ws_connect(daemon.ws_url, token=mint_token("alice")) as ws:
            client = Client(ws)
            await client.send("this is not json")
            assert_err(await client.next_doc(), None, "bad_request")
            # The reply is out, so the error was counted; the session is still open.
            assert daemon.metric_sum("parley_connections") == 1
            assert daemon.metric_sum("parley_sessions") == 1
            assert daemon.metric_sum("parley_errors_total", code="bad_request") == before_errors + 1
            # One text frame sent (no pings: ws_connect turns them off).
            assert daemon.metric_sum("parley_frames_in_total") == before_frames + 1

    run(scenario())
    # Both gauges drop back once it is closed (by the client: no close_linger_ms wait).
    daemon.wait_metric("parley_sessions", 0)
    daemon.wait_metric("parley_connections", 0)
    assert_every_shard_and_code(daemon, "parley_errors_total", ERROR_CODES)


def test_metrics_count_4001_closes_per_shard_and_code(gateway):
    """Each close the server makes with 4001 (a wrong token, at the upgrade or in hello)
    is counted once, under code 4001 and no other."""
    closes = 4
    before_4001 = gateway.metric_sum("parley_closes_total", code="4001")
    before_all = gateway.metric_sum("parley_closes_total")

    async def scenario():
        wrong = mint_token("mallory", secret="not-the-secret")
        for attempt in range(closes):
            # Alternate the two places a token is checked.
            if attempt % 2 == 0:
                async with ws_connect(gateway.ws_url, token=wrong) as ws:
                    close = await Client(ws).expect_close()
            else:
                async with ws_connect(gateway.ws_url) as ws:
                    client = Client(ws)
                    await client.send({"id": 1, "op": "hello", "token": wrong})
                    assert_err(await client.next_doc(), 1, "unauthorized")
                    close = await client.expect_close()
            assert close.code == 4001, close

    run(scenario())
    gateway.wait_metric("parley_closes_total", before_4001 + closes, code="4001")
    assert gateway.metric_sum("parley_closes_total") == before_all + closes, "a close counted under another code"
    # The families the dashboards use are exported per shard and per code.
    assert_every_shard_and_code(gateway, "parley_closes_total", CLOSE_CODES)
    assert_every_shard_and_code(gateway, "parley_errors_total", ERROR_CODES)


# ---------------------------------------------------------------- drain


def test_sigterm_drains_with_1001_and_exits_0(spawn_parleyd):
    daemon = spawn_parleyd()

    async def scenario():
        async with ws_connect(daemon.ws_url, token=mint_token("alice")) as ws:
            client = Client(ws)
            await assert_ping_works(client, 1)
            daemon.send_sigterm()
            close = await client.expect_close(timeout=10.0)
            assert close.code == 1001, close

    run(scenario())
    daemon.wait_exit()  # within STOP_TIMEOUT_S, status 0
