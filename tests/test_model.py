"""Tests for the canonical msgpack encoding of manifests, trees and commits.

Invalid inputs are written by hand as msgpack values (or raw bytes, for
non-canonical forms that msgpack.packb never produces) and must be rejected
with CorruptionError at decode, because decode is the trust boundary for
everything read from packs or peers.
"""

from __future__ import annotations

import unicodedata

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pvc.errors import CorruptionError
from p2pvc.objects import model
from p2pvc.objects.ids import object_id
from p2pvc.objects.model import (
    ENTRY_DIR,
    ENTRY_FILE,
    ENTRY_SYMLINK,
    KIND_COMMIT,
    KIND_MANIFEST,
    KIND_TREE,
    VERSION,
    ChunkRef,
    Commit,
    Manifest,
    Tree,
    TreeEntry,
)

ID_A = b"\x11" * 32
ID_B = b"\x22" * 32
KEY = b"\x33" * 32
SIGNATURE = b"\x44" * 64


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def manifest_value(size: int = 5, chunks: list | None = None) -> list:
    return [KIND_MANIFEST, VERSION, size, [[ID_A, 5]] if chunks is None else chunks]


def entry_value(name=b"a", kind=ENTRY_FILE, executable=False, target=ID_A, size=5) -> list:
    return [name, kind, executable, target, size]


def tree_value(*entries: list) -> list:
    return [KIND_TREE, VERSION, list(entries)]


def commit_value(**fields) -> list:
    values = {
        "tree": ID_A,
        "parents": [ID_B],
        "author": KEY,
        "time_ms": 1_700_000_000_000,
        "message": "hi",
        "metadata": [["lr", "0.1"], ["step", "12"]],
        "signature": SIGNATURE,
    }
    values.update(fields)
    return [KIND_COMMIT, VERSION, *values.values()]


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    """Replace one occurrence of `old`, which must occur exactly once."""
    assert data.count(old) == 1
    return data.replace(old, new)


# Valid encodings -------------------------------------------------------------------

VALID_CASES = [
    pytest.param(manifest_value(0, []), Manifest(0, ()), id="empty-manifest"),
    pytest.param(
        manifest_value(7, [[ID_A, 5], [ID_B, 2]]),
        Manifest(7, (ChunkRef(ID_A, 5), ChunkRef(ID_B, 2))),
        id="manifest-two-chunks",
    ),
    pytest.param(tree_value(), Tree(()), id="empty-tree"),
    pytest.param(
        tree_value(
            entry_value(b"bin", ENTRY_DIR, False, ID_B, 0),
            entry_value(b"link", ENTRY_SYMLINK, False, b"../x", 4),
            entry_value(b"run.sh", ENTRY_FILE, True, ID_A, 9),
        ),
        Tree(
            (
                TreeEntry(b"bin", ENTRY_DIR, False, ID_B, 0),
                TreeEntry(b"link", ENTRY_SYMLINK, False, b"../x", 4),
                TreeEntry(b"run.sh", ENTRY_FILE, True, ID_A, 9),
            )
        ),
        id="tree-each-kind",
    ),
    pytest.param(
        tree_value(entry_value(b"\xff\xfe name", size=0)),
        Tree((TreeEntry(b"\xff\xfe name", ENTRY_FILE, False, ID_A, 0),)),
        id="tree-non-utf8-name",
    ),
    pytest.param(
        commit_value(),
        Commit(ID_A, (ID_B,), KEY, 1_700_000_000_000, "hi", (("lr", "0.1"), ("step", "12")), SIGNATURE),
        id="commit",
    ),
    pytest.param(
        commit_value(parents=[], metadata=[], message=""),
        Commit(ID_A, (), KEY, 1_700_000_000_000, "", (), SIGNATURE),
        id="root-commit",
    ),
]


@pytest.mark.parametrize(("value", "expected"), VALID_CASES)
def test_decode_valid_encoding(value: list, expected: model.StoredObject) -> None:
    assert model.decode(pack(value)) == expected


@pytest.mark.parametrize(("value", "expected"), VALID_CASES)
def test_encode_matches_canonical_bytes(value: list, expected: model.StoredObject) -> None:
    assert model.encode(expected) == pack(value)


# Invalid encodings -------------------------------------------------------------------

CANONICAL_MANIFEST = pack(manifest_value(0, []))
CANONICAL_TREE = pack(tree_value(entry_value()))
CANONICAL_COMMIT = pack(commit_value())

NON_CANONICAL_CASES = [
    pytest.param(b"", id="empty-input"),
    pytest.param(b"\xc1", id="reserved-byte"),
    pytest.param(CANONICAL_COMMIT[:-1], id="truncated"),
    pytest.param(CANONICAL_MANIFEST + b"\x00", id="trailing-byte"),
    pytest.param(replace_once(CANONICAL_MANIFEST, b"\x01\x01\x00\x90", b"\x01\x01\xcc\x00\x90"), id="int-not-shortest"),
    pytest.param(b"\xdc\x00\x04" + CANONICAL_MANIFEST[1:], id="array16-header"),
    pytest.param(replace_once(CANONICAL_COMMIT, b"\xa2hi", b"\xd9\x02hi"), id="str8-not-fixstr"),
    pytest.param(replace_once(CANONICAL_TREE, b"\xc4\x01a", b"\xc5\x00\x01a"), id="bin16-not-bin8"),
    pytest.param(pack({"kind": 1}), id="map-not-array"),
    pytest.param(pack([KIND_MANIFEST]), id="array-too-short"),
]

INVALID_VALUE_CASES = [
    # Header.
    pytest.param([9, VERSION, 0, []], id="unknown-kind"),
    pytest.param([KIND_MANIFEST, 2, 0, []], id="unknown-version"),
    pytest.param(["manifest", VERSION, 0, []], id="kind-as-text"),
    # Manifests.
    pytest.param([KIND_MANIFEST, VERSION, 0], id="manifest-missing-field"),
    pytest.param([KIND_MANIFEST, VERSION, 0, [], 0], id="manifest-extra-field"),
    pytest.param(manifest_value(6, [[ID_A, 5]]), id="manifest-size-too-big"),
    pytest.param(manifest_value(4, [[ID_A, 5]]), id="manifest-size-too-small"),
    pytest.param(manifest_value(-1, []), id="manifest-negative-size"),
    pytest.param(manifest_value(5.0, [[ID_A, 5]]), id="manifest-float-size"),
    pytest.param(manifest_value(True, [[ID_A, 1]]), id="manifest-bool-size"),
    pytest.param(manifest_value(0, [[ID_A, 0]]), id="manifest-empty-chunk"),
    pytest.param(manifest_value(5, [[ID_A[:31], 5]]), id="manifest-short-chunk-id"),
    pytest.param(manifest_value(5, [[ID_A, 5, 0]]), id="manifest-chunk-three-fields"),
    pytest.param(manifest_value(5, [["x" * 32, 5]]), id="manifest-chunk-id-text"),
    pytest.param(manifest_value(0, {}), id="manifest-chunks-map"),
    # Tree structure.
    pytest.param([KIND_TREE, VERSION], id="tree-missing-entries"),
    pytest.param([KIND_TREE, VERSION, [], []], id="tree-extra-field"),
    pytest.param(tree_value(entry_value()[:4]), id="entry-four-fields"),
    pytest.param(tree_value(entry_value(b"b"), entry_value(b"a")), id="entries-unsorted"),
    pytest.param(tree_value(entry_value(b"a"), entry_value(b"a")), id="entries-duplicate"),
    pytest.param(tree_value(entry_value("a")), id="name-as-text"),
    pytest.param(tree_value(entry_value(kind=4)), id="entry-kind-unknown"),
    pytest.param(tree_value(entry_value(kind=0)), id="entry-kind-zero"),
    pytest.param(tree_value(entry_value(executable=1)), id="executable-not-bool"),
    pytest.param(tree_value(entry_value(kind=ENTRY_DIR, executable=True)), id="executable-dir"),
    pytest.param(tree_value(entry_value(target=ID_A[:31])), id="file-short-target"),
    pytest.param(tree_value(entry_value(target=b"")), id="file-empty-target"),
    pytest.param(tree_value(entry_value(kind=ENTRY_DIR, target="x" * 32)), id="dir-target-text"),
    pytest.param(tree_value(entry_value(size=-1)), id="entry-negative-size"),
    pytest.param(tree_value(entry_value(kind=ENTRY_SYMLINK, target=b"abc", size=4)), id="symlink-wrong-size"),
    pytest.param(tree_value(entry_value(kind=ENTRY_SYMLINK, target=b"", size=0)), id="symlink-empty-target"),
    pytest.param(tree_value(entry_value(kind=ENTRY_SYMLINK, target=b"a\x00b", size=3)), id="symlink-nul-target"),
    pytest.param(
        tree_value(entry_value(kind=ENTRY_SYMLINK, target=b"x" * 4097, size=4097)), id="symlink-target-too-long"
    ),
    pytest.param(
        tree_value(entry_value(kind=ENTRY_SYMLINK, executable=True, target=b"x", size=1)), id="symlink-executable"
    ),
    # Commits.
    pytest.param(commit_value()[:-1], id="commit-six-fields"),
    pytest.param(commit_value(tree=ID_A[:31]), id="commit-short-tree"),
    pytest.param(commit_value(parents=[ID_B, ID_B]), id="commit-duplicate-parent"),
    pytest.param(commit_value(parents=[ID_B[:31]]), id="commit-short-parent"),
    pytest.param(commit_value(parents=[bytes([i]) * 32 for i in range(65)]), id="commit-65-parents"),
    pytest.param(commit_value(parents=ID_B), id="commit-parents-not-list"),
    pytest.param(commit_value(author=KEY[:31]), id="commit-short-author"),
    pytest.param(commit_value(time_ms=-1), id="commit-negative-time"),
    pytest.param(commit_value(time_ms="now"), id="commit-time-text"),
    pytest.param(commit_value(message=b"hi"), id="commit-message-bytes"),
    pytest.param(commit_value(message="m" * (64 * 1024 + 1)), id="commit-message-too-long"),
    pytest.param(commit_value(metadata=[["step", "1"], ["lr", "2"]]), id="metadata-unsorted"),
    pytest.param(commit_value(metadata=[["k", "1"], ["k", "2"]]), id="metadata-duplicate-key"),
    pytest.param(commit_value(metadata=[["a=b", "1"]]), id="metadata-key-with-equals"),
    pytest.param(commit_value(metadata=[["", "1"]]), id="metadata-empty-key"),
    pytest.param(commit_value(metadata=[["\x01k", "1"]]), id="metadata-control-key"),
    pytest.param(commit_value(metadata=[["k" * 129, "1"]]), id="metadata-key-too-long"),
    pytest.param(commit_value(metadata=[["k", "v" * 4097]]), id="metadata-value-too-long"),
    pytest.param(commit_value(metadata=[["k", 1]]), id="metadata-value-int"),
    pytest.param(commit_value(metadata=[["k"]]), id="metadata-item-one-field"),
    pytest.param(commit_value(metadata={"k": "v"}), id="metadata-map"),
    pytest.param(commit_value(metadata=[[f"k{i:03}", ""] for i in range(257)]), id="metadata-257-items"),
    pytest.param(commit_value(signature=SIGNATURE[:63]), id="commit-short-signature"),
    pytest.param(commit_value(signature="s" * 64), id="commit-signature-text"),
]

# Names that could leave the working tree or reach the repository folder at checkout.
UNSAFE_NAMES = [b"", b".", b"..", b"a/b", b"/abs", b"../up", b".p2pvc", b"a\x00b", b"x" * 256]


@pytest.mark.parametrize("data", NON_CANONICAL_CASES)
def test_decode_rejects_bytes(data: bytes) -> None:
    with pytest.raises(CorruptionError):
        model.decode(data)


@pytest.mark.parametrize("value", INVALID_VALUE_CASES)
def test_decode_rejects_value(value: object) -> None:
    with pytest.raises(CorruptionError):
        model.decode(pack(value))


@pytest.mark.parametrize("name", UNSAFE_NAMES, ids=repr)
def test_decode_rejects_unsafe_name(name: bytes) -> None:
    with pytest.raises(CorruptionError):
        model.decode(pack(tree_value(entry_value(name))))


@pytest.mark.parametrize("name", UNSAFE_NAMES, ids=repr)
def test_decode_rejects_unsafe_nested_name(name: bytes) -> None:
    """An unsafe name is rejected even after a valid sibling."""
    entries = sorted([entry_value(b"ok"), entry_value(name)], key=lambda e: e[0])
    with pytest.raises(CorruptionError):
        model.decode(pack(tree_value(*entries)))


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(entry_value(b"x" * 255), id="name-255-bytes"),
        pytest.param(entry_value(kind=ENTRY_SYMLINK, target=b"t" * 4096, size=4096), id="link-target-4096-bytes"),
    ],
)
def test_decode_accepts_limit_sizes(entry: list) -> None:
    tree = model.decode(pack(tree_value(entry)))
    assert tree.entries[0] == TreeEntry(*entry)


def test_decode_rejects_wrong_kind() -> None:
    with pytest.raises(CorruptionError) as caught:
        model.decode(CANONICAL_MANIFEST, KIND_TREE)
    assert caught.value.expected == "tree"
    assert caught.value.actual == "manifest"


def test_decode_rejects_oversized_object() -> None:
    with pytest.raises(CorruptionError):
        model.decode(bytes(model.MAX_OBJECT_BYTES + 1))


@pytest.mark.parametrize("kind", [[], {}], ids=["list", "map"])
def test_decode_rejects_unhashable_kind(kind: object) -> None:
    with pytest.raises(CorruptionError):
        model.decode(pack([kind, VERSION, 0, []]))


@pytest.mark.parametrize("kind", [[], {}], ids=["list", "map"])
def test_decode_rejects_unhashable_entry_kind(kind: object) -> None:
    with pytest.raises(CorruptionError):
        model.decode(pack(tree_value(entry_value(kind=kind))))


@pytest.mark.parametrize("data", [CANONICAL_MANIFEST, CANONICAL_TREE, CANONICAL_COMMIT], ids=["manifest", "tree", "commit"])
def test_decode_byte_flips_raise_corruption(data: bytes) -> None:
    """Every single-byte change of a valid encoding decodes to an object or raises CorruptionError."""
    unexpected = []
    for position in range(len(data)):
        for value in range(256):
            mutated = bytearray(data)
            mutated[position] = value
            try:
                model.decode(bytes(mutated))
            except CorruptionError:
                pass
            except Exception as exc:  # noqa: BLE001 - any other exception is the failure being searched for
                unexpected.append((position, value, repr(exc)))
    assert unexpected == []


# No per-example deadline: a loaded machine can pause any example, and these tests check results, not speed.
no_deadline = settings(deadline=None)

# Round trips ---------------------------------------------------------------------------

object_ids = st.binary(min_size=32, max_size=32)
uint63 = st.integers(min_value=0, max_value=2**63 - 1)


@st.composite
def manifests(draw) -> Manifest:
    sizes = draw(st.lists(st.integers(min_value=1, max_value=2**40), max_size=20))
    chunks = tuple(ChunkRef(draw(object_ids), size) for size in sizes)
    return Manifest(sum(sizes), chunks)


# Sizes stay far below the limits so generation is fast; the limits have their own cases above.
entry_names = (
    st.binary(min_size=1, max_size=40)
    .map(lambda name: name.replace(b"/", b"_").replace(b"\x00", b"_"))
    .filter(lambda name: name not in (b".", b"..", b".p2pvc"))
)
link_targets = st.binary(min_size=1, max_size=200).map(lambda target: target.replace(b"\x00", b"/"))


@st.composite
def tree_entries(draw, name: bytes) -> TreeEntry:
    kind = draw(st.sampled_from([ENTRY_FILE, ENTRY_DIR, ENTRY_SYMLINK]))
    if kind == ENTRY_SYMLINK:
        target = draw(link_targets)
        return TreeEntry(name, kind, False, target, len(target))
    executable = draw(st.booleans()) if kind == ENTRY_FILE else False
    return TreeEntry(name, kind, executable, draw(object_ids), draw(uint63))


@st.composite
def trees(draw) -> Tree:
    names = sorted(draw(st.sets(entry_names, max_size=12)))
    return Tree(tuple(draw(tree_entries(name)) for name in names))


metadata_keys = st.text(min_size=1, max_size=40).filter(
    lambda key: "=" not in key
    and unicodedata.category(key[0])[0] != "C"
    and len(key.encode("utf-8", "surrogatepass")) <= 128
)


@st.composite
def commits(draw) -> Commit:
    metadata = draw(st.dictionaries(metadata_keys, st.text(max_size=60), max_size=8))
    return Commit(
        tree=draw(object_ids),
        parents=tuple(draw(st.lists(object_ids, max_size=5, unique=True))),
        author=draw(st.binary(min_size=32, max_size=32)),
        time_ms=draw(uint63),
        message=draw(st.text(max_size=300)),
        metadata=tuple(sorted(metadata.items())),
        signature=draw(st.binary(min_size=64, max_size=64)),
    )


stored_objects = st.one_of(manifests(), trees(), commits())


@no_deadline
@given(stored_objects)
def test_round_trip_decode_encode(obj: model.StoredObject) -> None:
    assert model.decode(model.encode(obj)) == obj


@no_deadline
@given(stored_objects)
def test_round_trip_expected_kind(obj: model.StoredObject) -> None:
    assert model.decode(model.encode(obj), obj.kind) == obj


@no_deadline
@given(stored_objects)
def test_hash_object_ids_encoding(obj: model.StoredObject) -> None:
    oid, data = model.hash_object(obj)
    assert oid == object_id(data)


@no_deadline
@given(commits())
def test_signing_payload_ignores_signature(commit: Commit) -> None:
    other = Commit(commit.tree, commit.parents, commit.author, commit.time_ms, commit.message, commit.metadata, b"\x00" * 64)
    assert commit.signing_payload() == other.signing_payload()
