"""`session diff`: what an update changes, in the owner's words, before anyone signs it."""

from __future__ import annotations

from cloister.session import Session, diff

M1, M2 = "ab" * 32, "cd" * 32

OLD = f"""
name: app
version: "0.3"
services:
  - name: web
    command: web --port 80
    attestation: [{{mrenclave: {M1}}}]
  - name: gone
    attestation: [{{mrenclave: {M1}}}]
secrets:
  - {{name: password, kind: ascii}}
  - {{name: key, kind: private-key}}
  - {{name: kept, kind: private-key, migrate: true}}
  - {{name: ca, kind: x509-ca}}
  - {{name: dropped, kind: ascii}}
"""


def test_diff_names_services_measurements_secrets_and_access() -> None:
    old = Session.from_yaml(OLD)
    new_text = (
        OLD.replace("--port 80", "--port 8080")
        .replace(f"[{{mrenclave: {M1}}}]\n  - name: gone", f"[{{mrenclave: {M2}}}]\n  - name: new")
        .replace("{name: dropped, kind: ascii}", "{name: added, kind: binary}")
        .replace("{name: ca, kind: x509-ca}", "{name: ca, kind: x509-ca, common_name: New}")
        + "access_policy: {update: [NONE]}\n"
        + f"predecessor: {old.hash}\n"
    )
    lines = diff.diff(old.document, Session.from_yaml(new_text).document, old.hash)
    text = "\n".join(lines)
    assert '~ service web command: "web --port 80" -> "web --port 8080"' in text
    assert f'~ service web measurements: [{{"mrenclave": ["{M1}"]}}] -> ' in text
    assert "- service gone" in text and "+ service new" in text
    assert "- secret dropped (its value is dropped)" in text
    assert "+ secret added (binary)" in text
    assert "~ secret key: unchanged; new key (migrate: true is not set in both versions)" in text
    assert "secret kept" not in text and "secret password" not in text
    assert "CA rotated" in text
    assert "~ access_policy:" in text and "the current policy's update rule decides" in text
    assert not any(line.startswith("!") for line in lines)


def test_diff_warns_about_a_predecessor_the_cas_would_refuse() -> None:
    old = Session.from_yaml(OLD)
    lines = diff.diff(old.document, old.document, old.hash)
    assert lines[0].startswith("! predecessor is missing")
