"""Where the agent gets evidence: one small protocol, and the simulated provider.

Hardware providers (Gramine's ``/dev/attestation``, Linux configfs-tsm) live in
``evidence_hw``; ``simulated`` here protects nothing and says so on every use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from cloister.attestation import Tee, simulated

log = logging.getLogger(__name__)


class EvidenceProvider(Protocol):
    @property
    def tee(self) -> Tee: ...

    def evidence(self, report_data: bytes) -> bytes: ...


@dataclass(frozen=True)
class SimulatedProvider:
    """Simulated evidence for a program with ``measurement``. Protects nothing."""

    platform: simulated.SimulatedPlatform
    measurement: bytes
    tee: Tee = Tee.SIMULATION

    def evidence(self, report_data: bytes) -> bytes:
        log.warning("SIMULATION: producing simulated evidence; it protects nothing")
        return self.platform.quote(self.measurement, report_data)
