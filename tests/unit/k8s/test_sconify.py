"""sconify: the rewrite of Kubernetes YAML and the session skeleton it produces."""

from __future__ import annotations

import base64
import copy
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from cloister.cli import sconify as sconify_cli
from cloister.k8s import sconify
from cloister.session import Session

SAMPLE = Path(__file__).parents[2] / "integration" / "k8s" / "data" / "webapp.yaml"

# Every value of the sample's Secrets, as written there.
SECRET_VALUES = [
    "s3cr3t-db-Passw0rd",
    "app-user-7f3a",
    "tok-9d1e2c4b8a7f6e5d",
    "MIIBfakecertificateforthesconifytestsonlyAAAA",
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQDfakeprivatekey",
]
# Hex measurements of the right size for each TEE, to fill the skeleton in.
FILLED = {"simulation": "ab" * 32, "sgx": "cd" * 32, "tdx": "ef" * 48, "snp": "12" * 48}


def sample_docs() -> list[dict[str, Any]]:
    return sconify.load_documents(SAMPLE.read_text())


def run(tee: str = "simulation", docs: list[dict[str, Any]] | None = None) -> sconify.Result:
    return sconify.sconify(sample_docs() if docs is None else docs, tee=tee, session="shop/app")


def by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(i for i in items if i["name"] == name)


def workload(result: sconify.Result, kind: str, name: str) -> dict[str, Any]:
    return next(d for d in result.manifests if d["kind"] == kind and d["metadata"]["name"] == name)


def pod_spec(result: sconify.Result, kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = workload(result, kind, name)["spec"]["template"]["spec"]
    return spec


def annotations(result: sconify.Result, kind: str, name: str) -> dict[str, str]:
    ann: dict[str, str] = workload(result, kind, name)["spec"]["template"]["metadata"][
        "annotations"
    ]
    return ann


# --- no secret reaches Kubernetes ----------------------------------------------------------


@pytest.mark.parametrize("tee", sconify.TEES)
def test_kubernetes_output_holds_no_secret_value(tee: str) -> None:
    result = run(tee)
    text = sconify.dump_documents(result.manifests)
    for value in SECRET_VALUES:
        assert value not in text
        assert base64.b64encode(value.encode()).decode() not in text
    # The sample's base64 data as written in the input, too.
    assert "czNjcjN0LWRiLVBhc3N3MHJk" not in text


def test_configmaps_and_secrets_are_removed() -> None:
    kinds = [d["kind"] for d in run().manifests]
    assert "Secret" not in kinds and "ConfigMap" not in kinds
    assert sorted(kinds) == ["Deployment", "Service", "Service", "StatefulSet"]


def test_no_reference_to_a_removed_object_remains() -> None:
    text = sconify.dump_documents(run().manifests)
    for ref in ("secretKeyRef", "configMapKeyRef", "secretRef", "configMapRef", "secretName"):
        assert ref not in text
    assert "web-config" not in text and "db-credentials" not in text


def test_last_applied_configuration_is_dropped() -> None:
    docs = sample_docs()
    dep = next(d for d in docs if d["kind"] == "Deployment")
    dep["metadata"]["annotations"] = {
        "kubectl.kubernetes.io/last-applied-configuration": '{"password": "s3cr3t-db-Passw0rd"}'
    }
    assert "s3cr3t" not in sconify.dump_documents(run(docs=docs).manifests)


# --- the session skeleton -------------------------------------------------------------------


def test_secret_values_move_into_the_session_as_explicit_secrets() -> None:
    secrets = run().session["secrets"]
    assert by_name(secrets, "db-credentials-password") == {
        "name": "db-credentials-password",
        "kind": "ascii",
        "value": "s3cr3t-db-Passw0rd",
    }
    assert by_name(secrets, "web-tls-tls.key")["value"].startswith("-----BEGIN PRIVATE KEY")
    # One session secret per Secret key, however often it is used; plus the mesh's CA, since
    # web's configuration names the db Service (a mesh.egress rule).
    assert len(secrets) == len({s["name"] for s in secrets}) == 6
    assert by_name(secrets, "mesh-ca")["kind"] == "x509-ca"


def test_environment_comes_from_values_configmaps_and_secrets() -> None:
    web = by_name(run().session["services"], "web")
    env = web["environment"]
    assert env["DATABASE_URL"] == "postgresql://db:5432/app"
    assert env["LOG_LEVEL"] == "info"
    assert env["DB_PASSWORD"] == "$$SCONE::db-credentials-password$$"
    assert env["APP_api-token"] == "$$SCONE::db-credentials-api-token$$"
    db = by_name(run().session["services"], "db")
    assert db["environment"]["GREETING"] == "hello from the config map"
    assert db["environment"]["POSTGRES_USER"] == "$$SCONE::db-credentials-username$$"


def test_downward_api_environment_stays_with_kubernetes() -> None:
    result = run()
    env = pod_spec(result, "Deployment", "web")["containers"][0]["env"]
    assert env == [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    assert "POD_IP" not in by_name(result.session["services"], "web")["environment"]
    assert "env" not in pod_spec(result, "StatefulSet", "db")["containers"][0]
    assert "envFrom" not in pod_spec(result, "StatefulSet", "db")["containers"][0]


def test_mounted_files_become_injection_files() -> None:
    session = run().session
    web = by_name(session["services"], "web")
    files = {f["path"]: f["content"] for f in by_name(session["images"], "web")["injection_files"]}
    assert web["image_name"] == "web"
    assert "listen 8080;" in files["/etc/nginx/nginx.conf"]  # a subPath mount: that file only
    assert files["/etc/tls/tls.crt"] == "$$SCONE::web-tls-tls.crt$$"
    assert files["/etc/tls/tls.key"] == "$$SCONE::web-tls-tls.key$$"
    assert "image_name" not in by_name(session["services"], "db")


def test_volumes_become_memory_backed() -> None:
    spec = pod_spec(run(), "Deployment", "web")
    # The subPath-only volume is gone; the directory mount is now memory.
    assert spec["volumes"] == [{"name": "tls", "emptyDir": {"medium": "Memory"}}]
    assert spec["containers"][0]["volumeMounts"] == [{"name": "tls", "mountPath": "/etc/tls"}]
    # Other volumes are untouched.
    db = pod_spec(run(), "StatefulSet", "db")["containers"][0]
    assert db["volumeMounts"] == [{"name": "data", "mountPath": "/var/lib/postgresql/data"}]


def test_command_pwd_and_attestation() -> None:
    services = run("sgx").session["services"]
    web, db = by_name(services, "web"), by_name(services, "db")
    assert web["command"] == ["nginx", "-g", "daemon off;"]
    assert "command" not in db
    assert web["pwd"] == "/" and db["pwd"] == "/var/lib/postgresql"
    assert web["attestation"] == [{"tee": "sgx", "mrenclave": sconify.FILL_IN}]


def test_a_command_without_quoting_is_one_string() -> None:
    docs = sample_docs()
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    container["args"] = ["-c", "/etc/nginx/nginx.conf"]
    web = by_name(run(docs=docs).session["services"], "web")
    assert web["command"] == "nginx -c /etc/nginx/nginx.conf"


@pytest.mark.parametrize(("tee", "key"), sorted(sconify.MEASUREMENT_KEYS.items()))
def test_measurement_key_per_tee_and_fill_in_list(tee: str, key: str) -> None:
    result = run(tee)
    for service in result.session["services"]:
        assert service["attestation"] == [{"tee": tee, key: sconify.FILL_IN}]
    assert len(result.fill_in) == 2
    assert all(f".attestation[0].{key}" in item for item in result.fill_in)


def test_only_simulation_tolerates_simulation() -> None:
    assert run("simulation").session["security"] == {"attestation": {"tolerate": ["simulation"]}}
    for tee in ("sgx", "tdx", "snp"):
        assert "security" not in run(tee).session


@pytest.mark.parametrize("tee", sconify.TEES)
def test_filled_in_skeleton_is_a_valid_session(tee: str) -> None:
    result = run(tee)
    text = sconify.dump_session(result.session).replace(sconify.FILL_IN, FILLED[tee])
    session = Session.from_yaml(text)
    assert session.name == "shop/app"


# --- annotations and TEE resources ----------------------------------------------------------


def test_workloads_are_annotated() -> None:
    result = run()
    assert annotations(result, "Deployment", "web") == {
        "cloister.io/session": "shop/app",
        "cloister.io/service": "web",
        "cloister.io/egress": "db=5432",
    }
    assert annotations(result, "StatefulSet", "db") == {
        "cloister.io/session": "shop/app",
        "cloister.io/service": "db",
    }


def test_sgx_gets_device_plugin_resources() -> None:
    limits = pod_spec(run("sgx"), "Deployment", "web")["containers"][0]["resources"]["limits"]
    assert limits == {
        "sgx.intel.com/epc": "512Mi",
        "sgx.intel.com/enclave": 1,
        "sgx.intel.com/provision": 1,
    }
    assert "runtimeClassName" not in pod_spec(run("sgx"), "Deployment", "web")


@pytest.mark.parametrize("tee", ["tdx", "snp"])
def test_confidential_vms_get_a_runtime_class(tee: str) -> None:
    spec = pod_spec(run(tee), "StatefulSet", "db")
    assert spec["runtimeClassName"] == f"kata-qemu-{tee}"
    assert "resources" not in spec["containers"][0]
    custom = sconify.sconify(sample_docs(), tee=tee, session="s", runtime_class="my-cc")
    assert pod_spec(custom, "StatefulSet", "db")["runtimeClassName"] == "my-cc"


def test_simulation_adds_no_tee_resources() -> None:
    spec = pod_spec(run("simulation"), "Deployment", "web")
    assert "runtimeClassName" not in spec and "resources" not in spec["containers"][0]


def test_several_containers_get_one_service_each() -> None:
    docs = sample_docs()
    spec = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    spec["containers"].append({"name": "sidecar", "image": "busybox", "command": ["sleep", "1d"]})
    result = run(docs=docs)
    names = [s["name"] for s in result.session["services"]]
    assert names[:2] == ["web-web", "web-sidecar"]
    ann = annotations(result, "Deployment", "web")
    assert ann["cloister.io/service"] == "web-web"
    assert ann["cloister.io/service.sidecar"] == "web-sidecar"


# --- unusual input --------------------------------------------------------------------------


def test_a_secret_missing_from_the_input_is_left_to_fill_in() -> None:
    docs = [d for d in sample_docs() if d["metadata"]["name"] != "db-credentials"]
    result = run(docs=docs)
    assert by_name(result.session["secrets"], "db-credentials-password") == {
        "name": "db-credentials-password",
        "kind": "ascii",
        "value": sconify.FILL_IN,
    }
    assert any("db-credentials-password" in item for item in result.fill_in)


def test_binary_secret_values_are_hex() -> None:
    docs = sample_docs()
    secret = next(d for d in docs if d["metadata"]["name"] == "db-credentials")
    secret["data"]["password"] = base64.b64encode(b"\x00\xff\x10").decode()
    entry = by_name(run(docs=docs).session["secrets"], "db-credentials-password")
    assert entry == {"name": "db-credentials-password", "kind": "binary", "value": "00ff10"}


def test_the_input_is_not_modified() -> None:
    docs = sample_docs()
    before = copy.deepcopy(docs)
    run(docs=docs)
    assert docs == before


def test_other_kinds_pass_through_with_a_note() -> None:
    extra = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "x"}}
    result = run(docs=[*sample_docs(), extra])
    assert extra in result.manifests
    assert any("PersistentVolumeClaim x" in n for n in result.notes)


def test_lists_are_unpacked() -> None:
    text = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": sample_docs()})
    assert sconify.load_documents(text) == sample_docs()


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "apiVersion: v1\n"])
def test_non_objects_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="Kubernetes object"):
        sconify.load_documents(text)


def test_bad_base64_is_refused() -> None:
    docs = sample_docs()
    next(d for d in docs if d["metadata"]["name"] == "db-credentials")["data"]["password"] = "!!"
    with pytest.raises(ValueError, match="not valid base64"):
        run(docs=docs)


@pytest.mark.parametrize(
    ("tee", "session"), [("sev", "app"), ("sgx", ""), ("sgx", "/abs"), ("sgx", "a b")]
)
def test_bad_arguments_are_refused(tee: str, session: str) -> None:
    with pytest.raises(ValueError):
        sconify.sconify(sample_docs(), tee=tee, session=session)


# --- the command ------------------------------------------------------------------------------


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(sconify_cli.sconify)
    return app


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli(), list(args))


def test_command_writes_both_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = invoke("-f", str(SAMPLE), "--tee", "tdx", "--session", "app", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert "services[web].attestation[0].mrtd" in res.output
    manifests = sconify.load_documents((out / "kubernetes.yaml").read_text())
    assert {d["kind"] for d in manifests} == {"Service", "Deployment", "StatefulSet"}
    session = yaml.safe_load((out / "session.yaml").read_text())
    assert session["name"] == "app" and session["version"] == "0.3"
    assert stat.S_IMODE(os.stat(out / "session.yaml").st_mode) == 0o600
    for value in SECRET_VALUES:
        assert value not in (out / "kubernetes.yaml").read_text()


def test_command_refuses_to_overwrite(tmp_path: Path) -> None:
    args = ["-f", str(SAMPLE), "--tee", "sgx", "--session", "app", "-o", str(tmp_path)]
    assert invoke(*args).exit_code == 0
    again = invoke(*args)
    assert again.exit_code == 2 and "--force" in again.output
    assert invoke(*args, "--force").exit_code == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--tee", "sev", "--session", "app"],
        ["--tee", "sgx", "--session", "bad name"],
    ],
)
def test_command_usage_errors(tmp_path: Path, args: list[str]) -> None:
    res = invoke("-f", str(SAMPLE), *args, "-o", str(tmp_path))
    assert res.exit_code == 2
    assert not (tmp_path / "session.yaml").exists()


def test_command_reports_unreadable_input(tmp_path: Path) -> None:
    res = invoke("-f", str(tmp_path / "missing.yaml"), "--tee", "sgx", "--session", "a")
    assert res.exit_code == 2


def test_command_reads_stdin(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        cli(),
        ["-f", "-", "--tee", "snp", "--session", "app", "-o", str(tmp_path)],
        input=SAMPLE.read_text(),
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "kubernetes.yaml").exists()


def test_file_modes_become_permissions() -> None:
    docs = sample_docs()
    spec = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    spec["volumes"][1]["secret"]["defaultMode"] = 0o440
    spec["volumes"][1]["secret"]["items"] = [
        {"key": "tls.key", "path": "tls.key", "mode": 0o400},
        {"key": "tls.crt", "path": "tls.crt"},
    ]
    files = by_name(run(docs=docs).session["images"], "web")["injection_files"]
    perms = {f["path"]: f.get("permission") for f in files}
    assert perms == {
        "/etc/nginx/nginx.conf": None,
        "/etc/tls/tls.key": "0400",
        "/etc/tls/tls.crt": "0440",
    }


def test_service_names_are_unique() -> None:
    docs = sample_docs()
    twin = copy.deepcopy(next(d for d in docs if d["kind"] == "StatefulSet"))
    twin["kind"] = "Deployment"
    twin["spec"].pop("serviceName")
    twin["spec"].pop("volumeClaimTemplates")
    twin["spec"]["template"]["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    result = run(docs=[*docs, twin])
    names = [s["name"] for s in result.session["services"]]
    assert names == ["web", "db", "db-deployment"]
    assert annotations(result, "Deployment", "db")["cloister.io/service"] == "db-deployment"


def test_init_containers_are_services_too() -> None:
    docs = sample_docs()
    spec = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    spec["initContainers"] = [{"name": "migrate", "image": "app", "command": ["migrate"]}]
    result = run(docs=docs)
    ann = annotations(result, "StatefulSet", "db")
    assert ann["cloister.io/service"] == "db-postgres"
    assert ann["cloister.io/service.migrate"] == "db-migrate"
    assert {"db-migrate", "db-postgres"} <= {s["name"] for s in result.session["services"]}


def test_kubernetes_variable_references_get_a_note() -> None:
    docs = sample_docs()
    spec = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    spec["containers"][0]["env"].append({"name": "X", "value": "$(POSTGRES_USER)-x"})
    assert any("$(VAR)" in n for n in run(docs=docs).notes)


@pytest.mark.parametrize(
    "doc",
    [
        {"kind": "Deployment", "metadata": {"name": "x"}, "spec": None},
        {"kind": "Deployment", "metadata": {"name": "x"}, "spec": {"template": {"spec": []}}},
        {
            "kind": "Pod",
            "metadata": {"name": "x"},
            "spec": {
                "containers": [{"name": "c", "volumeMounts": [{"name": "v"}]}],
                "volumes": [{"name": "v", "configMap": {"name": "web-config"}}],
            },
        },
        {"kind": "Secret", "metadata": {"name": "x"}, "data": ["not", "a", "map"]},
    ],
)
def test_malformed_objects_are_refused_with_their_name(doc: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=f"{doc['kind']} x is malformed"):
        run(docs=[*sample_docs(), doc])


def test_args_without_command_leave_the_entrypoint_to_fill_in() -> None:
    docs = sample_docs()
    container = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"][
        "containers"
    ][0]
    container["args"] = ["-c", "max_connections=50"]
    result = run(docs=docs)
    db = by_name(result.session["services"], "db")
    assert db["command"] == [sconify.FILL_IN, "-c", "max_connections=50"]
    assert any(i.startswith("services[db].command[0]") for i in result.fill_in)
