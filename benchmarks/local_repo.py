#!/usr/bin/env python3
"""Benchmark p2pvc's local repository commands against `cp`, DVC and git-lfs.

What is measured, all on one machine in one run, with every file in one work
folder on one disk:

- Baseline: `cp` of a synthetic bf16 safetensors checkpoint (default 1 GiB,
  from scripts/make_checkpoint.py) to a new file, and `cp` followed by
  `sync FILE` (an fsync of the copy). p2pvc fsyncs its packs and `cp` does not,
  so both are shown, but every ratio divides by the plain `cp` median, because
  p2pvc's targets are defined against plain `cp`.
- Floors (benchmarks/floor.py): BLAKE3 of the checkpoint on every CPU, and a
  kernel copy of it while another thread hashes it. They show how close a
  target is to the least work a verifying tool must do on this machine.
- For each tool, these steps: init. Commit of the new checkpoint (v1). Commit
  of a fine-tune with about 10% of its tensor bytes changed (v2), and how much
  the store grew for it. Checkout of v2 into an empty folder from a copy of
  the store, and clone (store copy plus checkout). Status of an unchanged tree
  that contains the checkpoint and a copy of the Python standard library
  source, and status of the fresh checkout.
- The peak RSS of each command (from GNU time, so it is the largest process
  of the command's process tree), and whether p2pvc commands that need no
  network import libp2p or trio (`python -X importtime`).

Why: most of p2pvc's targets are ratios to `cp` on the same disk. Commit of a
new checkpoint may take at most 1.0x, commit of a fine-tune at most 0.3x and
checkout at most 1.2x, and the store may grow by at most 1.15x the changed
bytes. Status of an unchanged tree must take under 0.3 s. DVC and git-lfs are
measured the same way as points of reference.

p2pvc is measured as committed at HEAD when the run starts: the script
extracts that p2pvc/ into the work folder and puts it first on PYTHONPATH,
so commits that others make during the run do not change what is measured.

Every timed command starts after `sync`, so write-back of the setup's files
does not land inside a measurement. Page caches are not dropped (that needs
root and disturbs other users of the machine), so inputs are usually in the
page cache. The script records the resident fraction of the files each step
reads (util-linux `fincore`).

Run `python benchmarks/local_repo.py --help` for the options. Progress goes to
stderr, the results table (Markdown) to stdout, and all raw timings to the
file named by --json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("local_repo")

REPO_ROOT = Path(__file__).resolve().parent.parent
MAKE_CHECKPOINT = REPO_ROOT / "scripts" / "make_checkpoint.py"
REAL_INPUTS = REPO_ROOT / "scripts" / "real_inputs.py"
FLOOR = REPO_ROOT / "benchmarks" / "floor.py"

ALL_TOOLS = ("p2pvc", "dvc", "git-lfs")
# Pinned so that runs on different days compare the same DVC.
DVC_REQUIREMENT = "dvc==3.67.1"
BENCH_CACHE = Path("~/.cache/p2pvc-bench")
# GNU time (Debian package `time`) measures each command's peak RSS, in KiB.
GNU_TIME = Path("/usr/bin/time")

# p2pvc's stat cache ignores a row recorded less than 1 s after the file's
# mtime or ctime (git has a similar racy-entry rule), because a file system
# with coarse timestamps cannot tell two writes within one tick apart. The
# benchmark waits this long between writing files and committing them, and
# between committing and timing status, so the caches can be trusted.
STAT_CACHE_WAIT_S = 1.1

# Names of the timed steps, in the order they run.
STEP_CP = "cp"
STEP_CP_SYNC = "cp + sync"
STEP_FLOOR_HASH = "floor: hash"
STEP_FLOOR_COPY = "floor: copy + hash"
STEP_INIT = "init"
STEP_COMMIT_V1 = "commit v1"
STEP_COMMIT_V2 = "commit v2"
STEP_CHECKOUT = "checkout v2"
STEP_CLONE = "clone v2"
STEP_STATUS = "status"
STEP_STATUS_AFTER_CHECKOUT = "status after checkout"
STEP_ORDER = (
    STEP_CP,
    STEP_CP_SYNC,
    STEP_FLOOR_HASH,
    STEP_FLOOR_COPY,
    STEP_INIT,
    STEP_COMMIT_V1,
    STEP_COMMIT_V2,
    STEP_CHECKOUT,
    STEP_CLONE,
    STEP_STATUS,
    STEP_STATUS_AFTER_CHECKOUT,
)

# p2pvc's targets. A "ratio" target limits the step's median over the same
# run's plain cp median, and a "seconds" target limits the median itself.
TARGETS: dict[tuple[str, str], tuple[str, float]] = {
    ("p2pvc", STEP_COMMIT_V1): ("ratio", 1.0),
    ("p2pvc", STEP_COMMIT_V2): ("ratio", 0.3),
    ("p2pvc", STEP_CHECKOUT): ("ratio", 1.2),
    ("p2pvc", STEP_STATUS): ("seconds", 0.3),
}
# Maximum of p2pvc's store growth for v2 over the tensor bytes the fine-tune changed.
STORE_GROWTH_TARGET = 1.15

# p2pvc commands checked for network imports: none of them needs the network.
OFFLINE_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("status",),
    ("diff",),
    ("log", "-n", "1"),
    ("stats",),
    ("checkout", "-f", "main"),
    ("commit", "--allow-empty", "-m", "import check"),
)
NETWORK_PACKAGES = ("libp2p", "trio")


class BenchmarkError(Exception):
    """Error for a command that failed, timed out or left a wrong result."""


class ToolUnavailable(Exception):
    """Error for a tool that is missing and could not be installed."""


@dataclass
class CommandResult:
    """Wall time, peak RSS and output of one finished command."""

    args: list[str]
    seconds: float
    peak_rss_kib: int
    stdout: str
    stderr: str


@dataclass
class Sample:
    """Timing of one step in one repetition, summed over the step's commands."""

    tool: str
    step: str
    repetition: int
    seconds: float
    peak_rss_kib: int
    # Share of the bytes the step reads that were in the page cache just before it ran.
    resident_fraction: float | None
    # The machine's 1-minute load average just after the step, which shows other work running at the same time.
    load_average: float
    commands: list[dict[str, Any]]


@dataclass
class StoreSize:
    """Apparent bytes of a tool's store after the first and second commit."""

    tool: str
    repetition: int
    after_v1_bytes: int
    after_v2_bytes: int
    # The new-bytes figure the tool printed for v2, where it prints one.
    reported_new_bytes: int | None = None

    @property
    def growth_bytes(self) -> int:
        return self.after_v2_bytes - self.after_v1_bytes


@dataclass
class Inputs:
    """The files every repetition starts from, all inside the work folder."""

    base: Path
    checkpoint_bytes: int
    finetune: Path
    # Tensor bytes that the fine-tune replaced, as printed by make_checkpoint.py.
    changed_bytes: int
    code: Path
    code_files: int
    code_bytes: int


@dataclass
class Run:
    """Settings, environment and everything measured in one benchmark run."""

    work: Path
    env: dict[str, str]
    timeout: float
    samples: list[Sample] = field(default_factory=list)
    stores: list[StoreSize] = field(default_factory=list)
    # Network packages and import time per p2pvc command, from check_offline_imports.
    imports: dict[str, Any] = field(default_factory=dict)

    # Running commands ----------------------------------------------------------

    def run(
        self,
        args: Sequence[str | Path],
        cwd: Path,
        *,
        extra_env: dict[str, str] | None = None,
    ) -> CommandResult:
        """Run one command, raising BenchmarkError unless it exits with 0."""
        env = dict(self.env, **(extra_env or {}))
        return run_command([str(a) for a in args], cwd, env, self.timeout)

    def measure(
        self,
        tool: str,
        step: str,
        repetition: int,
        commands: Sequence[Sequence[str | Path]],
        cwd: Path,
        reads: Iterable[Path] = (),
        extra_env: dict[str, str] | None = None,
    ) -> list[CommandResult]:
        """Time ``commands`` one after another as one step and record the sample."""
        results, resident = self.time_commands(commands, cwd, reads, extra_env)
        self.record(tool, step, repetition, results, resident)
        return results

    def time_commands(
        self,
        commands: Sequence[Sequence[str | Path]],
        cwd: Path,
        reads: Iterable[Path] = (),
        extra_env: dict[str, str] | None = None,
    ) -> tuple[list[CommandResult], float | None]:
        """Run ``commands`` after a sync and return their results and the resident share of ``reads``."""
        # Flush the setup's dirty pages first, so their write-back is not timed.
        os.sync()
        resident = resident_fraction(list(reads))
        return [self.run(command, cwd, extra_env=extra_env) for command in commands], resident

    def record(
        self,
        tool: str,
        step: str,
        repetition: int,
        results: Sequence[CommandResult],
        resident: float | None,
    ) -> Sample:
        sample = Sample(
            tool=tool,
            step=step,
            repetition=repetition,
            seconds=sum(r.seconds for r in results),
            peak_rss_kib=max(r.peak_rss_kib for r in results),
            resident_fraction=resident,
            load_average=os.getloadavg()[0],
            commands=[{"args": r.args, "seconds": r.seconds, "peak_rss_kib": r.peak_rss_kib} for r in results],
        )
        self.samples.append(sample)
        logger.info("  %-8s %-22s %8.3f s  peak RSS %6.0f MiB", tool, step, sample.seconds, sample.peak_rss_kib / 1024)
        return sample


def run_command(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> CommandResult:
    """Run ``args`` in its own process group and return its wall time and peak RSS.

    The peak RSS comes from GNU time (``/usr/bin/time -f %M``), which reports
    the maximum over the command and every descendant it waited for. GNU time
    is needed because a child forked from this Python process starts with
    Python's resident set, and Linux keeps that in the child's maximum across
    exec. A command still running after ``timeout`` seconds is killed with its
    process group. Raises BenchmarkError on a non-zero exit or a timeout.
    """
    temporary_dir = env.get("TMPDIR")
    with (
        tempfile.TemporaryFile(dir=temporary_dir) as out,
        tempfile.TemporaryFile(dir=temporary_dir) as err,
        tempfile.NamedTemporaryFile(dir=temporary_dir, mode="r", suffix=".rss") as rss_file,
    ):
        timed_out = threading.Event()
        start = time.perf_counter()
        process = subprocess.Popen(
            [str(GNU_TIME), "-f", "%M", "-o", rss_file.name, "--", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )

        def kill_on_timeout() -> None:
            timed_out.set()
            _kill_group(process.pid)

        timer = threading.Timer(timeout, kill_on_timeout)
        timer.start()
        try:
            process.wait()
        except BaseException:
            # On Ctrl-C or another error while waiting, end the command before leaving.
            _kill_group(process.pid)
            process.wait()
            raise
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start

        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
        # GNU time writes "Command exited with non-zero status N" before the figure on failure.
        rss_text = _last_line(rss_file.read())

    command_text = shlex.join(args)
    if timed_out.is_set():
        raise BenchmarkError(f"{command_text} (in {cwd}) timed out after {timeout:.0f} s")
    if process.returncode != 0:
        raise BenchmarkError(
            f"{command_text} (in {cwd}) failed with exit code {process.returncode}: {_last_line(stderr or stdout)}"
        )
    if not rss_text.isdigit():
        raise BenchmarkError(f"{GNU_TIME} wrote no peak RSS for {command_text}: {rss_text!r}")
    return CommandResult(args, seconds, int(rss_text), stdout, stderr)


def _kill_group(pid: int) -> None:
    # The command runs in its own session, so its process group id is its pid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# Measuring files ---------------------------------------------------------------


def files_under(paths: Iterable[Path]) -> list[Path]:
    """Return the regular files among ``paths`` and inside the folders among them."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            found += [p for p in sorted(path.rglob("*")) if p.is_file() and not p.is_symlink()]
        elif path.is_file():
            found.append(path)
    return found


def apparent_bytes(folders: Iterable[Path]) -> int:
    """Return the apparent size of the files in ``folders``, counting each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in files_under(folders):
        info = path.lstat()
        key = (info.st_dev, info.st_ino)
        if key not in seen:
            seen.add(key)
            total += info.st_size
    return total


def resident_fraction(paths: list[Path]) -> float | None:
    """Return the share of the bytes of ``paths`` that is in the page cache, or None if unknown."""
    files = files_under(paths)
    if not files or shutil.which("fincore") is None:
        return None
    resident = 0
    size = 0
    # fincore takes many files at once, and batches keep the command line short.
    for begin in range(0, len(files), 500):
        batch = [str(p) for p in files[begin : begin + 500]]
        result = subprocess.run(
            ["fincore", "--bytes", "--raw", "--noheadings", "--output", "RES,SIZE", *batch],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            return None
        for line in result.stdout.splitlines():
            res_text, size_text = line.split()
            resident += int(res_text)
            size += int(size_text)
    # fincore counts whole pages, so a file whose size is not a page multiple can show slightly over 100%.
    return min(1.0, resident / size) if size else None


def same_content(first: Path, second: Path) -> bool:
    """Return whether two files have the same bytes (``cmp``, not timed)."""
    result = subprocess.run(["cmp", "-s", str(first), str(second)], timeout=600, check=False)
    return result.returncode == 0


def replace_file(source: Path, target: Path) -> None:
    """Copy ``source`` over ``target`` by writing a sibling and renaming it, as a training job saves."""
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def copy_tree(source: Path, target: Path) -> None:
    """Copy the contents of folder ``source`` into folder ``target``, creating it if missing."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(copy_tree_command(source, target), check=True, timeout=600)


def copy_tree_command(source: Path, target: Path) -> list[str | Path]:
    # "source/." copies the contents, so the result is the same whether or not target exists.
    return ["cp", "-a", f"{source}/.", target]


# Inputs and machine facts --------------------------------------------------------------


def prepare_inputs(run: Run, python: Path, size: str) -> Inputs:
    """Generate the two checkpoints and copy the standard library source into the work folder."""
    inputs = run.work / "inputs"
    inputs.mkdir()
    base = inputs / "base.safetensors"
    finetune = inputs / "finetune.safetensors"

    logger.info("generating a %s checkpoint with %s", size, MAKE_CHECKPOINT.name)
    run.run([python, MAKE_CHECKPOINT, "base", base, "--size", size], run.work)
    logger.info("generating the fine-tuned checkpoint")
    output = run.run([python, MAKE_CHECKPOINT, "finetune", base, finetune], run.work).stdout
    changed_bytes = int(output.strip())

    logger.info("fetching the real code input (scripts/real_inputs.py cached('code'))")
    fetch = (
        f"import sys; sys.path.insert(0, {str(REAL_INPUTS.parent)!r}); "
        "import real_inputs; print(real_inputs.cached('code'))"
    )
    cached_code = Path(run.run([python, "-c", fetch], run.work).stdout.strip())
    # A copy inside the work folder, so every file the tools read is on the same disk.
    code = inputs / "code"
    copy_tree(cached_code, code)
    code_files = files_under([code])
    return Inputs(
        base=base,
        checkpoint_bytes=base.stat().st_size,
        finetune=finetune,
        changed_bytes=changed_bytes,
        code=code,
        code_files=len(code_files),
        code_bytes=sum(p.stat().st_size for p in code_files),
    )


def machine_facts(work: Path) -> dict[str, Any]:
    """Return CPU, memory, kernel and the work folder's file system."""
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    filesystem = subprocess.run(
        ["findmnt", "--noheadings", "--output", "FSTYPE,SOURCE,OPTIONS", "--target", str(work)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(memory_kib / 2**20, 1),
        "kernel": platform.release(),
        "hostname": platform.node(),
        "work_folder": str(work),
        "work_filesystem": filesystem,
        "load_average_at_start": os.getloadavg(),
    }


def tool_version(args: Sequence[str | Path], env: dict[str, str]) -> str:
    """Return the first output line of a version command, or "unknown" if it fails."""
    try:
        result = subprocess.run(
            [str(a) for a in args], capture_output=True, text=True, env=env, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0].strip() if result.returncode == 0 and lines else "unknown"


def snapshot_p2pvc(run: Run, python: Path) -> str:
    """Extract p2pvc/ as committed at HEAD into the work folder and put it first on PYTHONPATH.

    Other people may commit to this checkout while a run takes minutes, so the
    run measures one fixed version: the committed package at the start, without
    uncommitted edits. This only works when ``python`` imports p2pvc from this
    checkout (an editable install). Otherwise the installed package is measured
    as it is. Returns a description of the version measured. Raises
    BenchmarkError if git cannot export the package or the snapshot is not the
    one imported.
    """
    package = tool_version([python, "-c", "import importlib.metadata as m; print(m.version('p2pvc'))"], run.env)
    imported = Path(run.run([python, "-c", "import p2pvc; print(p2pvc.__file__)"], run.work).stdout.strip())
    if not imported.is_relative_to(REPO_ROOT / "p2pvc"):
        return f"{package} installed at {imported.parent}"

    commit = run.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], run.work).stdout.strip()
    snapshot = run.work / "p2pvc-snapshot"
    snapshot.mkdir()
    archive = run.work / "p2pvc-snapshot.tar"
    run.run(["git", "-C", REPO_ROOT, "archive", "--format=tar", "-o", archive, commit, "p2pvc"], run.work)
    with tarfile.open(archive) as tar:
        tar.extractall(snapshot, filter="data")
    archive.unlink()
    # Compiled now, so that no timed command pays for compiling the snapshot's modules.
    run.run([python, "-m", "compileall", "-q", snapshot], run.work)

    run.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(snapshot), run.env.get("PYTHONPATH")]))
    imported = Path(run.run([python, "-c", "import p2pvc; print(p2pvc.__file__)"], run.work).stdout.strip())
    if not imported.is_relative_to(snapshot):
        raise BenchmarkError(f"p2pvc was imported from {imported} instead of the snapshot in {snapshot}")
    return f"{package} (git {commit[:12]}, committed p2pvc/ at the start of the run)"


# Installing DVC and git-lfs ---------------------------------------------------------------


def ensure_dvc(timeout: float) -> Path:
    """Return the dvc executable of the benchmark's own virtualenv, installing DVC there if missing.

    Raises ToolUnavailable with pip's last output line if the install fails.
    """
    venv = BENCH_CACHE.expanduser() / "dvc-venv"
    dvc = venv / "bin" / "dvc"
    if dvc.is_file() and tool_version([dvc, "--version"], dict(os.environ, DVC_NO_ANALYTICS="1")) != "unknown":
        return dvc

    logger.info("installing %s into %s", DVC_REQUIREMENT, venv)
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            DVC_REQUIREMENT,
        ],
    ]
    for args in steps:
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            shutil.rmtree(venv, ignore_errors=True)
            raise ToolUnavailable(f"{shlex.join(args)} timed out after {timeout:.0f} s") from None
        if result.returncode != 0:
            # A half-built virtualenv would pass the check above next time, so remove it.
            shutil.rmtree(venv, ignore_errors=True)
            raise ToolUnavailable(f"{shlex.join(args)} failed: {_last_line(result.stderr or result.stdout)}")
    return dvc


def ensure_git_lfs(timeout: float) -> None:
    """Install Debian's git-lfs package if `git lfs` is missing. Raises ToolUnavailable if that fails."""
    if tool_version(["git", "lfs", "version"], dict(os.environ)) != "unknown":
        return
    if os.geteuid() != 0:
        raise ToolUnavailable("git-lfs is not installed and installing it with apt-get needs root")
    if shutil.which("apt-get") is None:
        raise ToolUnavailable("git-lfs is not installed and apt-get was not found")

    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "git-lfs"]

    def attempt(args: list[str]) -> subprocess.CompletedProcess[str]:
        logger.info("running %s", shlex.join(args))
        try:
            return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise ToolUnavailable(f"{shlex.join(args)} timed out after {timeout:.0f} s") from None

    result = attempt(install)
    if result.returncode != 0:
        # The package lists may be missing or stale, so refresh them once and retry.
        update = attempt(["apt-get", "update", "-q"])
        if update.returncode != 0:
            raise ToolUnavailable(f"apt-get update failed: {_last_line(update.stderr or update.stdout)}")
        result = attempt(install)
    if result.returncode != 0:
        raise ToolUnavailable(f"apt-get install git-lfs failed: {_last_line(result.stderr or result.stdout)}")


# The three tools ---------------------------------------------------------------------------


@dataclass
class Repetition:
    """Working tree and clone folders of one repetition of one tool."""

    root: Path
    worktree: Path
    clone: Path

    @classmethod
    def create(cls, parent: Path, tool: str, index: int) -> Repetition:
        root = parent / f"{tool}-{index}"
        worktree = root / "worktree"
        worktree.mkdir(parents=True)
        return cls(root, worktree, root / "clone")


def check_checkout(clone: Path, inputs: Inputs) -> None:
    checked_out = clone / "model.safetensors"
    if not same_content(checked_out, inputs.finetune):
        raise BenchmarkError(f"{checked_out} after checkout differs from the fine-tuned checkpoint {inputs.finetune}")


def bench_p2pvc(run: Run, inputs: Inputs, repetition: int, *, p2pvc: Path) -> None:
    """Time p2pvc's init, two commits, checkout, clone and status in fresh folders."""
    tool = "p2pvc"
    folders = Repetition.create(run.work / "repetitions", tool, repetition)
    worktree = folders.worktree
    store = worktree / ".p2pvc"
    model = worktree / "model.safetensors"

    run.measure(tool, STEP_INIT, repetition, [[p2pvc, "init"]], worktree)
    shutil.copyfile(inputs.base, model)
    run.measure(tool, STEP_COMMIT_V1, repetition, [[p2pvc, "commit", "-m", "v1"]], worktree, reads=[model])
    after_v1 = apparent_bytes([store])

    replace_file(inputs.finetune, model)
    (result,) = run.measure(
        tool, STEP_COMMIT_V2, repetition, [[p2pvc, "commit", "-m", "v2", "--json"]], worktree, reads=[model]
    )
    reported = int(json.loads(result.stdout)["new_bytes"])
    run.stores.append(StoreSize(tool, repetition, after_v1, apparent_bytes([store]), reported))

    # A second working tree: copy the store (the clone), then check out its branch.
    folders.clone.mkdir()
    copy_step, copy_resident = run.time_commands(
        [copy_tree_command(store, folders.clone / ".p2pvc")], worktree, [store]
    )
    (checkout,) = run.measure(
        tool,
        STEP_CHECKOUT,
        repetition,
        [[p2pvc, "checkout", "-f", "main"]],
        folders.clone,
        reads=[folders.clone / ".p2pvc"],
    )
    run.record(tool, STEP_CLONE, repetition, [*copy_step, checkout], copy_resident)
    check_checkout(folders.clone, inputs)

    time.sleep(STAT_CACHE_WAIT_S)
    (status,) = run.measure(
        tool,
        STEP_STATUS_AFTER_CHECKOUT,
        repetition,
        [[p2pvc, "status", "--json"]],
        folders.clone,
        reads=[folders.clone / "model.safetensors"],
    )
    _check_p2pvc_clean(status, folders.clone)

    _add_code_and_wait(inputs, worktree, lambda: run.run([p2pvc, "commit", "-m", "add code"], worktree))
    (status,) = run.measure(tool, STEP_STATUS, repetition, [[p2pvc, "status", "--json"]], worktree, reads=[model])
    _check_p2pvc_clean(status, worktree)

    if repetition == 0:
        check_offline_imports(run, p2pvc, worktree)
    shutil.rmtree(folders.root)


def _check_p2pvc_clean(status: CommandResult, worktree: Path) -> None:
    changes = json.loads(status.stdout)["changes"]
    if changes:
        raise BenchmarkError(
            f"p2pvc status in {worktree} reported {len(changes)} change(s) in an unchanged tree: {changes[:3]}"
        )


def _add_code_and_wait(inputs: Inputs, worktree: Path, commit: Callable[[], object]) -> None:
    """Add the code folder, commit it after the stat-cache wait, then wait again before status."""
    copy_tree(inputs.code, worktree / "code")
    time.sleep(STAT_CACHE_WAIT_S)
    commit()
    time.sleep(STAT_CACHE_WAIT_S)


def check_offline_imports(run: Run, p2pvc: Path, worktree: Path) -> dict[str, Any]:
    """Run p2pvc commands under ``python -X importtime`` and list the network packages they import.

    Returns, per command, the imported top-level network packages and the total
    import time in milliseconds. The result is also stored on ``run``.
    """
    python = _script_interpreter(p2pvc)
    report: dict[str, Any] = {}
    for command in OFFLINE_COMMANDS:
        result = run.run([python, "-X", "importtime", p2pvc, *command], worktree)
        imported: set[str] = set()
        total_us = 0
        for line in result.stderr.splitlines():
            if not line.startswith("import time:") or "|" not in line:
                continue
            _, cumulative, name = line.split("|", 2)
            if not cumulative.strip().isdigit():
                continue  # the column header line
            module = name.strip()
            if name.startswith(" ") and not name.startswith("  "):
                # One leading space marks a module imported at top level.
                total_us += int(cumulative)
            top = module.split(".", 1)[0]
            if top in NETWORK_PACKAGES:
                imported.add(top)
        report[" ".join(command)] = {"network_packages": sorted(imported), "import_ms": round(total_us / 1000, 1)}
        logger.info(
            "  import check: p2pvc %s imports %s, %.0f ms of imports",
            " ".join(command),
            sorted(imported) or "no network package",
            total_us / 1000,
        )
    run.imports.update(report)
    return report


def _script_interpreter(script: Path) -> Path:
    """Return the interpreter named on the ``#!`` line of a console script."""
    with script.open("rb") as file:
        first = file.readline().decode("utf-8", "replace").strip()
    if not first.startswith("#!"):
        raise BenchmarkError(f"{script} has no #! line, so its Python interpreter is unknown")
    return Path(first[2:].split()[0])


def bench_dvc(run: Run, inputs: Inputs, repetition: int, *, dvc: Path) -> None:
    """Time DVC's init, add and commit, checkout, clone and status in fresh folders.

    DVC keeps data in .dvc/cache and small .dvc pointer files in git, so each
    commit is `dvc add` or `dvc commit` plus `git add` and `git commit`, and
    status is `dvc status` plus `git status`.
    """
    tool = "dvc"
    folders = Repetition.create(run.work / "repetitions", tool, repetition)
    worktree = folders.worktree
    model = worktree / "model.safetensors"
    stores = [worktree / ".dvc", worktree / ".git"]

    run.measure(tool, STEP_INIT, repetition, [["git", "init", "-q"], [dvc, "init", "-q"]], worktree)
    shutil.copyfile(inputs.base, model)
    run.measure(
        tool,
        STEP_COMMIT_V1,
        repetition,
        [
            [dvc, "add", "-q", "model.safetensors"],
            ["git", "add", "model.safetensors.dvc", ".gitignore", ".dvc"],
            ["git", "commit", "-q", "-m", "v1"],
        ],
        worktree,
        reads=[model],
    )
    after_v1 = apparent_bytes(stores)

    replace_file(inputs.finetune, model)
    run.measure(
        tool,
        STEP_COMMIT_V2,
        repetition,
        [
            [dvc, "commit", "-q", "-f", "model.safetensors.dvc"],
            ["git", "add", "model.safetensors.dvc"],
            ["git", "commit", "-q", "-m", "v2"],
        ],
        worktree,
        reads=[model],
    )
    run.stores.append(StoreSize(tool, repetition, after_v1, apparent_bytes(stores)))

    # The clone: git clone for the pointer files, a copy of the cache for the data.
    cache = worktree / ".dvc" / "cache"
    copy_step, copy_resident = run.time_commands(
        [["git", "clone", "-q", worktree, folders.clone], copy_tree_command(cache, folders.clone / ".dvc" / "cache")],
        run.work,
        [cache],
    )
    (checkout,) = run.measure(
        tool,
        STEP_CHECKOUT,
        repetition,
        [[dvc, "checkout", "-q"]],
        folders.clone,
        reads=[folders.clone / ".dvc" / "cache"],
    )
    run.record(tool, STEP_CLONE, repetition, [*copy_step, checkout], copy_resident)
    check_checkout(folders.clone, inputs)

    time.sleep(STAT_CACHE_WAIT_S)
    results = run.measure(
        tool,
        STEP_STATUS_AFTER_CHECKOUT,
        repetition,
        [[dvc, "status", "--json"], ["git", "status", "--porcelain"]],
        folders.clone,
        reads=[folders.clone / "model.safetensors"],
    )
    _check_dvc_clean(results, folders.clone)

    def commit_code() -> None:
        run.run(["git", "add", "code"], worktree)
        run.run(["git", "commit", "-q", "-m", "add code"], worktree)

    _add_code_and_wait(inputs, worktree, commit_code)
    results = run.measure(
        tool,
        STEP_STATUS,
        repetition,
        [[dvc, "status", "--json"], ["git", "status", "--porcelain"]],
        worktree,
        reads=[model],
    )
    _check_dvc_clean(results, worktree)
    shutil.rmtree(folders.root)


def _check_dvc_clean(results: Sequence[CommandResult], worktree: Path) -> None:
    dvc_status, git_status = results
    if json.loads(dvc_status.stdout or "{}") or git_status.stdout.strip():
        raise BenchmarkError(
            f"dvc or git status in {worktree} reported changes in an unchanged tree: "
            f"{dvc_status.stdout.strip()[:200]} {git_status.stdout.strip()[:200]}"
        )


def bench_git_lfs(run: Run, inputs: Inputs, repetition: int) -> None:
    """Time git-lfs's init, two commits, checkout, clone and status in fresh folders.

    checkout v2 is `git lfs checkout` in a clone made with GIT_LFS_SKIP_SMUDGE=1
    whose .git/lfs/objects was copied from the first tree, which matches what
    is timed for p2pvc and DVC. clone v2 is a plain `git clone` of the local
    repository path, which copies the LFS objects and checks them out.
    """
    tool = "git-lfs"
    folders = Repetition.create(run.work / "repetitions", tool, repetition)
    worktree = folders.worktree
    model = worktree / "model.safetensors"
    git_dir = worktree / ".git"

    run.measure(
        tool, STEP_INIT, repetition, [["git", "init", "-q"], ["git", "lfs", "track", "*.safetensors"]], worktree
    )
    shutil.copyfile(inputs.base, model)
    run.measure(
        tool,
        STEP_COMMIT_V1,
        repetition,
        [["git", "add", ".gitattributes", "model.safetensors"], ["git", "commit", "-q", "-m", "v1"]],
        worktree,
        reads=[model],
    )
    after_v1 = apparent_bytes([git_dir])

    replace_file(inputs.finetune, model)
    run.measure(
        tool,
        STEP_COMMIT_V2,
        repetition,
        [["git", "add", "model.safetensors"], ["git", "commit", "-q", "-m", "v2"]],
        worktree,
        reads=[model],
    )
    run.stores.append(StoreSize(tool, repetition, after_v1, apparent_bytes([git_dir])))

    objects = git_dir / "lfs" / "objects"
    run.run(["git", "clone", "-q", worktree, folders.clone], run.work, extra_env={"GIT_LFS_SKIP_SMUDGE": "1"})
    copy_tree(objects, folders.clone / ".git" / "lfs" / "objects")
    run.measure(tool, STEP_CHECKOUT, repetition, [["git", "lfs", "checkout"]], folders.clone, reads=[objects])
    check_checkout(folders.clone, inputs)

    time.sleep(STAT_CACHE_WAIT_S)
    (status,) = run.measure(
        tool,
        STEP_STATUS_AFTER_CHECKOUT,
        repetition,
        [["git", "status", "--porcelain"]],
        folders.clone,
        reads=[folders.clone / "model.safetensors"],
    )
    _check_git_clean(status, folders.clone)

    second_clone = folders.root / "clone-full"
    run.measure(
        tool, STEP_CLONE, repetition, [["git", "clone", "-q", worktree, second_clone]], run.work, reads=[objects]
    )
    check_checkout(second_clone, inputs)
    shutil.rmtree(second_clone)

    def commit_code() -> None:
        run.run(["git", "add", "code"], worktree)
        run.run(["git", "commit", "-q", "-m", "add code"], worktree)

    _add_code_and_wait(inputs, worktree, commit_code)
    (status,) = run.measure(tool, STEP_STATUS, repetition, [["git", "status", "--porcelain"]], worktree, reads=[model])
    _check_git_clean(status, worktree)
    shutil.rmtree(folders.root)


def _check_git_clean(status: CommandResult, worktree: Path) -> None:
    if status.stdout.strip():
        raise BenchmarkError(
            f"git status in {worktree} reported changes in an unchanged tree: {status.stdout.strip()[:200]}"
        )


BenchFunction = Callable[[Run, Inputs, int], None]


def prepare_tools(
    names: list[str], run: Run, p2pvc: Path, versions: dict[str, str], skipped: dict[str, str]
) -> dict[str, BenchFunction]:
    """Install what is missing and return the benchmark function of each tool that is available.

    A tool that cannot be installed goes into ``skipped`` with the reason, and its version into ``versions``.
    """
    tools: dict[str, BenchFunction] = {}
    for name in names:
        try:
            if name == "p2pvc":
                tools[name] = functools.partial(bench_p2pvc, p2pvc=p2pvc)
            elif name == "dvc":
                dvc = ensure_dvc(run.timeout)
                versions["dvc"] = tool_version([dvc, "--version"], run.env)
                tools[name] = functools.partial(bench_dvc, dvc=dvc)
            elif name == "git-lfs":
                ensure_git_lfs(run.timeout)
                versions["git-lfs"] = tool_version(["git", "lfs", "version"], run.env)
                # Registers the LFS filters in the work folder's global git config (GIT_CONFIG_GLOBAL).
                run.run(["git", "lfs", "install", "--skip-repo"], run.work)
                tools[name] = bench_git_lfs
        except (ToolUnavailable, BenchmarkError) as error:
            logger.warning("skipping %s: %s", name, error)
            skipped[name] = str(error)
    return tools


def bench_cp(run: Run, inputs: Inputs, repetition: int, python: Path) -> None:
    """Time the baselines: plain cp of the base checkpoint, cp followed by an fsync of the copy, and the floors.

    The floors (benchmarks/floor.py) only hash the checkpoint, or copy and hash
    it: no verifying tool can commit a changed file faster than the first, nor
    commit a new one or check one out faster than the second.
    """
    folder = run.work / "repetitions" / f"cp-{repetition}"
    folder.mkdir(parents=True)
    copy = folder / "copy.safetensors"
    run.measure("cp", STEP_CP, repetition, [["cp", inputs.base, copy]], folder, reads=[inputs.base])
    copy.unlink()
    # coreutils `sync FILE` fsyncs that one file, which is what p2pvc does for its packs.
    run.measure(
        "cp", STEP_CP_SYNC, repetition, [["cp", inputs.base, copy], ["sync", copy]], folder, reads=[inputs.base]
    )
    copy.unlink()
    run.measure("cp", STEP_FLOOR_HASH, repetition, [[python, FLOOR, "hash", inputs.base]], folder, reads=[inputs.base])
    run.measure(
        "cp", STEP_FLOOR_COPY, repetition, [[python, FLOOR, "copy", inputs.base, copy]], folder, reads=[inputs.base]
    )
    shutil.rmtree(folder)


# Summaries ----------------------------------------------------------------------------------


@dataclass
class Summary:
    """Median and min of one tool's step over the repetitions, with its ratio and target."""

    tool: str
    step: str
    samples: int
    median_s: float
    min_s: float
    ratio_to_cp: float | None
    peak_rss_mib: float
    resident_fraction_min: float | None
    target: str
    met: bool | None


def summarize(run: Run) -> list[Summary]:
    """Group the samples by tool and step and compare each with the cp median and its target."""
    groups: dict[tuple[str, str], list[Sample]] = {}
    for sample in run.samples:
        groups.setdefault((sample.tool, sample.step), []).append(sample)
    cp_samples = groups.get(("cp", STEP_CP), [])
    cp_median = statistics.median(s.seconds for s in cp_samples) if cp_samples else None

    tool_order = ["cp", *ALL_TOOLS]
    summaries = []
    for (tool, step), samples in sorted(
        groups.items(), key=lambda item: (tool_order.index(item[0][0]), STEP_ORDER.index(item[0][1]))
    ):
        seconds = [s.seconds for s in samples]
        median = statistics.median(seconds)
        ratio = median / cp_median if cp_median else None
        residents = [s.resident_fraction for s in samples if s.resident_fraction is not None]
        target_text = ""
        met: bool | None = None
        if (tool, step) in TARGETS:
            kind, limit = TARGETS[(tool, step)]
            if kind == "ratio":
                target_text = f"<= {limit:g}x cp"
                met = ratio is not None and ratio <= limit
            else:
                target_text = f"< {limit:g} s"
                met = median < limit
        summaries.append(
            Summary(
                tool=tool,
                step=step,
                samples=len(samples),
                median_s=median,
                min_s=min(seconds),
                ratio_to_cp=ratio,
                peak_rss_mib=max(s.peak_rss_kib for s in samples) / 1024,
                resident_fraction_min=min(residents) if residents else None,
                target=target_text,
                met=met,
            )
        )
    return summaries


def store_summary(run: Run, changed_bytes: int) -> list[dict[str, Any]]:
    """Return per tool the median store size after v1, growth for v2 and growth over the changed bytes."""
    rows = []
    for tool in ALL_TOOLS:
        stores = [s for s in run.stores if s.tool == tool]
        if not stores:
            continue
        growth = statistics.median(s.growth_bytes for s in stores)
        ratio = growth / changed_bytes
        reported = [s.reported_new_bytes for s in stores if s.reported_new_bytes is not None]
        row: dict[str, Any] = {
            "tool": tool,
            "after_v1_bytes": statistics.median(s.after_v1_bytes for s in stores),
            "growth_bytes": growth,
            "changed_bytes": changed_bytes,
            "growth_over_changed": ratio,
            "reported_new_bytes": statistics.median(reported) if reported else None,
            "target": "",
            "met": None,
        }
        if tool == "p2pvc":
            row["target"] = f"<= {STORE_GROWTH_TARGET:g}x changed"
            row["met"] = ratio <= STORE_GROWTH_TARGET
        rows.append(row)
    return rows


def format_tables(summaries: list[Summary], stores: list[dict[str, Any]]) -> str:
    """Format the summaries and store sizes as Markdown tables."""
    lines = [
        "| tool | step | median s | min s | median / cp | peak RSS MiB | in page cache | target | met |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for s in summaries:
        ratio = f"{s.ratio_to_cp:.2f}x" if s.ratio_to_cp is not None else "-"
        resident = f"{s.resident_fraction_min:.0%}" if s.resident_fraction_min is not None else "-"
        met = _met_text(s.met)
        cells = [s.tool, s.step, f"{s.median_s:.3f}", f"{s.min_s:.3f}", ratio, f"{s.peak_rss_mib:.0f}", resident]
        lines.append("| " + " | ".join([*cells, s.target, met]) + " |")
    lines += [
        "",
        "| tool | store after v1 MiB | growth for v2 MiB | changed MiB | growth / changed | target | met |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in stores:
        met = _met_text(row["met"])
        lines.append(
            f"| {row['tool']} | {row['after_v1_bytes'] / 2**20:.1f} | {row['growth_bytes'] / 2**20:.1f} | "
            f"{row['changed_bytes'] / 2**20:.1f} | {row['growth_over_changed']:.2f}x | {row['target']} | {met} |"
        )
    return "\n".join(lines)


def _met_text(met: bool | None) -> str:
    if met is None:
        return ""  # no target for this row
    return "yes" if met else "**no**"


# Command line -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Time p2pvc's init, commit, checkout and status on a synthetic bf16 checkpoint against cp of the "
            "same file, and against DVC and git-lfs doing the same steps, all in one work folder on one disk. "
            "Prints a Markdown table on stdout and progress on stderr."
        ),
    )
    parser.add_argument(
        "--size",
        default="1GiB",
        help="checkpoint size passed to scripts/make_checkpoint.py, e.g. 256MiB or 1GiB (default: 1GiB)",
    )
    parser.add_argument("--repeat", type=_positive_int, default=3, help="repetitions of every timed step (default: 3)")
    parser.add_argument(
        "--json", type=Path, metavar="OUT", help="write all raw timings and machine facts to this JSON file"
    )
    parser.add_argument(
        "--tools",
        type=_tool_list,
        default=list(ALL_TOOLS),
        help=f"comma-separated tools to compare with cp, from {','.join(ALL_TOOLS)} (default: all)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="folder in which to create the work folder (default: the system temporary folder, usually /tmp)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder instead of deleting it at the end")
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=900.0,
        help="seconds after which one command is killed (default: 900)",
    )
    parser.add_argument(
        "--p2pvc",
        type=Path,
        default=REPO_ROOT / ".venv" / "bin" / "p2pvc",
        help="p2pvc executable to measure (default: .venv/bin/p2pvc of this checkout)",
    )
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text}: expected 1 or more")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text}: expected a positive number")
    return value


def _tool_list(text: str) -> list[str]:
    tools = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tools if t not in ALL_TOOLS]
    if unknown or not tools:
        raise argparse.ArgumentTypeError(
            f"invalid --tools {text!r}: expected a comma-separated list from {','.join(ALL_TOOLS)}"
        )
    return tools


def base_environment(work: Path) -> dict[str, str]:
    """Return the environment of every measured command, with identities and configs inside the work folder."""
    home = work / "home"
    (home / "p2pvc").mkdir(parents=True)
    (home / "dvc-system").mkdir()
    (home / "dvc-global").mkdir()
    (work / "tmp").mkdir()

    # DVC sends usage analytics, and `dvc version` requests the latest version
    # from a web service. This benchmark sends no traffic, so both are off.
    (home / "dvc-global" / "config").write_text("[core]\n    analytics = false\n    check_update = false\n")

    env = dict(os.environ)
    env.update(
        {
            # p2pvc's signing key, the global configs of git (git lfs install writes
            # there) and DVC, DVC's hash cache and temporary files all stay in the
            # work folder, so the run leaves nothing behind.
            "P2PVC_HOME": str(home / "p2pvc"),
            "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"),
            "DVC_SYSTEM_CONFIG_DIR": str(home / "dvc-system"),
            "DVC_SITE_CACHE_DIR": str(work / "dvc-site-cache"),
            "GIT_CONFIG_GLOBAL": str(home / "gitconfig"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "bench",
            "GIT_AUTHOR_EMAIL": "bench@localhost",
            "GIT_COMMITTER_NAME": "bench",
            "GIT_COMMITTER_EMAIL": "bench@localhost",
            "GIT_TERMINAL_PROMPT": "0",
            "DVC_NO_ANALYTICS": "1",
            "TMPDIR": str(work / "tmp"),
        }
    )
    return env


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and return the exit code: 0 if every available tool ran, 1 on a failure, 2 for bad usage."""
    args = parse_args(argv)
    # Treat SIGTERM like Ctrl-C, so the running command is killed and the work folder is removed.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    started = datetime.datetime.now(datetime.UTC)

    p2pvc = args.p2pvc.absolute()
    if not p2pvc.is_file():
        print(f"error: p2pvc executable {p2pvc} not found: pass --p2pvc PATH", file=sys.stderr)
        return 2
    if not GNU_TIME.is_file():
        print(f"error: {GNU_TIME} not found: install GNU time (Debian package time)", file=sys.stderr)
        return 2
    python = _script_interpreter(p2pvc)

    parent = args.workdir.absolute() if args.workdir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    # A new folder even inside --workdir, so the cleanup never deletes the user's files.
    work = Path(tempfile.mkdtemp(prefix="p2pvc-bench-", dir=parent))
    logger.info("work folder %s", work)
    run = Run(work=work, env=base_environment(work), timeout=args.timeout)
    versions = {
        "git": tool_version(["git", "--version"], run.env),
        "cp": tool_version(["cp", "--version"], run.env),
        "python": platform.python_version(),
    }
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    machine = machine_facts(work)

    try:
        versions["p2pvc"] = snapshot_p2pvc(run, python)
        tools = prepare_tools(args.tools, run, p2pvc, versions, skipped)
        inputs = prepare_inputs(run, python, args.size)
        run_repetitions(run, inputs, p2pvc, tools, args.repeat, failed)
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted, so no results were written", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            logger.info("kept the work folder %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
            logger.info("removed the work folder %s", work)
    machine["load_average_at_end"] = os.getloadavg()

    summaries = summarize(run)
    stores = store_summary(run, inputs.changed_bytes)
    print(format_tables(summaries, stores))
    loads = [sample.load_average for sample in run.samples]
    if loads:
        # Other processes compete for the CPUs, so state how busy the machine was.
        load_range = f"{min(loads):.1f} to {max(loads):.1f}"
        print(f"\n1-minute load average during the timed steps: {load_range} on {os.cpu_count()} CPUs")
    for tool, reason in skipped.items():
        print(f"\nskipped {tool}: {reason}")
    for tool, reason in failed.items():
        print(f"\nfailed {tool}: {reason}")

    if args.json:
        report = {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine,
            "versions": versions,
            "settings": {
                "size": args.size,
                "repeat": args.repeat,
                "tools": args.tools,
                "timeout_s": args.timeout,
                "checkpoint_bytes": inputs.checkpoint_bytes,
                "changed_bytes": inputs.changed_bytes,
                "code_files": inputs.code_files,
                "code_bytes": inputs.code_bytes,
                "ratios_divide_by": "median of plain cp (without sync)",
            },
            "samples": [asdict(s) for s in run.samples],
            "stores": [dict(asdict(s), growth_bytes=s.growth_bytes) for s in run.stores],
            "summary": [asdict(s) for s in summaries],
            "store_summary": stores,
            "import_check": run.imports,
            "skipped": skipped,
            "failed": failed,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        logger.info("wrote %s", args.json)
    return 1 if failed else 0


def _raise_keyboard_interrupt(signal_number: int, frame: object) -> None:
    raise KeyboardInterrupt(f"received signal {signal_number}")


def run_repetitions(
    run: Run, inputs: Inputs, p2pvc: Path, tools: dict[str, BenchFunction], repeat: int, failed: dict[str, str]
) -> None:
    """Run cp and every tool ``repeat`` times, interleaved so that slow drifts of the machine hit all alike.

    A tool whose step fails goes into ``failed`` with the error and skips its remaining repetitions.
    """
    logger.info(
        "checkpoint %d bytes, %d bytes changed by the fine-tune, code %d files %d bytes",
        inputs.checkpoint_bytes,
        inputs.changed_bytes,
        inputs.code_files,
        inputs.code_bytes,
    )
    # The signing key is created now, so that p2pvc init does not time its generation.
    run.run([p2pvc, "id"], run.work)
    # One untimed copy first, so the first timed cp does not pay for loading cp or other first-use costs.
    warm_up = run.work / "warm-up.safetensors"
    run.run(["cp", inputs.base, warm_up], run.work)
    warm_up.unlink()

    for repetition in range(repeat):
        logger.info("repetition %d of %d", repetition + 1, repeat)
        bench_cp(run, inputs, repetition, _script_interpreter(p2pvc))
        for tool, bench in tools.items():
            if tool in failed:
                continue
            try:
                bench(run, inputs, repetition)
            except BenchmarkError as error:
                logger.error("%s failed, skipping its remaining repetitions: %s", tool, error)
                failed[tool] = str(error)


if __name__ == "__main__":
    sys.exit(main())
