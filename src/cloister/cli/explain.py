"""`cloister session explain`: would this captured evidence be accepted, and if not, why.

For the owner, on the owner's machine: unlike the CAS's answer to a workload (a stable code),
it names the expected and the actual measurements, TCB status and advisories.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cloister import errors, policy
from cloister.attestation import Claims, Tee, simulated, verifier_for
from cloister.cli._errors import EXIT_OK, EXIT_REFUSED, handle_errors, usage_error
from cloister.cli.attest import _read_evidence, _source, parse_time
from cloister.session import Session


def _verify(tee: Tee, evidence: bytes, collateral: Path | None, at: str | None) -> Claims:
    now = parse_time(at)
    if tee is Tee.SIMULATION:
        return simulated.SimulatedVerifier().verify(evidence, now=now)
    return verifier_for(tee, collateral=_source(tee, collateral)).verify(evidence, now=now)


@handle_errors
def explain(
    session_file: Path = typer.Argument(..., metavar="SESSION", help="the session file"),
    service: str = typer.Option(..., "--service", help="the service whose rules apply"),
    evidence: list[Path] = typer.Option(..., "--evidence", help="captured evidence (repeatable)"),
    tee: str = typer.Option("sgx", "--tee", help="sgx, tdx, snp or simulation"),
    collateral: Path | None = typer.Option(None, "--collateral", help="collateral directory"),
    at: str | None = typer.Option(None, "--at", help="RFC 3339 time to judge at (default: now)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per evidence file"),
) -> None:
    """Say whether captured evidence would be accepted by a session's service, and why not."""
    try:
        kind = Tee(tee)
        text = session_file.read_text()
    except ValueError:
        raise usage_error(f"--tee must be sgx, tdx, snp or simulation, not {tee!r}") from None
    except OSError as exc:
        raise usage_error(f"cannot read {session_file}: {exc.strerror}") from None
    session = Session.from_yaml(text)
    svc = session.service(service)
    if svc is None:
        raise usage_error(f"session {session.name!r} has no service {service!r}")
    refused = False
    for path in evidence:
        raw = _read_evidence(path)
        try:
            claims = _verify(kind, raw, collateral, at)
        except errors.EvidenceError as exc:
            lines = [
                f"refused: the evidence is not genuine or not valid: {exc.message} [{exc.reason}]"
            ]
        else:
            lines = policy.explain(claims, svc, session.document.security.attestation)
        refused = refused or bool(lines)
        if as_json:
            print(json.dumps({"evidence": str(path), "accepted": not lines, "reasons": lines}))
            continue
        print(f"{path}: {'would be ACCEPTED' if not lines else 'would be REFUSED'} "
              f"by {session.name}/{service}")  # fmt: skip
        for line in lines:
            print(f"  {line}")
    raise typer.Exit(EXIT_REFUSED if refused else EXIT_OK)
