"""`cloister demo` (what `make demo` runs) works end to end and says it is simulated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_succeeds_and_announces_simulation(tmp_path: Path) -> None:
    env = dict(os.environ, COLUMNS="200")
    result = subprocess.run(
        [sys.executable, "-m", "cloister", "demo", "--workdir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "SIMULATION MODE" in out
    assert "client: hello client, password accepted" in out
    assert "The call succeeded" in out
    # The demo cleans up after itself: no key material is left in its work directory.
    assert not any(p.name.endswith(".key") for p in tmp_path.rglob("*"))
