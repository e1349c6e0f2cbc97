"""Three-way merge of text files, line by line, in the style of diff3.

Theory of operation. Both sides are compared with the common base using
difflib's matching blocks. A base line range that is matched on *both*
sides is a sync region: both sides kept those lines. Between two sync
regions, each side either left the base lines alone or changed them:

* neither side changed them: nothing to do (the gap is empty);
* only one side changed them: that side's lines are taken;
* both sides made the same change: taken once;
* both sides changed them differently: a conflict, written between
  `<<<<<<< OURS`, `=======` and `>>>>>>> THEIRS` marker lines.

Edits on adjacent lines with no unchanged line between them fall into one
gap, so they conflict, as in diff3 and git. Lines shared at the start or
the end of both sides of a conflict are moved out of it, so the markers
enclose only the lines that really differ.

Everything here is pure: the callers read and write the files. Lines are
bytes with their line endings kept, so a merge never changes the
encoding or the line-ending style of lines it does not touch.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

TEXT_SNIFF_BYTES = 8 * 1024  # a NUL in this prefix marks a file as binary, as git decides
# Larger files are merged as binary (ours kept, theirs written beside it): difflib's
# matching is quadratic in the worst case, and such files are data, rarely hand-edited.
MAX_TEXT_MERGE_BYTES = 8 * 1024 * 1024

OURS_MARKER = b"<<<<<<<"
SEPARATOR_MARKER = b"======="
THEIRS_MARKER = b">>>>>>>"

# A conflict copy is NAME.theirs-<12 hex of their commit>[-N] before the last extension.
COPY_TAG = b".theirs-"
_COPY_NAME = re.compile(rb"\.theirs-[0-9a-f]{12}(?:-[0-9]+)?(?:\.|$)")
MAX_NAME_BYTES = 255  # the file-system limit per path component, as p2pvc.objects.model enforces


def is_text(data: bytes) -> bool:
    """Return whether `data` is text: no NUL in its first 8 KiB, and valid UTF-8 throughout."""
    if b"\x00" in data[:TEXT_SNIFF_BYTES]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def split_lines(data: bytes) -> list[bytes]:
    """Split into lines that keep their endings (\\n, \\r\\n or \\r), so joining gives `data` back."""
    return data.splitlines(keepends=True)


@dataclass(frozen=True)
class Hunk:
    """One stretch of the merge result.

    `kind` is "unchanged", "ours", "theirs", "same" (both made the same change)
    or "conflict". Ranges are half-open line index ranges into each input.
    """

    kind: str
    base: tuple[int, int]
    ours: tuple[int, int]
    theirs: tuple[int, int]


def sync_regions(base: Sequence[bytes], ours: Sequence[bytes], theirs: Sequence[bytes]) -> list[tuple[int, int, int, int, int, int]]:
    """Return the sync regions (base_start, base_end, ours_start, ours_end, theirs_start, theirs_end).

    The list ends with an empty region at the end of all three inputs, so
    the gap after the last real region is processed like any other.
    """
    # autojunk would treat frequent lines (blank lines, braces) as junk and miss real matches.
    ours_blocks = difflib.SequenceMatcher(None, base, ours, autojunk=False).get_matching_blocks()
    theirs_blocks = difflib.SequenceMatcher(None, base, theirs, autojunk=False).get_matching_blocks()
    regions = []
    i = j = 0
    # Both block lists are sorted by base position and end with a zero-length sentinel.
    while i < len(ours_blocks) and j < len(theirs_blocks):
        o_base, o_side, o_len = ours_blocks[i]
        t_base, t_side, t_len = theirs_blocks[j]
        start = max(o_base, t_base)
        end = min(o_base + o_len, t_base + t_len)
        if start < end:
            regions.append(
                (start, end, o_side + start - o_base, o_side + end - o_base, t_side + start - t_base, t_side + end - t_base)
            )
        # Advance the block that ends first, because the other may still overlap the next one.
        if o_base + o_len < t_base + t_len:
            i += 1
        else:
            j += 1
    regions.append((len(base), len(base), len(ours), len(ours), len(theirs), len(theirs)))
    return regions


def merge_hunks(base: Sequence[bytes], ours: Sequence[bytes], theirs: Sequence[bytes]) -> Iterator[Hunk]:
    """Yield the hunks of the three-way merge, in order."""
    base_pos = ours_pos = theirs_pos = 0
    for b_start, b_end, o_start, o_end, t_start, t_end in sync_regions(base, ours, theirs):
        if o_start > ours_pos or t_start > theirs_pos or b_start > base_pos:
            base_part = base[base_pos:b_start]
            ours_part = ours[ours_pos:o_start]
            theirs_part = theirs[theirs_pos:t_start]
            ranges = ((base_pos, b_start), (ours_pos, o_start), (theirs_pos, t_start))
            if ours_part == theirs_part:
                yield Hunk("same", *ranges)
            elif ours_part == base_part:
                yield Hunk("theirs", *ranges)
            elif theirs_part == base_part:
                yield Hunk("ours", *ranges)
            else:
                yield Hunk("conflict", *ranges)
        if b_end > b_start:
            yield Hunk("unchanged", (b_start, b_end), (o_start, o_end), (t_start, t_end))
        base_pos, ours_pos, theirs_pos = b_end, o_end, t_end


@dataclass
class MergedText:
    lines: list[bytes]
    conflicts: int  # number of conflict regions written with markers

    @property
    def data(self) -> bytes:
        return b"".join(self.lines)


def merge_lines(
    base: Sequence[bytes],
    ours: Sequence[bytes],
    theirs: Sequence[bytes],
    *,
    ours_label: str = "HEAD",
    theirs_label: str = "theirs",
) -> MergedText:
    """Merge two edited versions of `base`, writing marker lines around conflicting stretches."""
    result: list[bytes] = []
    conflicts = 0
    for hunk in merge_hunks(base, ours, theirs):
        if hunk.kind in ("unchanged", "ours", "same"):
            result.extend(ours[hunk.ours[0] : hunk.ours[1]])
        elif hunk.kind == "theirs":
            result.extend(theirs[hunk.theirs[0] : hunk.theirs[1]])
        else:
            ours_part = list(ours[hunk.ours[0] : hunk.ours[1]])
            theirs_part = list(theirs[hunk.theirs[0] : hunk.theirs[1]])
            head, ours_part, theirs_part, tail = _trim_common(ours_part, theirs_part)
            result.extend(head)
            if ours_part or theirs_part:
                conflicts += 1
                result.extend(_conflict_block(ours_part, theirs_part, ours_label, theirs_label))
            result.extend(tail)
    return MergedText(result, conflicts)


def merge_text(base: bytes, ours: bytes, theirs: bytes, *, ours_label: str = "HEAD", theirs_label: str = "theirs") -> MergedText:
    """Merge byte strings line by line, as `merge_lines` does."""
    return merge_lines(
        split_lines(base), split_lines(ours), split_lines(theirs), ours_label=ours_label, theirs_label=theirs_label
    )


def _trim_common(ours: list[bytes], theirs: list[bytes]) -> tuple[list[bytes], list[bytes], list[bytes], list[bytes]]:
    """Split off the lines both sides share at the start and at the end of a conflict."""
    head = 0
    while head < len(ours) and head < len(theirs) and ours[head] == theirs[head]:
        head += 1
    tail = 0
    while (
        tail < len(ours) - head and tail < len(theirs) - head and ours[len(ours) - 1 - tail] == theirs[len(theirs) - 1 - tail]
    ):
        tail += 1
    return (
        ours[:head],
        ours[head : len(ours) - tail],
        theirs[head : len(theirs) - tail],
        ours[len(ours) - tail :] if tail else [],
    )


def _conflict_block(ours: list[bytes], theirs: list[bytes], ours_label: str, theirs_label: str) -> list[bytes]:
    block = [OURS_MARKER + b" " + ours_label.encode() + b"\n"]
    block.extend(_terminated(ours))
    block.append(SEPARATOR_MARKER + b"\n")
    block.extend(_terminated(theirs))
    block.append(THEIRS_MARKER + b" " + theirs_label.encode() + b"\n")
    return block


def _terminated(lines: list[bytes]) -> list[bytes]:
    """Return `lines` with a newline added to the last one if it lacks one, so a marker starts its own line."""
    if lines and not lines[-1].endswith((b"\n", b"\r")):
        return [*lines[:-1], lines[-1] + b"\n"]
    return lines


def has_conflict_markers(data: bytes, ours_label: str = "HEAD") -> bool:
    """Return whether `data` still contains an opening marker line written by `merge_lines`."""
    opening = OURS_MARKER + b" " + ours_label.encode()
    return any(line.rstrip(b"\r\n") == opening for line in split_lines(data))


# Conflict copies of binary files ---------------------------------------------------------


def is_conflict_copy(name: bytes) -> bool:
    """Return whether a file name marks the file as a conflict copy written by a merge."""
    return _COPY_NAME.search(name) is not None


def conflict_copy_name(name: bytes, commit_hex: str, attempt: int = 1) -> bytes:
    """Return the name of the copy of their version of `name`.

    The tag `.theirs-<first 12 hex digits of their commit>` goes before the
    last extension, so tools still recognise the file type:
    `model.safetensors` becomes `model.theirs-0123456789ab.safetensors`. A
    name without an extension, or whose only dot is the first character,
    gets the tag at its end. `attempt` > 1 appends `-N` to the tag, for when
    the first name is taken. The stem is shortened to keep the name within
    255 bytes.
    """
    tag = COPY_TAG + commit_hex[:12].encode() + (b"-%d" % attempt if attempt > 1 else b"")
    dot = name.rfind(b".")
    stem, extension = (name[:dot], name[dot:]) if dot > 0 else (name, b"")
    room = MAX_NAME_BYTES - len(tag) - len(extension)
    if room < 1:
        # The extension alone is too long to keep: put the tag at the end of a shortened name.
        stem, extension = name, b""
        room = MAX_NAME_BYTES - len(tag)
    return stem[:room] + tag + extension
