"""Tests for the libp2p host (p2pvc.net.host) and stream framing (p2pvc.net.framing).

All traffic stays on 127.0.0.1. Every wait has a deadline, and every
subprocess (the scripts in tests/net_support/) is killed by pid in a
`finally` clause.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import libp2p.network.connection.swarm_connection as swarm_connection_module
import pytest
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmDialAllFailedError
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP
from multiaddr import Multiaddr

from p2pvc.errors import PeerError, UserError
from p2pvc.identity.keys import Identity
from p2pvc.net.framing import (
    HEADER,
    MAX_FRAME,
    FrameReadError,
    FrameTimeoutError,
    FrameTooLargeError,
    FrameTruncatedError,
    FrameWriteError,
    read_frame,
    write_frame,
)
from p2pvc.net.host import (
    STOP_TIMEOUT,
    ConnectError,
    Host,
    _RepeatLimiter,
    key_pair_from_seed,
    open_host,
    peer_id_of,
)

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
ECHO = "/p2pvc-test/echo/1"
IO_TIMEOUT = 5.0
VANISHING_PEER = Path(__file__).parent / "net_support" / "vanishing_peer.py"
SERVING_NODE = Path(__file__).parent / "net_support" / "serving_node.py"


def seed(n: int) -> bytes:
    return bytes([n]) * 32


async def echo_frames(stream: INetStream) -> None:
    while (frame := await read_frame(stream, IO_TIMEOUT)) is not None:
        await write_frame(stream, frame, IO_TIMEOUT)


async def echo_once(client: Host, server: Host, payload: bytes) -> bytes | None:
    stream = await client.open_stream(server.peer_id, ECHO)
    await write_frame(stream, payload, IO_TIMEOUT)
    reply = await read_frame(stream, IO_TIMEOUT)
    await stream.close()
    return reply


# --- framing over an in-memory stream ---


class MemoryStream:
    """A FrameStream over a fixed byte string that returns at most `chunk` bytes per read."""

    def __init__(self, data: bytes = b"", chunk: int = 1, fail_writes: bool = False) -> None:
        self.data = data
        self.chunk = chunk
        self.fail_writes = fail_writes
        self.written = bytearray()
        self.reset_called = False
        self.hang_reads = False

    async def read(self, n: int | None = None) -> bytes:
        if self.hang_reads:
            await trio.sleep_forever()
        size = min(self.chunk, len(self.data) if n is None else n)
        piece, self.data = self.data[:size], self.data[size:]
        await trio.lowlevel.checkpoint()
        return piece

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail_writes:
            raise ConnectionResetError("connection reset by peer")
        self.written += data

    async def reset(self) -> None:
        self.reset_called = True

    async def close(self) -> None:
        pass


async def test_read_frame_handles_short_reads() -> None:
    payloads = [b"", b"x", bytes(range(256)) * 40]
    data = b"".join(HEADER.pack(len(p)) + p for p in payloads)
    stream = MemoryStream(data, chunk=7)

    received = [await read_frame(stream, IO_TIMEOUT) for _ in payloads]

    assert received == payloads
    assert await read_frame(stream, IO_TIMEOUT) is None
    assert not stream.reset_called


async def test_read_frame_rejects_oversize() -> None:
    stream = MemoryStream(HEADER.pack(MAX_FRAME + 1) + b"abc", chunk=1000)

    with pytest.raises(FrameTooLargeError, match=f"{MAX_FRAME + 1} bytes"):
        await read_frame(stream, IO_TIMEOUT)

    assert stream.reset_called


async def test_read_frame_truncated_in_payload() -> None:
    stream = MemoryStream(HEADER.pack(100) + bytes(40), chunk=1000)

    with pytest.raises(FrameTruncatedError, match="44 of 104 bytes"):
        await read_frame(stream, IO_TIMEOUT)

    assert stream.reset_called


async def test_read_frame_truncated_in_header() -> None:
    stream = MemoryStream(b"\x00\x00", chunk=1000)

    with pytest.raises(FrameTruncatedError, match="2 of 4 bytes"):
        await read_frame(stream, IO_TIMEOUT)


async def test_read_frame_times_out() -> None:
    stream = MemoryStream()
    stream.hang_reads = True
    started = trio.current_time()

    with pytest.raises(FrameTimeoutError, match="timed out after 0.2 s"):
        await read_frame(stream, 0.2)

    assert trio.current_time() - started < 1.0
    assert stream.reset_called


async def test_write_frame_failure_resets_stream() -> None:
    stream = MemoryStream(fail_writes=True)

    with pytest.raises(FrameWriteError, match="connection reset by peer"):
        await write_frame(stream, b"payload", IO_TIMEOUT)

    assert stream.reset_called


async def test_write_frame_rejects_oversize_payload() -> None:
    stream = MemoryStream()

    with pytest.raises(ValueError, match="longer than MAX_FRAME"):
        await write_frame(stream, bytes(MAX_FRAME + 1), IO_TIMEOUT)

    assert not stream.reset_called
    assert stream.written == b""


async def test_write_frame_prefixes_length() -> None:
    stream = MemoryStream()

    await write_frame(stream, b"abc", IO_TIMEOUT)

    assert bytes(stream.written) == b"\x00\x00\x00\x03abc"


# --- identity and host set-up ---


def test_peer_id_from_seed_is_stable() -> None:
    identity = Identity.from_seed(seed(7))

    assert peer_id_of(seed(7)) == peer_id_of(seed(7))
    assert peer_id_of(seed(7)) != peer_id_of(seed(8))
    assert key_pair_from_seed(seed(7)).public_key.to_bytes() == identity.public_key
    assert str(peer_id_of(seed(7))).startswith("12D3KooW")


def test_peer_id_rejects_short_seed() -> None:
    with pytest.raises(ValueError, match="32 bytes, got 31"):
        peer_id_of(bytes(31))


async def test_host_listen_addrs_end_with_peer_id() -> None:
    async with open_host(seed(1), LOCAL) as host:
        addrs = host.listen_addrs

    assert host.peer_id == peer_id_of(seed(1))
    assert len(addrs) == 1
    assert str(addrs[0]).startswith("/ip4/127.0.0.1/tcp/")
    assert str(addrs[0]).endswith(f"/p2p/{host.peer_id}")
    assert not str(addrs[0]).startswith("/ip4/127.0.0.1/tcp/0/")


async def test_host_rejects_invalid_listen_address() -> None:
    with pytest.raises(UserError, match="invalid listen address"):
        async with open_host(seed(1), ["/ip4/127.0.0.1/tcp/notaport"]):
            pass


async def test_host_rejects_port_in_use() -> None:
    async with open_host(seed(1), LOCAL) as first:
        port = first.listen_addrs[0].value_for_protocol("tcp")
        with pytest.raises(UserError, match="cannot listen on"):
            async with open_host(seed(2), [f"/ip4/127.0.0.1/tcp/{port}"]):
                pass


async def test_connect_rejects_bad_addresses() -> None:
    async with open_host(seed(1), LOCAL) as host:
        with pytest.raises(UserError, match="invalid peer address"):
            await host.connect("/ip4/127.0.0.1/tcp/4001")
        with pytest.raises(UserError, match="own peer id"):
            await host.connect(host.listen_addrs[0])


async def test_connect_to_closed_port_fails() -> None:
    async with open_host(seed(1), LOCAL) as server:
        address = server.listen_addrs[0]
    async with open_host(seed(2), None) as client:
        started = time.monotonic()
        with pytest.raises(ConnectError, match=f"nothing accepted a connection for peer {server.peer_id}"):
            await client.connect(address, timeout=5.0)

        assert time.monotonic() - started < 5.0


async def test_connect_wrong_peer_id_names_it() -> None:
    async with open_host(seed(1), LOCAL) as server, open_host(seed(2), None) as client:
        other = peer_id_of(seed(3))
        where = str(server.listen_addrs[0]).split("/p2p/")[0]
        with pytest.raises(ConnectError, match=f"the node at {where} is not peer {other}"):
            await client.connect(f"{where}/p2p/{other}", timeout=10.0)


async def test_libp2p_logging_routed_through_application() -> None:
    root_handlers = list(logging.getLogger().handlers)

    async with open_host(seed(1), LOCAL) as server, open_host(seed(2), None) as client:
        server.set_handler(ECHO, echo_frames)
        await client.connect(server.listen_addrs[0])
        await echo_once(client, server, b"ping")
        await client.disconnect(server.peer_id)

    library_logger = logging.getLogger("libp2p")
    assert library_logger.propagate
    assert library_logger.handlers == []
    assert library_logger.level == logging.CRITICAL
    assert logging.getLogger("libp2p.network.auto_connector").level == logging.NOTSET
    assert isinstance(swarm_connection_module.logging, logging.Logger)
    assert logging.getLogger().handlers == root_handlers


# --- traffic between two hosts ---


async def test_frames_between_two_hosts() -> None:
    payloads = [b"", b"hello", bytes(range(256)) * 1000, bytes(MAX_FRAME)]

    async with open_host(seed(1), LOCAL) as server, open_host(seed(2), LOCAL) as client:
        server.set_handler(ECHO, echo_frames)
        peer_id = await client.connect(server.listen_addrs[0])
        stream = await client.open_stream(peer_id, ECHO)
        replies = []
        for payload in payloads:
            await write_frame(stream, payload, IO_TIMEOUT)
            replies.append(await read_frame(stream, IO_TIMEOUT))
        await stream.close()

    assert peer_id == server.peer_id
    assert [len(r or b"") for r in replies] == [len(p) for p in payloads]
    assert replies == payloads


async def test_connect_reuses_connection() -> None:
    async with open_host(seed(1), LOCAL) as server, open_host(seed(2), LOCAL) as client:
        server.set_handler(ECHO, echo_frames)
        await client.connect(server.listen_addrs[0])
        swarm = client.swarm
        first = swarm.get_connections(server.peer_id)
        await client.connect(server.listen_addrs[0])
        await echo_once(client, server, b"one")
        await echo_once(client, server, b"two")
        second = swarm.get_connections(server.peer_id)

    assert len(first) == 1
    assert second == first


async def test_handler_error_keeps_host_serving(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(stream: INetStream) -> None:
        await read_frame(stream, IO_TIMEOUT)
        raise RuntimeError("handler bug")

    async with open_host(seed(1), LOCAL) as server, open_host(seed(2), LOCAL) as client:
        server.set_handler("/p2pvc-test/broken/1", broken)
        server.set_handler(ECHO, echo_frames)
        await client.connect(server.listen_addrs[0])
        for _ in range(3):
            stream = await client.open_stream(server.peer_id, "/p2pvc-test/broken/1")
            await write_frame(stream, b"request", IO_TIMEOUT)
            with pytest.raises(FrameReadError):
                await read_frame(stream, IO_TIMEOUT)
        reply = await echo_once(client, server, b"still serving")

    assert reply == b"still serving"
    failures = [r for r in caplog.records if r.name == "p2pvc.net" and "handler bug" in r.getMessage()]
    assert len(failures) == 3
    assert str(client.peer_id) in failures[0].getMessage()
    assert failures[0].levelno == logging.ERROR


async def test_unwrapped_handler_error_keeps_host_serving() -> None:
    # A handler registered on the py-libp2p host directly, as libp2p's own
    # identify and ping handlers are, is caught by the guard on the swarm's dispatcher.
    async def broken(stream: INetStream) -> None:
        raise RuntimeError("unwrapped handler bug")

    async with open_host(seed(1), LOCAL) as server, open_host(seed(2), LOCAL) as client:
        server.libp2p_host.set_stream_handler(TProtocol("/p2pvc-test/unwrapped/1"), broken)
        server.set_handler(ECHO, echo_frames)
        await client.connect(server.listen_addrs[0])
        stream = await client.open_stream(server.peer_id, "/p2pvc-test/unwrapped/1")
        with pytest.raises(FrameReadError):
            await read_frame(stream, IO_TIMEOUT)
        reply = await echo_once(client, server, b"still serving")

    assert reply == b"still serving"


def test_handler_failure_log_is_rate_limited() -> None:
    limiter = _RepeatLimiter(limit=2, window=0.05)

    first_window = [limiter.allow() for _ in range(5)]
    time.sleep(0.06)
    second_window = limiter.allow()

    assert first_window == [True, True, False, False, False]
    assert limiter.suppressed == 3
    assert second_window


async def test_read_timeout_resets_stream_for_peer() -> None:
    outcome: list[BaseException] = []

    async def silent(stream: INetStream) -> None:
        try:
            await read_frame(stream, 0.3)
        except FrameTimeoutError as exc:
            outcome.append(exc)
            raise

    async with open_host(seed(1), LOCAL) as server, open_host(seed(2), LOCAL) as client:
        server.set_handler("/p2pvc-test/silent/1", silent)
        await client.connect(server.listen_addrs[0])
        stream = await client.open_stream(server.peer_id, "/p2pvc-test/silent/1")
        started = time.monotonic()
        # The client waits for a reply that never comes; the server's timeout resets the stream.
        with pytest.raises(FrameReadError):
            await read_frame(stream, IO_TIMEOUT)
        elapsed = time.monotonic() - started

    assert len(outcome) == 1
    assert elapsed < 2.0


async def test_slow_reader_fails_write_within_timeout() -> None:
    start_reading = trio.Event()
    reader_done = trio.Event()
    reader_outcome: list[BaseException | None] = []

    async def stalled(stream: INetStream) -> None:
        await start_reading.wait()
        try:
            while await read_frame(stream, IO_TIMEOUT) is not None:
                pass
            reader_outcome.append(None)
        except PeerError as exc:
            reader_outcome.append(exc)
        finally:
            reader_done.set()

    async with open_host(seed(1), LOCAL) as server, open_host(seed(2), LOCAL) as client:
        server.set_handler("/p2pvc-test/stalled/1", stalled)
        await client.connect(server.listen_addrs[0])
        stream = await client.open_stream(server.peer_id, "/p2pvc-test/stalled/1")
        started = time.monotonic()
        sent = 0
        with pytest.raises(FrameTimeoutError):
            # Bounded: Yamux's receive window (at most 16 MiB) fills long before 1000 frames.
            for _ in range(1000):
                await write_frame(stream, bytes(64 * 1024), 1.0)
                sent += 64 * 1024
        write_elapsed = time.monotonic() - started

        start_reading.set()
        with trio.fail_after(IO_TIMEOUT):
            await reader_done.wait()

    assert write_elapsed < 3.0
    assert 0 < sent <= 16 * 1024 * 1024
    # The reset reaches the reader, so its read fails at once instead of hanging.
    assert len(reader_outcome) == 1
    assert isinstance(reader_outcome[0], FrameReadError)


async def test_vanished_peer_process_does_not_stall_host() -> None:
    handler_started = trio.Event()
    handler_done = trio.Event()
    outcome: list[BaseException | None] = []

    async def receive(stream: INetStream) -> None:
        handler_started.set()
        try:
            outcome.append(await read_frame(stream, 30.0))  # type: ignore[arg-type]
        except PeerError as exc:
            outcome.append(exc)
        finally:
            handler_done.set()

    async with open_host(seed(1), LOCAL) as server:
        server.set_handler("/p2pvc-test/receive/1", receive)
        process = await trio.lowlevel.open_process(
            [sys.executable, str(VANISHING_PEER), str(server.listen_addrs[0]), "/p2pvc-test/receive/1"],
            stdout=subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            with trio.fail_after(20):
                line = await process.stdout.receive_some(100)
                await handler_started.wait()
            assert line.startswith(b"sent")
            await trio.sleep(0.2)  # lets the partial frame arrive
            process.kill()
            with trio.fail_after(5):
                await process.wait()
                await handler_done.wait()
        finally:
            process.kill()
            with trio.move_on_after(5):
                await process.wait()

        # The host still accepts new peers and serves them.
        server.set_handler(ECHO, echo_frames)
        async with open_host(seed(2), None) as client:
            await client.connect(server.listen_addrs[0])
            reply = await echo_once(client, server, b"after the crash")

    assert len(outcome) == 1
    assert isinstance(outcome[0], (FrameReadError, FrameTruncatedError))
    assert reply == b"after the crash"


# --- security ---


def plaintext_only_host(host_seed: bytes) -> IHost:
    key_pair = key_pair_from_seed(host_seed)
    return new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(key_pair)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        transports=[TCP()],
    )


async def test_plaintext_only_peer_cannot_connect_in() -> None:
    intruder = plaintext_only_host(seed(9))

    async with open_host(seed(1), LOCAL) as server, intruder.run([]):
        peer_info = PeerInfo(server.peer_id, [server.listen_addrs[0].decapsulate(Multiaddr(f"/p2p/{server.peer_id}"))])
        with trio.fail_after(10):
            with pytest.raises(SwarmDialAllFailedError):
                await intruder.connect(peer_info)
        connected = server.connected_peers()

    assert connected == []


async def test_plaintext_only_peer_cannot_be_dialed() -> None:
    target = plaintext_only_host(seed(9))

    async with target.run([Multiaddr(LOCAL[0])]), open_host(seed(1), None) as client:
        address = target.get_addrs()[0]
        with pytest.raises(ConnectError, match="failed to negotiate the secure protocol"):
            await client.connect(address, timeout=10.0)
        connected = client.connected_peers()

    assert connected == []


# --- connection management ---


async def test_inbound_slots_released_after_disconnect() -> None:
    # With max_connections=10 the swarm has 10 inbound slots; 25 sequential
    # connections fail from the 11th on when slots are not given back.
    cycles = 25

    async with open_host(seed(1), LOCAL, max_connections=10) as server, open_host(seed(2), None) as client:
        server.set_handler(ECHO, echo_frames)
        limiter = server.swarm._inbound_limiter
        replies = []
        for i in range(cycles):
            await client.connect(server.listen_addrs[0], timeout=IO_TIMEOUT)
            replies.append(await echo_once(client, server, b"cycle %d" % i))
            await client.disconnect(server.peer_id)
        with trio.move_on_after(2.0):
            while limiter.borrowed_tokens:
                await trio.sleep(0.05)
        borrowed = limiter.borrowed_tokens

    assert replies == [b"cycle %d" % i for i in range(cycles)]
    assert borrowed == 0


async def test_libp2p_still_leaks_inbound_slots() -> None:
    # Documents the py-libp2p 0.8.1 fault that open_host works around. If this
    # test fails, py-libp2p gives slots back itself and the workaround can go.
    async with (
        open_host(seed(1), LOCAL, max_connections=3, release_inbound_slots=False) as server,
        open_host(seed(2), None) as client,
    ):
        for _ in range(3):
            await client.connect(server.listen_addrs[0], timeout=IO_TIMEOUT)
            await client.disconnect(server.peer_id)
        with pytest.raises(ConnectError):
            await client.connect(server.listen_addrs[0], timeout=IO_TIMEOUT)


async def test_disconnected_peer_not_redialed() -> None:
    async with open_host(seed(1), LOCAL) as server, open_host(seed(2), LOCAL) as client:
        await client.connect(server.listen_addrs[0])
        await client.disconnect(server.peer_id)
        auto_connector = client.swarm.auto_connector
        # Forget the 60 s back-off after a disconnect and run the auto-connector's
        # check now, as its timer would 70-90 s after the disconnect.
        auto_connector._recent_disconnects.clear()
        auto_connector._last_connect_attempt.clear()
        await auto_connector.maybe_connect()
        await trio.sleep(0.3)

        assert not client.is_connected(server.peer_id)
        assert not server.is_connected(client.peer_id)
        assert client.libp2p_host.get_peerstore().addrs(server.peer_id)


async def test_stop_within_limit_with_open_streams() -> None:
    clients_done = 0
    streams_held = 0

    async def hold(stream: INetStream) -> None:
        nonlocal streams_held
        await read_frame(stream, IO_TIMEOUT)
        streams_held += 1
        await read_frame(stream, 30.0)

    async def client_stream(server_address: Multiaddr, n: int) -> None:
        nonlocal clients_done
        async with open_host(seed(10 + n), None) as client:
            peer_id = await client.connect(server_address)
            stream = await client.open_stream(peer_id, "/p2pvc-test/hold/1")
            await write_frame(stream, b"partial", IO_TIMEOUT)
            with pytest.raises(PeerError):
                await read_frame(stream, 30.0)
        clients_done += 1

    async with trio.open_nursery() as nursery:
        server_context = open_host(seed(1), LOCAL)
        server = await server_context.__aenter__()
        server.set_handler("/p2pvc-test/hold/1", hold)
        for n in range(5):
            nursery.start_soon(client_stream, server.listen_addrs[0], n)
        with trio.fail_after(IO_TIMEOUT):
            while streams_held < 5:
                await trio.sleep(0.05)
        port = int(server.listen_addrs[0].value_for_protocol("tcp"))
        started = time.monotonic()
        await server_context.__aexit__(None, None, None)
        stop_elapsed = time.monotonic() - started
        with trio.fail_after(IO_TIMEOUT):
            while clients_done < 5:
                await trio.sleep(0.05)

    assert stop_elapsed < STOP_TIMEOUT
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_node_process_stops_on_signal(signal_number: signal.Signals) -> None:
    process = await trio.lowlevel.open_process([sys.executable, str(SERVING_NODE)], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        output = b""
        with trio.fail_after(20):
            while b"\n" not in output:
                output += await process.stdout.receive_some(1000)
        assert output.startswith(b"listening /ip4/127.0.0.1/tcp/")
        port = int(output.split(b"/")[4])

        async with open_host(seed(2), None) as client:
            await client.connect(output.split()[1].decode())
            process.send_signal(signal_number)
            started = time.monotonic()
            with trio.fail_after(STOP_TIMEOUT + 3):
                while not output.endswith(b"stopped\n"):
                    chunk = await process.stdout.receive_some(1000)
                    if not chunk:
                        break
                    output += chunk
                await process.wait()
            stop_elapsed = time.monotonic() - started
    finally:
        process.kill()
        with trio.move_on_after(5):
            await process.wait()

    assert output.endswith(b"stopped\n")
    assert process.returncode == 0
    assert stop_elapsed < STOP_TIMEOUT
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_stop_when_cancelled() -> None:
    started = time.monotonic()

    with trio.move_on_after(0.5) as scope:
        async with open_host(seed(1), LOCAL) as server, open_host(seed(2), None) as client:
            await client.connect(server.listen_addrs[0])
            port = int(server.listen_addrs[0].value_for_protocol("tcp"))
            await trio.sleep_forever()

    assert scope.cancelled_caught
    assert time.monotonic() - started < 0.5 + STOP_TIMEOUT
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)
