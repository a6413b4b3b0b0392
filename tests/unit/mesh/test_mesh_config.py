"""Load-time validation of the mesh configuration: one test per invariant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cloister import errors
from cloister.mesh import EgressRule, IngressRule, MeshConfig, ServiceIdentity, TlsMaterial

KEY = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0IGtleSBtYXRlcmlhbA==\n-----END PRIVATE KEY-----\n"


def doc(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "identity": "api.demo",
        "tls": {"cert_file": "/run/cloister/api.crt", "key_pem": KEY, "ca_file": "/run/ca.pem"},
        "ingress": [{"port": 8443, "app_port": 8080, "allow_from": ["web.demo"]}],
        "egress": [{"port": 15432, "target": "db.demo.svc:5432", "peer": "db.demo"}],
    }
    base.update(overrides)
    return base


def test_a_full_document_loads_and_round_trips() -> None:
    cfg = MeshConfig.from_json(json.dumps(doc()))
    assert cfg.identity == ServiceIdentity("api", "demo")
    assert cfg.ingress[0].allow_from == (ServiceIdentity("web", "demo"),)
    assert str(cfg.ingress[0].bind) == "0.0.0.0"
    assert str(cfg.ingress[0].app_host) == "127.0.0.1"
    assert (cfg.egress[0].target_host, cfg.egress[0].target_port) == ("db.demo.svc", 5432)
    assert cfg.limits.max_connections == 1024
    again = MeshConfig.model_validate_json(cfg.model_dump_json())
    assert again.identity == cfg.identity and again.ingress == cfg.ingress


def test_identities_may_be_objects() -> None:
    cfg = MeshConfig.model_validate(doc(identity={"service": "api", "session": "org/shop"}))
    assert cfg.identity.dns_name == "api.org.shop"


def test_models_are_frozen() -> None:
    cfg = MeshConfig.model_validate(doc())
    with pytest.raises(ValidationError):
        cfg.identity = ServiceIdentity("x", "y")  # type: ignore[misc]


@pytest.mark.parametrize("host", ["10.0.0.5", "0.0.0.0", "::", "192.168.1.1"])
def test_ingress_forwards_only_to_loopback(host: str) -> None:
    with pytest.raises(ValidationError, match="not a loopback address"):
        IngressRule(port=1, app_port=2, allow_from=("web.demo",), app_host=host)


def test_ingress_upstream_must_be_a_literal_address() -> None:
    with pytest.raises(ValidationError, match="literal IP"):
        IngressRule(port=1, app_port=2, allow_from=("web.demo",), app_host="localhost")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1"])
def test_loopback_upstreams_are_accepted(host: str) -> None:
    rule = IngressRule(port=1, app_port=2, allow_from=("web.demo",), app_host=host)
    assert rule.app_host.is_loopback


def test_egress_listens_only_on_loopback() -> None:
    with pytest.raises(ValidationError, match="not a loopback address"):
        EgressRule(port=1, target="db.demo:5432", peer="db.demo", bind="0.0.0.0")


def test_an_empty_allow_from_is_an_error_not_a_deny_all() -> None:
    with pytest.raises(ValidationError):
        IngressRule(port=1, app_port=2, allow_from=())


@pytest.mark.parametrize("target", ["db.demo", "db.demo:0", "db.demo:99999", ":80", "::1:80"])
def test_targets_are_host_and_port(target: str) -> None:
    with pytest.raises(ValidationError):
        EgressRule(port=1, target=target, peer="db.demo")


def test_ipv6_targets_use_brackets() -> None:
    rule = EgressRule(port=1, target="[::1]:443", peer="db.demo")
    assert (rule.target_host, rule.target_port) == ("::1", 443)


def test_ports_are_not_shared() -> None:
    with pytest.raises(errors.SessionError, match="more than one listener"):
        MeshConfig.from_json(
            json.dumps(doc(egress=[{"port": 8443, "target": "db:1", "peer": "db.demo"}]))
        )


def test_a_configuration_without_rules_is_refused() -> None:
    with pytest.raises(errors.SessionError, match="at least one"):
        MeshConfig.from_json(json.dumps(doc(ingress=[], egress=[])))


@pytest.mark.parametrize(
    "tls",
    [
        {"key_pem": KEY, "ca_file": "/ca"},  # no certificate
        {"cert_file": "/c", "cert_pem": "x", "key_pem": KEY, "ca_file": "/ca"},  # two
    ],
)
def test_each_piece_of_tls_material_is_given_once(tls: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="exactly one of"):
        TlsMaterial.model_validate(tls)


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(errors.SessionError, match="Extra inputs"):
        MeshConfig.from_json(json.dumps(doc(allow_everyone=True)))


def test_errors_never_echo_the_private_key() -> None:
    bad = doc()
    bad["tls"]["key_pem"] = KEY + "x" * (300 * 1024)  # too long, so the key field fails
    with pytest.raises(errors.SessionError) as info:
        MeshConfig.from_json(json.dumps(bad))
    assert "PRIVATE KEY" not in str(info.value) and "c2VjcmV0" not in str(info.value)
    cfg = MeshConfig.model_validate(doc())
    assert "c2VjcmV0" not in repr(cfg) and "c2VjcmV0" not in str(cfg)


def test_oversized_and_malformed_documents_are_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.SessionError, match="too large"):
        MeshConfig.from_json(b" " * (1024 * 1024 + 1))
    with pytest.raises(errors.SessionError, match="not JSON"):
        MeshConfig.from_json("{")
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps(doc()))
    assert MeshConfig.from_file(path).identity.service == "api"
