"""The pod rewrite of the admission webhook, as pure functions over plain dicts.

``plan`` reads a pod's annotations and decides which containers run under the agent, for which
session and service; ``mutate`` returns the rewritten pod; ``json_patch`` turns the difference
into the RFC 6902 operations an AdmissionReview response carries. Nothing here talks to the
CAS or to Kubernetes: ``cloister.k8s.webhook`` does that.

Annotations read (on the pod):

======================================  =====================================================
``cloister.io/session``                 the session; without it the pod is left alone
``cloister.io/service``                 the service of the pod's first container
``cloister.io/service.<container>``     the service of that container (regular or init)
``cloister.io/command[.<container>]``   the image entrypoint, for a container without
                                        ``command`` (JSON list, or a shell-quoted string)
``cloister.io/files-path``              mount point of the memory volume for injected files
                                        (default ``/run/cloister``)
``cloister.io/tee``                     ``sgx`` (device resources), ``tdx`` / ``snp`` (runtime
                                        class), ``simulation`` (``--simulation``: protects
                                        nothing)
``cloister.io/agent``                   ``inject`` (default): an init container copies the
                                        agent into the pod; ``image``: the image has
                                        ``cloister`` on its PATH
``cloister.io/inject: "false"``         opt out (as a label or an annotation)
``cloister.io/egress``                  ``db=5432,cache=6379``: upstreams the mesh's egress
                                        carries (``cloister sconify`` writes it); each target
                                        container gets ``CLOISTER_EGRESS_<NAME>=127.0.0.1:<port>``
                                        naming the loopback port of its ``mesh.egress`` rule
``cloister.io/mesh-ports``              ``8443,9443``: the mesh's ingress ports, declared as
                                        container ports of the pod's main container
``cloister.io/volumes-root``            where encrypted volumes keep their files (a PVC mount);
                                        ``CLOISTER_VOLUMES_ROOT`` for the agent
======================================  =====================================================

What the rewrite adds: a memory-backed ``emptyDir`` for injected files; a projected volume
with the pinned CAS certificate (public; carried in the pod's own
``cloister.io/cas-certificate`` annotation and projected by the downward API, so the webhook
needs no API access); ``SCONE_CAS_ADDR``, ``SCONE_CONFIG_ID``, ``CLOISTER_CAS_CERT`` and
``CLOISTER_HOME`` in each target container; each target container's command becomes
``<agent> run --session S --service SVC [--simulation] -- <original command and args>``; and
the ``cloister.io/injected`` annotation, so a pod is never rewritten twice.

Kubernetes is untrusted (DESIGN §1): nothing added here is secret, and nothing here decides
what a workload receives. A workload that is not rewritten simply gets no configuration.
"""

from __future__ import annotations

import copy
import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cloister import errors
from cloister.k8s import sconify

__all__ = ["InjectConfig", "Plan", "Target", "json_patch", "mutate", "plan"]

PREFIX: Final = "cloister.io/"
ANN_SESSION: Final = "cloister.io/session"
ANN_SERVICE: Final = "cloister.io/service"
ANN_COMMAND: Final = "cloister.io/command"
ANN_FILES_PATH: Final = "cloister.io/files-path"
ANN_TEE: Final = "cloister.io/tee"
ANN_AGENT: Final = "cloister.io/agent"
ANN_INJECT: Final = "cloister.io/inject"
ANN_INJECTED: Final = "cloister.io/injected"
ANN_CAS_CERT: Final = "cloister.io/cas-certificate"
ANN_EGRESS: Final = sconify.ANNOTATION_EGRESS
ANN_MESH_PORTS: Final = "cloister.io/mesh-ports"
ANN_VOLUMES_ROOT: Final = "cloister.io/volumes-root"
EGRESS_ENV_PREFIX: Final = "CLOISTER_EGRESS_"
MAX_MESH_PORTS: Final = 64

DEFAULT_FILES_PATH: Final = "/run/cloister"
AGENT_DIR: Final = "/cloister"
LAUNCHER: Final = AGENT_DIR + "/bin/cloister-run"
CAS_CERT_DIR: Final = "/run/cloister-cas"
CAS_CERT_FILE: Final = "cas.pem"
VOLUME_FILES: Final = "cloister-files"
VOLUME_AGENT: Final = "cloister-agent"
VOLUME_CAS: Final = "cloister-cas"
INSTALLER: Final = "cloister-agent-install"
OUR_VOLUMES: Final = frozenset({VOLUME_FILES, VOLUME_AGENT, VOLUME_CAS})
OUR_ENV: Final = ("SCONE_CAS_ADDR", "SCONE_CONFIG_ID", "CLOISTER_CAS_CERT", "CLOISTER_HOME")
AGENT_MODES: Final = ("inject", "image")


def _refuse(message: str) -> errors.Error:
    return errors.Error(message, reason="not-injectable")


@dataclass(frozen=True)
class InjectConfig:
    """The webhook's settings: what every rewritten pod is told and given."""

    cas_url: str
    cas_cert_pem: str
    agent_image: str
    runtime_classes: Mapping[str, str] = field(
        default_factory=lambda: dict(sconify.RUNTIME_CLASSES)
    )
    sgx_resources: Mapping[str, Any] = field(default_factory=lambda: dict(sconify.SGX_RESOURCES))


@dataclass(frozen=True)
class Target:
    """One container that will start under the agent."""

    container: str
    init: bool
    service: str
    argv: tuple[str, ...]  # the original command and args


@dataclass(frozen=True)
class Plan:
    pod: str  # namespace/name, for messages
    session: str
    targets: tuple[Target, ...]
    files_path: str
    tee: str | None
    agent: str
    egress: Mapping[str, int] = field(default_factory=dict)  # upstream → loopback port
    mesh_ports: tuple[int, ...] = ()
    volumes_root: str | None = None

    @property
    def services(self) -> list[str]:
        return sorted({t.service for t in self.targets})


def pod_label(pod: Mapping[str, Any], namespace: str | None = None) -> str:
    meta = pod.get("metadata") or {}
    name = meta.get("name") or (f"{meta['generateName']}*" if meta.get("generateName") else "?")
    ns = meta.get("namespace") or namespace
    return f"{ns}/{name}" if ns else str(name)


def plan(pod: Mapping[str, Any], namespace: str | None = None) -> Plan | None:
    """What to do with ``pod``: ``None`` leaves it alone; a refusal raises ``errors.Error``."""
    meta = pod.get("metadata") or {}
    annotations: Mapping[str, str] = meta.get("annotations") or {}
    labels: Mapping[str, str] = meta.get("labels") or {}
    if ANN_SESSION not in annotations:
        return None
    opt_out = (annotations.get(ANN_INJECT, ""), labels.get(ANN_INJECT, ""))
    if "false" in (str(v).strip().lower() for v in opt_out):
        return None
    spec = pod.get("spec") or {}
    if ANN_INJECTED in annotations or any(
        v.get("name") in OUR_VOLUMES for v in spec.get("volumes") or []
    ):
        return None  # already rewritten: never twice
    who = pod_label(pod, namespace)
    session = str(annotations[ANN_SESSION]).strip()
    if not session:
        raise _refuse(f"pod {who}: annotation {ANN_SESSION} is empty")
    targets = _targets(who, spec, annotations)
    if not targets:
        raise _refuse(
            f"pod {who}: annotation {ANN_SESSION} is set but no container names a service; "
            f"set {ANN_SERVICE} (first container) or {ANN_SERVICE}.<container>"
        )
    files_path = str(annotations.get(ANN_FILES_PATH, DEFAULT_FILES_PATH)).strip()
    if not files_path.startswith("/") or ":" in files_path or files_path == "/":
        raise _refuse(f"pod {who}: {ANN_FILES_PATH} must be an absolute path below /")
    tee = annotations.get(ANN_TEE)
    if tee is not None and tee not in sconify.TEES:
        raise _refuse(f"pod {who}: {ANN_TEE} must be one of {', '.join(sconify.TEES)}, not {tee!r}")
    agent = annotations.get(ANN_AGENT, "inject")
    if agent not in AGENT_MODES:
        raise _refuse(f"pod {who}: {ANN_AGENT} must be one of {', '.join(AGENT_MODES)}")
    egress, mesh_ports, volumes_root = _mesh_and_volumes(who, annotations)
    return Plan(
        who, session, tuple(targets), files_path, tee, agent, egress, mesh_ports, volumes_root
    )


def _mesh_and_volumes(
    who: str, annotations: Mapping[str, str]
) -> tuple[dict[str, int], tuple[int, ...], str | None]:
    try:
        upstreams = sconify.parse_egress(str(annotations.get(ANN_EGRESS, "")))
    except ValueError as exc:
        raise _refuse(f"pod {who}: {ANN_EGRESS}: {exc}") from None
    words = [w.strip() for w in str(annotations.get(ANN_MESH_PORTS, "")).split(",") if w.strip()]
    if len(words) > MAX_MESH_PORTS or not all(w.isdigit() and 1 <= int(w) <= 65535 for w in words):
        raise _refuse(f"pod {who}: {ANN_MESH_PORTS} must be a list of ports like '8443,9443'")
    root = annotations.get(ANN_VOLUMES_ROOT)
    if root is not None and (not root.startswith("/") or root.strip() == "/" or ".." in root):
        raise _refuse(f"pod {who}: {ANN_VOLUMES_ROOT} must be an absolute path below /")
    ports = tuple(dict.fromkeys(int(w) for w in words))
    return sconify.egress_ports(upstreams), ports, root


def _targets(who: str, spec: Mapping[str, Any], annotations: Mapping[str, str]) -> list[Target]:
    regular = list(spec.get("containers") or [])
    init = list(spec.get("initContainers") or [])
    first = str(regular[0].get("name")) if regular else None
    out: list[Target] = []
    for is_init, container in [(True, c) for c in init] + [(False, c) for c in regular]:
        name = str(container.get("name"))
        service = annotations.get(f"{ANN_SERVICE}.{name}")
        main = not is_init and name == first
        if service is None and main:
            service = annotations.get(ANN_SERVICE)
        if service is None:
            continue  # runs unchanged, outside the session
        if not service.strip():
            raise _refuse(f"pod {who}: the service annotation of container {name!r} is empty")
        out.append(Target(name, is_init, service.strip(), _argv(who, container, annotations, main)))
    return out


def _argv(
    who: str, container: Mapping[str, Any], annotations: Mapping[str, str], main: bool
) -> tuple[str, ...]:
    name = str(container.get("name"))
    args = [str(a) for a in container.get("args") or []]
    if container.get("command"):
        return tuple([str(a) for a in container["command"]] + args)
    # The image's ENTRYPOINT is in its metadata, which an admission webhook cannot read.
    text = annotations.get(f"{ANN_COMMAND}.{name}")
    if text is None and main:
        text = annotations.get(ANN_COMMAND)
    if text is None:
        raise _refuse(
            f"pod {who}: container {name!r} has no command, and the webhook cannot read the "
            f"entrypoint of image {container.get('image')!r}; set the container's command, or "
            f"annotation {ANN_COMMAND}.{name} to the image's entrypoint"
        )
    entrypoint = _parse_command(who, name, text)
    return tuple(entrypoint + args)


def _parse_command(who: str, container: str, text: str) -> list[str]:
    try:
        value = json.loads(text) if text.lstrip().startswith("[") else shlex.split(text)
    except (ValueError, json.JSONDecodeError):
        raise _refuse(
            f"pod {who}: {ANN_COMMAND} of container {container!r} is neither a JSON list nor "
            "a shell-quoted command"
        ) from None
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise _refuse(f"pod {who}: {ANN_COMMAND} of container {container!r} is not a command")
    return value


# --- the rewrite -----------------------------------------------------------------------------


def mutate(pod: Mapping[str, Any], p: Plan, config: InjectConfig) -> dict[str, Any]:
    """A rewritten copy of ``pod`` (the input is not changed)."""
    out: dict[str, Any] = copy.deepcopy(dict(pod))
    meta = out.setdefault("metadata", {})
    annotations = meta.setdefault("annotations", {})
    annotations[ANN_INJECTED] = "true"
    annotations[ANN_CAS_CERT] = config.cas_cert_pem
    spec = out.setdefault("spec", {})
    volumes = spec.setdefault("volumes", [])
    volumes.extend(_volumes(p))
    by_name = {t.container: t for t in p.targets}
    for key in ("initContainers", "containers"):
        for container in spec.get(key) or []:
            target = by_name.get(str(container.get("name")))
            if target is not None and target.init == (key == "initContainers"):
                _rewrite_container(container, target, p, config)
    if p.agent == "inject":
        spec["initContainers"] = [_installer(config), *(spec.get("initContainers") or [])]
    if p.tee in ("tdx", "snp") and not spec.get("runtimeClassName"):
        spec["runtimeClassName"] = config.runtime_classes[p.tee]
    return out


def _volumes(p: Plan) -> list[dict[str, Any]]:
    cert_ref = f"metadata.annotations['{ANN_CAS_CERT}']"
    volumes: list[dict[str, Any]] = [
        # Injected files exist only in memory (inside the TEE for a confidential pod).
        {"name": VOLUME_FILES, "emptyDir": {"medium": "Memory"}},
        {
            "name": VOLUME_CAS,
            "projected": {
                "sources": [
                    {
                        "downwardAPI": {
                            "items": [{"path": CAS_CERT_FILE, "fieldRef": {"fieldPath": cert_ref}}]
                        }
                    }
                ]
            },
        },
    ]
    if p.agent == "inject":
        volumes.append({"name": VOLUME_AGENT, "emptyDir": {}})
    return volumes


def _installer(config: InjectConfig) -> dict[str, Any]:
    return {
        "name": INSTALLER,
        "image": config.agent_image,
        "command": ["cloister", "k8s", "install-agent", AGENT_DIR],
        "volumeMounts": [{"name": VOLUME_AGENT, "mountPath": AGENT_DIR}],
        # It only copies files into its volume: nothing more is needed, so nothing more is
        # asked (and restricted Pod Security admits it).
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        },
    }


def _rewrite_container(
    container: dict[str, Any], target: Target, p: Plan, config: InjectConfig
) -> None:
    agent = [LAUNCHER] if p.agent == "inject" else ["cloister", "run"]
    flags = ["--session", p.session, "--service", target.service]
    if p.tee == "simulation":
        flags.append("--simulation")
    container["command"] = [*agent, *flags, "--", *target.argv]
    container.pop("args", None)
    env = [
        e
        for e in container.get("env") or []
        if e.get("name") not in OUR_ENV and not str(e.get("name", "")).startswith(EGRESS_ENV_PREFIX)
    ]
    env += [
        {"name": "SCONE_CAS_ADDR", "value": config.cas_url},
        {"name": "SCONE_CONFIG_ID", "value": f"{p.session}/{target.service}"},
        {"name": "CLOISTER_CAS_CERT", "value": f"{CAS_CERT_DIR}/{CAS_CERT_FILE}"},
        {"name": "CLOISTER_HOME", "value": f"{p.files_path.rstrip('/')}/.cloister"},
    ]
    # Pointers for the application's configuration (the session's mesh.egress listens there);
    # the application's own configuration is not rewritten.
    env += [
        {"name": EGRESS_ENV_PREFIX + _env_name(host), "value": f"127.0.0.1:{port}"}
        for host, port in sorted(p.egress.items())
    ]
    if p.volumes_root is not None:
        env.append({"name": "CLOISTER_VOLUMES_ROOT", "value": p.volumes_root})
    container["env"] = env
    if p.mesh_ports and target is _main_target(p):
        ports = container.setdefault("ports", [])
        declared = {port.get("containerPort") for port in ports}
        ports.extend(
            {"name": f"mesh-{n}", "containerPort": n, "protocol": "TCP"}
            for n in p.mesh_ports
            if n not in declared
        )
    mounts = container.setdefault("volumeMounts", [])
    mounts.append({"name": VOLUME_FILES, "mountPath": p.files_path})
    mounts.append({"name": VOLUME_CAS, "mountPath": CAS_CERT_DIR, "readOnly": True})
    if p.agent == "inject":
        mounts.append({"name": VOLUME_AGENT, "mountPath": AGENT_DIR, "readOnly": True})
    if p.tee == "sgx":
        limits = container.setdefault("resources", {}).setdefault("limits", {})
        for resource, amount in config.sgx_resources.items():
            limits.setdefault(resource, amount)


def _env_name(host: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in host.upper())


def _main_target(p: Plan) -> Target | None:
    return next((t for t in p.targets if not t.init), None)


def json_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """RFC 6902 operations that turn ``old`` into ``new``, one per changed top-level field.

    Whole members are replaced (``add`` replaces an existing member, RFC 6902 §4.1), which
    keeps the patch valid whatever other fields the pod has.
    """
    ops: list[dict[str, Any]] = []
    for section in ("metadata", "spec"):
        before = old.get(section) or {}
        after = new.get(section) or {}
        if section not in old and after:
            ops.append({"op": "add", "path": f"/{section}", "value": after})
            continue
        for key in sorted(set(before) | set(after)):
            path = f"/{section}/{_escape(key)}"
            if key not in after:
                ops.append({"op": "remove", "path": path})
            elif before.get(key) != after[key]:
                ops.append({"op": "add", "path": path, "value": after[key]})
    return ops


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")
