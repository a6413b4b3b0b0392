"""Sharing secrets between sessions: names of other sessions and who a secret is exported to.

Pure functions, used at upload (the CAS checks an import against the exporter's current
session) and at every activation (an export the exporter withdrew fails the importer's
activation). Relative names follow SCONE 5.8: ``./x`` is nested in this session, ``../x`` is a
sibling, each further ``../`` goes one namespace up.
"""

from __future__ import annotations

from cloister.errors import SessionError
from cloister.session._models import SESSION_NAME_RE, Secret

__all__ = ["exports_to", "parent", "resolve"]


def resolve(base: str, ref: str) -> str:
    """The absolute session name ``ref`` means when written in session ``base``."""
    if not ref.startswith(("./", "../")):
        name = ref
    else:
        parts = base.split("/")
        rest = ref
        if rest.startswith("./"):
            rest = rest[2:]
        else:
            while rest.startswith("../"):
                if not parts:
                    raise SessionError(f"{ref!r} climbs above the root namespace")
                parts.pop()
                rest = rest[3:]
        name = "/".join([*parts, rest]) if parts else rest
    if not SESSION_NAME_RE.match(name):
        raise SessionError(f"{ref!r} (in session {base!r}) is not a valid session name")
    return name


def parent(name: str) -> str | None:
    """The namespace a session lives in (``org/proj`` for ``org/proj/x``), or ``None``."""
    head, sep, _ = name.rpartition("/")
    return head if sep else None


def exports_to(secret: Secret, exporter: str, importer: str, importer_hash: str | None) -> bool:
    """Whether ``secret`` of session ``exporter`` is exported to session ``importer``.

    ``importer_hash`` is the importing session's hash; an export pinned by ``session_hash``
    grants exactly that version. ``None`` (unknown) never satisfies a pin.
    """
    for target in secret.export:
        if target.session is not None:
            if resolve(exporter, target.session) != importer:
                continue
            if target.session_hash is not None and target.session_hash != importer_hash:
                continue
            return True
        if target.namespace is not None:
            ns = resolve(exporter, target.namespace)
            if importer == ns or importer.startswith(ns + "/"):
                return True
    return False
