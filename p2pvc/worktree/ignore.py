"""Gitignore-syntax matching for `.p2pvcignore` files.

The syntax and precedence rules are those of gitignore(5) (git 2.39), and the
glob details follow git's wildmatch with its WM_PATHNAME flag. Each
`IgnoreFile` belongs to one directory, called its base. Each pattern line is
translated once into a regular expression over the path relative to that base.
Patterns that contain no slash, apart from a trailing one, match the last path
component at any depth below the base instead.

Within one file the last matching pattern decides. So that one regex call
decides a path, `IgnoreFile` joins its patterns into a single alternation in
reverse line order with one capturing group per pattern. The regex engine
takes the first alternative that matches the whole path, which is the last
matching line, and `Match.lastindex` names it. There are two such
alternations, one for directories and one for other paths, so that patterns
with a trailing slash never reach files.

`IgnoreStack` contains the files that apply to one directory, from the root
down. A deeper file overrides a shallower one.

Only the path itself is matched, never its parent directories. The worktree
scanner does not descend into an ignored directory, so a file below an
ignored directory stays ignored even where a later `!` pattern names it. Git
has the same rule. A caller that checks a deep path directly, without
walking down to it, must also check each parent directory itself.

Matching is case-sensitive, as in git with `core.ignoreCase` off. A
malformed pattern, such as an unterminated `[`, never matches, and the other
lines of the file still apply. Git's wildmatch behaves the same way.

NOTE: `?` and bracket expressions match one character here, but one byte in
git. So `?` and `[é]` match the name "é" here, which git 2.39 does not.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# ASCII-only sets, so that the result does not depend on the locale.
_POSIX_CLASSES: dict[str, str] = {
    "alnum": "a-zA-Z0-9",
    "alpha": "a-zA-Z",
    "blank": " \\t",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "\\x21-\\x7e",
    "lower": "a-z",
    "print": "\\x20-\\x7e",
    "punct": "\\x21-\\x2f\\x3a-\\x40\\x5b-\\x60\\x7b-\\x7e",
    "space": " \\t\\n\\r\\f\\v",
    "upper": "A-Z",
    "xdigit": "0-9A-Fa-f",
}

# Matches zero or more whole directories, including their trailing slashes.
_ANY_DIRECTORIES = "(?:.*/)?"


class _MalformedPattern(Exception):
    """Raised while translating a pattern that git never matches, such as an unterminated `[`."""


@dataclass(frozen=True, slots=True)
class IgnorePattern:
    """One pattern line of an ignore file, after parsing.

    Attributes:
        text: The line as written, after trailing spaces are trimmed.
        line_number: 1-based line number in the ignore file.
        negated: True for a `!` pattern, which re-includes what it matches.
        directory_only: True when the line ends with `/`, so that the pattern
            matches directories only.
        anchored: True when the pattern matches the whole path relative to the
            base, False when it matches the last path component at any depth.
        regex: Regex source over the path relative to the base, to be used with
            re.DOTALL. None when the pattern can never match.
    """

    text: str
    line_number: int
    negated: bool
    directory_only: bool
    anchored: bool
    regex: str | None


class IgnoreFile:
    """Patterns of one .p2pvcignore file, located in directory `base`."""

    __slots__ = ("base", "patterns", "_file_regex", "_file_groups", "_dir_regex", "_dir_groups")

    def __init__(self, base: str, patterns: tuple[IgnorePattern, ...]) -> None:
        if base.startswith("/") or base.endswith("/"):
            raise ValueError(
                f"invalid ignore file base {base!r}: expected a path relative to the "
                "worktree root without leading or trailing slash, or '' for the root"
            )
        self.base = base
        self.patterns = patterns

        file_patterns = tuple(p for p in patterns if not p.directory_only)
        self._file_regex, self._file_groups = _compile_alternation(base, file_patterns)
        self._dir_regex, self._dir_groups = _compile_alternation(base, patterns)

    @classmethod
    def parse(cls, text: str, base: str = "") -> IgnoreFile:
        """Parse the text of an ignore file located in directory `base`.

        `base` is the posix path of that directory relative to the worktree
        root, or "" for the root. Lines that are not valid patterns never
        match, so parsing raises only for an invalid `base`.
        """
        # Git skips a UTF-8 byte order mark at the start of an ignore file.
        text = text.removeprefix("\ufeff")

        patterns: list[IgnorePattern] = []
        for index, line in enumerate(text.split("\n")):
            # Git strips one CR so that files with CRLF line endings work.
            line = line.removesuffix("\r")
            if not line or line.startswith("#"):
                continue
            pattern = _parse_line(_trim_trailing_spaces(line), index + 1)
            if pattern is not None:
                patterns.append(pattern)
        return cls(base, tuple(patterns))

    @classmethod
    def read(cls, file_path: str | os.PathLike[str], base: str = "") -> IgnoreFile:
        """Read and parse one ignore file located in directory `base`."""
        data = Path(file_path).read_bytes()
        # surrogateescape keeps undecodable bytes as os.fsdecode does on
        # POSIX, so that such patterns can still match the scanner's paths.
        return cls.parse(data.decode("utf-8", errors="surrogateescape"), base)

    def last_match(self, path: str, is_dir: bool) -> IgnorePattern | None:
        """Return the last pattern of this file that matches `path`, or None.

        `path` is a posix path relative to the worktree root, with no leading
        or trailing slash. Paths that are not below `base` never match.
        """
        if is_dir:
            regex, groups = self._dir_regex, self._dir_groups
        else:
            regex, groups = self._file_regex, self._file_groups
        if regex is None:
            return None

        match = regex.fullmatch(path)
        if match is None:
            return None
        # Each alternative is one capturing group, so a match always sets lastindex.
        assert match.lastindex is not None
        return groups[match.lastindex - 1]

    def match(self, path: str, is_dir: bool) -> bool | None:
        """Return whether this file ignores `path`, or None when no pattern matches.

        True means that the last matching pattern ignores the path, False
        that it is a `!` negation. The `path` contract is that of `last_match`.
        """
        pattern = self.last_match(path, is_dir)
        if pattern is None:
            return None
        return not pattern.negated

    def __repr__(self) -> str:
        return f"IgnoreFile(base={self.base!r}, patterns={len(self.patterns)})"


@dataclass(frozen=True, slots=True)
class IgnoreStack:
    """Immutable stack of IgnoreFile objects, from the root down to the current directory."""

    files: tuple[IgnoreFile, ...] = ()

    def __post_init__(self) -> None:
        # A list argument would make the stack mutable through the caller's
        # reference, so store a tuple whatever the caller passed.
        object.__setattr__(self, "files", tuple(self.files))

    def push(self, ignore_file: IgnoreFile) -> IgnoreStack:
        """Return a new stack with `ignore_file` on top, leaving this one unchanged."""
        return IgnoreStack(self.files + (ignore_file,))

    def is_ignored(self, path: str, is_dir: bool) -> bool:
        """Return whether `path` is ignored by the files in this stack.

        The deepest file with a matching pattern decides, and a path that no
        pattern matches is not ignored. This does not check the parent
        directories of `path`, which the module docstring explains.
        """
        for ignore_file in reversed(self.files):
            result = ignore_file.match(path, is_dir)
            if result is not None:
                return result
        return False


def _trim_trailing_spaces(line: str) -> str:
    """Remove trailing spaces, except a space escaped with a backslash.

    Only ASCII spaces count, as in git. Tabs stay part of the pattern.
    """
    last_space: int | None = None
    index = 0
    while index < len(line):
        char = line[index]
        if char == " ":
            if last_space is None:
                last_space = index
        elif char == "\\":
            # The escaped character, even a space, is kept.
            index += 1
            last_space = None
        else:
            last_space = None
        index += 1
    if last_space is None:
        return line
    return line[:last_space]


def _parse_line(text: str, line_number: int) -> IgnorePattern | None:
    """Parse one non-comment line, or return None for a line with no pattern."""
    body = text
    negated = body.startswith("!")
    if negated:
        body = body[1:]

    # Git removes a single trailing slash, so "a//" keeps "a/" as its body
    # and can never match a path.
    directory_only = body.endswith("/")
    if directory_only:
        body = body[:-1]

    # Git tests for a slash in the raw text, even an escaped one or one
    # inside brackets, so this does too.
    anchored = "/" in body
    if anchored and body.startswith("/"):
        body = body[1:]

    # "", "!" and "/" leave an empty body, which git keeps but which matches
    # no path. Dropping it keeps it out of the alternation.
    if not body:
        return None

    try:
        regex: str | None = _translate_glob(body)
    except _MalformedPattern:
        regex = None
    if regex is not None and not anchored:
        regex = _ANY_DIRECTORIES + regex

    return IgnorePattern(
        text=text,
        line_number=line_number,
        negated=negated,
        directory_only=directory_only,
        anchored=anchored,
        regex=regex,
    )


def _translate_glob(glob: str) -> str:
    """Translate a wildmatch glob with WM_PATHNAME semantics into regex source.

    Raises _MalformedPattern for the patterns that git's wildmatch never
    matches: a trailing lone backslash, an unterminated `[` and an unknown
    `[:name:]` class.
    """
    parts: list[str] = []
    index = 0
    length = len(glob)
    while index < length:
        char = glob[index]
        if char == "\\":
            if index + 1 == length:
                raise _MalformedPattern(glob)
            parts.append(re.escape(glob[index + 1]))
            index += 2
        elif char == "*":
            index = _translate_stars(glob, index, parts)
        elif char == "?":
            parts.append("[^/]")
            index += 1
        elif char == "[":
            class_regex, index = _translate_bracket(glob, index)
            parts.append(class_regex)
        else:
            parts.append(re.escape(char))
            index += 1
    return "".join(parts)


def _translate_stars(glob: str, start: int, parts: list[str]) -> int:
    """Append the regex for the run of `*` at `start` and return the next index."""
    end = start
    while end < len(glob) and glob[end] == "*":
        end += 1

    # A run of two or more stars crosses slashes only when it fills a whole
    # path component: "**/x", "x/**/y" or "x/**". Elsewhere it acts as "*".
    # An escaped slash after the run also counts, as in wildmatch.
    # NOTE: git 2.39 differs when such a run directly follows the literal
    # start of an anchored pattern. It strips that literal before calling
    # wildmatch, so "a**/b" there also matches "ab" and "ax/y/b". This code
    # follows gitignore(5) and wildmatch, which treat that run as "*".
    follows_slash = start == 0 or glob[start - 1] == "/"
    rest = glob[end:]
    if end - start < 2 or not follows_slash:
        parts.append("[^/]*")
        return end
    if rest.startswith("/"):
        # The slash is consumed so that "**/" can also match zero directories.
        parts.append(_ANY_DIRECTORIES)
        return end + 1
    if not rest or rest.startswith("\\/"):
        parts.append(".*")
        return end
    parts.append("[^/]*")
    return end


def _translate_bracket(glob: str, start: int) -> tuple[str, int]:
    """Translate the bracket expression at `start` and return (regex, next index).

    Follows git's wildmatch. `!` or `^` first negates the set, `]` right after
    the opening bracket or the negation is a literal, and `\\` escapes any
    character. The set never matches `/`, because WM_PATHNAME keeps every
    wildcard within one path component.
    """
    index = start + 1
    negated = False
    if index < len(glob) and glob[index] in "!^":
        negated = True
        index += 1

    items: list[str] = []
    previous: str | None = None
    first = True
    while True:
        if index >= len(glob):
            raise _MalformedPattern(glob)
        char = glob[index]
        if char == "]" and not first:
            index += 1
            break
        first = False

        if char == "\\":
            index += 1
            if index >= len(glob):
                raise _MalformedPattern(glob)
            char = glob[index]
            items.append(re.escape(char))
            previous = char
            index += 1
        elif (
            char == "-"
            and previous is not None
            and index + 1 < len(glob)
            and glob[index + 1] != "]"
        ):
            index += 1
            high = glob[index]
            if high == "\\":
                index += 1
                if index >= len(glob):
                    raise _MalformedPattern(glob)
                high = glob[index]
            # The low end is already a member on its own, so a reversed
            # range such as "z-a" adds nothing and the set still matches "z".
            if previous <= high:
                items.append(f"{re.escape(previous)}-{re.escape(high)}")
            # Git starts afresh after a range, so "a-c-e" is a-c, "-" and "e".
            previous = None
            index += 1
        elif char == "[" and glob.startswith(":", index + 1):
            # Like wildmatch, look only as far as the next "]". Unless a ":"
            # precedes it, the "[" is an ordinary member.
            close = glob.find("]", index + 2)
            if close == -1:
                raise _MalformedPattern(glob)
            if close == index + 2 or glob[close - 1] != ":":
                items.append(re.escape(char))
                previous = char
                index += 1
            else:
                name = glob[index + 2 : close - 1]
                if name not in _POSIX_CLASSES:
                    raise _MalformedPattern(glob)
                items.append(_POSIX_CLASSES[name])
                previous = None
                index = close + 1
        else:
            items.append(re.escape(char))
            previous = char
            index += 1

    # The loop above always adds a member before it reaches the closing "]",
    # so the set is never empty.
    members = "".join(items)
    if negated:
        return f"[^/{members}]", index
    return f"(?!/)[{members}]", index


def _compile_alternation(
    base: str, patterns: tuple[IgnorePattern, ...]
) -> tuple[re.Pattern[str] | None, tuple[IgnorePattern, ...]]:
    """Compile the patterns into one regex whose group N is the Nth returned pattern.

    The groups run from the last line to the first, so the first alternative
    that matches is the last matching line.
    """
    groups = tuple(p for p in reversed(patterns) if p.regex is not None)
    if not groups:
        return None, ()

    alternatives = "|".join(f"({p.regex})" for p in groups)
    prefix = re.escape(base) + "/" if base else ""
    # DOTALL, because "*" in a glob matches any character except "/",
    # newlines included.
    return re.compile(f"{prefix}(?:{alternatives})", re.DOTALL), groups
