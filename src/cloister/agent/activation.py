"""Activation: attest to the CAS and receive this workload's configuration bundle.

(1) fetch a single-use nonce; (2) make an ephemeral HPKE key pair (ML-KEM-768 + X25519) and a
TLS key with its CSR; (3) obtain evidence whose report data binds the nonce and both public
keys; (4) send evidence, keys and CSR; (5) open the bundle, which only this key can unseal.
Transient failures (CAS unreachable, rate limited) are retried with backoff and a fresh nonce;
refusals are not.
"""

from __future__ import annotations

import base64
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.x509.oid import NameOID

from cloister import errors, protocol
from cloister.agent.evidence import EvidenceProvider
from cloister.attestation import binding
from cloister.client import CasClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Activated:
    bundle: protocol.Bundle
    tls_key: ec.EllipticCurvePrivateKey

    def tls_key_pem(self) -> str:
        return self.tls_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()


def _csr(key: ec.EllipticCurvePrivateKey, service: str) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


@dataclass(frozen=True)
class Attempt:
    """One activation's request and the ephemeral keys that open its answer."""

    request: protocol.ActivationRequest
    hpke_key: hpke.MLKEM768X25519PrivateKey
    tls_key: ec.EllipticCurvePrivateKey

    def open(self, resp: protocol.ActivationResponse) -> Activated:
        """(5) unseal the bundle: only this attempt's key opens it, bound to its nonce."""
        try:
            plain = protocol.HPKE_SUITE.decrypt(
                base64.b64decode(resp.sealed_bundle),
                self.hpke_key,
                info=protocol.bundle_info(bytes.fromhex(self.request.nonce)),
            )
        except Exception:  # noqa: BLE001 - any failure to open means the bundle is not for us
            raise errors.BindingError(
                "the CAS's bundle does not open with this activation's key",
                reason="bundle-unsealable",
            ) from None
        return Activated(protocol.Bundle.model_validate_json(plain), self.tls_key)


def prepare(nonce: str, provider: EvidenceProvider, session: str, service: str) -> Attempt:
    """(2) ephemeral keys; (3) evidence bound to ``nonce`` and both keys; the request."""
    kem_key, dh_key = mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    hpke_key = hpke.MLKEM768X25519PrivateKey(kem_key, dh_key)
    hpke_pub = protocol.hpke_public_bytes(kem_key.public_key(), dh_key.public_key())
    tls_key = ec.generate_private_key(ec.SECP256R1())
    tls_spki = tls_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    report_data = binding.report_data_for(
        bytes.fromhex(nonce), protocol.activation_key_material(hpke_pub, tls_spki)
    )
    evidence = provider.evidence(report_data)
    request = protocol.ActivationRequest(
        tee=provider.tee.value,
        evidence=base64.b64encode(evidence).decode(),
        nonce=nonce,
        hpke_public_key=base64.b64encode(hpke_pub).decode(),
        csr=_csr(tls_key, service).decode(),
        session=session,
        service=service,
    )
    return Attempt(request, hpke_key, tls_key)


def activate_once(
    client: CasClient, provider: EvidenceProvider, session: str, service: str
) -> Activated:
    """(1) a nonce, (2)–(3) ``prepare``, (4) the activation request, (5) ``Attempt.open``."""
    attempt = prepare(client.nonce().nonce, provider, session, service)
    return attempt.open(client.activate(attempt.request))


def activate(
    client: CasClient,
    provider: EvidenceProvider,
    session: str,
    service: str,
    *,
    attempts: int = 6,
    sleep: Callable[[float], None] = time.sleep,
) -> Activated:
    """``activate_once`` with retries on transient failures (exponential backoff, jitter)."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return activate_once(client, provider, session, service)
        except (errors.BackendUnavailable, errors.RateLimited) as exc:
            if attempt == attempts:
                raise
            wait = exc.retry_after if isinstance(exc, errors.RateLimited) else delay
            wait *= 1 + random.random() / 2  # noqa: S311 - jitter, not a secret
            log.warning(
                "activation attempt %d failed (%s); retrying in %.1fs", attempt, exc.reason, wait
            )
            sleep(wait)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")
