"""The CAS: attestation → policy → secrets / CA, composed over the store. No HTTP here.

``Cas`` is what the HTTP API (``cas.api``) calls. Every method takes ``now``. Every refusal is
an ``Error`` whose detailed reason goes to the audit log; the API maps it to a status and a
stable code for the caller.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets as _random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from cloister import limits, pki, policy, protocol
from cloister import secrets as secretlib
from cloister.attestation import Tee, Verifier, binding, simulated
from cloister.cas.identity import Identity, SimulatedSelf
from cloister.errors import (
    AccessDenied,
    BindingError,
    ConflictError,
    Error,
    MalformedEvidenceError,
    NotFound,
    SessionError,
)
from cloister.session import Session, parse_public_key, signatures
from cloister.session.template import Placeholder, render
from cloister.store import Store

log = logging.getLogger(__name__)

HPKE_SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_MLKEM768_PUBLIC_BYTES = 1184
_X25519_PUBLIC_BYTES = 32


def cas_measurement() -> bytes:
    """The simulated measurement of this CAS: its own Python sources, in a fixed order."""
    root = Path(__file__).resolve().parents[1]
    return simulated.measure_files(sorted(root.rglob("*.py")))


@dataclass
class Events:
    """Counters the API exposes as metrics and the tests read; no secret ever goes here."""

    activations: dict[str, int] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)

    def refused(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1


class Cas:
    def __init__(
        self,
        store: Store,
        identity: Identity,
        verifiers: Mapping[Tee, Verifier],
        *,
        self_evidence: SimulatedSelf | None,
    ) -> None:
        self.store = store
        self.identity = identity
        self.verifiers = dict(verifiers)
        self.self_evidence = self_evidence
        self.events = Events()

    @property
    def simulation(self) -> bool:
        return self.self_evidence is not None

    # --- the CAS's own evidence ------------------------------------------------------------

    def evidence(self, nonce_hex: str) -> protocol.CasEvidence:
        nonce = _hex_bytes(nonce_hex, "nonce", limits.NONCE_BYTES)
        if self.self_evidence is None:
            raise NotFound("this CAS has no evidence provider", reason="no-evidence")
        ev = self.self_evidence.evidence(nonce, self.identity)
        return protocol.CasEvidence(
            tee=Tee.SIMULATION.value,
            evidence=base64.b64encode(ev).decode(),
            identity_certificate=self.identity.cert_pem().decode(),
            simulation=True,
        )

    # --- nonces ----------------------------------------------------------------------------

    def new_nonce(self, now: datetime) -> protocol.NonceResponse:
        t = now.timestamp()
        if self.store.count_live_nonces(t) >= limits.MAX_OUTSTANDING_NONCES:
            self.store.purge_nonces(t)
            if self.store.count_live_nonces(t) >= limits.MAX_OUTSTANDING_NONCES:
                raise ConflictError("too many outstanding nonces", reason="nonce-exhausted")
        nonce = _random.token_hex(limits.NONCE_BYTES)
        expires = t + limits.NONCE_TTL_SECONDS
        self.store.add_nonce(nonce, expires)
        return protocol.NonceResponse(nonce=nonce, expires_at=expires)

    def _consume_nonce(self, nonce: str, now: datetime) -> None:
        if not self.store.consume_nonce(nonce, now.timestamp()):
            raise BindingError(
                "the nonce is unknown, expired or used before", reason="nonce-invalid"
            )

    # --- sessions --------------------------------------------------------------------------

    def create_session(self, signed: protocol.SignedSession) -> protocol.SessionAccepted:
        session = Session.from_yaml(signed.session)
        if session.document.predecessor is not None:
            raise SessionError(
                "a new session has no predecessor; use update for an existing one",
                reason="unexpected-predecessor",
            )
        signers = _valid_signers(signed, "create", session.hash)
        if not signers:
            raise AccessDenied(
                "creating a session needs a valid owner signature", reason="unsigned"
            )
        creator = signers[0]
        self.store.create_session(session.name, session.hash, creator, signed.session.encode())
        log.info("session %s created (hash %s)", session.name, session.hash)
        return protocol.SessionAccepted(name=session.name, hash=session.hash, version=1)

    def update_session(self, name: str, signed: protocol.SignedSession) -> protocol.SessionAccepted:
        session = Session.from_yaml(signed.session)
        if session.name != name:
            raise SessionError(
                f"the document is session {session.name!r}, not {name!r}", reason="name-mismatch"
            )
        current_record = self.store.current_session(name)
        if current_record is None:
            raise NotFound(f"session {name!r} does not exist", reason="no-such-session")
        current = Session.from_yaml(current_record.document)
        if session.document.predecessor != current_record.hash:
            raise ConflictError(
                f"an update of {name!r} must name its current hash {current_record.hash} as "
                "predecessor",
                reason="stale-predecessor",
            )
        signers = _valid_signers(signed, "update", session.hash)
        _authorize(current, current_record.creator, "update", signers)
        version = self.store.update_session(
            name, current_record.hash, session.hash, signed.session.encode()
        )
        log.info("session %s updated to version %d (hash %s)", name, version, session.hash)
        return protocol.SessionAccepted(name=name, hash=session.hash, version=version)

    def read_session(
        self, name: str, req: protocol.SignedRead, now: datetime
    ) -> protocol.SessionView:
        record = self.store.current_session(name)
        self._consume_nonce(req.nonce, now)
        if record is None:
            raise NotFound(f"session {name!r} does not exist", reason="no-such-session")
        try:
            key = parse_public_key(req.public_key)
        except ValueError as exc:
            raise AccessDenied(str(exc), reason="bad-key") from None
        if not _verify_read(key, req, name):
            raise AccessDenied(
                "the read request's signature does not verify", reason="bad-signature"
            )
        session = Session.from_yaml(record.document)
        _authorize(session, record.creator, "read", [req.public_key])
        return protocol.SessionView(
            name=name, hash=record.hash, version=record.version, session=record.document.decode()
        )

    def service_exists(self, name: str, service: str) -> protocol.ServiceExists:
        record = self.store.current_session(name)
        if record is None:
            raise NotFound(f"session {name!r} does not exist", reason="no-such-session")
        if Session.from_yaml(record.document).service(service) is None:
            raise NotFound(f"session {name!r} has no service {service!r}", reason="no-such-service")
        return protocol.ServiceExists(session=name, service=service, session_hash=record.hash)

    # --- activation ------------------------------------------------------------------------

    def activate(
        self, req: protocol.ActivationRequest, now: datetime
    ) -> protocol.ActivationResponse:
        try:
            response = self._activate(req, now)
        except Error as exc:
            self.events.refused(exc.reason)
            log.warning(
                "activation of %s/%s refused: %s [%s]",
                req.session,
                req.service,
                exc.message,
                exc.reason,
            )
            raise
        self.events.activations["accepted"] = self.events.activations.get("accepted", 0) + 1
        return response

    def _activate(
        self, req: protocol.ActivationRequest, now: datetime
    ) -> protocol.ActivationResponse:
        # (1) well-formed request, known wire version and TEE
        if req.binding_version != protocol.WIRE_VERSION:
            raise MalformedEvidenceError(
                f"binding version {req.binding_version} is not supported", reason="binding-version"
            )
        try:
            tee = Tee(req.tee)
        except ValueError:
            raise MalformedEvidenceError(f"unknown TEE {req.tee!r}", reason="unknown-tee") from None
        verifier = self.verifiers.get(tee)
        if verifier is None:
            raise MalformedEvidenceError(
                f"this CAS has no verifier for {tee.value}", reason="unsupported-tee"
            )
        evidence = _b64(req.evidence, "evidence", limits.MAX_EVIDENCE_BYTES)
        hpke_pub_raw = _b64(req.hpke_public_key, "hpke_public_key", 4096)
        hpke_pub = _hpke_public_key(hpke_pub_raw)
        try:
            csr_key = pki.csr_public_key(req.csr.encode())
        except Exception:  # noqa: BLE001 - any CSR parse failure is the same refusal
            raise MalformedEvidenceError(
                "the CSR cannot be read or its signature fails", reason="bad-csr"
            ) from None
        # (2) single-use, unexpired nonce
        self._consume_nonce(req.nonce, now)
        # (3) the session and service exist
        record = self.store.current_session(req.session)
        if record is None:
            raise NotFound(f"session {req.session!r} does not exist", reason="no-such-session")
        session = Session.from_yaml(record.document)
        service = session.service(req.service)
        if service is None:
            raise NotFound(
                f"session {req.session!r} has no service {req.service!r}", reason="no-such-service"
            )
        # (4) genuine evidence
        claims = verifier.verify(evidence, now=now)
        # (5) bound to this nonce and to both keys of this activation
        csr_der = csr_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        binding.check_binding(
            claims.report_data,
            bytes.fromhex(req.nonce),
            protocol.activation_key_material(hpke_pub_raw, csr_der),
        )
        # (6) acceptable to the session
        policy.appraise(claims, service, session.document.security.attestation)
        # (7) configuration, rendered and sealed to the workload's key
        bundle = self._bundle(session, record.hash, service.name, csr_key, now)
        sealed = HPKE_SUITE.encrypt(
            bundle.model_dump_json().encode(),
            hpke_pub,
            info=protocol.bundle_info(bytes.fromhex(req.nonce)),
        )
        log.info("activated %s/%s (%s)", session.name, service.name, tee.value)
        return protocol.ActivationResponse(sealed_bundle=base64.b64encode(sealed).decode())

    def _bundle(
        self,
        session: Session,
        session_hash: str,
        service_name: str,
        workload_key: pki.PublicKey,
        now: datetime,
    ) -> protocol.Bundle:
        service = session.service(service_name)
        assert service is not None
        kinds = {s.name: s.kind for s in session.document.secrets}
        marker = "CLOISTER-WORKLOAD-KEY-" + _random.token_hex(16)
        resolver = _Resolver(self.store, session, workload_key, marker, now)

        def fill(text: str) -> str:
            return render(text, kinds, resolver.value)

        argv = service.argv()
        image = session.image(service.image_name)
        files = []
        for f in image.injection_files if image else []:
            content = fill(f.content).encode()
            mode = int(f.permission, 8) if f.permission else 0o600
            files.append(
                protocol.BundleFile(
                    path=f.path, content=base64.b64encode(content).decode(), mode=mode
                )
            )
        return protocol.Bundle(
            session=session.name,
            service=service.name,
            session_hash=session_hash,
            command=[fill(a) for a in argv] if argv is not None else None,
            environment={k: fill(v) for k, v in service.environment.items()},
            pwd=fill(service.pwd) if service.pwd else None,
            files=files,
            key_marker=marker,
            certificates=resolver.issued_pem(),
        )


class _Resolver:
    """Secret values for one activation: stored ones created once, workload certs issued now."""

    def __init__(
        self,
        store: Store,
        session: Session,
        workload_key: pki.PublicKey,
        marker: str,
        now: datetime,
    ) -> None:
        self.store = store
        self.session = session
        self.workload_key = workload_key
        self.marker = marker
        self.now = now
        self._issued: dict[str, secretlib.SecretValue] = {}

    def value(self, placeholder: Placeholder) -> str:
        secret = self.session.secret(placeholder.secret)
        assert secret is not None  # the loader checked every placeholder
        if secret.kind == "x509" and secret.private_key is None:
            # Bound to the workload's own key, which never leaves the workload.
            value = self._workload_cert(secret.name)
            if placeholder.format in ("key", "privatekey"):
                return self.marker
            return secretlib.render(value, placeholder)
        return secretlib.render(self.stored(secret.name), placeholder)

    def stored(self, name: str) -> secretlib.SecretValue:
        secret = self.session.secret(name)
        assert secret is not None
        issuer = self.stored(secret.issuer) if secret.issuer else None
        private_key = self.stored(secret.private_key) if secret.private_key else None

        def make() -> bytes:
            return secretlib.generate(
                secret, now=self.now, issuer=issuer, private_key=private_key
            ).to_bytes()

        value = secretlib.SecretValue.from_bytes(
            self.store.create_secret(self.session.name, name, secret.kind, make)
        )
        if secret.kind == "x509" and _needs_renewal(value, self.now):
            renewed = secretlib.SecretValue.from_bytes(make())
            self.store.replace_secret(self.session.name, name, secret.kind, renewed.to_bytes())
            value = renewed
        return value

    def _workload_cert(self, name: str) -> secretlib.SecretValue:
        if name not in self._issued:
            secret = self.session.secret(name)
            assert secret is not None and secret.issuer is not None
            issuer = self.stored(secret.issuer)
            cert = secretlib.issue_for(secret, issuer, self.workload_key, now=self.now)
            self._issued[name] = secretlib.SecretValue(
                "x509",
                cert=cert.public_bytes(serialization.Encoding.DER),
                chain=(issuer.cert or b"",),
            )
        return self._issued[name]

    def issued_pem(self) -> dict[str, str]:
        from cryptography import x509

        return {
            name: x509.load_der_x509_certificate(v.cert or b"")
            .public_bytes(serialization.Encoding.PEM)
            .decode()
            for name, v in self._issued.items()
        }


def _needs_renewal(value: secretlib.SecretValue, now: datetime) -> bool:
    cert = value.certificate()
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < max(lifetime / 3, timedelta(minutes=1))


def _valid_signers(signed: protocol.SignedSession, operation: str, session_hash: str) -> list[str]:
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


def _authorize(session: Session, creator: str, verb: str, signers: list[str]) -> None:
    entries = getattr(session.document.access_policy, verb)
    allowed: set[str] = set()
    for entry in entries:
        if entry == "CREATOR":
            allowed.add(creator)
        elif entry != "NONE":
            allowed.add(signatures.format_public_key(parse_public_key(entry)))
    if not any(canonical_key(s) in allowed for s in signers):
        raise AccessDenied(
            f"no key allowed to {verb} session {session.name!r} signed this request",
            reason="not-authorized",
        )


def canonical_key(text: str) -> str:
    try:
        return signatures.format_public_key(parse_public_key(text))
    except ValueError:
        return ""


def _verify_read(key: bytes, req: protocol.SignedRead, name: str) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        ed25519.Ed25519PublicKey.from_public_bytes(key).verify(
            base64.b64decode(req.signature, validate=True), protocol.read_payload(name, req.nonce)
        )
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def _b64(text: str, what: str, limit: int) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedEvidenceError(
            f"{what} is not valid base64", reason="malformed-request"
        ) from None
    if len(raw) > limit:
        raise MalformedEvidenceError(f"{what} is larger than {limit} bytes", reason="too-large")
    return raw


def _hex_bytes(text: str, what: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise MalformedEvidenceError(f"{what} is not hex", reason="malformed-request") from None
    if len(raw) != size:
        raise MalformedEvidenceError(f"{what} must be {size} bytes", reason="malformed-request")
    return raw


def _hpke_public_key(raw: bytes) -> hpke.MLKEM768X25519PublicKey:
    if len(raw) != _MLKEM768_PUBLIC_BYTES + _X25519_PUBLIC_BYTES:
        raise MalformedEvidenceError(
            "hpke_public_key must be an ML-KEM-768 + X25519 public key", reason="bad-hpke-key"
        )
    try:
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PUBLIC_BYTES]),
            x25519.X25519PublicKey.from_public_bytes(raw[_MLKEM768_PUBLIC_BYTES:]),
        )
    except ValueError:
        raise MalformedEvidenceError(
            "hpke_public_key is not a valid key", reason="bad-hpke-key"
        ) from None
