"""`cloister attest ...`: verify hardware evidence from the command line.

``cloister attest verify EVIDENCE --tee sgx|tdx|snp --collateral DIR --at TIME [--json]``
runs the same verifiers as the CAS. Exit status: 0 when the evidence is genuine and all of its
collateral is valid at TIME, 1 when it is rejected, 2 for usage errors, 3 when a collateral
service cannot be reached (see ``cloister.cli._errors``).
"""

from __future__ import annotations

import enum
import json
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cloister import attestation, errors, limits
from cloister.attestation import Claims, Tee, collateral
from cloister.cli._errors import EXIT_OK, EXIT_REFUSED, exit_code_for, usage_error

app = typer.Typer(help="verify TEE evidence (SGX, TDX, SEV-SNP)", no_args_is_help=True)


class TeeChoice(enum.StrEnum):
    sgx = "sgx"
    tdx = "tdx"
    snp = "snp"


def parse_time(value: str | None) -> datetime:
    """RFC 3339 with an explicit offset (``Z`` or ``±hh:mm``); ``None`` is now."""
    if value is None:
        return datetime.now(UTC)
    try:
        parsed = datetime.fromisoformat(value.strip().replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise usage_error(f"--at {value!r} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        raise usage_error(f"--at {value!r} has no UTC offset (RFC 3339 requires one)")
    return parsed.astimezone(UTC)


def _read_evidence(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > limits.MAX_EVIDENCE_BYTES + 1024 * 1024:
            raise usage_error(f"{path} is too large to be evidence")
        return path.read_bytes()
    except OSError as exc:
        raise usage_error(f"cannot read {path}: {exc.strerror or exc}") from None


def _source(tee: Tee, directory: Path | None) -> collateral.CollateralSource:
    if directory is not None:
        if not directory.is_dir():
            raise usage_error(f"--collateral {directory} is not a directory")
        return collateral.DirectorySource(directory)
    return collateral.KdsSource() if tee is Tee.SNP else collateral.PcsSource()


def _result(tee: Tee, claims: Claims | None, error: errors.Error | None) -> dict[str, object]:
    return {
        "verdict": "accept" if claims is not None else "reject",
        "reason": None if error is None else error.reason,
        "tee": tee.value,
        "tcb_status": claims.tcb_status if claims is not None else None,
        "advisory_ids": list(claims.advisory_ids) if claims is not None else [],
        "claims": claims.to_json() if claims is not None else None,
        **({"message": error.message} if error is not None else {}),
    }


def _print_summary(console: Console, result: dict[str, object]) -> None:
    accepted = result["verdict"] == "accept"
    style = "bold green" if accepted else "bold red"
    console.print(f"[{style}]{str(result['verdict']).upper()}[/] {result['tee']} evidence")
    if not accepted:
        console.print(f"reason: [bold]{result['reason']}[/] — {result.get('message', '')}")
        return
    console.print(f"TCB status: [bold]{result['tcb_status'] or 'n/a'}[/]")
    advisories = result["advisory_ids"]
    if isinstance(advisories, list) and advisories:
        console.print("advisories: " + ", ".join(str(a) for a in advisories))
    table = Table(show_header=True, header_style="bold")
    table.add_column("claim", no_wrap=True)
    table.add_column("value", overflow="fold")
    claims = result["claims"]
    if isinstance(claims, dict):
        for name, value in claims.items():
            table.add_row(name, str(value).lower() if isinstance(value, bool) else str(value))
    console.print(table)


@app.command("verify")
def verify(
    evidence: Path = typer.Argument(..., help="raw quote (SGX/TDX) or report (SNP)"),
    tee: TeeChoice = typer.Option(..., "--tee", help="the TEE that produced the evidence"),
    collateral_dir: Path | None = typer.Option(
        None, "--collateral", help="collateral directory (default: Intel PCS / AMD KDS online)"
    ),
    at: str | None = typer.Option(None, "--at", help="verification time, RFC 3339 (default: now)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Verify EVIDENCE: genuine, bound to the vendor roots, collateral valid at --at."""
    kind = Tee(tee.value)
    now = parse_time(at)
    data = _read_evidence(evidence)
    source = _source(kind, collateral_dir)
    claims: Claims | None = None
    error: errors.Error | None = None
    try:
        claims = attestation.verifier_for(kind, collateral=source).verify(data, now=now)
    except errors.EvidenceError as exc:
        error = exc
    except errors.Error as exc:  # a collateral service is down: not a verdict on the evidence
        typer.echo(f"cloister: error: {exc.message} [{exc.reason}]", err=True)
        raise typer.Exit(exit_code_for(exc)) from None
    result = _result(kind, claims, error)
    if as_json:
        typer.echo(json.dumps(result, sort_keys=False))
    else:
        _print_summary(Console(), result)
    raise typer.Exit(EXIT_OK if claims is not None else EXIT_REFUSED)
