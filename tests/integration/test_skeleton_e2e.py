"""The walking skeleton end to end: real CAS over HTTPS, real X.509, real SQLite, the agent.

Every refusal is checked for a clear one-line reason and for the program never starting.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from tests.conftest import CasProcess

from cloister import protocol
from cloister.agent import activation
from cloister.agent.evidence import SimulatedProvider
from cloister.attestation import binding, simulated
from cloister.client import CasClient, pin_path
from cloister.errors import AccessDenied, ConflictError, Error
from cloister.session import Session, public_key_of, signatures

DUMP = """\
import json, os, sys
out = {"env": {k: v for k, v in os.environ.items() if k.startswith("APP_")},
       "argv": sys.argv[1:], "cwd": os.getcwd(), "files": {}}
for p in sys.argv[2:]:
    out["files"][p] = open(p).read()
open(sys.argv[1], "w").write(json.dumps(out))
sys.exit(int(os.environ.get("APP_EXIT", "0")))
"""


def _session(
    measurement: str, files: Path, *, tolerate: str = "[simulation]", extra: str = ""
) -> str:
    alt = (
        f"{{tee: simulation, measurement: {measurement}}}"
        if "simulation" in tolerate
        else f"{{mrenclave: {measurement}}}"
    )
    return f"""
name: app
version: "0.3"
security: {{attestation: {{tolerate: {tolerate}}}}}
services:
  - name: app
    image_name: app-image
    environment:
      APP_PASSWORD: $$SCONE::password$$
      APP_TOKEN: $$SCONE::token:base64$$
      APP_EXIT: "3"
    attestation: [{alt}]
secrets:
  - {{name: password, kind: ascii, size: 20}}
  - {{name: token, kind: binary, size: 8}}
  - {{name: ca, kind: x509-ca, common_name: App CA}}
  - {{name: tls, kind: x509, issuer: ca, common_name: app, dns: [app.local], endpoint: server}}
images:
  - name: app-image
    injection_files:
      - path: {files}/tls.crt
        content: $$SCONE::tls:crt$$$$SCONE::tls:chain$$
      - path: {files}/tls.key
        content: $$SCONE::tls:key$$
      - path: {files}/ca.crt
        content: $$SCONE::ca:crt$$
      - path: {files}/app.conf
        content: "password=$$SCONE::password$$"
        permission: "0640"
{extra}"""


@pytest.fixture
def program(tmp_path: Path) -> Path:
    p = tmp_path / "dump.py"
    p.write_text(DUMP)
    return p


def _create(cas: CasProcess, tmp_path: Path, text: str) -> str:
    f = tmp_path / "session.yaml"
    f.write_text(text)
    return cas.cli("session", "create", str(f), "--cas", cas.url).stdout.strip()


def _run_agent(cas: CasProcess, program: Path, out: Path, *files: str, measure: Path | None = None):  # type: ignore[no-untyped-def]
    return cas.cli(
        "run", "--cas", cas.url, "--session", "app", "--service", "app", "--simulation",
        "--measure", str(measure or program), "--", sys.executable, str(program), str(out), *files,
        check=False,
    )  # fmt: skip


def test_program_starts_with_injected_environment_files_and_certificates(
    cas: CasProcess, tmp_path: Path, program: Path
) -> None:
    files = tmp_path / "files"
    m = simulated.measure_files([program]).hex()
    assert cas.cli("measure", str(program)).stdout.strip() == m
    digest = _create(cas, tmp_path, _session(m, files))
    assert digest == Session.from_yaml(_session(m, files)).hash
    out = tmp_path / "out.json"
    result = _run_agent(cas, program, out, str(files / "tls.crt"), str(files / "app.conf"))
    assert result.returncode == 3, result.stderr  # the program's own exit status
    seen = json.loads(out.read_text())
    password = seen["env"]["APP_PASSWORD"]
    assert len(password) == 20 and password.isalnum()
    assert len(base64.b64decode(seen["env"]["APP_TOKEN"])) == 8
    assert seen["files"][str(files / "app.conf")] == f"password={password}"
    assert (files / "app.conf").stat().st_mode & 0o777 == 0o640
    assert (files / "tls.key").stat().st_mode & 0o777 == 0o600
    # The certificate chain verifies to the session CA, and matches the workload's own key.
    chain = x509.load_pem_x509_certificates((files / "tls.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((files / "ca.crt").read_bytes())
    leaf = chain[0]
    assert chain[1] == ca
    leaf.verify_directly_issued_by(ca)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "app"
    assert leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName) == ["app.local"]
    key = serialization.load_pem_private_key((files / "tls.key").read_bytes(), None)
    assert key.public_key() == leaf.public_key()
    # A second activation: same generated secrets, a new certificate for a new key.
    out2 = tmp_path / "out2.json"
    assert _run_agent(cas, program, out2, str(files / "tls.crt")).returncode == 3
    seen2 = json.loads(out2.read_text())
    assert seen2["env"]["APP_PASSWORD"] == password
    assert seen2["files"][str(files / "tls.crt")] != seen["files"][str(files / "tls.crt")]


def test_wrong_measurement_is_refused_and_the_program_never_starts(
    cas: CasProcess, tmp_path: Path, program: Path
) -> None:
    _create(cas, tmp_path, _session("cd" * 32, tmp_path / "files"))
    out = tmp_path / "out.json"
    result = _run_agent(cas, program, out)
    assert result.returncode == 1
    assert "measurement-mismatch" in result.stderr
    reasons = [line for line in result.stderr.splitlines() if line.startswith("cloister:")]
    assert len(reasons) == 1 and reasons[0].startswith("cloister: error:")
    assert not out.exists()


def test_simulation_evidence_is_refused_where_not_tolerated(
    cas: CasProcess, tmp_path: Path, program: Path
) -> None:
    m = simulated.measure_files([program]).hex()
    _create(cas, tmp_path, _session(m, tmp_path / "files", tolerate="[]"))
    out = tmp_path / "out.json"
    result = _run_agent(cas, program, out)
    assert result.returncode == 1 and "simulation-not-tolerated" in result.stderr
    assert not out.exists()


def _direct_request(
    cas: CasProcess, measurement: bytes, *, nonce: str, other_key: bool = False
) -> protocol.ActivationRequest:
    platform = simulated.SimulatedPlatform.generate()
    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

    kem, dh = mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    hpke_pub = kem.public_key().public_bytes_raw() + dh.public_key().public_bytes_raw()
    tls = ec.generate_private_key(ec.SECP256R1())
    spki = tls.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    bound = spki
    if other_key:  # evidence bound to a key the request does not carry
        bound = (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    rd = binding.report_data_for(
        bytes.fromhex(nonce), protocol.activation_key_material(hpke_pub, bound)
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app")]))
        .sign(tls, hashes.SHA256())
    )
    return protocol.ActivationRequest(
        tee="simulation",
        evidence=base64.b64encode(platform.quote(measurement, rd)).decode(),
        nonce=nonce,
        hpke_public_key=base64.b64encode(hpke_pub).decode(),
        csr=csr.public_bytes(serialization.Encoding.PEM).decode(),
        session="app",
        service="app",
    )


def test_replayed_nonce_and_evidence_bound_to_another_key_are_refused(
    cas: CasProcess, tmp_path: Path, program: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOISTER_HOME", str(cas.home))
    m = simulated.measure_files([program])
    _create(cas, tmp_path, _session(m.hex(), tmp_path / "files"))
    with CasClient(cas.url) as client:
        nonce = client.nonce().nonce
        req = _direct_request(cas, m, nonce=nonce)
        assert client.activate(req).sealed_bundle
        with pytest.raises(Error) as replay:
            client.activate(req)
        assert replay.value.reason == "nonce-invalid"
        with pytest.raises(Error) as relay:
            client.activate(_direct_request(cas, m, nonce=client.nonce().nonce, other_key=True))
        assert relay.value.reason == "binding-mismatch"
        # The agent's own flow works against the same session.
        provider = SimulatedProvider(simulated.SimulatedPlatform.generate(), m)
        got = activation.activate(client, provider, "app", "app")
        assert got.bundle.environment["APP_EXIT"] == "3"


def test_updates_need_the_current_predecessor_and_an_allowed_signer(
    cas: CasProcess, tmp_path: Path, program: Path
) -> None:
    m = simulated.measure_files([program]).hex()
    files = tmp_path / "files"
    first = _create(cas, tmp_path, _session(m, files))
    upd = tmp_path / "update.yaml"
    # (a) no predecessor
    upd.write_text(_session(m, files).replace("size: 20", "size: 21"))
    r = cas.cli("session", "update", str(upd), "--cas", cas.url, check=False)
    assert r.returncode == 1 and "stale-predecessor" in r.stderr
    # (b) a wrong predecessor
    upd.write_text(_session(m, files, extra=f"predecessor: '{'0' * 64}'\n"))
    r = cas.cli("session", "update", str(upd), "--cas", cas.url, check=False)
    assert r.returncode == 1 and "stale-predecessor" in r.stderr
    # (c) the right predecessor, signed by a key the access policy does not name
    other = tmp_path / "other.key"
    cas.cli("keys", "create", "--key", str(other))
    upd.write_text(_session(m, files, extra=f"predecessor: {first}\n"))
    r = cas.cli("session", "update", str(upd), "--cas", cas.url, "--key", str(other), check=False)
    assert r.returncode == 1 and "not-authorized" in r.stderr
    # ... and a read by that key is refused too, while the owner reads.
    r = cas.cli("session", "show", "app", "--cas", cas.url, "--key", str(other), check=False)
    assert r.returncode == 1 and "not-authorized" in r.stderr
    # (d) the owner's update is accepted, and a replay of it is refused.
    second = cas.cli("session", "update", str(upd), "--cas", cas.url).stdout.strip()
    assert second != first
    r = cas.cli("session", "update", str(upd), "--cas", cas.url, check=False)
    assert r.returncode == 1 and "stale-predecessor" in r.stderr
    shown = cas.cli("session", "show", "app", "--cas", cas.url).stdout
    assert f"hash {second}" in shown and "version 2" in shown


def test_access_policy_can_name_other_owners(
    cas: CasProcess, tmp_path: Path, program: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOISTER_HOME", str(cas.home))
    reader = ed25519.Ed25519PrivateKey.generate()
    m = simulated.measure_files([program]).hex()
    text = _session(
        m,
        tmp_path / "f",
        extra=f"access_policy:\n  read: [{public_key_of(reader)}]\n  update: [NONE]\n",
    )
    digest = _create(cas, tmp_path, text)
    with CasClient(cas.url) as client:
        nonce = client.nonce().nonce
        sig = base64.b64encode(reader.sign(protocol.read_payload("app", nonce))).decode()
        view = client.read_session(
            "app", protocol.SignedRead(nonce=nonce, public_key=public_key_of(reader), signature=sig)
        )
        assert view.hash == digest
        # update: NONE means nobody, not even the creator.
        new = Session.from_yaml(text + f"predecessor: {digest}\n")
        owner_key = serialization.load_pem_private_key((cas.home / "owner.key").read_bytes(), None)
        assert isinstance(owner_key, ed25519.Ed25519PrivateKey)
        signed = protocol.SignedSession(
            session=text + f"predecessor: {digest}\n",
            signatures=[
                protocol.SessionSignature(
                    public_key=public_key_of(owner_key),
                    signature=signatures.sign(owner_key, "update", new.hash),
                )
            ],
        )
        with pytest.raises(AccessDenied):
            client.update_session("app", signed)
        # A signature made for "create" is not accepted as an update.
        with pytest.raises(ConflictError):
            client.create_session(
                protocol.SignedSession(
                    session=text,
                    signatures=[
                        protocol.SessionSignature(
                            public_key=public_key_of(owner_key),
                            signature=signatures.sign(
                                owner_key, "create", Session.from_yaml(text).hash
                            ),
                        )
                    ],
                )
            )


def test_malformed_session_files_are_refused_by_check(cas: CasProcess, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [oops\n")
    r = cas.cli("session", "check", str(bad), check=False)
    assert r.returncode == 1 and "not valid YAML" in r.stderr
    r = cas.cli("session", "check", str(tmp_path / "missing.yaml"), check=False)
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_restarted_cas_keeps_identity_sessions_and_secrets(
    cas: CasProcess, tmp_path: Path, program: Path
) -> None:
    m = simulated.measure_files([program]).hex()
    files = tmp_path / "files"
    digest = _create(cas, tmp_path, _session(m, files))
    out = tmp_path / "a.json"
    assert _run_agent(cas, program, out).returncode == 3
    before = json.loads(out.read_text())["env"]["APP_PASSWORD"]
    pin = pin_path(cas.url, cas.home).read_bytes()
    cas.stop()
    cas.start()
    # The old pin still works (same identity), the session and its secrets are there.
    assert f"hash {digest}" in cas.cli("session", "show", "app", "--cas", cas.url).stdout
    out2 = tmp_path / "b.json"
    assert _run_agent(cas, program, out2).returncode == 3
    assert json.loads(out2.read_text())["env"]["APP_PASSWORD"] == before
    assert pin_path(cas.url, cas.home).read_bytes() == pin


def test_cas_refuses_to_start_without_a_tee_unless_simulation(
    tmp_path: Path, cas: CasProcess
) -> None:
    r = cas.cli(
        "cas", "serve", "--data-dir", str(tmp_path / "x"), "--listen", "127.0.0.1:1", check=False
    )
    assert r.returncode == 3 and "--simulation" in r.stderr
    assert not (tmp_path / "x").exists()


def test_attest_refuses_a_simulation_cas_without_the_flag(cas: CasProcess, tmp_path: Path) -> None:
    env = dict(cas.env, CLOISTER_HOME=str(tmp_path / "fresh"))
    r = cas.cli("cas", "attest", cas.url, env=env, check=False)
    assert r.returncode == 1 and "simulation" in r.stderr
    assert not pin_path(cas.url, tmp_path / "fresh").exists()
    r = cas.cli("session", "show", "app", "--cas", cas.url, env=env, check=False)
    assert r.returncode == 1 and "cas attest" in r.stderr
