"""What an update changes, in the words an owner needs before signing it.

``diff(old, new)`` lists changes to services (command, environment, measurements), secrets
(with what migration will do to each value), images, access policy and security. Pure: no
secret value is ever involved, only the documents.
"""

from __future__ import annotations

import json
from typing import Any

from cloister.session._models import Secret, SessionDocument

__all__ = ["diff"]


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _dump(model: Any) -> dict[str, Any]:
    out: dict[str, Any] = model.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    return out


def diff(old: SessionDocument, new: SessionDocument, old_hash: str) -> list[str]:
    lines: list[str] = []
    if new.name != old.name:
        lines.append(f"! name changes from {old.name!r} to {new.name!r}: this is another session")
    if new.predecessor != old_hash:
        lines.append(
            f"! predecessor is {new.predecessor or 'missing'}, not the old session's hash "
            f"{old_hash}: the CAS will refuse this update"
        )
    lines += _services(old, new)
    lines += _secrets(old, new)
    lines += _section("images", {i.name: _dump(i) for i in old.images},
                      {i.name: _dump(i) for i in new.images})  # fmt: skip
    if _dump(old.access_policy) != _dump(new.access_policy):
        lines.append(
            f"~ access_policy: {_show(_dump(old.access_policy))} -> "
            f"{_show(_dump(new.access_policy))} (the current policy's update rule decides)"
        )
    if _dump(old.security) != _dump(new.security):
        lines.append(f"~ security: {_show(_dump(old.security))} -> {_show(_dump(new.security))}")
    return lines


def _section(what: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    lines = [f"- {what} {n}" for n in sorted(old.keys() - new.keys())]
    lines += [f"+ {what} {n}: {_show(new[n])}" for n in sorted(new.keys() - old.keys())]
    for n in sorted(old.keys() & new.keys()):
        if old[n] != new[n]:
            lines.append(f"~ {what} {n}: {_show(old[n])} -> {_show(new[n])}")
    return lines


def _services(old: SessionDocument, new: SessionDocument) -> list[str]:
    a = {s.name: s for s in old.services}
    b = {s.name: s for s in new.services}
    lines = [f"- service {n}" for n in sorted(a.keys() - b.keys())]
    lines += [f"+ service {n}" for n in sorted(b.keys() - a.keys())]
    for n in sorted(a.keys() & b.keys()):
        x, y = _dump(a[n]), _dump(b[n])
        for key in sorted(x.keys() | y.keys()):
            if x.get(key) == y.get(key):
                continue
            label = "measurements" if key == "attestation" else key
            lines.append(f"~ service {n} {label}: {_show(x.get(key))} -> {_show(y.get(key))}")
    return lines


def _secrets(old: SessionDocument, new: SessionDocument) -> list[str]:
    a = {s.name: s for s in old.secrets}
    b = {s.name: s for s in new.secrets}
    lines = [f"- secret {n} (its value is dropped)" for n in sorted(a.keys() - b.keys())]
    lines += [f"+ secret {n} ({b[n].kind or 'imported'})" for n in sorted(b.keys() - a.keys())]
    for n in sorted(a.keys() & b.keys()):
        x, y = a[n], b[n]
        changed = _dump(x) != _dump(y)
        fate = _fate(x, y)
        if changed or fate != "value kept":
            what = f"{_show(_dump(x))} -> {_show(_dump(y))}" if changed else "unchanged"
            lines.append(f"~ secret {n}: {what}; {fate}")
    return lines


def _fate(old: Secret, new: Secret) -> str:
    """What SCONE's migration rule does to a stored value (``secrets.kept_on_update``)."""
    if new.import_ is not None:
        return "value imported from " + new.import_.session
    if old.kind != new.kind:
        return "new value (kind changed)"
    if new.is_workload_bound():
        return "issued per activation"
    definition_changed = _core(old) != _core(new)
    if new.kind == "x509-ca":
        if new.private_key is not None:
            return f"certificate reissued; its key follows secret {new.private_key!r}"
        if definition_changed:
            return "CA rotated: new key, the old CA stays trusted for an overlap window"
        return "certificate reissued with the same key"
    if new.kind == "x509":
        return "certificate reissued"
    if definition_changed:
        return "new value (definition changed)"
    if new.kind == "private-key" and not (old.migrate and new.migrate):
        return "new key (migrate: true is not set in both versions)"
    return "value kept"


def _core(secret: Secret) -> dict[str, Any]:
    return _dump(secret.model_copy(update={"export": [], "export_public": False, "migrate": False}))
