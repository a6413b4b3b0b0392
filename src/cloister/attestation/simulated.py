"""The simulated TEE: evidence with the shape of a real quote, signed by a software key.

.. warning:: Simulation protects nothing. Anyone can produce this evidence for any
   measurement. It exists so that Cloister runs and is tested on machines without a TEE. A
   session accepts it only when ``security.attestation.tolerate`` lists ``simulation``, and
   every verification logs a warning.

Evidence layout, version 1 (all integers little-endian, as in Intel's quote formats)::

    offset  size  field
         0     8  magic  b"CLSIMQ" + u16 version (1)
         8    32  measurement   SHA-256 over the measured files (see ``measure_files``)
        40    64  report_data   chosen by the caller (activation binding)
       104     4  flags         bit 0: debug
       108    32  platform_key  Ed25519 public key of the simulated platform
       140    64  signature     Ed25519 over bytes [0, 140)
       204        end

Verification steps:
    (1) size and magic/version;
    (2) the signature under the embedded platform key;
    (3) the platform key is among the pinned ones, when the verifier was given any.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister._files import write_private
from cloister.attestation._claims import Claims, Tee
from cloister.errors import CollateralError, MalformedEvidenceError, SignatureError

__all__ = [
    "EVIDENCE_SIZE",
    "SimulatedPlatform",
    "SimulatedVerifier",
    "measure_files",
]

log = logging.getLogger(__name__)

_MAGIC = b"CLSIMQ" + struct.pack("<H", 1)
_SIGNED_END = 140
EVIDENCE_SIZE = 204
_MEASURE_DOMAIN = b"cloister-simulated-measurement-v1\x00"
_READ_CHUNK = 1 << 20


def measure_files(paths: Sequence[Path | str]) -> bytes:
    """The simulated measurement of a program: SHA-256 over the named files' contents.

    The files' order matters and their names do not, so that a program measured by relative
    path on a laptop and by absolute path in a container has one measurement.
    """
    if not paths:
        raise ValueError("name at least one file to measure")
    outer = hashlib.sha256(_MEASURE_DOMAIN)
    for p in paths:
        inner = hashlib.sha256()
        size = 0
        with open(p, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                inner.update(chunk)
                size += len(chunk)
        outer.update(struct.pack("<Q", size) + inner.digest())
    return outer.digest()


@dataclass(frozen=True)
class SimulatedPlatform:
    """A software stand-in for a TEE's quoting key. Protects nothing."""

    key: ed25519.Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SimulatedPlatform:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> SimulatedPlatform:
        """The platform key in ``path`` (raw 32 bytes), created with mode 0600 if missing."""
        if path.exists():
            return cls(ed25519.Ed25519PrivateKey.from_private_bytes(path.read_bytes()))
        platform = cls.generate()
        raw = platform.key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        write_private(path, raw)
        return platform

    @property
    def public_key(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def quote(self, measurement: bytes, report_data: bytes, *, debug: bool = False) -> bytes:
        """Simulated evidence for a program with ``measurement`` that binds ``report_data``."""
        if len(measurement) != 32 or len(report_data) != 64:
            raise ValueError("measurement is 32 bytes and report_data 64 bytes")
        body = _MAGIC + measurement + report_data + struct.pack("<I", int(debug)) + self.public_key
        return body + self.key.sign(body)


@dataclass(frozen=True)
class SimulatedVerifier:
    """Verifies simulated evidence. Every use logs a warning: it protects nothing."""

    trusted_platform_keys: frozenset[bytes] = field(default_factory=frozenset)
    tee: Tee = Tee.SIMULATION

    @classmethod
    def pinned(cls, keys: Iterable[bytes]) -> SimulatedVerifier:
        return cls(trusted_platform_keys=frozenset(keys))

    def verify(self, evidence: bytes, *, now: datetime) -> Claims:
        del now  # simulated evidence has no collateral and so no validity window
        log.warning("SIMULATION: verifying simulated evidence; it protects nothing")
        # (1) size and magic/version
        if len(evidence) != EVIDENCE_SIZE:
            raise MalformedEvidenceError(
                f"simulated evidence is {EVIDENCE_SIZE} bytes, got {len(evidence)}",
                reason="malformed-quote",
            )
        if evidence[:8] != _MAGIC:
            raise MalformedEvidenceError(
                "not simulated evidence of version 1", reason="unsupported-quote-version"
            )
        measurement = evidence[8:40]
        report_data = evidence[40:104]
        (flags,) = struct.unpack_from("<I", evidence, 104)
        platform_key = evidence[108:140]
        # (2) the signature under the embedded platform key
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(platform_key).verify(
                evidence[_SIGNED_END:], evidence[:_SIGNED_END]
            )
        except (InvalidSignature, ValueError):
            raise SignatureError(
                "the simulated evidence's signature does not verify", reason="quote-signature"
            ) from None
        # (3) the platform key is pinned, when pins were configured
        if self.trusted_platform_keys and platform_key not in self.trusted_platform_keys:
            raise CollateralError(
                "the simulated platform key is not one this verifier trusts",
                reason="untrusted-platform",
            )
        return Claims(
            tee=Tee.SIMULATION,
            report_data=report_data,
            debug=bool(flags & 1),
            values={"measurement": measurement.hex(), "platform_key": platform_key.hex()},
        )
