"""The CAS: attestation → policy → secrets / CA, composed over the store. No HTTP here.

``Cas`` is what the HTTP API (``cas.api``) calls. Every method takes ``now``. Every refusal is
an ``Error`` whose detailed reason goes to the audit log; the API maps it to a status and a
stable code for the caller.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import hpke, serialization

from cloister import limits, pki, policy, protocol
from cloister import secrets as secretlib
from cloister.attestation import Tee, Verifier, binding, simulated
from cloister.cas import audit, cache, governance, metrics, nonces
from cloister.cas import mesh as meshlib
from cloister.cas import volumes as volumelib
from cloister.cas.identity import Identity, SimulatedSelf
from cloister.errors import (
    AccessDenied,
    ConflictError,
    Error,
    MalformedEvidenceError,
    NotFound,
    SessionError,
)
from cloister.session import Session, parse_public_key, template
from cloister.store import Store

log = logging.getLogger(__name__)


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
        self.audit = audit.AuditLog(store)
        self.nonces = nonces.NonceKeys.load(store.get_or_create_meta)
        # Parsed sessions by document digest: the activation path parses no YAML; stored
        # secret values that cannot change under the session version being activated.
        self.sessions = cache.SessionCache()
        self.secrets = cache.SecretCache()
        self.metrics = metrics.Metrics(self)
        self.verifiers = {t: self.metrics.timed(t.value, v) for t, v in self.verifiers.items()}

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
        """A fresh nonce. Writes nothing: the store records a nonce only when it is used."""
        nonce = self.nonces.issue(now.timestamp())
        return protocol.NonceResponse(nonce=nonce.hex, expires_at=nonce.expires_at)

    def _consume_nonce(self, nonce_hex: str, now: datetime) -> None:
        """Check ``nonce_hex`` and record its single use now (in a transaction of its own)."""
        nonce = self.nonces.check(nonce_hex, now.timestamp())
        if not self.store.claim_nonce(nonce.hex, nonce.expires_at):
            raise nonces.replayed()

    # --- sessions --------------------------------------------------------------------------

    @audit.audited("session-create", audit.on_create)
    def create_session(self, signed: protocol.SignedSession) -> protocol.SessionAccepted:
        session = Session.from_yaml(signed.session)
        if session.document.predecessor is not None:
            raise SessionError(
                "a new session has no predecessor; use update for an existing one",
                reason="unexpected-predecessor",
            )
        signers = governance.valid_signers(signed, "create", session.hash)
        if not signers:
            raise AccessDenied(
                "creating a session needs a valid owner signature", reason="unsigned"
            )
        creator = signers[0]
        governance.authorize_create(session.name, signers, self.store)
        governance.check_imports(session, self.store)
        _announce(session)
        self.store.create_session(session.name, session.hash, creator, signed.session.encode())
        log.info("session %s created (hash %s)", session.name, session.hash)
        return protocol.SessionAccepted(name=session.name, hash=session.hash, version=1)

    @audit.audited("session-update", audit.on_update)
    def update_session(self, name: str, signed: protocol.SignedSession) -> protocol.SessionAccepted:
        session = Session.from_yaml(signed.session)
        if session.name != name:
            raise SessionError(
                f"the document is session {session.name!r}, not {name!r}", reason="name-mismatch"
            )
        current_record = self.store.current_session(name)
        if current_record is None:
            raise NotFound(f"session {name!r} does not exist", reason="no-such-session")
        current = self.sessions.load(current_record.document)
        if session.document.predecessor != current_record.hash:
            raise ConflictError(
                f"an update of {name!r} must name its current hash {current_record.hash} as "
                "predecessor",
                reason="stale-predecessor",
            )
        signers = governance.valid_signers(signed, "update", session.hash)
        # The policy in force decides, also over an update that changes the policy itself.
        governance.authorize(current, current_record.creator, "update", signers)
        governance.check_imports(session, self.store)
        _announce(session)
        version = self.store.update_session(
            name, current_record.hash, session.hash, signed.session.encode()
        )
        log.info("session %s updated to version %d (hash %s)", name, version, session.hash)
        return protocol.SessionAccepted(name=name, hash=session.hash, version=version)

    @audit.audited("session-read", audit.on_read)
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
        session = self.sessions.load(record.document)
        governance.authorize(session, record.creator, "read", [req.public_key])
        return protocol.SessionView(
            name=name, hash=record.hash, version=record.version, session=record.document.decode()
        )

    def service_exists(self, name: str, service: str) -> protocol.ServiceExists:
        record = self.store.current_session(name)
        if record is None:
            raise NotFound(f"session {name!r} does not exist", reason="no-such-session")
        if self.sessions.load(record.document).service(service) is None:
            raise NotFound(f"session {name!r} has no service {service!r}", reason="no-such-service")
        return protocol.ServiceExists(session=name, service=service, session_hash=record.hash)

    # --- activation ------------------------------------------------------------------------

    def activate(
        self, req: protocol.ActivationRequest, now: datetime
    ) -> protocol.ActivationResponse:
        """Steps (1)–(7) below; then (8): the nonce's single use and the audit entry are
        recorded in one transaction, and the bundle leaves only once both are durable."""
        subject = audit.on_activate(req, now, result=None)
        nonce: nonces.Nonce | None = None
        try:
            nonce = self._admit(req, now)
            response = self._activate(req, now)
        except Error as exc:
            raise self._refuse(req, exc, subject, nonce) from None
        replay = nonces.replayed()
        _, fresh = self.audit.record_claiming(
            "activation", nonce, instead=_refusal(replay), outcome="accepted", **subject
        )
        if not fresh:
            self._count_refusal(req, replay)
            raise replay
        self.events.activations["accepted"] = self.events.activations.get("accepted", 0) + 1
        return response

    def _refuse(
        self,
        req: protocol.ActivationRequest,
        exc: Error,
        subject: Mapping[str, object],
        nonce: nonces.Nonce | None,
    ) -> Error:
        """Audit a refusal and return what to raise. A genuine nonce counts as used by it; if
        it was used before, that is the refusal (whatever else was wrong)."""
        if nonce is None:
            self.audit.record("activation", **_refusal(exc), **subject)
        else:
            replay = nonces.replayed()
            _, fresh = self.audit.record_claiming(
                "activation", nonce, instead=_refusal(replay), **_refusal(exc), **subject
            )
            if not fresh:
                exc = replay
        self._count_refusal(req, exc)
        return exc

    def _count_refusal(self, req: protocol.ActivationRequest, exc: Error) -> None:
        self.events.refused(exc.reason)
        log.warning(
            "activation of %s/%s refused: %s [%s]",
            req.session,
            req.service,
            exc.message,
            exc.reason,
        )

    def _admit(self, req: protocol.ActivationRequest, now: datetime) -> nonces.Nonce:
        """(1) a request of a known wire version; (2) a nonce this CAS issued, unexpired.

        Whether the nonce was used before is settled in step (8), with the audit entry.
        """
        if req.binding_version != protocol.WIRE_VERSION:
            raise MalformedEvidenceError(
                f"binding version {req.binding_version} is not supported", reason="binding-version"
            )
        return self.nonces.check(req.nonce, now.timestamp())

    def _activate(
        self, req: protocol.ActivationRequest, now: datetime
    ) -> protocol.ActivationResponse:
        # (1) well-formed request, known TEE
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
        # (3) the session and service exist
        record = self.store.current_session(req.session)
        if record is None:
            raise NotFound(f"session {req.session!r} does not exist", reason="no-such-session")
        session = self.sessions.load(record.document)
        service = session.service(req.service)
        if service is None:
            raise NotFound(
                f"session {req.session!r} has no service {req.service!r}", reason="no-such-service"
            )
        # (3a) second factors the session asks for: service access token, one-time password
        resolver = secretlib.Resolver(
            self.secrets.view(self.store, record.hash, now),
            session,
            record.hash,
            now=now,
            lookup=governance.lookup(self.store),
            workload_key=csr_key,
        )
        _check_second_factors(self.store, session, service.name, req, resolver, now)
        if session.document.security.attestation.mode == "none":
            # Development only; the loader refused this without tolerate: [no-attestation].
            log.warning(
                "ATTESTATION IS OFF for session %s (mode: none): %s/%s activated without "
                "checking any evidence",
                session.name,
                session.name,
                service.name,
            )
        else:
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
        bundle = self._bundle(session, record.hash, service.name, resolver)
        sealed = protocol.HPKE_SUITE.encrypt(
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
        resolver: secretlib.Resolver,
    ) -> protocol.Bundle:
        service = session.service(service_name)
        assert service is not None
        kinds = session.kinds()

        def fill(text: str) -> str:
            return template.render(text, kinds, resolver.text)

        argv = service.argv()
        image = session.image(service.image_name)
        files = []
        for f in image.injection_files if image else []:
            content = template.render_bytes(f.content, kinds, resolver.data)
            mode = int(f.permission, 8) if f.permission else 0o600
            files.append(
                protocol.BundleFile(
                    path=f.path, content=base64.b64encode(content).decode(), mode=mode
                )
            )
        # Volumes: each key only with the last acknowledged tag; reports carry the activation id.
        volume_list = volumelib.for_service(
            self.store, session, service, governance.lookup(self.store)
        )
        activation = None
        if volume_list and resolver.workload_key is not None:
            activation = volumelib.activation_id(
                self.store, session.name, service.name, resolver.workload_key
            )
        # Host arguments and variables (@@1, @@NAME) stay as they are: the agent fills them.
        return protocol.Bundle(
            session=session.name,
            service=service.name,
            session_hash=session_hash,
            command=[fill(a) for a in argv] if argv is not None else None,
            environment={k: fill(v) for k, v in service.environment.items()},
            pwd=fill(service.pwd) if service.pwd else None,
            files=files,
            key_marker=resolver.marker,
            certificates=resolver.issued_pem(),
            volumes=volume_list,
            mesh=meshlib.for_service(session, service, resolver, now=resolver.now),
            activation_id=activation,
        )

    # --- encrypted volumes -----------------------------------------------------------------

    @audit.audited("volume-tag", volumelib.audit_subject)
    def report_volume_tag(self, report: protocol.VolumeTagReport) -> protocol.VolumeTagAccepted:
        """Acknowledge a volume's new root tag (signed by an activated workload), or refuse."""
        return volumelib.report(self.store, report, governance.lookup(self.store))

    # --- public exports --------------------------------------------------------------------

    def public_secret(self, session_name: str, secret_name: str, now: datetime) -> str:
        """A secret its session publishes (``export_public: true``): certificates as PEM
        (never a key), explicit ascii/binary values as text/hex. Unauthenticated."""
        record = self.store.current_session(session_name)
        session = self.sessions.load(record.document) if record is not None else None
        secret = session.secret(secret_name) if session is not None else None
        if session is None or record is None or secret is None or not secret.export_public:
            # One answer for "no such session", "no such secret" and "not public": no oracle.
            raise NotFound("no such public secret", reason="no-such-public-secret")
        resolver = secretlib.Resolver(
            self.store, session, record.hash, now=now, lookup=governance.lookup(self.store)
        )
        value = resolver.value(secret_name)
        kind = secret.kind or value.kind
        fmt = {"ascii": "raw", "binary": "hex", "x509": "crt", "x509-ca": "trust"}.get(kind)
        if fmt is None:
            raise NotFound("no such public secret", reason="no-such-public-secret")
        return secretlib.render(value.public(), template.Placeholder(secret_name, fmt), now=now)


def _refusal(exc: Error) -> dict[str, object]:
    return {"outcome": "refused", "reason": exc.reason, "message": exc.message}


def _check_second_factors(
    store: Store,
    session: Session,
    service: str,
    req: protocol.ActivationRequest,
    resolver: secretlib.Resolver,
    now: datetime,
) -> None:
    """SCONE's service access token and TOTP (RFC 6238) one-time password, if configured."""
    import hmac

    token = session.document.security.service_access_token
    if token is not None and not hmac.compare_digest(
        (req.service_access_token or "").encode(), token.encode()
    ):
        raise AccessDenied(
            "this session needs its service access token (SCONE_SERVICE_ACCESS_TOKEN)",
            reason="access-token-invalid",
        )
    svc = session.service(service)
    assert svc is not None
    shared = (
        svc.one_time_password_shared_secret
        or session.document.security.attestation.one_time_password_shared_secret
    )
    if shared is None:
        return
    text = template.render(shared, session.kinds(), resolver.text)
    if not req.otp or not secretlib.totp_verify(text, req.otp, now):
        raise AccessDenied(
            "this service needs a current one-time password (SCONE_CONFIG_ID=session/service@OTP)",
            reason="otp-invalid",
        )
    # One time: a password that started this service once does not start it again. The
    # store's record of used nonces remembers it for as long as it could verify.
    import hashlib

    seen = "otp:" + hashlib.sha256(f"{session.name}/{service}/{req.otp}".encode()).hexdigest()
    if not store.claim_nonce(seen, now.timestamp() + 3 * secretlib.TOTP_STEP_SECONDS):
        raise AccessDenied("this one-time password was used before", reason="otp-replayed")


def _announce(session: Session) -> None:
    for warning in session.warnings:
        log.warning("session %s: %s", session.name, warning)


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
    try:
        return protocol.hpke_public_key(raw)
    except ValueError:
        raise MalformedEvidenceError(
            "hpke_public_key must be a valid ML-KEM-768 + X25519 public key",
            reason="bad-hpke-key",
        ) from None
