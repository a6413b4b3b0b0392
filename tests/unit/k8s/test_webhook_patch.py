"""The webhook's pod rewrite and AdmissionReview handling, without a cluster.

The rewrite is checked by applying the JSONPatch the webhook returns to the original pod, as
the API server does; the CAS is a stand-in that knows one session.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloister import errors, protocol
from cloister.k8s import _patch, webhook

CONFIG = _patch.InjectConfig(
    cas_url="https://cas.cloister.svc:8081",
    cas_cert_pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    agent_image="cloister:test",
)


class FakeCas:
    """Knows session ``shop`` with services ``web`` and ``side``; or is unreachable."""

    url = "https://cas.test"

    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.asked: list[tuple[str, str]] = []

    def exists(self, session: str, service: str) -> protocol.ServiceExists:
        self.asked.append((session, service))
        if self.down:
            raise errors.BackendUnavailable("connection refused")
        if session != "shop":
            raise errors.NotFound("no", reason="no-such-session")
        if service not in ("web", "side"):
            raise errors.NotFound("no", reason="no-such-service")
        return protocol.ServiceExists(session=session, service=service, session_hash="00" * 32)


def apply_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/remove on object members: all the webhook emits."""
    out = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]
        ]
        target = out
        for p in parents:
            target = target[p]
        if op["op"] == "add":
            target[last] = op["value"]
        elif op["op"] == "remove":
            del target[last]
        else:
            raise AssertionError(f"unexpected op {op}")
    return out


def make_pod(annotations: dict[str, str] | None = None, **container: Any) -> dict[str, Any]:
    app = {"name": "app", "image": "nginx:1.27", "command": ["nginx"], "args": ["-g", "x"]}
    app.update(container)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-1",
            "namespace": "shop",
            "annotations": {
                "cloister.io/session": "shop",
                "cloister.io/service": "web",
                **(annotations or {}),
            },
        },
        "spec": {"containers": [{k: v for k, v in app.items() if v is not None}]},
    }


def admit(pod: dict[str, Any], cas: FakeCas | None = None) -> dict[str, Any]:
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0d9e-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": "shop",
            "object": pod,
        },
    }
    result = webhook.review(body, CONFIG, cas or FakeCas())  # type: ignore[arg-type]
    assert result["apiVersion"] == "admission.k8s.io/v1" and result["kind"] == "AdmissionReview"
    assert result["response"]["uid"] == "0d9e-1"
    response: dict[str, Any] = result["response"]
    return response


def mutated(pod: dict[str, Any]) -> dict[str, Any]:
    response = admit(pod)
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    return apply_patch(pod, json.loads(base64.b64decode(response["patch"])))


def test_the_container_starts_under_the_injected_agent() -> None:
    out = mutated(make_pod())
    (app,) = out["spec"]["containers"]
    assert app["command"] == [
        "/cloister/bin/cloister-run", "--session", "shop", "--service", "web",
        "--", "nginx", "-g", "x",
    ]  # fmt: skip
    assert "args" not in app
    env = {e["name"]: e["value"] for e in app["env"]}
    assert env == {
        "SCONE_CAS_ADDR": CONFIG.cas_url,
        "SCONE_CONFIG_ID": "shop/web",
        "CLOISTER_CAS_CERT": "/run/cloister-cas/cas.pem",
        "CLOISTER_HOME": "/run/cloister/.cloister",
    }
    (installer,) = out["spec"]["initContainers"]
    assert installer["image"] == "cloister:test"
    assert installer["securityContext"]["allowPrivilegeEscalation"] is False
    assert installer["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert volumes["cloister-files"] == {"name": "cloister-files", "emptyDir": {"medium": "Memory"}}
    assert volumes["cloister-agent"]["emptyDir"] == {}
    assert out["metadata"]["annotations"]["cloister.io/cas-certificate"] == CONFIG.cas_cert_pem
    assert "runtimeClassName" not in out["spec"]


def test_env_of_the_same_name_is_replaced_and_the_rest_kept() -> None:
    env = [{"name": "SCONE_CAS_ADDR", "value": "evil:1"}, {"name": "KEEP", "value": "1"}]
    (app,) = mutated(make_pod(env=env))["spec"]["containers"]
    names = [e["name"] for e in app["env"]]
    assert names.count("SCONE_CAS_ADDR") == 1 and "KEEP" in names
    assert {e["name"]: e["value"] for e in app["env"]}["SCONE_CAS_ADDR"] == CONFIG.cas_url


@pytest.mark.parametrize(
    ("tee", "runtime_class"), [("tdx", "kata-qemu-tdx"), ("snp", "kata-qemu-snp")]
)
def test_confidential_vms_get_their_runtime_class(tee: str, runtime_class: str) -> None:
    out = mutated(make_pod({"cloister.io/tee": tee}))
    assert out["spec"]["runtimeClassName"] == runtime_class
    assert "--simulation" not in out["spec"]["containers"][0]["command"]


def test_an_existing_runtime_class_is_kept() -> None:
    pod = make_pod({"cloister.io/tee": "tdx"})
    pod["spec"]["runtimeClassName"] = "my-tdx"
    assert mutated(pod)["spec"]["runtimeClassName"] == "my-tdx"


def test_sgx_adds_device_resources_without_overriding_the_owners() -> None:
    pod = make_pod({"cloister.io/tee": "sgx"}, resources={"limits": {"sgx.intel.com/epc": "1Gi"}})
    (app,) = mutated(pod)["spec"]["containers"]
    assert app["resources"]["limits"] == {
        "sgx.intel.com/epc": "1Gi",
        "sgx.intel.com/enclave": 1,
        "sgx.intel.com/provision": 1,
    }


def test_only_annotated_containers_are_rewritten() -> None:
    pod = make_pod({"cloister.io/service.side": "side", "cloister.io/command.side": "side --x"})
    pod["spec"]["containers"].append({"name": "side", "image": "side:1"})
    pod["spec"]["containers"].append({"name": "metrics", "image": "m:1", "command": ["m"]})
    pod["spec"]["initContainers"] = [{"name": "setup", "image": "s:1", "command": ["s"]}]
    cas = FakeCas()
    response = admit(pod, cas)
    out = apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    app, side, metrics = out["spec"]["containers"]
    assert app["command"][-3:] == ["nginx", "-g", "x"]
    assert side["command"][:5] == [
        "/cloister/bin/cloister-run",
        "--session",
        "shop",
        "--service",
        "side",
    ]
    assert side["command"][-3:] == ["--", "side", "--x"]
    assert metrics["command"] == ["m"] and "env" not in metrics
    installer, setup = out["spec"]["initContainers"]
    assert installer["name"] == "cloister-agent-install" and setup["command"] == ["s"]
    assert sorted(cas.asked) == [("shop", "side"), ("shop", "web")]


def test_a_mutated_pod_is_not_mutated_twice() -> None:
    once = mutated(make_pod())
    response = admit(once)
    assert response["allowed"] is True and "patch" not in response
    assert _patch.plan(once) is None


@pytest.mark.parametrize(
    "pod",
    [
        {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "a", "command": ["a"]}]}},
        make_pod({"cloister.io/inject": "false"}),
    ],
)
def test_pods_without_a_session_or_opted_out_pass_unchanged(pod: dict[str, Any]) -> None:
    cas = FakeCas()
    response = admit(pod, cas)
    assert response == {"uid": "0d9e-1", "allowed": True}
    assert cas.asked == []


def test_the_opt_out_label_is_honoured_too() -> None:
    pod = make_pod()
    pod["metadata"]["labels"] = {"cloister.io/inject": "false"}
    assert admit(pod) == {"uid": "0d9e-1", "allowed": True}


@pytest.mark.parametrize(
    ("pod", "message"),
    [
        (make_pod({"cloister.io/session": "nope"}), "session 'nope' does not exist"),
        (make_pod({"cloister.io/service": "db"}), "service 'db' does not exist in session 'shop'"),
        (make_pod(command=None), "container 'app' has no command"),
        (make_pod({"cloister.io/tee": "sev"}), "cloister.io/tee must be one of"),
        (make_pod({"cloister.io/files-path": "relative"}), "cloister.io/files-path must be"),
        (make_pod({"cloister.io/agent": "magic"}), "cloister.io/agent must be one of"),
        (make_pod({"cloister.io/service": ""}), "is empty"),
        (make_pod({"cloister.io/command": "[1, 2]"}, command=None), "is not a command"),
    ],
)
def test_refusals_name_the_pod_and_what_is_wrong(pod: dict[str, Any], message: str) -> None:
    response = admit(pod)
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    assert message in response["status"]["message"]
    assert response["status"]["message"].startswith("pod shop/web-1:")


def test_a_session_without_any_service_annotation_is_refused() -> None:
    pod = make_pod()
    del pod["metadata"]["annotations"]["cloister.io/service"]
    response = admit(pod)
    assert (
        response["allowed"] is False
        and "no container names a service" in (response["status"]["message"])
    )


def test_an_unreachable_cas_refuses_the_pod() -> None:
    response = admit(make_pod(), FakeCas(down=True))
    assert response["allowed"] is False
    assert "cannot check session 'shop'" in response["status"]["message"]


def test_an_entrypoint_annotation_may_be_shell_quoted() -> None:
    pod = make_pod({"cloister.io/command": "/bin/app --name 'a b'"}, command=None, args=["x"])
    (app,) = mutated(pod)["spec"]["containers"]
    assert app["command"][-4:] == ["/bin/app", "--name", "a b", "x"]


def test_a_generated_pod_name_is_named_by_its_prefix() -> None:
    pod = make_pod({"cloister.io/session": "nope"})
    del pod["metadata"]["name"]
    pod["metadata"]["generateName"] = "web-7f9c-"
    assert "pod shop/web-7f9c-*:" in admit(pod)["status"]["message"]


def test_other_kinds_and_operations_pass() -> None:
    body = {
        "kind": "AdmissionReview",
        "request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": "UPDATE", "object": {}},
    }
    assert webhook.review(body, CONFIG, FakeCas())["response"] == {  # type: ignore[arg-type]
        "uid": "u",
        "allowed": True,
    }
    with pytest.raises(ValueError, match="AdmissionReview"):
        webhook.review({"kind": "Pod"}, CONFIG, FakeCas())  # type: ignore[arg-type]


def test_json_patch_escapes_keys_and_removes_members() -> None:
    old = {"metadata": {"annotations": {"a/b": "1"}, "labels": {"x": "y"}}, "spec": {}}
    new = {"metadata": {"annotations": {"a/b": "2"}}, "spec": {"runtimeClassName": "k"}}
    ops = _patch.json_patch(old, new)
    assert {"op": "remove", "path": "/metadata/labels"} in ops
    assert apply_patch(old, ops) == new


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ldd") or not shutil.which("chroot"),
    reason="needs root, ldd and chroot",
)
def test_the_installed_agent_runs_where_there_is_nothing_but_a_shell(tmp_path: Path) -> None:
    """A chroot with /bin/sh and its libc, no Python: the launcher brings everything else."""
    from cloister.k8s import _launcher

    root = tmp_path / "root"
    sh = Path(os.path.realpath("/bin/sh"))
    (root / "bin").mkdir(parents=True)
    shutil.copy2(sh, root / "bin" / "sh")
    for line in subprocess.run(["ldd", str(sh)], capture_output=True, text=True).stdout.split("\n"):
        path = next((p for p in line.split() if p.startswith("/")), None)
        if path:
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    launcher = _launcher.install(root / "cloister")
    assert launcher == root / "cloister" / "bin" / "cloister-run"
    assert not list(root.glob("usr/**/python3*")), "the image must not provide Python"
    out = subprocess.run(
        [str(shutil.which("chroot")), str(root), "/cloister/bin/cloister-run", "--help"],
        capture_output=True,
        text=True,
        env={"PATH": "/bin"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Attest this workload" in out.stdout


# --- the operator's relay and the CLI's guard rails (no cluster, no CAS) ----------------------

SESSION = """name: shop
version: "0.3"
security: {attestation: {tolerate: [simulation]}}
services:
  - name: web
    attestation: [{tee: simulation, measurement: "ab"}]
"""


def test_the_relay_refuses_a_plain_http_cas_before_any_request() -> None:
    from cloister.k8s import operator

    config = operator.OperatorConfig(cas_url="https://cas:1", cas_cert_pem=b"unused")
    spec = {
        "session": SESSION.replace('"ab"', '"' + "ab" * 32 + '"'),
        "signatures": [{"publicKey": "ed25519:x", "signature": "eA=="}],
        "cas": "http://cas.evil:8081",
    }
    verdict = operator.relay(config, spec)
    assert verdict.accepted is False and verdict.reason == "insecure-cas-url"
    assert config._clients == {}


def test_the_relay_reports_an_invalid_document_with_the_loaders_reason() -> None:
    from cloister.k8s import operator

    config = operator.OperatorConfig(cas_url="https://cas:1", cas_cert_pem=b"unused")
    verdict = operator.relay(config, {"session": SESSION, "signatures": []})
    assert verdict.accepted is False and verdict.reason == "invalid-session"
    assert "measurement" in verdict.message and verdict.hash == ""


@pytest.mark.parametrize(
    "args",
    [
        ["operator", "--cas", "http://cas:8081", "--cas-cert", "/dev/null"],
        ["webhook", "--cas", "http://cas:8081", "--cert", "c", "--key", "k"],
    ],
)
def test_the_cli_refuses_a_cas_url_without_tls(args: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cloister", "k8s", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert "must be an https:// URL" in out.stderr


def test_the_operator_cli_needs_a_readable_certificate(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cloister", "k8s", "operator", "--cas", "https://cas:8081",
         "--cas-cert", str(tmp_path / "missing.pem")],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "CLOISTER_HOME": str(tmp_path)},
    )  # fmt: skip
    assert out.returncode == 2 and "cannot read the CAS certificate" in out.stderr
