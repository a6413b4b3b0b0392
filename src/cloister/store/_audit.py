"""The audit log's entry format: canonical JSON, hash-chained, signed with the state key.

An entry's body is a JSON object with ``seq`` (1, 2, ...), ``prev`` (the previous entry's hash,
hex; 64 zeros for the first), ``time`` and ``event`` plus event fields. Its hash is
``SHA-256("cloister-audit-v1" ‖ canonical JSON of the body)``; its signature is Ed25519 by the
CAS's state key over that hash. Canonical JSON: sorted keys, no spaces, UTF-8.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

GENESIS_HEX = "0" * 64


def canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(body: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(b"cloister-audit-v1" + canonical(body)).digest()
