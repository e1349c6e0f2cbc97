"""A libp2p host for p2pvc: TCP, Noise and Yamux only, hardened against py-libp2p 0.8.1 faults.

`open_host(seed, listen)` starts a py-libp2p host whose peer id derives from
the user's 32-byte Ed25519 seed and yields a `Host`: `set_handler`,
`connect`, `open_stream`, `disconnect`. Leaving the `async with` block stops
the host within `STOP_TIMEOUT` seconds, also when the block is cancelled, as
a SIGINT or SIGTERM handler would do (see the NOTE of `open_host` on why
SIGINT must not arrive as a KeyboardInterrupt).

What this module changes in py-libp2p 0.8.1 (the version it was checked
against), and why:

- Security and muxing: only Noise and Yamux are offered. `new_host()` with
  default options also offers TLS, secio and plaintext, and a peer that
  offered only plaintext could connect. QUIC and Mplex are not offered: an
  earlier measurement found QUIC at about 4 MiB/s on one stream, and
  benchmarks/libp2p_stream.py measures TCP with Yamux.
- Auto-connector: the swarm's AutoConnector redials known peers to keep
  `low_watermark` connections (default 100). A peer we had disconnected was
  dialed again 60-90 s later, after the AutoConnector's 60 s back-off and
  on its next 30 s timer tick. `_DisabledAutoConnector` never starts.
- Stream handlers: an exception that escapes a stream handler ends
  `host.run()` with an ExceptionGroup and so stops the host. `set_handler`
  wraps every handler, and the swarm-level dispatcher is wrapped as well,
  which covers libp2p's own identify and ping handlers: the failure is
  logged with the peer id, the stream is reset, and the host keeps serving.
- Dials: with `max_connections_per_peer` at 1, a dial returns as soon as it
  succeeds instead of waiting out the swarm's 250 ms happy-eyeballs delay.
  A failed dial is retried once (the library default is 3 retries), and an
  explicit `connect` clears the 60 s block that the swarm puts on a peer
  whose dial failed.
- Listening: py-libp2p's TCP listener sets SO_REUSEPORT (for hole punching,
  which p2pvc does not use), so a second node of the same user could listen
  on the same port, and the kernel would split inbound connections between
  the two. `_disable_tcp_port_sharing` leaves only SO_REUSEADDR, so the
  second node fails to start instead.
- Writes: `Yamux._write_frame` encrypts a frame (one Noise nonce per
  message) and then sends it. A cancellation that lands in between, as
  when a caller abandons a request, leaves the peer one message short, so
  it fails to decrypt everything after and drops the whole connection.
  `_make_frame_writes_whole` shields each write from outside cancellation
  and bounds it by FRAME_WRITE_TIMEOUT instead; a write that times out
  closes the connection, which can no longer be used.
- Window updates: py-libp2p's Yamux grants the sender more window after
  almost every read of a stream, once the stream's window target has grown
  past its initial 256 KiB, so a bulk transfer pays one more encrypted frame
  for almost every read (2,305 updates in one 256 MiB sync measured here).
  `_batch_window_updates` keeps go-yamux's rule instead: grant more only
  once half the target is used up (450 updates for the same sync). The
  target still grows as the library measures it, up to 16 MiB.
- Logging: see `configure_libp2p_logging`.

Inbound-slot leak: theory of operation
--------------------------------------
In libp2p/network/swarm.py (0.8.1), `Swarm._handle_inbound_connection`
takes a token from `Swarm._inbound_limiter` (line 1982), a
`trio.CapacityLimiter` with `max_connections - min_connections` tokens (250
by default), and gives it back in a `finally` clause (line 1999) when
`_do_handle_inbound_connection` returns. That method upgrades the connection
and then awaits `self.manager.wait_finished()` (line 2060), which returns
only when the whole swarm stops: the listener closes the socket as soon as
its handler returns, so the library keeps the handler alive. Every inbound
connection therefore keeps its token and its task after it has closed, and
once the swarm has accepted 250 inbound connections in its lifetime it
closes every new one unanswered.

`_install_inbound_slot_release` replaces `_do_handle_inbound_connection` on
our swarm instance with `_serve_inbound_connection`. That function runs the
same TCP path (connection gate, then `upgrade_inbound_raw_conn`) and then
waits until this connection's Yamux session sets `event_closed`, which
happens when either side closes it or the socket fails. Then it returns: the
library's `finally` gives the token back, the task ends, and the listener's
close of the already closed socket does nothing. Pre-multiplexed connections
(QUIC) still go to the original method; this host never creates them.
`tests/test_net_host.py` makes more inbound connections than the limit and
checks that each one is accepted.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager

import libp2p
import libp2p.network.connection.swarm_connection as swarm_connection_module
import libp2p.stream_muxer.yamux.yamux as yamux_module
import libp2p.transport.tcp.tcp as tcp_module
import trio
from libp2p import new_host
from libp2p.abc import IMuxedConn, INetConn, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair as create_ed25519_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError, MultiError
from libp2p.host.basic_host import BasicHost
from libp2p.io.abc import ReadWriteCloser
from libp2p.io.exceptions import IOException
from libp2p.metrics.swarm import SwarmEvent
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.exceptions import PeerIDMismatchesPubkey
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.exceptions import OpenConnectionError
from libp2p.transport.tcp.tcp import TCP
from multiaddr import Multiaddr

from p2pvc.errors import P2pvcError, PeerError, UserError
from p2pvc.net.framing import RESET_TIMEOUT, close_quietly, reset_quietly, stream_peer_id

SEED_SIZE = 32

STOP_TIMEOUT = 2.0
"""Seconds that leaving `open_host` may take, including py-libp2p's own shutdown."""

_SHUTDOWN_TIMEOUT = 1.5
"""Part of STOP_TIMEOUT for closing connections and the swarm. The rest is for `host.run()` to exit."""

CONNECT_TIMEOUT = 15.0
"""Default seconds for `Host.connect` to dial, secure and multiplex a connection."""

STREAM_OPEN_TIMEOUT = 10.0
"""Default seconds for `Host.open_stream` to open a stream and agree on its protocol."""

DEFAULT_MAX_CONNECTIONS = 300
"""Limit on open connections, inbound and outbound together, as in py-libp2p 0.8.1.

py-libp2p keeps 50 of them (`min_connections`) for outbound connections, and
this host keeps none, so all of them can be inbound.
"""

DIAL_RETRIES = 1
"""Retries after a failed dial attempt (py-libp2p 0.8.1 defaults to 3). The `connect` timeout bounds them all."""

LIBP2P_LOG_LEVEL = logging.CRITICAL
"""Default level for py-libp2p's loggers. py-libp2p 0.8.1 logs routine events
such as a peer closing a connection during a handshake at ERROR, and this
module logs every failure that matters to p2pvc itself on `p2pvc.net`."""

_HANDLER_LOG_LIMIT = 20
_HANDLER_LOG_WINDOW = 60.0

StreamHandler = Callable[[INetStream], Awaitable[None]]
"""An async function that serves one inbound stream."""

logger = logging.getLogger("p2pvc.net")

_libp2p_logging_configured = False


class ConnectError(PeerError):
    """A connection to a peer could not be made."""


class StreamOpenError(PeerError):
    """A stream to a peer could not be opened or its protocol was not agreed."""


def configure_libp2p_logging(level: int = LIBP2P_LOG_LEVEL) -> None:
    """Route py-libp2p's log records through the application's handlers, at `level` and above.

    This undoes three things that py-libp2p 0.8.1 does to logging. First,
    `import libp2p` gives the `libp2p` logger level WARNING, no handler and no
    propagation, so its records bypass the application's handlers and reach
    stderr through Python's last-resort handler. Second,
    `libp2p.network.auto_connector` sets its own logger to INFO. Third,
    `libp2p.network.connection.swarm_connection` logs through the root logger,
    and the module-level logging functions call `logging.basicConfig()` when
    the root logger has no handler.

    If LIBP2P_DEBUG is set, py-libp2p has set up its own debug handlers on
    purpose, and only the root-logger fix is applied. The structural changes
    run once per process, and every call sets `level`.
    """
    global _libp2p_logging_configured
    library_logger = logging.getLogger("libp2p")
    if not _libp2p_logging_configured:
        # A Logger has the same debug/warning methods as the logging module, so the
        # module's records now carry its own logger name and level.
        swarm_connection_module.logging = logging.getLogger(swarm_connection_module.__name__)  # type: ignore[attr-defined,assignment]
        if not os.environ.get("LIBP2P_DEBUG"):
            library_logger.handlers.clear()
            library_logger.propagate = True
            logging.getLogger("libp2p.network.auto_connector").setLevel(logging.NOTSET)
        _libp2p_logging_configured = True
    if not os.environ.get("LIBP2P_DEBUG"):
        library_logger.setLevel(level)


def _set_reuse_address(sock: trio.socket.SocketType) -> None:
    """Set SO_REUSEADDR only, so a restarted node can bind while old connections sit in TIME_WAIT."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def _disable_tcp_port_sharing() -> None:
    """Make py-libp2p's TCP sockets use SO_REUSEADDR without SO_REUSEPORT, in this whole process.

    `libp2p.transport.tcp.tcp` looks `_set_reuse_flags` up as a module global
    each time it opens a listener or a hole-punching dial, so replacing it
    there is enough.
    """
    if not hasattr(tcp_module, "_set_reuse_flags"):
        raise RuntimeError(
            f"py-libp2p {libp2p.__version__} has no libp2p.transport.tcp.tcp._set_reuse_flags; "
            "the SO_REUSEPORT workaround in p2pvc/net/host.py must be revised"
        )
    tcp_module._set_reuse_flags = _set_reuse_address


FRAME_WRITE_TIMEOUT = 60.0  # seconds one muxer frame may take to send before the connection is closed


async def _write_whole_frame(self: Yamux, data: bytes) -> None:
    """Send one Yamux frame completely or close the connection: never half a frame."""
    async with self._write_lock:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + FRAME_WRITE_TIMEOUT
            await self.secured_conn.write(data)
        if scope.cancelled_caught:
            with trio.move_on_after(1.0) as closing:
                closing.shield = True
                await self.secured_conn.close()
            raise IOException(f"sending a frame took over {FRAME_WRITE_TIMEOUT:g} s; the connection is closed")


def _make_frame_writes_whole() -> None:
    """Replace `Yamux._write_frame` in this whole process (see the module docstring)."""
    if not hasattr(Yamux, "_write_frame"):
        raise RuntimeError(
            f"py-libp2p {libp2p.__version__} has no Yamux._write_frame; "
            "the write workaround in p2pvc/net/host.py must be revised"
        )
    Yamux._write_frame = _write_whole_frame


async def _update_window_when_half_used(self: yamux_module.YamuxStream, *, bytes_read: int = 0) -> None:
    """Grant the peer more receive window only once half of it is used up (go-yamux's rule).

    `bytes_read` is unused, because the credit owed follows from the window
    and the unread buffer. This cannot stall a sender: when it is blocked and
    the reader has emptied the buffer, the whole target window is owed, which
    is at least the threshold, so the reader's next read grants it.
    """
    del bytes_read
    increment = 0
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        owed = self.target_recv_window - (self.recv_window + buffered)
        if owed >= self._grow_threshold() and owed > 0:
            increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
    if increment > 0:
        await self.send_window_update(increment, skip_lock=True)


def _batch_window_updates() -> None:
    """Send Yamux window updates in half-window batches, in this whole process (see the module docstring)."""
    stream_class = yamux_module.YamuxStream
    for name in ("_auto_tune_and_send_window_update", "_grow_threshold", "_grow_to_delta", "_apply_autotune_epoch"):
        if not hasattr(stream_class, name):
            raise RuntimeError(
                f"py-libp2p {libp2p.__version__} has no YamuxStream.{name}; "
                "the window-update change in p2pvc/net/host.py must be revised"
            )
    stream_class._auto_tune_and_send_window_update = _update_window_when_half_used


def key_pair_from_seed(seed: bytes) -> KeyPair:
    """Return the libp2p Ed25519 key pair for a 32-byte seed. The same seed always gives the same pair."""
    if len(seed) != SEED_SIZE:
        raise ValueError(f"an Ed25519 seed has {SEED_SIZE} bytes, got {len(seed)}")
    return create_ed25519_key_pair(seed)


def peer_id_of(seed: bytes) -> ID:
    """Return the libp2p peer id of the identity with this 32-byte seed."""
    return ID.from_pubkey(key_pair_from_seed(seed).public_key)


def parse_peer_address(address: str | Multiaddr) -> PeerInfo:
    """Parse a multiaddr that ends in /p2p/PEERID into the peer id and its transport address."""
    if "/p2p/" not in str(address):
        raise UserError(
            f"invalid peer address {str(address)!r}: it must end in /p2p/PEER_ID",
            hint="`p2pvc id` on the other node prints its full address",
        )
    try:
        multiaddr = address if isinstance(address, Multiaddr) else Multiaddr(address)
        return info_from_p2p_addr(multiaddr)
    except Exception as exc:  # multiaddr and libp2p raise several unrelated classes here
        raise UserError(
            f"invalid peer address {str(address)!r}: {exc}",
            hint="a peer address looks like /ip4/192.0.2.7/tcp/4001/p2p/12D3KooW...",
        ) from exc


def _as_peer_id(peer_id: ID | str) -> ID:
    if isinstance(peer_id, ID):
        return peer_id
    try:
        return ID.from_base58(peer_id)
    except Exception as exc:  # base58 and multihash decoding raise ValueError and others
        raise UserError(f"invalid peer id {peer_id!r}: {exc}") from exc


class _DisabledAutoConnector(AutoConnector):
    """An AutoConnector that never starts, so the swarm never dials a peer on its own.

    While `_started` is False, `maybe_connect` and `run_background_task` return at once.
    """

    async def start(self) -> None:
        self._started = False


class _RepeatLimiter:
    """Rate limit of `limit` events per `window` seconds, with a count of the events it suppressed."""

    def __init__(self, limit: int, window: float) -> None:
        self._limit = limit
        self._window = window
        self._window_start = time.monotonic()
        self._allowed = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window_start >= self._window:
            self._window_start = now
            self._allowed = 0
        if self._allowed < self._limit:
            self._allowed += 1
            return True
        self.suppressed += 1
        return False


async def _serve_inbound_connection(swarm: Swarm, read_write_closer: ReadWriteCloser, listen_addr: Multiaddr) -> None:
    """Upgrade one inbound TCP connection and return once it has closed (see the module docstring)."""
    remote_addr = swarm._build_remote_multiaddr(read_write_closer)
    if remote_addr is not None and not await swarm.connection_gate.is_allowed(remote_addr):
        logger.debug("inbound connection from %s rejected by the connection gate", remote_addr)
        await _close_raw_quietly(read_write_closer)
        return

    raw_conn = RawConnection(read_write_closer, False)
    try:
        muxed_conn = await swarm.upgrade_inbound_raw_conn(raw_conn, listen_addr)
    except BaseLibp2pError as exc:
        # Failed handshakes and connection limits: the library has already logged the cause.
        logger.debug("inbound connection from %s on %s failed: %r", remote_addr, listen_addr, exc)
        await _close_raw_quietly(raw_conn)
        return

    # Returning sooner would let trio.serve_listeners close the socket under a live connection.
    if isinstance(muxed_conn, Yamux):
        await muxed_conn.event_closed.wait()
    else:  # not reached while only Yamux is offered; keeps the library's behaviour
        await swarm.manager.wait_finished()


async def _close_raw_quietly(connection: ReadWriteCloser) -> None:
    with trio.move_on_after(RESET_TIMEOUT) as scope:
        scope.shield = True
        try:
            await connection.close()
        except Exception as exc:  # the socket is already gone
            logger.debug("closing a rejected inbound connection failed: %r", exc)


def _install_inbound_slot_release(swarm: Swarm) -> None:
    """Make inbound connections give back their inbound-limit token when they close."""
    if not hasattr(swarm, "_do_handle_inbound_connection") or not hasattr(swarm, "_inbound_limiter"):
        raise RuntimeError(
            f"py-libp2p {libp2p.__version__} has no Swarm._do_handle_inbound_connection or "
            "Swarm._inbound_limiter; the inbound-slot workaround in p2pvc/net/host.py must be revised"
        )
    original = swarm._do_handle_inbound_connection

    # py-libp2p runs its TCP listener in a trio system task, and an exception that escapes into
    # it, such as KeyboardInterrupt from SIGINT, ends trio.run with TrioInternalError. With
    # protection on, trio delivers KeyboardInterrupt to the main task instead.
    @trio.lowlevel.enable_ki_protection
    async def handle_inbound(
        read_write_closer: ReadWriteCloser, listen_addr: Multiaddr, failure_event: SwarmEvent
    ) -> None:
        if isinstance(read_write_closer, IMuxedConn):
            await original(read_write_closer, listen_addr, failure_event)
            return
        await _serve_inbound_connection(swarm, read_write_closer, listen_addr)

    swarm._do_handle_inbound_connection = handle_inbound  # type: ignore[method-assign,assignment]


def _build_libp2p_host(key_pair: KeyPair, max_connections: int) -> BasicHost:
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    config = ConnectionConfig(
        max_connections=max_connections,
        # With no minimum and no low watermark the swarm wants no connections of its own,
        # and all max_connections are available to inbound connections.
        min_connections=0,
        low_watermark=0,
        high_watermark=max_connections,
        max_connections_per_peer=1,
    )
    host = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        transports=[TCP()],
        connection_config=config,
    )
    if not isinstance(host, BasicHost) or not isinstance(host.get_network(), Swarm):
        raise RuntimeError(f"py-libp2p {libp2p.__version__} new_host() returned {type(host).__name__}, expected BasicHost")
    return host


class Host:
    """A running libp2p host. Create it with `open_host`."""

    def __init__(self, libp2p_host: BasicHost, *, release_inbound_slots: bool = True) -> None:
        self._host = libp2p_host
        network = libp2p_host.get_network()
        assert isinstance(network, Swarm)
        self._swarm: Swarm = network
        self._handler_log_limiter = _RepeatLimiter(_HANDLER_LOG_LIMIT, _HANDLER_LOG_WINDOW)

        self._swarm.retry_config = RetryConfig(max_retries=DIAL_RETRIES)
        self._swarm.auto_connector = _DisabledAutoConnector(
            self._swarm, auto_connect_interval=self._swarm.connection_config.auto_connect_interval
        )
        if release_inbound_slots:
            _install_inbound_slot_release(self._swarm)
        self._swarm.set_stream_handler(self._guard_dispatch(self._swarm.common_stream_handler))

    @property
    def peer_id(self) -> ID:
        return self._host.get_id()

    @property
    def listen_addrs(self) -> list[Multiaddr]:
        """The addresses this host listens on, each ending in /p2p/PEERID. A dial-only host has none."""
        return list(self._host.get_addrs())

    @property
    def libp2p_host(self) -> BasicHost:
        """The underlying py-libp2p host, for diagnostics and tests."""
        return self._host

    @property
    def swarm(self) -> Swarm:
        """The underlying py-libp2p swarm, for diagnostics and tests."""
        return self._swarm

    def set_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """Serve inbound streams of `protocol_id` with `handler`.

        The handler runs once per stream. If it raises, the error is logged
        with the peer id and the stream is reset. If it returns, the stream is
        closed. Either way the host keeps serving.
        """

        async def guarded(stream: INetStream) -> None:
            try:
                await handler(stream)
            except Exception as exc:
                self._log_handler_failure(protocol_id, stream, exc)
                await reset_quietly(stream)
                return
            await close_quietly(stream)

        self._host.set_stream_handler(TProtocol(protocol_id), guarded)

    def is_connected(self, peer_id: ID | str) -> bool:
        connections = self._swarm.get_connections(_as_peer_id(peer_id))
        return any(not connection.is_closed for connection in connections)

    def connected_peers(self) -> list[ID]:
        return list(self._host.get_connected_peers())

    async def connect(self, address: str | Multiaddr, timeout: float = CONNECT_TIMEOUT) -> ID:
        """Connect to the peer at `address` (a multiaddr ending in /p2p/PEERID) and return its peer id.

        An open connection to that peer is reused, whatever address it was
        made on. Raises UserError for an invalid address, and ConnectError if
        the dial fails or takes over `timeout` s.
        """
        peer_info = parse_peer_address(address)
        peer_id = peer_info.peer_id
        if peer_id == self.peer_id:
            raise UserError(
                f"peer address {address} names this node's own peer id",
                hint="use the other node's address: `p2pvc id` there prints it",
            )
        if self.is_connected(peer_id):
            return peer_id

        # The caller requested this dial, so the swarm's 60 s block after a failed dial must not reject it.
        self._swarm.unblock_peer(peer_id)
        # Dial only this address: the swarm dials every address the peerstore holds for the
        # peer, and one that failed before (a wrong port, say) made this dial fail as well.
        self._host.get_peerstore().clear_addrs(peer_id)
        try:
            with trio.fail_after(timeout):
                await self._host.connect(peer_info)
        except trio.TooSlowError as exc:
            raise ConnectError(
                f"connecting to peer {peer_id} at {address} timed out after {timeout:g} s",
                hint="check that the peer is running and that its address and port are reachable",
            ) from exc
        except (BaseLibp2pError, OSError) as exc:
            raise _connect_error(exc, peer_id, str(address)) from exc
        logger.debug("connected to peer %s at %s", peer_id, address)
        return peer_id

    async def open_stream(
        self, peer_id: ID | str, protocol_id: str, timeout: float = STREAM_OPEN_TIMEOUT
    ) -> INetStream:
        """Open a stream to `peer_id` for `protocol_id`.

        Uses the open connection to the peer, or dials the peer's addresses
        in the host's peerstore. Raises StreamOpenError if that fails, the peer
        does not serve the protocol, or it takes over `timeout` s.
        """
        peer = _as_peer_id(peer_id)
        try:
            with trio.fail_after(timeout):
                return await self._host.new_stream(peer, [TProtocol(protocol_id)])
        except trio.TooSlowError as exc:
            raise StreamOpenError(f"opening a {protocol_id} stream to peer {peer} timed out after {timeout:g} s") from exc
        except (BaseLibp2pError, OSError) as exc:
            raise StreamOpenError(f"opening a {protocol_id} stream to peer {peer} failed: {_describe(exc)}") from exc

    async def disconnect(self, peer_id: ID | str) -> None:
        """Close every connection to `peer_id`. The host does not dial it again on its own."""
        peer = _as_peer_id(peer_id)
        await self._host.disconnect(peer)
        logger.debug("disconnected from peer %s", peer)

    async def _shutdown(self) -> None:
        # Swarm.close() closes connections one after another, and each close sleeps 0.2 s
        # inside py-libp2p, so close them all at once first.
        async with trio.open_nursery() as nursery:
            for connection in self._swarm.get_connections():
                nursery.start_soon(self._close_connection, connection)
        await self._host.close()

    async def _close_connection(self, connection: INetConn) -> None:
        try:
            await connection.close()
        except Exception as exc:  # a connection that fails to close is gone anyway
            logger.debug("closing the connection to peer %s failed: %r", connection.muxed_conn.peer_id, exc)

    def _guard_dispatch(self, dispatch: StreamHandler) -> StreamHandler:
        """Wrap the swarm's stream dispatcher, which also runs libp2p's own protocol handlers."""

        async def guarded(stream: INetStream) -> None:
            try:
                await dispatch(stream)
            except Exception as exc:
                self._log_handler_failure(str(stream.get_protocol() or "unnegotiated"), stream, exc)
                await reset_quietly(stream)

        return guarded

    def _log_handler_failure(self, protocol_id: str, stream: INetStream, exc: Exception) -> None:
        if not self._handler_log_limiter.allow():
            return
        suppressed = self._handler_log_limiter.suppressed
        self._handler_log_limiter.suppressed = 0
        note = f" ({suppressed} earlier failures not logged)" if suppressed else ""
        message = "%s stream handler for peer %s failed and the stream was reset: %s%s"
        if isinstance(exc, P2pvcError):
            # Expected failures such as a peer breaking the protocol need no traceback.
            logger.warning(message, protocol_id, stream_peer_id(stream), exc, note)
        else:
            logger.error(message, protocol_id, stream_peer_id(stream), _describe(exc), note, exc_info=exc)


def _connect_error(exc: BaseException, peer_id: ID, address: str) -> ConnectError:
    """Turn py-libp2p's dial error into one line that names the likely fault.

    The dial error only reports that no address worked. Its causes (a chain,
    with a MultiError per address) tell a refused TCP connection from a node
    whose Noise handshake proved another key than the peer id names. A wrong
    peer id at the right host and port gives the second.
    """
    causes = list(_causes(exc))
    where = address.split("/p2p/")[0]
    if any(isinstance(c, PeerIDMismatchesPubkey) for c in causes):
        return ConnectError(
            f"the node at {where} is not peer {peer_id}: its Noise handshake proved another key; "
            "check the peer id at the end of the address (`p2pvc id` on that node prints it)"
        )
    if any(isinstance(c, OpenConnectionError) for c in causes):
        return ConnectError(
            f"nothing accepted a connection for peer {peer_id} at {where}; "
            "check that p2pvc serve runs there on that port"
        )
    return ConnectError(
        f"connecting to peer {peer_id} at {address} failed: {_describe(exc)}",
        hint="check that the peer is running and that its address and port are reachable",
    )


def _causes(exc: BaseException, limit: int = 32) -> Iterator[BaseException]:
    """Yield `exc`, its causes and the members of any MultiError or exception group among them."""
    pending = [exc]
    seen: set[int] = set()
    while pending and len(seen) < limit:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if current.__cause__ is not None:
            pending.append(current.__cause__)
        if current.__context__ is not None and not current.__suppress_context__:
            pending.append(current.__context__)
        if isinstance(current, MultiError):
            pending.extend(current.errors)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)


def _describe(exc: BaseException, max_causes: int = 3) -> str:
    """Describe `exc` and up to `max_causes` of its causes in one line.

    py-libp2p's dial error reports only that no address worked, and the reason is in its causes.
    """
    parts: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(parts) <= max_causes:
        text = str(current).strip()
        parts.append(f"{type(current).__name__}: {text}" if text else type(current).__name__)
        current = current.__cause__
    return "; caused by ".join(parts)


def _single_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """Return the only exception inside `group` and its nested groups, or None if there are several."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        current = pending.pop()
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        else:
            leaves.append(current)
    return leaves[0] if len(leaves) == 1 else None


def _parse_listen_address(address: str) -> Multiaddr:
    try:
        return Multiaddr(address)
    except Exception as exc:  # multiaddr raises several unrelated classes for bad input
        raise UserError(
            f"invalid listen address {address!r}: {exc}", hint="a listen address looks like /ip4/0.0.0.0/tcp/4001"
        ) from exc


@asynccontextmanager
async def open_host(
    seed: bytes,
    listen: Sequence[str] | None = None,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    release_inbound_slots: bool = True,
) -> AsyncIterator[Host]:
    """Run a libp2p host with the identity of `seed` for the duration of the `async with` block.

    `listen` lists multiaddrs such as /ip4/127.0.0.1/tcp/0 (port 0 picks a free
    port, see `Host.listen_addrs`); None or an empty list makes a host that
    only dials. `max_connections` limits open connections, inbound and
    outbound together. `release_inbound_slots=False` turns off the workaround
    for py-libp2p's inbound-slot leak and is for tests only.

    Raises UserError if a listen address is invalid or cannot be listened on.

    NOTE: a KeyboardInterrupt that Python raises in the middle of py-libp2p's
    listener code ends trio.run with TrioInternalError. Inbound connection
    handling is protected (see `_install_inbound_slot_release`), but the
    listener's accept loop is not, so a long-running node should turn SIGINT
    into a cancellation with `trio.open_signal_receiver`, as it does SIGTERM.
    """
    configure_libp2p_logging()
    _disable_tcp_port_sharing()
    _make_frame_writes_whole()
    _batch_window_updates()
    listen_addrs = [_parse_listen_address(address) for address in listen or []]
    libp2p_host = _build_libp2p_host(key_pair_from_seed(seed), max_connections)
    host = Host(libp2p_host, release_inbound_slots=release_inbound_slots)

    try:
        async with libp2p_host.run(listen_addrs):
            try:
                # Swarm.listen logs a failed listen at DEBUG and carries on, so check each address.
                for address in listen_addrs:
                    if str(address) not in host.swarm.listeners:
                        raise UserError(
                            f"cannot listen on {address}",
                            hint="the port may be in use, or the IP address may not belong to this machine",
                        )
                logger.info(
                    "libp2p host %s started, listening on %s",
                    host.peer_id,
                    ", ".join(str(address) for address in host.listen_addrs) or "no address",
                )
                yield host
            finally:
                with trio.move_on_after(_SHUTDOWN_TIMEOUT) as scope:
                    scope.shield = True  # runs even when the caller is cancelled
                    await host._shutdown()
                if scope.cancelled_caught:
                    logger.warning("libp2p host %s: stopping took over %g s", host.peer_id, _SHUTDOWN_TIMEOUT)
    except BaseExceptionGroup as group:
        # The block runs inside py-libp2p's nurseries, which wrap its exception in up to four
        # nested groups. Re-raise a lone exception as it was, so `except PeerError` works for callers.
        leaf = _single_leaf(group)
        if leaf is None:
            raise
        raise leaf from None
    finally:
        logger.info("libp2p host %s stopped", host.peer_id)
