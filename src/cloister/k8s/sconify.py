"""sconify: existing Kubernetes YAML → its confidential version plus a session skeleton.

This module owns the rewrite and nothing else: it reads Kubernetes documents (plain dicts, as
``yaml.safe_load_all`` gives them) and returns new documents and a session document. It does
no IO and talks to no cluster; ``cloister.cli.sconify`` reads and writes the files.

What moves where (the cluster is untrusted, see DESIGN §1 and §8):

- ConfigMaps mounted as files → ``images[].injection_files`` of the service's image.
- Environment from ConfigMaps, Secrets and literal values → the service's ``environment``.
- Secret values → session ``secrets`` (kind ``ascii`` or ``binary`` with an explicit
  ``value``), referenced as ``$$SCONE::name$$`` wherever the workload used them.
- ConfigMap and Secret objects are dropped from the Kubernetes output; their volumes become
  memory-backed ``emptyDir`` volumes the agent fills inside the TEE. No Secret value is ever
  written into the Kubernetes output.
- Each workload's pod template gets ``cloister.io/session`` and ``cloister.io/service``
  annotations (and ``cloister.io/service.<container>`` for pods with several containers),
  the TEE's runtime class or device resources, and a ``cloister.io/egress`` hint naming the
  Services its configuration refers to ("db=5432").

It does not measure images: every service's attestation rule is left as ``<FILL-IN>``, and
:attr:`Result.fill_in` lists what the owner still has to provide.
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import yaml

__all__ = [
    "FILL_IN",
    "MEASUREMENT_KEYS",
    "TEES",
    "Result",
    "dump_documents",
    "dump_session",
    "load_documents",
    "sconify",
]

TEES: Final = ("simulation", "sgx", "tdx", "snp")
MEASUREMENT_KEYS: Final = {
    "simulation": "measurement",
    "sgx": "mrenclave",
    "tdx": "mrtd",
    "snp": "measurement",
}
RUNTIME_CLASSES: Final = {"tdx": "kata-qemu-tdx", "snp": "kata-qemu-snp"}
SGX_RESOURCES: Final = {
    "sgx.intel.com/epc": "512Mi",
    "sgx.intel.com/enclave": 1,
    "sgx.intel.com/provision": 1,
}
FILL_IN: Final = "<FILL-IN>"
SESSION_VERSION: Final = "0.3"

ANNOTATION_SESSION: Final = "cloister.io/session"
ANNOTATION_SERVICE: Final = "cloister.io/service"
ANNOTATION_EGRESS: Final = "cloister.io/egress"

# Where each workload kind keeps its pod template; () means the object is the pod.
_POD_TEMPLATE_PATHS: Final[dict[str, tuple[str, ...]]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
# Passed through unchanged: they hold no configuration of the application.
_PASS_THROUGH: Final = frozenset(
    {"Service", "Namespace", "ServiceAccount", "Ingress", "NetworkPolicy", "PodDisruptionBudget"}
)
# kubectl keeps the whole previous object here, Secret data included.
_DROPPED_ANNOTATIONS: Final = ("kubectl.kubernetes.io/last-applied-configuration",)

_SESSION_NAME_RE: Final = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)*$"
)
_UNSAFE_NAME_CHARS: Final = re.compile(r"[^A-Za-z0-9_.\-]")
_PLACEHOLDER_RE: Final = re.compile(r"\$\$SCONE::[^$]*\$\$")


@dataclass(frozen=True)
class Result:
    """What :func:`sconify` produced.

    ``manifests`` is the confidential Kubernetes output, ``session`` the session skeleton
    (it holds secret values: it belongs to the owner, never to the cluster), ``fill_in`` the
    places in the session the owner must still complete, ``notes`` what was changed or left
    alone and why.
    """

    manifests: list[dict[str, Any]]
    session: dict[str, Any]
    fill_in: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- loading and dumping ---------------------------------------------------------------------


def load_documents(text: str) -> list[dict[str, Any]]:
    """Every Kubernetes object in a multi-document YAML text (``kind: List`` unpacked)."""
    docs: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        if not isinstance(doc, dict) or "kind" not in doc:
            raise ValueError("every YAML document must be a Kubernetes object with a 'kind'")
        docs.extend(_unpack(doc))
    return docs


def _unpack(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if not (str(doc["kind"]).endswith("List") and isinstance(doc.get("items"), list)):
        return [doc]
    items: list[dict[str, Any]] = []
    for item in doc["items"]:
        if not isinstance(item, dict) or "kind" not in item:
            raise ValueError(f"an item of {doc['kind']} is not a Kubernetes object")
        items.extend(_unpack(item))
    return items


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so that injected files stay readable."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value and not value.endswith(" ") else None
    if value == FILL_IN:
        # Quoted, so that what the owner pastes in stays a string: YAML would read a
        # measurement such as 1234e5... as a number.
        style = '"'
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_documents(docs: Iterable[Mapping[str, Any]]) -> str:
    return yaml.dump_all(list(docs), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def dump_session(session: Mapping[str, Any]) -> str:
    return yaml.dump(dict(session), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


# --- the rewrite -----------------------------------------------------------------------------


@dataclass
class _Context:
    tee: str
    session_name: str
    runtime_class: str | None
    sgx_resources: Mapping[str, Any]
    config_maps: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)
    services: dict[str, list[int]] = field(default_factory=dict)
    session_secrets: dict[str, dict[str, Any]] = field(default_factory=dict)
    service_names: set[str] = field(default_factory=set)
    secret_names: dict[tuple[str, str, str], str] = field(default_factory=dict)
    # session service → upstream Services its configuration names (name → port)
    upstreams: dict[str, dict[str, int]] = field(default_factory=dict)
    fill_in: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def sconify(
    documents: Iterable[Mapping[str, Any]],
    *,
    tee: str,
    session: str,
    runtime_class: str | None = None,
    sgx_resources: Mapping[str, Any] | None = None,
) -> Result:
    """Rewrite ``documents`` for ``tee`` and collect their configuration into ``session``.

    ``runtime_class`` overrides the Confidential Containers runtime class for ``tdx`` and
    ``snp``; ``sgx_resources`` overrides the SGX device-plugin resources for ``sgx``.
    The input is not modified.
    """
    if tee not in TEES:
        raise ValueError(f"tee must be one of {', '.join(TEES)}, not {tee!r}")
    if not _SESSION_NAME_RE.match(session):
        raise ValueError(f"session name {session!r} must be letters, digits, '_', '.', '-', '/'")
    ctx = _Context(
        tee=tee,
        session_name=session,
        runtime_class=runtime_class or RUNTIME_CLASSES.get(tee),
        sgx_resources=dict(SGX_RESOURCES if sgx_resources is None else sgx_resources),
    )
    docs = [copy.deepcopy(dict(d)) for d in documents]
    for doc in docs:
        try:
            _index(ctx, doc)
        except (AttributeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{doc.get('kind')} {_meta_name(doc)} is malformed ({type(exc).__name__}: {exc})"
            ) from None

    manifests: list[dict[str, Any]] = []
    services: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    for doc in docs:
        kind = str(doc.get("kind", ""))
        name = _meta_name(doc)
        if kind in ("ConfigMap", "Secret"):
            ctx.notes.append(f"{kind} {name}: moved into the session, removed from Kubernetes")
            continue
        _drop_annotations(doc)
        if kind in _POD_TEMPLATE_PATHS:
            try:
                svc, imgs = _rewrite_workload(ctx, doc)
            except (AttributeError, KeyError, TypeError) as exc:
                # Input the API server would refuse too; say where, not a traceback.
                raise ValueError(
                    f"{kind} {name} is malformed ({type(exc).__name__}: {exc})"
                ) from None
            services.extend(svc)
            images.extend(imgs)
        elif kind not in _PASS_THROUGH:
            ctx.notes.append(f"{kind} {name}: not a workload; passed through unchanged")
        manifests.append(doc)

    return Result(
        manifests=manifests,
        session=_session_document(ctx, services, images),
        fill_in=list(ctx.fill_in),
        notes=list(ctx.notes),
    )


def _session_document(
    ctx: _Context, services: list[dict[str, Any]], images: list[dict[str, Any]]
) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": ctx.session_name, "version": SESSION_VERSION}
    if ctx.tee == "simulation":
        # Simulation protects nothing; a session must say that it accepts it, by name.
        doc["security"] = {"attestation": {"tolerate": ["simulation"]}}
    doc["services"] = services
    if _add_mesh(ctx, services):
        ctx.session_secrets.setdefault(
            MESH_CA, {"name": MESH_CA, "kind": "x509-ca", "common_name": "Mesh CA"}
        )
    if images:
        doc["images"] = images
    if ctx.session_secrets:
        doc["secrets"] = list(ctx.session_secrets.values())
    return doc


# --- indexing the inputs ---------------------------------------------------------------------


def _meta_name(doc: Mapping[str, Any]) -> str:
    return str((doc.get("metadata") or {}).get("name", "<unnamed>"))


def _meta_namespace(doc: Mapping[str, Any]) -> str:
    return str((doc.get("metadata") or {}).get("namespace") or "")


def _index(ctx: _Context, doc: Mapping[str, Any]) -> None:
    kind = doc.get("kind")
    key = (_meta_namespace(doc), _meta_name(doc))
    if kind == "ConfigMap":
        data = {str(k): str(v) for k, v in (doc.get("data") or {}).items()}
        for k, v in (doc.get("binaryData") or {}).items():
            data[str(k)] = _text(_b64decode(v, f"ConfigMap {key[1]} key {k}"), key[1], str(k))
        ctx.config_maps[key] = data
    elif kind == "Secret":
        values = {
            str(k): _b64decode(v, f"Secret {key[1]} key {k}")
            for k, v in (doc.get("data") or {}).items()
        }
        values.update({str(k): str(v).encode() for k, v in (doc.get("stringData") or {}).items()})
        ctx.secrets[key] = values
        if str(doc.get("type", "")).startswith("kubernetes.io/docker"):
            ctx.notes.append(
                f"Secret {key[1]}: image pull credentials are not application configuration; "
                "create that Secret in the cluster yourself"
            )
    elif kind == "Service":
        ports = [int(p["port"]) for p in (doc.get("spec") or {}).get("ports") or [] if "port" in p]
        ctx.services[key[1]] = ports


def _b64decode(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"{what} is not valid base64") from exc


def _text(raw: bytes, config_map: str, key: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"ConfigMap {config_map} key {key}: binary files cannot be injected as text"
        ) from exc


def _lookup(table: Mapping[tuple[str, str], Any], namespace: str, name: str) -> Any | None:
    # Objects without a namespace land in whatever namespace kubectl applies to.
    for key in ((namespace, name), ("", name)):
        if key in table:
            return table[key]
    if not namespace:
        matches = [v for (_, n), v in table.items() if n == name]
        if len(matches) == 1:
            return matches[0]
    return None


def _drop_annotations(doc: dict[str, Any]) -> None:
    annotations = (doc.get("metadata") or {}).get("annotations")
    if isinstance(annotations, dict):
        for a in _DROPPED_ANNOTATIONS:
            annotations.pop(a, None)


# --- workloads -------------------------------------------------------------------------------


def _pod_template(doc: dict[str, Any]) -> dict[str, Any]:
    node = doc
    for step in _POD_TEMPLATE_PATHS[str(doc["kind"])]:
        node = node.setdefault(step, {})
    return node


def _service_name(ctx: _Context, kind: str, workload: str, container: str, many: bool) -> str:
    """A session-wide unique service name: the workload's, or ``<workload>-<container>``."""
    base = _UNSAFE_NAME_CHARS.sub("-", f"{workload}-{container}" if many else workload)
    name, n = base, 2
    if name in ctx.service_names:
        # e.g. a Deployment and a StatefulSet of the same name
        base = name = f"{base}-{kind.lower()}"
    while name in ctx.service_names:
        name, n = f"{base}-{n}", n + 1
    ctx.service_names.add(name)
    return name


def _rewrite_workload(
    ctx: _Context, doc: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    workload = _meta_name(doc)
    namespace = _meta_namespace(doc)
    template = _pod_template(doc)
    pod_spec = template.setdefault("spec", {})
    containers = list(pod_spec.get("initContainers") or []) + list(pod_spec.get("containers") or [])
    many = len(containers) > 1
    volumes = {str(v.get("name")): v for v in pod_spec.get("volumes") or []}

    services: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    annotations: dict[str, str] = {ANNOTATION_SESSION: ctx.session_name}
    egress: dict[str, int] = {}
    kind = str(doc["kind"])
    names = [_service_name(ctx, kind, workload, str(c.get("name", "")), many) for c in containers]
    for container, name in zip(containers, names, strict=True):
        service, image = _rewrite_container(ctx, namespace, workload, container, volumes, name)
        services.append(service)
        if image is not None:
            images.append(image)
        if many:
            annotations[f"{ANNOTATION_SERVICE}.{container.get('name')}"] = name
        upstreams = _egress(ctx, service, workload)
        if upstreams:
            ctx.upstreams[name] = upstreams
        egress.update(upstreams)
        _add_tee_resources(ctx, container)
    # The first regular container is the pod's main service.
    if containers:
        first_regular = len(pod_spec.get("initContainers") or [])
        annotations[ANNOTATION_SERVICE] = names[min(first_regular, len(names) - 1)]
    if egress:
        annotations[ANNOTATION_EGRESS] = ",".join(f"{h}={p}" for h, p in sorted(egress.items()))

    _rewrite_volumes(ctx, workload, pod_spec)
    if ctx.runtime_class and ctx.tee in ("tdx", "snp"):
        pod_spec["runtimeClassName"] = ctx.runtime_class
    template.setdefault("metadata", {}).setdefault("annotations", {}).update(annotations)
    return services, images


def _rewrite_container(
    ctx: _Context,
    namespace: str,
    workload: str,
    container: dict[str, Any],
    volumes: Mapping[str, Mapping[str, Any]],
    service_name: str,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    where = f"{workload}/{container.get('name')}"
    service: dict[str, Any] = {"name": service_name}
    command = _command(ctx, container, service_name)
    if command is not None:
        service["command"] = command
    service["environment"] = _environment(ctx, namespace, container, where)
    service["pwd"] = str(container.get("workingDir") or "/")
    key = MEASUREMENT_KEYS[ctx.tee]
    service["attestation"] = [{"tee": ctx.tee, key: FILL_IN}]
    ctx.fill_in.append(
        f"services[{service_name}].attestation[0].{key}: the {ctx.tee} measurement of "
        f"image {container.get('image', '?')}"
    )

    files = _injection_files(ctx, namespace, container, volumes, where)
    image = None
    if files:
        service["image_name"] = service_name
        image = {"name": service_name, "injection_files": files}
    return service, image


def _command(ctx: _Context, container: dict[str, Any], service_name: str) -> str | list[str] | None:
    if container.get("command"):
        argv = [str(a) for a in container["command"]] + [
            str(a) for a in container.get("args") or []
        ]
        # SCONE writes commands as one string; keep a list where quoting would be needed.
        if all(shlex.quote(a) == a for a in argv):
            return " ".join(argv)
        return argv
    if container.get("args"):
        # The image's entrypoint is not in the YAML; the session's command needs it.
        ctx.fill_in.append(
            f"services[{service_name}].command[0]: the entrypoint of image "
            f"{container.get('image', '?')}"
        )
        return [FILL_IN, *(str(a) for a in container["args"])]
    return None


# --- environment -----------------------------------------------------------------------------


def _environment(
    ctx: _Context, namespace: str, container: dict[str, Any], where: str
) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        env.update(_env_from(ctx, namespace, source, where))
    kept: list[dict[str, Any]] = []
    for var in container.get("env") or []:
        name = str(var.get("name"))
        value = _env_value(ctx, namespace, var, where)
        if value is None:
            kept.append(var)  # downward API and unknown sources stay with Kubernetes
        else:
            env[name] = value
    container.pop("envFrom", None)
    if any("$(" in v for v in env.values()):
        ctx.notes.append(
            f"{where}: $(VAR) references in the environment are no longer expanded by "
            "Kubernetes; write the values out in the session"
        )
    if kept:
        container["env"] = kept
    else:
        container.pop("env", None)
    return env


def _env_from(
    ctx: _Context, namespace: str, source: Mapping[str, Any], where: str
) -> dict[str, str]:
    prefix = str(source.get("prefix") or "")
    if "configMapRef" in source:
        cm_name = str(source["configMapRef"].get("name"))
        data = _lookup(ctx.config_maps, namespace, cm_name)
        if data is None:
            ctx.notes.append(f"{where}: envFrom ConfigMap {cm_name} is not in the input; dropped")
            ctx.fill_in.append(f"{where}: the environment from ConfigMap {cm_name}")
            return {}
        return {prefix + k: v for k, v in data.items()}
    if "secretRef" in source:
        secret = str(source["secretRef"].get("name"))
        values = _lookup(ctx.secrets, namespace, secret)
        if values is None:
            ctx.notes.append(f"{where}: envFrom Secret {secret} is not in the input; dropped")
            ctx.fill_in.append(f"{where}: the environment from Secret {secret}")
            return {}
        return {prefix + k: _placeholder(ctx, namespace, secret, k) for k in values}
    return {}


def _env_value(ctx: _Context, namespace: str, var: Mapping[str, Any], where: str) -> str | None:
    if "valueFrom" not in var:
        return str(var.get("value", ""))
    ref = var["valueFrom"]
    if "configMapKeyRef" in ref:
        cm_name, key = str(ref["configMapKeyRef"].get("name")), str(ref["configMapKeyRef"]["key"])
        data = _lookup(ctx.config_maps, namespace, cm_name)
        if data is None or key not in data:
            ctx.fill_in.append(f"{where}: env {var.get('name')} (ConfigMap {cm_name} key {key})")
            return FILL_IN
        return str(data[key])
    if "secretKeyRef" in ref:
        secret, key = str(ref["secretKeyRef"].get("name")), str(ref["secretKeyRef"]["key"])
        return _placeholder(ctx, namespace, secret, key)
    return None


def _placeholder(ctx: _Context, namespace: str, secret: str, key: str) -> str:
    """``$$SCONE::name$$`` for one Secret key, adding the session secret on first use."""
    ident = (namespace, secret, key)
    if ident not in ctx.secret_names:
        name = _UNSAFE_NAME_CHARS.sub("-", f"{secret}-{key}").strip("-.") or "secret"
        base, n = name, 2
        while name in ctx.session_secrets:
            name, n = f"{base}-{n}", n + 1
        ctx.secret_names[ident] = name
        values = _lookup(ctx.secrets, namespace, secret)
        raw = None if values is None else values.get(key)
        entry: dict[str, Any]
        if raw is None:
            entry = {"name": name, "kind": "ascii", "value": FILL_IN}
            ctx.fill_in.append(f"secrets[{name}].value: Secret {secret} key {key} was not given")
        else:
            entry = _explicit_secret(name, raw)
        ctx.session_secrets[name] = entry
    return f"$$SCONE::{ctx.secret_names[ident]}$$"


def _explicit_secret(name: str, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return {"name": name, "kind": "binary", "value": raw.hex()}
    if all(c.isprintable() or c in "\n\r\t" for c in text):
        return {"name": name, "kind": "ascii", "value": text}
    return {"name": name, "kind": "binary", "value": raw.hex()}


# --- volumes and injected files --------------------------------------------------------------


def _injection_files(
    ctx: _Context,
    namespace: str,
    container: dict[str, Any],
    volumes: Mapping[str, Mapping[str, Any]],
    where: str,
) -> list[dict[str, str]]:
    files: list[dict[str, str]] = []
    mounts: list[dict[str, Any]] = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(str(mount.get("name")))
        contents = None if volume is None else _volume_files(ctx, namespace, volume, where)
        if contents is None:
            mounts.append(mount)
            continue
        base = str(mount["mountPath"])
        sub = mount.get("subPath")
        for rel, (content, mode) in contents.items():
            if sub is not None and rel != sub:
                continue
            path = base if sub is not None else f"{base.rstrip('/')}/{rel}"
            entry = {"path": path, "content": content}
            if mode is not None:
                entry["permission"] = f"{mode:04o}"
            files.append(entry)
        if sub is None:
            mount.pop("readOnly", None)
            mounts.append(mount)
        # A subPath mount names one file; the agent writes it in place, inside the TEE.
    if "volumeMounts" in container:
        if mounts:
            container["volumeMounts"] = mounts
        else:
            container.pop("volumeMounts")
    return files


_Files = dict[str, tuple[str, int | None]]


def _volume_files(
    ctx: _Context, namespace: str, volume: Mapping[str, Any], where: str
) -> _Files | None:
    """File path (relative to the mount) → (content, mode), or None for other volume types."""
    if "configMap" in volume:
        src = volume["configMap"]
        cm_name = str(src.get("name"))
        data = _lookup(ctx.config_maps, namespace, cm_name)
        if data is None:
            ctx.fill_in.append(f"{where}: the files of ConfigMap {cm_name} (not in the input)")
            data = {}
        return _select_items(data, src)
    if "secret" in volume:
        src = volume["secret"]
        secret = str(src.get("secretName"))
        values = _lookup(ctx.secrets, namespace, secret) or {}
        keys = (
            {str(i["key"]): str(i["key"]) for i in src["items"]}
            if src.get("items")
            else {k: k for k in values}
        )
        if not keys:
            ctx.fill_in.append(f"{where}: the files of Secret {secret} (not in the input)")
        placeholders = {k: _placeholder(ctx, namespace, secret, k) for k in keys}
        return _select_items(placeholders, src)
    return None


def _select_items(data: Mapping[str, str], source: Mapping[str, Any]) -> _Files:
    """The files a configMap or secret volume source projects, with their modes if set."""
    default = _mode(source.get("defaultMode"))
    items = source.get("items")
    if not items:
        return {k: (v, default) for k, v in data.items()}
    return {
        str(i.get("path", i["key"])): (data[str(i["key"])], _mode(i.get("mode")) or default)
        for i in items
        if str(i["key"]) in data
    }


def _mode(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    return None


def _rewrite_volumes(ctx: _Context, workload: str, pod_spec: dict[str, Any]) -> None:
    mounted = {
        str(m.get("name"))
        for c in list(pod_spec.get("initContainers") or []) + list(pod_spec.get("containers") or [])
        for m in c.get("volumeMounts") or []
    }
    kept: list[dict[str, Any]] = []
    for volume in pod_spec.get("volumes") or []:
        converted = "configMap" in volume or "secret" in volume
        if converted and volume.get("name") not in mounted:
            # Only subPath mounts used it: the agent writes those files in place.
            ctx.notes.append(f"{workload}: volume {volume.get('name')} removed")
            continue
        kept.append(volume)
        for kind in ("configMap", "secret"):
            if kind in volume:
                del volume[kind]
                # Injected files live only in memory, inside the workload's TEE.
                volume["emptyDir"] = {"medium": "Memory"}
                ctx.notes.append(
                    f"{workload}: volume {volume.get('name')} ({kind}) is now a memory-backed "
                    "emptyDir that the agent fills from the session"
                )
        if "projected" in volume:
            ctx.notes.append(
                f"{workload}: projected volume {volume.get('name')} left unchanged; move its "
                "ConfigMap and Secret sources into the session by hand"
            )
    if "volumes" in pod_spec:
        if kept:
            pod_spec["volumes"] = kept
        else:
            del pod_spec["volumes"]


# --- TEE resources and egress hints ----------------------------------------------------------


def _add_tee_resources(ctx: _Context, container: dict[str, Any]) -> None:
    if ctx.tee != "sgx":
        return
    limits = container.setdefault("resources", {}).setdefault("limits", {})
    for resource, amount in ctx.sgx_resources.items():
        limits.setdefault(resource, amount)


def _egress(ctx: _Context, service: Mapping[str, Any], workload: str) -> dict[str, int]:
    """Services of the input that the service's configuration names, with their port."""
    command = service.get("command") or ""
    texts = [str(v) for v in service.get("environment", {}).values()]
    texts.extend(command if isinstance(command, list) else [command])
    # Placeholders name session secrets, not hosts.
    texts = [_PLACEHOLDER_RE.sub(" ", t) for t in texts]
    found: dict[str, int] = {}
    for name, ports in ctx.services.items():
        if name == workload or not ports:
            continue
        pattern = re.compile(
            rf"(?<![A-Za-z0-9_.\-]){re.escape(name)}(?:\.[A-Za-z0-9.\-]+)?(?::(\d+))?(?![A-Za-z0-9_\-])"
        )
        for text in texts:
            m = pattern.search(text)
            if m:
                found[name] = int(m.group(1)) if m.group(1) else ports[0]
                break
    return found


# --- the mesh: egress rules from the hints -------------------------------------------------

MESH_CA: Final = "mesh-ca"
FIRST_SPARE_PORT: Final = 15000  # loopback ports for upstreams whose own port is taken
MAX_EGRESS_HINTS: Final = 64
_HINT_NAME_RE: Final = re.compile(r"^[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?$")


def egress_ports(upstreams: Mapping[str, int]) -> dict[str, int]:
    """The loopback port the mesh's egress listens on for each upstream (name → port).

    The upstream's own port where it is free, else the next free one from 15000, in name
    order: the webhook (from the ``cloister.io/egress`` annotation) and the session skeleton
    (``mesh.egress``) compute the same ports without talking to each other.
    """
    taken: set[int] = set()
    out: dict[str, int] = {}
    for name in sorted(upstreams):
        port = upstreams[name]
        if port in taken:
            port = FIRST_SPARE_PORT
            while port in taken or port in upstreams.values():
                port += 1
        taken.add(port)
        out[name] = port
    return out


def parse_egress(text: str) -> dict[str, int]:
    """Read a ``cloister.io/egress`` annotation: ``db=5432,cache=6379``; ValueError if not."""
    out: dict[str, int] = {}
    items = [i.strip() for i in text.split(",") if i.strip()]
    if len(items) > MAX_EGRESS_HINTS:
        raise ValueError(f"more than {MAX_EGRESS_HINTS} upstreams")
    for item in items:
        name, eq, port = item.partition("=")
        name = name.strip().lower()
        if not eq or not _HINT_NAME_RE.match(name) or not port.strip().isdigit():
            raise ValueError(f"{item!r} is not name=port")
        number = int(port)
        if not 1 <= number <= 65535:
            raise ValueError(f"{item!r}: port out of range")
        out[name] = number
    return out


def _add_mesh(ctx: _Context, services: list[dict[str, Any]]) -> bool:
    """Give each service with upstream hints ``mesh.egress`` rules; True if any were added.

    Ingress rules are left to the owner (a note names the callers): they need a port for
    the mesh's TLS listener that the input does not say.
    """
    by_name = {s["name"]: s for s in services}
    callers: dict[str, list[str]] = {}
    for name, upstreams in sorted(ctx.upstreams.items()):
        rules = []
        for host, loopback in egress_ports(upstreams).items():
            peer = host if host in by_name else FILL_IN
            if peer == FILL_IN:
                ctx.fill_in.append(
                    f"services[{name}].mesh.egress[{host}].service: the session service behind "
                    f"Kubernetes Service {host} (or 'service.session' in another session)"
                )
            else:
                callers.setdefault(host, []).append(name)
            rules.append({"port": loopback, "target": f"{host}:{upstreams[host]}", "service": peer})
        by_name[name]["mesh"] = {"egress": rules}
        ctx.notes.append(
            f"service {name}: the mesh carries its upstreams over mutual TLS from loopback ("
            + ", ".join(f"{h} → 127.0.0.1:{p}" for h, p in egress_ports(upstreams).items())
            + "); point the application at these addresses (the webhook sets "
            "CLOISTER_EGRESS_<NAME>)"
        )
    for host, allowed in sorted(callers.items()):
        ctx.notes.append(
            f"service {host}: to enforce who may call it, give it mesh.ingress (a TLS port for "
            f"the Service's targetPort, app_port {ctx.services[host][0]} on loopback, "
            f"allow_from: {sorted(allowed)})"
        )
    return bool(ctx.upstreams)
