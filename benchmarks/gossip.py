#!/usr/bin/env python3
"""Benchmark how fast a new ref update reaches 5 p2pvc nodes, against py-libp2p's GossipSub.

What is measured, on 127.0.0.1 in one run:

1. p2pvc's direct announcement. Five repositories, each with its own
   signing key and all of them members, run `p2pvc serve` with the other four
   as known peers (`p2pvc peer add`), so each node connects to the other
   four when it starts. Then, 20 times, one node (taking turns) makes a ref
   update through the CLI in its folder while it serves: `p2pvc branch NAME`
   (or, with --update commit, a commit of a small file on node 0). The
   script polls every node's `.p2pvc/index.sqlite` read-only (table
   ref_updates) every --poll-ms milliseconds and records when the new
   record shows up at the origin and when all 5 nodes hold it. The latency
   is the time between those two, so it does not count the CLI's start-up.
   Target: median under 0.5 s.
2. GossipSub as the alternative. Five py-libp2p hosts, one process each,
   with the same transport as p2pvc (TCP, Noise, Yamux), run Pubsub with a
   GossipSub router (D=6, D_low=4, D_high=12, 1 s heartbeat, py-libp2p's
   other defaults) and connect to each other. Once every mesh contains the
   other four, host 0 publishes 20 small messages. Each receiver records the
   delay from publish to delivery (CLOCK_MONOTONIC is shared by all
   processes) and which messages arrived. Two runs: messages 1 s apart, as
   ref updates come, and all 20 at once.

Why: p2pvc sends new signed records to each connected peer directly and
pulls what it lacks from the announcer, instead of using GossipSub. The
comparison shows what that choice costs in latency and what it buys in
reliability. Traps of py-libp2p's GossipSub (0.8.1, read in
libp2p/pubsub/): the Pubsub object and the router are services that must
run (`background_trio_service`). An RPC over 1 MiB is dropped
(`DefaultMaxMessageSize` in rpc_queue.py). With spam protection on, which
is the default, a router accepts at most `max_messages_per_topic_per_second`
(10) messages per forwarding peer and topic, and that includes the
publisher's own messages. A peer that subscribes later gets only the
messages still in the router's message-cache window (3 heartbeats by
default).

The machine may be shared, so each series starts only once the 1-minute
load average is below --max-load (waiting at most --load-wait seconds),
and every figure carries the load average at its start. Every process the
script starts is stopped by pid (SIGTERM, then SIGKILL), every wait has a
deadline, and the work folder is deleted at the end unless --keep is given.

Run `python benchmarks/gossip.py --help` for the options. Progress goes to
stderr, Markdown tables to stdout, and raw figures to the --json file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import selectors
import shutil
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCHMARKS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS_DIR))

from sync import (  # noqa: E402  (benchmarks/sync.py: process and load helpers shared by both benchmarks)
    BenchmarkError,
    LoadReading,
    machine_facts,
    run_command,
    serving,
    snapshot_p2pvc,
    stop_process,
    wait_for_quiet_machine,
)

log = logging.getLogger("bench.gossip")

NODE_COUNT = 5
LATENCY_TARGET_S = 0.5
MESH_TIMEOUT_S = 60.0
"""Seconds for the nodes to connect to each other before the series starts."""
SETTLE_S = 1.0
"""Pause after an update reached every node, so its forwarded duplicates are handled before the next one."""

TOPIC = "p2pvc-bench"
MESSAGE_BYTES = 256
"""GossipSub payload size, about that of one signed p2pvc ref update record."""
GOSSIPSUB_GRACE_S = 5.0
"""Seconds the GossipSub hosts keep running after the last publish, for late deliveries."""
GOSSIPSUB_READY_TIMEOUT_S = 60.0
GOSSIPSUB_CONNECT_TIMEOUT_S = 30.0


# p2pvc's direct announcement ---------------------------------------------------------------------------


@dataclass
class P2pvcNode:
    """One p2pvc repository folder, its signing key folder and its serve port."""

    index: int
    folder: Path
    env: dict[str, str]
    port: int
    peer_id: str = ""
    public_key: str = ""

    @property
    def address(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.port}/p2p/{self.peer_id}"

    @property
    def database(self) -> Path:
        return self.folder / ".p2pvc" / "index.sqlite"


@dataclass
class UpdateMeasurement:
    """One ref update: origin node, load average, latency until all nodes hold it, and CLI time."""

    origin: int
    load: float
    cli_seconds: float
    latency_s: float | None
    """Seconds from the record appearing at the origin to all nodes holding it; None if some never did."""
    arrival_s: list[float | None]
    """Per node, seconds from the record appearing at the origin to that node holding it."""
    poller_cpu_s: float


def free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def open_read_only(database: Path) -> sqlite3.Connection:
    """Open a repository database read-only, so polling never takes a write lock."""
    return sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5.0, isolation_level=None)


def record_ids(connection: sqlite3.Connection) -> set[bytes]:
    return {bytes(row[0]) for row in connection.execute("SELECT id FROM ref_updates")}


def setup_p2pvc_nodes(work: Path, p2pvc: Path, base_env: dict[str, str], timeout: float) -> list[P2pvcNode]:
    """Create 5 replicas of one repository in which every node is a member and has the other four as peers.

    Node 0 creates the repository and adds the others as members; the others
    clone it while node 0 serves. Each node gets its own P2PVC_HOME, so its
    own signing key and peer id.
    """
    ports = free_ports(NODE_COUNT)
    nodes = [
        P2pvcNode(i, work / f"node-{i}", {**base_env, "P2PVC_HOME": str(work / f"home-{i}")}, ports[i])
        for i in range(NODE_COUNT)
    ]
    for node in nodes:
        identity = json.loads(run_command([str(p2pvc), "id", "--json"], work, node.env, timeout).stdout)
        node.peer_id, node.public_key = identity["peer_id"], identity["public_key"]

    first = nodes[0]
    first.folder.mkdir()
    (first.folder / "README.md").write_text("p2pvc gossip benchmark\n")
    run_command([str(p2pvc), "init"], first.folder, first.env, timeout)
    run_command([str(p2pvc), "commit", "-m", "start"], first.folder, first.env, timeout)
    for node in nodes[1:]:
        run_command([str(p2pvc), "member", "add", node.public_key], first.folder, first.env, timeout)
    with serving(p2pvc, first.folder, first.env, work / "serve-setup.log") as server:
        for node in nodes[1:]:
            run_command([str(p2pvc), "clone", server.address, str(node.folder)], work, node.env, timeout)
    for node in nodes:
        for other in nodes:
            if other is not node:
                run_command([str(p2pvc), "peer", "add", other.address], node.folder, node.env, timeout)
    return nodes


def wait_for_connections(nodes: list[P2pvcNode], connections: list[sqlite3.Connection]) -> float:
    """Wait until every node has exchanged with all its known peers at least once; return the seconds taken.

    Raises BenchmarkError after MESH_TIMEOUT_S.
    """
    started = time.monotonic()
    while time.monotonic() - started < MESH_TIMEOUT_S:
        reached = [
            connection.execute("SELECT count(*) FROM peers WHERE last_seen_ms IS NOT NULL").fetchone()[0]
            for connection in connections
        ]
        if all(count >= NODE_COUNT - 1 for count in reached):
            return time.monotonic() - started
        time.sleep(0.1)
    raise BenchmarkError(f"the nodes did not all reach each other within {MESH_TIMEOUT_S:g} s (peers reached: {reached})")


def make_update(node: P2pvcNode, p2pvc: Path, kind: str, number: int) -> list[str]:
    """Return the command that makes update `number` on `node`, after preparing its working tree."""
    if kind == "branch":
        return [str(p2pvc), "branch", f"bench-{number:03d}"]
    (node.folder / "counter.txt").write_text(f"update {number}\n")
    return [str(p2pvc), "commit", "-m", f"update {number}"]


def measure_update(
    nodes: list[P2pvcNode],
    connections: list[sqlite3.Connection],
    p2pvc: Path,
    origin: int,
    kind: str,
    number: int,
    poll_s: float,
    timeout: float,
) -> UpdateMeasurement:
    """Make one ref update on node `origin` and poll until every node has stored it or `timeout` passes."""
    origin_node = nodes[origin]
    before = record_ids(connections[origin])
    load = os.getloadavg()[0]
    command = make_update(origin_node, p2pvc, kind, number)

    cli_started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=origin_node.folder, env=origin_node.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    cpu_started = time.process_time()
    try:
        record: bytes | None = None
        seen_at: list[float | None] = [None] * len(nodes)
        deadline = cli_started + timeout
        while time.monotonic() < deadline:
            now = time.monotonic()
            if record is None:
                new = record_ids(connections[origin]) - before
                if len(new) > 1:
                    raise BenchmarkError(f"update {number} made {len(new)} ref update records instead of 1")
                if new:
                    record = new.pop()
                    seen_at[origin] = now
            if record is not None:
                for index, connection in enumerate(connections):
                    if seen_at[index] is None and connection.execute(
                        "SELECT 1 FROM ref_updates WHERE id = ?", (record,)
                    ).fetchone():
                        seen_at[index] = now
                if all(seen is not None for seen in seen_at):
                    break
            time.sleep(poll_s)
        poller_cpu = time.process_time() - cpu_started
        _, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        cli_seconds = time.monotonic() - cli_started
    finally:
        stop_process(process, f"p2pvc update {number} on node {origin}")

    if process.returncode != 0:
        raise BenchmarkError(f"{' '.join(command)} on node {origin} failed: {stderr.decode(errors='replace').strip()}")
    if record is None:
        raise BenchmarkError(f"update {number} on node {origin} did not appear in its database within {timeout:g} s")

    origin_seen = seen_at[origin]
    assert origin_seen is not None
    arrivals = [None if seen is None else seen - origin_seen for seen in seen_at]
    complete = all(arrival is not None for arrival in arrivals)
    latency = max(a for a in arrivals if a is not None) if complete else None
    return UpdateMeasurement(origin, load, cli_seconds, latency, arrivals, poller_cpu)


def run_p2pvc_series(
    work: Path, p2pvc: Path, base_env: dict[str, str], arguments: argparse.Namespace
) -> tuple[list[UpdateMeasurement], LoadReading, dict[str, Any]]:
    """Set up 5 serving nodes, make --updates ref updates and measure each one's spread."""
    nodes = setup_p2pvc_nodes(work, p2pvc, base_env, arguments.timeout)
    notes: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                serving(p2pvc, node.folder, node.env, work / f"serve-{node.index}.log", port=node.port)
            )
            for node in nodes
        ]
        connections = [stack.enter_context(contextlib.closing(open_read_only(node.database))) for node in nodes]
        notes["connect_seconds"] = wait_for_connections(nodes, connections)
        log.info("p2pvc: all %d nodes reached each other in %.1f s", NODE_COUNT, notes["connect_seconds"])

        # One update that is not counted, so first-use costs (imports, caches) stay out of the series.
        origins = [0] if arguments.update == "commit" else list(range(NODE_COUNT))
        measure_update(nodes, connections, p2pvc, 0, arguments.update, 0, arguments.poll_ms / 1000, arguments.update_timeout)
        time.sleep(SETTLE_S)

        load = wait_for_quiet_machine(arguments.max_load, arguments.load_wait)
        log.info("p2pvc: %d %s updates (load %.2f)", arguments.updates, arguments.update, load.load)
        measurements = []
        for number in range(1, arguments.updates + 1):
            origin = origins[(number - 1) % len(origins)]
            measurement = measure_update(
                nodes, connections, p2pvc, origin, arguments.update, number, arguments.poll_ms / 1000, arguments.update_timeout
            )
            measurements.append(measurement)
            latency = "not everywhere" if measurement.latency_s is None else f"{measurement.latency_s * 1000:.0f} ms"
            log.info("p2pvc: update %d from node %d: %s (load %.2f)", number, origin, latency, measurement.load)
            time.sleep(SETTLE_S)
        notes["server_cpu_seconds"] = [server.cpu_seconds for server in servers]
    notes["log_warnings"] = {
        f"node-{node.index}": [
            line
            for line in (work / f"serve-{node.index}.log").read_text(errors="replace").splitlines()
            if " WARNING " in line or " ERROR " in line
        ][:20]
        for node in nodes
    }
    return measurements, load, notes


# GossipSub ---------------------------------------------------------------------------------------------


@dataclass
class GossipsubNodeResult:
    """Results of one GossipSub host process, printed when it ends."""

    index: int
    mesh_peers: int
    ready_seconds: float
    published: int = 0
    publish_errors: list[str] = field(default_factory=list)
    received: list[tuple[int, float]] = field(default_factory=list)
    """(message number, seconds from publish to delivery) for each message from host 0."""
    load_at_publish: float | None = None
    """1-minute load average when host 0 started publishing; set by the coordinator."""


def build_gossipsub_host(seed: bytes) -> Any:
    """Create a py-libp2p host with TCP, Noise and Yamux only, as p2pvc.net.host offers."""
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair as create_ed25519_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux
    from libp2p.transport.tcp.tcp import TCP

    key_pair = create_ed25519_key_pair(seed)
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        transports=[TCP()],
    )


async def run_gossipsub_node(config: dict[str, Any]) -> GossipsubNodeResult:
    """Run one GossipSub host: connect, wait for the mesh, then publish (host 0) or receive.

    Reads "go" on stdin once the coordinator has seen every host ready, and
    runs until `config["run_seconds"]` after that.
    """
    import multiaddr
    import trio
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.pubsub import gossipsub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.tools.anyio_service import background_trio_service

    # `import libp2p` sets its logger to WARNING, and a dial to a host that does not listen
    # yet logs an ERROR that the retry below makes harmless.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    index: int = config["index"]
    host = build_gossipsub_host(bytes.fromhex(config["seed"]))
    # The newest protocol first: py-libp2p 0.8.1 negotiates the first one both sides support.
    protocols = [
        gossipsub.PROTOCOL_ID_V20,
        gossipsub.PROTOCOL_ID_V14,
        gossipsub.PROTOCOL_ID_V13,
        gossipsub.PROTOCOL_ID_V12,
        gossipsub.PROTOCOL_ID_V11,
        gossipsub.PROTOCOL_ID,
    ]
    # D, D_low, D_high and the 1 s heartbeat are the GossipSub specification's defaults.
    # py-libp2p's own heartbeat default is 120 s, which would leave an incomplete mesh for minutes.
    router = gossipsub.GossipSub(protocols=protocols, degree=6, degree_low=4, degree_high=12, heartbeat_interval=1)
    pubsub = Pubsub(host, router)
    started = time.monotonic()
    result = GossipsubNodeResult(index, 0, 0.0)

    async with host.run([multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{config['ports'][index]}")]):
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            subscription = await pubsub.subscribe(TOPIC)
            for address in config["addresses"][index + 1 :]:
                # Each pair connects once: the host with the lower index dials. The other
                # process may not listen yet, so failed dials are retried until the deadline.
                peer_info = info_from_p2p_addr(multiaddr.Multiaddr(address))
                with trio.fail_after(GOSSIPSUB_CONNECT_TIMEOUT_S):
                    while True:
                        try:
                            await host.connect(peer_info)
                            break
                        except Exception:  # py-libp2p raises several unrelated classes for a failed dial
                            await trio.sleep(0.2)
            with trio.move_on_after(GOSSIPSUB_READY_TIMEOUT_S):
                while len(router.mesh.get(TOPIC, ())) < NODE_COUNT - 1:
                    await trio.sleep(0.05)
            result.mesh_peers = len(router.mesh.get(TOPIC, ()))
            result.ready_seconds = time.monotonic() - started
            print(json.dumps({"ready": index, "mesh_peers": result.mesh_peers}), flush=True)

            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if line.strip() != "go":
                raise RuntimeError(f"expected 'go' on stdin, got {line!r}")

            async def receive() -> None:
                while True:
                    message = await subscription.get()
                    number, sent_at = struct.unpack_from(">Id", message.data)
                    result.received.append((number, time.monotonic() - sent_at))

            async def publish() -> None:
                padding = bytes(MESSAGE_BYTES - struct.calcsize(">Id"))
                for number in range(config["messages"]):
                    try:
                        await pubsub.publish(TOPIC, struct.pack(">Id", number, time.monotonic()) + padding)
                        result.published += 1
                    except Exception as exc:  # reported with the results, the series goes on
                        result.publish_errors.append(f"message {number}: {exc!r}")
                    await trio.sleep(config["interval"])

            with trio.move_on_after(config["run_seconds"]):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receive)
                    if index == 0:
                        nursery.start_soon(publish)
    return result


def run_gossipsub_role(arguments: argparse.Namespace) -> None:
    """Entry point of one GossipSub host process: config on stdin, results as a JSON line on stdout."""
    import trio

    config = json.loads(sys.stdin.readline())
    result = trio.run(run_gossipsub_node, config)
    print(json.dumps(asdict(result)), flush=True)


def read_lines(processes: list[subprocess.Popen[str]], deadline: float) -> list[str]:
    """Read one line from each process's stdout, all by `deadline` (monotonic seconds)."""
    lines: dict[int, str] = {}
    with selectors.DefaultSelector() as selector:
        for index, process in enumerate(processes):
            assert process.stdout is not None
            selector.register(process.stdout, selectors.EVENT_READ, index)
        while len(lines) < len(processes):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [i for i in range(len(processes)) if i not in lines]
                raise BenchmarkError(f"GossipSub hosts {missing} sent no line in time")
            for key, _ in selector.select(remaining):
                index = key.data
                line = key.fileobj.readline()  # type: ignore[union-attr]
                if not line:
                    raise BenchmarkError(f"GossipSub host {index} exited early with exit status {processes[index].wait(5)}")
                lines[index] = line
                selector.unregister(key.fileobj)
    return [lines[i] for i in range(len(processes))]


def run_gossipsub_series(
    python: Path, env: dict[str, str], messages: int, interval: float, arguments: argparse.Namespace
) -> tuple[list[GossipsubNodeResult], LoadReading]:
    """Start 5 GossipSub host processes, publish `messages` from host 0 `interval` s apart, and collect."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    seeds = [os.urandom(32) for _ in range(NODE_COUNT)]
    ports = free_ports(NODE_COUNT)
    addresses = [
        f"/ip4/127.0.0.1/tcp/{port}/p2p/{ID.from_pubkey(create_new_key_pair(seed).public_key)}"
        for port, seed in zip(ports, seeds)
    ]
    run_seconds = messages * interval + GOSSIPSUB_GRACE_S
    # Wait before the hosts start: five idle hosts with a 1 s heartbeat add load of their own.
    load = wait_for_quiet_machine(arguments.max_load, arguments.load_wait)
    processes: list[subprocess.Popen[str]] = []
    try:
        for index, seed in enumerate(seeds):
            process = subprocess.Popen(
                [str(python), str(Path(__file__).resolve()), "--role", "gossipsub-node"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            processes.append(process)
            config = {
                "index": index,
                "seed": seed.hex(),
                "ports": ports,
                "addresses": addresses,
                "messages": messages,
                "interval": interval,
                "run_seconds": run_seconds,
            }
            assert process.stdin is not None
            process.stdin.write(json.dumps(config) + "\n")
            process.stdin.flush()
        ready = [json.loads(line) for line in read_lines(processes, time.monotonic() + GOSSIPSUB_READY_TIMEOUT_S + 30)]
        log.info("GossipSub: all hosts ready, mesh sizes %s", [r["mesh_peers"] for r in ready])
        load_at_publish = os.getloadavg()[0]
        log.info("GossipSub: %d messages %g s apart (load %.2f)", messages, interval, load_at_publish)
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        lines = read_lines(processes, time.monotonic() + run_seconds + 30)
        results = [GossipsubNodeResult(**json.loads(line)) for line in lines]
        for process in processes:
            process.wait(timeout=30)
        results[0].load_at_publish = load_at_publish
    finally:
        for index, process in enumerate(processes):
            with contextlib.suppress(OSError):
                if process.stdin is not None:
                    process.stdin.close()
            stop_process(process, f"GossipSub host {index}")
    return results, load


# Report ---------------------------------------------------------------------------------------------------


def summarize_p2pvc(measurements: list[UpdateMeasurement]) -> dict[str, Any]:
    latencies = [m.latency_s for m in measurements if m.latency_s is not None]
    return {
        "updates": len(measurements),
        "reached_all": len(latencies),
        "deliveries": sum(1 for m in measurements for a in m.arrival_s if a is not None) - len(measurements),
        "median_s": statistics.median(latencies) if latencies else None,
        "max_s": max(latencies) if latencies else None,
        "min_s": min(latencies) if latencies else None,
        "cli_median_s": statistics.median(m.cli_seconds for m in measurements),
        "poller_cpu_s_per_update": statistics.median(m.poller_cpu_s for m in measurements),
        "load_min": min(m.load for m in measurements),
        "load_max": max(m.load for m in measurements),
    }


def summarize_gossipsub(results: list[GossipsubNodeResult], messages: int) -> dict[str, Any]:
    """Per message, the receivers that got it and the delay to the last of them."""
    receivers = [r for r in results if r.index != 0]
    per_message: dict[int, list[float]] = {number: [] for number in range(messages)}
    for receiver in receivers:
        for number, delay in receiver.received:
            per_message.setdefault(number, []).append(delay)
    complete = [max(delays) for delays in per_message.values() if len(delays) == len(receivers)]
    return {
        "messages": messages,
        "published": results[0].published,
        "publish_errors": results[0].publish_errors,
        "reached_all": len(complete),
        "deliveries": sum(len(delays) for delays in per_message.values()),
        "median_s": statistics.median(complete) if complete else None,
        "max_s": max(complete) if complete else None,
        "min_s": min(complete) if complete else None,
        "mesh_peers": [r.mesh_peers for r in results],
        "load_at_publish": results[0].load_at_publish,
    }


def milliseconds(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.0f}"


def markdown_report(
    p2pvc_summary: dict[str, Any] | None,
    p2pvc_load: LoadReading,
    gossipsub_summaries: list[tuple[str, dict[str, Any], LoadReading]],
    arguments: argparse.Namespace,
) -> str:
    """Return the results as a Markdown table with one row per series, then notes and the verdict."""
    receivers = NODE_COUNT - 1
    lines = [
        "| mechanism | series | load at start | reached all 5 | deliveries | median ms | max ms | min ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if p2pvc_summary is not None:
        if arguments.update == "branch":
            series = f"{p2pvc_summary['updates']} new branches through the CLI, nodes taking turns"
        else:
            series = f"{p2pvc_summary['updates']} commits through the CLI on node 0"
        lines.append(
            f"| p2pvc announcement | {series} "
            f"| {p2pvc_load.load:.2f}{'' if p2pvc_load.below_limit else '*'} "
            f"(during: {p2pvc_summary['load_min']:.2f}–{p2pvc_summary['load_max']:.2f}) "
            f"| {p2pvc_summary['reached_all']}/{p2pvc_summary['updates']} "
            f"| {p2pvc_summary['deliveries']}/{receivers * p2pvc_summary['updates']} "
            f"| {milliseconds(p2pvc_summary['median_s'])} | {milliseconds(p2pvc_summary['max_s'])} "
            f"| {milliseconds(p2pvc_summary['min_s'])} |"
        )
    for name, summary, load in gossipsub_summaries:
        lines.append(
            f"| GossipSub | {name} | {load.load:.2f}{'' if load.below_limit else '*'} "
            f"(at first publish: {summary['load_at_publish']:.2f}) "
            f"| {summary['reached_all']}/{summary['messages']} | {summary['deliveries']}/{receivers * summary['messages']} "
            f"| {milliseconds(summary['median_s'])} | {milliseconds(summary['max_s'])} | {milliseconds(summary['min_s'])} |"
        )
    lines += [
        "",
        "Latency: p2pvc from the record appearing in the origin's database to the last of the other 4 nodes "
        f"storing it (polled every {arguments.poll_ms:g} ms). GossipSub from `publish()` to the last of the other 4 "
        "hosts receiving the message. Medians and maxima count only updates or messages that reached all 5. "
        "A load average marked * was still at or above the limit when the wait for a quiet machine timed out.",
    ]
    if p2pvc_summary is None:
        return "\n".join(lines)

    median = p2pvc_summary["median_s"]
    if median is None:
        verdict = "no update reached every node."
    elif median < LATENCY_TARGET_S:
        verdict = f"{median:.3f} s, met."
    else:
        verdict = f"{median:.3f} s, MISSED."
    lines += [
        f"p2pvc CLI command time (median): {p2pvc_summary['cli_median_s']:.2f} s. Poller CPU per update (median): "
        f"{p2pvc_summary['poller_cpu_s_per_update'] * 1000:.0f} ms.",
        f"Target (p2pvc median under {LATENCY_TARGET_S} s): {verdict}",
    ]
    return "\n".join(lines)


# Command line ------------------------------------------------------------------------------------------


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Measure how fast a ref update made on one of 5 serving p2pvc nodes on 127.0.0.1 reaches all of them, "
            "and compare with 5 py-libp2p GossipSub hosts publishing small messages."
        ),
    )
    parser.add_argument("--updates", type=int, default=20, help="ref updates and GossipSub messages per series (default 20)")
    parser.add_argument(
        "--update",
        choices=["branch", "commit"],
        default="branch",
        help="kind of ref update: a new branch on each node in turn, or a commit of a small file on node 0 (default branch)",
    )
    parser.add_argument("--poll-ms", type=float, default=10.0, help="milliseconds between polls of the 5 databases (default 10)")
    parser.add_argument(
        "--update-timeout", type=float, default=60.0, help="seconds to wait for one update to reach all nodes (default 60)"
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between GossipSub messages in the spaced series (default 1)"
    )

    parser.add_argument("--skip-gossipsub", action="store_true", help="measure p2pvc only")
    parser.add_argument("--skip-p2pvc", action="store_true", help="measure GossipSub only")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()), help="parent of the work folder (default: the temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and the serve logs")
    parser.add_argument(
        "--max-load", type=float, default=1.0, help="wait before each series until the 1-minute load average is below this (default 1.0)"
    )
    parser.add_argument(
        "--load-wait", type=float, default=600.0, help="seconds to wait for that at most before measuring anyway (default 600)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a setup command may run before it is killed (default 120)")
    parser.add_argument("--json", type=Path, help="write all raw figures and machine facts to this file")
    parser.add_argument("--role", choices=["gossipsub-node"], help=argparse.SUPPRESS)

    arguments = parser.parse_args(argv)
    if arguments.updates < 1:
        parser.error("--updates must be at least 1")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.role == "gossipsub-node":
        run_gossipsub_role(arguments)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    python = Path(sys.executable)
    p2pvc = python.parent / "p2pvc"
    if not p2pvc.exists():
        print(f"error: {p2pvc} not found; run this script with the virtualenv's python that has p2pvc installed", file=sys.stderr)
        return 2

    arguments.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="p2pvc-gossip-bench-", dir=arguments.workdir))
    raw: dict[str, Any] = {"command": [sys.executable, *sys.argv]}
    try:
        raw["machine"] = machine_facts(python)
        snapshot, commit = snapshot_p2pvc(work, python)
        raw["machine"]["p2pvc_commit"] = commit
        base_env = {**os.environ, "PYTHONPATH": str(snapshot), "PYTHONUNBUFFERED": "1"}
        log.info("work folder %s, measuring p2pvc at %s", work, commit[:12])

        p2pvc_summary: dict[str, Any] = {}
        p2pvc_load = LoadReading(0.0, 0.0, True)
        if not arguments.skip_p2pvc:
            measurements, p2pvc_load, notes = run_p2pvc_series(work, p2pvc, base_env, arguments)
            p2pvc_summary = summarize_p2pvc(measurements)
            raw["p2pvc"] = {"load": asdict(p2pvc_load), "summary": p2pvc_summary, "notes": notes, "updates": [asdict(m) for m in measurements]}

        gossipsub_summaries: list[tuple[str, dict[str, Any], LoadReading]] = []
        if not arguments.skip_gossipsub:
            for name, interval in (
                (f"{arguments.updates} messages {arguments.interval:g} s apart", arguments.interval),
                (f"{arguments.updates} messages at once", 0.0),
            ):
                results, load = run_gossipsub_series(python, base_env, arguments.updates, interval, arguments)
                summary = summarize_gossipsub(results, arguments.updates)
                gossipsub_summaries.append((name, summary, load))
                raw.setdefault("gossipsub", []).append(
                    {"series": name, "load": asdict(load), "summary": summary, "hosts": [asdict(r) for r in results]}
                )
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if arguments.keep:
            log.info("kept the work folder %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    raw["machine"]["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    facts = raw["machine"]
    print(
        f"Command: `python benchmarks/gossip.py {' '.join(sys.argv[1:])}`. Run {facts['date_utc']} to {facts['finished_utc']} "
        f"on {facts['cpu']}, {facts['cores']} cores, Linux {facts['kernel']}, Python {facts['python']}, "
        f"py-libp2p {facts['libp2p']}; p2pvc at git {facts['p2pvc_commit'][:12]}.\n"
    )
    print(markdown_report(p2pvc_summary or None, p2pvc_load, gossipsub_summaries, arguments))
    if arguments.json:
        arguments.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
