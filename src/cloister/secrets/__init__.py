"""Secret values: generation inside the CAS, their stored form, and their rendered formats.

Generated secrets are created here, inside the CAS, from the operating system's CSPRNG: no
person ever sees them. ``SecretValue`` is what the store seals; ``render`` is what a
placeholder turns into.
"""

from __future__ import annotations

import base64
import json
import secrets as _random
import string
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from cloister import pki
from cloister.session import Secret, parse_duration
from cloister.session.template import Placeholder

__all__ = ["DEFAULT_VALIDITY", "SecretValue", "generate", "render"]

DEFAULT_VALIDITY = timedelta(days=90)
DEFAULT_CA_VALIDITY = timedelta(days=3650)
_ASCII_ALPHABET = string.ascii_letters + string.digits
_DEFAULT_SIZE = 32


@dataclass(frozen=True)
class SecretValue:
    """The value of one secret. ``data`` holds ascii/binary bytes or a private key (PKCS#8
    DER); ``cert``/``key``/``chain`` hold DER certificates and the certificate's key."""

    kind: str
    data: bytes = b""
    cert: bytes | None = None
    key: bytes | None = None
    chain: tuple[bytes, ...] = field(default_factory=tuple)

    def to_bytes(self) -> bytes:
        def b64(b: bytes) -> str:
            return base64.b64encode(b).decode()

        return json.dumps(
            {
                "kind": self.kind,
                "data": b64(self.data),
                "cert": b64(self.cert) if self.cert else None,
                "key": b64(self.key) if self.key else None,
                "chain": [b64(c) for c in self.chain],
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SecretValue:
        d = json.loads(raw)
        unb64 = base64.b64decode
        return cls(
            kind=d["kind"],
            data=unb64(d["data"]),
            cert=unb64(d["cert"]) if d["cert"] else None,
            key=unb64(d["key"]) if d["key"] else None,
            chain=tuple(unb64(c) for c in d["chain"]),
        )

    def certificate(self) -> x509.Certificate:
        if self.cert is None:
            raise ValueError(f"a {self.kind} secret has no certificate")
        return x509.load_der_x509_certificate(self.cert)

    def private_key(self) -> pki.CertificateKey:
        raw = self.key if self.kind in ("x509", "x509-ca") else self.data
        if not raw:
            raise ValueError(f"this {self.kind} secret holds no private key")
        key = serialization.load_der_private_key(raw, password=None)
        if not isinstance(
            key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
        ):
            raise ValueError("unsupported private key type")
        return key

    def expires(self) -> datetime | None:
        return self.certificate().not_valid_after_utc if self.cert else None


def _der(key: pki.CertificateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _new_private_key(key_type: str | None) -> pki.CertificateKey:
    match key_type or "P-256":
        case "P-256":
            return ec.generate_private_key(ec.SECP256R1())
        case "P-384":
            return ec.generate_private_key(ec.SECP384R1())
        case "Ed25519":
            return ed25519.Ed25519PrivateKey.generate()
        case "RSA-2048":
            return rsa.generate_private_key(65537, 2048)
        case "RSA-3072":
            return rsa.generate_private_key(65537, 3072)
    raise ValueError(f"unknown key type {key_type!r}")


def validity(secret: Secret, default: timedelta) -> timedelta:
    return timedelta(seconds=parse_duration(secret.valid_for)) if secret.valid_for else default


def generate(
    secret: Secret,
    *,
    now: datetime,
    issuer: SecretValue | None = None,
    private_key: SecretValue | None = None,
) -> SecretValue:
    """A new value for ``secret``. ``x509`` needs its ``issuer``'s value (an ``x509-ca``)."""
    match secret.kind:
        case "ascii":
            if secret.value is not None:
                return SecretValue("ascii", secret.value.encode())
            size = secret.size or _DEFAULT_SIZE
            return SecretValue(
                "ascii", "".join(_random.choice(_ASCII_ALPHABET) for _ in range(size)).encode()
            )
        case "binary":
            if secret.value is not None:
                return SecretValue("binary", bytes.fromhex(secret.value))
            return SecretValue("binary", _random.token_bytes(secret.size or _DEFAULT_SIZE))
        case "private-key":
            return SecretValue("private-key", _der(_new_private_key(secret.key_type)))
        case "x509-ca":
            ca_key = private_key.private_key() if private_key else None
            key, cert = pki.new_ca(
                secret.common_name or secret.name,
                now=now,
                valid_for=validity(secret, DEFAULT_CA_VALIDITY),
                key=ca_key,
            )
            return SecretValue(
                "x509-ca", cert=cert.public_bytes(serialization.Encoding.DER), key=_der(key)
            )
        case "x509":
            if issuer is None:
                raise ValueError("an x509 secret needs its issuer's value")
            key = private_key.private_key() if private_key else pki.new_key()
            cert = issue_for(secret, issuer, key.public_key(), now=now)
            return SecretValue(
                "x509",
                cert=cert.public_bytes(serialization.Encoding.DER),
                key=_der(key),
                chain=(issuer.cert or b"",),
            )
    raise ValueError(f"unknown secret kind {secret.kind!r}")


def issue_for(
    secret: Secret, issuer: SecretValue, public_key: pki.PublicKey, *, now: datetime
) -> x509.Certificate:
    """The certificate that ``secret`` (an ``x509``) describes, for ``public_key``."""
    return pki.issue(
        ca_key=issuer.private_key(),
        ca_cert=issuer.certificate(),
        public_key=public_key,
        common_name=secret.common_name or secret.name,
        usage=secret.endpoint or "server-client",
        now=now,
        valid_for=validity(secret, DEFAULT_VALIDITY),
        dns=secret.dns,
        ips=secret.ip,
    )


def _pem_cert(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()


def _pem_key(der: bytes) -> str:
    return pki.key_pem(serialization.load_der_private_key(der, password=None))  # type: ignore[arg-type]


def render(value: SecretValue, placeholder: Placeholder) -> str:
    """The text a placeholder becomes. Formats were checked against the kind at load time."""
    fmt = placeholder.format
    if value.kind in ("ascii", "binary"):
        if fmt == "raw":
            return value.data.decode()
        if fmt == "hex":
            return value.data.hex()
        if fmt == "base64":
            return base64.b64encode(value.data).decode()
    if value.kind == "private-key" and fmt in ("key", "privatekey", "pem"):
        return _pem_key(value.data)
    if value.kind in ("x509", "x509-ca"):
        if fmt in ("crt", "cert", "pem"):
            return _pem_cert(value.cert or b"")
        if fmt == "chain":
            return "".join(_pem_cert(c) for c in (value.cert or b"", *value.chain) if c)
        if fmt in ("key", "privatekey"):
            return _pem_key(value.key or b"")
    raise ValueError(f"cannot render a {value.kind} secret as {fmt!r}")
