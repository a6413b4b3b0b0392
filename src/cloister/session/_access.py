"""Access policy rules: the grammar of ``read``, ``update`` and ``create_sessions`` entries.

An entry list is an *any-of*: one satisfied entry grants the operation. An entry is

- ``CREATOR``: the key that created the session;
- ``ANY``: anyone who presents a valid signature (alone in its list);
- ``NONE``: nobody (alone in its list);
- an owner key (``ed25519:<base64>`` or a PEM SubjectPublicKeyInfo), or ``signer: <key>``;
- ``require-all: [entries]`` or ``require-at-least-N: [entries]`` (governance), where each
  nested entry is again one of the above. ``CREATOR``/keys count once per distinct key.

Rules are parsed and checked at load time (``parse``); the CAS evaluates them
(``cloister.cas.governance``) against the set of keys whose signature over exactly this
operation and this document verifies. A rule that can never hold (``require-at-least-4`` of
three signers, an empty ``require-all``) is refused: no vacuous truth, no dead policies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cloister.errors import SessionError
from cloister.session import _keys

__all__ = ["Any_", "Creator", "Key", "None_", "Rule", "Threshold", "parse"]

_AT_LEAST = re.compile(r"^require-at-least-(\d+)$")
MAX_RULE_DEPTH = 4
MAX_RULE_ENTRIES = 64


@dataclass(frozen=True)
class Creator:
    pass


@dataclass(frozen=True)
class Any_:
    pass


@dataclass(frozen=True)
class None_:
    pass


@dataclass(frozen=True)
class Key:
    key: str  # canonical ``ed25519:<base64>``


@dataclass(frozen=True)
class Threshold:
    """At least ``n`` of ``rules`` hold (``require-all`` is ``n == len(rules)``)."""

    n: int
    rules: tuple[Rule, ...]


Rule = Creator | Any_ | None_ | Key | Threshold


def parse(entries: list[Any], where: str, *, governance: bool = True) -> Threshold:
    """The rule list ``entries`` as one any-of ``Threshold(1, ...)``; ``SessionError`` if bad."""
    if not entries:
        raise SessionError(f"{where} is empty; write NONE to deny everyone")
    if len(entries) > MAX_RULE_ENTRIES:
        raise SessionError(f"{where} has more than {MAX_RULE_ENTRIES} entries")
    rules = tuple(_entry(e, f"{where}[{i}]", governance, 0) for i, e in enumerate(entries))
    for alone in (None_(), Any_()):
        if alone in rules and len(rules) > 1:
            name = "NONE" if isinstance(alone, None_) else "ANY"
            raise SessionError(f"{where}: {name} cannot be combined with other entries")
    return Threshold(1, rules)


def _entry(entry: Any, where: str, governance: bool, depth: int) -> Rule:
    if isinstance(entry, str):
        return _word(entry, where)
    if not isinstance(entry, dict) or len(entry) != 1:
        raise SessionError(
            f"{where}: an entry is CREATOR, ANY, NONE, a key, or one of signer:, require-all:, "
            "require-at-least-N:"
        )
    ((verb, value),) = entry.items()
    if verb == "signer":
        if not isinstance(value, str):
            raise SessionError(f"{where}.signer: give the signer's public key")
        return _key(value, f"{where}.signer")
    m = _AT_LEAST.match(str(verb))
    if verb != "require-all" and m is None:
        raise SessionError(f"{where}: unknown access rule {verb!r}")
    if not governance:
        raise SessionError(f"{where}: {verb} rules apply to update and create_sessions only")
    if depth >= MAX_RULE_DEPTH:
        raise SessionError(f"{where}: rules nest deeper than {MAX_RULE_DEPTH}")
    if not isinstance(value, list) or not value:
        raise SessionError(f"{where}.{verb}: give a non-empty list of rules")
    if len(value) > MAX_RULE_ENTRIES:
        raise SessionError(f"{where}.{verb} has more than {MAX_RULE_ENTRIES} entries")
    rules = tuple(
        _entry(e, f"{where}.{verb}[{i}]", governance, depth + 1) for i, e in enumerate(value)
    )
    if any(isinstance(r, Any_ | None_) for r in rules):
        raise SessionError(f"{where}.{verb}: ANY and NONE do not belong inside a rule")
    n = len(rules) if m is None else int(m.group(1))
    if n < 1 or n > len(rules):
        raise SessionError(
            f"{where}: {verb} can never hold with {len(rules)} rule(s) listed under it"
        )
    return Threshold(n, rules)


def _word(entry: str, where: str) -> Rule:
    word = entry.strip()
    if word == "CREATOR":
        return Creator()
    if word == "ANY":
        return Any_()
    if word == "NONE":
        return None_()
    if word.startswith("$$SCONE::"):
        raise SessionError(
            f"{where}: {word} is not a config-fragment of this session; access entries read "
            "from other secrets at evaluation time are not supported"
        )
    if word.startswith("-----BEGIN CERTIFICATE-----") or (
        re.fullmatch(r"[1-9A-HJ-NP-Za-km-z]{40,60}", word) is not None
    ):
        raise SessionError(
            f"{where}: SCONE TLS client certificate identities do not apply; owners sign "
            "with Ed25519 keys here (write the key, or signer: KEY)",
            reason="not-applicable",
        )
    return _key(word, where)


def _key(text: str, where: str) -> Key:
    try:
        raw = _keys.parse_public_key(text)
    except ValueError as exc:
        raise SessionError(f"{where}: {exc}") from None
    return Key(_keys.format_public_key(raw))


def satisfied(rule: Rule, signers: frozenset[str], creator: str | None) -> bool:
    """Whether ``rule`` holds when exactly ``signers`` (canonical keys) signed."""
    match rule:
        case Creator():
            return creator is not None and creator in signers
        case Any_():
            return bool(signers)
        case None_():
            return False
        case Key(key=key):
            return key in signers
        case Threshold(n=n, rules=rules):
            return _threshold(n, rules, signers, creator)
    return False


def _threshold(
    n: int, rules: tuple[Rule, ...], signers: frozenset[str], creator: str | None
) -> bool:
    # Plain signers in one rule count once each: listing a key twice does not double its vote.
    seen: set[str] = set()
    count = 0
    for rule in rules:
        if isinstance(rule, Key | Creator):
            key = rule.key if isinstance(rule, Key) else creator
            if key is None or key in seen or key not in signers:
                continue
            seen.add(key)
            count += 1
        elif satisfied(rule, signers, creator):
            count += 1
    return count >= n
