"""`cloister k8s ...`: the Kubernetes operator, the admission webhook and the agent installer.

Neither the operator nor the webhook holds a secret: both reach the CAS through its pinned
(public) certificate, given as a file (``--cas-cert`` or ``CLOISTER_CAS_CERT``) or, for a
developer's machine, the pin that ``cloister cas attest`` stored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from cloister import __version__
from cloister.cli._errors import handle_errors, usage_error
from cloister.client import CasClient, pin_path

app = typer.Typer(
    help="Kubernetes: the session operator and the admission webhook.", no_args_is_help=True
)


def _cas_url(url: str) -> str:
    # The pinned certificate is the only trust in the CAS; plain HTTP would bypass it.
    if not url.startswith("https://"):
        raise usage_error(f"--cas must be an https:// URL, not {url!r}")
    return url


def _cas_cert(url: str, cas_cert: Path | None) -> bytes:
    path = cas_cert or pin_path(url)
    try:
        data = path.read_bytes()
    except OSError as exc:
        hint = "" if cas_cert else f" (give --cas-cert, or run 'cloister cas attest {url}')"
        raise usage_error(f"cannot read the CAS certificate {path}: {exc.strerror}{hint}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise usage_error(f"{path} is not a PEM certificate")
    return data


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise usage_error(f"--listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _log_level() -> None:
    # A long-running service reports what it relays; the CLI's default is quieter.
    logging.getLogger().setLevel(os.environ.get("CLOISTER_LOG_LEVEL", "INFO").upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)


CAS_CERT_OPTION = typer.Option(
    None,
    "--cas-cert",
    envvar="CLOISTER_CAS_CERT",
    help="the CAS's pinned certificate, PEM (default: the pin from 'cloister cas attest')",
)


@app.command("operator")
@handle_errors
def operator(
    cas: str = typer.Option(..., "--cas", help="URL of the CAS that receives the sessions"),
    cas_cert: Path | None = CAS_CERT_OPTION,
    namespace: list[str] = typer.Option(
        [], "--namespace", "-n", help="watch only this namespace (repeatable; default: all)"
    ),
) -> None:
    """Forward signed CloisterSession resources to the CAS and report its verdict."""
    from cloister.k8s import operator as k8s_operator

    _log_level()
    cas = _cas_url(cas)
    config = k8s_operator.OperatorConfig(cas_url=cas, cas_cert_pem=_cas_cert(cas, cas_cert))
    k8s_operator.run(config, namespaces=namespace)


@app.command("webhook")
@handle_errors
def webhook(
    listen: str = typer.Option("0.0.0.0:8443", "--listen", help="HOST:PORT to serve HTTPS on"),
    cert: Path = typer.Option(..., "--cert", help="serving certificate (PEM)"),
    key: Path = typer.Option(..., "--key", help="serving key (PEM)"),
    cas: str = typer.Option(..., "--cas", help="CAS URL, checked and given to workloads"),
    cas_cert: Path | None = CAS_CERT_OPTION,
    agent_image: str = typer.Option(
        f"cloister:{__version__}",
        "--agent-image",
        help="image whose init container copies the agent into pods",
    ),
) -> None:
    """Serve the mutating admission webhook that starts annotated pods under the agent."""
    from cloister.k8s import webhook as k8s_webhook

    _log_level()
    cas = _cas_url(cas)
    host, port = _split_listen(listen)
    for path in (cert, key):
        if not path.is_file():
            raise usage_error(f"cannot read {path}")
    pem = _cas_cert(cas, cas_cert)
    config = k8s_webhook.InjectConfig(
        cas_url=cas, cas_cert_pem=pem.decode(), agent_image=agent_image
    )
    with CasClient(cas, cert_pem=pem, timeout=5.0) as client:
        k8s_webhook.serve(
            config, client, host=host, port=port, certfile=str(cert), keyfile=str(key)
        )


@app.command("install-agent")
@handle_errors
def install_agent(
    dest: Path = typer.Argument(..., help="directory to install into (a pod's shared emptyDir)"),
) -> None:
    """Copy a self-contained agent (Python, libraries, launcher) into DEST.

    The webhook runs this in an init container; the application container then starts
    DEST/bin/cloister-run, which needs only a POSIX shell in the application's image.
    """
    from cloister.k8s import _launcher

    try:
        launcher = _launcher.install(dest)
    except OSError as exc:
        raise usage_error(f"cannot install the agent into {dest}: {exc}") from None
    typer.echo(f"installed {launcher}")
