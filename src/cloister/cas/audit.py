"""The CAS's audit log: what happened, to which session, accepted or refused and why.

Entries live in the store (sealed, hash-chained, signed with the CAS's state key, and part of
the store's rollback-evident chain). ``export`` writes them as JSON lines followed by a signed
trailer; ``verify`` checks such a file on its own: every entry's hash and signature, the links
between entries (edits, deletions, reordering), and the trailer (truncation).

Never a secret value: events carry names, hashes, public keys, reason codes and messages that
are built from names only. ``record`` refuses any field whose name suggests a value.

Events: ``cas-start``, ``cas-stop``, ``session-create``, ``session-read``, ``session-update``,
``activation`` (``outcome`` accepted or refused, with ``reason``), ``volume-tag``, ``backup``,
``restore``, ``recovery``, ``init``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.cas.nonces import Nonce
from cloister.errors import Error, StoreError
from cloister.store import AuditRecord, Claim, Store
from cloister.store._audit import GENESIS_HEX, canonical, entry_hash

FORMAT = "cloister-audit-v1"
# Bounds on a file handed to ``verify`` (untrusted input).
MAX_LINE_BYTES = 64 * 1024
MAX_ENTRIES = 50_000_000
_FORBIDDEN_FIELDS = ("value", "secret", "password", "key_material", "plaintext")
_MAX_MESSAGE = 500
_RESERVED = ("seq", "prev", "time", "event", "hash", "sig", "trailer")


class AuditLog:
    """Appends events to the store's audit log. ``clock`` only stamps entries."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def record(self, event: str, **fields: Any) -> AuditRecord:
        return self.store.append_audit(_entry(event, fields), now=self.clock())

    def record_claiming(
        self, event: str, nonce: Nonce, *, instead: Mapping[str, Any], **fields: Any
    ) -> tuple[AuditRecord, bool]:
        """Record ``event`` and ``nonce``'s single use in one transaction.

        Returns the entry and whether the nonce was new; if it was used before, the entry
        written carries the fields of ``instead`` (a refusal) in place of ``fields``.
        """
        claim = Claim(nonce.hex, nonce.expires_at, _entry(event, {**fields, **instead}))
        return self.store.append_audit_claiming(_entry(event, fields), claim, now=self.clock())


def _entry(event: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    for name in fields:
        if name in _RESERVED:
            raise ValueError(f"audit field {name!r} is the log's own")
        if any(bad in name for bad in _FORBIDDEN_FIELDS):
            raise ValueError(f"audit field {name!r} could carry a secret value")
    clean = {k: v for k, v in fields.items() if v is not None}
    if isinstance(clean.get("message"), str):
        clean["message"] = clean["message"][:_MAX_MESSAGE]
    return {"event": event, **clean}


class _Audited(Protocol):
    audit: AuditLog


S = TypeVar("S", bound=_Audited)
P = ParamSpec("P")
R = TypeVar("R")


def audited(
    event: str, subject: Callable[..., Mapping[str, Any]]
) -> Callable[[Callable[Concatenate[S, P], R]], Callable[Concatenate[S, P], R]]:
    """Record ``event`` for every call of a ``Cas`` method: accepted, or refused with the reason.

    ``subject(*args, result=...)`` names what the call was about (session, service, ...); it
    sees the method's arguments and its result (``None`` when refused). An accepted call whose
    entry cannot be written fails: nothing is handed out unaudited.
    """

    def decorate(fn: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
        @functools.wraps(fn)
        def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                result = fn(self, *args, **kwargs)
            except Error as exc:
                try:
                    fields = dict(subject(*args, result=None))
                except Exception:  # noqa: BLE001 - a malformed request still gets its entry
                    fields = {}
                self.audit.record(
                    event, outcome="refused", reason=exc.reason, message=exc.message, **fields
                )
                raise
            self.audit.record(event, outcome="accepted", **subject(*args, result=result))
            return result

        return wrapper

    return decorate


# --- export and verification ----------------------------------------------------------------


def _trailer_message(trailer: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(b"cloister-audit-trailer-v1" + canonical(trailer)).digest()


def export_lines(store: Store, *, now: float) -> Iterator[str]:
    """The audit log as JSON lines, closed by a signed trailer (which makes truncation evident)."""
    records = store.audit_records()
    for rec in records:
        yield json.dumps({**rec.body, "hash": rec.hash.hex(), "sig": rec.signature.hex()},
                         sort_keys=True)  # fmt: skip
    trailer = {
        "format": FORMAT,
        "entries": len(records),
        "head": records[-1].hash.hex() if records else GENESIS_HEX,
        "public_key": store.audit_public_key().hex(),
        "exported_at": now,
    }
    sig = store.sign(_trailer_message(trailer))
    yield json.dumps({"trailer": trailer, "sig": sig.hex()}, sort_keys=True)


def export(store: Store, out: Path, *, now: float) -> int:
    """Write the audit log to ``out``; return the number of entries."""
    n = 0
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in export_lines(store, now=now):
            f.write(line + "\n")
            n += 1
    tmp.replace(out)
    return n - 1


@dataclass(frozen=True)
class Report:
    entries: int
    public_key: str
    head: str
    events: dict[str, int]


def _bad(what: str, reason: str = "audit-tampered") -> StoreError:
    return StoreError(f"the audit log does not verify: {what}", reason=reason)


def _verify_sig(key: ed25519.Ed25519PublicKey, sig_hex: object, message: bytes) -> bool:
    try:
        key.verify(bytes.fromhex(str(sig_hex)), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def verify(lines: Iterable[str], *, public_key: str | None = None) -> Report:
    """Check an exported audit log; raise ``StoreError`` naming the first problem found.

    ``public_key`` (hex) pins the CAS's key; without it the key in the trailer is used (and
    reported), which proves internal consistency, not who wrote the file.
    """
    docs: list[dict[str, Any]] = []
    for i, line in enumerate(lines, 1):
        if len(line) > MAX_LINE_BYTES:
            raise _bad(f"line {i} is longer than {MAX_LINE_BYTES} bytes")
        if i > MAX_ENTRIES + 1:
            raise _bad(f"more than {MAX_ENTRIES} entries")
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            raise _bad(f"line {i} is not JSON") from None
        if not isinstance(doc, dict):
            raise _bad(f"line {i} is not a JSON object")
        docs.append(doc)
    if not docs or "trailer" not in docs[-1]:
        raise _bad("it has no signed trailer: it was truncated", reason="audit-truncated")
    last = docs.pop()
    trailer = last["trailer"]
    if not isinstance(trailer, dict) or trailer.get("format") != FORMAT:
        raise _bad("the trailer is not a cloister-audit-v1 trailer")
    key_hex = str(trailer.get("public_key", ""))
    if public_key is not None and key_hex.lower() != public_key.lower():
        raise _bad("it is signed by another key than the one given", reason="audit-wrong-key")
    try:
        key = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))
    except ValueError:
        raise _bad("the trailer's public key is malformed") from None
    if not _verify_sig(key, last.get("sig"), _trailer_message(trailer)):
        raise _bad("the trailer's signature does not verify")
    prev = GENESIS_HEX
    events: dict[str, int] = {}
    for n, doc in enumerate(docs, 1):
        if "trailer" in doc:
            raise _bad(f"a trailer in the middle (entry {n}): logs were concatenated")
        body = {k: v for k, v in doc.items() if k not in ("hash", "sig")}
        if body.get("seq") != n:
            raise _bad(
                f"entry {n} has seq {body.get('seq')}: an entry was deleted, added or reordered"
            )
        if body.get("prev") != prev:
            raise _bad(f"entry {n} does not link to entry {n - 1}: deleted or reordered")
        h = entry_hash(body)
        if h.hex() != doc.get("hash"):
            raise _bad(f"entry {n} was edited")
        if not _verify_sig(key, doc.get("sig"), h):
            raise _bad(f"entry {n}'s signature does not verify")
        prev = h.hex()
        event = str(body.get("event"))
        events[event] = events.get(event, 0) + 1
    if trailer.get("entries") != len(docs) or trailer.get("head") != prev:
        raise _bad(
            f"the trailer vouches for {trailer.get('entries')} entries, the file has {len(docs)}: "
            "it was truncated or extended",
            reason="audit-truncated",
        )
    return Report(len(docs), key_hex, prev, events)


# --- what each audited CAS call is about (names, hashes, public keys; never a value) --------


def _signers(signed: Any) -> list[str]:
    return [str(s.public_key)[:200] for s in getattr(signed, "signatures", [])][:16]


def on_create(signed: Any, *, result: Any) -> dict[str, Any]:
    if result is None:
        return {"signers": _signers(signed)}
    return {"session": result.name, "session_hash": result.hash, "version": result.version,
            "signers": _signers(signed)}  # fmt: skip


def on_update(name: str, signed: Any, *, result: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"session": name[:1024], "signers": _signers(signed)}
    if result is not None:
        out.update(session_hash=result.hash, version=result.version)
    return out


def on_read(name: str, req: Any, now: Any, *, result: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"session": name[:1024], "reader": str(req.public_key)[:200]}
    if result is not None:
        out.update(session_hash=result.hash, version=result.version)
    return out


def on_activate(req: Any, now: Any, *, result: Any) -> dict[str, Any]:
    return {"session": str(req.session)[:1024], "service": str(req.service)[:128],
            "tee": str(req.tee)[:32]}  # fmt: skip
