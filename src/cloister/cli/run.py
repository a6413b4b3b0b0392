"""`cloister run`: the agent. Attest, receive the configuration, exec the unmodified program.

A service with encrypted volumes or a mesh is not exec'd but supervised: the agent mounts and
verifies the volumes, then starts the mesh, then runs the program as its child, and after the
program ends stops the mesh and unmounts the volumes (final commits and tag reports).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import typer

from cloister import protocol
from cloister.agent import activation, inject
from cloister.agent import mesh as agent_mesh
from cloister.agent import volumes as agent_volumes
from cloister.agent.evidence import EvidenceProvider, SimulatedProvider
from cloister.attestation import simulated
from cloister.cli._errors import handle_errors, usage_error
from cloister.client import CasClient, cloister_home

log = logging.getLogger(__name__)


def _config_id(session: str | None, service: str | None) -> tuple[str, str, str | None]:
    """Session, service and one-time password (SCONE: ``SCONE_CONFIG_ID=session/service@OTP``)."""
    config_id = os.environ.get("SCONE_CONFIG_ID", "")
    config_id, _, otp = config_id.partition("@")
    if session and service:
        return session, service, otp or None
    name, sep, svc = config_id.rpartition("/")
    if not sep or not name or not svc:
        raise usage_error("name --session and --service, or set SCONE_CONFIG_ID=session/service")
    return session or name, service or svc, otp or None


class _SecondFactors(CasClient):
    """A CAS client that adds the session's second factors to the activation request."""

    def __init__(self, url: str, *, cert_pem: bytes | None, otp: str | None, token: str | None):
        super().__init__(url, cert_pem=cert_pem)
        self._factors = {"otp": otp, "service_access_token": token}

    def activate(self, req: protocol.ActivationRequest) -> protocol.ActivationResponse:
        return super().activate(req.model_copy(update=self._factors))


def _cas_url(cas: str | None) -> str:
    url = cas or os.environ.get("SCONE_CAS_ADDR", "")
    if not url:
        raise usage_error("name the CAS with --cas URL or SCONE_CAS_ADDR")
    return url if url.startswith("https://") else f"https://{url}"


def _provider(simulation: bool, measure: list[Path], cmd: list[str]) -> EvidenceProvider:
    if not simulation:
        from cloister.agent import evidence_hw

        provider = evidence_hw.detect()
        if provider is None:
            raise usage_error(
                "no TEE found; pass --simulation to run without one (protects nothing)"
            )
        return provider
    files = measure
    if not files:
        if not cmd:
            raise usage_error("with --simulation, name the program (CMD) or the files to --measure")
        exe = shutil.which(cmd[0])
        if exe is None:
            raise usage_error(f"cannot find program {cmd[0]!r} to measure")
        files = [Path(exe)]
    try:
        measurement = simulated.measure_files(files)
    except OSError as exc:
        raise usage_error(f"cannot read {exc.filename} to measure it") from None
    typer.secho(
        "WARNING: simulation mode: this workload's attestation protects nothing",
        fg="yellow",
        err=True,
    )
    platform = simulated.SimulatedPlatform.load_or_create(
        cloister_home() / "simulation-platform.key"
    )
    return SimulatedProvider(platform, measurement)


@handle_errors
def run(
    ctx: typer.Context,
    cas: str | None = typer.Option(None, "--cas", help="CAS URL (or SCONE_CAS_ADDR)"),
    session: str | None = typer.Option(None, "--session", help="session name"),
    service: str | None = typer.Option(None, "--service", help="service name in the session"),
    simulation: bool = typer.Option(False, "--simulation", help="simulated TEE (protects nothing)"),
    measure: list[Path] = typer.Option(
        [], "--measure", help="files whose digest is the measurement"
    ),
    cas_cert: Path | None = typer.Option(
        None,
        "--cas-cert",
        envvar="CLOISTER_CAS_CERT",
        help="pinned CAS certificate (default: from 'cas attest')",
    ),
    files_root: Path = typer.Option(
        Path("/"), "--files-root", help="prefix for injected file paths"
    ),
    volumes_root: Path = typer.Option(
        Path("/var/lib/cloister/volumes"),
        "--volumes-root",
        envvar="CLOISTER_VOLUMES_ROOT",
        help="where encrypted volumes keep their files (one directory per volume)",
    ),
) -> None:
    """Attest this workload, receive its configuration and exec the program (CMD after --)."""
    cmd = list(ctx.args)
    session, service, otp = _config_id(session, service)
    token = os.environ.get("SCONE_SERVICE_ACCESS_TOKEN") or None
    url = _cas_url(cas)
    provider = _provider(simulation, measure, cmd)
    cert_pem = cas_cert.read_bytes() if cas_cert else None
    with _SecondFactors(url, cert_pem=cert_pem, otp=otp, token=token) as client:
        activated = activation.activate(client, provider, session, service)
    prepared = inject.prepare(
        activated.bundle,
        activated.tls_key_pem(),
        base_env=os.environ,
        root=files_root,
        host_argv=cmd,
    )
    argv = prepared.argv if prepared.argv is not None else cmd
    if not argv:
        raise usage_error("the session's service has no command; give one after --")
    bundle = activated.bundle
    if bundle.volumes or bundle.mesh is not None:
        raise SystemExit(
            _supervise(activated, argv, prepared, url, cert_pem, volumes_root, files_root)
        )
    if prepared.pwd:
        os.chdir(prepared.pwd)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], argv, prepared.environment)  # noqa: S606 - the whole point
    except OSError as exc:
        raise usage_error(f"cannot start {argv[0]!r}: {exc.strerror}") from None


def _supervise(
    activated: activation.Activated,
    argv: list[str],
    prepared: inject.Prepared,
    url: str,
    cert_pem: bytes | None,
    volumes_root: Path,
    files_root: Path,
) -> int:
    """Mount and verify volumes, then start the mesh, then run the program as a child.

    The agent stays the program's parent so that, when the program ends, it can make the
    volumes' final commits (and report their tags) and stop the mesh. Freshness before
    trust: the mesh, whose certificate other services trust, starts only once every volume
    matched the CAS's tag (docs/mesh-in-sessions.md).
    """
    bundle = activated.bundle

    def clients() -> agent_volumes.TagClient:
        return agent_volumes.TagClient(url, cert_pem=cert_pem)

    mounted: list[agent_volumes.Mounted] = []
    mesh_process: agent_mesh.MeshProcess | None = None
    code = 1
    try:
        mounted = agent_volumes.mount_all(
            bundle, activated.tls_key, clients, volumes_root=volumes_root, files_root=files_root
        )
        if bundle.mesh is not None:
            mesh_process = agent_mesh.start(bundle.mesh, activated.tls_key_pem())
        code = _run_child(argv, prepared)
    finally:
        if mesh_process is not None:
            mesh_process.stop()
        if not agent_volumes.unmount_all(mounted) and code == 0:
            code = 4  # the program succeeded, but its last writes are not acknowledged
    return code


def _run_child(argv: list[str], prepared: inject.Prepared) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        child = subprocess.Popen(argv, env=prepared.environment, cwd=prepared.pwd)
    except OSError as exc:
        raise usage_error(f"cannot start {argv[0]!r}: {exc.strerror}") from None

    def forward(signum: int, _frame: FrameType | None) -> None:
        child.send_signal(signum)

    previous = {
        s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    try:
        status = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return status if status >= 0 else 128 - status
