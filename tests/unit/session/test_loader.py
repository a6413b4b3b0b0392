"""The session loader: what it accepts, what it refuses and with which message, and the hash."""

from __future__ import annotations

import pytest

from cloister.errors import SessionError
from cloister.session import Session

M32 = "ab" * 32

VALID = f"""
name: shop/web
version: "0.3"
security:
  attestation:
    tolerate: [simulation, debug-mode]
services:
  - name: web
    image_name: web-image
    command: python3 app.py --token $$SCONE::token:hex$$
    environment:
      PORT: 8443
      DEBUG: false
      PASSWORD: $$SCONE::password$$
    pwd: /app
    attestation:
      - tee: simulation
        measurement: {M32}
      - mrenclave: ["{M32}"]
secrets:
  - name: password
    kind: ascii
    size: 20
  - name: token
    kind: binary
    size: 16
  - name: explicit
    kind: ascii
    value: hello
  - name: signing
    kind: private-key
  - name: ca
    kind: x509-ca
    common_name: Shop CA
  - name: tls
    kind: x509
    issuer: ca
    common_name: web
    dns: [web.shop, localhost]
    ip: 127.0.0.1
    endpoint: server
    valid_for: 30 days
images:
  - name: web-image
    injection_files:
      - path: /etc/web/tls.pem
        content: $$SCONE::tls:crt$$$$SCONE::tls.key$$
        permission: "0600"
      - path: /etc/web/config
        content: "key=$$SCONE::signing:key$$ ca=$$SCONE::ca:chain$$ b=$$SCONE::token:base64$$"
"""


def test_a_valid_session_loads_with_its_meaning() -> None:
    s = Session.from_yaml(VALID)
    assert s.name == "shop/web"
    web = s.service("web")
    assert web is not None
    assert web.argv() == ["python3", "app.py", "--token", "$$SCONE::token:hex$$"]
    assert web.environment["PORT"] == "8443" and web.environment["DEBUG"] == "false"
    assert [a.tee for a in web.attestation] == ["simulation", "sgx"]
    assert s.document.access_policy.read == ["CREATOR"]
    assert len(s.hash) == 64


def test_unquoted_version_is_read_as_a_string() -> None:
    assert Session.from_yaml(VALID.replace('version: "0.3"', "version: 0.3")).hash


def test_hash_is_independent_of_formatting_and_changes_with_meaning() -> None:
    a = Session.from_yaml(VALID)
    reformatted = Session.from_yaml(Session.from_yaml(VALID).to_yaml())
    assert reformatted.hash == a.hash
    changed = Session.from_yaml(VALID.replace("size: 20", "size: 21"))
    assert changed.hash != a.hash


REFUSALS = [
    ("unknown top-level key", "name: x\nversion: '0.3'\nfoo: 1\n", "foo: unknown key"),
    ("unknown service key", VALID.replace("pwd: /app", "pwdd: /app"), "pwdd: unknown key"),
    ("missing name", "version: '0.3'\n", "name: required key is missing"),
    ("unsupported version", "name: x\nversion: '0.2'\n", "not supported"),
    ("not a mapping", "- a\n- b\n", "YAML mapping"),
    ("malformed YAML", "name: [x\n", "not valid YAML"),
    ("dangling issuer", VALID.replace("issuer: ca", "issuer: nope"), "names issuer 'nope'"),
    (
        "issuer that is not a CA",
        VALID.replace("issuer: ca", "issuer: password"),
        "not an x509-ca secret",
    ),
    (
        "unknown placeholder",
        VALID.replace("$$SCONE::password$$", "$$SCONE::passwd$$"),
        "names secret 'passwd', which is not defined",
    ),
    (
        "impossible format",
        VALID.replace("$$SCONE::password$$", "$$SCONE::password:crt$$"),
        "cannot be rendered as 'crt'",
    ),
    (
        "service without attestation",
        "name: x\nversion: '0.3'\nservices: [{name: a}]\n",
        "has no attestation rule",
    ),
    (
        "alternative without measurement",
        "name: x\nversion: '0.3'\nservices: [{name: a, attestation: [{isvsvn: 2}]}]\n",
        "has no measurement constraint",
    ),
    (
        "simulation not tolerated",
        f"name: x\nversion: '0.3'\nservices: [{{name: a, attestation: "
        f"[{{tee: simulation, measurement: {M32}}}]}}]\n",
        "does not list 'simulation'",
    ),
    (
        "bad measurement",
        VALID.replace(f"measurement: {M32}", "measurement: xyz"),
        "measurement must be 32 bytes of hex",
    ),
    (
        "key of another TEE",
        VALID.replace(f"measurement: {M32}", f"measurement: {M32}\n        mrtd: {M32}"),
        "do not apply to tee 'simulation'",
    ),
    ("unknown toleration", VALID.replace("debug-mode]", "debug]"), "unknown toleration"),
    (
        "duplicate secret",
        VALID.replace("name: token", "name: password"),
        "defined more than once: password",
    ),
    ("unknown image", VALID.replace("image_name: web-image", "image_name: x"), "names image 'x'"),
    (
        "relative injection path",
        VALID.replace("path: /etc/web/config", "path: etc/web/config"),
        "must be absolute",
    ),
    (
        "bad access policy key",
        VALID + "access_policy: {read: [somebody]}\n",
        "is not CREATOR, NONE or an owner public key",
    ),
    ("bad duration", VALID.replace("30 days", "a month"), "cannot read duration"),
    ("bad predecessor", VALID + "predecessor: abc\n", "predecessor must be 32 bytes of hex"),
]


@pytest.mark.parametrize(("case", "text", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_load_time_mistakes_are_refused_with_a_precise_message(
    case: str, text: str, message: str
) -> None:
    with pytest.raises(SessionError) as err:
        Session.from_yaml(text)
    assert message in str(err.value), case


def test_oversized_session_is_refused_before_parsing() -> None:
    with pytest.raises(SessionError, match="larger than"):
        Session.from_yaml("name: x\n" + "#" * (2 * 1024 * 1024))
