#!/usr/bin/env python3
"""Benchmark p2pvc sync of a 1 GiB checkpoint between two processes on 127.0.0.1.

What is measured, in one run, with every ratio taken against a baseline from
the same repetition:

1. Throughput. One `p2pvc serve` process serves a commit of a synthetic bf16
   safetensors checkpoint (scripts/make_checkpoint.py, default 1 GiB), and one
   `p2pvc sync` process in a replica that lacks it fetches it. The baseline is
   one bare libp2p stream (TCP, Noise, Yamux) between two processes carrying
   the same number of bytes, from benchmarks/libp2p_stream.py, run right before
   the sync. The baseline counts no process start-up, so the sync's transfer
   time is its wall time minus the wall time of a sync that finds nothing new
   (the median of two, run against the same server right after). The same
   subtraction gives the CPU seconds per GiB of the client and of the server
   (from /proc/PID/stat). Target: content MiB/s at least 0.6x the baseline.
2. Transfer of a fine-tune. The server commits a fine-tune with about 10% of
   its tensor bytes changed, and the replica syncs it. The bytes transferred
   (`bytes_fetched` of `p2pvc sync --json`, and the growth of the replica's
   packs) are divided by the changed bytes that make_checkpoint reports.
   Target: at most 1.15x. For reference, `rsync --no-whole-file` copies the
   same fine-tune between two local folders that hold the two versions, and
   its `--stats` totals are divided the same way.

Why: a replica of a model repository mostly moves checkpoints, so sync has to
run close to what the transport carries, and a fine-tune has to move about
its changed bytes and no more.

p2pvc is measured as committed at HEAD when the run starts. The script
extracts that p2pvc/ into the work folder and puts it first on PYTHONPATH of
every p2pvc process and of the libp2p baseline. So edits that others make
during the run do not change what is measured.

The machine may be shared, so before each measurement the script waits (at
most --load-wait seconds) until the 1-minute load average is below
--max-load, and records the load average with each figure. Every process it
starts runs under a timeout and is stopped by pid (SIGTERM, then SIGKILL).
All traffic stays on 127.0.0.1. The work folder is deleted at the end unless
--keep is given.

Run `python benchmarks/sync.py --help` for the options. Progress goes to
stderr, Markdown tables to stdout, and all raw figures to the --json file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import libp2p_stream  # noqa: E402  (benchmarks/ is on sys.path when this file runs as a script)
from make_checkpoint import parse_size  # noqa: E402

log = logging.getLogger("bench.sync")

GIB = 1024**3
MIB = 1024**2

THROUGHPUT_TARGET = 0.6
"""Minimum sync content throughput as a fraction of the bare libp2p stream's."""

TRANSFER_TARGET = 1.15
"""Maximum bytes transferred for a fine-tune as a multiple of its changed bytes."""

SERVE_START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
"""Seconds a process gets after SIGTERM before it is killed."""

LOAD_POLL_S = 5.0
LOAD_LOG_INTERVAL_S = 60.0
NO_OP_SYNCS = 2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchmarkError(Exception):
    """A step of the benchmark failed; the message names the step and the cause."""


# Processes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessResult:
    """Outcome of one finished command: wall and CPU time (user plus system) and its output."""

    command: list[str]
    returncode: int
    seconds: float
    cpu_seconds: float
    stdout: str
    stderr: str


def run_command(command: Sequence[str], cwd: Path, env: dict[str, str], timeout: float) -> ProcessResult:
    """Run `command` to completion and return its wall time, CPU time and output.

    CPU time comes from wait4's resource usage of the child, so it covers all
    its threads and nothing else. The child is killed after `timeout` seconds
    and BenchmarkError is raised. A non-zero exit status also raises
    BenchmarkError, with the end of stderr.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
        # wait4 reaped the child, so Popen must not wait for it again.
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = ProcessResult(
            list(command),
            process.returncode,
            seconds,
            usage.ru_utime + usage.ru_stime,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )
    if result.returncode == -signal.SIGKILL and seconds >= timeout:
        raise BenchmarkError(f"{' '.join(command)} timed out after {timeout:g} s and was killed")
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise BenchmarkError(f"{' '.join(command)} failed with exit status {result.returncode}: {tail}")
    return result


def process_cpu_seconds(pid: int) -> float:
    """Return user plus system CPU seconds of a running process, all threads, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name in brackets may contain spaces, so split after its closing bracket.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def stop_process(process: subprocess.Popen[Any], name: str) -> None:
    """Stop a process started by this script: SIGTERM, then SIGKILL after STOP_TIMEOUT_S."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) did not stop within %g s after SIGTERM, killing it", name, process.pid, STOP_TIMEOUT_S)
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


@dataclass
class Server:
    """A running `p2pvc serve` process and the address it listens on."""

    process: subprocess.Popen[bytes]
    address: str
    log_path: Path

    @property
    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)


LISTENING = re.compile(r"^listening on (/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)$", re.MULTILINE)


@contextlib.contextmanager
def serving(
    p2pvc: Path, folder: Path, env: dict[str, str], log_path: Path, *extra: str, port: int = 0
) -> Iterator[Server]:
    """Run `p2pvc serve` on 127.0.0.1 in `folder` for the duration of the block.

    Port 0 lets the server pick a free port. Waits until the server prints its
    address. Stops it with SIGTERM (then SIGKILL) when the block ends, also on
    errors. `extra` are more arguments to `p2pvc serve`.
    """
    command = [str(p2pvc), "serve", "--listen", "127.0.0.1", "--port", str(port), *extra]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while True:
            match = LISTENING.search(log_path.read_text(errors="replace"))
            if match:
                break
            if process.poll() is not None:
                raise BenchmarkError(f"p2pvc serve in {folder} exited with {process.returncode}: {log_path.read_text()}")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"p2pvc serve in {folder} printed no address within {SERVE_START_TIMEOUT_S:g} s")
            time.sleep(0.05)
        yield Server(process, match.group(1), log_path)
    finally:
        stop_process(process, f"p2pvc serve in {folder}")


# Machine load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadReading:
    """1-minute load average when a measurement started, and how long it waited for it."""

    load: float
    waited_s: float
    below_limit: bool


def wait_for_quiet_machine(max_load: float, max_wait_s: float) -> LoadReading:
    """Wait until the 1-minute load average is below `max_load`, for at most `max_wait_s` seconds.

    Returns the load average when the wait ended. After `max_wait_s` the
    measurement goes ahead, and the reading records that the limit was not met.
    """
    started = time.monotonic()
    next_log = started
    while True:
        load = os.getloadavg()[0]
        now = time.monotonic()
        waited = now - started
        if load < max_load:
            return LoadReading(load, waited, True)
        if waited >= max_wait_s:
            log.warning("load average still %.2f after %.0f s of waiting; measuring anyway", load, waited)
            return LoadReading(load, waited, False)
        if now >= next_log:
            log.info("load average %.2f is not below %.2f yet; waiting (%.0f s so far)", load, max_load, waited)
            next_log = now + LOAD_LOG_INTERVAL_S
        time.sleep(min(LOAD_POLL_S, max_wait_s - waited))


# Setup -----------------------------------------------------------------------------------------------


def snapshot_p2pvc(work: Path, python: Path) -> tuple[Path, str]:
    """Extract p2pvc/ as committed at HEAD into `work` and return its folder and the commit id.

    Raises BenchmarkError if git cannot export it or `python` would not import the snapshot.
    """
    commit = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    root = work / "p2pvc-snapshot"
    root.mkdir()
    archive = work / "p2pvc-snapshot.tar"
    subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", "-o", str(archive), commit, "p2pvc"], check=True
    )
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    archive.unlink()
    # Compiled now, so that no timed command pays for compiling the snapshot's modules.
    subprocess.run([str(python), "-m", "compileall", "-q", str(root)], check=True)
    env = {**os.environ, "PYTHONPATH": str(root)}
    # Run from `work`: `python -c` puts the current folder first on sys.path, and in the
    # repository root that would import the working tree's p2pvc/ instead.
    imported = subprocess.run(
        [str(python), "-c", "import p2pvc; print(p2pvc.__file__)"], cwd=work, capture_output=True, text=True, env=env, check=True
    ).stdout.strip()
    if not Path(imported).is_relative_to(root):
        raise BenchmarkError(f"p2pvc was imported from {imported} instead of the snapshot in {root}")
    return root, commit


def machine_facts(python: Path) -> dict[str, Any]:
    """Describe the machine and the software versions for the results page."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])

    def version(command: list[str]) -> str:
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        lines = result.stdout.strip().splitlines()
        return lines[0] if result.returncode == 0 and lines else "unknown"

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024**2, 1),
        "kernel": platform.release(),
        "python": version([str(python), "-c", "import sys; print(sys.version.split()[0])"]),
        "libp2p": version([str(python), "-c", "import importlib.metadata as m; print(m.version('libp2p'))"]),
        "rsync": version(["rsync", "--version"]),
    }


def make_checkpoints(python: Path, folder: Path, size: int, fraction: float, timeout: float) -> tuple[Path, Path, int]:
    """Write the base checkpoint and its fine-tune; return both paths and the changed byte count."""
    script = REPO_ROOT / "scripts" / "make_checkpoint.py"
    v1 = folder / "v1.safetensors"
    v2 = folder / "v2.safetensors"
    env = dict(os.environ)
    run_command([str(python), str(script), "base", str(v1), "--size", str(size)], folder, env, timeout)
    result = run_command([str(python), str(script), "finetune", str(v1), str(v2), "--fraction", str(fraction)], folder, env, timeout)
    changed = int(result.stdout.strip().splitlines()[-1])
    return v1, v2, changed


@dataclass
class Layout:
    """Folders and environments of one benchmark run."""

    work: Path
    p2pvc: Path
    server_env: dict[str, str]
    client_env: dict[str, str]
    server_template: Path
    client_template: Path
    v1: Path
    v2: Path
    changed_bytes: int
    timeout: float


def prepare_repositories(layout: Layout) -> None:
    """Create the server repository (a small first commit, then v1) and a replica made before v1.

    The replica is cloned while the server has only the small commit, so each
    repetition's sync of v1 moves the whole checkpoint. The server's working
    tree keeps only README.md afterwards, so a copy of the template is cheap.
    """
    server, client = layout.server_template, layout.client_template
    server.mkdir()
    (server / "README.md").write_text("p2pvc sync benchmark\n")
    run_command([str(layout.p2pvc), "init"], server, layout.server_env, layout.timeout)
    run_command([str(layout.p2pvc), "commit", "-m", "start"], server, layout.server_env, layout.timeout)
    with serving(layout.p2pvc, server, layout.server_env, layout.work / "serve-template.log") as running:
        run_command([str(layout.p2pvc), "clone", running.address, str(client)], layout.work, layout.client_env, layout.timeout)
    os.link(layout.v1, server / "model.safetensors")
    run_command([str(layout.p2pvc), "commit", "-m", "v1"], server, layout.server_env, layout.timeout)
    (server / "model.safetensors").unlink()


def pack_bytes(repository: Path) -> int:
    """Return the total size of a repository's pack files."""
    return sum(path.stat().st_size for path in (repository / ".p2pvc" / "packs").glob("*.pack"))


def file_sha256(path: Path) -> str:
    with path.open("rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


# One repetition -----------------------------------------------------------------------------------------


@dataclass
class SyncMeasurement:
    """One `p2pvc sync` against the server: client and server wall and CPU time, and what it fetched."""

    load: LoadReading
    seconds: float
    client_cpu_seconds: float
    server_cpu_seconds: float
    bytes_fetched: int
    chunks_fetched: int
    updates_applied: int


@dataclass
class RsyncMeasurement:
    load: LoadReading
    seconds: float
    total_bytes_sent: int
    total_bytes_received: int
    literal_data: int
    matched_data: int
    command: list[str]


@dataclass
class Repetition:
    """All figures of one repetition."""

    baseline_load: LoadReading
    baseline: dict[str, Any]
    content_bytes: int
    full: SyncMeasurement
    no_op: list[SyncMeasurement]
    finetune: SyncMeasurement
    pack_growth: int
    rsync: RsyncMeasurement
    verified: bool
    derived: dict[str, float] = field(default_factory=dict)


def timed_sync(layout: Layout, client: Path, server: Server, load: LoadReading) -> SyncMeasurement:
    """Run `p2pvc sync --json --no-checkout ADDRESS` in `client` and measure both sides."""
    server_cpu_before = server.cpu_seconds
    result = run_command(
        [str(layout.p2pvc), "sync", "--json", "--no-checkout", server.address], client, layout.client_env, layout.timeout
    )
    server_cpu = server.cpu_seconds - server_cpu_before
    report = json.loads(result.stdout)
    peers = report["peers"]
    if report["unreachable"] or len(peers) != 1 or peers[0]["error"]:
        raise BenchmarkError(f"p2pvc sync in {client} did not complete: {result.stdout}")
    pulled = peers[0]["pulled"]
    if pulled["incomplete"] or pulled["rejected"]:
        raise BenchmarkError(f"p2pvc sync in {client} left refs incomplete or rejected updates: {result.stdout}")
    return SyncMeasurement(
        load=load,
        seconds=result.seconds,
        client_cpu_seconds=result.cpu_seconds,
        server_cpu_seconds=server_cpu,
        bytes_fetched=pulled["bytes_fetched"],
        chunks_fetched=pulled["chunks_fetched"],
        updates_applied=pulled["updates_applied"],
    )


RSYNC_FIGURES = {
    "total_bytes_sent": re.compile(r"^Total bytes sent: ([\d,]+)", re.MULTILINE),
    "total_bytes_received": re.compile(r"^Total bytes received: ([\d,]+)", re.MULTILINE),
    "literal_data": re.compile(r"^Literal data: ([\d,]+)", re.MULTILINE),
    "matched_data": re.compile(r"^Matched data: ([\d,]+)", re.MULTILINE),
}


def run_rsync(layout: Layout, folder: Path, arguments: argparse.Namespace) -> RsyncMeasurement:
    """Copy v2 over a copy of v1 with `rsync --no-whole-file` between two local folders and parse --stats."""
    source, destination = folder / "source", folder / "destination"
    source.mkdir()
    destination.mkdir()
    os.link(layout.v2, source / "model.safetensors")
    shutil.copyfile(layout.v1, destination / "model.safetensors")
    # --ignore-times: compare the file even if size and modification time happen to match.
    command = ["rsync", "-a", "--no-whole-file", "--ignore-times", "--stats", f"{source}/", f"{destination}/"]
    subprocess.run(["sync"], check=True)
    load = wait_for_quiet_machine(arguments.max_load, arguments.load_wait)
    result = run_command(command, folder, dict(os.environ), layout.timeout)
    figures: dict[str, int] = {}
    for name, pattern in RSYNC_FIGURES.items():
        match = pattern.search(result.stdout)
        if match is None:
            raise BenchmarkError(f"rsync --stats printed no {name.replace('_', ' ')}: {result.stdout}")
        figures[name] = int(match.group(1).replace(",", ""))
    if file_sha256(destination / "model.safetensors") != file_sha256(layout.v2):
        raise BenchmarkError("rsync's copy of the fine-tune differs from the fine-tune")
    return RsyncMeasurement(load=load, seconds=result.seconds, command=command, **figures)


def run_repetition(layout: Layout, index: int, arguments: argparse.Namespace, snapshot: Path) -> Repetition:
    """Measure the baseline, the sync of v1, no-op syncs, the sync of v2 and rsync once each."""
    folder = layout.work / f"repetition-{index}"
    folder.mkdir()
    server_dir, client_dir = folder / "server", folder / "client"
    log.info("repetition %d: copying the server and replica templates", index)
    shutil.copytree(layout.server_template, server_dir)
    shutil.copytree(layout.client_template, client_dir)
    content_bytes = layout.v1.stat().st_size
    try:
        with serving(layout.p2pvc, server_dir, layout.server_env, folder / "serve.log", "--anti-entropy", "3600") as server:
            subprocess.run(["sync"], check=True)

            baseline_load = wait_for_quiet_machine(arguments.max_load, arguments.load_wait)
            log.info("repetition %d: bare libp2p stream, %d bytes (load %.2f)", index, content_bytes, baseline_load.load)
            # measure() gives its processes PYTHONPATH=REPOSITORY: point it at the snapshot.
            libp2p_stream.REPOSITORY = snapshot
            stream = libp2p_stream.measure(content_bytes)
            baseline = {**asdict(stream), "mib_per_second": stream.mib_per_second}

            load = wait_for_quiet_machine(arguments.max_load, arguments.load_wait)
            log.info("repetition %d: p2pvc sync of v1 (load %.2f)", index, load.load)
            full = timed_sync(layout, client_dir, server, load)
            if full.updates_applied != 1:
                raise BenchmarkError(f"the sync of v1 applied {full.updates_applied} ref updates instead of 1")

            no_op = []
            for _ in range(NO_OP_SYNCS):
                no_op.append(timed_sync(layout, client_dir, server, LoadReading(os.getloadavg()[0], 0.0, True)))
                if no_op[-1].bytes_fetched:
                    raise BenchmarkError("a sync that should find nothing new fetched data")

            log.info("repetition %d: committing the fine-tune on the serving node", index)
            os.link(layout.v2, server_dir / "model.safetensors")
            run_command([str(layout.p2pvc), "commit", "-m", "fine-tune"], server_dir, layout.server_env, layout.timeout)
            packs_before = pack_bytes(client_dir)
            subprocess.run(["sync"], check=True)
            load = wait_for_quiet_machine(arguments.max_load, arguments.load_wait)
            log.info("repetition %d: p2pvc sync of the fine-tune (load %.2f)", index, load.load)
            finetune = timed_sync(layout, client_dir, server, load)
            pack_growth = pack_bytes(client_dir) - packs_before

        verified = False
        if not arguments.no_verify:
            log.info("repetition %d: checking out the fine-tune in the replica and comparing it", index)
            run_command([str(layout.p2pvc), "checkout", "--force", "main"], client_dir, layout.client_env, layout.timeout)
            if file_sha256(client_dir / "model.safetensors") != file_sha256(layout.v2):
                raise BenchmarkError("the replica's checkout of the fine-tune differs from the fine-tune")
            verified = True
        shutil.rmtree(server_dir)
        shutil.rmtree(client_dir)

        log.info("repetition %d: rsync --no-whole-file", index)
        rsync = run_rsync(layout, folder, arguments)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    repetition = Repetition(baseline_load, baseline, content_bytes, full, no_op, finetune, pack_growth, rsync, verified)
    repetition.derived = derive(repetition, layout.changed_bytes)
    return repetition


def derive(repetition: Repetition, changed_bytes: int) -> dict[str, float]:
    """Compute the reported figures of one repetition from its raw measurements."""
    full, no_op = repetition.full, repetition.no_op
    overhead_s = statistics.median(m.seconds for m in no_op)
    overhead_client_cpu = statistics.median(m.client_cpu_seconds for m in no_op)
    overhead_server_cpu = statistics.median(m.server_cpu_seconds for m in no_op)
    transfer_s = full.seconds - overhead_s
    gib = repetition.content_bytes / GIB
    content_mib_s = repetition.content_bytes / MIB / transfer_s
    baseline_mib_s = repetition.baseline["mib_per_second"]
    rsync = repetition.rsync
    return {
        "baseline_mib_s": baseline_mib_s,
        "baseline_sender_cpu_s_per_gib": repetition.baseline["sender"]["cpu_seconds"] / (repetition.baseline["total_bytes"] / GIB),
        "baseline_receiver_cpu_s_per_gib": repetition.baseline["receiver"]["cpu_seconds"] / (repetition.baseline["total_bytes"] / GIB),
        "sync_seconds": full.seconds,
        "no_op_sync_seconds": overhead_s,
        "transfer_seconds": transfer_s,
        "content_mib_s": content_mib_s,
        "content_mib_s_end_to_end": repetition.content_bytes / MIB / full.seconds,
        "wire_mib_s": full.bytes_fetched / MIB / transfer_s,
        "throughput_ratio": content_mib_s / baseline_mib_s,
        "throughput_ratio_end_to_end": repetition.content_bytes / MIB / full.seconds / baseline_mib_s,
        "client_cpu_s_per_gib": (full.client_cpu_seconds - overhead_client_cpu) / gib,
        "server_cpu_s_per_gib": (full.server_cpu_seconds - overhead_server_cpu) / gib,
        "no_op_client_cpu_s": overhead_client_cpu,
        "no_op_server_cpu_s": overhead_server_cpu,
        "finetune_sync_seconds": repetition.finetune.seconds,
        "finetune_bytes_fetched_ratio": repetition.finetune.bytes_fetched / changed_bytes,
        "finetune_pack_growth_ratio": repetition.pack_growth / changed_bytes,
        "rsync_total_ratio": (rsync.total_bytes_sent + rsync.total_bytes_received) / changed_bytes,
        "rsync_literal_ratio": rsync.literal_data / changed_bytes,
    }


# Report -------------------------------------------------------------------------------------------


def spread(values: Sequence[float], digits: int = 2) -> str:
    """Format the median and the range of `values`: "median (min-max)"."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def load_text(reading: LoadReading) -> str:
    return f"{reading.load:.2f}" + ("" if reading.below_limit else "*")


def markdown_report(repetitions: list[Repetition], changed_bytes: int, content_bytes: int) -> str:
    """Return the results as Markdown tables: one row per repetition, then the median and range."""
    lines = [
        f"Sync of v1 ({content_bytes} bytes of content) from `p2pvc serve` to `p2pvc sync`, against one bare "
        "libp2p stream of the same size. Transfer time is the sync's wall time minus that of a sync that "
        "finds nothing new; CPU seconds per GiB subtract the same no-op sync.",
        "",
        "| repetition | load (stream) | stream MiB/s | load (sync) | sync s | no-op sync s | content MiB/s "
        "| ratio | end-to-end ratio | client CPU s/GiB | server CPU s/GiB | stream sender / receiver CPU s/GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, repetition in enumerate(repetitions, 1):
        d = repetition.derived
        lines.append(
            f"| {index} | {load_text(repetition.baseline_load)} | {d['baseline_mib_s']:.1f} | {load_text(repetition.full.load)} "
            f"| {d['sync_seconds']:.2f} | {d['no_op_sync_seconds']:.2f} | {d['content_mib_s']:.1f} "
            f"| {d['throughput_ratio']:.2f} | {d['throughput_ratio_end_to_end']:.2f} | {d['client_cpu_s_per_gib']:.2f} "
            f"| {d['server_cpu_s_per_gib']:.2f} | {d['baseline_sender_cpu_s_per_gib']:.2f} / {d['baseline_receiver_cpu_s_per_gib']:.2f} |"
        )

    def column(key: str) -> list[float]:
        return [r.derived[key] for r in repetitions]

    lines.append(
        f"| median (min–max) | | {spread(column('baseline_mib_s'), 1)} | | {spread(column('sync_seconds'))} "
        f"| {spread(column('no_op_sync_seconds'))} | {spread(column('content_mib_s'), 1)} | {spread(column('throughput_ratio'))} "
        f"| {spread(column('throughput_ratio_end_to_end'))} | {spread(column('client_cpu_s_per_gib'))} "
        f"| {spread(column('server_cpu_s_per_gib'))} | {spread(column('baseline_sender_cpu_s_per_gib'))} / "
        f"{spread(column('baseline_receiver_cpu_s_per_gib'))} |"
    )
    lines += [
        "",
        f"Fine-tune: {changed_bytes} bytes of tensor data changed (make_checkpoint). p2pvc bytes are `bytes_fetched` "
        "of `p2pvc sync --json` and the growth of the replica's packs; rsync bytes are from `--stats`.",
        "",
        "| repetition | load (sync) | sync s | bytes fetched | ratio | pack growth | ratio | load (rsync) | rsync s "
        "| rsync sent + received | ratio | rsync literal data | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, repetition in enumerate(repetitions, 1):
        d, rsync = repetition.derived, repetition.rsync
        lines.append(
            f"| {index} | {load_text(repetition.finetune.load)} | {d['finetune_sync_seconds']:.2f} "
            f"| {repetition.finetune.bytes_fetched} | {d['finetune_bytes_fetched_ratio']:.3f} | {repetition.pack_growth} "
            f"| {d['finetune_pack_growth_ratio']:.3f} | {load_text(rsync.load)} | {rsync.seconds:.2f} "
            f"| {rsync.total_bytes_sent} + {rsync.total_bytes_received} | {d['rsync_total_ratio']:.3f} "
            f"| {rsync.literal_data} | {d['rsync_literal_ratio']:.3f} |"
        )
    lines.append(
        f"| median (min–max) | | {spread(column('finetune_sync_seconds'))} | | {spread(column('finetune_bytes_fetched_ratio'), 3)} "
        f"| | {spread(column('finetune_pack_growth_ratio'), 3)} | | | | {spread(column('rsync_total_ratio'), 3)} "
        f"| | {spread(column('rsync_literal_ratio'), 3)} |"
    )
    throughput = statistics.median(column("throughput_ratio"))
    transfer = statistics.median(column("finetune_bytes_fetched_ratio"))
    growth = statistics.median(column("finetune_pack_growth_ratio"))
    lines += [
        "",
        f"Throughput target (at least {THROUGHPUT_TARGET}x the bare stream): median {throughput:.2f}x, "
        + ("met." if throughput >= THROUGHPUT_TARGET else "MISSED."),
        f"Fine-tune transfer target (at most {TRANSFER_TARGET}x the changed bytes): median {transfer:.3f}x fetched, "
        f"{growth:.3f}x pack growth, " + ("met." if max(transfer, growth) <= TRANSFER_TARGET else "MISSED."),
        "",
        "A load average marked * was still at or above the limit when the wait for a quiet machine timed out.",
    ]
    return "\n".join(lines)


def machine_text(facts: dict[str, Any], arguments: argparse.Namespace) -> str:
    """Describe the run in one paragraph: command, date, machine and versions."""
    command = " ".join(["python", "benchmarks/sync.py", *sys.argv[1:]])
    return (
        f"Command: `{command}`. Run {facts['date_utc']} to {facts['finished_utc']} on {facts['cpu']}, "
        f"{facts['cores']} cores, {facts['memory_gib']} GiB, Linux {facts['kernel']}, Python {facts['python']}, "
        f"py-libp2p {facts['libp2p']}, {facts['rsync']}; p2pvc at git {facts['p2pvc_commit'][:12]}. "
        f"Load limit {arguments.max_load}, waits of at most {arguments.load_wait:g} s."
    )


# Command line ------------------------------------------------------------------------------------------


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Measure p2pvc sync of a synthetic checkpoint between a serve and a sync process on 127.0.0.1, "
            "against a bare libp2p stream, and the bytes a fine-tune moves, against rsync --no-whole-file."
        ),
    )
    parser.add_argument("--size", type=parse_size, default=GIB, help="checkpoint size, such as 1GiB or 256MiB (default 1GiB)")
    parser.add_argument(
        "--fraction", type=float, default=0.1, help="share of tensor bytes the fine-tune changes (default 0.1)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of every measurement (default 3)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()), help="parent of the work folder (default: the temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and its logs")
    parser.add_argument(
        "--max-load", type=float, default=1.0, help="wait before each measurement until the 1-minute load average is below this (default 1.0)"
    )
    parser.add_argument(
        "--load-wait", type=float, default=600.0, help="seconds to wait for that at most before measuring anyway (default 600)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds any single command may run before it is killed (default 900)")
    parser.add_argument("--no-verify", action="store_true", help="skip the check that the replica's checkout equals the fine-tune")
    parser.add_argument("--json", type=Path, help="write all raw figures and machine facts to this file")

    arguments = parser.parse_args(argv)
    if arguments.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not 0.0 < arguments.fraction <= 1.0:
        parser.error("--fraction must be above 0 and at most 1")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if shutil.which("rsync") is None:
        print("error: rsync is not installed; install it with: apt-get install rsync", file=sys.stderr)
        return 2
    python = Path(sys.executable)
    p2pvc = python.parent / "p2pvc"
    if not p2pvc.exists():
        print(f"error: {p2pvc} not found; run this script with the virtualenv's python that has p2pvc installed", file=sys.stderr)
        return 2

    arguments.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="p2pvc-sync-bench-", dir=arguments.workdir))
    try:
        facts = machine_facts(python)
        snapshot, commit = snapshot_p2pvc(work, python)
        facts["p2pvc_commit"] = commit
        log.info("work folder %s, measuring p2pvc at %s", work, commit[:12])
        base_env = {**os.environ, "PYTHONPATH": str(snapshot), "PYTHONUNBUFFERED": "1"}
        log.info("writing the checkpoints (%d bytes, fine-tune fraction %g)", arguments.size, arguments.fraction)
        v1, v2, changed = make_checkpoints(python, work, arguments.size, arguments.fraction, arguments.timeout)
        layout = Layout(
            work=work,
            p2pvc=p2pvc,
            server_env={**base_env, "P2PVC_HOME": str(work / "home-server")},
            client_env={**base_env, "P2PVC_HOME": str(work / "home-client")},
            server_template=work / "server-template",
            client_template=work / "client-template",
            v1=v1,
            v2=v2,
            changed_bytes=changed,
            timeout=arguments.timeout,
        )
        log.info("preparing the server repository and the replica")
        prepare_repositories(layout)
        repetitions = [run_repetition(layout, index, arguments, snapshot) for index in range(1, arguments.repeat + 1)]
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if arguments.keep:
            log.info("kept the work folder %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    facts["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(machine_text(facts, arguments))
    print()
    print(markdown_report(repetitions, changed, repetitions[0].content_bytes))
    if arguments.json:
        arguments.json.write_text(
            json.dumps(
                {
                    "machine": facts,
                    "command": [sys.executable, *sys.argv],
                    "size": arguments.size,
                    "changed_bytes": changed,
                    "repetitions": [asdict(r) for r in repetitions],
                },
                indent=2,
            )
        )
    log.info("done: %s", json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
