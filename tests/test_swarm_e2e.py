"""End-to-end swarm fetch: `p2pvc fetch` from several peers at once, as separate processes on 127.0.0.1.

A seed runs `serve --seed` on a copy of a checkpoint repository (three
files of random bytes). Fetchers are history-only clones of the seed
(`clone --no-content`), or `cp -a` copies of one such clone, each with
its own P2PVC_HOME and so its own peer id. Every fetch listens on
127.0.0.1, so the addresses that fetchers advertise to each other by peer
exchange are on 127.0.0.1 too. Every process a test starts is killed by
its pid when the test ends (the `registry` fixture).
"""

from __future__ import annotations

import json
import time

import pytest

from netproc.library import chunk_ids, file_chunk_ids, flip_every_chunk_byte
from netproc.nodes import (
    LOCALHOST,
    STOP_LIMIT_S,
    Node,
    ProcessRegistry,
    Server,
    Started,
    free_port,
    kill,
    peer_address,
    tree_digest,
    wait_for_pack_bytes,
    write_random_file,
)
from p2pvc.node.pull import SYNC_COMMIT_BYTES
from p2pvc.node.swarm import STALL_TIMEOUT_S

MiB = 1024 * 1024
# Large enough that three concurrent fetchers still run when they learn of each other
# (peer exchange responses arrive about once a second), so chunks flow between them.
CHECKPOINT_FILES = {
    "weights/a.bin": 40 * MiB,
    "weights/b.bin": 32 * MiB,
    "weights/c.bin": 24 * MiB,
}
CHECKPOINT_BYTES = sum(CHECKPOINT_FILES.values())
PARTIAL_PATH = "weights/c.bin"  # the file that --path cases fetch alone
PARTIAL_BYTES = CHECKPOINT_FILES[PARTIAL_PATH]

# Three fetchers of the whole checkpoint from one seed took 4-12 s on a 2-core machine,
# and up to 30 s while other processes kept it busy.
REPORT_TIMEOUT_S = 60.0
PARTIAL_REPORT_TIMEOUT_S = 30.0  # one fetcher of PARTIAL_PATH alone took about 3 s
TRANSFER_TIMEOUT_S = 120.0
IN_FLIGHT_SLACK = 8 * MiB  # bytes in flight when a fetcher is killed, on top of one uncommitted index batch


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Node:
    """A repository with CHECKPOINT_FILES committed on main, built once; tests serve copies of it."""
    base = tmp_path_factory.mktemp("checkpoint")
    origin = Node("origin", base, ProcessRegistry())
    origin.root.mkdir()
    for relative, size in CHECKPOINT_FILES.items():
        write_random_file(origin.root / relative, size)
    origin.ok("init")
    origin.json("commit", "-m", "checkpoint")
    return origin


SEED_UPLOAD_MIBPS = 12  # MiB/s: 96 MiB takes the seed 8 s per copy


def start_seed(checkpoint: Node, node: Node, *options: str) -> Server:
    """Copy the checkpoint repository to `node` and run `serve --seed` there, with more `options`."""
    checkpoint.copy_to(node)
    return node.serve(seed=True, extra=options)


def clone_history(node: Node, server: Server) -> None:
    node.ok("clone", "--no-content", server.address, str(node.root))


def fetch_command(*options: str) -> tuple[str, ...]:
    """Return the arguments of `p2pvc fetch main` listening on 127.0.0.1, plus `options`."""
    return ("fetch", "main", "--listen", LOCALHOST, *options)


def wait_for_report(started: Started, timeout: float = REPORT_TIMEOUT_S) -> dict:
    """Wait until a running `fetch --json --seed` has printed its JSON report, and return the report.

    Raises AssertionError if the process ends first or `timeout` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while True:
        text = started.stdout_path.read_text()
        try:
            return json.loads(text)
        except ValueError:
            pass  # nothing printed yet, or only part of the report
        if started.process.poll() is not None:
            raise AssertionError(f"fetch ended before printing a report:\n{started.result().describe()}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"[{started.node}] fetch printed no report within {timeout} s; stdout:\n{text}\n"
                f"stderr:\n{started.stderr_path.read_text()[-4000:]}"
            )
        time.sleep(0.05)


def assert_fsck_passes(node: Node) -> None:
    result = node.run("fsck", "--json")
    assert result.returncode == 0, result.describe()
    assert result.json()["problems"] == [], result.describe()


def partial_digest(seed: Node) -> dict[str, tuple]:
    """Return what `tree_digest` gives for a folder holding only PARTIAL_PATH of the seed's tree."""
    expected = tree_digest(seed.root)
    return {"weights": expected["weights"], PARTIAL_PATH: expected[PARTIAL_PATH]}


# Many fetchers ----------------------------------------------------------------------------------


def test_three_fetchers_trade_chunks(checkpoint, make_node):
    seed = make_node("seed")
    # A capped seed, as a lab uplink would be: uncapped on loopback, it could send
    # all three copies before the fetchers have found each other.
    server = start_seed(checkpoint, seed, "--upload-limit", str(SEED_UPLOAD_MIBPS))
    fetchers = [make_node(f"fetcher{i}") for i in range(3)]
    clone_history(fetchers[0], server)
    for fetcher in fetchers[1:]:
        fetchers[0].copy_to(fetcher)
    fetcher_ids = {fetcher.peer_id for fetcher in fetchers}

    # -v logs each peer joining or leaving, which a failure message then shows.
    running = [fetcher.start(*fetch_command("--seed", "--json", "-v")) for fetcher in fetchers]
    reports = [wait_for_report(started) for started in running]

    for started in running:
        assert started.stop() <= STOP_LIMIT_S
        assert started.process.returncode == 0, started.result().describe()
    for fetcher, report in zip(fetchers, reports):
        assert report["bytes_selected"] == CHECKPOINT_BYTES, fetcher.name
        assert report["raw_bytes_fetched"] == CHECKPOINT_BYTES, fetcher.name
        assert sum(report["peers"].values()) == CHECKPOINT_BYTES, fetcher.name
        assert set(report["peers"]) <= fetcher_ids | {seed.peer_id}, fetcher.name
        assert report["banned"] == [], fetcher.name
        assert report["unreachable"] == [], fetcher.name
    from_fetchers = [sum(amount for peer, amount in report["peers"].items() if peer in fetcher_ids) for report in reports]
    assert min(from_fetchers) > 0, json.dumps(reports, indent=2)
    # Seed-only would be 3 copies. About 1.6 were seen here; 2.25 leaves room for a loaded machine.
    from_seed = sum(report["peers"].get(seed.peer_id, 0) for report in reports)
    assert from_seed < 2.25 * CHECKPOINT_BYTES, json.dumps(reports, indent=2)

    expected = tree_digest(seed.root)
    for fetcher in fetchers:
        fetcher.ok("checkout", "main")
        assert tree_digest(fetcher.root) == expected, fetcher.name
        assert_fsck_passes(fetcher)
    assert server.stop() <= STOP_LIMIT_S


# Interruptions ----------------------------------------------------------------------------------


def test_killed_fetch_resumes(checkpoint, make_node, tmp_path):
    seed, fetcher = make_node("seed"), make_node("fetcher")
    server = start_seed(checkpoint, seed)
    clone_history(fetcher, server)
    base = fetcher.pack_bytes()

    started = fetcher.start(*fetch_command())
    # Past two index batches of SYNC_COMMIT_BYTES, so at least one of them is durable.
    wait_for_pack_bytes(fetcher, started, base + 2 * CHECKPOINT_BYTES // 3, TRANSFER_TIMEOUT_S)
    kill(started.process)
    grown = fetcher.pack_bytes() - base
    checkout = tmp_path / "checkout"
    rerun = fetcher.run(*fetch_command("--json", "--checkout", str(checkout)))

    assert rerun.returncode == 0, rerun.describe()
    report = rerun.json()
    assert report["bytes_selected"] == CHECKPOINT_BYTES
    assert report["raw_bytes_fetched"] < CHECKPOINT_BYTES, f"grown {grown} at the kill"
    # A killed fetch loses at most its uncommitted index batch and what was in flight.
    assert report["raw_bytes_fetched"] <= CHECKPOINT_BYTES - grown + SYNC_COMMIT_BYTES + IN_FLIGHT_SLACK
    assert tree_digest(checkout) == tree_digest(seed.root)
    assert_fsck_passes(fetcher)
    assert server.stop() <= STOP_LIMIT_S


def test_vanished_peer_does_not_stall_fetch(checkpoint, make_node):
    first, second, fetcher = make_node("first"), make_node("second"), make_node("fetcher")
    server_first = start_seed(checkpoint, first)
    server_second = start_seed(checkpoint, second)
    clone_history(fetcher, server_first)
    base = fetcher.pack_bytes()

    started = fetcher.start(*fetch_command("--json", "--peer", server_second.address))
    wait_for_pack_bytes(fetcher, started, base + CHECKPOINT_BYTES // 4, TRANSFER_TIMEOUT_S)
    server_second.kill()
    killed_at = time.monotonic()
    result = fetcher.finish(started, timeout=TRANSFER_TIMEOUT_S)
    seconds_after_kill = time.monotonic() - killed_at

    assert result.returncode == 0, result.describe()
    report = result.json()
    # The kill closed the second peer's sockets, so the fetch must notice at once, not after a stall timeout.
    assert seconds_after_kill < STALL_TIMEOUT_S, result.describe()
    assert second.peer_id in report["dropped"], result.describe()
    assert report["peers"].get(second.peer_id, 0) > 0, result.describe()
    assert report["raw_bytes_fetched"] == CHECKPOINT_BYTES, result.describe()
    assert sum(report["peers"].values()) == CHECKPOINT_BYTES, result.describe()
    fetcher.ok("checkout", "main")
    assert tree_digest(fetcher.root) == tree_digest(first.root)
    assert_fsck_passes(fetcher)
    assert server_first.stop() <= STOP_LIMIT_S


# Misbehaving peers ------------------------------------------------------------------------------


def test_corrupt_peer_banned(checkpoint, make_node, tmp_path):
    good, bad, fetcher = make_node("good"), make_node("bad"), make_node("fetcher")
    checkpoint.copy_to(bad)
    # Every chunk is damaged, so whichever chunk the fetch requests from the bad peer fails verification.
    assert flip_every_chunk_byte(bad.root, bad.home) == len(chunk_ids(bad.root, bad.home))
    server_good = start_seed(checkpoint, good)
    server_bad = bad.serve(seed=True)
    clone_history(fetcher, server_good)
    checkout = tmp_path / "checkout"

    # The bad peer comes first, so it also sends the history, which is intact in its copy.
    result = fetcher.run(*fetch_command("--json", "--checkout", str(checkout), "--peer", server_bad.address))

    assert result.returncode == 0, result.describe()
    report = result.json()
    assert report["banned"] == [bad.peer_id], result.describe()
    assert report["peers"] == {good.peer_id: CHECKPOINT_BYTES}, result.describe()
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line and bad.peer_id in line]
    assert len(warnings) == 1, result.describe()
    assert "banned" in warnings[0], result.describe()
    assert tree_digest(checkout) == tree_digest(good.root)
    assert_fsck_passes(fetcher)
    assert server_good.stop() <= STOP_LIMIT_S
    assert server_bad.stop() <= STOP_LIMIT_S


# Parts of a revision ----------------------------------------------------------------------------


def test_path_fetch_stays_inside_path(checkpoint, make_node, tmp_path):
    seed, fetcher = make_node("seed"), make_node("fetcher")
    server = start_seed(checkpoint, seed)
    clone_history(fetcher, server)
    assert chunk_ids(fetcher.root, fetcher.home) == []  # a history-only clone stores no file content
    checkout = tmp_path / "checkout"

    report = fetcher.json(*fetch_command("--path", PARTIAL_PATH, "--checkout", str(checkout)))

    assert report["files"] == 1
    assert report["bytes_selected"] == PARTIAL_BYTES
    assert report["raw_bytes_fetched"] == PARTIAL_BYTES
    expected_chunks = file_chunk_ids(seed.root, seed.home, "main", PARTIAL_PATH)
    stored = chunk_ids(fetcher.root, fetcher.home)
    assert len(stored) == len(set(stored))
    assert set(stored) == expected_chunks
    assert tree_digest(checkout) == partial_digest(seed)
    assert_fsck_passes(fetcher)
    assert server.stop() <= STOP_LIMIT_S


def test_whereis_shows_each_peers_share(checkpoint, make_node):
    seed, partial, asker = make_node("seed"), make_node("partial"), make_node("asker")
    server = start_seed(checkpoint, seed)
    clone_history(partial, server)
    partial.copy_to(asker)
    port = free_port()
    seeding = partial.start(*fetch_command("--seed", "--json", "--path", PARTIAL_PATH, "--port", str(port)))
    assert wait_for_report(seeding)["raw_bytes_fetched"] == PARTIAL_BYTES
    partial_address = peer_address(port, partial.peer_id)

    # The seed is a stored peer of the asker (from the clone), so only the partial fetcher is passed.
    revision = asker.json("whereis", "main", "--peer", partial_address)
    one_file = asker.json("whereis", PARTIAL_PATH, "--peer", partial_address)

    assert revision["files"] == len(CHECKPOINT_FILES)
    assert revision["bytes"] == CHECKPOINT_BYTES
    assert revision["unreachable"] == []
    rows = {row["peer"]: row for row in revision["peers"]}
    assert set(rows) == {"this node", seed.peer_id, partial.peer_id}
    assert rows["this node"] == {"peer": "this node", "complete": False, "bytes": 0}
    assert rows[seed.peer_id] == {"peer": seed.peer_id, "complete": True, "bytes": CHECKPOINT_BYTES}
    assert rows[partial.peer_id] == {"peer": partial.peer_id, "complete": False, "bytes": PARTIAL_BYTES}

    assert one_file["files"] == 1
    assert one_file["bytes"] == PARTIAL_BYTES
    rows = {row["peer"]: row for row in one_file["peers"]}
    assert rows[seed.peer_id]["complete"] is True
    assert rows[partial.peer_id] == {"peer": partial.peer_id, "complete": True, "bytes": PARTIAL_BYTES}
    assert rows["this node"]["bytes"] == 0
    assert seeding.stop() <= STOP_LIMIT_S
    assert f"listening on {partial_address}" in seeding.result().stderr.splitlines()
    assert server.stop() <= STOP_LIMIT_S


def test_seeding_fetch_checks_out_first(checkpoint, make_node, tmp_path):
    seed, fetcher = make_node("seed"), make_node("fetcher")
    server = start_seed(checkpoint, seed)
    clone_history(fetcher, server)
    checkout = tmp_path / "checkout"

    status = fetcher.ok("status").stdout
    assert "This is a history-only clone, and no files are checked out here" in status
    assert "a peer moved" not in status
    seeding = fetcher.start(*fetch_command("--seed", "--json", "--path", PARTIAL_PATH, "--checkout", str(checkout)))
    # A node that seeds after the fetch needs its files while it seeds, not after it stops.
    report = wait_for_report(seeding, timeout=PARTIAL_REPORT_TIMEOUT_S)

    assert report["raw_bytes_fetched"] == PARTIAL_BYTES
    assert tree_digest(checkout) == partial_digest(seed)
    assert seeding.process.poll() is None, seeding.result().describe()
    assert seeding.stop() <= STOP_LIMIT_S
    assert server.stop() <= STOP_LIMIT_S
