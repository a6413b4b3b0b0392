"""Putting a bundle in place: injected files, the workload key, environment, arguments.

Injected files are written atomically with the session's permission (default 0600). They are
meant to live in memory (tmpfs): the Kubernetes webhook mounts memory-backed volumes at their
paths, and the agent warns when a file lands on a disk-backed file system.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cloister import errors, protocol

log = logging.getLogger(__name__)

_MEMORY_FS = frozenset({"tmpfs", "ramfs"})
# Variables that configure the agent itself; the application never sees them.
_AGENT_VARS = (
    "SCONE_CAS_ADDR",
    "SCONE_CONFIG_ID",
    "CLOISTER_CAS_CERT",
    "SCONE_SERVICE_ACCESS_TOKEN",
)


@dataclass(frozen=True)
class Prepared:
    argv: list[str] | None
    environment: dict[str, str]
    pwd: str | None


def _fs_type(path: Path) -> str | None:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and (
            target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")
        ):
            if len(parts[1]) >= len(best):
                best, fstype = parts[1], parts[2]
    return fstype


def _write(path: Path, content: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.cloister-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode & 0o777)
    try:
        os.write(fd, content)
        os.fchmod(fd, mode & 0o777)
    finally:
        os.close(fd)
    os.replace(tmp, path)


_HOST_ARG = re.compile(r"(?<![\\@])@@([0-9]+)")
_HOST_ENV_KEY = re.compile(r"^(?:@@|\\@\\@)([A-Za-z_][A-Za-z0-9_]*)$")


def host_arguments(argv: list[str], host_argv: Sequence[str]) -> list[str]:
    """SCONE's ``@@N``: the N-th argument the operator gave this program (from 1).

    A position beyond what the operator gave is refused: reading past the host's argv would
    hand the program something nobody chose.
    """

    def sub(m: re.Match[str]) -> str:
        n = int(m.group(1))
        if n < 1 or n >= len(host_argv):
            raise errors.Error(
                f"the session's command needs host argument @@{n}, which was not given",
                reason="host-argument-missing",
            )
        return host_argv[n]

    return [_HOST_ARG.sub(sub, a) for a in argv]


def host_environment(env: Mapping[str, str], host_env: Mapping[str, str]) -> dict[str, str]:
    """SCONE's ``@@NAME`` / ``\\@\\@NAME`` keys: the value comes from the host's ``NAME``
    (empty when the host does not set it); the session's value is not used."""
    out: dict[str, str] = {}
    for key, value in env.items():
        m = _HOST_ENV_KEY.match(key)
        if m is None:
            out[key] = value
        else:
            out[m.group(1)] = host_env.get(m.group(1), "")
    return out


def prepare(
    bundle: protocol.Bundle,
    key_pem: str,
    *,
    base_env: Mapping[str, str],
    root: Path = Path("/"),
    host_argv: Sequence[str] = (),
) -> Prepared:
    """Write the bundle's files under ``root`` and return what to exec with.

    ``host_argv`` is the program and arguments the operator gave (``@@1`` is ``host_argv[1]``).
    """

    def fill(text: str) -> str:
        return text.replace(bundle.key_marker, key_pem)

    for f in bundle.files:
        target = root / f.path.lstrip("/")
        content = base64.b64decode(f.content).replace(bundle.key_marker.encode(), key_pem.encode())
        _write(target, content, f.mode)
        fstype = _fs_type(target.parent)
        if fstype is not None and fstype not in _MEMORY_FS:
            log.warning("injected file %s is on a %s file system, not in memory", f.path, fstype)
    env = {k: v for k, v in base_env.items() if k not in _AGENT_VARS}
    env.update(host_environment({k: fill(v) for k, v in bundle.environment.items()}, base_env))
    argv = (
        host_arguments([fill(a) for a in bundle.command], host_argv)
        if bundle.command is not None
        else None
    )
    return Prepared(argv, env, fill(bundle.pwd) if bundle.pwd else None)
