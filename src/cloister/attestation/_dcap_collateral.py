"""Intel DCAP collateral: TCB Info, QE Identity and CRLs, verified and in their windows.

Owns parsing the signed JSON of Intel PCS API v4 (TCB Info v2/v3, Enclave Identity v2) after
its signature over the exact signed bytes verified under an issuer chain that ends in the
pinned Intel SGX Root CA key; loading CRLs signed by their issuer; and the validity windows:
TCB Info and identities on ``[issueDate, nextUpdate)``, CRLs on ``[thisUpdate, nextUpdate]``
(RFC 5280 §5.1.2.4–5), certificates on ``[notBefore, notAfter]``.

Does not own: choosing a TCB level (``_dcap_tcb``) or the order of steps (``_dcap_steps``).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from cloister.attestation import _x509
from cloister.attestation._dcap import Anchors, ecdsa_p256_ok
from cloister.attestation._x509 import Window
from cloister.errors import CollateralError, SignatureError


def _parse_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError("timestamp is not a string")
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("timestamp has no time zone")
    return parsed


@dataclass(frozen=True)
class TcbLevel:
    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...] | None
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class ModuleIdentity:
    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    levels: tuple[tuple[int, str, tuple[str, ...]], ...]  # (isvsvn, status, advisories)


@dataclass(frozen=True)
class TcbInfo:
    """A signature-verified TCB Info (PCS API v4 "TCB Info V2/V3")."""

    id: str  # "SGX" or "TDX" (v2 has no id and is SGX)
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    levels: tuple[TcbLevel, ...]
    tdx_module: ModuleIdentity | None
    tdx_module_identities: tuple[ModuleIdentity, ...]
    signing_chain: tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class QeIdentity:
    """A signature-verified Enclave Identity (QE for SGX, TD_QE for TDX)."""

    id: str
    issue_date: datetime
    next_update: datetime
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    levels: tuple[tuple[int, str, tuple[str, ...]], ...]
    signing_chain: tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class Crl:
    crl: x509.CertificateRevocationList
    this_update: datetime
    next_update: datetime
    revoked: frozenset[int] = field(default_factory=frozenset)


def _hex(value: object, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise ValueError("expected a hex string")
    out = bytes.fromhex(value)
    if size is not None and len(out) != size:
        raise ValueError(f"expected {size} bytes")
    return out


def _status(level: Mapping[str, Any]) -> str:
    # TCB Info v1 said "status"; v2 and v3 say "tcbStatus".
    return str(level["tcbStatus"] if "tcbStatus" in level else level["status"])


def _levels_of_identity(items: object) -> tuple[tuple[int, str, tuple[str, ...]], ...]:
    if not isinstance(items, list):
        raise ValueError("tcbLevels is not a list")
    out = []
    for level in items:
        out.append(
            (
                int(level["tcb"]["isvsvn"]),
                _status(level),
                tuple(str(a) for a in level.get("advisoryIDs", [])),
            )
        )
    return tuple(out)


def _module_identity(d: Mapping[str, Any], default_id: str) -> ModuleIdentity:
    return ModuleIdentity(
        id=str(d.get("id", default_id)),
        mrsigner=_hex(d["mrsigner"]),
        attributes=_hex(d["attributes"]),
        attributes_mask=_hex(d["attributesMask"]),
        levels=_levels_of_identity(d.get("tcbLevels", [])),
    )


def _tcb_level(level: Mapping[str, Any], version: int) -> TcbLevel:
    tcb = level["tcb"]
    if version >= 3:
        sgx = tuple(int(c["svn"]) for c in tcb["sgxtcbcomponents"])
        tdx_raw = tcb.get("tdxtcbcomponents")
        tdx = tuple(int(c["svn"]) for c in tdx_raw) if tdx_raw is not None else None
    else:
        sgx = tuple(int(tcb[f"sgxtcbcomp{i:02d}svn"]) for i in range(1, 17))
        tdx = None
    if len(sgx) != 16 or (tdx is not None and len(tdx) != 16):
        raise ValueError("a TCB level has 16 SGX (and 16 TDX) components")
    return TcbLevel(
        sgx_components=sgx,
        pce_svn=int(tcb["pcesvn"]),
        tdx_components=tdx,
        status=_status(level),
        advisory_ids=tuple(str(a) for a in level.get("advisoryIDs", [])),
    )


def _json_object(body: bytes) -> Mapping[str, Any]:
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def parse_tcb_info(body: bytes, chain: tuple[x509.Certificate, ...]) -> TcbInfo:
    d = _json_object(body)
    version = int(d["version"])
    if version not in (2, 3):
        raise ValueError(f"TCB Info version {version} is not supported")
    tcb_type = int(d.get("tcbType", 0))
    if tcb_type != 0:
        raise ValueError(f"TCB type {tcb_type} is not supported")
    module = d.get("tdxModule")
    return TcbInfo(
        id=str(d.get("id", "SGX")),
        version=version,
        issue_date=_parse_time(d["issueDate"]),
        next_update=_parse_time(d["nextUpdate"]),
        fmspc=_hex(d["fmspc"], 6),
        pce_id=_hex(d["pceId"], 2),
        levels=tuple(_tcb_level(level, version) for level in d["tcbLevels"]),
        tdx_module=_module_identity(module, "") if isinstance(module, dict) else None,
        tdx_module_identities=tuple(
            _module_identity(m, "") for m in d.get("tdxModuleIdentities", [])
        ),
        signing_chain=chain,
    )


def parse_qe_identity(body: bytes, chain: tuple[x509.Certificate, ...]) -> QeIdentity:
    d = _json_object(body)
    version = int(d["version"])
    if version != 2:
        raise ValueError(f"enclave identity version {version} is not supported")
    return QeIdentity(
        id=str(d["id"]),
        issue_date=_parse_time(d["issueDate"]),
        next_update=_parse_time(d["nextUpdate"]),
        miscselect=int.from_bytes(_hex(d["miscselect"], 4), "big"),
        miscselect_mask=int.from_bytes(_hex(d["miscselectMask"], 4), "big"),
        attributes=_hex(d["attributes"], 16),
        attributes_mask=_hex(d["attributesMask"], 16),
        mrsigner=_hex(d["mrsigner"], 32),
        isvprodid=int(d["isvprodid"]),
        levels=_levels_of_identity(d["tcbLevels"]),
        signing_chain=chain,
    )


TCB_SIGNING_CN = "Intel SGX TCB Signing"


def verify_signing_chain(
    pem: bytes | None, anchors: Anchors, *, reason: str
) -> tuple[x509.Certificate, ...]:
    """A collateral issuer chain: Intel SGX TCB Signing → Intel SGX Root CA, root key pinned.

    Exactly these two: any longer path would let a key below the root that is not Intel's
    TCB signing key (a PCK key, say) sign TCB Info (PCS API v4: the issuer chain is the TCB
    Signing certificate and the root).
    """
    if pem is None:
        raise CollateralError(
            "the collateral's issuer chain is missing", reason="collateral-missing"
        )
    try:
        certs = _x509.order_chain(_x509.load_pem_certs(pem))
    except ValueError as exc:
        raise SignatureError(
            f"the collateral issuer chain is unusable: {exc}", reason=reason
        ) from None
    if len(certs) != 2 or _x509.common_name(certs[0]) != TCB_SIGNING_CN:
        raise SignatureError(
            f"the collateral is not signed by an {TCB_SIGNING_CN} certificate under the root",
            reason=reason,
        )
    root = certs[-1]
    if not anchors.root_ok(root):
        raise SignatureError(
            "the collateral issuer chain does not end in the pinned root", reason=reason
        )
    for child, parent in itertools.pairwise(certs):
        if not _x509.issued_by(child, parent):
            raise SignatureError("a collateral issuer certificate's signature fails", reason=reason)
    return tuple(certs)


def verify_signed_json(
    body: bytes | None,
    signature: bytes | None,
    chain: tuple[x509.Certificate, ...],
    *,
    reason: str,
) -> bytes:
    """ECDSA P-256/SHA-256 over the exact bytes ``body`` under the chain's leaf key."""
    if body is None or signature is None:
        raise CollateralError("signed collateral is missing", reason="collateral-missing")
    key = chain[0].public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not ecdsa_p256_ok(key, signature, body):
        raise SignatureError("the collateral signature does not verify", reason=reason)
    return body


def load_crl(der: bytes | None, issuer: x509.Certificate, *, what: str) -> Crl:
    """A CRL signed by ``issuer``: parsed, signature-checked, its revoked serials indexed."""
    if der is None:
        raise CollateralError(f"the {what} is missing", reason="collateral-missing")
    try:
        crl = _x509.load_der_crl(der)
    except ValueError:
        raise CollateralError(
            f"the {what} cannot be parsed", reason="malformed-collateral"
        ) from None
    if crl.issuer != issuer.subject:
        raise CollateralError(
            f"the {what} is not issued by {issuer.subject.rfc4514_string()}", reason="crl-issuer"
        )
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise SignatureError(f"the {what} signature does not verify", reason="crl-signature")
    next_update = crl.next_update_utc
    if next_update is None:
        raise CollateralError(f"the {what} has no nextUpdate", reason="malformed-collateral")
    return Crl(crl, crl.last_update_utc, next_update, frozenset(r.serial_number for r in crl))


# --- windows ----------------------------------------------------------------------------------


def collateral_window(not_before: datetime, not_after: datetime, now: datetime) -> Window:
    """TCB Info and identities are valid on ``[issueDate, nextUpdate)``."""
    return _x509.within(now, not_before, not_after, inclusive_end=False)


_LABELS = {"tcb-info": "TCB Info", "qe-identity": "QE Identity"}


def check_collateral_windows(tcb: TcbInfo, qe: QeIdentity, now: datetime) -> None:
    """TCB Info and QE Identity are inside their windows (one reason names one item; two, both)."""
    failures = [
        (name, w)
        for name, w in (
            ("tcb-info", collateral_window(tcb.issue_date, tcb.next_update, now)),
            ("qe-identity", collateral_window(qe.issue_date, qe.next_update, now)),
        )
        if w is not Window.VALID
    ]
    if not failures:
        return
    if len(failures) == 2 and failures[0][1] == failures[1][1]:
        raise CollateralError(
            f"TCB Info and QE Identity are both {failures[0][1].words} at {now.isoformat()}",
            reason=f"collateral-{failures[0][1].value}",
        )
    name, window = failures[0]
    raise CollateralError(
        f"the {_LABELS[name]} is {window.words} at {now.isoformat()}",
        reason=f"{name}-{window.value}",
    )


def check_signing_chain_windows(chain: tuple[x509.Certificate, ...], now: datetime) -> None:
    # Time validity of the issuance actually supplied (several TCB-signing issuances exist).
    for cert in chain:
        window = _x509.cert_window(cert, now)
        if window is not Window.VALID:
            raise CollateralError(
                f"collateral signing certificate {cert.subject.rfc4514_string()} is {window.words}",
                reason=f"tcb-signing-cert-{window.value}",
            )


def check_crl(crl: Crl, now: datetime, *, name: str, serial: int) -> None:
    """RFC 5280 §6.3.3: the CRL is current (``[thisUpdate, nextUpdate]``) and ``serial`` absent."""
    window = _x509.within(now, crl.this_update, crl.next_update, inclusive_end=True)
    label = {"pck": "PCK", "root": "Intel SGX Root CA"}.get(name, name)
    if window is not Window.VALID:
        raise CollateralError(
            f"the {label} CRL is {window.words} at {now.isoformat()} "
            f"(valid {crl.this_update.isoformat()} to {crl.next_update.isoformat()})",
            reason=f"{name}-crl-{window.value}",
        )
    if serial in crl.revoked:
        raise CollateralError(
            f"certificate {serial:#x} is revoked by the {label} CRL", reason=f"{name}-revoked"
        )
