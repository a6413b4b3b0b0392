"""`cloister cas ...`: run a CAS, and attest one before trusting it."""

from __future__ import annotations

import base64
import hmac
import os
import secrets
import ssl
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloister import limits
from cloister.attestation import Tee, binding, simulated
from cloister.cas import ratelimit, server
from cloister.cli._errors import handle_errors, usage_error
from cloister.client import CasClient, fingerprint, pin_path
from cloister.errors import AccessDenied, AppraisalError, BackendUnavailable

app = typer.Typer(help="The configuration and attestation service.", no_args_is_help=True)


@app.command("serve")
@handle_errors
def serve(
    data_dir: Path = typer.Option(..., "--data-dir", help="where the CAS keeps its state"),
    listen: str = typer.Option("127.0.0.1:8081", "--listen", help="HOST:PORT to serve HTTPS on"),
    simulation: bool = typer.Option(
        False, "--simulation", help="run without a TEE (protects nothing; development only)"
    ),
    db: str | None = typer.Option(None, "--db", help="database URL (default: SQLite in DATA_DIR)"),
    hostname: list[str] = typer.Option([], "--hostname", help="extra DNS name for the certificate"),
    collateral_dir: Path | None = typer.Option(
        None, "--collateral", help="offline collateral directory for SGX/TDX/SNP verification"
    ),
    pccs_url: str | None = typer.Option(None, "--pccs-url", help="Intel PCS or PCCS (API v4)"),
    kds_url: str | None = typer.Option(None, "--kds-url", help="AMD KDS base URL"),
    workers: int = typer.Option(
        os.cpu_count() or 1, "--workers", min=1, help="worker processes (default: one per core)"
    ),
    cpu_affinity: bool = typer.Option(
        False,
        "--cpu-affinity",
        help="pin each worker process to its own CPU (steadier latency under load; needs at "
        "least as many CPUs as workers)",
    ),
    activation_rate: float = typer.Option(
        limits.ACTIVATION_RATE_PER_SECOND,
        "--activation-rate",
        min=0,
        help="nonce and activate requests per second per client IP, per worker (0: no limit)",
    ),
    activation_burst: int = typer.Option(limits.ACTIVATION_BURST, "--activation-burst", min=1),
    session_rate: float = typer.Option(
        limits.SESSION_RATE_PER_SECOND,
        "--session-rate",
        min=0,
        help="session requests per second per client IP, per worker (0: no limit)",
    ),
    session_burst: int = typer.Option(limits.SESSION_BURST, "--session-burst", min=1),
    header_timeout: float = typer.Option(
        limits.HTTP_HEADER_TIMEOUT_SECONDS,
        "--header-timeout",
        min=0.1,
        help="seconds a client may take to send a request's headers",
    ),
    body_timeout: float = typer.Option(
        limits.HTTP_BODY_TIMEOUT_SECONDS,
        "--body-timeout",
        min=0.1,
        help="seconds a client may take to send a request's body",
    ),
) -> None:
    """Serve the CAS over HTTPS (TLS 1.3 only).

    Rate limits are token buckets kept in each worker process: with W workers a client can
    reach up to W times the rate.
    """
    try:
        host, port = server.parse_listen(listen)
    except ValueError as exc:
        raise usage_error(str(exc)) from None
    settings = server.Settings(
        data_dir=data_dir,
        simulation=simulation,
        db_url=db,
        hostnames=hostname,
        collateral_dir=collateral_dir,
        pccs_url=pccs_url,
        kds_url=kds_url,
    )
    options = server.ServeOptions(
        rate_limits=ratelimit.RateLimits(
            activation=ratelimit.Rate(activation_rate, activation_burst),
            session=ratelimit.Rate(session_rate, session_burst),
        ),
        header_timeout=header_timeout,
        body_timeout=body_timeout,
    )
    identity = server.build(settings).identity
    if simulation:
        typer.secho(server.SIMULATION_BANNER, fg="yellow", err=True)
    typer.echo(
        f"CAS listening on https://{host}:{port} with {workers} worker(s) "
        f"(identity {fingerprint(identity.cert_pem())[:16]})",
        err=True,
    )
    server.serve(settings, host, port, workers=workers, options=options, cpu_affinity=cpu_affinity)


@app.command("attest")
@handle_errors
def attest(
    url: str = typer.Argument(..., help="https://HOST:PORT of the CAS"),
    allow_simulation: bool = typer.Option(
        False, "--allow-simulation", help="accept a CAS that runs in simulation mode"
    ),
    measurement: str | None = typer.Option(
        None, "--measurement", help="expected CAS measurement (hex)"
    ),
) -> None:
    """Verify the CAS's evidence and pin its identity for later commands."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise usage_error("the CAS URL must be https://HOST:PORT")
    # (1) the certificate the endpoint presents; trusted only once (2)-(4) hold
    try:
        presented = ssl.get_server_certificate((parts.hostname, parts.port or 443)).encode()
    except OSError as exc:
        raise BackendUnavailable(f"cannot reach the CAS at {url}: {exc}") from None
    # (1a) RA-TLS: the evidence in the certificate binds its key (checked before any request)
    from cloister.attestation import Claims
    from cloister.cas import identity as cas_identity

    try:
        ra_tls: Claims | None = cas_identity.verify_ra_tls(
            x509.load_pem_x509_certificate(presented),
            now=datetime.now(UTC),
            allow_simulation=allow_simulation,
        )
    except AccessDenied as exc:
        if exc.reason != "no-evidence-extension":
            raise  # evidence that is present must verify
        ra_tls = None  # a certificate made before RA-TLS: the evidence endpoint decides alone
    nonce = secrets.token_hex(32)
    with CasClient(url, cert_pem=presented) as client:
        ev = client.evidence(nonce)
    identity = x509.load_pem_x509_certificate(ev.identity_certificate.encode())
    # (2) the endpoint's TLS certificate is the identity the evidence speaks of
    if identity != x509.load_pem_x509_certificate(presented):
        raise AccessDenied(
            "the TLS certificate is not the CAS's identity", reason="identity-mismatch"
        )
    # (3) genuine evidence, bound to our nonce and that identity key
    if Tee(ev.tee) is not Tee.SIMULATION:
        raise AccessDenied(
            f"verifying a {ev.tee} CAS is not supported by this client", reason="unsupported-tee"
        )
    if not allow_simulation:
        raise AppraisalError(
            "the CAS runs in simulation mode; pass --allow-simulation to trust it for development",
            reason="simulation-not-tolerated",
        )
    claims = simulated.SimulatedVerifier().verify(
        base64.b64decode(ev.evidence), now=datetime.now(UTC)
    )
    spki = identity.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    binding.check_binding(claims.report_data, bytes.fromhex(nonce), spki)
    # (4) the expected measurement, when the owner gave one
    got = str(claims.values["measurement"])
    if measurement is not None and not hmac.compare_digest(got, measurement.lower()):
        raise AppraisalError(
            f"the CAS's measurement is {got}, not {measurement}", reason="measurement-mismatch"
        )
    if ra_tls is not None:
        in_cert = ra_tls.values["measurement"]
        print(f"evidence in the TLS certificate verified: measurement {in_cert}")
    else:
        print("the TLS certificate carries no evidence; the evidence endpoint was checked alone")
    path = pin_path(url)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_bytes(presented)
    typer.secho("WARNING: simulation mode: this CAS protects nothing", fg="yellow", err=True)
    print(f"CAS {url} attested: measurement {got}")
    print(f"pinned identity {fingerprint(presented)} in {path}")


from cloister.cli import cas_state  # noqa: E402 - the state commands join this group

cas_state.register(app)
