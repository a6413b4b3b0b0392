"""The Helm chart: lint-clean, and its output accepted by a real API server."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from k8s_cluster import CHART, Cluster

pytestmark = pytest.mark.k8s

MEASUREMENT = "ab" * 48
VARIANTS = {
    "defaults": [],
    "sgx": ["--set", "tee.type=sgx", "--set", f"cas.measurement={'cd' * 32}"],
    "tdx-ha": [
        "--set", "tee.type=tdx",
        "--set", "cas.replicas=3",
        "--set", "cas.database.url=postgresql://cas:pw@db.example:5432/cloister",
    ],
    "snp-no-persistence": [
        "--set", "tee.type=snp",
        "--set", "cas.persistence.enabled=false",
        "--set", f"cas.measurement={MEASUREMENT}",
    ],
    "supplied-tls": [
        "--set", "webhook.tls.generate=false",
        "--set", "webhook.tls.existingSecret=my-webhook-tls",
        "--set", "webhook.tls.caBundle=-----BEGIN CERTIFICATE-----",
    ],
    "minimal": [
        "--set", "operator.enabled=false",
        "--set", "webhook.enabled=false",
        "--set", "networkPolicy.enabled=false",
        "--set", "metrics.grafanaDashboard.enabled=false",
    ],
}  # fmt: skip


def render(cluster: Cluster, namespace: str, *args: str) -> list[dict[str, Any]]:
    out = cluster.helm("template", "rel", str(CHART), "--namespace", namespace, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_helm_lint_is_clean(cluster: Cluster) -> None:
    for args in VARIANTS.values():
        proc = cluster.helm("lint", "--strict", str(CHART), *args)
        assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_chart_passes_server_side_dry_run(
    crds: Cluster, namespace: str, variant: str
) -> None:
    docs = render(crds, namespace, *VARIANTS[variant])
    proc = crds.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs)
    )
    assert proc.stdout.count("(server dry run)") == len(docs)


def test_tee_settings_reach_the_cas(cluster: Cluster) -> None:
    def cas_pod(*args: str) -> dict[str, Any]:
        sts = next(d for d in render(cluster, "ns", *args) if d["kind"] == "StatefulSet")
        spec: dict[str, Any] = sts["spec"]["template"]["spec"]
        return spec

    sim = cas_pod()
    assert "--simulation" in sim["containers"][0]["args"]
    sgx = cas_pod("--set", "tee.type=sgx")
    limits = sgx["containers"][0]["resources"]["limits"]
    assert limits["sgx.intel.com/enclave"] == 1 and "sgx.intel.com/epc" in limits
    assert "--simulation" not in sgx["containers"][0]["args"]
    assert cas_pod("--set", "tee.type=tdx")["runtimeClassName"] == "kata-qemu-tdx"
    assert cas_pod("--set", "tee.type=snp")["runtimeClassName"] == "kata-qemu-snp"


def test_database_url_stays_out_of_the_pod_spec(cluster: Cluster) -> None:
    url = "postgresql://cas:hunter2@db.example:5432/cloister"
    docs = render(cluster, "ns", "--set", "cas.replicas=2", "--set", f"cas.database.url={url}")
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    assert "hunter2" not in json.dumps(sts)
    assert any(d["kind"] == "PodDisruptionBudget" for d in docs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "cas.replicas=2"], "PostgreSQL"),
        (["--set", "tee.type=sev"], "tee.type"),
        (["--set", "webhook.tls.generate=false"], "webhook.tls"),
    ],
)
def test_inconsistent_values_are_refused(cluster: Cluster, args: list[str], message: str) -> None:
    proc = cluster.helm("template", "rel", str(CHART), *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr


def test_install_and_upgrade_keep_the_webhook_certificate(crds: Cluster, namespace: str) -> None:
    release = f"r{namespace[-8:]}"
    crds.helm("install", release, str(CHART), "--namespace", namespace)
    try:
        name = f"{release}-cloister-webhook"
        ca = crds.kubectl("get", "secret", "-n", namespace, f"{name}-tls", "-o", "json").stdout
        bundle = json.loads(
            crds.kubectl("get", "mutatingwebhookconfiguration", name, "-o", "json").stdout
        )["webhooks"][0]["clientConfig"]["caBundle"]
        assert json.loads(ca)["data"]["ca.crt"] == bundle
        crds.helm("upgrade", release, str(CHART), "--namespace", namespace)
        again = crds.kubectl("get", "secret", "-n", namespace, f"{name}-tls", "-o", "json").stdout
        assert json.loads(again)["data"] == json.loads(ca)["data"]
        cas = crds.kubectl("get", "cloistercas", "-n", namespace, "-o", "json").stdout
        (item,) = json.loads(cas)["items"]
        assert item["spec"]["tee"] == "simulation" and item["spec"]["simulation"] is True
    finally:
        crds.helm("uninstall", release, "--namespace", namespace, check=False)
