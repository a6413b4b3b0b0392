"""Who may do what to a session: signatures, access policy rules, namespaces, imports.

The CAS asks this module before it writes or shows a session:

(1) ``valid_signers``: the owner keys whose signature over exactly this operation and this
    document hash verifies (a signature for ``create`` is not one for ``update``);
(2) ``authorize``: the *current* session's rule for the verb decides: an update that changes
    the access policy needs the owners that the policy in force names, never the new ones;
(3) ``authorize_create``: a session in a namespace (``org/proj/x``) is created only if the
    parent session exists and its ``create_sessions`` rule holds for the signers;
(4) ``check_imports``: every import names a secret that its exporter's current session
    exports to this session, with a kind that the importer's placeholders can render.

Rules are parsed by the session loader (``cloister.session.access``); evaluation is pure.
Every refusal says what was missing, and never which signature was wrong in what way.
"""

from __future__ import annotations

from cloister import protocol
from cloister import secrets as secretlib
from cloister.errors import AccessDenied, SessionError
from cloister.session import Session, access, parse_public_key, sharing, signatures
from cloister.store import SessionRecord, Store

__all__ = ["authorize", "authorize_create", "check_imports", "lookup", "valid_signers"]


def valid_signers(signed: protocol.SignedSession, operation: str, session_hash: str) -> list[str]:
    """The owner keys (``ed25519:...``) whose signature over this operation verifies."""
    out: list[str] = []
    for sig in signed.signatures:
        try:
            raw = parse_public_key(sig.public_key)
        except ValueError:
            continue
        if signatures.verify(raw, sig.signature, operation, session_hash):
            canonical = signatures.format_public_key(raw)
            if canonical not in out:
                out.append(canonical)
    return out


def canonical_key(text: str) -> str:
    try:
        return signatures.format_public_key(parse_public_key(text))
    except ValueError:
        return ""


def authorize(session: Session, creator: str, verb: str, signers: list[str]) -> None:
    """Raise ``AccessDenied`` unless ``signers`` satisfy ``session``'s rule for ``verb``."""
    rule = access.parse(
        session.document.access_policy.rules_for(verb),
        f"access_policy.{verb}",
        governance=verb != "read",
    )
    keys = frozenset(k for k in (canonical_key(s) for s in signers) if k)
    if not access.satisfied(rule, keys, canonical_key(creator) or None):
        what = "creating sessions in" if verb == "create_sessions" else f"{verb} of"
        raise AccessDenied(
            f"the {len(keys)} valid signature(s) do not satisfy the access policy for "
            f"{what} session {session.name!r}",
            reason="not-authorized",
        )


def record_session(record: SessionRecord) -> Session:
    return Session.from_yaml(record.document)


def authorize_create(name: str, signers: list[str], store: Store) -> None:
    """(3) a namespaced session needs its parent's ``create_sessions`` rule to hold."""
    parent = sharing.parent(name)
    if parent is None:
        return
    record = store.current_session(parent)
    if record is None:
        raise AccessDenied(
            f"session {name!r} lives in namespace {parent!r}, which does not exist; create "
            f"{parent!r} first",
            reason="no-such-namespace",
        )
    authorize(record_session(record), record.creator, "create_sessions", signers)


def lookup(store: Store) -> secretlib.Lookup:
    """Current sessions by name, for imports."""

    def find(name: str) -> tuple[Session, str] | None:
        record = store.current_session(name)
        return None if record is None else (record_session(record), record.hash)

    return find


def check_imports(session: Session, store: Store) -> None:
    """(4) refuse an upload whose imports are not exported to it, or cannot be rendered."""
    find = lookup(store)
    kinds = session.kinds()
    for secret in session.document.secrets:
        if secret.import_ is None:
            continue
        _exporter, _hash, source = secretlib.check_import(session.name, session.hash, secret, find)
        kind = _exported_kind(session, secret.name, find)
        if secret.kind is not None and secret.kind != kind:
            raise SessionError(
                f"secret {secret.name!r} is declared {secret.kind}, but the exporter's "
                f"{source.name!r} is a {kind}",
                reason="import-kind-mismatch",
            )
        kinds[secret.name] = kind
    session.check_placeholders(kinds)


def _exported_kind(session: Session, name: str, find: secretlib.Lookup, depth: int = 0) -> str:
    secret = session.secret(name)
    assert secret is not None
    if secret.import_ is None:
        return secret.kind or ""
    if depth >= secretlib.MAX_IMPORT_DEPTH:
        raise SessionError(f"secret {name!r}: imports nest too deep", reason="import-too-deep")
    exporter, _digest, source = secretlib.check_import(session.name, session.hash, secret, find)
    return _exported_kind(exporter, source.name, find, depth + 1)
