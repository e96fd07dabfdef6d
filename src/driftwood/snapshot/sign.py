"""Signing snapshots: HMAC-SHA256 over the canonical header.

The header lists a sha256 for every object of a signed snapshot, so the MAC covers every byte
(xxh3 catches corruption but is not collision resistant; sha256 is). A key is any file of at
least 16 bytes; its id (a hash of it) is stored beside the MAC so that a snapshot signed with
another tenant's key is refused as foreign rather than as corrupt.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from driftwood.errors import SnapshotError

ALG = "hmac-sha256"
MIN_KEY_BYTES = 16


def read_key(path: str | os.PathLike[str] | None) -> bytes | None:
    """The key in ``path`` (None for no key)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            key = f.read(1 << 16)
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot key {os.fspath(path)}: {exc.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise SnapshotError(f"snapshot key {os.fspath(path)} holds {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"driftwood snapshot key id\0" + key).hexdigest()[:16]


def sign(body: bytes, key: bytes) -> dict[str, Any]:
    return {"alg": ALG, "key_id": key_id(key), "mac": hmac.new(key, body, hashlib.sha256).hexdigest()}


def verify(body: bytes, signature: Any, key: bytes) -> None:
    """Refuse unless ``signature`` is this key's valid MAC of ``body``."""
    if signature is None:
        raise SnapshotError("snapshot is not signed, and a key was given: refusing it")
    if not isinstance(signature, dict) or signature.get("alg") != ALG or not isinstance(signature.get("mac"), str):
        raise SnapshotError("snapshot signature is malformed")
    if signature.get("key_id") != key_id(key):
        raise SnapshotError("snapshot was signed with a different key: refusing it")
    expected = hmac.new(key, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature["mac"]):
        raise SnapshotError("snapshot signature does not match its header: it was altered")
