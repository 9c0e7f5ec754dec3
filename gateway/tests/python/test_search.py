"""Search through an independent client (Python `websockets`): PROTOCOL.md section 10.

Two users on a two-shard parleyd: messages with accents and mixed case are found by
their folded forms, a phrase and a prefix match, `from` filters, pages follow the
cursor, and a user outside a conversation never sees its messages. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time

from conftest import IO_TIMEOUT_S, mint_token, run, ws_connect
from test_chat import ChatClient


async def search_until(client: ChatClient, want: int, **fields) -> dict:
    """Search until `want` hits come back (the index commits every 100 ms here)."""
    deadline = time.monotonic() + IO_TIMEOUT_S
    while True:
        ok = await client.ok("search", **fields)
        if len(ok["hits"]) == want:
            return ok
        assert time.monotonic() < deadline, f"{fields}: {ok} after {IO_TIMEOUT_S} s"
        await asyncio.sleep(0.02)


def test_search_folds_filters_pages_and_keeps_to_members(spawn_parleyd):
    daemon = spawn_parleyd("--search-commit-interval-ms", "100")

    async def scenario():
        async with ws_connect(daemon.ws_url, token=mint_token("alice")) as wa, \
                ws_connect(daemon.ws_url, token=mint_token("bob")) as wb, \
                ws_connect(daemon.ws_url, token=mint_token("eve")) as we:
            alice, bob, eve = ChatClient(wa, "alice"), ChatClient(wb, "bob"), ChatClient(we, "eve")
            for client in (alice, bob, eve):
                await client.ok("conv.list")
            conv = (await alice.ok("conv.create", kind="group", members=["bob"]))["conv"]
            bodies = [(alice, "Rendez-vous au Café de Flore"), (bob, "le CAFÉ est fermé"),
                      (alice, "café crème, s'il vous plaît"), (bob, "nothing to see")]
            seqs = []
            for i, (who, body) in enumerate(bodies):
                seqs.append((await who.ok("send", conv=conv, cmid=f"m{i}", body=body))["seq"])

            found = await search_until(alice, 3, q="cafe")
            assert {h["seq"] for h in found["hits"]} == set(seqs[:3]), found
            for hit in found["hits"]:
                assert set(hit) == {"conv", "seq", "from", "ts", "kind", "snippet"}, hit
                assert hit["conv"] == conv and hit["kind"] == "text", hit
                assert "<b>" in hit["snippet"], hit

            phrase = await bob.ok("search", q='"cafe creme"')
            assert [h["seq"] for h in phrase["hits"]] == [seqs[2]], phrase
            prefix = await bob.ok("search", q="ferm*")
            assert [h["seq"] for h in prefix["hits"]] == [seqs[1]], prefix
            by_bob = await alice.ok("search", q="café", **{"from": "bob"})
            assert [h["seq"] for h in by_bob["hits"]] == [seqs[1]], by_bob

            first = await alice.ok("search", q="cafe", limit=2)
            assert len(first["hits"]) == 2 and "next" in first, first
            rest = await alice.ok("search", q="cafe", limit=2, cursor=first["next"])
            assert len(rest["hits"]) == 1 and "next" not in rest, rest
            paged = {h["seq"] for h in first["hits"] + rest["hits"]}
            assert paged == set(seqs[:3]), (first, rest)

            # eve is in no conversation: no hits, even naming it.
            assert (await eve.ok("search", q="cafe"))["hits"] == []
            assert (await eve.ok("search", q="cafe", conv=conv))["hits"] == []
            assert (await eve.err("search", q='"open'))["code"] == "bad_request"

    run(scenario())
