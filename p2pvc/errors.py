"""Errors, classified by who is at fault and what the user should do next.

Each class carries an exit code, so the CLI maps any failure to one line and
one code without knowing where it came from. Library code raises these and
never prints.
"""

from __future__ import annotations


class P2pvcError(Exception):
    """Base class. `hint` tells the user what to do next."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UserError(P2pvcError):
    """The user's input is invalid: an unknown revision, a bad option value."""

    exit_code = 3


class NotARepositoryError(UserError):
    """No `.p2pvc` folder was found in the folder or any parent."""


class ConflictError(P2pvcError):
    """The operation would lose work or raced another writer; nothing was changed."""

    exit_code = 4


class CorruptionError(P2pvcError):
    """Stored or received data does not match its hash or its format."""

    exit_code = 5

    def __init__(
        self,
        message: str,
        *,
        expected: str | None = None,
        actual: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.expected = expected
        self.actual = actual


class StorageError(P2pvcError):
    """The local disk or file system failed: full disk, permissions, I/O error."""

    exit_code = 6


class SignatureError(CorruptionError):
    """A signature does not verify, or the signer is not allowed to sign this."""

    exit_code = 7


class InvalidSignatureError(SignatureError):
    """A signature does not verify at all: the signed data was forged or damaged."""


class PeerError(P2pvcError):
    """A remote peer is unreachable or broke the protocol."""

    exit_code = 8
