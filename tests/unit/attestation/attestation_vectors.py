"""The hardware test vectors, read by path from ``../shared/testdata/attestation``.

Every case folder with a ``case.json`` is a test case; a new folder is tested without new code.
``CLOISTER_TESTDATA`` overrides the location.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cloister.attestation import Tee, collateral, sgx, snp, tdx
from cloister.attestation._verifier import Verifier
from cloister.errors import CollateralError, EvidenceError, MalformedEvidenceError, SignatureError

TESTDATA = Path(
    os.environ.get(
        "CLOISTER_TESTDATA",
        Path(__file__).resolve().parents[3] / ".." / "shared" / "testdata" / "attestation",
    )
)


@dataclass(frozen=True)
class Case:
    path: Path
    spec: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def tee(self) -> Tee:
        return Tee(self.spec["tee"])

    @property
    def evidence(self) -> bytes:
        return (self.path / self.spec["evidence"]).read_bytes()

    @property
    def collateral_dir(self) -> Path:
        return self.path / self.spec["collateral"]

    @property
    def now(self) -> datetime:
        return parse_time(self.spec["verify_at"])

    @property
    def accept(self) -> bool:
        return bool(self.spec["expect"] == "accept")

    def verifier(self, cache: collateral.CollateralCache | None = None) -> Verifier:
        return make_verifier(self.tee, collateral.DirectorySource(self.collateral_dir), cache)


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def make_verifier(
    tee: Tee, source: collateral.CollateralSource, cache: collateral.CollateralCache | None = None
) -> Verifier:
    if tee is Tee.SGX:
        return sgx.SgxVerifier(source, cache=cache)
    if tee is Tee.TDX:
        return tdx.TdxVerifier(source, cache=cache)
    return snp.SnpVerifier(source, cache=cache)


def all_cases(tee: str | None = None) -> list[Case]:
    pattern = f"{tee or '*'}/*/case.json"
    return [
        Case(p.parent, json.loads(p.read_text()))
        for p in sorted(TESTDATA.glob(pattern))
        if not p.parent.parent.name.startswith("_")
    ]


def case_named(name: str) -> Case:
    path = TESTDATA / name
    return Case(path, json.loads((path / "case.json").read_text()))


def first_accepted(tee: str) -> Case:
    return next(c for c in all_cases(tee) if c.accept)


# The class of error a reason belongs to. Reasons not listed are collateral failures.
REASON_CLASS: dict[str, type[EvidenceError]] = {
    "quote-signature": SignatureError,
    "report-signature": SignatureError,
    "pck-chain": SignatureError,
    "vcek-chain": SignatureError,
    "vlek-chain": SignatureError,
    "tcb-info-signature": SignatureError,
    "qe-identity-signature": SignatureError,
    "qe-report-signature": SignatureError,
    "malformed-quote": MalformedEvidenceError,
    "malformed-report": MalformedEvidenceError,
    "unsupported-quote-version": MalformedEvidenceError,
    "unsupported-cert-data": MalformedEvidenceError,
    "unsupported-attestation-key-type": MalformedEvidenceError,
}

# Where a case may legitimately fail on another check first, and why (README: "compare reasons
# loosely"). Keys are (case name, expected reason); values the reason Cloister gives.
ALIASES: dict[tuple[str, str], tuple[str, str]] = {
    ("sgx/mobilecoin-sgx-v3-00906ed50000-tampered-byte2", "quote-signature"): (
        "unsupported-attestation-key-type",
        "the tamper turns attestation key type 2 into 3, which is refused before any signature "
        "check; the case notes allow this",
    ),
}


def reason_class(reason: str) -> type[EvidenceError]:
    return REASON_CLASS.get(reason, CollateralError)


def same_reason(case: Case, got: str) -> bool:
    """Equal, a documented alias, or the same kind of window failure (several windows can
    fail at once: e.g. the PCK leaf and the collateral are both not yet valid)."""
    expected = case.spec["reject_reason"]
    if got == expected:
        return True
    alias = ALIASES.get((case.name, expected))
    if alias is not None and alias[0] == got:
        return True
    for suffix in ("-expired", "-not-yet-valid"):
        if expected.endswith(suffix) and got.endswith(suffix):
            return reason_class(expected) is reason_class(got)
    return False
