"""The session language: documents, load-time checks, the canonical hash, templating.

``Session.from_yaml`` is the one loader: the CLI, the CAS and the Kubernetes webhook all call
it, so a document means the same everywhere. A loaded ``Session`` is valid as a whole (every
cross-reference resolves) and immutable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from cloister import limits
from cloister.errors import SessionError
from cloister.session import _access, _checks, _compat, _keys, _sharing, template
from cloister.session._keys import format_public_key, parse_public_key, public_key_of
from cloister.session._models import (
    AccessPolicy,
    Attestation,
    Image,
    InjectionFile,
    Secret,
    SecretKind,
    Service,
    ServiceMesh,
    SessionDocument,
    Volume,
    parse_duration,
)

__all__ = [
    "AccessPolicy",
    "Attestation",
    "Image",
    "InjectionFile",
    "Secret",
    "SecretKind",
    "Service",
    "ServiceMesh",
    "Session",
    "SessionDocument",
    "Volume",
    "access",
    "format_public_key",
    "parse_duration",
    "parse_public_key",
    "public_key_of",
    "sharing",
    "signatures",
    "template",
]

signatures = _keys
access = _access
sharing = _sharing


@dataclass(frozen=True)
class Session:
    """A valid session document and its hash (SHA-256 of the canonical form, lowercase hex).

    ``warnings`` name every SCONE key that does not apply here but leaves the session's
    meaning intact, and every development-only setting; ``cloister session check`` prints them.
    """

    document: SessionDocument
    hash: str
    warnings: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.document.name

    @classmethod
    def from_yaml(cls, text: str | bytes) -> Session:
        raw = text if isinstance(text, bytes) else text.encode()
        if len(raw) > limits.MAX_SESSION_BYTES:
            raise SessionError(f"the session is larger than {limits.MAX_SESSION_BYTES} bytes")
        try:
            data = yaml.load(raw, Loader=_compat.Loader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise SessionError(f"the session is not valid YAML{at}: {problem}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Session:
        if not isinstance(data, dict):
            raise SessionError("a session is a YAML mapping with at least name and version")
        data, warnings = _compat.inspect(data)
        data = _compat.expand_fragments(data)
        try:
            doc = SessionDocument.model_validate(data)
        except ValidationError as exc:
            raise SessionError(_describe(exc)) from None
        _checks.check(doc)
        if doc.security.attestation.mode == "none":
            warnings.append(
                "security.attestation.mode: none: ATTESTATION IS OFF; anyone who reaches the "
                "CAS receives this session's secrets (development only)"
            )
        return cls(doc, canonical_hash(doc), tuple(warnings))

    def service(self, name: str) -> Service | None:
        return next((s for s in self.document.services if s.name == name), None)

    def secret(self, name: str) -> Secret | None:
        return next((s for s in self.document.secrets if s.name == name), None)

    def image(self, name: str | None) -> Image | None:
        return next((i for i in self.document.images if i.name == name), None)

    def to_yaml(self) -> str:
        return yaml.safe_dump(
            self.document.model_dump(mode="json", exclude_defaults=True, by_alias=True),
            sort_keys=False,
        )

    def check_placeholders(self, kinds: dict[str, str]) -> None:
        """Re-check every placeholder with ``kinds`` (imports resolved to their real kinds)."""
        _checks.placeholders_resolve_with(self.document, kinds)

    def kinds(self) -> dict[str, str]:
        """Secret name → kind (``imported`` for an import whose kind the exporter decides)."""
        return _checks.secret_kinds(self.document)


def canonical_form(doc: SessionDocument) -> bytes:
    """Deterministic bytes of a document: every field, sorted keys, no whitespace."""
    return json.dumps(
        doc.model_dump(mode="json", by_alias=True),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def canonical_hash(doc: SessionDocument) -> str:
    return hashlib.sha256(canonical_form(doc)).hexdigest()


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors()[:10]:
        loc = _location(err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        elif err["type"] == "missing":
            lines.append(f"{loc}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}")
    more = len(exc.errors()) - len(lines)
    if more > 0:
        lines.append(f"... and {more} more")
    return "; ".join(lines)


def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("list[str]", "str", "function-after[_check(), Attestation]"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "session"
