"""Chat through an independent client: two users over Python `websockets`.

Covers PROTOCOL.md sections 5-7 for a direct conversation on a two-shard parleyd
(`start_parleyd` passes `--shards 2`): conv.create, send in both directions (gapless
seqs, `msg` events on both sides), an idempotent resend, ack and read receipts,
conv.list cursors, history pages, and a replay by `sync` and by `hello` `resume`.
Every wait is bounded; nothing sleeps to synchronise. Run from the repo root:

    cargo build --bin parleyd
    python3 -m pytest -q gateway/tests/python
"""

from __future__ import annotations

import asyncio
import json
import re
import time

from conftest import IO_TIMEOUT_S, mint_token, run, ws_connect

DIRECT_ID = re.compile(r"^d-[0-9a-f]{32}$")


class ChatClient:
    """One session. Splits frames on `\\n`; keeps replies (by `re`) and events apart,
    so a test can wait for either without losing the other."""

    def __init__(self, ws, user: str):
        self.ws = ws
        self.user = user
        self.replies: dict = {}
        self.events: list[dict] = []
        # Every document in arrival order, replies and events alike.
        self.log: list[dict] = []
        self.next_id = 1

    async def _read_frame(self, timeout: float) -> None:
        try:
            frame = await asyncio.wait_for(self.ws.recv(), timeout)
        except asyncio.TimeoutError:
            # Say what was waited for: a bare TimeoutError names nothing.
            raise AssertionError(f"{self.user}: nothing from parleyd in time; documents so far: {self.log}") from None
        assert isinstance(frame, str), f"{self.user}: binary frame {frame!r}"
        for line in frame.split("\n"):
            if not line.strip():
                continue
            doc = json.loads(line)
            self.log.append(doc)
            if "ev" in doc:
                self.events.append(doc)
            else:
                assert "re" in doc, f"{self.user}: neither reply nor event: {doc}"
                assert doc["re"] not in self.replies, f"{self.user}: second reply {doc}"
                self.replies[doc["re"]] = doc

    async def send(self, op: str, **fields) -> int:
        id_ = self.next_id
        self.next_id += 1
        await self.ws.send(json.dumps({"id": id_, "op": op, **fields}, separators=(",", ":")))
        return id_

    async def reply(self, id_: int, timeout: float = IO_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while id_ not in self.replies:
            await self._read_frame(max(deadline - time.monotonic(), 0.001))
        return self.replies.pop(id_)

    async def ok(self, op: str, **fields) -> dict:
        """Send a command and return its `ok` body (fail on `err`)."""
        reply = await self.reply(await self.send(op, **fields))
        assert "ok" in reply, f"{self.user}: {op} {fields} failed: {reply}"
        return reply["ok"]

    async def err(self, op: str, **fields) -> dict:
        reply = await self.reply(await self.send(op, **fields))
        assert "err" in reply and "ok" not in reply, f"{self.user}: {op} should fail: {reply}"
        assert isinstance(reply["err"].get("msg"), str), reply
        return reply["err"]

    async def event(self, ev: str, timeout: float = IO_TIMEOUT_S, **match) -> dict:
        """The oldest buffered or next event named `ev` whose fields include `match`;
        other events stay buffered."""
        deadline = time.monotonic() + timeout
        while True:
            for i, doc in enumerate(self.events):
                if doc["ev"] == ev and all(doc.get(k) == v for k, v in match.items()):
                    return self.events.pop(i)
            await self._read_frame(max(deadline - time.monotonic(), 0.001))

    async def msgs(self, conv: str, count: int) -> list[dict]:
        return [await self.event("msg", conv=conv) for _ in range(count)]

    async def until_synced(self, op: str, **fields) -> tuple[int, list[dict]]:
        """Send a command that ends with a `synced` event; return its id and every
        document that arrived from then to `synced`, in arrival order (presence, which
        carries state and may repeat, left out)."""
        start = len(self.log)
        id_ = await self.send(op, **fields)
        deadline = time.monotonic() + IO_TIMEOUT_S
        while not any(d.get("ev") == "synced" for d in self.log[start:]):
            await self._read_frame(max(deadline - time.monotonic(), 0.001))
        self.replies.pop(id_, None)
        self.events.clear()
        return id_, [d for d in self.log[start:] if d.get("ev") != "presence"]


def test_direct_conversation_between_two_users(spawn_parleyd):
    daemon = spawn_parleyd()  # two shards

    async def scenario():
        async with ws_connect(daemon.ws_url, token=mint_token("alice", dev="laptop")) as wa, \
                ws_connect(daemon.ws_url, token=mint_token("bob", dev="phone")) as wb:
            alice, bob = ChatClient(wa, "alice"), ChatClient(wb, "bob")

            # conv.list first: it also guarantees live delivery to the session from here on.
            assert await alice.ok("conv.list") == {"convs": []}
            assert await bob.ok("conv.list") == {"convs": []}

            # ---- conv.create: deterministic direct id, the creator added, bob told.
            created = await alice.ok("conv.create", kind="direct", members=["bob"])
            conv = created["conv"]
            assert DIRECT_ID.match(conv), created
            assert created == {"conv": conv, "kind": "direct",
                               "members": ["alice", "bob"], "created": True}
            told = await bob.event("conv", conv=conv)
            assert told["kind"] == "direct" and sorted(told["members"]) == ["alice", "bob"], told
            again = await bob.ok("conv.create", kind="direct", members=["alice"])
            assert again["conv"] == conv and again["created"] is False, again
            # A direct conversation names exactly one other user.
            assert (await alice.err("conv.create", kind="direct",
                                    members=["bob", "carol"]))["code"] == "bad_request"
            # Its members are fixed.
            assert (await alice.err("member.add", conv=conv,
                                    users=["carol"]))["code"] == "forbidden"
            assert (await bob.err("conv.leave", conv=conv))["code"] == "forbidden"

            # ---- send in both directions, one at a time: seqs are 1..n in order.
            script = [(alice, "hi bob"), (bob, "hi alice"), (alice, "how are you?"),
                      (bob, "fine"), (bob, "and you?"), (alice, "good")]
            sent = []
            last_ts = 0
            for seq, (who, body) in enumerate(script, start=1):
                cmid = f"{who.user}-{seq}"
                ok = await who.ok("send", conv=conv, cmid=cmid, body=body)
                assert ok["conv"] == conv and ok["seq"] == seq and ok["dup"] is False, ok
                assert ok["mid"] == f"{conv}#{seq}", ok
                assert isinstance(ok["ts"], int) and ok["ts"] >= last_ts, (ok, last_ts)
                last_ts = ok["ts"]
                sent.append({"ev": "msg", "conv": conv, "seq": seq, "mid": ok["mid"],
                             "from": who.user, "ts": ok["ts"], "kind": "text",
                             "body": body, "cmid": cmid})
            n = len(script)
            # Every member's session gets every message, its own included, in seq order.
            for client in (alice, bob):
                got = await client.msgs(conv, n)
                assert got == sent, f"{client.user} got {got}"

            # ---- an idempotent resend: the original seq/ts, dup, nothing delivered.
            dup = await alice.ok("send", conv=conv, cmid="alice-1", body="hi bob (again)")
            assert dup == {"conv": conv, "seq": 1, "mid": f"{conv}#1",
                           "ts": sent[0]["ts"], "dup": True}, dup
            # The next message is n + 1, and it is the next msg event on both sides: had
            # the resend delivered anything, it would have come first (seq order).
            ok = await bob.ok("send", conv=conv, cmid="bob-last", body="bye",
                              reply_to=n, kind="text")
            assert ok["seq"] == n + 1 and ok["dup"] is False, ok
            n += 1
            sent.append({"ev": "msg", "conv": conv, "seq": n, "mid": ok["mid"], "from": "bob",
                         "ts": ok["ts"], "kind": "text", "body": "bye", "cmid": "bob-last",
                         "reply_to": n - 1})
            for client in (alice, bob):
                assert await client.msgs(conv, 1) == sent[-1:], client.user
            # reply_to beyond the last seq is refused.
            assert (await alice.err("send", conv=conv, cmid="x", body="?",
                                    reply_to=n + 1))["code"] == "bad_request"

            # ---- ack -> delivered receipt; read -> read receipt (to every member).
            assert await alice.ok("ack", conv=conv, seq=n) == {}
            receipt = await bob.event("receipt", user="alice", kind="delivered")
            assert receipt == {"ev": "receipt", "conv": conv, "user": "alice",
                               "kind": "delivered", "seq": n}, receipt
            assert await bob.ok("ack", conv=conv, seq=n - 1) == {}
            receipt = await alice.event("receipt", user="bob", kind="delivered")
            assert receipt == {"ev": "receipt", "conv": conv, "user": "bob",
                               "kind": "delivered", "seq": n - 1}, receipt
            # Reading also moves the reading device's delivered cursor: a delivered
            # receipt, then the read one (sending moves no cursor).
            assert await bob.ok("read", conv=conv, seq=n) == {}
            read = await alice.event("receipt", user="bob", kind="read")
            assert read["seq"] == n, read
            await bob.event("receipt", user="bob", kind="read", seq=n)
            receipt = await alice.event("receipt", user="bob", kind="delivered")
            assert receipt["seq"] == n, receipt

            # conv.list: delivered_seq is this device's, read_seq the user's, unread.
            (entry,) = (await alice.ok("conv.list"))["convs"]
            assert entry["conv"] == conv and entry["kind"] == "direct", entry
            # Alice acked n and read nothing (sending moves no cursor).
            assert (entry["last_seq"], entry["delivered_seq"], entry["read_seq"],
                    entry["unread"]) == (n, n, 0, n), entry

            assert await alice.ok("read", conv=conv, seq=n) == {}
            receipt = await bob.event("receipt", user="alice", kind="read")
            assert receipt == {"ev": "receipt", "conv": conv, "user": "alice",
                               "kind": "read", "seq": n}, receipt
            # Receipts go to every member, the reader's own sessions included.
            await alice.event("receipt", user="alice", kind="read", seq=n)
            # Cursors never go back (a lower seq is accepted); beyond the last is refused.
            assert await alice.ok("read", conv=conv, seq=1) == {}
            assert (await bob.err("ack", conv=conv, seq=n + 1))["code"] == "bad_request"
            for client in (alice, bob):
                (entry,) = (await client.ok("conv.list"))["convs"]
                assert (entry["last_seq"], entry["delivered_seq"], entry["read_seq"],
                        entry["unread"]) == (n, n, n, 0), (client.user, entry)
            # The lower read sent no receipt: one would have come from the conversation's
            # home shard before its part of the conv.list replies above.
            assert [e for e in alice.events + bob.events if e["ev"] == "receipt"
                    and e["kind"] == "read"] == [], (alice.events, bob.events)

            # ---- history: ascending pages of msg events.
            page = await alice.ok("history", conv=conv)
            # The entries are the msg events themselves (no reactions here).
            assert page == {"msgs": sent, "more": False}, page
            page = await alice.ok("history", conv=conv, before=4, limit=2)
            assert [m["seq"] for m in page["msgs"]] == [2, 3] and page["more"] is True, page
            page = await bob.ok("history", conv=conv, after=n - 2, limit=5)
            assert [m["seq"] for m in page["msgs"]] == [n - 1, n] and page["more"] is False, page
            page = await bob.ok("history", conv=conv, after=0, limit=2)
            assert [m["seq"] for m in page["msgs"]] == [1, 2] and page["more"] is True, page
            assert (await bob.err("history", conv=conv, before=3, after=1))["code"] == "bad_request"

            # ---- sync from 0 on a new session: msg events, the reply, then synced.
            async with ws_connect(daemon.ws_url, token=mint_token("bob", dev="tablet")) as wt:
                tablet = ChatClient(wt, "bob")
                id_, docs = await tablet.until_synced("sync", cursors=[{"conv": conv, "after": 0}])
                # The named conversation is not listed in the reply; nothing was cut short.
                assert docs == sent + [{"re": id_, "ok": {"convs": []}}, {"ev": "synced"}], docs
                # A sync naming nothing lists it, with this device's (new) delivered cursor.
                id_, docs = await tablet.until_synced("sync", cursors=[])
                (reply, synced) = docs
                assert reply["re"] == id_ and synced == {"ev": "synced"}, docs
                assert [(c["conv"], c["last_seq"], c["delivered_seq"], c["read_seq"])
                        for c in reply["ok"]["convs"]] == [(conv, n, 0, n)], reply

            # ---- hello resume: the welcome, the missed messages, then synced.
            async with ws_connect(daemon.ws_url, token=mint_token("alice", dev="phone")) as wp:
                phone = ChatClient(wp, "alice")
                id_, docs = await phone.until_synced(
                    "hello", resume=[{"conv": conv, "after": n - 2}])
                welcome = docs[0]
                assert welcome["re"] == id_, docs
                assert welcome["ok"]["user"] == "alice" and welcome["ok"]["device"] == "phone", welcome
                assert docs[1:] == sent[-2:] + [{"ev": "synced"}], docs

    run(scenario(), timeout=60.0)
