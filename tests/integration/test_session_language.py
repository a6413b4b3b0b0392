"""The session language against a real CAS process: governance, namespaces, sharing between
sessions, public exports, second factors, host arguments, migration, diff and RA-TLS.

Owners sign with the CLI (``session sign`` / ``--signatures``) or in-process; workloads run
through the real agent (``cloister run --simulation``) and dump what they received.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from tests.conftest import CasProcess

from cloister import protocol
from cloister import secrets as secretlib
from cloister.attestation import simulated
from cloister.client import CasClient, pin_path
from cloister.errors import AccessDenied, Error
from cloister.session import Session, public_key_of, signatures

DUMP = """\
import json, os, sys
out = {"env": {k: v for k, v in os.environ.items() if k.startswith("APP_")},
       "argv": sys.argv[1:]}
open(os.environ.get("APP_OUT") or sys.argv[1], "w").write(json.dumps(out))
"""


@pytest.fixture
def program(tmp_path: Path) -> Path:
    p = tmp_path / "dump.py"
    p.write_text(DUMP)
    return p


@pytest.fixture
def measurement(program: Path) -> str:
    return simulated.measure_files([program]).hex()


def new_key(tmp_path: Path, name: str) -> tuple[Path, ed25519.Ed25519PrivateKey]:
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / f"{name}.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path, key


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def upload(
    cas: CasProcess, text: str, keys: list[ed25519.Ed25519PrivateKey], *, update: bool = False
) -> protocol.SessionAccepted:
    session = Session.from_yaml(text)
    op = "update" if update else "create"
    signed = protocol.SignedSession(
        session=text,
        signatures=[
            protocol.SessionSignature(
                public_key=public_key_of(k), signature=signatures.sign(k, op, session.hash)
            )
            for k in keys
        ],
    )
    with CasClient(cas.url, cert_pem=pin_path(cas.url, cas.home).read_bytes()) as client:
        if update:
            return client.update_session(session.name, signed)
        return client.create_session(signed)


def owner(cas: CasProcess) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key((cas.home / "owner.key").read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key


def run_agent(
    cas: CasProcess,
    program: Path,
    out: Path,
    config_id: str,
    *args: str,
    env: dict[str, str] | None = None,
) -> tuple[int, str, dict[str, object]]:
    full = dict(cas.env, SCONE_CONFIG_ID=config_id, APP_OUT=str(out), **(env or {}))
    r = cas.cli(
        "run", "--cas", cas.url, "--simulation", "--measure", str(program), "--",
        sys.executable, str(program), *args, check=False, env=full,
    )  # fmt: skip
    seen = json.loads(out.read_text()) if out.exists() else {}
    return r.returncode, r.stderr, seen


def service(name: str, measurement: str, extra: str = "", *, env: str = "") -> str:
    return f"""
  - name: {name}
    environment: {{APP_SESSION: "1"{env}}}
    attestation: [{{tee: simulation, measurement: {measurement}}}]{extra}"""


SIM = "security: {attestation: {tolerate: [simulation]}}\n"


def test_two_of_three_owners_sign_offline_and_one_uploads(cas: CasProcess, tmp_path: Path) -> None:
    (k1, a), (k2, b), (k3, c) = (new_key(tmp_path, n) for n in ("a", "b", "c"))
    policy = "access_policy:\n  update:\n    - require-at-least-2:\n" + "".join(
        f"        - signer: {public_key_of(k)}\n" for k in (a, b, c)
    )
    first = upload(cas, f"name: gov\nversion: '0.3'\n{policy}", [owner(cas)])
    text = f"name: gov\nversion: '0.3'\npredecessor: {first.hash}\n{policy}"
    doc = write(tmp_path, "gov.yaml", text + "secrets: [{name: s, kind: ascii}]\n")
    sig = doc.with_name("gov.yaml.sig.json")
    # One owner's signature (and the creator's, who is not named) is too short a set.
    cas.cli("session", "sign", str(doc), "--key", str(k1))
    r = cas.cli("session", "update", str(doc), "--cas", cas.url, "--signatures", str(sig),
                check=False)  # fmt: skip
    assert r.returncode == 1 and "not-authorized" in r.stderr
    assert len(json.loads(sig.read_text())["signatures"]) == 1
    # A second owner signs offline; whoever uploads sends both.
    cas.cli("session", "sign", str(doc), "--key", str(k3))
    body = json.loads(sig.read_text())
    assert body["operation"] == "update" and len(body["signatures"]) == 2
    r = cas.cli("session", "update", str(doc), "--cas", cas.url, "--signatures", str(sig),
                "--key", str(k2))  # fmt: skip
    assert r.stdout.strip() == Session.from_yaml(doc.read_text()).hash
    # Signatures collected for another version of the document are refused before upload.
    doc.write_text(doc.read_text().replace("kind: ascii", "kind: binary"))
    r = cas.cli("session", "update", str(doc), "--cas", cas.url, "--signatures", str(sig),
                check=False)  # fmt: skip
    assert r.returncode == 2 and "another version" in r.stderr


def test_changing_the_access_policy_needs_the_current_owners(
    cas: CasProcess, tmp_path: Path
) -> None:
    _, a = new_key(tmp_path, "a")
    _, b = new_key(tmp_path, "b")
    policy = f"access_policy: {{update: [{public_key_of(a)}]}}\n"
    first = upload(cas, f"name: p\nversion: '0.3'\n{policy}", [owner(cas)])
    takeover = (
        f"name: p\nversion: '0.3'\npredecessor: {first.hash}\n"
        f"access_policy: {{update: [{public_key_of(b)}]}}\n"
    )
    # The new owner alone cannot install itself, nor can the creator who is not named.
    for keys in ([b], [owner(cas)]):
        with pytest.raises(AccessDenied) as err:
            upload(cas, takeover, keys, update=True)
        assert err.value.reason == "not-authorized"
    second = upload(cas, takeover, [a], update=True)
    # From now on the new policy is in force.
    nxt = f"name: p\nversion: '0.3'\npredecessor: {second.hash}\naccess_policy: {{update: [ANY]}}\n"
    with pytest.raises(AccessDenied):
        upload(cas, nxt, [a], update=True)
    upload(cas, nxt, [b], update=True)


def test_sessions_in_a_namespace_need_the_parents_create_sessions_rule(
    cas: CasProcess, tmp_path: Path
) -> None:
    _, a = new_key(tmp_path, "a")
    policy = f"access_policy: {{create_sessions: [{public_key_of(a)}]}}\n"
    upload(cas, f"name: org\nversion: '0.3'\n{policy}", [owner(cas)])
    with pytest.raises(AccessDenied) as err:
        upload(cas, "name: org/proj\nversion: '0.3'\n", [owner(cas)])
    assert err.value.reason == "not-authorized"
    upload(cas, "name: org/proj\nversion: '0.3'\n", [a])
    # create_sessions defaults to the parent's update rule (here: its creator, a).
    with pytest.raises(AccessDenied):
        upload(cas, "name: org/proj/x\nversion: '0.3'\n", [owner(cas)])
    upload(cas, "name: org/proj/x\nversion: '0.3'\n", [a])
    with pytest.raises(AccessDenied) as err:
        upload(cas, "name: nowhere/x\nversion: '0.3'\n", [owner(cas)])
    assert err.value.reason == "no-such-namespace"


def exporter(measurement: str, *, exported: bool = True, predecessor: str = "") -> str:
    export = ", export: {session: client}" if exported else ""
    return f"""name: platform
version: "0.3"
{predecessor}{SIM}services:{service("svc", measurement, env=", APP_TOKEN: $$SCONE::token$$")}
secrets:
  - {{name: token, kind: ascii{export}}}
  - {{name: cakey, kind: private-key, migrate: true, export: [{{session: client}}]}}
  - name: ca
    kind: x509-ca
    private_key: cakey
    export_public: true
    export: {{session: client}}
  - {{name: hidden, kind: ascii}}
"""


def client_session(measurement: str, secret: str = "token") -> str:  # noqa: S107 - a name
    env = ", APP_TOKEN: $$SCONE::token$$, APP_CERT: $$SCONE::tls$$, APP_CA: $$SCONE::ca:crt$$"
    return f"""name: client
version: "0.3"
{SIM}services:{service("app", measurement, env=env)}
secrets:
  - {{name: token, import: {{session: platform, secret: {secret}}}}}
  - {{name: ca, kind: x509-ca, import: {{session: platform, secret: ca}}}}
  - {{name: tls, kind: x509, issuer: ca, endpoint: client}}
"""


def test_import_export_public_export_and_revocation(
    cas: CasProcess, tmp_path: Path, program: Path, measurement: str
) -> None:
    first = upload(cas, exporter(measurement), [owner(cas)])
    # An import of a secret that is not exported to the importer is refused at upload.
    with pytest.raises(AccessDenied) as err:
        upload(cas, client_session(measurement, secret="hidden"), [owner(cas)])
    assert err.value.reason == "import-revoked" and "does not export it" in err.value.message
    upload(cas, client_session(measurement), [owner(cas)])
    code, stderr, mine = run_agent(cas, program, tmp_path / "p.json", "platform/svc")
    assert code == 0, stderr
    code, stderr, seen = run_agent(cas, program, tmp_path / "c.json", "client/app")
    assert code == 0, stderr
    env = seen["env"]
    assert isinstance(env, dict) and isinstance(mine["env"], dict)
    assert env["APP_TOKEN"] == mine["env"]["APP_TOKEN"]
    # The importer's certificate is issued by the exporter's CA (whose key is exported too).
    ca = x509.load_pem_x509_certificate(env["APP_CA"].encode())
    x509.load_pem_x509_certificate(env["APP_CERT"].encode()).verify_directly_issued_by(ca)
    # export_public: anyone may fetch the CA certificate, never a key, and nothing else.
    cert_pem = pin_path(cas.url, cas.home).read_bytes()
    with httpx.Client(verify=_ctx(cert_pem)) as http:
        got = http.get(f"{cas.url}/v1/public/platform/ca")
        assert got.status_code == 200 and "PRIVATE KEY" not in got.text
        assert x509.load_pem_x509_certificates(got.text.encode()) == [ca]
        for path in ("platform/token", "platform/hidden", "nope/ca"):
            assert http.get(f"{cas.url}/v1/public/{path}").status_code == 404
    # The exporter withdraws the export by updating its session: activation now fails.
    upload(
        cas,
        exporter(measurement, exported=False, predecessor=f"predecessor: {first.hash}\n"),
        [owner(cas)],
        update=True,
    )
    code, stderr, _ = run_agent(cas, program, tmp_path / "c2.json", "client/app")
    assert code == 1 and "import-revoked" in stderr


def _ctx(cert_pem: bytes):  # type: ignore[no-untyped-def]
    from cloister.client import pinned_context

    return pinned_context(cert_pem)


def test_one_time_password_and_service_access_token(
    cas: CasProcess, tmp_path: Path, program: Path, measurement: str
) -> None:
    shared = base64.b32encode(os.urandom(20)).decode().rstrip("=")
    upload(
        cas,
        f"""name: otp
version: "0.3"
security:
  service_access_token: let-me-in
  attestation:
    tolerate: [simulation]
    one_time_password_shared_secret: {shared}
services:{service("svc", measurement)}
""",
        [owner(cas)],
    )
    token = {"SCONE_SERVICE_ACCESS_TOKEN": "let-me-in"}
    code, stderr, _ = run_agent(cas, program, tmp_path / "a.json", "otp/svc", env=token)
    assert code == 1 and "otp-invalid" in stderr
    now = datetime.now(UTC)
    valid = {secretlib.totp_now(shared, now + timedelta(seconds=s)) for s in (-30, 0, 30, 60)}
    wrong = next(f"{n:06d}" for n in range(10) if f"{n:06d}" not in valid)
    code, stderr, _ = run_agent(cas, program, tmp_path / "b.json", f"otp/svc@{wrong}", env=token)
    assert code == 1 and "otp-invalid" in stderr
    otp = secretlib.totp_now(shared, datetime.now(UTC))
    code, stderr, _ = run_agent(cas, program, tmp_path / "c.json", f"otp/svc@{otp}")
    assert code == 1 and "access-token-invalid" in stderr
    code, stderr, seen = run_agent(cas, program, tmp_path / "d.json", f"otp/svc@{otp}", env=token)
    assert code == 0, stderr
    assert "SCONE_SERVICE_ACCESS_TOKEN" not in json.dumps(seen)
    # A one-time password is good for one start.
    code, stderr, _ = run_agent(cas, program, tmp_path / "e.json", f"otp/svc@{otp}", env=token)
    assert code == 1 and "otp-replayed" in stderr


def test_host_arguments_and_environment_are_filled_by_the_agent(
    cas: CasProcess, tmp_path: Path, program: Path, measurement: str
) -> None:
    out = tmp_path / "h.json"
    upload(
        cas,
        f"""name: host
version: "0.3"
{SIM}services:
  - name: svc
    command: ["{sys.executable}", "{program}", "{out}", "fixed", "@@2", "--x=@@1"]
    environment:
      \\@\\@APP_FROM_HOST: session-value-not-used
      "@@APP_MISSING": ""
      APP_OUT: {out}
    attestation: [{{tee: simulation, measurement: {measurement}}}]
""",
        [owner(cas)],
    )
    env = dict(cas.env, SCONE_CONFIG_ID="host/svc", APP_FROM_HOST="host-value")

    def host(*argv: str) -> tuple[int, str]:
        # What the operator starts: the program and its arguments (@@1 is the first).
        r = cas.cli("run", "--cas", cas.url, "--simulation", "--measure", str(program), "--",
                    "the-program", *argv, check=False, env=env)  # fmt: skip
        return r.returncode, r.stderr

    code, stderr = host("one", "two")
    assert code == 0, stderr
    seen = json.loads(out.read_text())
    assert seen["argv"] == [str(out), "fixed", "two", "--x=one"]
    assert seen["env"] == {"APP_FROM_HOST": "host-value", "APP_MISSING": "", "APP_OUT": str(out)}
    # A position the operator did not give is refused; the program never starts.
    out.unlink()
    code, stderr = host("only-one")
    assert code == 1 and "@@2" in stderr and not out.exists()


def test_update_migrates_values_as_scone_defines(
    cas: CasProcess, tmp_path: Path, program: Path, measurement: str
) -> None:
    env = ", APP_A: $$SCONE::a$$, APP_K: $$SCONE::k$$, APP_M: $$SCONE::m$$, APP_C: $$SCONE::c$$"
    secrets = """secrets:
  - {name: a, kind: ascii}
  - {name: k, kind: private-key}
  - {name: m, kind: private-key, migrate: true}
  - {name: ca, kind: x509-ca}
  - {name: c, kind: x509, issuer: ca, private_key: m}
"""
    services = service("svc", measurement, env=env)
    text = f"name: mig\nversion: '0.3'\n{SIM}services:{services}\n{secrets}"
    first = upload(cas, text, [owner(cas)])
    _, _, before = run_agent(cas, program, tmp_path / "1.json", "mig/svc")
    old = tmp_path / "old.yaml"
    old.write_text(text)
    new = write(tmp_path, "new.yaml", text + f"predecessor: {first.hash}\n")
    diff = cas.cli("session", "diff", str(old), str(new)).stdout
    assert "secret k: unchanged; new key (migrate: true is not set in both versions)" in diff
    assert "secret c: unchanged; certificate reissued" in diff
    assert "secret a" not in diff and "secret m" not in diff
    upload(cas, new.read_text(), [owner(cas)], update=True)
    _, _, after = run_agent(cas, program, tmp_path / "2.json", "mig/svc")
    b, a = before["env"], after["env"]
    assert isinstance(a, dict) and isinstance(b, dict)
    assert a["APP_A"] == b["APP_A"] and a["APP_M"] == b["APP_M"]
    assert a["APP_K"] != b["APP_K"]
    assert a["APP_C"] != b["APP_C"]  # reissued, for the same migrated key
    old_c = x509.load_pem_x509_certificate(b["APP_C"].encode())
    new_c = x509.load_pem_x509_certificate(a["APP_C"].encode())
    assert old_c.public_key() == new_c.public_key()


def test_check_names_what_does_not_apply_and_attest_reads_the_certificates_evidence(
    cas: CasProcess, tmp_path: Path
) -> None:
    doc = write(
        tmp_path,
        "w.yaml",
        "name: w\nversion: '0.3'\nsecret_config: {store_in: !akv {vault: v}}\n",
    )
    r = cas.cli("session", "check", str(doc))
    assert "warning: secret_config.store_in: !akv" in r.stderr and "w: valid" in r.stdout
    fspf = write(
        tmp_path, "f.yaml", "name: f\nversion: '0.3'\nservices: [{name: a, fspf_path: /x}]\n"
    )
    r = cas.cli("session", "check", str(fspf), check=False)
    assert r.returncode == 1 and "services[0].fspf_path" in r.stderr
    r = cas.cli("cas", "attest", cas.url, "--allow-simulation")
    assert "evidence in the TLS certificate verified" in r.stdout


def test_attestation_off_is_loud_and_an_expired_explicit_certificate_is_refused(
    cas: CasProcess, tmp_path: Path, program: Path
) -> None:
    from cloister import pki

    _, expired = pki.new_ca(
        "old", now=datetime.now(UTC) - timedelta(days=10), valid_for=timedelta(days=1)
    )
    block = "\n".join("      " + line for line in pki.pem(expired).splitlines())
    upload(
        cas,
        f"""name: dev
version: "0.3"
security: {{attestation: {{mode: none, tolerate: [no-attestation]}}}}
services:
  - name: open
    environment: {{APP_X: "1"}}
  - name: stale
    environment: {{APP_CA: $$SCONE::old$$}}
secrets:
  - name: old
    kind: x509-ca
    value: |
{block}
""",
        [owner(cas)],
    )
    # Any "measurement" is accepted: attestation is off, and the CAS says so every time.
    code, stderr, _ = run_agent(cas, program, tmp_path / "o.json", "dev/open")
    assert code == 0, stderr
    assert "ATTESTATION IS OFF" in cas.log.read_text()
    code, stderr, _ = run_agent(cas, program, tmp_path / "s.json", "dev/stale")
    assert code == 1 and "certificate-expired" in stderr


def test_refusals_reach_the_owner_with_a_reason(cas: CasProcess, tmp_path: Path) -> None:
    # A signature over another operation does not count.
    text = "name: r\nversion: '0.3'\n"
    session = Session.from_yaml(text)
    k = owner(cas)
    signed = protocol.SignedSession(
        session=text,
        signatures=[
            protocol.SessionSignature(
                public_key=public_key_of(k), signature=signatures.sign(k, "update", session.hash)
            )
        ],
    )
    with CasClient(cas.url, cert_pem=pin_path(cas.url, cas.home).read_bytes()) as client:
        with pytest.raises(Error) as err:
            client.create_session(signed)
    assert err.value.reason == "unsigned"
