"""The `cloister` command: one small module per command group, composed here.

Only the group being invoked is imported, so that the agent (`cloister run`) starts without
loading the CAS, Kubernetes or web frameworks. ``app`` (the whole command tree) is built on
first access, for help output and tests.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import typer

# group name → module with a Typer ``app``
_GROUPS: dict[str, str] = {
    "keys": "cloister.cli.keys",
    "cas": "cloister.cli.cas",
    "session": "cloister.cli.session",
    "attest": "cloister.cli.attest",
    "volume": "cloister.cli.volume",
    "audit": "cloister.cli.audit",
    "mesh": "cloister.cli.mesh",
    "k8s": "cloister.cli.k8s",
}
# command name → (module, function, click context settings)
_COMMANDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "run": (
        "cloister.cli.run",
        "run",
        {"allow_extra_args": True, "ignore_unknown_options": True},
    ),
    "measure": ("cloister.cli.measure", "measure", {}),
    "sconify": ("cloister.cli.sconify", "sconify", {}),
    "demo": ("cloister.cli.demo", "demo", {}),
}


def build(only: str | None = None) -> typer.Typer:
    """The command tree, or just the part that ``only`` names."""
    root = typer.Typer(
        name="cloister",
        help="Cloister: attestation, sessions, secrets and encrypted volumes for confidential "
        "workloads.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )

    @root.callback()
    def _root() -> None:
        """Cloister: attestation, sessions, secrets and encrypted volumes."""

    for name, module in _GROUPS.items():
        if only in (None, name):
            group = importlib.import_module(module).app
            if name == "session":
                from cloister.cli import explain

                group.command("explain")(explain.explain)
            root.add_typer(group, name=name)
    for name, (module, attr, settings) in _COMMANDS.items():
        if only in (None, name):
            root.command(name, context_settings=settings)(
                getattr(importlib.import_module(module), attr)
            )
    return root


def __getattr__(name: str) -> Any:
    if name == "app":
        return build()
    raise AttributeError(name)


def _invoked(argv: list[str]) -> str | None:
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in _GROUPS or first in _COMMANDS else None


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("CLOISTER_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Request lines would drown the one line an operator needs; they are the CAS's to log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    build(_invoked(sys.argv[1:]))()
