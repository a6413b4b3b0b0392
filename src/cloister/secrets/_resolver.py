"""Secret values for one activation: stored ones made once, workload certificates issued now.

``Resolver`` is the only place that decides which value a placeholder gets:

(1) an imported secret comes from the exporter's *current* session, only while that session
    still exports it to this one (pinned hashes included): an exporter revokes an import by
    updating its session, and the importer's next activation fails with ``import-revoked``;
(2) a stored secret is created once per (session, name, kind); a value made under an earlier
    version of the session is kept or remade by SCONE's migration rule
    (``secrets.kept_on_update``), a CA whose key changes rotates with an overlap window;
(3) stored certificates are renewed when less than a third of their life is left; an
    explicit (owner-given) certificate cannot be renewed and is refused once expired;
(4) an ``x509`` without ``private_key`` is issued per activation for the workload's own key,
    and its ``:key`` is a marker the agent replaces with that key, which never leaves it.
"""

from __future__ import annotations

import logging
import secrets as _random
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloister import pki
from cloister.errors import AccessDenied, SessionError
from cloister.session import Secret, Session, sharing, template
from cloister.session.template import Placeholder

if TYPE_CHECKING:
    from cloister.secrets import SecretValue

log = logging.getLogger(__name__)

MAX_IMPORT_DEPTH = 4  # an import of an import of an import ...; deeper is refused (no loops)


class SecretStore(Protocol):
    def create_secret(
        self, session: str, name: str, kind: str, make: Callable[[], bytes]
    ) -> bytes: ...

    def replace_secret(self, session: str, name: str, kind: str, value: bytes) -> None: ...


# The current version of a session by name: (session, hash), or None when it does not exist.
Lookup = Callable[[str], "tuple[Session, str] | None"]


def _no_sessions(name: str) -> tuple[Session, str] | None:
    return None


class Resolver:
    def __init__(
        self,
        store: SecretStore,
        session: Session,
        session_hash: str,
        *,
        now: datetime,
        lookup: Lookup = _no_sessions,
        workload_key: pki.PublicKey | None = None,
    ) -> None:
        self.store = store
        self.session = session
        self.session_hash = session_hash
        self.now = now
        self.lookup = lookup
        self.workload_key = workload_key
        self.marker = "CLOISTER-WORKLOAD-KEY-" + _random.token_hex(16)
        self._issued: dict[str, SecretValue] = {}
        self._cache: dict[tuple[str, str], SecretValue] = {}

    # --- placeholders ----------------------------------------------------------------------

    def text(self, placeholder: Placeholder) -> str:
        return self.data(placeholder).decode()

    def data(self, placeholder: Placeholder) -> bytes:
        from cloister import secrets as lib

        secret = self._secret(self.session, placeholder.secret)
        if secret.is_workload_bound():
            value = self._workload_cert(secret)
            if placeholder.format == "key-pem":
                return self.marker.encode()
        else:
            value = self.value(placeholder.secret)
        if secret.import_ is not None and secret.kind is None:
            # The exporter decides the kind; the CAS checked the spelling at upload.
            fmt = template.resolve_format(value.kind, placeholder.spelled)
            if fmt is None:
                raise SessionError(
                    f"secret {placeholder.secret!r} is a {value.kind} now and cannot be "
                    f"rendered as {placeholder.spelled!r}",
                    reason="import-kind-mismatch",
                )
            placeholder = replace(placeholder, format=fmt)
        try:
            return lib.render_bytes(value, placeholder, now=self.now)
        except ValueError as exc:
            raise SessionError(
                f"secret {placeholder.secret!r}: {exc}", reason="secret-unavailable"
            ) from None

    def value(self, name: str) -> SecretValue:
        """The value of this session's secret ``name`` (imports followed)."""
        return self._value(self.session, self.session_hash, name, 0)

    def issued_pem(self) -> dict[str, str]:
        return {
            name: x509.load_der_x509_certificate(v.cert or b"")
            .public_bytes(serialization.Encoding.PEM)
            .decode()
            for name, v in self._issued.items()
        }

    # --- values ----------------------------------------------------------------------------

    @staticmethod
    def _secret(session: Session, name: str) -> Secret:
        secret = session.secret(name)
        if secret is None:
            raise SessionError(
                f"session {session.name!r} has no secret {name!r}", reason="no-such-secret"
            )
        return secret

    def _value(self, session: Session, digest: str, name: str, depth: int) -> SecretValue:
        if (session.name, name) in self._cache:
            return self._cache[(session.name, name)]
        secret = self._secret(session, name)
        if secret.import_ is not None:
            value = self._imported(session, digest, secret, depth)
        else:
            value = self._stored(session, digest, secret, depth)
        self._cache[(session.name, name)] = value
        return value

    def _imported(self, session: Session, digest: str, secret: Secret, depth: int) -> SecretValue:
        assert secret.import_ is not None
        if depth >= MAX_IMPORT_DEPTH:
            raise SessionError(
                f"secret {secret.name!r}: imports nest deeper than {MAX_IMPORT_DEPTH}",
                reason="import-too-deep",
            )
        exporter_name = sharing.resolve(session.name, secret.import_.session)
        exporter, exporter_hash, source = check_import(session.name, digest, secret, self.lookup)
        value = self._value(exporter, exporter_hash, source.name, depth + 1)
        if secret.kind is not None and value.kind != secret.kind:
            raise SessionError(
                f"secret {secret.name!r} is declared {secret.kind}, but session "
                f"{exporter_name!r} exports a {value.kind}",
                reason="import-kind-mismatch",
            )
        if value.has_private_key() and value.kind in ("x509", "x509-ca"):
            # The certificate's key comes along only if the exporter exports that key too.
            key_secret = source.private_key and exporter.secret(source.private_key)
            if not key_secret or not sharing.exports_to(
                key_secret, exporter_name, session.name, digest
            ):
                value = value.public()
        return value

    def _stored(self, session: Session, digest: str, secret: Secret, depth: int) -> SecretValue:
        from cloister import secrets as lib

        issuer = self._value(session, digest, secret.issuer, depth) if secret.issuer else None
        key = (
            self._value(session, digest, secret.private_key, depth) if secret.private_key else None
        )
        if issuer is not None and not issuer.has_private_key() and secret.value is None:
            raise SessionError(
                f"secret {secret.name!r}: the private key of its issuer {secret.issuer!r} is not "
                "available to this session (an imported CA issues only if its key is exported)",
                reason="issuer-key-unavailable",
            )
        kind = secret.kind or ""

        def make() -> bytes:
            return lib.generate(
                secret, now=self.now, issuer=issuer, private_key=key, origin=digest
            ).to_bytes()

        value = lib.SecretValue.from_bytes(
            self.store.create_secret(session.name, secret.name, kind, make)
        )
        updated = self._migrated(session, digest, secret, value, issuer, key)
        if updated is not value:
            self.store.replace_secret(session.name, secret.name, kind, updated.to_bytes())
        return updated

    def _migrated(
        self,
        session: Session,
        digest: str,
        secret: Secret,
        value: SecretValue,
        issuer: SecretValue | None,
        key: SecretValue | None,
    ) -> SecretValue:
        from cloister import secrets as lib

        def fresh(**kw: object) -> SecretValue:
            return lib.generate(secret, now=self.now, issuer=issuer, origin=digest, **kw)  # type: ignore[arg-type]

        if value.origin not in ("", digest):  # (2) the session was updated since
            if lib.kept_on_update(value, secret):
                return replace(value, origin=digest)
            if secret.kind == "x509-ca":
                return self._reissue_ca(session, secret, value, key, digest)
            log.info("secret %s/%s remade for the updated session", session.name, secret.name)
            return fresh(private_key=key)
        if secret.kind in ("x509", "x509-ca") and value.cert:  # (3) renewal
            if secret.value is not None or secret.import_ is not None:
                if (
                    value.expires() is not None
                    and value.certificate().not_valid_after_utc <= self.now
                ):
                    raise SessionError(
                        f"the certificate {secret.name!r} of session {session.name!r} expired and, "
                        "being given explicitly, cannot be renewed; update the session",
                        reason="certificate-expired",
                    )
                return value
            if lib.needs_renewal(value, self.now):
                kept = key or lib.SecretValue("private-key", value.key or b"")
                renewed = fresh(private_key=kept)
                return replace(renewed, previous=value.previous)
        return value

    def _reissue_ca(
        self,
        session: Session,
        secret: Secret,
        value: SecretValue,
        key: SecretValue | None,
        digest: str,
    ) -> SecretValue:
        """A CA of an updated session: same key → a new certificate; new key → rotation."""
        from cloister import secrets as lib

        if key is None and value.spec == lib.spec_of(secret):
            key = lib.SecretValue("private-key", value.key or b"")  # its own key, kept
        new = lib.generate(secret, now=self.now, private_key=key, origin=digest)
        if value.cert and new.key != value.key:
            until = (self.now + lib.overlap(session.document, secret.name)).timestamp()
            log.info(
                "CA %s/%s rotated; the previous CA stays trusted until %s",
                session.name,
                secret.name,
                until,
            )
            kept = tuple((c, u) for c, u in value.previous if u > self.now.timestamp())
            return replace(new, previous=((value.cert, until), *kept))
        return replace(new, previous=value.previous)

    def _workload_cert(self, secret: Secret) -> SecretValue:
        from cloister import secrets as lib

        if secret.name not in self._issued:
            if self.workload_key is None or secret.issuer is None:
                raise SessionError(
                    f"secret {secret.name!r} is issued per workload; no workload key here",
                    reason="secret-unavailable",
                )
            issuer = self.value(secret.issuer)
            if not issuer.has_private_key():
                raise SessionError(
                    f"secret {secret.name!r}: the private key of its issuer {secret.issuer!r} is "
                    "not available to this session",
                    reason="issuer-key-unavailable",
                )
            cert = lib.issue_for(secret, issuer, self.workload_key, now=self.now)
            self._issued[secret.name] = lib.SecretValue(
                "x509",
                cert=cert.public_bytes(serialization.Encoding.DER),
                chain=issuer.trusted_cas(self.now),
            )
        return self._issued[secret.name]


def check_import(
    importer: str, importer_hash: str, secret: Secret, lookup: Lookup
) -> tuple[Session, str, Secret]:
    """The exporter's session, its hash and its secret, if it exports ``secret`` to us now.

    Raises ``AccessDenied`` (``import-revoked``) or ``SessionError`` with a clear reason.
    """
    assert secret.import_ is not None
    name = sharing.resolve(importer, secret.import_.session)
    found = lookup(name)
    where = f"secret {secret.name!r} imports {secret.import_.secret!r} from session {name!r}"
    if found is None:
        raise AccessDenied(f"{where}, which does not exist", reason="import-revoked")
    exporter, exporter_hash = found
    if secret.import_.session_hash not in (None, exporter_hash):
        raise AccessDenied(
            f"{where}, pinned at hash {secret.import_.session_hash}, but that session is now at "
            f"{exporter_hash}",
            reason="import-revoked",
        )
    source = exporter.secret(secret.import_.secret)
    if source is None:
        raise AccessDenied(f"{where}, which defines no such secret", reason="import-revoked")
    if not sharing.exports_to(source, name, importer, importer_hash):
        raise AccessDenied(
            f"{where}, which does not export it to {importer!r}", reason="import-revoked"
        )
    if source.is_workload_bound():
        raise SessionError(
            f"{where}: that certificate is issued per workload of the exporter and cannot be "
            "shared; export a stored certificate (with private_key) or its CA",
            reason="import-not-shareable",
        )
    return exporter, exporter_hash, source
