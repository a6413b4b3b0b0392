"""Secret values: generation inside the CAS, their stored form, migration, and their formats.

Generated secrets are created here, inside the CAS, from the operating system's CSPRNG: no
person ever sees them. ``SecretValue`` is what the store seals; ``render`` / ``render_bytes``
are what a placeholder turns into; ``Resolver`` (``_resolver.py``) puts them together for one
activation, imports from other sessions included.

Migration on session update follows SCONE's table: a secret with the same name, kind and
definition keeps its value (``ascii``, ``binary``, explicit values); a ``private-key`` only
when both the old and the new session say ``migrate: true``; certificates are reissued (with
the same key when that key is kept). A CA whose key changes *rotates*: its previous
certificate stays in ``previous`` for an overlap window, and ``:chain`` / ``:trust`` carry
both, so that workloads activated before and after the update keep trusting each other.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import secrets as _random
import string
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from cloister import pki
from cloister.session import Secret, SessionDocument, parse_duration
from cloister.session.template import Placeholder

__all__ = [
    "DEFAULT_VALIDITY",
    "MAX_IMPORT_DEPTH",
    "Lookup",
    "Resolver",
    "SecretValue",
    "check_import",
    "generate",
    "render",
    "render_bytes",
]

DEFAULT_VALIDITY = timedelta(days=90)
DEFAULT_CA_VALIDITY = timedelta(days=3650)
_ASCII_ALPHABET = string.ascii_letters + string.digits
_DEFAULT_SIZE = 20  # SCONE's default for ascii (characters) and binary (bytes)


@dataclass(frozen=True)
class SecretValue:
    """The value of one secret.

    ``data`` holds ascii/binary bytes or a private key (PKCS#8 DER); ``cert``/``key``/``chain``
    hold DER certificates and the certificate's key. ``previous`` holds a rotated CA's earlier
    certificates with the instant (POSIX seconds) until which they stay trusted. ``origin`` is
    the hash of the session version the value was made or migrated for, ``spec`` a digest of
    the definition it was made from, ``migrate`` that definition's ``migrate`` flag.
    """

    kind: str
    data: bytes = b""
    cert: bytes | None = None
    key: bytes | None = None
    chain: tuple[bytes, ...] = field(default_factory=tuple)
    previous: tuple[tuple[bytes, float], ...] = field(default_factory=tuple)
    origin: str = ""
    spec: str = ""
    migrate: bool = False

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
                "previous": [[b64(c), until] for c, until in self.previous],
                "origin": self.origin,
                "spec": self.spec,
                "migrate": self.migrate,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SecretValue:
        return _decoded(raw)

    @classmethod
    def _decode(cls, raw: bytes) -> SecretValue:
        d = json.loads(raw)
        unb64 = base64.b64decode
        return cls(
            kind=d["kind"],
            data=unb64(d["data"]),
            cert=unb64(d["cert"]) if d["cert"] else None,
            key=unb64(d["key"]) if d["key"] else None,
            chain=tuple(unb64(c) for c in d["chain"]),
            previous=tuple((unb64(c), float(u)) for c, u in d.get("previous", [])),
            origin=d.get("origin", ""),
            spec=d.get("spec", ""),
            migrate=bool(d.get("migrate", False)),
        )

    def certificate(self) -> x509.Certificate:
        if self.cert is None:
            raise ValueError(f"a {self.kind} secret has no certificate")
        return _certificate(self.cert)

    def has_private_key(self) -> bool:
        return bool(self.key if self.kind in ("x509", "x509-ca") else self.data)

    def private_key(self) -> pki.CertificateKey:
        raw = self.key if self.kind in ("x509", "x509-ca") else self.data
        if not raw:
            raise ValueError(f"this {self.kind} secret holds no private key")
        return _private_key(raw)

    def expires(self) -> datetime | None:
        return self.certificate().not_valid_after_utc if self.cert else None

    def trusted_cas(self, now: datetime) -> tuple[bytes, ...]:
        """This CA's certificate and its predecessors still inside their overlap window."""
        return (
            *((self.cert,) if self.cert else ()),
            *(c for c, until in self.previous if until > now.timestamp()),
        )

    def public(self) -> SecretValue:
        """The value without any private key (what an import of a certificate alone sees)."""
        if self.kind in ("x509", "x509-ca"):
            return replace(self, key=None)
        return self


# Every activation reads the same few stored values (a CA and its key, generated secrets) and
# would parse them again each time. The parsed forms are immutable (a frozen SecretValue, a
# certificate, a key object that is safe to share between threads) and depend on the bytes
# alone, so they are kept by those bytes: the same bytes always give the same value, and a
# renewed or rotated value is new bytes. Bounded; what they hold is already in this process.
_PARSED_VALUES = 256


@functools.lru_cache(maxsize=_PARSED_VALUES)
def _decoded(raw: bytes) -> SecretValue:
    return SecretValue._decode(raw)


@functools.lru_cache(maxsize=_PARSED_VALUES)
def _certificate(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


@functools.lru_cache(maxsize=_PARSED_VALUES)
def _private_key(der: bytes) -> pki.CertificateKey:
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ValueError("unsupported private key type")
    return key


def spec_of(secret: Secret) -> str:
    """A digest of the parts of a definition that decide its value (not sharing, not migrate)."""
    d = secret.model_dump(mode="json", exclude={"export", "export_public", "migrate", "name"})
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:32]


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


def overlap(doc: SessionDocument, ca: str) -> timedelta:
    """How long a rotated CA stays trusted: the longest life of a certificate it issued."""
    lives = [validity(s, DEFAULT_VALIDITY) for s in doc.secrets if s.issuer == ca]
    return max(lives, default=DEFAULT_VALIDITY)


def _load_pem_key(text: str) -> pki.CertificateKey:
    key = serialization.load_pem_private_key(text.encode(), password=None)
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ValueError("unsupported private key type")
    return key


def common_name(secret: Secret) -> str:
    """SCONE: the common name, else the first DNS name, else the secret's name."""
    return secret.common_name or next(iter(secret.dns_names()), secret.name)


def generate(
    secret: Secret,
    *,
    now: datetime,
    issuer: SecretValue | None = None,
    private_key: SecretValue | None = None,
    origin: str = "",
) -> SecretValue:
    """A new value for ``secret``. ``x509`` needs its ``issuer``'s value (an ``x509-ca``)."""
    value = _generate(secret, now=now, issuer=issuer, private_key=private_key)
    return replace(value, origin=origin, spec=spec_of(secret), migrate=secret.migrate)


def _generate(
    secret: Secret,
    *,
    now: datetime,
    issuer: SecretValue | None,
    private_key: SecretValue | None,
) -> SecretValue:
    explicit = secret.explicit_text()
    match secret.kind:
        case "ascii":
            if explicit is not None:
                return SecretValue("ascii", explicit.encode())
            size = secret.size or _DEFAULT_SIZE
            return SecretValue(
                "ascii", "".join(_random.choice(_ASCII_ALPHABET) for _ in range(size)).encode()
            )
        case "binary":
            if explicit is not None:
                return SecretValue("binary", bytes.fromhex(explicit))
            return SecretValue("binary", _random.token_bytes(secret.size or _DEFAULT_SIZE))
        case "private-key":
            key = _load_pem_key(explicit) if explicit else _new_private_key(secret.key_type)
            return SecretValue("private-key", _der(key))
        case "x509-ca" | "x509" if explicit is not None:
            certs = x509.load_pem_x509_certificates(explicit.encode())
            der = [c.public_bytes(serialization.Encoding.DER) for c in certs]
            key_der = private_key.data if private_key else None
            return SecretValue(secret.kind, cert=der[0], key=key_der, chain=tuple(der[1:]))
        case "x509-ca":
            ca_key = private_key.private_key() if private_key else None
            key, cert = pki.new_ca(
                common_name(secret),
                now=now,
                valid_for=validity(secret, DEFAULT_CA_VALIDITY),
                key=ca_key,
            )
            return SecretValue(
                "x509-ca", cert=cert.public_bytes(serialization.Encoding.DER), key=_der(key)
            )
        case "x509":
            key = private_key.private_key() if private_key else pki.new_key()
            if issuer is None:
                cert = pki.self_signed(
                    key=key,
                    common_name=common_name(secret),
                    usage=secret.endpoint,
                    now=now,
                    valid_for=validity(secret, DEFAULT_VALIDITY),
                    dns=secret.dns_names(),
                    ips=secret.ip_addresses(),
                )
                return SecretValue(
                    "x509", cert=cert.public_bytes(serialization.Encoding.DER), key=_der(key)
                )
            cert = issue_for(secret, issuer, key.public_key(), now=now)
            return SecretValue(
                "x509",
                cert=cert.public_bytes(serialization.Encoding.DER),
                key=_der(key),
                chain=issuer.trusted_cas(now),
            )
    raise ValueError(f"cannot generate a {secret.kind} secret")


def issue_for(
    secret: Secret, issuer: SecretValue, public_key: pki.PublicKey, *, now: datetime
) -> x509.Certificate:
    """The certificate that ``secret`` (an ``x509``) describes, for ``public_key``."""
    return pki.issue(
        ca_key=issuer.private_key(),
        ca_cert=issuer.certificate(),
        public_key=public_key,
        common_name=common_name(secret),
        usage=secret.endpoint,
        now=now,
        valid_for=validity(secret, DEFAULT_VALIDITY),
        dns=secret.dns_names(),
        ips=secret.ip_addresses(),
    )


def needs_renewal(value: SecretValue, now: datetime) -> bool:
    """A certificate with less than a third of its life left is reissued (at activation)."""
    cert = value.certificate()
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < max(lifetime / 3, timedelta(minutes=1))


def kept_on_update(value: SecretValue, secret: Secret) -> bool:
    """SCONE's migration rule, for a value made under an earlier version of the session."""
    if value.kind != secret.kind or value.spec != spec_of(secret):
        return False
    if secret.kind == "private-key":
        return value.migrate and secret.migrate
    return secret.kind in ("ascii", "binary", "config-fragment")


# --- one-time passwords (SCONE: TOTP, RFC 6238, 6 digits, 30-second steps) ---------------

TOTP_DIGITS = 6
TOTP_STEP_SECONDS = 30


def totp_key(shared: str) -> bytes:
    """The key of a base32 (RFC 4648, padding optional) shared secret."""
    t = shared.strip().replace(" ", "").upper()
    try:
        return base64.b32decode(t + "=" * (-len(t) % 8))
    except ValueError:
        raise ValueError("the one-time password secret is not base32") from None


def totp_verify(shared: str, otp: str, now: datetime) -> bool:
    """Whether ``otp`` is the TOTP of ``shared`` at ``now`` or one step before (clock skew)."""
    from cryptography.hazmat.primitives.hashes import SHA1
    from cryptography.hazmat.primitives.twofactor import InvalidToken
    from cryptography.hazmat.primitives.twofactor.totp import TOTP

    if len(otp) != TOTP_DIGITS or not otp.isdigit():
        return False
    # SHA-1 is what RFC 6238 and every authenticator app use for TOTP.
    totp = TOTP(totp_key(shared), TOTP_DIGITS, SHA1(), TOTP_STEP_SECONDS)  # noqa: S303
    t = int(now.timestamp())
    for at in (t, t - TOTP_STEP_SECONDS):
        try:
            totp.verify(otp.encode(), at)
        except InvalidToken:
            continue
        return True
    return False


def totp_now(shared: str, now: datetime) -> str:
    """The current one-time password for ``shared`` (what an operator's authenticator shows)."""
    from cryptography.hazmat.primitives.hashes import SHA1
    from cryptography.hazmat.primitives.twofactor.totp import TOTP

    totp = TOTP(totp_key(shared), TOTP_DIGITS, SHA1(), TOTP_STEP_SECONDS)  # noqa: S303
    return totp.generate(int(now.timestamp())).decode()


# --- rendering -----------------------------------------------------------------------------


def _pem_cert(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()


def _key_bytes(der: bytes, encoding: serialization.Encoding) -> bytes:
    key = serialization.load_der_private_key(der, password=None)
    return key.private_bytes(
        encoding, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def render_bytes(value: SecretValue, placeholder: Placeholder, *, now: datetime) -> bytes:
    """The bytes a placeholder becomes. Formats were checked against the kind at load time."""
    out = _render(value, placeholder.format, now)
    for enc in placeholder.encodings:
        if enc == "escape(json)":
            out = json.dumps(out.decode())[1:-1].encode()
    return out


def render(value: SecretValue, placeholder: Placeholder, *, now: datetime) -> str:
    """The text a placeholder becomes (never a binary format: the loader refused those)."""
    return render_bytes(value, placeholder, now=now).decode()


def _render(value: SecretValue, fmt: str, now: datetime) -> bytes:
    if value.kind in ("ascii", "binary"):
        data = value.data
        match fmt:
            case "raw" | "bin":
                return data
            case "hex":
                return data.hex().encode()
            case "base64":
                return base64.b64encode(data)
            case "base64url":
                return base64.urlsafe_b64encode(data)
            case "base32":
                return base64.b32encode(data)
            case "base32nopad":
                return base64.b32encode(data).rstrip(b"=")
    key_der = value.data if value.kind == "private-key" else value.key
    if fmt in ("key-pem", "key-der"):
        if not key_der:
            raise ValueError(f"this {value.kind} secret's private key is not available here")
        enc = serialization.Encoding.PEM if fmt == "key-pem" else serialization.Encoding.DER
        return _key_bytes(key_der, enc)
    if value.kind in ("x509", "x509-ca"):
        cert = value.cert or b""
        match fmt:
            case "crt":
                return _pem_cert(cert).encode()
            case "crt-der":
                return cert
            case "chain":
                # SCONE: from the first intermediate to the root; the certificate itself is
                # not included. During a CA rotation both the old and the new CA are listed.
                chain = value.chain if value.kind == "x509" else ()
                return "".join(_pem_cert(c) for c in chain).encode()
            case "legacy-chain":
                return "".join(_pem_cert(c) for c in (*reversed(value.chain), cert)).encode()
            case "trust":
                cas = value.trusted_cas(now) if value.kind == "x509-ca" else value.chain
                return "".join(_pem_cert(c) for c in cas).encode()
            case "pkcs12":
                if not key_der:
                    raise ValueError("a PKCS#12 archive needs the certificate's private key")
                key = serialization.load_der_private_key(key_der, password=None)
                assert isinstance(
                    key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
                )
                certs = [x509.load_der_x509_certificate(c) for c in value.chain]
                return pki.pkcs12("cloister", key, value.certificate(), certs)
    raise ValueError(f"cannot render a {value.kind} secret as {fmt!r}")


from cloister.secrets._resolver import (  # noqa: E402 - the resolver needs the names above
    MAX_IMPORT_DEPTH,
    Lookup,
    Resolver,
    check_import,
)
