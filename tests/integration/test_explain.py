"""`cloister session explain` on real hardware evidence: accepted, or exactly why not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VECTORS = (
    Path(
        os.environ.get(
            "CLOISTER_TESTDATA", Path(__file__).resolve().parents[3] / "shared" / "testdata"
        )
    )
    / "attestation"
)
CASE = VECTORS / "sgx" / "dcapqvl-sgx-v3-00a067110000"
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
AT = "2025-07-19T10:01:17Z"


def _session(tmp_path: Path, mrenclave: str, tolerate: str, ignore: str) -> Path:
    f = tmp_path / "s.yaml"
    f.write_text(
        f"""
name: shop
version: "0.3"
security: {{attestation: {{tolerate: {tolerate}, ignore_advisories: {ignore}}}}}
services:
  - name: web
    attestation: [{{mrenclave: ["{mrenclave}"]}}]
"""
    )
    return f


def _explain(session: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloister", "session", "explain", str(session), "--service", "web",
         "--evidence", str(CASE / "evidence.bin"), "--collateral", str(CASE / "collateral"),
         "--json", *extra],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


TOLERATE = "[configuration-needed, software-hardening-needed]"
BOTH = "[INTEL-SA-00289, INTEL-SA-00615]"


@pytest.mark.parametrize(
    ("mrenclave", "tolerate", "ignore", "at", "accepted", "why"),
    [
        (MRENCLAVE, TOLERATE, BOTH, AT, True, None),
        (MRENCLAVE, "[]", BOTH, AT, False, "tcb-not-tolerated"),
        (MRENCLAVE, TOLERATE, "[INTEL-SA-00289]", AT, False, "INTEL-SA-00615"),
        ("44" * 32, TOLERATE, BOTH, AT, False, f"mrenclave is {MRENCLAVE}"),
        (MRENCLAVE, TOLERATE, BOTH, "2030-01-01T00:00:00Z", False, "collateral-expired"),
    ],
)
def test_explain_names_the_reason(
    tmp_path: Path,
    mrenclave: str,
    tolerate: str,
    ignore: str,
    at: str,
    accepted: bool,
    why: str | None,
) -> None:
    r = _explain(_session(tmp_path, mrenclave, tolerate, ignore), "--at", at)
    assert r.returncode == (0 if accepted else 1), r.stderr
    result = json.loads(r.stdout)
    assert result["accepted"] is accepted
    if why is not None:
        assert any(why in line for line in result["reasons"]), result["reasons"]


def test_explain_refuses_bad_usage(tmp_path: Path) -> None:
    r = _explain(_session(tmp_path, MRENCLAVE, "[]", "[]"), "--tee", "quantum")
    assert r.returncode == 2 and "--tee" in r.stderr
