"""sconify's output for a sample application, applied to a real API server."""

from __future__ import annotations

import base64
import json

import pytest
from k8s_cluster import DATA, Cluster

from cloister.k8s import sconify

pytestmark = pytest.mark.k8s

SAMPLE = DATA / "webapp.yaml"


def secret_values() -> list[str]:
    values = []
    for doc in sconify.load_documents(SAMPLE.read_text()):
        if doc["kind"] == "Secret":
            values += [base64.b64decode(v).decode() for v in doc.get("data", {}).values()]
            values += list(doc.get("stringData", {}).values())
    # Whole values, and each line of multi-line ones but PEM armour (the cluster's own CA
    # bundle has that too).
    lines = [line for v in values for line in v.splitlines() if not line.startswith("-----")]
    return values + lines


def test_the_sample_itself_is_valid(crds: Cluster, namespace: str) -> None:
    crds.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(SAMPLE))


@pytest.mark.parametrize("tee", sconify.TEES)
def test_sconified_sample_applies_and_holds_no_secret(
    crds: Cluster, namespace: str, tee: str
) -> None:
    docs = sconify.load_documents(SAMPLE.read_text())
    result = sconify.sconify(docs, tee=tee, session="shop/webapp")
    crds.kubectl(
        "apply", "-n", namespace, "-f", "-", input=sconify.dump_documents(result.manifests)
    )
    # Everything the namespace now holds, as the API server returns it.
    stored = crds.kubectl(
        "get",
        "-n",
        namespace,
        "deployments,statefulsets,services,configmaps,secrets",
        "-o",
        "json",
    ).stdout
    for value in secret_values():
        assert value not in stored
        assert base64.b64encode(value.encode()).decode() not in stored
    items = json.loads(stored)["items"]
    assert not [i for i in items if i["kind"] == "Secret"]
    # Only the cluster's own CA bundle (published by kube-controller-manager) may be there.
    assert {i["metadata"]["name"] for i in items if i["kind"] == "ConfigMap"} <= {
        "kube-root-ca.crt"
    }
    web = next(i for i in items if i["kind"] == "Deployment")
    annotations = web["spec"]["template"]["metadata"]["annotations"]
    assert annotations["cloister.io/session"] == "shop/webapp"
    assert annotations["cloister.io/service"] == "web"
