"""What verified evidence says: the ``Claims`` value and the ``Tee`` kinds.

A ``Claims`` is produced only by a verifier, after every check of its TEE's specification
passed. It says nothing about whether the evidence is *acceptable*; that is ``policy``'s job.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

ClaimValue = str | int | bool


class Tee(enum.StrEnum):
    SGX = "sgx"
    TDX = "tdx"
    SNP = "snp"
    SIMULATION = "simulation"


@dataclass(frozen=True)
class Claims:
    """The verified content of one piece of evidence.

    ``values`` uses the names and encodings of the test vectors' ``case.json``: measurements
    and other byte strings as lowercase hex, small integers as ``int``, flags as ``bool``.
    ``tcb_status`` is Intel's status name (``UpToDate``, ``OutOfDate``, ...) or ``None`` where
    the TEE has none (SNP and simulation report their TCB in ``values`` instead).
    """

    tee: Tee
    report_data: bytes
    debug: bool
    values: Mapping[str, ClaimValue] = field(default_factory=dict)
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.report_data) != 64:
            raise ValueError("report_data is 64 bytes")
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))
        object.__setattr__(self, "advisory_ids", tuple(sorted(set(self.advisory_ids))))

    @property
    def simulated(self) -> bool:
        return self.tee is Tee.SIMULATION

    def to_json(self) -> dict[str, ClaimValue]:
        """The claims as ``case.json`` spells them (report data included, lowercase hex)."""
        out: dict[str, ClaimValue] = dict(self.values)
        out["report_data"] = self.report_data.hex()
        out["debug"] = self.debug
        return out
