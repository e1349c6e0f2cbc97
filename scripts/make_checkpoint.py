"""Generate synthetic bf16 safetensors checkpoints for p2pvc's tests and benchmarks.

``base`` writes a checkpoint shaped like a decoder-only transformer (LLaMA-style
tensor names and shapes) whose weights are drawn from a normal distribution, so
its bytes compress about as little as trained bf16 weights (zstd level 3 saves
22% on a 64 MiB file). ``finetune`` copies a checkpoint and
changes the weights of about a given fraction of its tensor bytes, the way a
partial fine-tune changes the last layers and the norms. The byte count it
reports is the exact size of the replaced tensor data.

Only numpy is needed: the safetensors format is written directly. A file is an
8-byte little-endian header length, a JSON header (``__metadata__`` plus
``dtype``, ``shape`` and ``data_offsets`` per tensor, padded with spaces to a
multiple of 8 bytes), then the raw little-endian tensor bytes.

Memory stays bounded: tensors are generated and written in slices of at most
16 Mi elements (a 64 MiB float32 work buffer), whatever the file size. Writing
a 1 GiB file peaked at about 200 MB resident memory (``/usr/bin/time -v``).

Command line::

    python scripts/make_checkpoint.py base PATH --size 1GiB [--seed N]
    python scripts/make_checkpoint.py finetune SRC DST [--fraction 0.1] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

try:
    import numpy as np
    import numpy.typing as npt
except ImportError:
    raise SystemExit("make_checkpoint.py needs numpy: run  .venv/bin/pip install -e '.[bench]'") from None

BF16_BYTES = 2
HEADER_LENGTH_BYTES = 8
HEADER_ALIGNMENT = 8
# The reference implementation (huggingface/safetensors, safetensors/src/tensor.rs)
# rejects headers above 100,000,000 bytes.
MAX_HEADER_BYTES = 100_000_000

# Elements per generated slice: 16 Mi float32 values are a 64 MiB work buffer.
SLICE_ELEMENTS = 16 * 2**20

WEIGHT_STD = 0.02
# Norm weights start at 1.0 in real models and stay near it after training.
NORM_MEAN = 1.0
# Standard deviation of the fine-tune update added to each replaced weight.
# It is about 8 bf16 steps for a weight of 0.02, where one step is 2**-13.
FINETUNE_DELTA_STD = 0.001

# Shape ladder. Hidden sizes are multiples of the usual attention head size of 64.
HEAD_SIZE = 64
MAX_HIDDEN_SIZE = 16384
DEFAULT_VOCAB_SIZE = 32000
MIN_VOCAB_SIZE = 256
# Real decoder-only models have 64 to 128 hidden units per layer
# (GPT-2 small: 768 / 12, LLaMA-7B: 4096 / 32), so aim between the two.
TARGET_HIDDEN_PER_LAYER = 96

# Seed domains, so that a fine-tune's update never repeats a base's weights
# when both use the same seed.
BASE_SEED_DOMAIN = 0
FINETUNE_SEED_DOMAIN = 1

SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "kib": 2**10,
    "mb": 1000**2,
    "mib": 2**20,
    "gb": 1000**3,
    "gib": 2**30,
    "tb": 1000**4,
    "tib": 2**40,
}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and initial mean of one generated bf16 tensor."""

    name: str
    shape: tuple[int, ...]
    mean: float = 0.0

    @property
    def element_count(self) -> int:
        return math.prod(self.shape)

    @property
    def byte_count(self) -> int:
        return self.element_count * BF16_BYTES


@dataclass(frozen=True)
class TensorEntry:
    """Name, shape and byte range (relative to the data start) of one tensor in a file."""

    name: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def byte_count(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class TransformerShape:
    """Sizes of a LLaMA-style decoder-only transformer with tied input and output embeddings."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layer_count: int

    def tensor_specs(self) -> list[TensorSpec]:
        """Return the tensors in file order: embedding, each layer, final norm."""
        hidden = self.hidden_size
        intermediate = self.intermediate_size
        specs = [TensorSpec("model.embed_tokens.weight", (self.vocab_size, hidden))]
        for layer in range(self.layer_count):
            prefix = f"model.layers.{layer}"
            # PyTorch stores a Linear weight as (out_features, in_features).
            specs += [
                TensorSpec(f"{prefix}.input_layernorm.weight", (hidden,), NORM_MEAN),
                TensorSpec(f"{prefix}.self_attn.q_proj.weight", (hidden, hidden)),
                TensorSpec(f"{prefix}.self_attn.k_proj.weight", (hidden, hidden)),
                TensorSpec(f"{prefix}.self_attn.v_proj.weight", (hidden, hidden)),
                TensorSpec(f"{prefix}.self_attn.o_proj.weight", (hidden, hidden)),
                TensorSpec(f"{prefix}.post_attention_layernorm.weight", (hidden,), NORM_MEAN),
                TensorSpec(f"{prefix}.mlp.gate_proj.weight", (intermediate, hidden)),
                TensorSpec(f"{prefix}.mlp.up_proj.weight", (intermediate, hidden)),
                TensorSpec(f"{prefix}.mlp.down_proj.weight", (hidden, intermediate)),
            ]
        specs.append(TensorSpec("model.norm.weight", (hidden,), NORM_MEAN))
        return specs


def read_header(path: Path) -> dict[str, Any]:
    """Parse the JSON header of the safetensors file at ``path``, ``__metadata__`` included.

    Raises ValueError if the file is too short or the header is not a JSON object.
    """
    header, _ = _read_header_and_data_start(Path(path))
    return header


def write_checkpoint(path: Path, total_bytes: int, seed: int = 0) -> list[str]:
    """Write a random bf16 transformer checkpoint to ``path`` and return its tensor names.

    The file is at most ``total_bytes`` long. The vocabulary size absorbs the
    remainder, so the file is usually shorter by less than one embedding row
    (2 * hidden size bytes).
    With one numpy version, the same ``total_bytes`` and ``seed`` give the same bytes.
    Raises ValueError if ``total_bytes`` is too small for a one-layer model or ``seed`` is negative.
    """
    if seed < 0:
        raise ValueError(f"invalid seed {seed}: expected zero or a positive integer")
    path = Path(path)
    shape, header = _plan_checkpoint(total_bytes, seed)
    specs = shape.tensor_specs()

    # Write under a temporary name so that an interrupted run leaves no
    # truncated file at ``path`` that a later run could mistake for a checkpoint.
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("wb") as sink:
            sink.write(struct.pack("<Q", len(header)))
            sink.write(header)
            for index, spec in enumerate(specs):
                rng = np.random.default_rng([BASE_SEED_DOMAIN, seed, index])
                _write_random_tensor(sink, spec, rng)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return [spec.name for spec in specs]


def write_finetune(src: Path, dst: Path, fraction: float = 0.10, seed: int = 1) -> int:
    """Copy ``src`` to ``dst`` with about ``fraction`` of its tensor bytes changed.

    Changes every 1-D tensor (the norms), then whole tensors from the end of the
    file backwards (the last layers) until the changed bytes reach ``fraction``
    of all tensor data. Every bf16 element of a changed tensor gets a new value,
    but single bytes of it, often the sign and exponent byte, may stay the same
    (about 45% of the bytes in a test with the default update size).
    The header is copied unchanged, so all other bytes stay at the same offsets.
    Returns the byte count of the replaced tensor data.
    Raises ValueError for a fraction outside (0, 1], a negative seed, ``dst``
    naming ``src``, an invalid header, or a tensor that is not BF16.
    """
    src = Path(src)
    dst = Path(dst)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"invalid fraction {fraction}: expected a number above 0 and at most 1")
    if seed < 0:
        raise ValueError(f"invalid seed {seed}: expected zero or a positive integer")
    if dst.exists() and os.path.samefile(src, dst):
        raise ValueError(f"destination {dst} is the source file: choose another path")

    header, data_start = _read_header_and_data_start(src)
    tensors = _tensor_entries(header, src)
    selected = _select_finetuned(tensors, fraction)

    partial = dst.with_name(dst.name + ".partial")
    try:
        shutil.copyfile(src, partial)
        with partial.open("r+b") as file:
            for index, entry in enumerate(tensors):
                if entry not in selected:
                    continue
                # Seeded by position in the file, so a tensor's update is the same at any fraction.
                rng = np.random.default_rng([FINETUNE_SEED_DOMAIN, seed, index])
                _perturb_region(file, data_start + entry.begin, entry.byte_count // BF16_BYTES, rng)
        os.replace(partial, dst)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return sum(entry.byte_count for entry in selected)


def plan_transformer(parameter_budget: int) -> TransformerShape:
    """Choose transformer sizes whose parameter count is at most ``parameter_budget``.

    Picks the hidden size whose layer count gives a hidden-size-to-layer ratio
    nearest TARGET_HIDDEN_PER_LAYER, then sets the vocabulary size so that the
    parameter count falls short of the budget by less than one embedding row.
    Raises ValueError if even a one-layer model with hidden size 64 does not fit.
    """
    best: TransformerShape | None = None
    best_score = math.inf
    for hidden in range(HEAD_SIZE, MAX_HIDDEN_SIZE + 1, HEAD_SIZE):
        shape = _fit_layers(hidden, parameter_budget)
        if shape is None:
            continue
        score = abs(math.log(hidden / shape.layer_count / TARGET_HIDDEN_PER_LAYER))
        if score < best_score:
            best, best_score = shape, score
    if best is None:
        raise ValueError(f"a budget of {parameter_budget} parameters is too small for a one-layer transformer")
    return best


def parse_size(text: str) -> int:
    """Parse a byte size such as ``64MiB``, ``1.5GiB``, ``500MB`` or ``1073741824``.

    KiB, MiB, GiB and TiB are powers of 1024, and kB, MB, GB and TB are powers of 1000.
    Units are case-insensitive. Raises ValueError for anything else, including a bare ``G``.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in SIZE_UNITS:
        raise ValueError(f"invalid size {text!r}: use a byte count or a number with KiB, MiB, GiB, kB, MB or GB")
    return int(Fraction(match.group(1)) * SIZE_UNITS[unit])


def _fit_layers(hidden: int, parameter_budget: int) -> TransformerShape | None:
    # LLaMA's MLP width: two thirds of 4 * hidden, rounded up to a multiple of 256.
    intermediate = -(-(8 * hidden // 3) // 256) * 256
    layer_parameters = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    budget = parameter_budget - hidden  # the final norm

    # Small models get a smaller vocabulary, so that the embedding takes at
    # most a quarter of the parameters, leaving room for layers.
    nominal_vocab = max(MIN_VOCAB_SIZE, min(DEFAULT_VOCAB_SIZE, budget // (4 * hidden)))
    layer_count = (budget - nominal_vocab * hidden) // layer_parameters
    if layer_count < 1:
        # Below the quarter rule's reach, one layer with the smallest vocabulary may still fit.
        layer_count = (budget - MIN_VOCAB_SIZE * hidden) // layer_parameters
    if layer_count < 1:
        return None

    vocab = (budget - layer_count * layer_parameters) // hidden
    return TransformerShape(vocab, hidden, intermediate, layer_count)


def _plan_checkpoint(total_bytes: int, seed: int) -> tuple[TransformerShape, bytes]:
    """Return the shape and encoded header of a checkpoint of at most ``total_bytes``."""
    try:
        shape = plan_transformer(max(0, (total_bytes - HEADER_LENGTH_BYTES) // BF16_BYTES))
    except ValueError:
        raise ValueError(_too_small_message(total_bytes)) from None

    # The header length depends on the shapes, so shrink the vocabulary until
    # header and data fit. One pass is usually enough because the header is
    # only 100 to 120 bytes per tensor.
    while True:
        header = _encode_header(shape, seed)
        data_bytes = sum(spec.byte_count for spec in shape.tensor_specs())
        excess = HEADER_LENGTH_BYTES + len(header) + data_bytes - total_bytes
        if excess <= 0:
            return shape, header
        row_bytes = shape.hidden_size * BF16_BYTES
        vocab = shape.vocab_size - (-(-excess // row_bytes))
        if vocab < MIN_VOCAB_SIZE:
            raise ValueError(_too_small_message(total_bytes))
        shape = TransformerShape(vocab, shape.hidden_size, shape.intermediate_size, shape.layer_count)


def _too_small_message(total_bytes: int) -> str:
    smallest = TransformerShape(MIN_VOCAB_SIZE, HEAD_SIZE, 256, 1)
    data_bytes = sum(spec.byte_count for spec in smallest.tensor_specs())
    minimum = HEADER_LENGTH_BYTES + len(_encode_header(smallest, 0)) + data_bytes
    return f"size {total_bytes} bytes is too small for a one-layer transformer: use at least {minimum} bytes"


def _encode_header(shape: TransformerShape, seed: int) -> bytes:
    # Safetensors metadata values must be strings.
    metadata = {
        "format": "pt",
        "generator": "p2pvc scripts/make_checkpoint.py",
        "seed": str(seed),
        "vocab_size": str(shape.vocab_size),
        "hidden_size": str(shape.hidden_size),
        "intermediate_size": str(shape.intermediate_size),
        "num_hidden_layers": str(shape.layer_count),
    }
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for spec in shape.tensor_specs():
        end = offset + spec.byte_count
        header[spec.name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": [offset, end]}
        offset = end

    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces to keep the tensor data 8-byte aligned, as the reference
    # implementation does. JSON parsers ignore trailing spaces.
    return encoded + b" " * (-len(encoded) % HEADER_ALIGNMENT)


def _write_random_tensor(sink: BinaryIO, spec: TensorSpec, rng: np.random.Generator) -> None:
    for count in _slice_lengths(spec.element_count):
        values = rng.standard_normal(count, dtype=np.float32)
        values *= WEIGHT_STD
        values += spec.mean
        sink.write(_float32_to_bf16(values).data)


def _perturb_region(file: BinaryIO, offset: int, element_count: int, rng: np.random.Generator) -> None:
    """Add a fine-tune update to ``element_count`` bf16 values at ``offset`` of ``file``, in place."""
    position = offset
    for count in _slice_lengths(element_count):
        file.seek(position)
        old_bits = np.frombuffer(file.read(count * BF16_BYTES), dtype="<u2")
        if old_bits.size != count:
            raise ValueError(f"file ends inside the tensor data at offset {position}")

        # A bf16 value is the top half of a float32, so widening is a 16-bit shift.
        values = (old_bits.astype(np.uint32) << 16).view(np.float32)
        update = rng.standard_normal(count, dtype=np.float32)
        update *= FINETUNE_DELTA_STD
        values += update
        new_bits = _float32_to_bf16(values)

        # An update smaller than half a bf16 step rounds back to the old value.
        # Flipping the lowest mantissa bit moves it by one step, so that every
        # element of a replaced tensor changes and the reported count is exact.
        unchanged = new_bits == old_bits
        new_bits[unchanged] ^= 1

        file.seek(position)
        file.write(new_bits.data)
        position += count * BF16_BYTES


def _float32_to_bf16(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """Round float32 values to bf16 bit patterns, to nearest with ties to even.

    Overwrites ``values``. NaN inputs are not handled, because generated weights are finite.
    """
    bits = values.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit, then dropping the low 16 bits,
    # rounds to nearest and breaks ties towards an even kept part.
    rounding = bits >> 16
    rounding &= 1
    rounding += 0x7FFF
    bits += rounding
    bits >>= 16
    return bits.astype("<u2")


def _slice_lengths(element_count: int) -> Iterator[int]:
    for start in range(0, element_count, SLICE_ELEMENTS):
        yield min(SLICE_ELEMENTS, element_count - start)


def _read_header_and_data_start(path: Path) -> tuple[dict[str, Any], int]:
    with path.open("rb") as source:
        prefix = source.read(HEADER_LENGTH_BYTES)
        if len(prefix) != HEADER_LENGTH_BYTES:
            raise ValueError(f"{path} is not a safetensors file: shorter than {HEADER_LENGTH_BYTES} bytes")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > MAX_HEADER_BYTES:
            raise ValueError(
                f"{path} is not a safetensors file: header length {header_length} is above {MAX_HEADER_BYTES} bytes"
            )
        encoded = source.read(header_length)
    if len(encoded) != header_length:
        raise ValueError(f"{path} is truncated: header needs {header_length} bytes, found {len(encoded)}")

    try:
        header = json.loads(encoded)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} has an invalid safetensors header: {error}") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path} has an invalid safetensors header: expected a JSON object")
    return header, HEADER_LENGTH_BYTES + header_length


def _tensor_entries(header: dict[str, Any], path: Path) -> list[TensorEntry]:
    """Return the tensors of ``header`` in data order, checking that all are BF16."""
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(f"tensor {name} in {path} has an invalid entry: expected dtype, shape and data_offsets")
        if info["dtype"] != "BF16":
            raise ValueError(f"tensor {name} in {path} has dtype {info['dtype']}: only BF16 is supported")
        begin, end = info["data_offsets"]
        entries.append(TensorEntry(name, tuple(info["shape"]), begin, end))
    entries.sort(key=lambda entry: entry.begin)
    return entries


def _select_finetuned(tensors: list[TensorEntry], fraction: float) -> set[TensorEntry]:
    """Select every 1-D tensor (the norms), then tensors from the end of the file.

    Stops adding tensors once the selection reaches ``fraction`` of all tensor bytes.
    """
    target = fraction * sum(entry.byte_count for entry in tensors)
    selected = [entry for entry in tensors if len(entry.shape) == 1]
    selected_bytes = sum(entry.byte_count for entry in selected)

    for entry in reversed(tensors):
        if selected_bytes >= target:
            break
        if len(entry.shape) != 1:
            selected.append(entry)
            selected_bytes += entry.byte_count
    return set(selected)


def _seed_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: expected an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid seed {text}: expected zero or a positive integer")
    return value


def _size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _fraction_argument(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid fraction {text!r}: expected a number such as 0.1") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"invalid fraction {text}: expected a number above 0 and at most 1")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate synthetic bf16 safetensors checkpoints shaped like a decoder-only transformer.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    base = commands.add_parser(
        "base",
        help="write a random checkpoint of a given size",
        description="Write a random bf16 checkpoint of at most --size bytes to PATH, replacing PATH if it exists.",
    )
    base.add_argument("path", type=Path, metavar="PATH", help="checkpoint file to write")
    base.add_argument(
        "--size",
        type=_size_argument,
        required=True,
        help="file size in bytes, or with a unit: 64MiB, 1GiB (powers of 1024) or 500MB (powers of 1000)",
    )
    base.add_argument("--seed", type=_seed_argument, default=0, help="random seed (default: 0)")

    finetune = commands.add_parser(
        "finetune",
        help="copy a checkpoint with part of its weights changed",
        description=(
            "Copy SRC to DST with new values in the norms and the last tensors, which together make up "
            "about --fraction of the tensor bytes, and print the byte count of the replaced tensor data."
        ),
    )
    finetune.add_argument("src", type=Path, metavar="SRC", help="BF16 safetensors checkpoint to start from")
    finetune.add_argument("dst", type=Path, metavar="DST", help="checkpoint file to write")
    finetune.add_argument(
        "--fraction",
        type=_fraction_argument,
        default=0.10,
        help="share of the tensor bytes to change, above 0 and at most 1 (default: 0.1)",
    )
    finetune.add_argument("--seed", type=_seed_argument, default=1, help="random seed of the update (default: 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code: 0 on success, 1 on failure, 2 for bad usage."""
    parser = _build_parser()
    args = parser.parse_args(argv)

    # Report arguments that cannot work as usage errors (exit 2) before writing anything.
    if args.command == "base":
        try:
            _plan_checkpoint(args.size, args.seed)
        except ValueError as error:
            parser.error(str(error))
    elif args.src.exists() and args.dst.exists() and os.path.samefile(args.src, args.dst):
        parser.error(f"DST {args.dst} is the same file as SRC: choose another path")

    try:
        if args.command == "base":
            names = write_checkpoint(args.path, args.size, args.seed)
            metadata = read_header(args.path)["__metadata__"]
            print(
                f"{args.path}: {args.path.stat().st_size} bytes, {len(names)} tensors "
                f"(num_hidden_layers={metadata['num_hidden_layers']}, hidden_size={metadata['hidden_size']}, "
                f"vocab_size={metadata['vocab_size']})"
            )
        else:
            print(write_finetune(args.src, args.dst, args.fraction, args.seed))
    except OSError as error:
        # OSError's own text repeats the errno ("[Errno 2] ..."), which adds nothing here.
        print(f"error: {error.filename or args.command}: {error.strerror or error}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
