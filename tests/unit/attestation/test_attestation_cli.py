"""`cloister attest verify`: verdicts, exit statuses and the JSON shape, on the real vectors."""

from __future__ import annotations

import json

import pytest
import typer
from attestation_vectors import Case, all_cases, same_reason
from typer.testing import CliRunner

from cloister.cli import attest

runner = CliRunner()
# Mounted as in ``cloister.cli.main``: ``cloister attest verify ...``.
cli = typer.Typer()
cli.add_typer(attest.app, name="attest")
CASES = all_cases()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(cli, ["attest", "verify", *args])
    return result.exit_code, result.output


def _args(case: Case, *extra: str) -> list[str]:
    return [
        str(case.path / case.spec["evidence"]),
        "--tee",
        case.tee.value,
        "--collateral",
        str(case.collateral_dir),
        "--at",
        case.spec["verify_at"],
        *extra,
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_json_verdict_matches_the_vector(case: Case) -> None:
    code, out = _run(*_args(case, "--json"))
    result = json.loads(out)
    assert set(result) >= {"verdict", "reason", "tee", "tcb_status", "advisory_ids", "claims"}
    assert result["tee"] == case.tee.value
    if case.accept:
        assert code == 0
        assert result["verdict"] == "accept" and result["reason"] is None
        assert result["tcb_status"] == case.spec["tcb_status"]
        assert set(result["advisory_ids"]) == set(case.spec["advisory_ids"])
        for name, value in case.spec["claims"].items():
            assert result["claims"][name] == value
    else:
        assert code == 1
        assert result["verdict"] == "reject" and result["claims"] is None
        assert same_reason(case, result["reason"])


def test_readable_summary() -> None:
    accepted = next(c for c in CASES if c.accept)
    code, out = _run(*_args(accepted))
    assert code == 0 and "ACCEPT" in out and "TCB status" in out
    rejected = next(c for c in CASES if not c.accept)
    code, out = _run(*_args(rejected))
    assert code == 1 and "REJECT" in out


def test_rfc3339_offsets_are_honoured() -> None:
    case = next(c for c in CASES if c.accept and c.spec["verify_at"].endswith("T00:00:00Z"))
    shifted = case.spec["verify_at"].replace("T00:00:00Z", "T02:00:00+02:00")
    code, _ = _run(*_args(case)[:-2], "--at", shifted)
    assert code == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--tee", "sev"],
        ["--at", "yesterday"],
        ["--at", "2025-06-15T00:00:00"],  # no offset: not RFC 3339
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    case = next(c for c in CASES if c.accept)
    base = _args(case)
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[base.index(flag) + 1] = value
    code, _ = _run(*base)
    assert code == 2


def test_unreadable_evidence_exits_2(tmp_path: object) -> None:
    case = next(c for c in CASES if c.accept)
    args = _args(case)
    args[0] = "/nonexistent/evidence.bin"
    assert _run(*args)[0] == 2
    args = _args(case)
    args[args.index("--collateral") + 1] = "/nonexistent/collateral"
    assert _run(*args)[0] == 2
