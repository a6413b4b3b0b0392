"""The session corpus (tests/sessions): every file loads with its expected meaning, or is
refused with its expected message, through the loader and through `cloister session check`.

Each ``<case>.yaml`` has a ``<case>.expect.json``:

- ``refused``: a substring of the load-time refusal; or
- ``valid: true`` with ``warnings`` (substrings, one per warning, in order), ``meaning``
  (dotted paths into the loaded document → value), ``formats`` (dotted path → the
  placeholders found there as ``[secret, canonical format, encodings...]``), ``rules``
  (verb → ``[[signers], holds]``) and ``workload_bound`` (x509 issued per activation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cloister.cli.main import app
from cloister.errors import SessionError
from cloister.session import Session, access, template

CORPUS = Path(__file__).resolve().parents[2] / "sessions"
CASES = sorted(p.stem for p in CORPUS.glob("*.yaml"))


def expectation(case: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((CORPUS / f"{case}.expect.json").read_text())
    return result


def at(data: Any, path: str) -> Any:
    for part in path.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def test_every_case_has_an_expectation() -> None:
    assert len(CASES) >= 25
    for case in CASES:
        assert (CORPUS / f"{case}.expect.json").exists(), case
    assert (
        sorted(p.name.removesuffix(".expect.json") for p in CORPUS.glob("*.expect.json")) == CASES
    )


@pytest.mark.parametrize("case", CASES)
def test_case_has_its_meaning(case: str) -> None:
    expect = expectation(case)
    text = (CORPUS / f"{case}.yaml").read_text()
    if "refused" in expect:
        with pytest.raises(SessionError) as err:
            Session.from_yaml(text)
        assert expect["refused"] in err.value.message
        return
    session = Session.from_yaml(text)
    assert len(session.warnings) == len(expect["warnings"]), session.warnings
    for warning, want in zip(session.warnings, expect["warnings"], strict=True):
        assert want in warning
    data = session.document.model_dump(mode="json", by_alias=True)
    for path, value in expect.get("meaning", {}).items():
        assert at(data, path) == value, path
    kinds = session.kinds()
    for path, want in expect.get("formats", {}).items():
        value = at(data, path)
        text_at = " ".join(value) if isinstance(value, list) else value
        found = [[p.secret, p.format, *p.encodings] for p in template.find(text_at, kinds)]
        assert found == want, path
    for verb, checks in expect.get("rules", {}).items():
        rule = access.parse(
            session.document.access_policy.rules_for(verb), verb, governance=verb != "read"
        )
        for signers, holds in checks:
            assert access.satisfied(rule, frozenset(signers), None) is holds, (verb, signers)
    bound = [s.name for s in session.document.secrets if s.is_workload_bound()]
    assert bound == expect.get("workload_bound", bound)
    # The hash does not depend on formatting: the normalized form loads to the same hash.
    assert Session.from_yaml(session.to_yaml()).hash == session.hash


@pytest.mark.parametrize("case", CASES)
def test_case_round_trips_through_session_check(case: str) -> None:
    expect = expectation(case)
    result = CliRunner().invoke(app, ["session", "check", str(CORPUS / f"{case}.yaml")])
    if "refused" in expect:
        assert result.exit_code == 1
        assert expect["refused"] in result.output
        return
    assert result.exit_code == 0, result.output
    assert f"valid (hash {Session.from_yaml((CORPUS / f'{case}.yaml').read_text()).hash})" in (
        result.output
    )
    for want in expect["warnings"]:
        assert "warning: " in result.output and want in result.output
