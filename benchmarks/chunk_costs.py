#!/usr/bin/env python3
"""Time each per-chunk step of commit and checkout on one CPU, per chunk and per GiB.

The steps are p2pvc's own functions: the FastCDC cut, the BLAKE3 chunk id,
zstd compression as commit does it (`compress.encode` without the sample
test) and decompression with verification as checkout does it. Each runs
on the chunks of one slice of a file in this process, and the best of
`--repeat` runs counts. The figures show where the CPU time of a 1 GiB
commit or checkout goes, and what two cores can do at best.

    python benchmarks/chunk_costs.py CHECKPOINT [--bytes 256MiB] [--repeat 3]

Make a checkpoint with `python scripts/make_checkpoint.py base --size 1GiB ckpt.safetensors`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from p2pvc.objects import compress  # noqa: E402
from p2pvc.objects.chunker import chunk_bytes  # noqa: E402
from p2pvc.objects.ids import chunk_id  # noqa: E402

GIB = 1024**3
UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_size(text: str) -> int:
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def best_time(step: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="file to chunk, usually a bf16 safetensors checkpoint")
    parser.add_argument("--bytes", default="256MiB", help="bytes to read from the middle of the file (default: 256MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each step; the best counts (default: 3)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    size = args.file.stat().st_size
    length = min(parse_size(args.bytes), size)
    with args.file.open("rb") as f:
        f.seek((size - length) // 2)
        data = f.read(length)

    chunks = chunk_bytes(data)
    encoded = [compress.encode(c, sample=False) for c in chunks]
    stored = sum(len(e[1]) for e in encoded)
    ids = [chunk_id(c) for c in chunks]

    def decode_and_verify() -> None:
        for (codec, body), raw, expected in zip(encoded, chunks, ids):
            if chunk_id(compress.decode(codec, body, len(raw))) != expected:
                raise SystemExit("error: a chunk decoded to bytes that do not match its id")

    steps = {
        "cut (FastCDC)": lambda: chunk_bytes(data),
        "id (BLAKE3)": lambda: [chunk_id(c) for c in chunks],
        "compress (zstd)": lambda: [compress.encode(c, sample=False) for c in chunks],
        "decompress + verify": decode_and_verify,
    }
    results = {}
    print(f"{len(chunks)} chunks, mean {length / len(chunks) / 1024:.1f} KiB, stored/raw {stored / length:.3f}")
    print("| step | us per chunk | s per GiB |")
    print("| --- | ---: | ---: |")
    for name, step in steps.items():
        seconds = best_time(step, args.repeat)
        per_chunk_us = seconds / len(chunks) * 1e6
        per_gib = seconds * GIB / length
        results[name] = {"us_per_chunk": per_chunk_us, "s_per_gib": per_gib}
        print(f"| {name} | {per_chunk_us:.1f} | {per_gib:.3f} |")
    if args.json:
        report = {"file": str(args.file), "bytes": length, "chunks": len(chunks), "stored_over_raw": stored / length}
        args.json.write_text(json.dumps(dict(report, steps=results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
