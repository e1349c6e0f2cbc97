"""This machine's address as other hosts would dial it."""

from __future__ import annotations

import socket


def primary_ip() -> str:
    """Return this machine's address for the default route, without sending anything."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # connect() on a UDP socket only picks a route and source address; no packet is sent.
        sock.connect(("192.0.2.1", 9))  # TEST-NET-1 (RFC 5737), never routed to a real host
        return sock.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        sock.close()
