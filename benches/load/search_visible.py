#!/usr/bin/env python3
"""How soon a message is searchable after its `ok` (docs/BENCHMARKS.md, "Search").

Against a running parleyd: one session sends N messages, one at a time, each with a word
of its own; after each `ok` it searches for that word every POLL_MS until the message is
found, and records the time from the `ok` to the answer that found it. Prints p50, p99
and max. The `ok` comes once the message is durable, so this is durability-to-searchable
plus one search's round trip, at the granularity of POLL_MS.

    benches/load/search_visible.py --port 18270 --data-dir /tmp/parley-search/data -n 200
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import time

import websockets


def token(secret: bytes, user: str) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": user, "exp": int(time.time()) + 3600}).encode())
    signature = hmac.new(secret, f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(signature)}"


class Session:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 1

    async def call(self, op: str, **fields) -> dict:
        id_ = self.next_id
        self.next_id += 1
        await self.ws.send(json.dumps({"id": id_, "op": op, **fields}))
        while True:
            for line in (await asyncio.wait_for(self.ws.recv(), 10)).split("\n"):
                if line.strip():
                    doc = json.loads(line)
                    if doc.get("re") == id_:
                        if "ok" not in doc:
                            raise SystemExit(f"{op} {fields}: {doc}")
                        return doc["ok"]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", required=True, help="for the generated jwt-secret")
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--poll-ms", type=float, default=5)
    args = parser.parse_args()
    secret = open(f"{args.data_dir}/jwt-secret", "rb").read().strip()
    url = f"ws://127.0.0.1:{args.port}/v1/ws"
    headers = {"Authorization": f"Bearer {token(secret, 'visibility')}"}
    async with websockets.connect(url, additional_headers=headers, subprotocols=["parley.v1"]) as ws:
        session = Session(ws)
        await session.call("conv.list")
        conv = (await session.call("conv.create", kind="group", members=["other"]))["conv"]
        delays = []
        run = int(time.time())
        for i in range(args.n):
            word = f"vis{run}x{i}"
            await session.call("send", conv=conv, cmid=f"v{i}", body=f"visibility probe {word}")
            ok_at = time.monotonic()
            while True:
                found = await session.call("search", q=word)
                if found["hits"]:
                    delays.append(time.monotonic() - ok_at)
                    break
                if time.monotonic() - ok_at > 10:
                    raise SystemExit(f"{word} not found 10 s after its ok")
                await asyncio.sleep(args.poll_ms / 1000)
    delays.sort()
    pick = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))] * 1000
    print(f"searchable after ok: {len(delays)} messages, p50 {pick(0.5):.0f} ms, "
          f"p99 {pick(0.99):.0f} ms, max {delays[-1] * 1000:.0f} ms (polling every {args.poll_ms} ms)")


asyncio.run(main())
