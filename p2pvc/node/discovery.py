"""LAN discovery by mDNS (optional: `p2pvc serve --mdns`).

py-libp2p's mDNS service (zeroconf) announces this node and reports peers
it finds on a zeroconf thread. The callback only hands each peer to trio
through a memory channel; the node then dials it and runs a normal exchange,
which also tells whether the peer serves the same repository. A peer found
this way is not added to the stored peer list: the static list stays what
the user configured, and works without mDNS.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

MAX_PENDING_DISCOVERIES = 256  # discoveries waiting to be dialed; more are dropped until the queue drains


async def run_mdns(libp2p_host, port: int, on_peer: Callable[[str, str], Awaitable[bool]]) -> None:
    """Announce this host and call `on_peer(peer_id, address)` for every peer found, until cancelled.

    A peer is dialed again when it is announced again, until `on_peer` returns True
    (reached); zeroconf repeats announcements, so a peer that was not listening yet is retried.
    """
    from libp2p.discovery.events.peerDiscovery import peerDiscovery
    from libp2p.discovery.mdns.mdns import create_mdns_discovery

    own_id = libp2p_host.get_id().to_base58()
    send, receive = trio.open_memory_channel(MAX_PENDING_DISCOVERIES)
    token = trio.lowlevel.current_trio_token()

    def discovered(peer_info) -> None:  # runs on a zeroconf thread
        peer_id = peer_info.peer_id.to_base58()
        if peer_id == own_id:
            return
        for addr in peer_info.addrs:
            address = str(addr)
            if "/tcp/" not in address:
                continue
            if "/p2p/" not in address:
                address = f"{address}/p2p/{peer_id}"
            try:
                trio.from_thread.run_sync(send.send_nowait, (peer_id, address), trio_token=token)
            except (trio.WouldBlock, trio.RunFinishedError):
                pass  # queue full or node stopping: anti-entropy or the next announcement covers it
            return

    listen = [str(a) for a in libp2p_host.get_addrs()]
    discovery = create_mdns_discovery(libp2p_host.get_network(), port=port, listen_addrs=listen, host=libp2p_host)
    peerDiscovery.register_peer_discovered_handler(discovered)
    discovery.start()
    log.info("mDNS discovery started")
    reached: set[str] = set()
    try:
        async for peer_id, address in receive:
            if peer_id in reached:
                continue
            log.info("found peer %s by mDNS at %s", peer_id, address)
            if await on_peer(peer_id, address):
                reached.add(peer_id)
    finally:
        peerDiscovery.unregister_peer_discovered_handler(discovered)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(discovery.stop)
