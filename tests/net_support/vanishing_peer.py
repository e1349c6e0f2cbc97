"""A peer that stops in the middle of a frame, for tests/test_net_host.py.

Usage: python vanishing_peer.py PEER_ADDRESS PROTOCOL_ID

Connects to PEER_ADDRESS (a multiaddr ending in /p2p/PEERID), opens a
PROTOCOL_ID stream, writes the 4-byte header of a 1 MiB frame and the first
1000 bytes of its payload, prints "sent" and then waits to be killed. It
exits on its own after 60 s, so a test that fails to kill it leaves no
process behind for long.
"""

from __future__ import annotations

import os
import sys

import trio

from p2pvc.net.framing import HEADER
from p2pvc.net.host import open_host

FRAME_SIZE = 1024 * 1024
SENT_BYTES = 1000
MAX_LIFETIME = 60.0


async def main(address: str, protocol_id: str) -> None:
    async with open_host(os.urandom(32), None) as host:
        peer_id = await host.connect(address)
        stream = await host.open_stream(peer_id, protocol_id)
        await stream.write(HEADER.pack(FRAME_SIZE) + bytes(SENT_BYTES))
        print("sent", flush=True)
        await trio.sleep(MAX_LIFETIME)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])
