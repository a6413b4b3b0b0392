"""The CRDs shipped in the package and in the Helm chart, and the chart's Grafana dashboard."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

CHART = Path(__file__).parents[3] / "deploy" / "helm" / "cloister"
CRD_FILES = ["cloistersessions.cloister.io.yaml", "cloistercas.cloister.io.yaml"]
METRICS = {
    "cloister_activations_total",
    "cloister_refusals_total",
    "cloister_verification_seconds",
    "cloister_store_seconds",
    "cloister_sessions_total",
}


def package_crd(name: str) -> str:
    return resources.files("cloister.k8s").joinpath("crds", name).read_text()


@pytest.mark.parametrize("name", CRD_FILES)
def test_chart_and_package_ship_the_same_crd(name: str) -> None:
    assert (CHART / "crds" / name).read_text() == package_crd(name)


def test_no_other_crds() -> None:
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(CRD_FILES)


def schema(name: str) -> dict[str, Any]:
    crd = yaml.safe_load(package_crd(name))
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    result: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return result


def walk(node: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            found.extend(walk(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(walk(value))
    return found


@pytest.mark.parametrize("name", CRD_FILES)
def test_schemas_are_structural_and_fit_kubernetes_1_20(name: str) -> None:
    s = schema(name)
    # CEL rules need Kubernetes 1.25; the test environment and older clusters lack them.
    assert "x-kubernetes-validations" not in package_crd(name)
    for node in walk(s["properties"]):
        if "properties" in node or "items" in node:
            assert node.get("type") in ("object", "array"), node


def test_session_spec_fields() -> None:
    spec = schema(CRD_FILES[0])["properties"]["spec"]
    assert spec["required"] == ["session", "signatures"]
    item = spec["properties"]["signatures"]["items"]
    assert item["required"] == ["publicKey", "signature"]
    status = schema(CRD_FILES[0])["properties"]["status"]["properties"]
    assert {"hash", "accepted", "reason", "observedGeneration", "conditions"} <= set(status)


def test_session_signature_patterns() -> None:
    item = schema(CRD_FILES[0])["properties"]["spec"]["properties"]["signatures"]["items"]
    key = re.compile(item["properties"]["publicKey"]["pattern"])
    sig = re.compile(item["properties"]["signature"]["pattern"])
    assert key.match("ed25519:" + "A" * 43 + "=")
    assert key.match("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n")
    assert not key.match("not a key")
    assert sig.match("QUJD+/==") and not sig.match("not base64!")


def test_cas_spec_fields() -> None:
    spec = schema(CRD_FILES[1])["properties"]["spec"]
    assert spec["required"] == ["url", "tee"]
    assert spec["properties"]["tee"]["enum"] == ["simulation", "sgx", "tdx", "snp"]


def test_dashboard_queries_the_cas_metrics() -> None:
    dashboard = json.loads((CHART / "dashboards" / "cloister-cas.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for m in METRICS if any(m in e for e in exprs)}
    assert used == METRICS
    # Histograms are read through their buckets.
    assert any("cloister_verification_seconds_bucket" in e for e in exprs)
    assert any("cloister_store_seconds_bucket" in e for e in exprs)
    assert any("by (result)" in e for e in exprs) and any("by (reason)" in e for e in exprs)
