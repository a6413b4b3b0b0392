"""Certificate plumbing shared by the DCAP and SNP verifiers.

Owns: splitting and loading PEM/DER certificates and CRLs under the named limits, ordering a
chain by issuer and subject, explicit signature checks between two certificates, validity
windows, public-key pins, and a minimal DER reader for vendor extensions (Intel's SGX
extension, AMD's VCEK TCB extensions) that ``cryptography`` leaves opaque.

Does not own: which chain a TEE requires or which reason a failure carries; callers wrap the
``ValueError`` these helpers raise into their own ``EvidenceError`` with a reason code.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from importlib import resources
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from cloister import limits

__all__ = [
    "Der",
    "Window",
    "cert_window",
    "der_children",
    "der_int",
    "issued_by",
    "load_der_cert",
    "load_der_crl",
    "load_pem_certs",
    "order_chain",
    "root_pem",
    "spki_sha256",
]

T = TypeVar("T")

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"


class Window(Enum):
    """Where ``now`` is relative to a validity window."""

    VALID = "valid"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"

    @property
    def words(self) -> str:
        """For messages: ``not yet valid``."""
        return self.value.replace("-", " ")


def require_aware(now: datetime) -> None:
    """Every window check compares with UTC instants: a naive ``now`` is a caller's bug."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")


def within(
    now: datetime, not_before: datetime, not_after: datetime, *, inclusive_end: bool
) -> Window:
    """Place ``now`` in ``[not_before, not_after]`` (or ``[not_before, not_after)``)."""
    if now < not_before:
        return Window.NOT_YET_VALID
    if now > not_after or (not inclusive_end and now == not_after):
        return Window.EXPIRED
    return Window.VALID


def cert_window(cert: x509.Certificate, now: datetime) -> Window:
    """RFC 5280 §4.1.2.5: a certificate is valid on ``[notBefore, notAfter]``, both inclusive."""
    return within(now, cert.not_valid_before_utc, cert.not_valid_after_utc, inclusive_end=True)


def spki_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo: what a pin names (RFC 7469 §2.4 style)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _strict_load(load: Callable[[bytes], T], data: bytes, touch: Callable[[T], object]) -> T:
    """Load and parse eagerly, turning every parser warning into a refusal.

    ``cryptography`` parses names and extensions lazily and only *warns* about some malformed
    encodings; a verifier must refuse them at load time instead of tripping over them later.
    The one exception is the non-positive serial number of AMD's VCEK/VLEK certificates
    (serial 0), which carries no meaning there.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="Parsed a serial number which wasn't positive")
        try:
            obj = load(data)
            touch(obj)
        except (
            ValueError,
            TypeError,
            Warning,
            UnsupportedAlgorithm,
            x509.DuplicateExtension,
            x509.UnsupportedGeneralNameType,
        ) as exc:
            raise ValueError(f"malformed encoding: {exc}") from None
    return obj


def _touch_cert(cert: x509.Certificate) -> object:
    return (
        cert.serial_number,
        cert.subject,
        cert.issuer,
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
        list(cert.extensions),
        cert.public_key(),
    )


def _touch_crl(crl: x509.CertificateRevocationList) -> object:
    return (crl.issuer, crl.last_update_utc, crl.next_update_utc, [r.serial_number for r in crl])


def load_der_cert(data: bytes) -> x509.Certificate:
    """One DER certificate, bounded by ``MAX_COLLATERAL_ITEM_BYTES``; ``ValueError`` if bad."""
    if len(data) > limits.MAX_COLLATERAL_ITEM_BYTES:
        raise ValueError("certificate exceeds MAX_COLLATERAL_ITEM_BYTES")
    return _strict_load(x509.load_der_x509_certificate, data, _touch_cert)


def load_pem_certs(
    data: bytes, *, max_count: int = limits.MAX_CERT_CHAIN_LENGTH
) -> list[x509.Certificate]:
    """All PEM certificates in ``data`` (trailing NULs and text between blocks ignored)."""
    if len(data) > limits.MAX_COLLATERAL_ITEM_BYTES:
        raise ValueError("PEM data exceeds MAX_COLLATERAL_ITEM_BYTES")
    certs: list[x509.Certificate] = []
    pos = 0
    while (start := data.find(_PEM_BEGIN, pos)) >= 0:
        end = data.find(_PEM_END, start)
        if end < 0:
            raise ValueError("unterminated PEM certificate")
        end += len(_PEM_END)
        if len(certs) >= max_count:
            raise ValueError(f"more than {max_count} certificates in one chain")
        certs.append(_strict_load(x509.load_pem_x509_certificate, data[start:end], _touch_cert))
        pos = end
    if not certs:
        raise ValueError("no PEM certificate found")
    return certs


def load_der_crl(data: bytes) -> x509.CertificateRevocationList:
    """One DER CRL (PEM and hex tolerated: PCCS serves either); ``ValueError`` if bad."""
    if len(data) > limits.MAX_COLLATERAL_ITEM_BYTES:
        raise ValueError("CRL exceeds MAX_COLLATERAL_ITEM_BYTES")
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        return _strict_load(x509.load_pem_x509_crl, stripped, _touch_crl)
    if stripped and all(c in b"0123456789abcdefABCDEF" for c in stripped[:64]):
        try:
            raw = bytes.fromhex(stripped.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raw = data
        return _strict_load(x509.load_der_x509_crl, raw, _touch_crl)
    return _strict_load(x509.load_der_x509_crl, data, _touch_crl)


def common_name(cert: x509.Certificate) -> str | None:
    """The subject's first CN, or ``None``."""
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else None


def issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer``'s name and key produced ``child``'s signature (RFC 5280 §6.1.3)."""
    try:
        child.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def order_chain(certs: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """Order ``certs`` leaf first, by issuer/subject names, never trusting the given order.

    Quotes in the wild embed the PCK chain as leaf, root, intermediate; what counts is who
    issued whom. Raises ``ValueError`` unless the certificates form exactly one path that ends
    in a self-issued certificate.
    """
    if not certs:
        raise ValueError("empty certificate chain")
    by_subject: dict[x509.Name, x509.Certificate] = {}
    for cert in certs:
        if cert.subject in by_subject:
            raise ValueError("two certificates in one chain share a subject")
        by_subject[cert.subject] = cert
    issuers = {c.issuer for c in certs if c.issuer != c.subject}
    leaves = [c for c in certs if c.subject not in issuers]
    if len(leaves) != 1:
        raise ValueError("the chain does not have exactly one leaf")
    chain = [leaves[0]]
    while chain[-1].issuer != chain[-1].subject:
        parent = by_subject.get(chain[-1].issuer)
        if parent is None or parent in chain:
            raise ValueError("the chain is incomplete or loops")
        chain.append(parent)
    if len(chain) != len(certs):
        raise ValueError("the chain carries certificates outside the path")
    return chain


def framed(*parts: bytes) -> bytes:
    """An unambiguous concatenation (length-prefixed parts), for cache keys."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


@functools.cache
def root_pem(name: str) -> bytes:
    """A vendor root shipped as package data in ``cloister/attestation/roots``."""
    return resources.files("cloister.attestation").joinpath("roots", name).read_bytes()


# --- a minimal DER reader (X.690) for vendor extensions -------------------------------------


@dataclass(frozen=True)
class Der:
    """One DER TLV: its tag byte and its content octets."""

    tag: int
    content: bytes


def _read_tlv(data: bytes, pos: int) -> tuple[Der, int]:
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags are not used by these extensions")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    end = pos + length
    if end > len(data):
        raise ValueError("DER content runs past its container")
    return Der(tag, data[pos:end]), end


def der_one(data: bytes) -> Der:
    """Exactly one TLV spanning ``data``."""
    tlv, end = _read_tlv(data, 0)
    if end != len(data):
        raise ValueError("trailing bytes after DER value")
    return tlv


def der_children(content: bytes) -> Iterator[Der]:
    """The TLVs concatenated in a constructed value's content."""
    pos = 0
    while pos < len(content):
        tlv, pos = _read_tlv(content, pos)
        yield tlv


def der_int(tlv: Der) -> int:
    """An INTEGER (0x02) or ENUMERATED (0x0A) as a Python int."""
    if tlv.tag not in (0x02, 0x0A) or not tlv.content:
        raise ValueError("expected a DER INTEGER")
    return int.from_bytes(tlv.content, "big", signed=True)


def der_oid(tlv: Der) -> str:
    """An OBJECT IDENTIFIER (0x06) in dotted form."""
    if tlv.tag != 0x06 or not tlv.content:
        raise ValueError("expected a DER OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    for byte in tlv.content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if value or not arcs:
        raise ValueError("truncated OBJECT IDENTIFIER")
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])
