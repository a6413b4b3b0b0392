"""Putting a bundle in place: injected files, the workload key, environment, arguments.

Injected files are written atomically with the session's permission (default 0600). They are
meant to live in memory (tmpfs): the Kubernetes webhook mounts memory-backed volumes at their
paths, and the agent warns when a file lands on a disk-backed file system.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cloister import protocol

log = logging.getLogger(__name__)

_MEMORY_FS = frozenset({"tmpfs", "ramfs"})
# Variables that configure the agent itself; the application never sees them.
_AGENT_VARS = ("SCONE_CAS_ADDR", "SCONE_CONFIG_ID", "CLOISTER_CAS_CERT")


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


def prepare(
    bundle: protocol.Bundle,
    key_pem: str,
    *,
    base_env: Mapping[str, str],
    root: Path = Path("/"),
) -> Prepared:
    """Write the bundle's files under ``root`` and return what to exec with."""

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
    env.update({k: fill(v) for k, v in bundle.environment.items()})
    argv = [fill(a) for a in bundle.command] if bundle.command is not None else None
    return Prepared(argv, env, fill(bundle.pwd) if bundle.pwd else None)
