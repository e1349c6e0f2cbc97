"""A minimal sync-protocol peer, run as its own process by tests/test_network.py.

Usage:

    python peer_client.py heads ADDRESS REPO_ID COUNT
    python peer_client.py receive ADDRESS REPO_ID IDS_FILE

`heads` runs COUNT cycles of: connect to ADDRESS (a new connection), send
one HEADS request, read the response, close the stream and close the
connection (see `start_closing`). It
prints one JSON line {"cycles", "failures", "errors", "seconds"} and exits
0 if every cycle succeeded. It stops early after MAX_FAILURES failures.

`receive` sends one OBJECTS request for the ids in IDS_FILE (hex, one per
line), prints "receiving" once the first object part arrives, and then reads
slowly, so a test can kill it while the response is still streaming. It
prints "done" if the response ends first.

Both modes exit on their own after MAX_LIFETIME_S seconds, so a test that
fails to end this process leaves nothing behind for long.
"""

from __future__ import annotations

import json
import os
import sys
import time

import trio

from p2pvc.net.host import open_host
from p2pvc.node.transport import Libp2pFrameStream
from p2pvc.protocol import messages as m

MAX_LIFETIME_S = 600.0
MAX_FAILURES = 10
CLOSE_TIMEOUT_S = 5.0
READ_DELAY_S = 0.05  # pause between frames in `receive`, so the response lasts long enough to interrupt


async def heads_cycles(address: str, repo_id: bytes, count: int) -> int:
    errors: list[str] = []
    cycles = 0
    started = time.monotonic()
    async with open_host(os.urandom(32), None) as host, trio.open_nursery() as closing:
        for _ in range(count):
            cycles += 1
            try:
                peer = await host.connect(address)
                stream = Libp2pFrameStream(await host.open_stream(peer, m.SYNC_PROTOCOL), peer.to_base58())
                await stream.send(m.HeadsRequest(repo_id))
                response = await stream.receive()
                await stream.close()
                if not isinstance(response, m.HeadsResponse):
                    raise RuntimeError(f"expected a heads response, got {response!r}")
                await start_closing(host, peer, closing)
            except Exception as exc:  # any failure of one cycle is counted and reported, not raised
                errors.append(f"cycle {cycles}: {type(exc).__name__}: {exc}")
                if len(errors) >= MAX_FAILURES:
                    break
    summary = {"cycles": cycles, "failures": len(errors), "errors": errors, "seconds": time.monotonic() - started}
    print(json.dumps(summary), flush=True)
    return 0 if not errors else 1


async def start_closing(host, peer, nursery: trio.Nursery) -> None:
    """Close every connection to `peer` in the background, and return once the swarm lists none.

    `Host.disconnect` waits about 0.2 s per connection inside py-libp2p 0.8.1
    (`SwarmConn._cleanup` sleeps after resetting streams), which would make
    1000 cycles take over 3 minutes. `SwarmConn.close` marks the connection
    closed and closes its socket before that sleep, so the next cycle opens a
    new connection, while at most a few old ones finish their cleanup.
    """
    for connection in host.swarm.get_connections(peer):
        nursery.start_soon(connection.close)
    with trio.fail_after(CLOSE_TIMEOUT_S):
        while host.swarm.get_connections(peer):
            await trio.sleep(0.001)


async def receive_slowly(address: str, repo_id: bytes, ids: list[bytes]) -> int:
    async with open_host(os.urandom(32), None) as host:
        peer = await host.connect(address)
        stream = Libp2pFrameStream(await host.open_stream(peer, m.SYNC_PROTOCOL), peer.to_base58())
        await stream.send(m.ObjectsRequest(repo_id, tuple(ids)))
        announced = False
        while True:
            response = await stream.receive()
            if isinstance(response, m.End):
                break
            if not announced:
                print("receiving", flush=True)
                announced = True
            await trio.sleep(READ_DELAY_S)
        await stream.close()
    print("done", flush=True)
    return 0


async def main(argv: list[str]) -> int:
    mode, address, repo_hex = argv[:3]
    repo_id = bytes.fromhex(repo_hex)
    with trio.move_on_after(MAX_LIFETIME_S):
        if mode == "heads":
            return await heads_cycles(address, repo_id, int(argv[3]))
        if mode == "receive":
            with open(argv[3]) as f:
                ids = [bytes.fromhex(line.strip()) for line in f if line.strip()]
            return await receive_slowly(address, repo_id, ids)
        raise SystemExit(f"unknown mode {mode!r}; use heads or receive")
    print(f"stopped after {MAX_LIFETIME_S} s", flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(trio.run(main, sys.argv[1:]))
