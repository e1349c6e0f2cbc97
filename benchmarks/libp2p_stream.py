"""Throughput of one bare libp2p stream (TCP + Noise + Yamux) between two processes on 127.0.0.1.

This is the baseline for sync throughput: the most that one stream of
`p2pvc.net.host` carries, with no framing, hashing or storage.

Usage: python benchmarks/libp2p_stream.py [--total-mib 1024] [--write-kib 256] [--read-kib 1024] [--runs 1] [--json]

Each run starts a receiver process and a sender process. The sender
connects, opens one stream, writes `--total-mib` MiB in writes of
`--write-kib` KiB, and closes its side. The receiver reads until the end of
the stream, `--read-kib` KiB at most per read, and replies with a 2-byte
acknowledgement, which the sender waits for. Each process measures its wall time and CPU time
(`time.process_time()`, user plus system, all threads) from the stream
being open to the acknowledgement, so start-up and the libp2p import are
not counted. The table also shows the 1-minute load average before each
run: on a machine that other work keeps busy, MiB/s drops while CPU
seconds per GiB stay about the same.

For other code, `measure(total_bytes, write_size, read_size)` runs one
measurement and returns a `StreamMeasurement`. It blocks until both
processes exit, so trio code should call it through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

GIB = 1024**3
MIB = 1024**2
PROTOCOL_ID = "/p2pvc-bench/stream/1"
ACK = b"ok"
PROCESS_TIMEOUT = 600.0
"""Seconds one run may take before both processes are killed."""

REPOSITORY = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SideResult:
    """Measurement of one process, from the stream opening to the acknowledgement."""

    bytes: int
    seconds: float
    cpu_seconds: float


@dataclass(frozen=True)
class StreamMeasurement:
    total_bytes: int
    write_size: int
    read_size: int
    load_average: float
    """1-minute load average of the machine just before the run."""
    sender: SideResult
    receiver: SideResult

    @property
    def mib_per_second(self) -> float:
        """Throughput measured by the sender, over all bytes written and acknowledged."""
        return self.total_bytes / MIB / self.sender.seconds

    @property
    def sender_cpu_seconds_per_gib(self) -> float:
        return self.sender.cpu_seconds / (self.total_bytes / GIB)

    @property
    def receiver_cpu_seconds_per_gib(self) -> float:
        return self.receiver.cpu_seconds / (self.total_bytes / GIB)


async def run_receiver(read_size: int, report_address: trio.MemorySendChannel[str] | None = None) -> SideResult:
    """Receive one stream on 127.0.0.1, acknowledge its end and return the measurement.

    Reads at most `read_size` bytes per call. Sends the listen address on
    `report_address`, or prints it as a JSON line when that is None.
    """
    from p2pvc.net.host import open_host  # imports libp2p, about 0.7 s

    done = trio.Event()
    results: list[SideResult] = []

    async def receive(stream) -> None:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        cpu_started = time.process_time()
        received = 0
        while True:
            try:
                chunk = await stream.read(read_size)
            except EOFError:  # libp2p's StreamEOF
                break
            if not chunk:
                break
            received += len(chunk)
        await stream.write(ACK)
        results.append(SideResult(received, time.perf_counter() - started, time.process_time() - cpu_started))
        done.set()

    async with open_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"]) as host:
        host.set_handler(PROTOCOL_ID, receive)
        address = str(host.listen_addrs[0])
        if report_address is not None:
            await report_address.send(address)
        else:
            print(json.dumps({"address": address}), flush=True)
        await done.wait()
    return results[0]


async def run_sender(address: str, total_bytes: int, write_size: int) -> SideResult:
    """Send `total_bytes` to the receiver at `address` in writes of `write_size` and return the measurement."""
    from p2pvc.net.host import open_host  # imports libp2p, about 0.7 s

    block = os.urandom(write_size)
    async with open_host(os.urandom(32), None) as host:
        peer_id = await host.connect(address)
        stream = await host.open_stream(peer_id, PROTOCOL_ID)
        started = time.perf_counter()
        cpu_started = time.process_time()
        sent = 0
        while sent < total_bytes:
            piece = block if total_bytes - sent >= write_size else block[: total_bytes - sent]
            await stream.write(piece)
            sent += len(piece)
        await stream.close()
        ack = await stream.read(len(ACK))
        result = SideResult(sent, time.perf_counter() - started, time.process_time() - cpu_started)
    if ack != ACK:
        raise RuntimeError(f"receiver {address} sent {ack!r} instead of the acknowledgement {ACK!r}")
    return result


def _side_command(*arguments: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *arguments]


def _read_json_line(process: subprocess.Popen[str], role: str) -> dict[str, object]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"benchmark {role} process {process.pid} exited without output")
    data: dict[str, object] = json.loads(line)
    return data


def measure(total_bytes: int = GIB, write_size: int = 256 * 1024, read_size: int = 1024 * 1024) -> StreamMeasurement:
    """Run one receiver and one sender process and return their measurements.

    Both processes are killed if the run takes over PROCESS_TIMEOUT seconds or fails.
    """
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    load_average = os.getloadavg()[0]
    receiver = subprocess.Popen(
        _side_command("--role", "receiver", "--read-size", str(read_size)), stdout=subprocess.PIPE, text=True, env=env
    )
    sender: subprocess.Popen[str] | None = None
    try:
        address = str(_read_json_line(receiver, "receiver")["address"])
        sender = subprocess.Popen(
            _side_command(
                "--role", "sender", "--address", address, "--total-bytes", str(total_bytes), "--write-size", str(write_size)
            ),
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        sender_out, _ = sender.communicate(timeout=PROCESS_TIMEOUT)
        receiver_out, _ = receiver.communicate(timeout=10)
        if sender.returncode != 0 or receiver.returncode != 0:
            raise RuntimeError(
                f"benchmark processes failed: sender exit code {sender.returncode}, "
                f"receiver exit code {receiver.returncode}"
            )
        return StreamMeasurement(
            total_bytes=total_bytes,
            write_size=write_size,
            read_size=read_size,
            load_average=load_average,
            sender=SideResult(**json.loads(sender_out.strip().splitlines()[-1])),
            receiver=SideResult(**json.loads(receiver_out.strip().splitlines()[-1])),
        )
    finally:
        for process in (sender, receiver):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def _run_side(arguments: argparse.Namespace) -> None:
    if arguments.role == "receiver":
        result = trio.run(run_receiver, arguments.read_size)
    else:
        result = trio.run(run_sender, arguments.address, arguments.total_bytes, arguments.write_size)
    print(json.dumps(asdict(result)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-mib", type=int, default=1024, help="MiB to send per run (default 1024)")
    parser.add_argument("--write-kib", type=int, default=256, help="KiB per stream write (default 256)")
    parser.add_argument("--read-kib", type=int, default=1024, help="KiB per stream read at most (default 1024)")
    parser.add_argument("--runs", type=int, default=1, help="number of runs (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run instead of a table")
    parser.add_argument("--role", choices=["receiver", "sender"], help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--total-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--write-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--read-size", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()

    if arguments.role:
        _run_side(arguments)
        return

    if not arguments.json:
        print(f"{'run':>3}  {'MiB/s':>7}  {'sender CPU s/GiB':>16}  {'receiver CPU s/GiB':>18}  {'seconds':>7}  {'load':>5}")
    for run in range(1, arguments.runs + 1):
        result = measure(arguments.total_mib * MIB, arguments.write_kib * 1024, arguments.read_kib * 1024)
        if arguments.json:
            print(json.dumps({**asdict(result), "mib_per_second": result.mib_per_second}))
        else:
            print(
                f"{run:>3}  {result.mib_per_second:>7.1f}  {result.sender_cpu_seconds_per_gib:>16.2f}  "
                f"{result.receiver_cpu_seconds_per_gib:>18.2f}  {result.sender.seconds:>7.2f}  {result.load_average:>5.2f}"
            )


if __name__ == "__main__":
    main()
