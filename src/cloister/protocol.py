"""The CAS's wire format (version 1): request and response bodies shared by CAS and clients.

Pure data and what both sides must agree on: the HPKE suite and the wire encoding of its
public key, the key material that an activation's report data binds, and the HPKE ``info``
that binds a sealed bundle to its activation. Nothing here performs IO.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from pydantic import BaseModel, ConfigDict, Field

from cloister import limits

WIRE_VERSION = 1
HPKE_SUITE_NAME = "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"
HPKE_SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_MLKEM768_PUBLIC_BYTES = 1184
_X25519_PUBLIC_BYTES = 32
_BUNDLE_INFO = b"cloister-bundle-v1\x00"
_READ_DOMAIN = b"cloister-session-read-v1\x00"

_B64_EVIDENCE = (limits.MAX_EVIDENCE_BYTES * 4) // 3 + 8


class Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def hpke_public_bytes(kem: mlkem.MLKEM768PublicKey, dh: x25519.X25519PublicKey) -> bytes:
    """The wire form of a hybrid HPKE public key: the ML-KEM-768 key, then the X25519 key."""
    return kem.public_bytes_raw() + dh.public_bytes_raw()


def hpke_public_key(raw: bytes) -> hpke.MLKEM768X25519PublicKey:
    """The hybrid HPKE public key in ``raw`` (``hpke_public_bytes``); ``ValueError`` if not one."""
    if len(raw) != _MLKEM768_PUBLIC_BYTES + _X25519_PUBLIC_BYTES:
        raise ValueError("not an ML-KEM-768 + X25519 public key")
    return hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PUBLIC_BYTES]),
        x25519.X25519PublicKey.from_public_bytes(raw[_MLKEM768_PUBLIC_BYTES:]),
    )


def activation_key_material(hpke_public_key: bytes, csr_public_key_der: bytes) -> bytes:
    """What the report data of an activation binds: both keys the workload activates with."""
    return hpke_public_key + csr_public_key_der


def bundle_info(nonce: bytes) -> bytes:
    return _BUNDLE_INFO + nonce


def read_payload(session: str, nonce: str) -> bytes:
    return _READ_DOMAIN + session.encode() + b"\x00" + bytes.fromhex(nonce)


class ErrorBody(Wire):
    error: str
    message: str
    request_id: str


class NonceResponse(Wire):
    nonce: str
    expires_at: float


class CasEvidence(Wire):
    tee: str
    evidence: str  # base64
    identity_certificate: str  # PEM; the evidence binds SHA-512(nonce ‖ its SPKI DER)
    simulation: bool


class SessionSignature(Wire):
    public_key: str = Field(max_length=512)
    signature: str = Field(max_length=512)


class SignedSession(Wire):
    session: str = Field(max_length=limits.MAX_SESSION_BYTES)
    signatures: list[SessionSignature] = Field(max_length=64)


class SessionAccepted(Wire):
    name: str
    hash: str
    version: int


class SignedRead(Wire):
    nonce: str = Field(pattern=r"^[0-9a-f]{64}$")
    public_key: str = Field(max_length=512)
    signature: str = Field(max_length=512)


class SessionView(Wire):
    name: str
    hash: str
    version: int
    session: str


class ServiceExists(Wire):
    session: str
    service: str
    session_hash: str


class ActivationRequest(Wire):
    binding_version: int = WIRE_VERSION
    tee: str = Field(max_length=16)
    evidence: str = Field(max_length=_B64_EVIDENCE)
    nonce: str = Field(pattern=r"^[0-9a-f]{64}$")
    hpke_public_key: str = Field(max_length=4096)
    csr: str = Field(max_length=limits.MAX_CSR_BYTES)
    session: str = Field(max_length=limits.MAX_NAME_LENGTH * limits.MAX_SESSION_NAME_DEPTH)
    service: str = Field(max_length=limits.MAX_NAME_LENGTH)
    # Second factors a session may ask for (SCONE): SCONE_CONFIG_ID=session/service@OTP and
    # SCONE_SERVICE_ACCESS_TOKEN. Additive: absent means not given.
    otp: str | None = Field(default=None, max_length=16)
    service_access_token: str | None = Field(default=None, max_length=1024)


class ActivationResponse(Wire):
    suite: str = HPKE_SUITE_NAME
    sealed_bundle: str  # base64 HPKE ciphertext of a ``Bundle``


class BundleFile(Wire):
    path: str
    content: str  # base64
    mode: int = 0o600


class Bundle(Wire):
    """The configuration a workload receives, only ever sealed to its ephemeral key."""

    session: str
    service: str
    session_hash: str
    command: list[str] | None
    environment: dict[str, str]
    pwd: str | None
    files: list[BundleFile]
    key_marker: str  # stands for the workload's own private key (PEM) wherever it occurs
    certificates: dict[str, str]  # x509 secret name → PEM issued for the workload's CSR key
    # Additive (docs/volumes-in-sessions.md, docs/mesh-in-sessions.md): the encrypted volumes
    # this service mounts, its place in the mesh, and the credential its tag reports carry.
    volumes: list[BundleVolume] = Field(default_factory=list)
    mesh: BundleMesh | None = None
    activation_id: str | None = None


# --- encrypted volumes ---------------------------------------------------------------------

VOLUME_TAG_PATTERN = r"^[0-9]{1,20}:[0-9a-f]{64}$"  # "<generation>:<hex HMAC>" (volume format)
_VOLUME_TAG_DOMAIN = b"cloister-volume-tag-v1\x00"


class BundleVolume(Wire):
    """One encrypted volume: where to mount it, its key, and the only tag to accept.

    ``expected_tag`` is the last tag the CAS acknowledged; ``None`` means first use (create
    the volume) under ``rollback_protection``, no freshness check under
    ``no_rollback_protection``, and a fresh empty volume under ``ephemeral``.
    """

    name: str
    path: str
    key: str  # base64 of the 32-byte volume key
    expected_tag: str | None
    policy: str  # rollback_protection | no_rollback_protection | ephemeral


def volume_tag_message(
    activation_id: str, session: str, volume: str, previous: str | None, tag: str
) -> bytes:
    """What a tag report's signature covers: domain, then each field length-prefixed."""
    out = bytearray(_VOLUME_TAG_DOMAIN)
    for part in (activation_id, session, volume, previous or "", tag):
        raw = part.encode()
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


class VolumeTagReport(Wire):
    """A workload reports a volume's new root tag, signed with its activation's TLS key."""

    activation_id: str = Field(max_length=512)
    session: str = Field(max_length=limits.MAX_NAME_LENGTH * limits.MAX_SESSION_NAME_DEPTH)
    volume: str = Field(max_length=limits.MAX_NAME_LENGTH)
    previous: str | None = Field(default=None, pattern=VOLUME_TAG_PATTERN)
    tag: str = Field(pattern=VOLUME_TAG_PATTERN)
    signature: str = Field(max_length=256)  # base64 DER ECDSA-SHA256 over volume_tag_message


class VolumeTagAccepted(Wire):
    volume: str
    tag: str


# --- the mesh ------------------------------------------------------------------------------


class BundleMeshIngress(Wire):
    port: int
    app_port: int
    allow_from: list[str]  # identities, DNS form "<service>.<session>"


class BundleMeshEgress(Wire):
    port: int
    target: str
    peer: str  # identity, DNS form


class BundleMesh(Wire):
    """This service's mesh: its identity, certificate (for the activation's key), CA, rules."""

    identity: str
    certificate: str  # PEM, issued for the workload's CSR key by the session's mesh CA
    ca: str  # PEM bundle of the CA certificates to trust
    ingress: list[BundleMeshIngress]
    egress: list[BundleMeshEgress]
