#!/usr/bin/env python3
"""Benchmark seeding a checkpoint to N fetching nodes over bandwidth-capped links.

What is measured, for each N in --nodes (default 2, 4 and 8):

1. Swarm. One seed node runs `p2pvc serve --seed` in a repository that has a
   commit of a synthetic bf16 safetensors checkpoint (scripts/make_checkpoint.py,
   default 1 GiB). N fetcher nodes each make a history-only clone
   (`p2pvc clone --no-content`), then all N start
   `p2pvc fetch main --listen IP --port 4730 --seed --json` at the same moment.
   Each fetcher prints its JSON report when all chunks are verified and
   stored, and then keeps serving the other fetchers until SIGTERM. A node's
   time is when its report appears on its stdout, measured by this script
   from the common start. The run's time is the last node's time.
2. Seed only. The same, but the fetchers run with `--no-peer-exchange` and
   without `--seed`, so they learn of no other fetcher and only the seed
   uploads.
3. Lower bound: checkpoint size / per-node upload rate. Every byte has to
   leave the seed at least once, so no distribution can finish sooner.
4. With --bittorrent, for reference: BitTorrent with aria2c in the same
   namespaces. The script writes a .torrent with 1 MiB pieces and runs a
   small HTTP tracker in the seed's namespace. An aria2c process seeds the
   checkpoint, and N aria2c processes download it at once and keep seeding,
   with DHT and local peer discovery off. A fetcher's time is when aria2c
   runs its download-complete hook, after every piece passed its SHA-1 check.
   aria2c sends the pieces unencrypted and uncompressed, while p2pvc uses
   Noise and zstd.

Targets, for 8 fetchers: swarm time at most 1.5x the lower bound, and seed-only
time at least 3x the swarm time.

Network. Every node gets its own network namespace, named
`p2pvcbench-<pid>-<node>`, with an interface `eth0` at 10.213.0.<k>/24 (the
seed is .1). A veth pair joins each `eth0` to a Linux bridge in a further
namespace `p2pvcbench-<pid>-bridge`, so no traffic leaves these namespaces.
The upload of each node is capped by a token bucket filter (`tc qdisc ...
tbf`) on its `eth0`, at --rate-mibps MiB/s. tbf counts Ethernet frames, so
the TCP payload rate is about 1448/1514 of it (MTU 1500 with TCP timestamps).
With --delay-ms D (default 0, so no delay), netem on the bridge side of each
veth delays the frames going to the node by D ms, so a round trip between two
nodes takes 2D ms plus the queueing. That needs a kernel with sch_netem. The namespaces, and with them the veths and the
bridge, are deleted after each run, also on Ctrl-C and SIGTERM.

The chunks travel zstd-compressed, so the bytes on the wire are fewer than
the checkpoint's size (0.78x, measured for the random bf16 weights of
make_checkpoint), and a run can end below the lower bound. The table also
shows the compressed bytes each fetcher received (`bytes_fetched`).

CPU. Nine Python processes that all do Noise, Yamux, zstd and BLAKE3 may be
limited by the CPU instead of the network on a small machine. So the script
samples /proc/stat once a second during each run. It reports the mean busy
share of all cores and the share of 1-second intervals in which all cores
were at least 95% busy, which both include other programs on the machine.
It also reports the maximum 1-minute load average, and the CPU seconds of
each node (wait4 for a process that exited, /proc/PID/stat otherwise).

p2pvc is measured as committed at HEAD when the run starts (see
benchmarks/sync.py, snapshot_p2pvc). Before each run the script waits (at
most --load-wait seconds) until the 1-minute load average is below
--max-load, and records it. After each run it checks one fetcher (the last to
finish; --verify all checks every one): `p2pvc fsck` must report no problem,
and `p2pvc checkout` must write a file with the checkpoint's SHA-256.

Needs root, `ip` and `tc` from iproute2, and a kernel with sch_tbf (and
sch_netem for --delay-ms). Run `python benchmarks/swarm.py --help` for the options.
Progress goes to stderr, Markdown tables to stdout, and all raw figures to
the --json file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import http.server
import json
import logging
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
sys.path.insert(0, str(BENCHMARKS_DIR))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from make_checkpoint import parse_size  # noqa: E402
from sync import (  # noqa: E402  (benchmarks/sync.py: process, load and setup helpers shared by the benchmarks)
    CLOCK_TICKS,
    BenchmarkError,
    LoadReading,
    file_sha256,
    machine_facts,
    process_cpu_seconds,
    run_command,
    stop_process,
    wait_for_quiet_machine,
)
from sync import snapshot_p2pvc  # noqa: E402

log = logging.getLogger("bench.swarm")

GIB = 1024**3
MIB = 1024**2

SWARM_TARGET = 1.5
"""Maximum swarm time for 8 fetchers, as a multiple of the lower bound."""
SPEEDUP_TARGET = 3.0
"""Minimum seed-only time for 8 fetchers, as a multiple of the swarm time."""
TARGET_NODES = 8

SUBNET = "10.213.0"
"""First three octets of the private /24 that the nodes use. The seed is .1 and fetcher i is .(i + 1)."""
MAX_FETCHERS = 200
PORT = 4730
TBF_BURST_BYTES = 128 * 1024
"""Token bucket size: 12.5 ms of data at 10 MiB/s. Larger than one 64 KiB GSO frame, so tbf need not split them."""
TBF_LATENCY_MS = 50
"""Maximum time a frame may wait in tbf's queue. tbf derives its queue length from it."""
NETEM_LIMIT_PACKETS = 10000

SEED_START_TIMEOUT_S = 60.0
EXIT_GRACE_S = 10.0
"""Seconds a seed-only fetcher gets to exit by itself after its report, before SIGTERM."""
POLL_S = 0.2
CPU_SAMPLE_S = 1.0
SATURATED_BUSY = 0.95
"""Share of all cores busy above which a 1-second interval counts as CPU-saturated."""
LOG_TAIL_LINES = 15

LISTENING = re.compile(r"^listening on (/ip4/[\d.]+/tcp/\d+/p2p/\w+)$", re.MULTILINE)


# Network ---------------------------------------------------------------------------------------------


def ip_command(*arguments: str) -> None:
    """Run an `ip` or `tc` command line and raise BenchmarkError with its stderr if it fails."""
    result = subprocess.run(list(arguments), capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise BenchmarkError(f"{' '.join(arguments)} failed with exit status {result.returncode}: {result.stderr.strip()}")


def namespace_names(prefix: str) -> list[str]:
    """Return the network namespaces whose name starts with `prefix`."""
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=True)
    # Lines look like "name" or "name (id: 3)".
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    return [name for name in names if name.startswith(prefix)]


@dataclass(frozen=True)
class NodeNetwork:
    """One node's network namespace and its address on the bridge."""

    namespace: str
    ip: str


@contextlib.contextmanager
def node_network(prefix: str, node_count: int, rate_bytes_per_s: int, delay_ms: float) -> Iterator[list[NodeNetwork]]:
    """Create `node_count` namespaces joined by a bridge, each with its upload capped at `rate_bytes_per_s`.

    Node 0 gets SUBNET.1, node k gets SUBNET.(k + 1). Deletes every namespace
    whose name starts with `prefix` when the block ends, also on errors, and
    with them the veths and the bridge.
    """
    bridge_namespace = f"{prefix}bridge"
    nodes = [NodeNetwork(f"{prefix}{'seed' if k == 0 else f'fetcher{k}'}", f"{SUBNET}.{k + 1}") for k in range(node_count)]
    try:
        ip_command("ip", "netns", "add", bridge_namespace)
        ip_command("ip", "-n", bridge_namespace, "link", "add", "br0", "type", "bridge")
        ip_command("ip", "-n", bridge_namespace, "link", "set", "br0", "up")
        for index, node in enumerate(nodes):
            port = f"port{index}"
            ip_command("ip", "netns", "add", node.namespace)
            ip_command("ip", "-n", node.namespace, "link", "set", "lo", "up")
            ip_command(
                "ip", "-n", bridge_namespace, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", node.namespace
            )
            ip_command("ip", "-n", bridge_namespace, "link", "set", port, "master", "br0", "up")
            ip_command("ip", "-n", node.namespace, "addr", "add", f"{node.ip}/24", "dev", "eth0")
            ip_command("ip", "-n", node.namespace, "link", "set", "eth0", "up")
            ip_command(
                "tc", "-n", node.namespace, "qdisc", "add", "dev", "eth0", "root", "tbf",
                "rate", f"{rate_bytes_per_s * 8}bit", "burst", str(TBF_BURST_BYTES), "latency", f"{TBF_LATENCY_MS}ms",
            )  # fmt: skip
            if delay_ms > 0:
                ip_command(
                    "tc", "-n", bridge_namespace, "qdisc", "add", "dev", port, "root", "netem",
                    "delay", f"{delay_ms}ms", "limit", str(NETEM_LIMIT_PACKETS),
                )  # fmt: skip
        yield nodes
    finally:
        for name in namespace_names(prefix):
            result = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True, timeout=30)
            if result.returncode != 0:
                log.error("deleting network namespace %s failed: %s", name, result.stderr.strip())
        left = namespace_names(prefix)
        if left:
            log.error("network namespaces still present after cleanup: %s", ", ".join(left))


def in_namespace(namespace: str, command: Sequence[str]) -> list[str]:
    """Return `command` run inside `namespace`. `ip netns exec` execs it, so the pid stays the command's."""
    return ["ip", "netns", "exec", namespace, *command]


# CPU load -------------------------------------------------------------------------------------------------


def read_cpu_jiffies() -> tuple[int, int]:
    """Return (busy, total) jiffies of all cores since boot from /proc/stat. Idle and iowait count as not busy."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # Columns: user nice system idle iowait irq softirq steal guest guest_nice. Guest time is already in user.
    total = sum(fields[:8])
    return total - fields[3] - fields[4], total


@dataclass
class CpuSampler:
    """Samples of the whole machine's busy share and load average, one per CPU_SAMPLE_S."""

    busy_shares: list[float] = field(default_factory=list)
    load_averages: list[float] = field(default_factory=list)
    first: tuple[int, int] = (0, 0)
    last: tuple[int, int] = (0, 0)
    next_sample: float = 0.0

    def start(self) -> None:
        self.first = self.last = read_cpu_jiffies()
        self.next_sample = time.monotonic() + CPU_SAMPLE_S

    def sample_if_due(self) -> None:
        if time.monotonic() < self.next_sample:
            return
        self.next_sample += CPU_SAMPLE_S
        current = read_cpu_jiffies()
        busy, total = current[0] - self.last[0], current[1] - self.last[1]
        if total > 0:
            self.busy_shares.append(busy / total)
        self.last = current
        self.load_averages.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        current = read_cpu_jiffies()
        busy, total = current[0] - self.first[0], current[1] - self.first[1]
        saturated = sum(1 for share in self.busy_shares if share >= SATURATED_BUSY)
        return {
            "busy_share_mean": busy / total if total else 0.0,
            "saturated_interval_share": saturated / len(self.busy_shares) if self.busy_shares else 0.0,
            "intervals": len(self.busy_shares),
            "load_max": max(self.load_averages, default=os.getloadavg()[0]),
        }


# Processes ---------------------------------------------------------------------------------------------


@dataclass
class Fetcher:
    """One fetching node: its namespace, folders, running process and, once done, its report."""

    index: int
    network: NodeNetwork
    home: Path
    folder: Path
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[str] | None = None
    report: dict[str, Any] | None = None
    report_at: float | None = None
    """Seconds from the common start until the report was read. Set before `report`, so a reader that sees the report sees the time."""
    exit_status: int | None = None
    cpu_seconds: float | None = None
    unparsed_stdout: str = ""


def read_report(fetcher: Fetcher, started: float) -> None:
    """Read a fetcher's stdout until it closes, and store the first complete JSON object in it and when it arrived.

    `p2pvc fetch --json` prints one indented JSON object that ends with a "}"
    line, so the text is parsed whenever such a line arrives.
    """
    assert fetcher.process is not None and fetcher.process.stdout is not None
    buffer = ""
    for line in fetcher.process.stdout:
        buffer += line
        if fetcher.report is None and line.rstrip("\n") == "}":
            try:
                value = json.loads(buffer)
            except json.JSONDecodeError:
                continue
            fetcher.report_at = time.monotonic() - started
            fetcher.report = value
            buffer = ""
    fetcher.unparsed_stdout = buffer


def reap_if_exited(process: subprocess.Popen[Any]) -> tuple[int, float] | None:
    """Return (exit status, CPU seconds) if `process` has exited, reaping it with wait4, or None while it runs."""
    if process.returncode is not None:
        return None
    pid, status, usage = os.wait4(process.pid, os.WNOHANG)
    if pid == 0:
        return None
    # wait4 reaped the child, so Popen must not wait for it again.
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_utime + usage.ru_stime


def log_tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").strip().splitlines()[-LOG_TAIL_LINES:])


@contextlib.contextmanager
def seeding(p2pvc: Path, folder: Path, env: dict[str, str], network: NodeNetwork, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `p2pvc serve --seed` in `folder` inside the seed's namespace for the duration of the block.

    Waits until it prints its address, and stops it by pid (SIGTERM, then SIGKILL) when the block ends.
    """
    command = in_namespace(network.namespace, [str(p2pvc), "serve", "--seed", "--listen", network.ip, "--port", str(PORT)])
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=folder, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SEED_START_TIMEOUT_S
        while not LISTENING.search(log_path.read_text(errors="replace")):
            if process.poll() is not None:
                raise BenchmarkError(f"p2pvc serve --seed exited with status {process.returncode}: {log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"p2pvc serve --seed printed no address within {SEED_START_TIMEOUT_S:g} s")
            time.sleep(0.05)
        yield process
    finally:
        stop_process(process, "p2pvc serve --seed")


# Setup -----------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Folders, environment and inputs shared by all runs."""

    work: Path
    p2pvc: Path
    base_env: dict[str, str]
    checkpoint: Path
    checkpoint_bytes: int
    checkpoint_sha256: str
    seed_folder: Path
    seed_env: dict[str, str]
    seed_peer_id: str
    namespace_prefix: str
    timeout: float


def prepare_seed(work: Path, p2pvc: Path, python: Path, base_env: dict[str, str], size: int, timeout: float) -> Layout:
    """Write the checkpoint, commit it in the seed's repository and read the seed's peer id."""
    checkpoint = work / "model.safetensors"
    script = REPO_ROOT / "scripts" / "make_checkpoint.py"
    log.info("writing a %d-byte checkpoint", size)
    run_command([str(python), str(script), "base", str(checkpoint), "--size", str(size)], work, dict(os.environ), timeout)
    checkpoint_sha256 = file_sha256(checkpoint)

    seed_folder = work / "seed"
    seed_folder.mkdir()
    seed_env = {**base_env, "P2PVC_HOME": str(work / "home-seed")}
    run_command([str(p2pvc), "init"], seed_folder, seed_env, timeout)
    os.link(checkpoint, seed_folder / "model.safetensors")
    log.info("committing the checkpoint in the seed's repository")
    run_command([str(p2pvc), "commit", "-m", "checkpoint"], seed_folder, seed_env, timeout)
    identity = json.loads(run_command([str(p2pvc), "id", "--json"], seed_folder, seed_env, timeout).stdout)
    return Layout(
        work=work,
        p2pvc=p2pvc,
        base_env=base_env,
        checkpoint=checkpoint,
        checkpoint_bytes=checkpoint.stat().st_size,
        checkpoint_sha256=checkpoint_sha256,
        seed_folder=seed_folder,
        seed_env=seed_env,
        seed_peer_id=identity["peer_id"],
        namespace_prefix=f"p2pvcbench-{os.getpid()}-",
        timeout=timeout,
    )


# One run -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Raw figures of one distribution of the checkpoint to `fetchers` nodes."""

    mode: str
    """"swarm", "seed-only" or "bittorrent"."""
    fetchers: int
    repetition: int
    load: LoadReading
    seconds: float
    """From the common start until the last fetcher's report was read."""
    node_seconds: list[float]
    """Per fetcher, from the common start until its report was read."""
    reports: list[dict[str, Any]]
    seed_cpu_seconds: float
    fetcher_cpu_seconds: list[float]
    cpu: dict[str, float]
    verified: list[int]
    """Indices of the fetchers whose content was checked with fsck and a checkout."""
    exit_statuses: list[int | None]
    derived: dict[str, float] = field(default_factory=dict)


def fetch_command(p2pvc: Path, mode: str, network: NodeNetwork, verbose: bool) -> list[str]:
    command = [str(p2pvc), "fetch", "main", "--listen", network.ip, "--port", str(PORT), "--json"]
    command += ["--seed"] if mode == "swarm" else ["--no-peer-exchange"]
    if verbose:
        command.append("--verbose")
    return in_namespace(network.namespace, command)


def run_once(layout: Layout, mode: str, fetcher_count: int, repetition: int, arguments: argparse.Namespace) -> Run:
    """Distribute the checkpoint to `fetcher_count` fresh history-only clones and measure it."""
    folder = layout.work / f"{mode}-{fetcher_count}-{repetition}"
    folder.mkdir()
    rate = int(arguments.rate_mibps * MIB)
    deadline_s = arguments.timeout or 3 * fetcher_count * layout.checkpoint_bytes / rate + 120
    try:
        with node_network(layout.namespace_prefix, fetcher_count + 1, rate, arguments.delay_ms) as networks:
            with seeding(layout.p2pvc, layout.seed_folder, layout.seed_env, networks[0], folder / "seed.log") as seed:
                seed_address = f"/ip4/{networks[0].ip}/tcp/{PORT}/p2p/{layout.seed_peer_id}"
                fetchers = clone_fetchers(layout, folder, networks[1:], seed_address)
                subprocess.run(["sync"], check=True)
                load = wait_for_quiet_machine(arguments.max_load, arguments.load_wait)
                log.info("%s, %d fetchers: starting all fetches (load %.2f)", mode, fetcher_count, load.load)
                seed_cpu_before = process_cpu_seconds(seed.pid)
                seconds, cpu = run_fetchers(layout, fetchers, mode, deadline_s, arguments.verbose_fetch)
                seed_cpu = process_cpu_seconds(seed.pid) - seed_cpu_before
        verified = verify_fetchers(layout, fetchers, arguments.verify)
    finally:
        for fetcher_folder in folder.glob("fetcher-*"):
            shutil.rmtree(fetcher_folder, ignore_errors=True)
    reports = [fetcher.report for fetcher in fetchers if fetcher.report is not None]
    run = Run(
        mode=mode,
        fetchers=fetcher_count,
        repetition=repetition,
        load=load,
        seconds=seconds,
        node_seconds=[fetcher.report_at or 0.0 for fetcher in fetchers],
        reports=reports,
        seed_cpu_seconds=seed_cpu,
        fetcher_cpu_seconds=[fetcher.cpu_seconds or 0.0 for fetcher in fetchers],
        cpu=cpu,
        verified=verified,
        exit_statuses=[fetcher.process.returncode if fetcher.process else None for fetcher in fetchers],
    )
    run.derived = derive(run, layout, rate)
    log.info(
        "%s, %d fetchers: %.1f s (%.2fx the lower bound), CPU busy %.0f%%",
        mode, fetcher_count, seconds, run.derived["lower_bound_ratio"], 100 * cpu["busy_share_mean"],
    )  # fmt: skip
    return run


def clone_fetchers(layout: Layout, folder: Path, networks: list[NodeNetwork], seed_address: str) -> list[Fetcher]:
    """Make a history-only clone for each fetcher from the seed, each inside its own namespace."""
    fetchers = []
    for index, network in enumerate(networks, 1):
        home = layout.work / f"home-fetcher{index}"
        env = {**layout.base_env, "P2PVC_HOME": str(home)}
        fetcher = Fetcher(index, network, home, folder / f"fetcher-{index}", env, folder / f"fetcher-{index}.log")
        command = in_namespace(network.namespace, [str(layout.p2pvc), "clone", "--no-content", seed_address, str(fetcher.folder)])
        run_command(command, folder, env, layout.timeout)
        fetchers.append(fetcher)
    log.info("%d history-only clones made", len(fetchers))
    return fetchers


def run_fetchers(
    layout: Layout, fetchers: list[Fetcher], mode: str, deadline_s: float, verbose: bool
) -> tuple[float, dict[str, float]]:
    """Start every fetch at once and wait for all reports; return the last report's time and the CPU figures.

    A fetcher that exits without a report, or a run past `deadline_s`,
    raises BenchmarkError with the end of the fetchers' logs. In seed-only
    mode the fetchers exit after their report, and get EXIT_GRACE_S to do so.
    Every fetcher still running at the end is stopped by pid, also on errors.
    """
    completed = False
    try:
        result = wait_for_reports(layout, fetchers, mode, deadline_s, verbose)
        completed = True
        return result
    finally:
        for fetcher in fetchers:
            if fetcher.process is None:
                continue
            if completed and mode == "seed-only":
                with contextlib.suppress(subprocess.TimeoutExpired):
                    fetcher.process.wait(timeout=EXIT_GRACE_S)
            stop_process(fetcher.process, f"p2pvc fetch on fetcher {fetcher.index}")


def wait_for_reports(
    layout: Layout, fetchers: list[Fetcher], mode: str, deadline_s: float, verbose: bool
) -> tuple[float, dict[str, float]]:
    sampler = CpuSampler()
    sampler.start()
    started = time.monotonic()
    readers = []
    for fetcher in fetchers:
        with fetcher.log_path.open("w") as log_file:
            fetcher.process = subprocess.Popen(
                fetch_command(layout.p2pvc, mode, fetcher.network, verbose),
                cwd=fetcher.folder,
                env=fetcher.env,
                stdout=subprocess.PIPE,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        reader = threading.Thread(target=read_report, args=(fetcher, started), daemon=True)
        reader.start()
        readers.append(reader)

    while True:
        sampler.sample_if_due()
        for fetcher in fetchers:
            assert fetcher.process is not None
            exited = reap_if_exited(fetcher.process)
            if exited is not None:
                fetcher.exit_status, fetcher.cpu_seconds = exited
                readers[fetcher.index - 1].join(timeout=5)
                if fetcher.report is None or fetcher.exit_status != 0:
                    raise BenchmarkError(
                        f"p2pvc fetch on fetcher {fetcher.index} exited with status {fetcher.exit_status} "
                        f"{'after' if fetcher.report else 'without'} its report: {log_tail(fetcher.log_path)}"
                    )
        if all(fetcher.report is not None for fetcher in fetchers):
            break
        if time.monotonic() - started > deadline_s:
            waiting = [f"fetcher {f.index}: {log_tail(f.log_path) or 'no output'}" for f in fetchers if f.report is None]
            raise BenchmarkError(f"{len(waiting)} fetchers had no report after {deadline_s:.0f} s. " + " | ".join(waiting))
        time.sleep(POLL_S)
    seconds = max(fetcher.report_at or 0.0 for fetcher in fetchers)
    cpu = sampler.summary()
    for fetcher in fetchers:
        assert fetcher.process is not None
        if fetcher.cpu_seconds is None:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                fetcher.cpu_seconds = process_cpu_seconds(fetcher.process.pid)
    return seconds, cpu


def verify_fetchers(layout: Layout, fetchers: list[Fetcher], scope: str) -> list[int]:
    """Check the content of the last fetcher to finish (or of every fetcher) with fsck and a checkout.

    Raises BenchmarkError if fsck reports a problem or the checked-out file
    differs from the checkpoint. Returns the indices of the fetchers checked.
    """
    if scope == "none":
        return []
    chosen = fetchers if scope == "all" else [max(fetchers, key=lambda f: f.report_at or 0.0)]
    for fetcher in chosen:
        fsck = json.loads(run_command([str(layout.p2pvc), "fsck", "--json"], fetcher.folder, fetcher.env, layout.timeout).stdout)
        if not fsck["ok"]:
            raise BenchmarkError(f"p2pvc fsck in fetcher {fetcher.index}'s repository found problems: {fsck['problems']}")
        run_command([str(layout.p2pvc), "checkout", "--force", "main"], fetcher.folder, fetcher.env, layout.timeout)
        if file_sha256(fetcher.folder / "model.safetensors") != layout.checkpoint_sha256:
            raise BenchmarkError(f"fetcher {fetcher.index}'s checkout of model.safetensors differs from the checkpoint")
        log.info("fetcher %d: fsck found no problem in %d bytes, and the checkout matches", fetcher.index, fsck["bytes_checked"])
    return [fetcher.index for fetcher in chosen]


def derive(run: Run, layout: Layout, rate_bytes_per_s: int) -> dict[str, float]:
    """Compute the reported figures of one run from its raw measurements.

    The figures from p2pvc's JSON reports are left out of a BitTorrent run, which has none.
    """
    size = layout.checkpoint_bytes
    lower_bound = size / rate_bytes_per_s
    node_cpu = run.seed_cpu_seconds + sum(run.fetcher_cpu_seconds)
    derived = {
        "size_bytes": size,
        "lower_bound_seconds": lower_bound,
        "lower_bound_ratio": run.seconds / lower_bound,
        "first_node_seconds": min(run.node_seconds),
        "median_node_seconds": statistics.median(run.node_seconds),
        "node_cpu_seconds": node_cpu,
        "node_cpu_share": node_cpu / (run.seconds * (os.cpu_count() or 1)),
    }
    if not run.reports:
        return derived

    from_seed = sum(report["peers"].get(layout.seed_peer_id, 0) for report in run.reports)
    received = sum(sum(report["peers"].values()) for report in run.reports)
    wire = [report["bytes_fetched"] for report in run.reports]
    return derived | {
        "median_report_seconds": statistics.median(report["seconds"] for report in run.reports),
        "seed_raw_bytes_sent": from_seed,
        "seed_copies_sent": from_seed / size,
        "fetcher_share_of_received": (received - from_seed) / received if received else 0.0,
        "wire_bytes_per_fetcher": statistics.mean(wire),
        "wire_lower_bound_seconds": statistics.mean(wire) / rate_bytes_per_s,
        "duplicate_chunks": sum(report["duplicate_chunks"] for report in run.reports),
        "dropped_peers": sum(len(report["dropped"]) for report in run.reports),
        "banned_peers": sum(len(report["banned"]) for report in run.reports),
    }


# BitTorrent reference --------------------------------------------------------------------------------


BT_PIECE_BYTES = 1024 * 1024
"""Piece size of the torrent. 1 MiB is a usual choice for a file of about 1 GiB."""
BT_TRACKER_PORT = 6969
BT_PEER_PORT = 6881
BT_ANNOUNCE_INTERVAL_S = 5
"""Seconds between a client's announces. Short, so that fetchers that start together soon learn of each other."""


def bencode(value: Any) -> bytes:
    """Encode ints, bytes, str, lists and dicts (with str or bytes keys) in BitTorrent's bencoding."""
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(bencode(item) for item in value) + b"e"
    if isinstance(value, dict):
        items = sorted((key.encode() if isinstance(key, str) else key, item) for key, item in value.items())
        return b"d" + b"".join(bencode(key) + bencode(item) for key, item in items) + b"e"
    raise TypeError(f"cannot bencode a {type(value).__name__}")


def write_torrent(checkpoint: Path, announce: str, destination: Path) -> None:
    """Write a single-file .torrent for `checkpoint` with SHA-1 piece hashes, as BEP 3 defines it."""
    hashes = []
    with checkpoint.open("rb") as source:
        while piece := source.read(BT_PIECE_BYTES):
            hashes.append(hashlib.sha1(piece).digest())
    info = {
        "name": checkpoint.name,
        "length": checkpoint.stat().st_size,
        "piece length": BT_PIECE_BYTES,
        "pieces": b"".join(hashes),
    }
    destination.write_bytes(bencode({"announce": announce, "info": info}))


def run_tracker(host: str, port: int) -> None:
    """Run a BitTorrent HTTP tracker (BEP 3, compact peer lists from BEP 23) until SIGTERM.

    Every announce gets all other peers of the same torrent. Each announce is
    logged on stderr as "announce IP:PORT EVENT".
    """
    swarms: dict[bytes, dict[bytes, tuple[str, int]]] = {}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            # info_hash and peer_id are percent-encoded raw bytes, so decode them as Latin-1, which maps each byte to one character.
            query = urllib.parse.parse_qs(url.query, encoding="latin-1")
            try:
                info_hash = query["info_hash"][0].encode("latin-1")
                peer_id = query["peer_id"][0].encode("latin-1")
                peer_port = int(query["port"][0])
            except (KeyError, ValueError):
                self.send_error(400, "missing or invalid info_hash, peer_id or port")
                return
            event = query.get("event", [""])[0]
            with lock:
                peers = swarms.setdefault(info_hash, {})
                if event == "stopped":
                    peers.pop(peer_id, None)
                else:
                    peers[peer_id] = (self.client_address[0], peer_port)
                others = [address for other, address in peers.items() if other != peer_id]
            compact = b"".join(socket.inet_aton(ip) + struct.pack(">H", number) for ip, number in others)
            body = bencode({"interval": BT_ANNOUNCE_INTERVAL_S, "peers": compact})
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            print(f"announce {self.client_address[0]}:{peer_port} {event or 'update'}", file=sys.stderr, flush=True)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # do_GET logs each announce in a shorter form

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(target=server.shutdown).start())
    print(f"tracker listening on {host}:{port}", file=sys.stderr, flush=True)
    server.serve_forever()


def aria2c_command(folder: Path, torrent: Path, network: NodeNetwork, *extra: str) -> list[str]:
    """Return an aria2c command that downloads or seeds `torrent` in `folder` and seeds until stopped.

    DHT and local peer discovery are off, so the tracker and peer exchange
    are the only ways to find peers. --seed-ratio=0.0 without --seed-time
    seeds until the process is stopped (aria2c 1.36 manual).
    """
    return in_namespace(
        network.namespace,
        [
            "aria2c",
            f"--dir={folder}",
            "--seed-ratio=0.0",
            "--enable-dht=false",
            "--enable-dht6=false",
            "--bt-enable-lpd=false",
            "--enable-peer-exchange=true",
            f"--bt-tracker-interval={BT_ANNOUNCE_INTERVAL_S}",
            f"--listen-port={BT_PEER_PORT}",
            "--file-allocation=none",
            "--summary-interval=0",
            "--show-console-readout=false",
            "--console-log-level=warn",
            "--enable-color=false",
            *extra,
            str(torrent),
        ],
    )


def wait_for_line(path: Path, pattern: re.Pattern[str], process: subprocess.Popen[Any], name: str, timeout: float) -> None:
    """Wait until the log at `path` contains `pattern`. Raise BenchmarkError if `process` exits first or on timeout."""
    deadline = time.monotonic() + timeout
    while not pattern.search(path.read_text(errors="replace")):
        if process.poll() is not None:
            raise BenchmarkError(f"{name} exited with status {process.returncode}: {log_tail(path)}")
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{name} did not get ready within {timeout:g} s: {log_tail(path)}")
        time.sleep(0.05)


def run_bittorrent(layout: Layout, fetcher_count: int, repetition: int, arguments: argparse.Namespace) -> Run:
    """Distribute the checkpoint with aria2c from a seed to `fetcher_count` fetchers and measure it like run_once.

    A fetcher's time is when aria2c runs its --on-bt-download-complete hook,
    after the last piece passed its SHA-1 check. The hook creates a marker
    file that this script polls for every POLL_S.
    """
    folder = layout.work / f"bittorrent-{fetcher_count}-{repetition}"
    folder.mkdir()
    rate = int(arguments.rate_mibps * MIB)
    deadline_s = arguments.timeout or 3 * fetcher_count * layout.checkpoint_bytes / rate + 120
    hook = folder / "download-complete.sh"
    # aria2c passes the GID, the number of files and the first file's path.
    hook.write_text('#!/bin/sh\ntouch "$3.complete"\n')
    hook.chmod(0o755)
    processes: list[tuple[str, subprocess.Popen[bytes]]] = []
    fetcher_folders = [folder / f"fetcher-{index}" for index in range(1, fetcher_count + 1)]
    try:
        with node_network(layout.namespace_prefix, fetcher_count + 1, rate, arguments.delay_ms) as networks:
            seed_network = networks[0]
            torrent = folder / "model.torrent"
            write_torrent(layout.checkpoint, f"http://{seed_network.ip}:{BT_TRACKER_PORT}/announce", torrent)
            seed_folder = folder / "seed"
            seed_folder.mkdir()
            os.link(layout.checkpoint, seed_folder / layout.checkpoint.name)

            def start(name: str, command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
                with log_path.open("wb") as log_file:
                    process = subprocess.Popen(
                        command, cwd=folder, env=layout.base_env, stdout=log_file, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, start_new_session=True,
                    )  # fmt: skip
                processes.append((name, process))
                return process

            tracker_log = folder / "tracker.log"
            tracker_command = [sys.executable, str(Path(__file__).resolve()), "--role", "tracker", "--listen", seed_network.ip]
            tracker = start("tracker", in_namespace(seed_network.namespace, tracker_command), tracker_log)
            wait_for_line(tracker_log, re.compile(r"^tracker listening", re.MULTILINE), tracker, "the tracker", SEED_START_TIMEOUT_S)
            seed = start("aria2c seed", aria2c_command(seed_folder, torrent, seed_network, "--check-integrity=true"), folder / "seed.log")
            seed_announce = re.compile(rf"^announce {re.escape(seed_network.ip)}:", re.MULTILINE)
            wait_for_line(tracker_log, seed_announce, seed, "the aria2c seed", SEED_START_TIMEOUT_S)

            load = wait_for_quiet_machine(arguments.max_load, arguments.load_wait)
            log.info("bittorrent, %d fetchers: starting all downloads (load %.2f)", fetcher_count, load.load)
            sampler = CpuSampler()
            sampler.start()
            seed_cpu_before = process_cpu_seconds(seed.pid)
            started = time.monotonic()
            fetchers = []
            for index, (network, fetcher_folder) in enumerate(zip(networks[1:], fetcher_folders), 1):
                fetcher_folder.mkdir()
                command = aria2c_command(fetcher_folder, torrent, network, f"--on-bt-download-complete={hook}")
                fetchers.append(start(f"aria2c on fetcher {index}", command, folder / f"fetcher-{index}.log"))
            markers = [fetcher_folder / f"{layout.checkpoint.name}.complete" for fetcher_folder in fetcher_folders]
            node_seconds: list[float | None] = [None] * fetcher_count
            while None in node_seconds:
                sampler.sample_if_due()
                now = time.monotonic() - started
                for index, marker in enumerate(markers):
                    if node_seconds[index] is None and marker.exists():
                        node_seconds[index] = now
                for index, process in enumerate(fetchers):
                    if process.poll() is not None:
                        raise BenchmarkError(
                            f"aria2c on fetcher {index + 1} exited with status {process.returncode}: "
                            f"{log_tail(folder / f'fetcher-{index + 1}.log')}"
                        )
                if now > deadline_s:
                    raise BenchmarkError(f"{node_seconds.count(None)} aria2c fetchers were not done after {deadline_s:.0f} s")
                time.sleep(POLL_S)
            cpu = sampler.summary()
            seed_cpu = process_cpu_seconds(seed.pid) - seed_cpu_before
            fetcher_cpu = [process_cpu_seconds(process.pid) for process in fetchers]
            for name, process in reversed(processes):
                stop_process(process, name)
        verified = []
        if arguments.verify != "none":
            done = [seconds or 0.0 for seconds in node_seconds]
            chosen = range(fetcher_count) if arguments.verify == "all" else [done.index(max(done))]
            for index in chosen:
                if file_sha256(fetcher_folders[index] / layout.checkpoint.name) != layout.checkpoint_sha256:
                    raise BenchmarkError(f"aria2c's download on fetcher {index + 1} differs from the checkpoint")
                verified.append(index + 1)
    finally:
        for name, process in reversed(processes):
            stop_process(process, name)
        for fetcher_folder in fetcher_folders:
            shutil.rmtree(fetcher_folder, ignore_errors=True)
    seconds_by_node = [seconds or 0.0 for seconds in node_seconds]
    run = Run(
        mode="bittorrent",
        fetchers=fetcher_count,
        repetition=repetition,
        load=load,
        seconds=max(seconds_by_node),
        node_seconds=seconds_by_node,
        reports=[],
        seed_cpu_seconds=seed_cpu,
        fetcher_cpu_seconds=fetcher_cpu,
        cpu=cpu,
        verified=verified,
        exit_statuses=[process.returncode for process in fetchers],
    )
    run.derived = derive(run, layout, rate)
    log.info(
        "bittorrent, %d fetchers: %.1f s (%.2fx the lower bound), CPU busy %.0f%%",
        fetcher_count, run.seconds, run.derived["lower_bound_ratio"], 100 * cpu["busy_share_mean"],
    )  # fmt: skip
    return run


# Report ------------------------------------------------------------------------------------------------


def median_of(runs: list[Run], mode: str, fetchers: int, key: str | None = None) -> float | None:
    chosen = [r for r in runs if r.mode == mode and r.fetchers == fetchers]
    if not chosen:
        return None
    return statistics.median(r.seconds if key is None else r.derived[key] for r in chosen)


def markdown_report(runs: list[Run], node_counts: list[int], size: int, rate_bytes_per_s: int) -> str:
    """Return the summary table, the per-run table and the target lines as Markdown."""
    lower_bound = size / rate_bytes_per_s

    def text(value: float | None, form: str = ".1f", suffix: str = "") -> str:
        return "–" if value is None else f"{value:{form}}{suffix}"

    with_bittorrent = any(run.mode == "bittorrent" for run in runs)
    lines = [
        f"Checkpoint of {size} bytes, upload of every node capped at {rate_bytes_per_s / MIB:g} MiB/s. "
        "Times run from the common start of all fetches to the last fetcher's report (median over repetitions).",
        "",
        "| fetchers | swarm s | seed-only s | lower bound s | swarm / lower bound | seed-only / swarm |"
        + (" BitTorrent (aria2c) s | BitTorrent / lower bound |" if with_bittorrent else ""),
        "| ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if with_bittorrent else ""),
    ]
    for count in node_counts:
        swarm = median_of(runs, "swarm", count)
        seed_only = median_of(runs, "seed-only", count)
        ratio = swarm / lower_bound if swarm is not None else None
        speedup = seed_only / swarm if swarm is not None and seed_only is not None else None
        row = f"| {count} | {text(swarm)} | {text(seed_only)} | {lower_bound:.1f} | {text(ratio, '.2f', 'x')} | {text(speedup, '.2f', 'x')} |"
        if with_bittorrent:
            bittorrent = median_of(runs, "bittorrent", count)
            row += f" {text(bittorrent)} | {text(None if bittorrent is None else bittorrent / lower_bound, '.2f', 'x')} |"
        lines.append(row)

    lines += [
        "",
        "Per run. Node times: first, median and last fetcher's report. Seed copies: raw bytes the seed sent, "
        "over the checkpoint size. From fetchers: share of the received bytes that came from other fetchers. "
        "Wire MiB: compressed chunk bytes per fetcher (`bytes_fetched`). CPU busy: share of all cores busy "
        f"(/proc/stat), and share of 1-s intervals at least {SATURATED_BUSY:.0%} busy. Node CPU: user plus system "
        "seconds of the seed and all fetchers, and that as a share of all cores over the run. "
        "A BitTorrent run has no p2pvc report, so its transfer columns are empty.",
        "",
        "| mode | fetchers | rep | load | node times s | seed copies | from fetchers | wire MiB | duplicates "
        "| CPU busy | saturated | max load | seed CPU s | fetchers CPU s | node CPU share |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        d = run.derived
        load = f"{run.load.load:.2f}" + ("" if run.load.below_limit else "*")
        if run.reports:
            transfer = (
                f"{d['seed_copies_sent']:.2f} | {d['fetcher_share_of_received']:.0%} "
                f"| {d['wire_bytes_per_fetcher'] / MIB:.0f} | {d['duplicate_chunks']:.0f}"
            )
        else:
            transfer = "– | – | – | –"
        lines.append(
            f"| {run.mode} | {run.fetchers} | {run.repetition} | {load} "
            f"| {d['first_node_seconds']:.1f} / {d['median_node_seconds']:.1f} / {run.seconds:.1f} "
            f"| {transfer} | {run.cpu['busy_share_mean']:.0%} | {run.cpu['saturated_interval_share']:.0%} "
            f"| {run.cpu['load_max']:.2f} | {run.seed_cpu_seconds:.1f} | {sum(run.fetcher_cpu_seconds):.1f} | {d['node_cpu_share']:.0%} |"
        )

    swarm = median_of(runs, "swarm", TARGET_NODES)
    seed_only = median_of(runs, "seed-only", TARGET_NODES)
    lines.append("")
    if swarm is not None:
        ratio = swarm / lower_bound
        lines.append(
            f"Swarm target ({TARGET_NODES} fetchers within {SWARM_TARGET}x the lower bound): {ratio:.2f}x, "
            + ("met." if ratio <= SWARM_TARGET else "MISSED.")
        )
        if seed_only is not None:
            speedup = seed_only / swarm
            lines.append(
                f"Speed-up target ({TARGET_NODES} fetchers at least {SPEEDUP_TARGET}x faster than seed-only): {speedup:.2f}x, "
                + ("met." if speedup >= SPEEDUP_TARGET else "MISSED.")
            )
    lines.append("A load average marked * was still at or above the limit when the wait for a quiet machine timed out.")
    return "\n".join(lines)


# Command line ---------------------------------------------------------------------------------------------


def node_counts_argument(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid node counts {text!r}: expected numbers such as 2,4,8") from None
    if not counts or any(not 1 <= count <= MAX_FETCHERS for count in counts):
        raise argparse.ArgumentTypeError(f"invalid node counts {text!r}: each must be from 1 to {MAX_FETCHERS}")
    return counts


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Measure how long p2pvc takes to distribute a synthetic checkpoint from one seed to N fetchers, "
            "each in its own network namespace with a capped upload, against the seed serving them all alone."
        ),
    )
    parser.add_argument("--size", type=parse_size, default=GIB, help="checkpoint size, such as 1GiB or 128MiB (default 1GiB)")
    parser.add_argument(
        "--nodes", type=node_counts_argument, default=[2, 4, 8], help="comma-separated fetcher counts, one run each (default 2,4,8)"
    )
    parser.add_argument("--rate-mibps", type=float, default=10.0, help="upload cap of every node in MiB/s (default 10)")
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="one-way delay in ms added to the frames going to each node, with netem (default 0: no delay)",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="skip the seed-only runs")
    parser.add_argument("--skip-swarm", action="store_true", help="skip the swarm runs")
    parser.add_argument(
        "--bittorrent", action="store_true", help="also distribute the checkpoint with aria2c and a tracker, for reference"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of every mode and fetcher count (default 1)")
    parser.add_argument(
        "--verify",
        choices=["one", "all", "none"],
        default="one",
        help="check the content of the last fetcher to finish, of every fetcher, or of none (default one)",
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()), help="parent of the work folder (default: the temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and its logs")
    parser.add_argument(
        "--verbose-fetch",
        action="store_true",
        help="run p2pvc fetch with --verbose, so its log names every peer that joins, is dropped or is banned, and why",
    )
    parser.add_argument(
        "--max-load", type=float, default=1.0, help="wait before each run until the 1-minute load average is below this (default 1.0)"
    )
    parser.add_argument("--load-wait", type=float, default=60.0, help="seconds to wait for that at most before running anyway (default 60)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="seconds one run of fetches may take before it fails (default: 3x the seed-only lower bound plus 120)",
    )
    parser.add_argument("--json", type=Path, help="write all raw figures and machine facts to this file")
    parser.add_argument("--role", choices=["tracker"], help=argparse.SUPPRESS)
    parser.add_argument("--listen", default="127.0.0.1", help=argparse.SUPPRESS)

    arguments = parser.parse_args(argv)
    if arguments.repeat < 1:
        parser.error("--repeat must be at least 1")
    if arguments.rate_mibps <= 0:
        parser.error("--rate-mibps must be above 0")
    if arguments.delay_ms < 0:
        parser.error("--delay-ms must be 0 or more")
    if arguments.skip_baseline and arguments.skip_swarm and not arguments.bittorrent:
        parser.error("--skip-baseline and --skip-swarm together leave nothing to measure, unless --bittorrent is given")
    return arguments


def check_tools(bittorrent: bool) -> str | None:
    """Return why this machine cannot run the benchmark, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root: run this script as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; install it with: apt-get install iproute2"
    if bittorrent and shutil.which("aria2c") is None:
        return "aria2c is not installed; install it with: apt-get install aria2, or leave out --bittorrent"
    return None


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """Turn SIGTERM into KeyboardInterrupt, so that the cleanup in `finally` blocks runs."""
    raise KeyboardInterrupt(f"received signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.role == "tracker":
        run_tracker(arguments.listen, BT_TRACKER_PORT)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    problem = check_tools(arguments.bittorrent)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    python = Path(sys.executable)
    p2pvc = python.parent / "p2pvc"
    if not p2pvc.exists():
        print(f"error: {p2pvc} not found; run this script with the virtualenv's python that has p2pvc installed", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)

    arguments.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="p2pvc-swarm-bench-", dir=arguments.workdir))
    runs: list[Run] = []
    try:
        facts = machine_facts(python)
        snapshot, commit = snapshot_p2pvc(work, python)
        facts["p2pvc_commit"] = commit
        facts["iproute2"] = subprocess.run(["ip", "-V"], capture_output=True, text=True, timeout=30).stdout.strip()
        log.info("work folder %s, measuring p2pvc at %s", work, commit[:12])
        base_env = {**os.environ, "PYTHONPATH": str(snapshot), "PYTHONUNBUFFERED": "1"}
        layout = prepare_seed(work, p2pvc, python, base_env, arguments.size, arguments.timeout or 900.0)
        modes = [mode for mode, skip in (("swarm", arguments.skip_swarm), ("seed-only", arguments.skip_baseline)) if not skip]
        for repetition in range(1, arguments.repeat + 1):
            for count in arguments.nodes:
                for mode in modes:
                    runs.append(run_once(layout, mode, count, repetition, arguments))
                if arguments.bittorrent:
                    runs.append(run_bittorrent(layout, count, repetition, arguments))
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if arguments.keep:
            log.info("kept the work folder %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    facts["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rate = int(arguments.rate_mibps * MIB)
    print(
        f"Command: `python benchmarks/swarm.py {' '.join(sys.argv[1:])}`. Run {facts['date_utc']} to {facts['finished_utc']} "
        f"on {facts['cpu']}, {facts['cores']} cores, {facts['memory_gib']} GiB, Linux {facts['kernel']}, "
        f"Python {facts['python']}, py-libp2p {facts['libp2p']}, {facts['iproute2']}; p2pvc at git {facts['p2pvc_commit'][:12]}. "
        f"Delay {arguments.delay_ms:g} ms each way; load limit {arguments.max_load}, waits of at most {arguments.load_wait:g} s.\n"
    )
    print(markdown_report(runs, arguments.nodes, layout.checkpoint_bytes, rate))
    if arguments.json:
        arguments.json.write_text(
            json.dumps(
                {
                    "machine": facts,
                    "command": [sys.executable, *sys.argv],
                    "size": arguments.size,
                    "rate_bytes_per_second": rate,
                    "delay_ms": arguments.delay_ms,
                    "runs": [asdict(run) for run in runs],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
