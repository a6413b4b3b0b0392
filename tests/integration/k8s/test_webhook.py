"""The admission webhook, registered with a real API server over HTTPS on loopback.

``cloister k8s webhook`` runs as a subprocess with a serving certificate from a test CA (IP SAN
127.0.0.1); a MutatingWebhookConfiguration points the API server at it for namespaces labelled
``cloister.io/injection=enabled``. The CAS is the ``cas`` fixture, holding one signed session.
Pods stay Pending (there is no kubelet): the assertions are on the stored pod spec.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import shutil
import socket
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
from k8s_cluster import Cluster, in_ci

from cloister import pki, protocol
from cloister.attestation import simulated
from cloister.client import CasClient, pin_path
from cloister.k8s import _launcher, _patch
from cloister.session import Session, public_key_of, signatures

pytestmark = pytest.mark.k8s

WAIT_SECONDS = 60.0
AGENT_IMAGE = "registry.example/cloister:test"
MEASUREMENT = "cd" * 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tls(directory: Path) -> tuple[Path, Path, bytes]:
    """A CA and a serving certificate for 127.0.0.1: (cert file, key file, CA PEM)."""
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    ca_key, ca = pki.new_ca("cloister webhook test CA", now=now, valid_for=day)
    key = pki.new_key()
    cert = pki.issue(
        ca_key=ca_key, ca_cert=ca, public_key=key.public_key(), common_name="127.0.0.1",
        usage="server", now=now, valid_for=day, ips=["127.0.0.1"],
    )  # fmt: skip
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, ca.public_bytes(serialization.Encoding.PEM)


def webhook_configuration(name: str, port: int, ca_pem: bytes) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [
                {
                    "name": "pods.webhook.cloister.io",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "failurePolicy": "Fail",
                    "reinvocationPolicy": "Never",
                    "timeoutSeconds": 15,
                    "clientConfig": {
                        "url": f"https://127.0.0.1:{port}/mutate",
                        "caBundle": base64.b64encode(ca_pem).decode(),
                    },
                    "rules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["pods"],
                            "scope": "Namespaced",
                        }
                    ],
                    # Opt-in per namespace, as the chart's values should select.
                    "namespaceSelector": {"matchLabels": {"cloister.io/injection": "enabled"}},
                    # Namespace names are unique per test: scope this registration to ours.
                    "objectSelector": {"matchLabels": {"webhook-test": name}},
                }
            ],
        }
    )


def pod(
    name: str,
    label: str,
    annotations: dict[str, str],
    *,
    command: list[str] | None = None,
    args: list[str] | None = None,
) -> str:
    container: dict[str, Any] = {"name": "app", "image": "python:3.11-slim"}
    if command is not None:
        container["command"] = command
    if args is not None:
        container["args"] = args
    container["env"] = [{"name": "APP_MODE", "value": "demo"}]
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": {"webhook-test": label},
                "annotations": annotations,
            },
            "spec": {"containers": [container]},
        }
    )


class Webhook:
    def __init__(self, cluster: Cluster, name: str, session: str) -> None:
        self.cluster = cluster
        self.name = name  # of the configuration, and the pods' label
        self.session = session

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        out = self.cluster.kubectl("get", "pod", "-n", namespace, name, "-o", "json").stdout
        result: dict[str, Any] = json.loads(out)
        return result


@pytest.fixture
def session_name(cas: Any) -> str:
    """A session with services web and worker, signed by the fixture's owner and in the CAS."""
    name = f"shop-{uuid.uuid4().hex[:8]}"
    text = f"""name: {name}
version: "0.3"
security: {{attestation: {{tolerate: [simulation]}}}}
services:
  - name: web
    attestation: [{{tee: simulation, measurement: "{MEASUREMENT}"}}]
  - name: worker
    attestation: [{{tee: simulation, measurement: "{MEASUREMENT}"}}]
"""
    key = serialization.load_pem_private_key((cas.home / "owner.key").read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    sig = signatures.sign(key, "create", Session.from_yaml(text).hash)
    pem = pin_path(cas.url, cas.home).read_bytes()
    with CasClient(cas.url, cert_pem=pem) as client:
        client.create_session(
            protocol.SignedSession(
                session=text,
                signatures=[
                    protocol.SessionSignature(public_key=public_key_of(key), signature=sig)
                ],
            )
        )
    return name


@pytest.fixture
def webhook(
    crds: Cluster, namespace: str, cas: Any, session_name: str, tmp_path: Path
) -> Iterator[Webhook]:
    crds.kubectl("label", "namespace", namespace, "cloister.io/injection=enabled")
    cert, key, ca_pem = make_tls(tmp_path)
    port = _free_port()
    log = tmp_path / "webhook.log"
    pin = str(pin_path(cas.url, cas.home))
    cmd = [sys.executable, "-m", "cloister", "k8s", "webhook", "--listen", f"127.0.0.1:{port}",
           "--cert", str(cert), "--key", str(key), "--cas", cas.url, "--cas-cert", pin,
           "--agent-image", AGENT_IMAGE]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=cas.env, stdout=out, stderr=subprocess.STDOUT)
    name = f"cloister-test-{uuid.uuid4().hex[:8]}"
    try:
        _wait_listening(port, proc, log)
        crds.kubectl("apply", "-f", "-", input=webhook_configuration(name, port, ca_pem))
        hook = Webhook(crds, name, session_name)
        _wait_registered(hook, namespace)
        yield hook
    finally:
        crds.kubectl("delete", "mutatingwebhookconfiguration", name, check=False)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the webhook exited with {proc.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"the webhook does not listen on {port}: {log.read_text()}")


def _wait_registered(hook: Webhook, namespace: str) -> None:
    """The API server picks up a new configuration asynchronously: probe with a dry run."""
    probe = pod(
        "probe",
        hook.name,
        {"cloister.io/session": hook.session, "cloister.io/service": "web"},
        command=["/bin/true"],
    )
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        out = hook.cluster.kubectl(
            "create", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-",
            input=probe, check=False,
        )  # fmt: skip
        if out.returncode == 0:
            annotations = json.loads(out.stdout)["metadata"].get("annotations", {})
            if annotations.get("cloister.io/injected") == "true":
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"the webhook was not called within {WAIT_SECONDS} s: {out}")
        time.sleep(0.3)


def test_an_annotated_pod_starts_under_the_agent(webhook: Webhook, namespace: str) -> None:
    annotations = {
        "cloister.io/session": webhook.session,
        "cloister.io/service": "web",
        "cloister.io/tee": "simulation",
    }
    webhook.cluster.kubectl(
        "apply", "-n", namespace, "-f", "-",
        input=pod("web", webhook.name, annotations,
                  command=["python3", "-m", "http.server"], args=["8080"]),
    )  # fmt: skip
    got = webhook.get_pod(namespace, "web")
    spec = got["spec"]
    (app,) = spec["containers"]
    assert app["command"] == [
        "/cloister/bin/cloister-run", "--session", webhook.session, "--service", "web",
        "--simulation", "--", "python3", "-m", "http.server", "8080",
    ]  # fmt: skip
    assert "args" not in app
    env = {e["name"]: e.get("value") for e in app["env"]}
    assert env["APP_MODE"] == "demo"
    assert env["SCONE_CONFIG_ID"] == f"{webhook.session}/web"
    assert env["SCONE_CAS_ADDR"].startswith("https://127.0.0.1:")
    assert env["CLOISTER_CAS_CERT"] == "/run/cloister-cas/cas.pem"

    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["cloister-files"]["emptyDir"] == {"medium": "Memory"}
    mounts = {m["name"]: m for m in app["volumeMounts"]}
    assert mounts["cloister-files"]["mountPath"] == "/run/cloister"
    assert mounts["cloister-cas"]["readOnly"] is True
    assert mounts["cloister-agent"]["mountPath"] == "/cloister"

    # The pinned CAS certificate (public) reaches the pod through its own annotation.
    cert_annotation = got["metadata"]["annotations"]["cloister.io/cas-certificate"]
    assert cert_annotation.startswith("-----BEGIN CERTIFICATE-----")
    item = volumes["cloister-cas"]["projected"]["sources"][0]["downwardAPI"]["items"][0]
    assert item["fieldRef"]["fieldPath"] == "metadata.annotations['cloister.io/cas-certificate']"

    (installer,) = spec["initContainers"]
    assert installer["image"] == AGENT_IMAGE
    assert installer["command"] == ["cloister", "k8s", "install-agent", "/cloister"]
    assert got["metadata"]["annotations"]["cloister.io/injected"] == "true"


def test_tee_resources_files_path_and_an_entrypoint_from_the_annotation(
    webhook: Webhook, namespace: str
) -> None:
    annotations = {
        "cloister.io/session": webhook.session,
        "cloister.io/service": "worker",
        "cloister.io/tee": "sgx",
        "cloister.io/agent": "image",
        "cloister.io/files-path": "/etc/worker",
        "cloister.io/command": '["/usr/local/bin/worker", "--serve"]',
    }
    webhook.cluster.kubectl(
        "apply", "-n", namespace, "-f", "-",
        input=pod("worker", webhook.name, annotations, args=["--port", "9000"]),
    )  # fmt: skip
    spec = webhook.get_pod(namespace, "worker")["spec"]
    (app,) = spec["containers"]
    assert app["command"] == [
        "cloister", "run", "--session", webhook.session, "--service", "worker", "--",
        "/usr/local/bin/worker", "--serve", "--port", "9000",
    ]  # fmt: skip
    assert app["resources"]["limits"]["sgx.intel.com/epc"] == "512Mi"
    assert app["resources"]["limits"]["sgx.intel.com/enclave"] == "1"
    mounts = {m["name"]: m["mountPath"] for m in app["volumeMounts"]}
    assert mounts["cloister-files"] == "/etc/worker"
    assert "cloister-agent" not in mounts and not spec.get("initContainers")


def test_a_pod_of_an_unknown_session_is_refused_by_name(webhook: Webhook, namespace: str) -> None:
    annotations = {"cloister.io/session": "no-such-shop", "cloister.io/service": "web"}
    out = webhook.cluster.kubectl(
        "apply", "-n", namespace, "-f", "-",
        input=pod("ghost", webhook.name, annotations, command=["/bin/true"]), check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert "denied the request" in out.stderr
    assert "session 'no-such-shop' does not exist" in out.stderr
    assert f"{namespace}/ghost" in out.stderr
    absent = webhook.cluster.kubectl("get", "pod", "-n", namespace, "ghost", check=False)
    assert absent.returncode != 0


def test_a_pod_of_an_unknown_service_is_refused_by_name(webhook: Webhook, namespace: str) -> None:
    annotations = {"cloister.io/session": webhook.session, "cloister.io/service": "db"}
    out = webhook.cluster.kubectl(
        "apply", "-n", namespace, "-f", "-",
        input=pod("db", webhook.name, annotations, command=["/bin/true"]), check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert f"service 'db' does not exist in session '{webhook.session}'" in out.stderr


def test_a_pod_without_a_command_is_refused_naming_the_container(
    webhook: Webhook, namespace: str
) -> None:
    annotations = {"cloister.io/session": webhook.session, "cloister.io/service": "web"}
    out = webhook.cluster.kubectl(
        "apply", "-n", namespace, "-f", "-",
        input=pod("nocmd", webhook.name, annotations), check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert "container 'app' has no command" in out.stderr
    assert "cloister.io/command.app" in out.stderr


def test_opted_out_pods_and_other_namespaces_are_left_alone(
    webhook: Webhook, namespace: str
) -> None:
    opted_out = {
        "cloister.io/session": "no-such-shop",
        "cloister.io/service": "web",
        "cloister.io/inject": "false",
    }
    webhook.cluster.kubectl(
        "apply", "-n", namespace, "-f", "-",
        input=pod("plain", webhook.name, opted_out, command=["/bin/true"]),
    )  # fmt: skip
    plain = webhook.get_pod(namespace, "plain")
    assert plain["spec"]["containers"][0]["command"] == ["/bin/true"]
    assert "cloister.io/injected" not in plain["metadata"]["annotations"]

    # A namespace without cloister.io/injection=enabled never reaches the webhook: even a
    # session that does not exist passes unchanged.
    other = webhook.cluster.create_namespace()
    try:
        annotations = {"cloister.io/session": "no-such-shop", "cloister.io/service": "web"}
        webhook.cluster.kubectl(
            "apply", "-n", other, "-f", "-",
            input=pod("elsewhere", webhook.name, annotations, command=["/bin/true"]),
        )  # fmt: skip
        got = webhook.get_pod(other, "elsewhere")
        assert got["spec"]["containers"][0]["command"] == ["/bin/true"]
    finally:
        webhook.cluster.delete_namespace(other)


def _shell_only_root(root: Path) -> None:
    """A root file system with /bin/sh and the libraries it links to, and nothing else."""
    sh = Path(os.path.realpath("/bin/sh"))
    (root / "bin").mkdir(parents=True)
    shutil.copy2(sh, root / "bin" / "sh")
    ldd = subprocess.run(["ldd", str(sh)], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        path = next((p for p in line.split() if p.startswith("/")), None)
        if path:
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


@pytest.mark.slow
def test_a_rewritten_container_attests_and_runs_with_its_configuration(
    cas: Any, tmp_path: Path
) -> None:
    """The rewrite's own command and env, run the way a kubelet would, in an image without
    Python: the agent from the init container attests, writes the injected file into the
    memory volume's path, and execs the original command with the session's environment."""
    if os.geteuid() != 0 or not shutil.which("ldd") or not shutil.which("chroot"):
        message = "needs root, ldd and chroot to stand in for a container"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    root = tmp_path / "root"
    _shell_only_root(root)
    _launcher.install(root / "cloister")  # what the init container does in /cloister
    measurement = simulated.measure_files([root / "bin" / "sh"]).hex()
    name = f"shop-{uuid.uuid4().hex[:8]}"
    text = f"""name: {name}
version: "0.3"
security: {{attestation: {{tolerate: [simulation]}}}}
services:
  - name: app
    image_name: app
    environment: {{APP_SECRET: $$SCONE::secret$$}}
    attestation: [{{tee: simulation, measurement: "{measurement}"}}]
secrets:
  - {{name: secret, kind: ascii, size: 16}}
images:
  - name: app
    injection_files:
      - {{path: /run/cloister/app.conf, content: "token=$$SCONE::secret$$"}}
"""
    key = serialization.load_pem_private_key((cas.home / "owner.key").read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    pem = pin_path(cas.url, cas.home).read_bytes()
    with CasClient(cas.url, cert_pem=pem) as client:
        sig = signatures.sign(key, "create", Session.from_yaml(text).hash)
        client.create_session(
            protocol.SignedSession(
                session=text,
                signatures=[
                    protocol.SessionSignature(public_key=public_key_of(key), signature=sig)
                ],
            )
        )

    # Shell builtins only: the "image" has no cat.
    # (read fails at a last line without newline, but still sets c.)
    script = (
        'echo "$APP_SECRET" > /out/env; { read -r c || true; } < /run/cloister/app.conf; '
        'echo "$c" > /out/conf'
    )
    app_cmd = ["/bin/sh", "-c", script]
    pod_doc = yaml.safe_load(
        pod("app", "x", {"cloister.io/session": name, "cloister.io/service": "app",
                         "cloister.io/tee": "simulation"}, command=app_cmd)
    )  # fmt: skip
    config = _patch.InjectConfig(cas_url=cas.url, cas_cert_pem=pem.decode(), agent_image="x")
    plan = _patch.plan(pod_doc, "ns")
    assert plan is not None
    out = _patch.mutate(pod_doc, plan, config)
    (container,) = out["spec"]["containers"]

    # The kubelet's part: volumes at their mount paths, the projected certificate, the env.
    for mount in container["volumeMounts"]:
        (root / mount["mountPath"].lstrip("/")).mkdir(parents=True, exist_ok=True)
    cert = out["metadata"]["annotations"]["cloister.io/cas-certificate"]
    (root / "run" / "cloister-cas" / "cas.pem").write_text(cert)
    (root / "out").mkdir()
    # PATH and HOME as container runtimes set them (HOME=/ for a user without a home).
    env = {"PATH": "/bin", "HOME": "/"} | {e["name"]: e["value"] for e in container["env"]}
    run = subprocess.run(
        [str(shutil.which("chroot")), str(root), *container["command"]],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    secret = (root / "out" / "env").read_text().strip()
    assert len(secret) == 16
    assert (root / "out" / "conf").read_text().strip() == f"token={secret}"
