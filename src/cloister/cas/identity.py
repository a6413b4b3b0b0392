"""The CAS's identity: its TLS key and self-signed certificate, and the evidence that binds them.

The identity key is generated on first start and kept (sealed) in the store, so a restarted
CAS keeps its identity and owners' pins stay valid. The CAS's evidence binds
``SHA-512(nonce ‖ SPKI DER of the identity key)``: an owner who checks it knows that the TLS
endpoint they talk to terminates inside the measured CAS.

RA-TLS: the identity certificate also carries evidence in an X.509 extension
(``pki.EVIDENCE_OID``), bound to the certificate's key with the fixed nonce ``RA_TLS_NONCE``,
so a client can attest the CAS during the TLS handshake (``verify_ra_tls``) before it sends
anything. That evidence is made when the certificate is (first start) and says which code
created this identity; the interactive ``/v1/cas/evidence`` with the client's own nonce
remains the check of what runs now.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloister import pki
from cloister.attestation import Claims, Tee, binding, simulated
from cloister.errors import AccessDenied, AppraisalError
from cloister.store import Store

RA_TLS_NONCE = hashlib.sha256(b"cloister-ra-tls-v1").digest()

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def spki_der(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def load_or_create(
        cls,
        store: Store,
        *,
        hostnames: Sequence[str],
        now: datetime,
        self_evidence: SimulatedSelf | None = None,
    ) -> Identity:
        key_der = store.get_or_create_meta("identity-key", _new_key_der)
        key = serialization.load_der_private_key(key_der, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)

        def make() -> bytes:
            evidence = None
            if self_evidence is not None:
                spki = key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                evidence = self_evidence.raw(binding.report_data_for(RA_TLS_NONCE, spki))
            return _self_signed(key, hostnames, now, evidence)

        cert_der = store.get_or_create_meta("identity-cert", make)
        return cls(key, x509.load_der_x509_certificate(cert_der))


def _new_key_der() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _self_signed(
    key: ec.EllipticCurvePrivateKey,
    hostnames: Sequence[str],
    now: datetime,
    evidence: tuple[Tee, bytes] | None = None,
) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Cloister CAS")])
    sans: list[x509.GeneralName] = []
    for h in ["localhost", "127.0.0.1", "::1", *hostnames]:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if evidence is not None:
        tee, raw = evidence
        builder = builder.add_extension(
            pki.evidence_extension(tee.value.encode() + b"\x00" + raw), critical=False
        )
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER)


def verify_ra_tls(cert: x509.Certificate, *, now: datetime, allow_simulation: bool) -> Claims:
    """The claims of the evidence a CAS certificate carries, checked to bind its key.

    (1) the certificate carries the evidence extension; (2) the evidence is genuine (only
    simulated evidence can be checked by this client, and only when allowed); (3) its report
    data binds ``RA_TLS_NONCE`` and the certificate's own public key. The caller compares the
    measurement with what it expects.
    """
    # (1)
    try:
        raw = pki.evidence_in(cert)
    except ValueError as exc:
        raise AccessDenied(str(exc), reason="bad-evidence-extension") from None
    if raw is None:
        raise AccessDenied(
            "the CAS certificate carries no evidence extension", reason="no-evidence-extension"
        )
    tee_name, sep, evidence = raw.partition(b"\x00")
    try:
        tee = Tee(tee_name.decode("ascii", "replace"))
    except ValueError:
        raise AccessDenied("unknown TEE in the evidence extension", reason="unknown-tee") from None
    # (2)
    if not sep or tee is not Tee.SIMULATION:
        raise AccessDenied(
            f"verifying {tee.value} evidence in a certificate is not supported by this client",
            reason="unsupported-tee",
        )
    if not allow_simulation:
        raise AppraisalError(
            "the CAS certificate carries simulated evidence", reason="simulation-not-tolerated"
        )
    claims = simulated.SimulatedVerifier().verify(evidence, now=now)
    # (3)
    binding.check_binding(claims.report_data, RA_TLS_NONCE, pki.spki_der(cert))
    return claims


@dataclass(frozen=True)
class SimulatedSelf:
    """The CAS's own evidence in simulation mode. Protects nothing, and says so."""

    platform: simulated.SimulatedPlatform
    measurement: bytes

    def raw(self, report_data: bytes) -> tuple[Tee, bytes]:
        log.warning("SIMULATION: the CAS puts simulated evidence into its TLS certificate")
        return Tee.SIMULATION, self.platform.quote(self.measurement, report_data)

    def evidence(self, nonce: bytes, identity: Identity) -> bytes:
        log.warning("SIMULATION: the CAS produces simulated evidence of itself")
        return self.platform.quote(
            self.measurement, binding.report_data_for(nonce, identity.spki_der)
        )
