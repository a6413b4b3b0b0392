"""One protocol for all verifiers, and the registry that picks one per TEE."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol, runtime_checkable

from cloister.attestation._claims import Claims, Tee


@runtime_checkable
class Verifier(Protocol):
    """Turns raw evidence into verified ``Claims``, or raises an ``EvidenceError``.

    A verifier is a pure function of (evidence, pinned roots, collateral, ``now``): it holds
    its roots and its collateral source, and takes the time as an argument so that every
    window check can be tested at fixed instants.
    """

    @property
    def tee(self) -> Tee: ...

    def verify(self, evidence: bytes, *, now: datetime) -> Claims: ...


VerifierFactory = Callable[..., Verifier]
_REGISTRY: dict[Tee, VerifierFactory] = {}


def register(tee: Tee, factory: VerifierFactory) -> None:
    """Make ``factory`` the constructor that ``verifier_for(tee)`` calls."""
    _REGISTRY[tee] = factory


def verifier_for(tee: Tee, **config: object) -> Verifier:
    """A verifier for ``tee``; ``config`` goes to its constructor (collateral source, roots)."""
    try:
        factory = _REGISTRY[tee]
    except KeyError:
        raise ValueError(f"no verifier is registered for TEE {tee.value!r}") from None
    return factory(**config)


def registered() -> frozenset[Tee]:
    return frozenset(_REGISTRY)
