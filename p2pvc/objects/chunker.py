"""Content-defined chunking with FastCDC.

The chunk parameters are part of the repository format: two peers that chunk
the same bytes must cut them in the same places, or nothing dedupes. Never
change them without a format version bump.

Boundaries do not depend on the read-buffer size: pyfastcdc's stream chunker
refills its buffer to at least `MAX_CHUNK` bytes (or end of file) before every
cut, and a cut looks at no more than `MAX_CHUNK` bytes past the chunk start.
Memory stays at about two maximal chunks whatever the file size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from pyfastcdc import FastCDC

MIN_CHUNK = 16 * 1024  # bytes
AVG_CHUNK = 64 * 1024  # bytes; pyfastcdc's real mean is about AVG + MIN
MAX_CHUNK = 256 * 1024  # bytes

_CDC = FastCDC(AVG_CHUNK, min_size=MIN_CHUNK, max_size=MAX_CHUNK, normalized_chunking=1)


def iter_chunks(file: BinaryIO) -> Iterator[memoryview]:
    """Yield the chunks of `file` from its current position to its end.

    Each memoryview is valid only until the next iteration; copy it to keep it.
    """
    for chunk in _CDC.cut_stream(file):
        yield chunk.data


def chunk_bytes(data: bytes | memoryview) -> list[memoryview]:
    """Cut an in-memory buffer; gives the same boundaries as `iter_chunks`."""
    return [chunk.data for chunk in _CDC.cut_buf(data)]


def first_chunk(window: bytes | memoryview) -> memoryview:
    """Return the first chunk of `window`, which must hold MAX_CHUNK bytes unless it reaches end of file."""
    return next(iter(_CDC.cut_buf(window))).data
