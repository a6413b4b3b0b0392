"""`cloister sconify`: existing Kubernetes YAML → its confidential version + a session skeleton.

The rewrite itself is ``cloister.k8s.sconify``; this module reads the input, writes the two
output files and tells the owner what is left to fill in.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
import yaml

from cloister.cli._errors import usage_error
from cloister.k8s import sconify as rewrite

MANIFESTS_FILE = "kubernetes.yaml"
SESSION_FILE = "session.yaml"


def sconify(
    file: str = typer.Option(
        ..., "-f", "--file", help="Kubernetes YAML to convert (multi-document; '-' for stdin)"
    ),
    tee: str = typer.Option(..., "--tee", help="simulation, sgx, tdx or snp"),
    session: str = typer.Option(..., "--session", help="name of the session to generate"),
    output: Path = typer.Option(
        ..., "-o", "--output", help=f"directory for {MANIFESTS_FILE} and {SESSION_FILE}"
    ),
    runtime_class: str | None = typer.Option(
        None, "--runtime-class", help="runtime class for tdx/snp (default kata-qemu-<tee>)"
    ),
    force: bool = typer.Option(False, "--force", help="overwrite existing output files"),
) -> None:
    """Turn existing Kubernetes YAML into its confidential version and a session skeleton.

    ConfigMaps and Secrets move into the session; the Kubernetes output holds no secret.
    """
    if tee not in rewrite.TEES:
        raise usage_error(f"--tee must be one of {', '.join(rewrite.TEES)}, not {tee!r}")
    try:
        result = rewrite.sconify(
            rewrite.load_documents(_read(file)),
            tee=tee,
            session=session,
            runtime_class=runtime_class,
        )
    except (ValueError, yaml.YAMLError) as exc:
        raise usage_error(f"{file}: {exc}") from None

    manifests_path, session_path = output / MANIFESTS_FILE, output / SESSION_FILE
    if not force:
        for path in (manifests_path, session_path):
            if path.exists():
                raise usage_error(f"{path} exists; use --force to overwrite it")
    try:
        output.mkdir(parents=True, exist_ok=True)
        manifests_path.write_text(rewrite.dump_documents(result.manifests))
        _write_private(session_path, _session_text(result))
    except OSError as exc:
        raise usage_error(f"cannot write to {output}: {exc.strerror}") from None
    _report(result, manifests_path, session_path)


def _read(file: str) -> str:
    if file == "-":
        return sys.stdin.read()
    try:
        return Path(file).read_text()
    except OSError as exc:
        raise usage_error(f"cannot read {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise usage_error(f"{file} is not UTF-8 text") from None


def _session_text(result: rewrite.Result) -> str:
    header = [
        "# Session skeleton made by `cloister sconify`. It holds the application's secrets:",
        "# keep it off the cluster. Fill in every <FILL-IN>, then sign and upload it with",
        "# `cloister session create`.",
    ]
    return "\n".join(header) + "\n" + rewrite.dump_session(result.session)


def _write_private(path: Path, text: str) -> None:
    # Secret values live in this file: readable by its owner only, from the first byte on.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _report(result: rewrite.Result, manifests_path: Path, session_path: Path) -> None:
    services = result.session.get("services", [])
    secrets = result.session.get("secrets", [])
    print(f"wrote {manifests_path} ({len(result.manifests)} objects, no secrets)")
    print(
        f"wrote {session_path} (session {result.session['name']}: {len(services)} services, "
        f"{len(secrets)} secrets; mode 0600, keep it off the cluster)"
    )
    if result.fill_in:
        print(f"\nstill to fill in ({len(result.fill_in)}):")
        for item in result.fill_in:
            print(f"  - {item}")
    if result.notes:
        print("\nnotes:")
        for note in result.notes:
            print(f"  - {note}")
