"""Secrets never leave: a full run, then every byte that left the CAS or the agent is searched.

The run: a real CAS (two workers, DEBUG logging) and a session with generated secrets of every
kind; an owner creates it; the real agent (``cloister run``) activates, and its program reports
what it received; an agent with the wrong measurement is refused; a non-owner tries to read
the session, asks for public secrets, sends broken and replayed activations; metrics are
scraped. The secret values come from what the workload legitimately received and from the
store itself (the CA's private key, which only the CAS ever holds, and the CAS's own identity
key).

Searched: the CAS's log (all its processes), the agents' stdout and stderr, every HTTP response
(bodies and headers) to the non-owner, every error message, and the metrics. Each secret is
searched for in every encoding a careless line could carry it in (text, hex, base64,
base64url, PEM, DER as base64, also with line breaks removed).
"""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from tests.integration.load.agents import TunedCas, activation_request, start_cas

from cloister import errors
from cloister.attestation import simulated
from cloister.client import CasClient, pinned_context
from cloister.secrets import SecretValue
from cloister.store import Keyring, Store, load_or_create_key

DUMP = """\
import json, os, sys
out = {"env": {k: v for k, v in os.environ.items() if k.startswith("APP_")},
       "argv": sys.argv[1:], "files": {}}
for p in sys.argv[2:]:
    out["files"][p] = open(p).read()
open(sys.argv[1], "w").write(json.dumps(out))
"""

SESSION = """\
name: leak
version: "0.3"
security: {{attestation: {{tolerate: [simulation]}}}}
services:
  - name: app
    image_name: app-image
    environment:
      APP_PASSWORD: $$SCONE::password$$
      APP_TOKEN: $$SCONE::token:hex$$
      APP_TOKEN64: $$SCONE::token:base64$$
    attestation: [{{tee: simulation, measurement: {measurement}}}]
secrets:
  - {{name: password, kind: ascii, size: 32}}
  - {{name: token, kind: binary, size: 32}}
  - {{name: signing, kind: private-key}}
  - {{name: ca, kind: x509-ca, common_name: Leak CA}}
  - {{name: tls, kind: x509, issuer: ca, common_name: app, dns: [app.local], endpoint: server}}
images:
  - name: app-image
    injection_files:
      - path: {files}/signing.pem
        content: $$SCONE::signing:key$$
      - path: {files}/tls.key
        content: $$SCONE::tls:key$$
      - path: {files}/tls.crt
        content: $$SCONE::tls:chain$$
"""


@dataclass
class Evidence:
    """Everything observable outside the TEEs, by where it came from."""

    texts: dict[str, str]

    def add(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        self.texts[where] = self.texts.get(where, "") + text + "\n"

    def add_response(self, where: str, resp: httpx.Response) -> None:
        headers = "\n".join(f"{k}: {v}" for k, v in resp.headers.items())
        self.add(where, f"HTTP {resp.status_code}\n{headers}\n\n{resp.text}")


def _forms(secret: bytes | str) -> set[str]:
    """The ways a secret value could be written into a line of text."""
    raw = secret.encode() if isinstance(secret, str) else secret
    b64 = base64.b64encode(raw).decode()
    out = {
        raw.hex(),
        raw.hex().upper(),
        b64,
        b64.rstrip("="),
        base64.urlsafe_b64encode(raw).decode(),
    }
    try:
        out.add(raw.decode())
    except UnicodeDecodeError:
        pass
    return {f for f in out if len(f) >= 16}


def _key_forms(der: bytes) -> set[str]:
    key = serialization.load_der_private_key(der, password=None)
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
    out = _forms(pkcs8) | _forms(der) | {body}
    # A wrapped PEM is found line by line too (each 64-character line is unique enough).
    out |= {line for line in pem.splitlines() if len(line) == 64}
    private_numbers = getattr(key, "private_numbers", None)
    if private_numbers is not None and hasattr(private_numbers(), "private_value"):
        value = private_numbers().private_value
        out |= _forms(value.to_bytes((value.bit_length() + 7) // 8, "big"))
    return out


@pytest.fixture
def leak_cas(tmp_path: Path) -> TunedCas:
    cas = start_cas(tmp_path, "--workers", "2", "--activation-rate", "0", "--session-rate", "0")
    return cas


def test_no_secret_value_or_private_key_leaves_the_tees(
    leak_cas: TunedCas, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cas = leak_cas
    seen = Evidence({})
    try:
        program = tmp_path / "dump.py"
        program.write_text(DUMP)
        files = tmp_path / "files"
        m = simulated.measure_files([program]).hex()
        session = tmp_path / "leak.yaml"
        session.write_text(SESSION.format(measurement=m, files=files))
        # The owner creates the session (its output is the owner's, but it is searched too).
        created = cas.cli("session", "create", str(session), "--cas", cas.url)
        seen.add("owner CLI", created.stdout + created.stderr)
        # The agent activates and execs the program, twice (secrets are stable).
        outs = []
        for i in range(2):
            out = tmp_path / f"out{i}.json"
            run = cas.cli(
                "run", "--cas", cas.url, "--session", "leak", "--service", "app",
                "--simulation", "--measure", str(program), "--",
                sys.executable, str(program), str(out),
                str(files / "signing.pem"), str(files / "tls.key"),
                check=False, env=dict(cas.env, CLOISTER_LOG_LEVEL="DEBUG"),
            )  # fmt: skip
            assert run.returncode == 0, run.stderr
            seen.add(f"agent {i} stdout+stderr", run.stdout + run.stderr)
            outs.append(json.loads(out.read_text()))
        # An agent with the wrong measurement is refused.
        other = tmp_path / "other.py"
        other.write_text("print('not the measured program')\n")
        refused = cas.cli(
            "run", "--cas", cas.url, "--session", "leak", "--service", "app", "--simulation",
            "--measure", str(other), "--", sys.executable, str(other),
            check=False, env=dict(cas.env, CLOISTER_LOG_LEVEL="DEBUG"),
        )  # fmt: skip
        assert refused.returncode != 0 and "measurement-mismatch" in refused.stderr
        seen.add("refused agent", refused.stdout + refused.stderr)
        _non_owner(cas, tmp_path, seen, monkeypatch)
    finally:
        cas.stop()
    seen.add("CAS log", cas.log.read_bytes())

    # The secret values of this run: what the workload received, and what only the CAS holds.
    received = outs[0]
    assert outs[1]["env"] == received["env"]
    password = received["env"]["APP_PASSWORD"]
    token = bytes.fromhex(received["env"]["APP_TOKEN"])
    assert len(password) == 32 and len(token) == 32
    signing_pem = received["files"][str(files / "signing.pem")].encode()
    signing = serialization.load_pem_private_key(signing_pem, None)
    signing_der = signing.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    secrets: dict[str, set[str]] = {
        "password": _forms(password),
        "token": _forms(token),
        "signing key": _key_forms(signing_der),
    }
    for i, got in enumerate(outs):
        tls_pem = got["files"][str(files / "tls.key")].encode()
        tls = serialization.load_pem_private_key(tls_pem, None)
        tls_der = tls.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        secrets[f"workload {i} TLS key"] = _key_forms(tls_der)
    ca_key, identity_key = _store_only_keys(cas)
    secrets["session CA key"] = _key_forms(ca_key)
    secrets["CAS identity key"] = _key_forms(identity_key)

    assert "CAS log" in seen.texts and len(seen.texts["CAS log"]) > 200  # the log was written
    # The search finds what it looks for: the workload's own report holds these secrets.
    report = json.dumps(received)
    for name in ("password", "token", "signing key"):
        assert _found(report, secrets[name]), name
    leaks = [
        f"{name} found in {where}"
        for where, text in seen.texts.items()
        for name, forms in secrets.items()
        if _found(text, forms)
    ]
    assert not leaks, leaks


def _found(text: str, forms: set[str]) -> bool:
    flat = text.replace("\n", "").replace("\r", "").replace("\\n", "")
    return any(form in text or form in flat for form in forms)


def _non_owner(
    cas: TunedCas, tmp_path: Path, seen: Evidence, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everything a non-owner can ask, and every answer it gets."""
    monkeypatch.setenv("CLOISTER_HOME", str(cas.home))
    stranger = tmp_path / "stranger.key"
    cas.cli("keys", "create", "--key", str(stranger))
    shown = cas.cli("session", "show", "leak", "--cas", cas.url, "--key", str(stranger),
                    check=False)  # fmt: skip
    assert shown.returncode != 0
    seen.add("non-owner session show", shown.stdout + shown.stderr)
    with httpx.Client(base_url=cas.url, verify=pinned_context(cas.pin), timeout=30) as http:
        for path in ("/v1/status", "/metrics", "/openapi.json", "/healthz", "/readyz",
                     "/v1/public/leak/password", "/v1/public/leak/token",
                     "/v1/public/leak/signing", "/v1/public/leak/ca",
                     "/v1/sessions/leak", "/v1/exists?session=leak&service=app"):  # fmt: skip
            seen.add_response(f"GET {path}", http.get(path))
        for body in ({}, {"tee": "simulation"}, {"session": "leak", "service": "app"}):
            seen.add_response("POST /v1/activate (broken)", http.post("/v1/activate", json=body))
        seen.add_response("PUT /v1/sessions/leak", http.put("/v1/sessions/leak", json={}))
    # A well-formed activation with evidence for another measurement, and a replayed nonce.
    with CasClient(cas.url, cert_pem=cas.pin) as client:
        nonce = client.nonce().nonce
        wrong = activation_request(nonce, session="leak", service="app")
        for _ in range(2):
            with pytest.raises(errors.Error) as refused:
                client.activate(wrong.request)
            seen.add("activation error", f"{refused.value.reason}: {refused.value.message}")
    with httpx.Client(base_url=cas.url, verify=pinned_context(cas.pin), timeout=30) as http:
        seen.add_response("GET /metrics (after)", http.get("/metrics"))


def _store_only_keys(cas: TunedCas) -> tuple[bytes, bytes]:
    """The session CA's private key and the CAS's identity key, read from the stopped CAS's
    store with its key: values no one outside the CAS ever sees."""
    key = load_or_create_key(cas.data_dir / "store.key")
    store = Store.open(f"sqlite:///{cas.data_dir / 'cas.db'}", Keyring.of([key]))
    try:
        stored = store.get_secret("leak", "ca")
        identity = store.get_meta("identity-key")
    finally:
        store.close()
    assert stored is not None and identity is not None
    ca = SecretValue.from_bytes(stored[1])
    assert ca.key is not None
    return ca.key, identity
