"""The mesh, agent side: render this service's ``MeshConfig`` and run the proxies beside it.

The agent renders the configuration from the bundle's ``mesh`` part (certificate, CA bundle,
rules) and the activation's TLS key, and starts ``python -m cloister.mesh --config
/dev/stdin`` as a separate process. The configuration, private key included, goes through that
process's standard input (a pipe): it is never written to any file system. The agent waits
for the mesh's ready line before it starts the program, so the program's first connection
already finds its egress listeners bound.

Order (see ``docs/mesh-in-sessions.md``): the agent starts the mesh only after every volume
was verified against the CAS's tag and mounted; the mesh certificate is the credential other
services trust, so it is used only by a workload whose state is known to be fresh.

This module does not decide who may call whom (the session does, via the CAS) and does not
proxy anything itself (``cloister.mesh`` does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Final

from cloister import errors, mesh, protocol

log = logging.getLogger(__name__)

READY_WAIT_SECONDS: Final = 60.0  # for the mesh to bind every listener
STOP_WAIT_SECONDS: Final = 20.0
_MAX_READY_LINE: Final = 4096


def render(bundle_mesh: protocol.BundleMesh, key_pem: str) -> dict[str, Any]:
    """The mesh configuration document (JSON-ready), checked by ``MeshConfig`` itself."""
    document: dict[str, Any] = {
        "identity": bundle_mesh.identity,
        "tls": {"cert_pem": bundle_mesh.certificate, "key_pem": key_pem, "ca_pem": bundle_mesh.ca},
        "ingress": [
            {"port": r.port, "app_port": r.app_port, "allow_from": list(r.allow_from)}
            for r in bundle_mesh.ingress
        ],
        "egress": [
            {"port": r.port, "target": r.target, "peer": r.peer} for r in bundle_mesh.egress
        ],
    }
    mesh.MeshConfig.from_json(json.dumps(document))  # refuse here, with the mesh's own message
    return document


@dataclass
class MeshProcess:
    proc: subprocess.Popen[bytes]
    ready_line: str

    @property
    def ports(self) -> dict[str, list[int]]:
        """Bound ports by direction, from the ready line (``ingress=8443 egress=15000``)."""
        out: dict[str, list[int]] = {}
        for word in self.ready_line.split():
            direction, eq, port = word.partition("=")
            if eq and port.isdigit():
                out.setdefault(direction, []).append(int(port))
        return out

    def stop(self) -> int:
        """SIGTERM (closes every connection), then wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start(bundle_mesh: protocol.BundleMesh, key_pem: str) -> MeshProcess:
    """Start the mesh process and return once it printed its ready line."""
    document = json.dumps(render(bundle_mesh, key_pem)).encode()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloister.mesh", "--config", "/dev/stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,  # the terminal's ^C goes to the program; the agent stops us
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(document)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it exited: reported below with its status
    del document
    try:
        line = _ready_line(proc)
    except BaseException:
        MeshProcess(proc, "").stop()
        raise
    finally:
        proc.stdout.close()
    log.info("mesh ready: %s", line.removeprefix(mesh.READY_LINE).strip())
    return MeshProcess(proc, line)


def _ready_line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = b""
    deadline = time.monotonic() + READY_WAIT_SECONDS
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, _MAX_READY_LINE)
            if not chunk:
                break
            buffer += chunk
            if b"\n" in buffer:
                line = buffer.split(b"\n", 1)[0].decode(errors="replace")
                if line.startswith(mesh.READY_LINE):
                    return line
                raise errors.BackendUnavailable(f"the mesh printed {line[:200]!r}, not ready")
            if len(buffer) > _MAX_READY_LINE:
                break
        elif proc.poll() is not None:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)
    raise errors.BackendUnavailable(
        f"the mesh did not become ready (exit status {proc.returncode})", reason="mesh-failed"
    )
