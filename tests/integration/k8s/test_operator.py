"""The CloisterSession operator against a real API server and a real CAS.

The operator runs as ``cloister k8s operator`` (a subprocess, watching one namespace) and
trusts the CAS by the certificate that ``cloister cas attest`` pinned. The owner key of the
``cas`` fixture signs; a stranger's key and a bogus signature show that neither Kubernetes nor
the operator can make the CAS take a session its owner did not sign.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from k8s_cluster import CHART, Cluster

from cloister import errors, protocol
from cloister.client import CasClient, pin_path
from cloister.session import Session, public_key_of, signatures

pytestmark = pytest.mark.k8s

WAIT_SECONDS = 90.0
MEASUREMENT = "ab" * 32


def document(name: str, *, predecessor: str | None = None, command: str = "/bin/true") -> str:
    text = f"""name: {name}
version: "0.3"
security: {{attestation: {{tolerate: [simulation]}}}}
services:
  - name: web
    command: {command}
    attestation: [{{tee: simulation, measurement: "{MEASUREMENT}"}}]
"""
    if predecessor is not None:
        text += f'predecessor: "{predecessor}"\n'
    return text


def signed(text: str, key: ed25519.Ed25519PrivateKey, operation: str) -> list[dict[str, str]]:
    digest = Session.from_yaml(text).hash
    return [{"publicKey": public_key_of(key), "signature": signatures.sign(key, operation, digest)}]


def resource(name: str, text: str, sigs: list[dict[str, str]]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "cloister.io/v1alpha1",
            "kind": "CloisterSession",
            "metadata": {"name": name},
            "spec": {"session": text, "signatures": sigs},
        }
    )


def apply(cluster: Cluster, namespace: str, manifest: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)


def get(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "-n", namespace, "cloistersession", name, "-o", "json").stdout
    result: dict[str, Any] = json.loads(out)
    return result


def wait_status(
    cluster: Cluster, namespace: str, name: str, operator: OperatorProcess
) -> dict[str, Any]:
    """The status once it reports the resource's current generation (bounded wait)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        obj = get(cluster, namespace, name)
        status = obj.get("status") or {}
        generation = obj["metadata"]["generation"]
        if status.get("observedGeneration") == generation and "accepted" in status:
            return dict(status)
        operator.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no status for generation {generation} of {name} within {WAIT_SECONDS} s: "
                f"{status}\n--- operator log ---\n{operator.log_tail()}"
            )
        time.sleep(0.3)


def wait_events(
    cluster: Cluster, namespace: str, reason: str, operator: OperatorProcess
) -> list[dict[str, Any]]:
    """The events with ``reason`` in ``namespace``, once there is one (bounded wait)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        out = cluster.kubectl(
            "get", "events", "-n", namespace, "--field-selector", f"reason={reason}",
            "-o", "json",
        ).stdout  # fmt: skip
        items: list[dict[str, Any]] = json.loads(out)["items"]
        if items:
            return items
        operator.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"no {reason} event:\n{operator.log_tail()}")
        time.sleep(0.3)


class OperatorProcess:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def log_tail(self) -> str:
        return "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-40:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the operator exited with {self.proc.returncode}:\n{self.log_tail()}"
            )


@pytest.fixture
def owner_key(cas: Any) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key((cas.home / "owner.key").read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key


@pytest.fixture
def cas_client(cas: Any) -> Iterator[CasClient]:
    with CasClient(cas.url, cert_pem=pin_path(cas.url, cas.home).read_bytes()) as client:
        yield client


@contextlib.contextmanager
def running_operator(
    kubeconfig: str, env: dict[str, str], namespace: str, cas: Any, log: Path
) -> Iterator[OperatorProcess]:
    env = dict(env, KUBECONFIG=kubeconfig, CLOISTER_HOME=str(cas.home))
    env.pop("CLOISTER_CAS_CERT", None)
    cmd = [sys.executable, "-m", "cloister", "k8s", "operator", "--cas", cas.url,
           "--cas-cert", str(pin_path(cas.url, cas.home)), "--namespace", namespace]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    op = OperatorProcess(proc, log)
    try:
        yield op
        op.check_alive()  # refusals never crash the operator
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def operator(crds: Cluster, namespace: str, cas: Any, tmp_path: Path) -> Iterator[OperatorProcess]:
    with running_operator(
        crds.kubeconfig, crds.env, namespace, cas, tmp_path / "operator.log"
    ) as op:
        yield op


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_a_signed_session_is_created_in_the_cas_and_reported(
    crds: Cluster,
    namespace: str,
    operator: OperatorProcess,
    owner_key: ed25519.Ed25519PrivateKey,
    cas_client: CasClient,
) -> None:
    name = unique("shop")
    text = document(name)
    apply(crds, namespace, resource("app", text, signed(text, owner_key, "create")))
    status = wait_status(crds, namespace, "app", operator)
    digest = Session.from_yaml(text).hash
    assert status["accepted"] is True
    assert status["hash"] == digest
    assert "reason" not in status
    (condition,) = status["conditions"]
    assert condition["type"] == "Accepted" and condition["status"] == "True"
    assert condition["reason"] == "created"
    # The CAS, not the status, is the authority: it holds exactly this document.
    assert cas_client.exists(name, "web").session_hash == digest


def test_an_edit_is_forwarded_as_an_update(
    crds: Cluster,
    namespace: str,
    operator: OperatorProcess,
    owner_key: ed25519.Ed25519PrivateKey,
    cas_client: CasClient,
) -> None:
    name = unique("shop")
    first = document(name)
    apply(crds, namespace, resource("app", first, signed(first, owner_key, "create")))
    first_hash = wait_status(crds, namespace, "app", operator)["hash"]

    second = document(name, predecessor=first_hash, command="/bin/false")
    apply(crds, namespace, resource("app", second, signed(second, owner_key, "update")))
    status = wait_status(crds, namespace, "app", operator)
    second_hash = Session.from_yaml(second).hash
    assert status["observedGeneration"] == 2
    assert status["accepted"] is True and status["hash"] == second_hash
    assert status["conditions"][0]["reason"] == "updated"
    assert "version 2" in status["conditions"][0]["message"]
    assert cas_client.exists(name, "web").session_hash == second_hash


def test_an_unsigned_session_is_refused_with_the_cas_reason(
    crds: Cluster,
    namespace: str,
    operator: OperatorProcess,
    owner_key: ed25519.Ed25519PrivateKey,
    cas_client: CasClient,
) -> None:
    name = unique("shop")
    text = document(name)
    # Well-formed, but no signature verifies: e.g. one made for another operation.
    bogus = base64.b64encode(os.urandom(64)).decode()
    sigs = [
        {"publicKey": public_key_of(owner_key), "signature": bogus},
        *signed(text, owner_key, "update"),
    ]
    apply(crds, namespace, resource("app", text, sigs))
    status = wait_status(crds, namespace, "app", operator)
    assert status["accepted"] is False
    assert status["reason"] == "unsigned"
    assert status["hash"] == Session.from_yaml(text).hash
    condition = status["conditions"][0]
    assert condition["status"] == "False" and condition["reason"] == "unsigned"
    assert "signature" in condition["message"]
    with pytest.raises(errors.NotFound):
        cas_client.exists(name, "web")


def test_an_update_signed_by_a_stranger_is_refused_and_the_session_is_unchanged(
    crds: Cluster,
    namespace: str,
    operator: OperatorProcess,
    owner_key: ed25519.Ed25519PrivateKey,
    cas_client: CasClient,
) -> None:
    name = unique("shop")
    first = document(name)
    apply(crds, namespace, resource("app", first, signed(first, owner_key, "create")))
    first_hash = wait_status(crds, namespace, "app", operator)["hash"]

    # Whoever controls the cluster can write any spec, but cannot sign as the owner.
    stranger = ed25519.Ed25519PrivateKey.generate()
    forged = document(name, predecessor=first_hash, command="/bin/sh")
    apply(crds, namespace, resource("app", forged, signed(forged, stranger, "update")))
    status = wait_status(crds, namespace, "app", operator)
    assert status["observedGeneration"] == 2
    assert status["accepted"] is False
    assert status["reason"] == "not-authorized"
    assert status["hash"] == Session.from_yaml(forged).hash
    assert cas_client.exists(name, "web").session_hash == first_hash

    # A refusal is final for its generation, not the resource: a signed edit goes through.
    fixed = document(name, predecessor=first_hash, command="/bin/sh")
    apply(crds, namespace, resource("app", fixed, signed(fixed, owner_key, "update")))
    status = wait_status(crds, namespace, "app", operator)
    assert status["observedGeneration"] == 3 and status["accepted"] is True
    assert cas_client.exists(name, "web").session_hash == Session.from_yaml(fixed).hash


def test_an_invalid_document_is_refused_without_a_retry_loop(
    crds: Cluster, namespace: str, operator: OperatorProcess, owner_key: ed25519.Ed25519PrivateKey
) -> None:
    text = "name: broken\nversion: '0.3'\nservices: [{name: web}]\n"
    sigs = [{"publicKey": public_key_of(owner_key), "signature": "c2lnbmF0dXJl"}]
    apply(crds, namespace, resource("app", text, sigs))
    status = wait_status(crds, namespace, "app", operator)
    assert status["accepted"] is False and status["reason"] == "invalid-session"
    assert "invalid" in status["conditions"][0]["message"]
    # Final for this generation: kopf was told not to retry (PermanentError), and said so.
    assert "failed permanently" in operator.log.read_text()
    assert "failed temporarily" not in operator.log.read_text()
    events = wait_events(crds, namespace, "SessionRefused", operator)
    assert events[0]["type"] == "Warning"
    assert events[0]["message"].startswith("invalid-session:")


def test_a_session_already_in_the_cas_is_reported_accepted(
    crds: Cluster,
    namespace: str,
    operator: OperatorProcess,
    owner_key: ed25519.Ed25519PrivateKey,
    cas_client: CasClient,
) -> None:
    """Uploaded before (by the CLI, or by an operator that crashed before writing status)."""
    name = unique("shop")
    text = document(name)
    sigs = signed(text, owner_key, "create")
    cas_client.create_session(
        protocol.SignedSession(
            session=text,
            signatures=[
                protocol.SessionSignature(public_key=s["publicKey"], signature=s["signature"])
                for s in sigs
            ],
        )
    )
    apply(crds, namespace, resource("app", text, sigs))
    status = wait_status(crds, namespace, "app", operator)
    assert status["accepted"] is True and status["conditions"][0]["reason"] == "current"
    assert status["hash"] == Session.from_yaml(text).hash


def test_deleting_the_resource_leaves_the_session_in_the_cas(
    crds: Cluster,
    namespace: str,
    operator: OperatorProcess,
    owner_key: ed25519.Ed25519PrivateKey,
    cas_client: CasClient,
) -> None:
    name = unique("shop")
    text = document(name)
    apply(crds, namespace, resource("app", text, signed(text, owner_key, "create")))
    status = wait_status(crds, namespace, "app", operator)
    assert status["accepted"] is True
    digest = status["hash"]
    obj = get(crds, namespace, "app")
    assert not obj["metadata"].get("finalizers"), "the operator must never block a deletion"
    crds.kubectl("delete", "-n", namespace, "cloistersession", "app", "--wait=true")

    events = wait_events(crds, namespace, "SessionKept", operator)
    assert name in events[0]["message"] and "stays in the CAS" in events[0]["message"]
    assert cas_client.exists(name, "web").session_hash == digest


def _service_account_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> None:
    """A kubeconfig for ``account``, with a token from the TokenRequest API."""
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(cluster.kubeconfig))
    try:
        token = api.create_namespaced_service_account_token(
            account, namespace, {"spec": {"expirationSeconds": 3600}}
        ).status.token
    finally:
        api.api_client.close()
    kubeconfig = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    for user in kubeconfig["users"]:
        user["user"] = {"token": token}
    path.write_text(yaml.safe_dump(kubeconfig))


def test_the_operator_needs_no_more_than_the_charts_rbac(
    crds: Cluster,
    namespace: str,
    cas: Any,
    owner_key: ed25519.Ed25519PrivateKey,
    cas_client: CasClient,
    tmp_path: Path,
) -> None:
    """Read sessions, patch their status, create events: nothing that could change a spec."""
    rendered = yaml.safe_load_all(
        crds.helm("template", "rel", str(CHART), "--namespace", namespace).stdout
    )
    role = next(
        d for d in rendered
        if d and d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-operator")
    )  # fmt: skip
    writes = {
        (resource, verb)
        for rule in role["rules"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        if verb not in ("get", "list", "watch")
    }
    assert writes == {
        ("cloistersessions/status", "patch"),
        ("cloistercas/status", "patch"),
        ("events", "create"),
    }
    role_name = unique("cloister-operator-test")
    role["metadata"] = {"name": role_name}
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": role_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": namespace}],
    }  # fmt: skip
    crds.kubectl("create", "serviceaccount", "-n", namespace, "operator")
    crds.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([role, binding]))
    try:
        kubeconfig = tmp_path / "operator.kubeconfig"
        _service_account_kubeconfig(crds, namespace, "operator", kubeconfig)
        denied = subprocess.run(
            ["kubectl", "--kubeconfig", str(kubeconfig), "auth", "can-i", "update",
             "cloistersessions.cloister.io", "-n", namespace],
            capture_output=True, text=True, env=crds.env, timeout=60,
        )  # fmt: skip
        assert denied.stdout.strip() == "no"

        with running_operator(
            str(kubeconfig), crds.env, namespace, cas, tmp_path / "operator.log"
        ) as op:
            name = unique("shop")
            first = document(name)
            apply(crds, namespace, resource("app", first, signed(first, owner_key, "create")))
            status = wait_status(crds, namespace, "app", op)
            assert status["accepted"] is True
            second = document(name, predecessor=status["hash"], command="/bin/false")
            apply(crds, namespace, resource("app", second, signed(second, owner_key, "update")))
            status = wait_status(crds, namespace, "app", op)
            assert status["accepted"] is True and status["observedGeneration"] == 2
            assert "Forbidden" not in op.log.read_text()
        assert cas_client.exists(name, "web").session_hash == Session.from_yaml(second).hash
    finally:
        crds.kubectl("delete", "clusterrolebinding,clusterrole", role_name, check=False)


def test_an_unreachable_cas_is_retried_until_it_decides(
    crds: Cluster,
    namespace: str,
    operator: OperatorProcess,
    cas: Any,
    owner_key: ed25519.Ed25519PrivateKey,
) -> None:
    cas.stop()
    name = unique("shop")
    text = document(name)
    apply(crds, namespace, resource("app", text, signed(text, owner_key, "create")))
    status = wait_status(crds, namespace, "app", operator)
    assert status["accepted"] is False and status["reason"] == "backend-unavailable"
    assert status["conditions"][0]["status"] == "Unknown"
    assert status["hash"] == Session.from_yaml(text).hash

    cas.start()  # same data and identity: the pin still holds
    deadline = time.monotonic() + WAIT_SECONDS
    while not status.get("accepted"):
        operator.check_alive()
        assert time.monotonic() < deadline, f"never accepted: {status}\n{operator.log_tail()}"
        time.sleep(0.5)
        status = get(crds, namespace, "app").get("status") or {}
    assert status["conditions"][0]["reason"] == "created"
    assert "reason" not in status
    assert "failed temporarily" in operator.log.read_text()
