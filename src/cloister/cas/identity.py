"""The CAS's identity: its TLS key and self-signed certificate, and the evidence that binds them.

The identity key is generated on first start and kept (sealed) in the store, so a restarted
CAS keeps its identity and owners' pins stay valid. The CAS's evidence binds
``SHA-512(nonce ‖ SPKI DER of the identity key)``: an owner who checks it knows that the TLS
endpoint they talk to terminates inside the measured CAS.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloister.attestation import binding, simulated
from cloister.store import Store

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
    def load_or_create(cls, store: Store, *, hostnames: Sequence[str], now: datetime) -> Identity:
        key_der = store.get_or_create_meta("identity-key", _new_key_der)
        key = serialization.load_der_private_key(key_der, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        cert_der = store.get_or_create_meta(
            "identity-cert", lambda: _self_signed(key, hostnames, now)
        )
        return cls(key, x509.load_der_x509_certificate(cert_der))


def _new_key_der() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _self_signed(key: ec.EllipticCurvePrivateKey, hostnames: Sequence[str], now: datetime) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Cloister CAS")])
    sans: list[x509.GeneralName] = []
    for h in ["localhost", "127.0.0.1", "::1", *hostnames]:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
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
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class SimulatedSelf:
    """The CAS's own evidence in simulation mode. Protects nothing, and says so."""

    platform: simulated.SimulatedPlatform
    measurement: bytes

    def evidence(self, nonce: bytes, identity: Identity) -> bytes:
        log.warning("SIMULATION: the CAS produces simulated evidence of itself")
        return self.platform.quote(
            self.measurement, binding.report_data_for(nonce, identity.spki_der)
        )
