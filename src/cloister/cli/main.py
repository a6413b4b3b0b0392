"""The `cloister` command: one small module per command group, composed here."""

from __future__ import annotations

import logging
import os

import typer

from cloister.cli import attest, audit, k8s, mesh, sconify, volume

app = typer.Typer(
    name="cloister",
    help="Cloister: attestation, sessions, secrets and encrypted volumes for confidential work.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

app.add_typer(attest.app, name="attest")
app.add_typer(volume.app, name="volume")
app.add_typer(audit.app, name="audit")
app.add_typer(mesh.app, name="mesh")
app.add_typer(k8s.app, name="k8s")
app.command("sconify")(sconify.sconify)


def _register_core() -> None:
    # The walking skeleton's groups; imported here so that each stays a small module.
    from cloister.cli import cas, keys, measure, run, session

    app.add_typer(keys.app, name="keys")
    app.add_typer(cas.app, name="cas")
    app.add_typer(session.app, name="session")
    from cloister.cli import explain

    session.app.command("explain")(explain.explain)
    app.command("measure")(measure.measure)
    app.command(
        "run",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(run.run)
    from cloister.cli import demo

    app.command("demo")(demo.demo)


_register_core()


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("CLOISTER_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Request lines would drown the one line an operator needs; they are the CAS's to log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app()
