"""The one hash that names things by what decides them: a results row's config key, the
decoded-image cache's files, the regularizer terms' caches and the demo source's file.
Each caller says what goes into its payload; the hash is the same everywhere."""

from __future__ import annotations

import hashlib
import json


def fingerprint(payload: object, length: int, data: bytes = b"") -> str:
    """The first `length` hex digits of sha256 over `payload` as sorted-key JSON (values JSON
    cannot hold written as their str), then `data` (raw bytes such as an index array)."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    digest.update(data)
    return digest.hexdigest()[:length]
