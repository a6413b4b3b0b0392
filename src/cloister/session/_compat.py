"""SCONE keys that do not apply to Cloister, and config-fragment expansion, before validation.

A SCONE session is accepted as it is wherever its meaning survives here. For the keys of
SCONE's own runtime (LAS and its quoting enclave, the fspf main file system, Azure Key Vault,
Microsoft Azure Attestation) this module decides, key by key:

- a **warning** when the session keeps its meaning without the key (the key only adds a trust
  anchor or a storage location that Cloister replaces with its own, stricter equivalent);
- a **refusal** when dropping it would change what the session grants or guarantees.

The warned keys are removed before validation, so the canonical hash never depends on them;
nothing is ignored without a word. ``expand_fragments`` replaces ``$$SCONE::name$$`` in the
access policy, the security section and service attestation with the explicit value of a
``config-fragment`` secret, splicing lists as SCONE does.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from cloister.errors import SessionError

__all__ = ["Loader", "expand_fragments", "inspect"]

_FRAGMENT = re.compile(r"^\s*\$\$SCONE::([A-Za-z0-9_.\-]+)\$\$\s*$")
MAX_FRAGMENT_DEPTH = 4  # fragments that name fragments; deeper is refused (no loops)


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads SCONE's ``!cas`` / ``!akv`` tags as ``{"!tag": value}``."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node)
    else:
        value = loader.construct_scalar(node)  # type: ignore[arg-type]
    return {"!" + suffix: value}


Loader.add_multi_constructor("!", _tagged)


def _refuse(where: str, what: str) -> SessionError:
    return SessionError(f"{where}: {what}", reason="not-applicable")


def inspect(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``data`` without the keys that only warn, and the warnings; refuses the others."""
    data = copy.deepcopy(data)
    warnings: list[str] = []
    _secret_config(data, warnings)
    _security(data, warnings)
    for i, svc in enumerate(_list(data.get("services"))):
        if isinstance(svc, dict):
            _service(svc, f"services[{i}]")
    for i, sec in enumerate(_list(data.get("secrets"))):
        if isinstance(sec, dict):
            _secret(sec, f"secrets[{i}]")
    return data, warnings


def _list(value: Any) -> list[Any]:
    # Anything else is for the model to refuse with its own message.
    return value if isinstance(value, list) else []


def _secret_config(data: dict[str, Any], warnings: list[str]) -> None:
    config = data.pop("secret_config", None)
    if config is None:
        return
    store = config.get("store_in") if isinstance(config, dict) else None
    if not isinstance(config, dict) or set(config) - {"store_in"}:
        raise _refuse("secret_config", "only store_in is known")
    if store in ({"!cas": ""}, {"!cas": None}, "cas"):
        return  # the default: the CAS's own encrypted store
    if isinstance(store, dict) and "!akv" in store:
        warnings.append(
            "secret_config.store_in: !akv (Azure Key Vault) does not apply; secrets stay in "
            "the CAS's encrypted, rollback-evident store, which keeps them as confidential"
        )
        return
    raise _refuse("secret_config.store_in", f"unknown secret backend {store!r}")


def _security(data: dict[str, Any], warnings: list[str]) -> None:
    security = data.get("security")
    if not isinstance(security, dict):
        return
    att = security.get("attestation")
    if not isinstance(att, dict):
        return
    mode = att.get("mode")
    if mode in ("maa", "azure"):
        raise _refuse(
            "security.attestation.mode",
            f"{mode!r} (Microsoft Azure Attestation) does not apply; Cloister verifies the "
            "hardware evidence itself (mode: hardware)",
        )
    for key in ("url", "certificates", "min_rsa_signing_key_size"):
        if key in att:
            raise _refuse(
                f"security.attestation.{key}",
                "configures Microsoft Azure Attestation, which does not apply here",
            )
    if "trusted_scone_qe_pubkeys" in att:
        att.pop("trusted_scone_qe_pubkeys")
        warnings.append(
            "security.attestation.trusted_scone_qe_pubkeys: SCONE quoting enclave keys (LAS) "
            "do not apply; they only add a trust anchor, and evidence is checked against the "
            "CPU vendors' roots instead"
        )
    tolerate = att.get("tolerate")
    if isinstance(tolerate, list):
        for item in ("insecure-igpu", "maa-managed-tcb"):
            if item in tolerate:
                tolerate.remove(item)
                warnings.append(
                    f"security.attestation.tolerate: {item!r} does not apply here; nothing "
                    "is tolerated in its place"
                )


def _service(svc: dict[str, Any], where: str) -> None:
    fspf = [k for k in ("fspf_path", "fspf_key", "fspf_tag", "fspf_update_policy") if k in svc]
    if fspf:
        raise _refuse(
            f"{where}.{fspf[0]}",
            "SCONE's main file system protection (fspf) does not apply; protect files with "
            "an encrypted volume instead",
        )
    if "platforms" in svc:
        raise _refuse(
            f"{where}.platforms",
            "platform-based attestation through SCONE's LAS quoting enclave keys does not "
            "apply, and dropping it would accept any platform",
        )
    for i, alt in enumerate(_list(svc.get("attestation"))):
        if isinstance(alt, dict) and "platforms" in alt:
            raise _refuse(
                f"{where}.attestation[{i}].platforms",
                "platform-based attestation through SCONE's LAS does not apply",
            )


def _secret(sec: dict[str, Any], where: str) -> None:
    if "import_akv" in sec:
        raise _refuse(
            f"{where}.import_akv",
            "importing from Azure Key Vault does not apply; give an explicit value or import "
            "from another session",
        )
    kind = sec.get("kind")
    if kind == "aad-token":
        raise _refuse(f"{where}.kind", "aad-token (Azure Active Directory) does not apply here")
    if kind == "pgp-key":
        raise _refuse(f"{where}.kind", "pgp-key secrets are not supported by Cloister")


# --- config fragments ----------------------------------------------------------------------


def expand_fragments(data: dict[str, Any]) -> dict[str, Any]:
    fragments: dict[str, Any] = {}
    for sec in _list(data.get("secrets")):
        if isinstance(sec, dict) and sec.get("kind") == "config-fragment":
            if "import" in sec:
                raise SessionError(
                    f"secret {sec.get('name')!r}: an imported config-fragment would change the "
                    "session after it was signed; give the fragment's value explicitly",
                    reason="not-applicable",
                )
            fragments[str(sec.get("name"))] = sec.get("value")
    if not fragments:
        return data
    out = dict(data)
    for key in ("access_policy", "security"):
        if key in out:
            out[key] = _expand(out[key], fragments, key, 0)
    services = []
    for i, svc in enumerate(_list(out.get("services"))):
        if isinstance(svc, dict) and "attestation" in svc:
            svc = dict(svc)
            svc["attestation"] = _expand(svc["attestation"], fragments, f"services[{i}]", 0)
        services.append(svc)
    if isinstance(out.get("services"), list):
        out["services"] = services
    return out


def _expand(node: Any, fragments: dict[str, Any], where: str, depth: int) -> Any:
    if depth > MAX_FRAGMENT_DEPTH:
        raise SessionError(f"{where}: config-fragments nest deeper than {MAX_FRAGMENT_DEPTH}")
    if isinstance(node, str):
        m = _FRAGMENT.match(node)
        if m is None:
            return node
        if m.group(1) not in fragments:
            raise SessionError(
                f"{where}: {node.strip()} names no config-fragment secret of this session"
            )
        return _expand(copy.deepcopy(fragments[m.group(1)]), fragments, where, depth + 1)
    if isinstance(node, dict):
        return {k: _expand(v, fragments, f"{where}.{k}", depth) for k, v in node.items()}
    if isinstance(node, list):
        out: list[Any] = []
        for item in node:
            value = _expand(item, fragments, where, depth)
            # SCONE splices a list fragment into the list it stands in.
            if isinstance(item, str) and _FRAGMENT.match(item) and isinstance(value, list):
                out.extend(value)
            else:
                out.append(value)
        return out
    return node
