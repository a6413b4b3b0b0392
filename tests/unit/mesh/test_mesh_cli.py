"""`cloister mesh check`: validates a configuration and loads its TLS material."""

from __future__ import annotations

import json
from pathlib import Path

from meshpki import TestCA, write_files
from typer.testing import CliRunner

from cloister.cli import mesh as mesh_cli


def _config(tmp_path: Path, tls: dict[str, str]) -> Path:
    path = tmp_path / "mesh.json"
    path.write_text(
        json.dumps(
            {
                "identity": "api.demo",
                "tls": tls,
                "ingress": [{"port": 8443, "app_port": 8080, "allow_from": ["web.demo"]}],
                "egress": [{"port": 15432, "target": "db.demo.svc:5432", "peer": "db.demo"}],
            }
        )
    )
    return path


def test_check_prints_what_the_mesh_enforces(tmp_path: Path) -> None:
    ca = TestCA()
    path = _config(tmp_path, write_files(tmp_path, "api", ca.issue("api.demo"), ca))
    result = CliRunner().invoke(mesh_cli.app, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "ingress 0.0.0.0:8443 -> 127.0.0.1:8080 allow_from web.demo" in result.output
    assert "egress  127.0.0.1:15432 -> db.demo.svc:5432 peer db.demo" in result.output


def test_check_refuses_a_key_that_does_not_match(tmp_path: Path) -> None:
    ca = TestCA()
    tls = write_files(tmp_path, "api", ca.issue("api.demo"), ca)
    Path(tls["key_file"]).write_bytes(ca.issue("web.demo").key_pem)
    result = CliRunner().invoke(mesh_cli.app, ["check", "--config", str(_config(tmp_path, tls))])
    assert result.exit_code == 1
    assert "invalid-mesh-tls" in result.output


def test_check_reports_an_unreadable_file_as_usage(tmp_path: Path) -> None:
    result = CliRunner().invoke(mesh_cli.app, ["check", "--config", str(tmp_path / "none")])
    assert result.exit_code == 2
