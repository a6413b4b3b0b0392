"""A self-contained agent for unmodified images: ``cloister k8s install-agent DEST``.

The webhook cannot assume that an application's image has Python, let alone Cloister. So an
init container, running the Cloister image, copies into a shared ``emptyDir``:

- ``python/``: this interpreter, its standard library and every installed package (Cloister
  and its dependencies), laid out as a Python prefix (``python/bin/python3``,
  ``python/lib/python3.X/...``) so that the interpreter finds its library from its own path;
- ``lib/``: the dynamic loader and every shared library the interpreter and the extension
  modules link to (as ``ldd`` resolves them in the Cloister image);
- ``bin/cloister-run``: a POSIX shell script that starts the copied interpreter through the
  copied loader (``ld.so --library-path DEST/lib``), in isolated mode (``-I``), as
  ``python -m cloister run "$@"``.

Nothing of the application image is used except ``/bin/sh``: not its libc, not its Python.
The loader's ``--library-path`` applies to the agent's process only, and isolated mode ignores
``PYTHON*`` variables, so the environment the agent passes to the application is the pod's
own. The agent then ``exec``s the application, which replaces the copied interpreter.

Only Linux with glibc is supported for the Cloister image itself (the application image may
use any libc, or none).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Final

import cloister

__all__ = ["install"]

_SKIP_DIRS: Final = frozenset({"__pycache__", "test", "tests", "idlelib", "tkinter", "ensurepip"})
# Tk needs X11 libraries and nothing in the agent uses it.
_SKIP_FILES: Final = ("_tkinter",)
_LDD_LINE: Final = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")

LAUNCHER: Final = """#!/bin/sh
# Cloister agent launcher, installed by 'cloister k8s install-agent'.
# Starts the agent with the Python and the libraries copied beside it: the application
# image needs nothing but this shell (not even dirname). The agent then execs the application.
case $0 in */*) bindir=${{0%/*}} ;; *) bindir=. ;; esac
here=$(CDPATH= cd -- "$bindir/.." && pwd) || exit 127
exec "$here/lib/{loader}" --library-path "$here/lib" \\
  "$here/python/bin/python3" -I -m cloister run "$@"
"""


def install(dest: Path) -> Path:
    """Install the agent under ``dest``; returns the launcher's path."""
    dest = dest.resolve()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    prefix = dest / "python"
    libdir = prefix / "lib" / version
    site = libdir / "site-packages"
    (prefix / "bin").mkdir(parents=True, exist_ok=True)
    site.mkdir(parents=True, exist_ok=True)
    interpreter = Path(os.path.realpath(sys.executable))
    shutil.copy2(interpreter, prefix / "bin" / "python3")

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    _copy_tree(stdlib, libdir, skip={"site-packages", "dist-packages", *_SKIP_DIRS})
    dynload = Path(sysconfig.get_paths()["platstdlib"]) / "lib-dynload"
    if dynload.is_dir():
        _copy_tree(dynload, libdir / "lib-dynload", skip=_SKIP_DIRS)
    for entry in _site_dirs():
        _copy_tree(entry, site, skip=_SKIP_DIRS)
    # An editable (development) install points outside site-packages: copy the package itself.
    package = Path(cloister.__file__).resolve().parent
    if not (site / "cloister" / "__init__.py").exists():
        _copy_tree(package, site / "cloister", skip=_SKIP_DIRS)

    loader = _copy_libraries(prefix, dest / "lib")
    launcher = dest / "bin" / "cloister-run"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    launcher.write_text(LAUNCHER.format(loader=loader))
    launcher.chmod(0o755)
    return launcher


def _site_dirs() -> list[Path]:
    seen: list[Path] = []
    for key in ("purelib", "platlib"):
        path = Path(sysconfig.get_paths()[key]).resolve()
        if path.is_dir() and path not in seen:
            seen.append(path)
    return seen


def _copy_tree(src: Path, dst: Path, *, skip: frozenset[str] | set[str]) -> None:
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if d not in skip]
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if name.endswith((".pyc", ".pth")) or name.startswith(_SKIP_FILES):
                continue
            target = dst / rel / name
            if not target.exists():
                shutil.copy2(Path(root) / name, target, follow_symlinks=True)


def _copy_libraries(prefix: Path, libdir: Path) -> str:
    """Copy the shared libraries every ELF file under ``prefix`` needs; returns the loader."""
    libdir.mkdir(parents=True, exist_ok=True)
    elves = [prefix / "bin" / "python3", *prefix.rglob("*.so"), *prefix.rglob("*.so.*")]
    needed: set[Path] = set()
    loader: Path | None = None
    for elf in elves:
        for path in _ldd(elf):
            if "ld-linux" in path.name or path.name.startswith("ld64.so"):
                loader = path
            needed.add(path)
    if loader is None:
        raise OSError("cannot find the dynamic loader of this Python (is it a glibc Linux?)")
    for path in needed:
        target = libdir / path.name
        if not target.exists():
            shutil.copy2(path, target, follow_symlinks=True)
    return loader.name


def _ldd(elf: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return []  # not dynamic, or not an ELF file
    return [Path(m.group(1)) for m in map(_LDD_LINE.search, out.stdout.splitlines()) if m]
