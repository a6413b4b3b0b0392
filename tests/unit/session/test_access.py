"""Access policy rules: parsing at load time, evaluation against the keys that signed."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloister.errors import SessionError
from cloister.session import access, public_key_of

KEYS = [public_key_of(ed25519.Ed25519PrivateKey.generate()) for _ in range(6)]
A, B, C, V1, V2, OWNER = KEYS


def holds(entries: list[object], signers: set[str], creator: str | None = None) -> bool:
    return access.satisfied(access.parse(entries, "update"), frozenset(signers), creator)


def test_two_of_three_needs_two_distinct_valid_signers() -> None:
    rule = [{"require-at-least-2": [{"signer": A}, {"signer": B}, {"signer": C}]}]
    assert not holds(rule, set())
    assert not holds(rule, {A})
    assert not holds(rule, {A, OWNER})
    assert holds(rule, {A, C})
    assert holds(rule, {A, B, C})


def test_a_key_listed_twice_does_not_vote_twice() -> None:
    rule = [{"require-at-least-2": [{"signer": A}, {"signer": A}, {"signer": B}]}]
    assert not holds(rule, {A})
    assert holds(rule, {A, B})


def test_nested_governance_from_scones_example() -> None:
    rule = [
        {
            "require-all": [
                {"require-at-least-2": [{"signer": A}, {"signer": B}, {"signer": C}]},
                {"require-all": [{"signer": V1}, {"signer": V2}]},
            ]
        }
    ]
    assert not holds(rule, {A, B, V1})
    assert holds(rule, {A, B, V1, V2})
    either = [{"require-at-least-1": [{"signer": OWNER}, rule[0]]}]
    assert holds(either, {OWNER})
    assert holds(either, {B, C, V1, V2})
    assert not holds(either, {B, C, V1})


def test_plain_entries_creator_any_none() -> None:
    assert holds(["CREATOR"], {OWNER}, creator=OWNER)
    assert not holds(["CREATOR"], {A}, creator=OWNER)
    assert holds([A, B], {B})
    assert holds(["ANY"], {C})
    assert not holds(["ANY"], set())
    assert not holds(["NONE"], {OWNER}, creator=OWNER)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "is empty"),
        (["NONE", "CREATOR"], "NONE cannot be combined"),
        (["ANY", A], "ANY cannot be combined"),
        ([{"require-at-least-3": [{"signer": A}, {"signer": B}]}], "can never hold"),
        ([{"require-at-least-0": [{"signer": A}]}], "can never hold"),
        ([{"require-all": []}], "non-empty list"),
        ([{"require-some": [{"signer": A}]}], "unknown access rule"),
        ([{"require-all": ["NONE"]}], "do not belong inside"),
        (["somebody"], "is not CREATOR, NONE or an owner public key"),
        (["3s1pm8W6Be6cxvAQRbRP5YXd9YuERAr7KswN97uGtoPkRW87x1"], "client certificate"),
    ],
)
def test_rules_that_cannot_mean_anything_are_refused(entries: list[object], message: str) -> None:
    with pytest.raises(SessionError, match=message):
        access.parse(entries, "update")


def test_read_takes_no_governance_rules() -> None:
    with pytest.raises(SessionError, match="update and create_sessions only"):
        access.parse([{"require-all": [{"signer": A}]}], "read", governance=False)
