"""Encrypted volumes, CAS side: each volume's key, its last root tag, and signed tag reports.

This module owns what the CAS keeps about a session's volumes and the one rule that makes
them fresh: the key goes out only together with the last root tag the CAS acknowledged, and a
new tag is acknowledged only from an activated workload of a service that mounts the volume,
signed with that activation's TLS key, and only if it names the current tag as its
predecessor (compare-and-set in the store). It does not touch volume files (the agent does,
with ``cloister.volume``) and knows nothing of HTTP. See ``docs/volumes-in-sessions.md``.

Rows (sealed like every secret, in the ``secrets`` table of the owning session):

- ``volume-key/<volume>`` (kind ``volume-key``): the 32-byte key, made once inside the CAS;
- ``volume-tag/<volume>`` (kind ``volume-tag``): the last acknowledged root tag.

Session secret names cannot contain ``/``, so these rows never collide with a secret. An
imported volume's rows are the exporter's: importer and exporter share one key and one tag.

Activation ids are stateless: ``b64url(service) . b64url(SPKI DER) . hex(HMAC)``, the HMAC
under a CAS-only key over (session, service, SPKI). A report that carries one proves that the
CAS activated a workload of that service with that public key; the report's signature proves
the reporter holds the private key, which never leaves that workload's TEE.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import hmac as _hmac
from cryptography.hazmat.primitives.asymmetric import ec

from cloister import protocol, volume
from cloister import secrets as secretlib
from cloister.errors import AccessDenied, ConflictError, NotFound, SessionError
from cloister.session import Service, Session, Volume, sharing
from cloister.store import Store

log = logging.getLogger(__name__)

KEY_KIND: Final = "volume-key"
TAG_KIND: Final = "volume-tag"
_MAC_KEY_META: Final = "volume-activation-mac-key"
_ID_DOMAIN: Final = b"cloister-activation-id-v1\x00"
_MAX_SPKI_BYTES: Final = 1024  # an EC P-256/P-384 SPKI is ~100 bytes
_MAX_SIGNATURE_BYTES: Final = 160  # DER ECDSA-SHA256 over P-384 at most ~104 bytes


@dataclass(frozen=True)
class Owner:
    """Where a volume's key and tag live: its own session, or the exporter's for an import."""

    session: str
    volume: str
    policy: str


def _key_row(name: str) -> str:
    return f"volume-key/{name}"


def _tag_row(name: str) -> str:
    return f"volume-tag/{name}"


def owner_of(session: Session, definition: Volume, lookup: secretlib.Lookup) -> Owner:
    """Follow an import to the exporting session, checking that it still exports to us."""
    if definition.import_ is None:
        return Owner(session.name, definition.name, definition.update_policy)
    imp = definition.import_
    name = sharing.resolve(session.name, imp.session)
    where = f"volume {definition.name!r} imports {imp.volume!r} from session {name!r}"
    found = lookup(name)
    if found is None:
        raise AccessDenied(f"{where}, which does not exist", reason="import-revoked")
    exporter, exporter_hash = found
    if imp.session_hash not in (None, exporter_hash):
        raise AccessDenied(f"{where}, pinned at another hash", reason="import-revoked")
    source = next((v for v in exporter.document.volumes if v.name == imp.volume), None)
    if source is None or not _exports_to(source, name, session.name, session.hash):
        raise AccessDenied(f"{where}, which does not export it to us", reason="import-revoked")
    if source.import_ is not None:
        raise SessionError(f"{where}, which imports it itself", reason="import-too-deep")
    return Owner(name, source.name, source.update_policy)


def _exports_to(source: Volume, exporter: str, importer: str, importer_hash: str) -> bool:
    for target in source.export:
        if target.session is not None:
            if sharing.resolve(exporter, target.session) == importer and (
                target.session_hash in (None, importer_hash)
            ):
                return True
        elif target.namespace is not None:
            ns = sharing.resolve(exporter, target.namespace)
            if importer == ns or importer.startswith(ns + "/"):
                return True
    return False


def _definition(session: Session, name: str) -> Volume:
    found = next((v for v in session.document.volumes if v.name == name), None)
    if found is None:  # the loader checked image volumes against volumes
        raise SessionError(f"session {session.name!r} has no volume {name!r}")
    return found


def current_tag(store: Store, owner: Owner) -> str | None:
    row = store.get_secret(owner.session, _tag_row(owner.volume))
    return None if row is None or row[0] != TAG_KIND else row[1].decode()


def for_service(
    store: Store, session: Session, service: Service, lookup: secretlib.Lookup
) -> list[protocol.BundleVolume]:
    """The volumes ``service`` mounts, each with its key and the only tag to accept."""
    image = session.image(service.image_name)
    out = []
    for mount in image.volumes if image else []:
        owner = owner_of(session, _definition(session, mount.name), lookup)
        tag: str | None = None
        if owner.policy == "ephemeral":
            # A fresh, empty volume at every start: a key nobody keeps, and no tag.
            key = os.urandom(volume.KEY_BYTES)
        else:
            key = store.create_secret(
                owner.session,
                _key_row(owner.volume),
                KEY_KIND,
                lambda: os.urandom(volume.KEY_BYTES),
            )
            if owner.policy == "rollback_protection":
                tag = current_tag(store, owner)
        out.append(
            protocol.BundleVolume(
                name=mount.name,
                path=mount.path,
                key=base64.b64encode(key).decode(),
                expected_tag=tag,
                policy=owner.policy,
            )
        )
    return out


# --- activation ids ------------------------------------------------------------------------


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64url(text: str, limit: int) -> bytes:
    if len(text) > (limit * 4) // 3 + 4:
        raise ValueError("too long")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(store: Store, session: str, service: str, spki: bytes) -> _hmac.HMAC:
    key = store.get_or_create_meta(_MAC_KEY_META, lambda: os.urandom(32))
    h = _hmac.HMAC(key, hashes.SHA256())
    h.update(_ID_DOMAIN)
    for part in (session.encode(), service.encode(), spki):
        h.update(len(part).to_bytes(4, "big") + part)
    return h


def activation_id(store: Store, session: str, service: str, public_key: object) -> str:
    """The credential a workload's tag reports carry: binds (session, service, its key)."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SessionError(
            "volume tag reports need an ECDSA workload key", reason="unsupported-key"
        )
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mac = _mac(store, session, service, spki).finalize()
    return f"{_b64url(service.encode())}.{_b64url(spki)}.{mac.hex()}"


def _check_activation(store: Store, session: str, activation: str) -> tuple[str, bytes]:
    """(service, SPKI DER) of a genuine activation id of ``session``; AccessDenied otherwise."""
    denied = AccessDenied("the activation id is not one this CAS issued", reason="bad-activation")
    try:
        service_b64, spki_b64, mac_hex = activation.split(".")
        service = _unb64url(service_b64, 256).decode()
        spki = _unb64url(spki_b64, _MAX_SPKI_BYTES)
        mac = bytes.fromhex(mac_hex)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise denied from None
    try:
        _mac(store, session, service, spki).verify(mac)  # constant time
    except InvalidSignature:
        raise denied from None
    return service, spki


def _check_signature(spki: bytes, report: protocol.VolumeTagReport) -> None:
    denied = AccessDenied("the tag report's signature does not verify", reason="bad-signature")
    try:
        key = serialization.load_der_public_key(spki)
        signature = base64.b64decode(report.signature, validate=True)
    except (ValueError, binascii.Error):
        raise denied from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or len(signature) > _MAX_SIGNATURE_BYTES:
        raise denied
    message = protocol.volume_tag_message(
        report.activation_id, report.session, report.volume, report.previous, report.tag
    )
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise denied from None


def _generation(tag: str) -> int:
    return int(tag.partition(":")[0])


# --- tag reports ---------------------------------------------------------------------------


def report(
    store: Store, report: protocol.VolumeTagReport, lookup: secretlib.Lookup
) -> protocol.VolumeTagAccepted:
    """Acknowledge a volume's new root tag, or refuse it.

    (1) the activation id is one this CAS issued for this session; (2) the signature over
    (activation, session, volume, previous, tag) verifies with that activation's key; (3) the
    service, in the session as it is now, mounts the volume; (4) the new tag is the next
    generation after ``previous`` (generation 1 when ``previous`` is absent); (5) under
    ``rollback_protection``, ``previous`` is the tag the CAS holds (compare-and-set).
    """
    service_name, spki = _check_activation(store, report.session, report.activation_id)  # (1)
    _check_signature(spki, report)  # (2)
    found = lookup(report.session)  # (3)
    if found is None:
        raise NotFound("no such session", reason="no-such-session")
    session, _hash = found
    service = session.service(service_name)
    image = session.image(service.image_name) if service is not None else None
    if image is None or all(v.name != report.volume for v in image.volumes):
        raise AccessDenied(
            f"service {service_name!r} does not mount volume {report.volume!r}",
            reason="volume-not-mounted",
        )
    owner = owner_of(session, _definition(session, report.volume), lookup)
    expected_generation = 1 if report.previous is None else _generation(report.previous) + 1
    if _generation(report.tag) != expected_generation:  # (4)
        raise ConflictError(
            f"tag generation {_generation(report.tag)} does not follow the previous one",
            reason="stale-tag",
        )
    if owner.policy != "rollback_protection":
        # ephemeral: a new volume at every start; no_rollback_protection: freshness unchecked.
        raise ConflictError(
            f"volume {report.volume!r} ({owner.policy}) has no tag to keep",
            reason="volume-untracked",
        )
    if not store.compare_and_replace_secret(  # (5)
        owner.session,
        _tag_row(owner.volume),
        TAG_KIND,
        None if report.previous is None else report.previous.encode(),
        report.tag.encode(),
    ):
        raise ConflictError(
            f"volume {report.volume!r}: the previous tag is not the one the CAS holds",
            reason="stale-tag",
        )
    log.info(
        "volume %s/%s at generation %d (reported by %s)",
        owner.session,
        owner.volume,
        _generation(report.tag),
        service_name,
    )
    return protocol.VolumeTagAccepted(volume=report.volume, tag=report.tag)


def audit_subject(
    report: protocol.VolumeTagReport, *, result: protocol.VolumeTagAccepted | None
) -> dict[str, str]:
    """What the audit log records about a tag report (tags are not secrets)."""
    return {
        "session": report.session[:1024],
        "volume": report.volume[:128],
        "previous": (report.previous or "")[:96],
        "tag": report.tag[:96],
    }
