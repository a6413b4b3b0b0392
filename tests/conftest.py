"""Fixtures shared by the whole suite: a real CAS over HTTPS on loopback, owner keys, sessions."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"CAS exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@dataclass
class CasProcess:
    """A `cloister cas serve --simulation` subprocess on a free loopback port."""

    data_dir: Path
    home: Path
    port: int
    log: Path
    db: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, CLOISTER_HOME=str(self.home), CLOISTER_LOG_LEVEL="INFO")

    def start(self) -> None:
        cmd = [sys.executable, "-m", "cloister", "cas", "serve", "--simulation",
               "--data-dir", str(self.data_dir), "--listen", f"127.0.0.1:{self.port}"]  # fmt: skip
        if self.db:
            cmd += ["--db", self.db]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log)
        wait_port(self.port, self.proc)

    def stop(self, sig: int = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cli(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-m", "cloister", *args],
            env=env or self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if check and out.returncode != 0:
            raise AssertionError(
                f"cloister {' '.join(args)} failed ({out.returncode}): {out.stderr}"
            )
        return out


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[CasProcess]:
    """A running simulation CAS, attested and pinned, with an owner key in its CLOISTER_HOME."""
    proc = CasProcess(tmp_path / "cas", tmp_path / "home", free_port(), tmp_path / "cas.log")
    proc.start()
    try:
        proc.cli("cas", "attest", proc.url, "--allow-simulation")
        proc.cli("keys", "create")
        yield proc
    finally:
        proc.stop()
