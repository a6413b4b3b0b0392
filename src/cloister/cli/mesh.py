"""`cloister mesh ...`: run or check the enforcing mutual-TLS proxies of one service.

Inside a workload the agent starts the mesh itself (``python -m cloister.mesh``); these
commands run the same code by hand, for trying a configuration or running the proxies beside a
service that has no agent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from cloister import mesh
from cloister.cli._errors import handle_errors, usage_error

app = typer.Typer(help="attested mesh proxies", no_args_is_help=True)

CONFIG = typer.Option(..., "--config", help="mesh configuration (JSON), see docs/mesh.md")


def _load(path: Path) -> mesh.MeshConfig:
    try:
        return mesh.MeshConfig.from_file(path)
    except OSError as exc:
        raise usage_error(f"cannot read {path}: {exc.strerror}") from None


@app.command("run")
@handle_errors
def run(config: Path = CONFIG) -> None:
    """Run the ingress and egress proxies until SIGTERM or SIGINT (SIGHUP reloads TLS)."""
    asyncio.run(mesh.serve(_load(config)))


@app.command("check")
@handle_errors
def check(config: Path = CONFIG) -> None:
    """Validate a configuration and its TLS material, and print what it would enforce."""
    cfg = _load(config)
    mesh.check_material(cfg.tls)
    typer.echo(f"service {cfg.identity}")
    for rule in cfg.ingress:
        callers = ", ".join(str(c) for c in rule.allow_from)
        typer.echo(
            f"  ingress {rule.bind}:{rule.port} -> {rule.app_host}:{rule.app_port}"
            f" allow_from {callers}"
        )
    for egress_rule in cfg.egress:
        typer.echo(
            f"  egress  {egress_rule.bind}:{egress_rule.port} -> {egress_rule.target}"
            f" peer {egress_rule.peer}"
        )
