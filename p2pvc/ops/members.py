"""Membership commands: who may sign commits and ref updates in a repository."""

from __future__ import annotations

from dataclasses import dataclass

from p2pvc.errors import UserError
from p2pvc.identity.keys import fingerprint
from p2pvc.refs.membership import ACTION_ADD, ACTION_REMOVE
from p2pvc.repo import Repository


@dataclass(frozen=True)
class MemberInfo:
    key: bytes
    fingerprint: str
    creator: bool
    you: bool


def parse_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise UserError(
            f"invalid public key {text!r}: expected 64 hex digits",
            hint="the new member prints their key with: p2pvc id",
        )
    return key


def list_members(repo: Repository) -> list[MemberInfo]:
    you = repo.identity.public_key
    members = repo.refs.members().current
    return [
        MemberInfo(key, fingerprint(key), key == repo.record.creator, key == you)
        for key in sorted(members, key=lambda k: (k != repo.record.creator, k))
    ]


def add_member(repo: Repository, key_text: str) -> MemberInfo:
    key = parse_key(key_text)
    if key in repo.refs.members().current:
        raise UserError(f"{fingerprint(key)} is already a member")
    repo.refs.change_member(repo.identity, ACTION_ADD, key)
    return MemberInfo(key, fingerprint(key), False, key == repo.identity.public_key)


def remove_member(repo: Repository, key_text: str) -> MemberInfo:
    key = parse_key(key_text)
    if key == repo.record.creator:
        raise UserError("the repository's creator cannot be removed")
    if key not in repo.refs.members().current:
        raise UserError(f"{fingerprint(key)} is not a member")
    repo.refs.change_member(repo.identity, ACTION_REMOVE, key)
    return MemberInfo(key, fingerprint(key), False, key == repo.identity.public_key)
