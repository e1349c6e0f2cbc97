#!/usr/bin/env python3
"""Lower bounds for the local repository's steps: the least work a verifying tool must do.

Any tool that stores a file by content and checks what it restores has to
read and hash every byte, whatever else it does. These two commands do only
that, with the fewest imports (blake3 alone) and every CPU busy, so their
times are floors for p2pvc's steps on the same machine:

    hash FILE       BLAKE3 of FILE on every CPU. A commit of a changed file
                    must at least hash all of it to learn which bytes changed.
    copy SRC DST    copy SRC to a new file DST in the kernel (copy_file_range,
                    as cp does) while a second thread hashes SRC. A commit of
                    a new file must at least store and hash it; a verified
                    checkout must at least write and hash it.

Neither chunks, compresses, indexes nor fsyncs, so a real tool cannot beat
them. benchmarks/local_repo.py times both in every repetition beside cp.
"""

from __future__ import annotations

import os
import sys
import threading

import blake3

COPY_STEP = 64 * 1024 * 1024  # bytes per copy_file_range call


def hash_file(path: str, threads: int) -> str:
    hasher = blake3.blake3(max_threads=threads)
    hasher.update_mmap(path)
    return hasher.hexdigest()


def copy_file(source: str, target: str) -> None:
    with open(source, "rb") as src, open(target, "xb") as dst:
        remaining = os.fstat(src.fileno()).st_size
        while remaining > 0:
            copied = os.copy_file_range(src.fileno(), dst.fileno(), min(remaining, COPY_STEP))
            if copied == 0:
                raise OSError(f"copying {source} failed: the file ended {remaining} bytes early")
            remaining -= copied


def copy_and_hash(source: str, target: str) -> str:
    digest: list[str] = []
    hasher = threading.Thread(target=lambda: digest.append(hash_file(source, 1)))
    hasher.start()
    copy_file(source, target)
    hasher.join()
    return digest[0]


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "hash":
        print(hash_file(argv[1], os.cpu_count() or 1))
    elif len(argv) == 3 and argv[0] == "copy":
        print(copy_and_hash(argv[1], argv[2]))
    else:
        print("usage: floor.py hash FILE | floor.py copy SRC DST", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
