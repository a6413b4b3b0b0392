"""Small composable rules. An empty ``AllOf`` or ``AnyOf`` refuses to exist: no vacuous truth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cloister.attestation import Claims, Tee
from cloister.session import Attestation


class Rule(Protocol):
    def holds(self, claims: Claims) -> bool: ...

    def why_not(self, claims: Claims) -> str: ...


@dataclass(frozen=True)
class IsTee:
    tee: Tee

    def holds(self, claims: Claims) -> bool:
        return claims.tee is self.tee

    def why_not(self, claims: Claims) -> str:
        return f"the evidence is {claims.tee.value}, the alternative wants {self.tee.value}"


@dataclass(frozen=True)
class OneOf:
    """The claim ``key`` equals one of ``allowed`` (lowercase hex strings)."""

    key: str
    allowed: frozenset[str]

    def holds(self, claims: Claims) -> bool:
        value = claims.values.get(self.key)
        return isinstance(value, str) and value.lower() in self.allowed

    def why_not(self, claims: Claims) -> str:
        allowed = ", ".join(sorted(self.allowed))
        return f"{self.key} is {claims.values.get(self.key)}, the session allows {allowed}"


@dataclass(frozen=True)
class Equals:
    key: str
    expected: int | bool

    def holds(self, claims: Claims) -> bool:
        value = claims.values.get(self.key)
        return type(value) is type(self.expected) and value == self.expected

    def why_not(self, claims: Claims) -> str:
        return f"{self.key} is {claims.values.get(self.key)}, the session wants {self.expected}"


@dataclass(frozen=True)
class AtLeast:
    key: str
    floor: int

    def holds(self, claims: Claims) -> bool:
        value = claims.values.get(self.key)
        return isinstance(value, int) and not isinstance(value, bool) and value >= self.floor

    def why_not(self, claims: Claims) -> str:
        return (
            f"{self.key} is {claims.values.get(self.key)}, the session wants at least {self.floor}"
        )


@dataclass(frozen=True)
class AllOf:
    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("an empty AllOf would accept everything")

    def holds(self, claims: Claims) -> bool:
        return all(r.holds(claims) for r in self.rules)

    def why_not(self, claims: Claims) -> str:
        return "; ".join(r.why_not(claims) for r in self.rules if not r.holds(claims))


@dataclass(frozen=True)
class AnyOf:
    rules: tuple[AllOf, ...]

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("an empty AnyOf would refuse everything silently")

    def holds(self, claims: Claims) -> bool:
        return self.first_match(claims) is not None

    def first_match(self, claims: Claims) -> int | None:
        return next((i for i, r in enumerate(self.rules) if r.holds(claims)), None)


_HEX_KEYS = (
    "mrenclave",
    "mrsigner",
    "mrtd",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "rtmr3",
    "mrconfigid",
    "measurement",
    "host_data",
)


def compile_alternative(alt: Attestation) -> AllOf:
    """The rules of one ``attestation`` alternative."""
    rules: list[Rule] = [IsTee(Tee(alt.tee))]
    for key in _HEX_KEYS:
        if getattr(alt, key):
            rules.append(OneOf(key, frozenset(alt.normalized(key))))
    if alt.isvprodid is not None:
        rules.append(Equals("isvprodid", alt.isvprodid))
    if alt.isvsvn is not None:
        rules.append(AtLeast("isvsvn", alt.isvsvn))
    for key, want in (alt.policy or {}).items():
        # SNP guest policy bits, as the verifier names them (e.g. ``policy_smt: false``).
        rules.append(
            Equals(f"policy_{key}", want)
            if isinstance(want, bool)
            else AtLeast(f"policy_{key}", want)
        )
    for key, floor in (alt.min_tcb or {}).items():
        rules.append(AtLeast(f"reported_tcb_{key}", floor))
    # Only the TEE kind is not a constraint: the session loader guarantees a measurement rule.
    return AllOf(tuple(rules))
