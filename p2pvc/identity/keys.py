"""The user's Ed25519 identity: creation, storage, signing and verification.

The private key is a 32-byte seed in `$P2PVC_HOME/identity.key` (default
`~/.config/p2pvc`), created on first use with mode 0600. The same seed will
be the node's libp2p identity, so a user has one key for signing history and
for the network. Nothing here ever prints or logs the seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2pvc.errors import StorageError, UserError

SEED_SIZE = 32
KEY_FILE_NAME = "identity.key"
_SEED_HEADER = b"p2pvc-ed25519-seed-v1\n"


def home_dir() -> Path:
    env = os.environ.get("P2PVC_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "p2pvc"


def fingerprint(public_key: bytes) -> str:
    """Return a short, human-comparable fingerprint: 4 groups of 4 hex digits."""
    digest = blake3.blake3(public_key, derive_key_context="p2pvc 2026-12 key fingerprint").hexdigest()
    return "-".join(digest[i : i + 4] for i in range(0, 16, 4))


@dataclass(frozen=True)
class Identity:
    seed: bytes
    public_key: bytes

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != SEED_SIZE:
            raise ValueError(f"an Ed25519 seed has {SEED_SIZE} bytes, got {len(seed)}")
        public = Ed25519PrivateKey.from_private_bytes(seed).public_key()
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(seed, raw)

    @classmethod
    def generate(cls) -> Identity:
        return cls.from_seed(os.urandom(SEED_SIZE))

    def sign(self, payload: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.seed).sign(payload)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def __repr__(self) -> str:  # keeps the seed out of tracebacks and logs
        return f"Identity(public_key={self.public_key.hex()})"


def verify(public_key: bytes, signature: bytes, payload: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, payload)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_or_create(home: Path | None = None) -> Identity:
    """Load the user's identity, creating it (mode 0600) if there is none yet."""
    path = (home or home_dir()) / KEY_FILE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _create(path)
    except OSError as exc:
        raise StorageError(f"cannot read identity key {path}: {exc.strerror}") from exc
    if not data.startswith(_SEED_HEADER) or len(data) != len(_SEED_HEADER) + SEED_SIZE:
        raise UserError(
            f"identity key {path} is not a p2pvc key file",
            hint="restore it from a backup, or move it away to create a new identity",
        )
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise UserError(
            f"identity key {path} is readable by other users (mode {mode:o})",
            hint=f"run: chmod 600 {path}",
        )
    return Identity.from_seed(data[len(_SEED_HEADER) :])


def _create(path: Path) -> Identity:
    identity = Identity.generate()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, _SEED_HEADER + identity.seed)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link() fails if another process created the key first; then both use that one.
            os.link(tmp, path)
        except FileExistsError:
            os.unlink(tmp)
            return load_or_create(path.parent)
        os.unlink(tmp)
    except OSError as exc:
        raise StorageError(f"cannot create identity key {path}: {exc.strerror}") from exc
    return identity
