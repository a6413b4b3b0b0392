"""The CRDs on a real API server: they install, accept valid resources and refuse invalid ones."""

from __future__ import annotations

import json

import pytest
import yaml
from k8s_cluster import Cluster

pytestmark = pytest.mark.k8s

KEY = "ed25519:" + "A" * 43 + "="
SIG = "c2lnbmF0dXJl"
SESSION = "name: shop/app\nversion: '0.3'\n"


def session_cr(name: str, **spec: object) -> str:
    body = {"session": SESSION, "signatures": [{"publicKey": KEY, "signature": SIG}]}
    body.update(spec)
    return yaml.safe_dump(
        {
            "apiVersion": "cloister.io/v1alpha1",
            "kind": "CloisterSession",
            "metadata": {"name": name},
            "spec": {k: v for k, v in body.items() if v is not None},
        }
    )


def cas_cr(name: str, **spec: object) -> str:
    body: dict[str, object] = {"url": "http://cloister-cas.cloister.svc:8081", "tee": "sgx"}
    body.update(spec)
    return yaml.safe_dump(
        {
            "apiVersion": "cloister.io/v1alpha1",
            "kind": "CloisterCAS",
            "metadata": {"name": name},
            "spec": {k: v for k, v in body.items() if v is not None},
        }
    )


def test_crds_are_established(crds: Cluster) -> None:
    out = crds.kubectl("get", "crd", "-o", "json").stdout
    names = {item["metadata"]["name"] for item in json.loads(out)["items"]}
    assert {"cloistersessions.cloister.io", "cloistercas.cloister.io"} <= names
    kinds = crds.kubectl("api-resources", "--api-group=cloister.io", "-o", "name").stdout
    assert "cloistersessions.cloister.io" in kinds and "cloistercas.cloister.io" in kinds


def test_a_valid_session_is_stored_and_its_status_can_be_reported(
    crds: Cluster, namespace: str
) -> None:
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=session_cr("app"))
    status = {"status": {"hash": "ab" * 32, "accepted": True, "observedGeneration": 1}}
    crds.kubectl(
        "patch",
        "-n",
        namespace,
        "cloistersession",
        "app",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    got = json.loads(crds.kubectl("get", "-n", namespace, "clsession", "app", "-o", "json").stdout)
    assert got["status"]["accepted"] is True and got["status"]["hash"] == "ab" * 32
    assert got["spec"]["session"] == SESSION
    # Status is a subresource: a spec update cannot set it.
    got["status"]["accepted"] = False
    crds.kubectl("replace", "-n", namespace, "-f", "-", input=json.dumps(got))
    again = json.loads(
        crds.kubectl("get", "-n", namespace, "clsession", "app", "-o", "json").stdout
    )
    assert again["status"]["accepted"] is True


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"signatures": None}, "signatures"),
        ({"signatures": []}, "signatures"),
        ({"session": ""}, "session"),
        ({"signatures": [{"publicKey": KEY}]}, "signature"),
        ({"signatures": [{"publicKey": KEY, "signature": "not base64!"}]}, "signature"),
        ({"signatures": [{"publicKey": "rsa:abc", "signature": SIG}]}, "publicKey"),
        ({"cas": "ftp://cas"}, "cas"),
        ({"session": 42}, "session"),
    ],
)
def test_an_invalid_session_is_refused_by_the_schema(
    crds: Cluster, namespace: str, spec: dict[str, object], field: str
) -> None:
    proc = crds.kubectl(
        # --validate=false: the API server's schema must refuse it, not kubectl.
        "create",
        "--validate=false",
        "-n",
        namespace,
        "-f",
        "-",
        input=session_cr("bad", **spec),
        check=False,
    )
    assert proc.returncode != 0
    assert "Invalid value" in proc.stderr or "Required value" in proc.stderr, proc.stderr
    assert field in proc.stderr


def test_a_valid_cas_is_stored(crds: Cluster, namespace: str) -> None:
    crds.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=cas_cr("cas", measurement="ab" * 32, simulation=False),
    )
    got = json.loads(crds.kubectl("get", "-n", namespace, "clcas", "cas", "-o", "json").stdout)
    assert got["spec"]["tee"] == "sgx"


def test_cas_simulation_defaults_to_false(crds: Cluster, namespace: str) -> None:
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=cas_cr("cas"))
    got = json.loads(crds.kubectl("get", "-n", namespace, "clcas", "cas", "-o", "json").stdout)
    assert got["spec"]["simulation"] is False


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"tee": "sev"}, "tee"),
        ({"url": None}, "url"),
        ({"url": "cas:8081"}, "url"),
        ({"measurement": "xyz"}, "measurement"),
        ({"measurement": "ab" * 20}, "measurement"),
    ],
)
def test_an_invalid_cas_is_refused_by_the_schema(
    crds: Cluster, namespace: str, spec: dict[str, object], field: str
) -> None:
    proc = crds.kubectl(
        "create",
        "--validate=false",
        "-n",
        namespace,
        "-f",
        "-",
        input=cas_cr("bad", **spec),
        check=False,
    )
    assert proc.returncode != 0
    assert "is invalid" in proc.stderr and field in proc.stderr, proc.stderr
