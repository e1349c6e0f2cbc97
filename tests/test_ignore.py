"""Tests for the gitignore-syntax matcher in p2pvc.worktree.ignore.

Expected results follow gitignore(5). Each row of the match tables was also
run through `git check-ignore` from git 2.39, allowing for git's rule that a
path below an ignored directory is ignored. Git agrees with every row except
the one whose comment says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pvc.worktree.ignore import IgnoreFile, IgnoreStack

# Each row is (pattern lines, path, is_dir, expected result of match()) for an
# ignore file in the worktree root.
ROOT_CASES = [
    # Blank lines and comments.
    pytest.param((), "a", False, None, id="empty-file"),
    pytest.param(("", "   "), "a", False, None, id="blank-lines"),
    pytest.param(("#a",), "#a", False, None, id="comment"),
    pytest.param(("# a",), "# a", False, None, id="comment-with-space"),
    pytest.param(("\\#a",), "#a", False, True, id="escaped-hash"),
    pytest.param((" #a",), " #a", False, True, id="hash-after-space-is-pattern"),
    # Negation, where the last matching line decides.
    pytest.param(("*.log", "!keep.log"), "keep.log", False, False, id="negation-reincludes"),
    pytest.param(("*.log", "!keep.log"), "x.log", False, True, id="negation-leaves-others"),
    pytest.param(("!keep.log", "*.log"), "keep.log", False, True, id="later-line-wins"),
    pytest.param(("!a",), "a", False, False, id="negation-alone"),
    pytest.param(("\\!a",), "!a", False, True, id="escaped-bang"),
    pytest.param(("\\!a",), "a", False, None, id="escaped-bang-not-negation"),
    # Trailing spaces.
    pytest.param(("a  ",), "a", False, True, id="trailing-spaces-trimmed"),
    pytest.param(("a  ",), "a ", False, None, id="trailing-spaces-not-kept"),
    pytest.param(("a\\ ",), "a ", False, True, id="escaped-trailing-space"),
    pytest.param(("a\\ ",), "a", False, None, id="escaped-space-required"),
    pytest.param(("a\\  ",), "a ", False, True, id="escaped-space-then-trimmed"),
    pytest.param(("a\t",), "a", False, None, id="trailing-tab-kept"),
    pytest.param(("a\t",), "a\t", False, True, id="trailing-tab-matches"),
    pytest.param(("a b",), "a b", False, True, id="inner-space"),
    # Line endings and byte order mark.
    pytest.param(("a\r",), "a", False, True, id="crlf-line"),
    pytest.param(("\ufeffa",), "a", False, True, id="byte-order-mark"),
    # Directory-only patterns.
    pytest.param(("build/",), "build", True, True, id="dir-pattern-on-dir"),
    pytest.param(("build/",), "build", False, None, id="dir-pattern-on-file"),
    pytest.param(("build/",), "src/build", True, True, id="dir-pattern-any-depth"),
    pytest.param(("/build/",), "src/build", True, None, id="anchored-dir-pattern"),
    pytest.param(("build",), "build", True, True, id="plain-pattern-on-dir"),
    # Anchoring.
    pytest.param(("/a",), "a", False, True, id="leading-slash-top"),
    pytest.param(("/a",), "x/a", False, None, id="leading-slash-nested"),
    pytest.param(("a/b",), "a/b", False, True, id="middle-slash-top"),
    pytest.param(("a/b",), "x/a/b", False, None, id="middle-slash-nested"),
    pytest.param(("a",), "x/y/a", False, True, id="name-any-depth"),
    pytest.param(("a",), "x/a/y", False, None, id="name-not-parent"),
    pytest.param(("*.py",), "src/m.py", False, True, id="suffix-any-depth"),
    # Star and question mark.
    pytest.param(("*",), "a", False, True, id="star-any-name"),
    pytest.param(("*",), "x/y", True, True, id="star-nested"),
    pytest.param(("/a*",), "ab", False, True, id="star-in-name"),
    pytest.param(("/a*",), "a/b", False, None, id="star-not-slash"),
    pytest.param(("a/*",), "a/b", False, True, id="star-one-level"),
    pytest.param(("a/*",), "a/b/c", False, None, id="star-not-two-levels"),
    pytest.param(("?",), "a", False, True, id="question-one-char"),
    pytest.param(("?",), "ab", False, None, id="question-not-two-chars"),
    pytest.param(("/a?b",), "a/b", False, None, id="question-not-slash"),
    pytest.param(("a*",), "a\nb", False, True, id="star-matches-newline"),
    # Bracket expressions.
    pytest.param(("[ab].txt",), "a.txt", False, True, id="class-member"),
    pytest.param(("[ab].txt",), "c.txt", False, None, id="class-non-member"),
    pytest.param(("[!ab].txt",), "c.txt", False, True, id="negated-class-member"),
    pytest.param(("[!ab].txt",), "a.txt", False, None, id="negated-class-non-member"),
    pytest.param(("[^ab].txt",), "c.txt", False, True, id="caret-negated-class"),
    pytest.param(("[a-c]x",), "bx", False, True, id="range-inside"),
    pytest.param(("[a-c]x",), "dx", False, None, id="range-outside"),
    pytest.param(("[]a]",), "]", False, True, id="bracket-first-literal"),
    pytest.param(("[!]a]",), "]", False, None, id="negated-bracket-first"),
    pytest.param(("[\\]]",), "]", False, True, id="escaped-bracket-in-class"),
    pytest.param(("[a-]",), "-", False, True, id="dash-last-literal"),
    pytest.param(("[a-c-e]",), "-", False, True, id="dash-after-range"),
    pytest.param(("[a-c-e]",), "d", False, None, id="no-range-after-range"),
    pytest.param(("[z-a]",), "z", False, True, id="reversed-range-low-end"),
    pytest.param(("[z-a]",), "b", False, None, id="reversed-range-empty"),
    pytest.param(("[[:digit:]]*",), "7up", False, True, id="posix-class-member"),
    pytest.param(("[[:digit:]]*",), "up", False, None, id="posix-class-non-member"),
    pytest.param(("[![:upper:]]",), "a", False, True, id="negated-posix-class"),
    pytest.param(("/a[!b]c",), "a/c", False, None, id="negated-class-not-slash"),
    pytest.param(("/a[+-0]c",), "a/c", False, None, id="range-not-slash"),
    pytest.param(("/a[+-0]c",), "a.c", False, True, id="range-with-slash-other"),
    # Two consecutive asterisks.
    pytest.param(("**/foo",), "foo", False, True, id="leading-stars-top"),
    pytest.param(("**/foo",), "a/b/foo", False, True, id="leading-stars-nested"),
    pytest.param(("**/foo/bar",), "foo/bar", False, True, id="leading-stars-pair-top"),
    pytest.param(("**/foo/bar",), "x/foo/bar", False, True, id="leading-stars-pair-nested"),
    pytest.param(("**/foo/bar",), "foo/x/bar", False, None, id="leading-stars-pair-gap"),
    pytest.param(("abc/**",), "abc/x", False, True, id="trailing-stars-child"),
    pytest.param(("abc/**",), "abc/x/y", False, True, id="trailing-stars-grandchild"),
    pytest.param(("abc/**",), "abc", True, None, id="trailing-stars-not-dir"),
    pytest.param(("a/**/b",), "a/b", False, True, id="middle-stars-zero-dirs"),
    pytest.param(("a/**/b",), "a/x/b", False, True, id="middle-stars-one-dir"),
    pytest.param(("a/**/b",), "a/x/y/b", False, True, id="middle-stars-two-dirs"),
    pytest.param(("a/**/b",), "ab/b", False, None, id="middle-stars-whole-name"),
    pytest.param(("a/**/b",), "x/a/b", False, None, id="middle-stars-anchored"),
    pytest.param(("**",), "a/b/c", False, True, id="stars-alone"),
    pytest.param(("/a**b",), "axyb", False, True, id="inner-stars-as-star"),
    pytest.param(("/a**b",), "a/b", False, None, id="inner-stars-not-slash"),
    # git 2.39 also matches "ax/y/b" and "ab" here, unlike gitignore(5).
    pytest.param(("a**/b",), "ax/b", False, True, id="stars-after-name"),
    pytest.param(("a**/b",), "ax/y/b", False, None, id="stars-after-name-one-level"),
    pytest.param(("/a**",), "ab/c", False, None, id="stars-at-end-after-name"),
    pytest.param(("***/a",), "x/y/a", False, True, id="three-stars-as-two"),
    pytest.param(("**/",), "d", True, True, id="stars-dir-only"),
    pytest.param(("**/",), "d", False, None, id="stars-dir-only-file"),
    # Backslash escapes.
    pytest.param(("\\*",), "*", False, True, id="escaped-star"),
    pytest.param(("\\*",), "a", False, None, id="escaped-star-literal"),
    pytest.param(("\\[a]",), "[a]", False, True, id="escaped-bracket"),
    pytest.param(("\\[a]",), "a", False, None, id="escaped-bracket-literal"),
    pytest.param(("\\a",), "a", False, True, id="escaped-letter"),
    # Invalid or odd input, which git never matches.
    pytest.param(("[a",), "[a", False, None, id="unterminated-bracket"),
    pytest.param(("[a",), "a", False, None, id="unterminated-bracket-name"),
    pytest.param(("a[",), "a[", False, None, id="unterminated-bracket-end"),
    pytest.param(("[a", "b"), "b", False, True, id="malformed-line-others-apply"),
    pytest.param(("[[:bogus:]]",), "b", False, None, id="unknown-posix-class"),
    pytest.param(("[[:digit:]x",), "[:digit:]x", False, None, id="unterminated-posix-set"),
    pytest.param(("!",), "a", False, None, id="lone-bang"),
    pytest.param(("!",), "!", False, None, id="lone-bang-literal"),
    pytest.param(("/",), "a", True, None, id="lone-slash-dir"),
    pytest.param(("/",), "a", False, None, id="lone-slash-file"),
    pytest.param(("!/",), "a", True, None, id="negated-lone-slash"),
    pytest.param(("a//",), "a", True, None, id="double-trailing-slash"),
    pytest.param(("a\\",), "a\\", False, None, id="trailing-backslash"),
    pytest.param(("a\\",), "a", False, None, id="trailing-backslash-name"),
]


@pytest.mark.parametrize(("patterns", "path", "is_dir", "expected"), ROOT_CASES)
def test_match_root_file(
    patterns: tuple[str, ...], path: str, is_dir: bool, expected: bool | None
) -> None:
    ignore_file = IgnoreFile.parse("\n".join(patterns))
    assert ignore_file.match(path, is_dir) is expected


# Each row is (base, pattern lines, path, is_dir, expected) for an ignore file
# in a subdirectory.
NESTED_CASES = [
    pytest.param("sub", ("a",), "sub/a", False, True, id="name-in-base"),
    pytest.param("sub", ("a",), "sub/x/a", False, True, id="name-below-base"),
    pytest.param("sub", ("a",), "a", False, None, id="name-above-base"),
    pytest.param("sub", ("a",), "other/a", False, None, id="name-beside-base"),
    pytest.param("sub", ("a",), "subx/a", False, None, id="base-prefix-not-dir"),
    pytest.param("sub", ("*",), "sub", True, None, id="base-dir-itself"),
    pytest.param("sub", ("/a",), "sub/a", False, True, id="anchored-in-base"),
    pytest.param("sub", ("/a",), "sub/x/a", False, None, id="anchored-below-base"),
    pytest.param("sub", ("x/a",), "sub/x/a", False, True, id="middle-slash-in-base"),
    pytest.param("sub", ("x/a",), "x/a", False, None, id="middle-slash-outside-base"),
    pytest.param("sub", ("**/a",), "sub/a", False, True, id="leading-stars-in-base"),
    pytest.param("sub", ("**/a",), "sub/x/a", False, True, id="leading-stars-below-base"),
    pytest.param("sub", ("**/a",), "a", False, None, id="leading-stars-outside-base"),
    pytest.param("sub", ("/**",), "sub/x/y", False, True, id="anchored-stars-in-base"),
    pytest.param("sub", ("/**",), "x/y", False, None, id="anchored-stars-outside-base"),
    pytest.param("a/b", ("c",), "a/b/c", False, True, id="deep-base"),
    pytest.param("a/b", ("c",), "a/c", False, None, id="deep-base-parent"),
    pytest.param("s.b", ("a",), "s.b/a", False, True, id="base-with-dot"),
    pytest.param("s.b", ("a",), "sxb/a", False, None, id="base-dot-literal"),
    pytest.param("[x]", ("a",), "[x]/a", False, True, id="base-with-brackets"),
    pytest.param("[x]", ("a",), "x/a", False, None, id="base-brackets-literal"),
]


@pytest.mark.parametrize(("base", "patterns", "path", "is_dir", "expected"), NESTED_CASES)
def test_match_nested_file(
    base: str, patterns: tuple[str, ...], path: str, is_dir: bool, expected: bool | None
) -> None:
    ignore_file = IgnoreFile.parse("\n".join(patterns), base)
    assert ignore_file.match(path, is_dir) is expected


# Each row is (root pattern lines, "sub" pattern lines, path, is_dir, expected
# result of is_ignored()) for a stack of the root file and the file in "sub".
STACK_CASES = [
    pytest.param(("*.bin",), ("!keep.bin",), "sub/keep.bin", False, False, id="deeper-negation-wins"),
    pytest.param(("*.bin",), ("!keep.bin",), "sub/x.bin", False, True, id="shallower-applies"),
    pytest.param(("*.bin",), ("!keep.bin",), "keep.bin", False, True, id="deeper-outside-base"),
    pytest.param(("!a.log",), ("*.log",), "sub/a.log", False, True, id="deeper-ignore-wins"),
    pytest.param(("a",), ("b",), "sub/c", False, False, id="no-match-not-ignored"),
    pytest.param(("a/",), (), "sub/a", False, False, id="dir-pattern-file-path"),
    pytest.param(("a/",), (), "sub/a", True, True, id="dir-pattern-dir-path"),
]


@pytest.mark.parametrize(("root", "nested", "path", "is_dir", "expected"), STACK_CASES)
def test_stack_is_ignored(
    root: tuple[str, ...], nested: tuple[str, ...], path: str, is_dir: bool, expected: bool
) -> None:
    stack = IgnoreStack().push(IgnoreFile.parse("\n".join(root)))
    stack = stack.push(IgnoreFile.parse("\n".join(nested), "sub"))
    assert stack.is_ignored(path, is_dir) is expected


def test_stack_empty_ignores_nothing() -> None:
    stack = IgnoreStack()
    assert stack.is_ignored("a", False) is False
    assert stack.is_ignored("a", True) is False


def test_stack_push_leaves_original() -> None:
    ignore_file = IgnoreFile.parse("a")
    stack = IgnoreStack()
    pushed = stack.push(ignore_file)
    assert stack.files == ()
    assert pushed.files == (ignore_file,)
    assert pushed.is_ignored("a", False) is True
    assert stack.is_ignored("a", False) is False


def test_stack_copies_list_argument() -> None:
    files = [IgnoreFile.parse("a")]
    stack = IgnoreStack(files)  # type: ignore[arg-type]
    files.clear()
    assert isinstance(stack.files, tuple)
    assert stack.is_ignored("a", False) is True


def test_last_match_reports_line() -> None:
    ignore_file = IgnoreFile.parse("# comment\n*.log\n\n!keep.log\n")
    pattern = ignore_file.last_match("keep.log", False)
    assert pattern is not None
    assert pattern.line_number == 4
    assert pattern.text == "!keep.log"
    assert pattern.negated is True


def test_last_match_none_without_match() -> None:
    ignore_file = IgnoreFile.parse("*.log\n")
    assert ignore_file.last_match("a.txt", False) is None


def test_parse_pattern_flags() -> None:
    (pattern,) = IgnoreFile.parse("!/build/  \n").patterns
    assert pattern.text == "!/build/"
    assert pattern.negated is True
    assert pattern.directory_only is True
    assert pattern.anchored is True
    assert pattern.regex is not None


def test_parse_keeps_malformed_pattern() -> None:
    (pattern,) = IgnoreFile.parse("[a\n").patterns
    assert pattern.text == "[a"
    assert pattern.regex is None


def test_parse_skips_empty_patterns() -> None:
    ignore_file = IgnoreFile.parse("\n# c\n!\n/\n   \n")
    assert ignore_file.patterns == ()


@pytest.mark.parametrize("base", ["/sub", "sub/", "/"])
def test_parse_invalid_base_raises(base: str) -> None:
    with pytest.raises(ValueError, match="invalid ignore file base"):
        IgnoreFile.parse("a", base)


def test_read_ignore_file(tmp_path: Path) -> None:
    ignore_path = tmp_path / ".p2pvcignore"
    ignore_path.write_bytes(b"*.tmp\r\n!keep.tmp\r\nlatin-\xe9\r\n")
    ignore_file = IgnoreFile.read(ignore_path, "data")
    assert ignore_file.base == "data"
    assert ignore_file.match("data/x.tmp", False) is True
    assert ignore_file.match("data/keep.tmp", False) is False
    assert ignore_file.match("x.tmp", False) is None
    # os.fsdecode turns the undecodable byte of a file name into the same
    # surrogate, so such a pattern still matches the scanner's path.
    assert ignore_file.match("data/latin-\udce9", False) is True


def test_match_many_patterns() -> None:
    # One capturing group per pattern, so this checks that the combined
    # regex still picks the last matching line among many.
    lines = [f"file{i}" for i in range(2000)] + ["!file7"]
    ignore_file = IgnoreFile.parse("\n".join(lines))
    assert ignore_file.match("file1999", False) is True
    assert ignore_file.match("file7", False) is False
    assert ignore_file.match("file2000", False) is None
