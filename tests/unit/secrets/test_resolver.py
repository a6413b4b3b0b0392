"""Secret values across activations, session updates, imports, renewal and CA rotation.

The store here is an in-memory stand-in with the same contract as ``cloister.store.Store``
(create once per session, name and kind; replace). Every instant is fixed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from cloister import pki
from cloister import secrets as lib
from cloister.errors import AccessDenied, SessionError
from cloister.session import Session, template

NOW = datetime(2026, 1, 1, tzinfo=UTC)
M32 = "ab" * 32


class MemoryStore:
    def __init__(self) -> None:
        self.values: dict[tuple[str, str], tuple[str, bytes]] = {}

    def create_secret(self, session: str, name: str, kind: str, make: Callable[[], bytes]) -> bytes:
        got = self.values.get((session, name))
        if got is None or got[0] != kind:
            self.values[(session, name)] = (kind, make())
        return self.values[(session, name)][1]

    def replace_secret(self, session: str, name: str, kind: str, value: bytes) -> None:
        self.values[(session, name)] = (kind, value)


def doc(name: str, secrets: str, extra: str = "") -> Session:
    return Session.from_yaml(f"name: {name}\nversion: '0.3'\nsecrets:\n{secrets}\n{extra}")


def resolver(
    store: MemoryStore,
    session: Session,
    now: datetime = NOW,
    sessions: dict[str, Session] | None = None,
    key: pki.PublicKey | None = None,
) -> lib.Resolver:
    known = sessions or {}

    def lookup(name: str) -> tuple[Session, str] | None:
        s = known.get(name)
        return None if s is None else (s, s.hash)

    return lib.Resolver(store, session, session.hash, now=now, lookup=lookup, workload_key=key)


def text(r: lib.Resolver, placeholder: str) -> str:
    return template.render(placeholder, r.session.kinds(), r.text)


def data(r: lib.Resolver, placeholder: str) -> bytes:
    return template.render_bytes(placeholder, r.session.kinds(), r.data)


KINDS = """
  - {name: a, kind: ascii, size: 12}
  - {name: b, kind: binary, size: 16}
  - {name: bx, kind: binary, value: DEADBEEF}
  - {name: k256, kind: private-key}
  - {name: k384, kind: private-key, key_type: P-384}
  - {name: ked, kind: private-key, key_type: Ed25519, migrate: true}
  - {name: krsa, kind: private-key, key_type: RSA-2048}
  - {name: cakey, kind: private-key, migrate: true}
  - {name: ca, kind: x509-ca, private_key: cakey, common_name: Test CA}
  - {name: srvkey, kind: private-key}
  - name: srv
    kind: x509
    issuer: ca
    private_key: srvkey
    endpoint: server
    san: ["dns:db.example", "ip:10.0.0.1"]
    valid_for: 30 days
  - {name: self, kind: x509, private_key: srvkey, endpoint: client}
"""


def test_every_kind_and_format_renders_with_its_meaning() -> None:
    s = doc("app", KINDS)
    r = resolver(MemoryStore(), s)
    assert len(text(r, "$$SCONE::a$$")) == 12
    raw = data(r, "$$SCONE::b$$")
    assert len(raw) == 16
    assert text(r, "$$SCONE::b:hex$$") == raw.hex()
    assert base64.b64decode(text(r, "$$SCONE::b:base64$$")) == raw
    assert base64.urlsafe_b64decode(text(r, "$$SCONE::b:base64url$$")) == raw
    assert base64.b32decode(text(r, "$$SCONE::b:base32$$")) == raw
    assert "=" not in text(r, "$$SCONE::b:base32nopad$$")
    assert data(r, "$$SCONE::bx$$") == bytes.fromhex("deadbeef")
    assert data(r, "$$SCONE::bx.hex$$") == b"deadbeef"  # legacy suffix
    for name, kind in [
        ("k256", ec.EllipticCurvePrivateKey),
        ("k384", ec.EllipticCurvePrivateKey),
        ("ked", ed25519.Ed25519PrivateKey),
        ("krsa", rsa.RSAPrivateKey),
    ]:
        pem = text(r, f"$$SCONE::{name}$$")
        assert isinstance(serialization.load_pem_private_key(pem.encode(), None), kind)
        der = data(r, f"$$SCONE::{name}:pkcs8:der$$")
        assert serialization.load_der_private_key(der, None).public_key() == (
            serialization.load_pem_private_key(pem.encode(), None).public_key()
        )
    assert (
        serialization.load_pem_private_key(text(r, "$$SCONE::k384$$").encode(), None).curve.name
        == "secp384r1"
    )  # type: ignore[union-attr]
    ca = x509.load_pem_x509_certificate(text(r, "$$SCONE::ca$$").encode())
    leaf = x509.load_pem_x509_certificate(text(r, "$$SCONE::srv:crt$$").encode())
    leaf.verify_directly_issued_by(ca)
    assert x509.load_der_x509_certificate(data(r, "$$SCONE::srv:crt:der$$")) == leaf
    # :chain is the issuer chain without the certificate itself; legacy .chain is root first.
    assert x509.load_pem_x509_certificates(text(r, "$$SCONE::srv:chain$$").encode()) == [ca]
    assert x509.load_pem_x509_certificates(text(r, "$$SCONE::srv.chain$$").encode()) == [ca, leaf]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["db.example"]
    assert [str(i) for i in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert leaf.subject.rfc4514_string() == "CN=db.example"  # SCONE: first DNS name
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(days=30, minutes=5)
    # The leaf's key is the private-key secret it names.
    key = serialization.load_pem_private_key(text(r, "$$SCONE::srv:privatekey$$").encode(), None)
    assert key.public_key() == leaf.public_key()
    # PKCS#12 with key, certificate and chain, opened with the empty password.
    got_key, got_cert, extra = pkcs12.load_key_and_certificates(
        data(r, "$$SCONE::srv:pkcs12-with-private-key$$"), b""
    )
    assert got_cert == leaf and extra == [ca] and got_key is not None
    # A self-signed end entity (no issuer), with a client EKU.
    self_cert = x509.load_pem_x509_certificate(text(r, "$$SCONE::self$$").encode())
    assert self_cert.issuer == self_cert.subject
    self_cert.verify_directly_issued_by(self_cert)


def test_escape_json_makes_pem_fit_in_a_json_string() -> None:
    s = doc("app", KINDS)
    r = resolver(MemoryStore(), s)
    escaped = text(r, '{"ca": "$$SCONE::ca:crt|escape(json)$$"}')
    assert json.loads(escaped)["ca"] == text(r, "$$SCONE::ca$$")


def test_values_are_stable_across_activations() -> None:
    store, s = MemoryStore(), doc("app", KINDS)
    first = text(resolver(store, s), "$$SCONE::a$$ $$SCONE::k256$$ $$SCONE::srv$$")
    again = text(resolver(store, s), "$$SCONE::a$$ $$SCONE::k256$$ $$SCONE::srv$$")
    assert first == again


def _update(old: Session, secrets: str) -> Session:
    return doc("app", secrets, f"predecessor: '{old.hash}'")


def test_migration_on_update_follows_scones_table() -> None:
    store, old = MemoryStore(), doc("app", KINDS)
    names = ("a", "bx:hex", "k256", "ked", "cakey", "ca", "srv")
    before = {n: text(resolver(store, old), f"$$SCONE::{n}$$") for n in names}
    new = _update(old, KINDS.replace("size: 12", "size: 12 ") + "  - {name: extra, kind: ascii}\n")
    r = resolver(store, new)
    after = {n: text(r, f"$$SCONE::{n}$$") for n in before}
    assert after["a"] == before["a"]  # same name, kind and definition: kept
    assert after["bx:hex"] == before["bx:hex"]
    assert after["k256"] != before["k256"]  # private keys only with migrate: true
    assert after["ked"] == before["ked"]  # migrate: true in both
    assert after["cakey"] == before["cakey"]
    assert after["ca"] != before["ca"]  # certificates are reissued ...
    old_ca = x509.load_pem_x509_certificate(before["ca"].encode())
    new_ca = x509.load_pem_x509_certificate(after["ca"].encode())
    assert old_ca.public_key() == new_ca.public_key()  # ... with the CA key that migrated
    assert after["srv"] != before["srv"]
    # A changed definition is a new value, even for ascii.
    third = _update(new, KINDS.replace("size: 12", "size: 13"))
    assert len(text(resolver(store, third), "$$SCONE::a$$")) == 13


def test_migrate_must_be_set_in_both_versions() -> None:
    store, old = MemoryStore(), doc("app", "  - {name: k, kind: private-key}")
    a = text(resolver(store, old), "$$SCONE::k$$")
    new = _update(old, "  - {name: k, kind: private-key, migrate: true}")
    b = text(resolver(store, new), "$$SCONE::k$$")
    assert a != b  # the old version did not say migrate
    newer = _update(
        new, "  - {name: k, kind: private-key, migrate: true}\n  - {name: x, kind: ascii}"
    )
    assert text(resolver(store, newer), "$$SCONE::k$$") == b


ROTATING = """
  - {name: ca, kind: x509-ca, common_name: CA one}
  - {name: tls, kind: x509, issuer: ca, valid_for: 10 days}
"""


def test_ca_rotation_keeps_the_old_ca_trusted_for_the_overlap_window() -> None:
    store, old = MemoryStore(), doc("app", ROTATING)
    workload = ec.generate_private_key(ec.SECP256R1()).public_key()
    r1 = resolver(store, old, key=workload)
    old_ca = x509.load_pem_x509_certificate(text(r1, "$$SCONE::ca$$").encode())
    # Same definition: the CA keeps its key across an update.
    same = _update(old, ROTATING + "  - {name: x, kind: ascii}\n")
    kept = x509.load_pem_x509_certificate(text(resolver(store, same), "$$SCONE::ca$$").encode())
    assert kept.public_key() == old_ca.public_key()
    # A changed CA definition rotates the key; both CAs are trusted during the overlap.
    rotated = _update(same, ROTATING.replace("CA one", "CA two"))
    later = NOW + timedelta(days=1)
    r2 = resolver(store, rotated, now=later, key=workload)
    new_ca = x509.load_pem_x509_certificate(text(r2, "$$SCONE::ca$$").encode())
    assert new_ca.public_key() != old_ca.public_key()
    trust = x509.load_pem_x509_certificates(text(r2, "$$SCONE::ca:trust$$").encode())
    assert trust == [new_ca, kept]
    chain = x509.load_pem_x509_certificates(text(r2, "$$SCONE::tls:chain$$").encode())
    assert chain == [new_ca, kept]
    leaf = x509.load_pem_x509_certificate(text(r2, "$$SCONE::tls$$").encode())
    leaf.verify_directly_issued_by(new_ca)
    # After the overlap (the longest life of a certificate the CA issued), only the new CA.
    after = resolver(store, rotated, now=later + timedelta(days=11), key=workload)
    assert x509.load_pem_x509_certificates(text(after, "$$SCONE::ca:trust$$").encode()) == [new_ca]


def test_stored_certificates_are_renewed_before_they_expire() -> None:
    store = MemoryStore()
    s = doc(
        "app",
        "  - {name: k, kind: private-key}\n"
        "  - {name: c, kind: x509, private_key: k, valid_for: 3h}",
    )
    first = x509.load_pem_x509_certificate(text(resolver(store, s), "$$SCONE::c$$").encode())
    same = x509.load_pem_x509_certificate(
        text(resolver(store, s, now=NOW + timedelta(hours=1)), "$$SCONE::c$$").encode()
    )
    assert same == first  # two thirds of its life left
    renewed = x509.load_pem_x509_certificate(
        text(resolver(store, s, now=NOW + timedelta(hours=2, minutes=30)), "$$SCONE::c$$").encode()
    )
    assert renewed != first and renewed.public_key() == first.public_key()
    assert renewed.not_valid_after_utc > first.not_valid_after_utc


def _explicit_cert(not_after: datetime) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    _, ca = pki.new_ca("x", now=not_after - timedelta(days=2), valid_for=timedelta(days=2), key=key)
    return ca.public_bytes(serialization.Encoding.PEM).decode()


def test_an_expired_explicit_certificate_is_refused_not_renewed() -> None:
    pem = _explicit_cert(NOW - timedelta(days=1))
    block = "\n".join("      " + line for line in pem.splitlines())
    s = doc("app", f"  - name: old\n    kind: x509-ca\n    value: |\n{block}")
    with pytest.raises(SessionError) as err:
        text(resolver(MemoryStore(), s), "$$SCONE::old$$")
    assert err.value.reason == "certificate-expired"
    # The same certificate before it expired is served as given.
    fine = text(resolver(MemoryStore(), s, now=NOW - timedelta(days=1, hours=1)), "$$SCONE::old$$")
    assert fine.strip() == pem.strip()


EXPORTER = """
  - {name: token, kind: ascii, export: {session: client}}
  - {name: cakey, kind: private-key, migrate: true, export: [{session: client}]}
  - {name: ca, kind: x509-ca, private_key: cakey, export: [{namespace: team}, {session: client}]}
  - {name: hidden, kind: ascii}
"""
IMPORTER = """
  - {name: token, import: {session: exporter, secret: token}}
  - {name: ca, kind: x509-ca, import: {session: exporter, secret: ca}}
  - {name: tls, kind: x509, issuer: ca}
"""


def test_imports_follow_the_exporters_current_session_and_can_be_revoked() -> None:
    store = MemoryStore()
    exporter = doc("exporter", EXPORTER)
    client = doc("client", IMPORTER)
    sessions = {"exporter": exporter, "client": client}
    own = text(resolver(store, exporter), "$$SCONE::token$$")
    workload = ec.generate_private_key(ec.SECP256R1()).public_key()
    r = resolver(store, client, sessions=sessions, key=workload)
    assert text(r, "$$SCONE::token$$") == own
    # The imported CA (its key is exported too) issues the importer's workload certificate.
    ca = x509.load_pem_x509_certificate(text(r, "$$SCONE::ca$$").encode())
    x509.load_pem_x509_certificate(text(r, "$$SCONE::tls$$").encode()).verify_directly_issued_by(ca)
    # The exporter updates its session without the export: the import is revoked.
    sessions["exporter"] = doc(
        "exporter",
        EXPORTER.replace(", export: {session: client}", ""),
        f"predecessor: '{exporter.hash}'",
    )
    with pytest.raises(AccessDenied) as err:
        text(resolver(store, client, sessions=sessions), "$$SCONE::token$$")
    assert err.value.reason == "import-revoked"
    # A secret that was never exported, and an exporter that is gone, are refused alike.
    sneaky = doc("client", "  - {name: h, import: {session: exporter, secret: hidden}}")
    with pytest.raises(AccessDenied):
        text(resolver(store, sneaky, sessions=sessions), "$$SCONE::h$$")
    with pytest.raises(AccessDenied):
        text(resolver(store, client, sessions={}), "$$SCONE::token$$")


def test_an_imported_ca_without_its_key_cannot_issue() -> None:
    store = MemoryStore()
    exporter = doc("exporter", EXPORTER.replace(", export: [{session: client}]}", "}"))
    client = doc("client", IMPORTER)
    workload = ec.generate_private_key(ec.SECP256R1()).public_key()
    r = resolver(store, client, sessions={"exporter": exporter, "client": client}, key=workload)
    assert "BEGIN CERTIFICATE" in text(r, "$$SCONE::ca$$")  # trusting it works
    with pytest.raises(SessionError) as err:
        text(r, "$$SCONE::tls$$")
    assert err.value.reason == "issuer-key-unavailable"


def test_namespace_exports_reach_nested_sessions_only() -> None:
    store = MemoryStore()
    exporter = doc("exporter", EXPORTER)
    inside = doc("team/a", "  - {name: ca, import: {session: exporter, secret: ca}}")
    outside = doc("teamx", "  - {name: ca, import: {session: exporter, secret: ca}}")
    sessions = {"exporter": exporter}
    assert "BEGIN CERTIFICATE" in text(resolver(store, inside, sessions=sessions), "$$SCONE::ca$$")
    with pytest.raises(AccessDenied):
        text(resolver(store, outside, sessions=sessions), "$$SCONE::ca$$")


def test_exports_pinned_to_a_session_hash_grant_that_version_only() -> None:
    client = doc("client", "  - {name: t, import: {session: exporter, secret: t}}")
    pinned = doc(
        "exporter",
        f"  - {{name: t, kind: ascii, export: {{session: client, session_hash: '{client.hash}'}}}}",
    )
    store = MemoryStore()
    assert text(resolver(store, client, sessions={"exporter": pinned}), "$$SCONE::t$$")
    other = doc(
        "client",
        "  - {name: t, import: {session: exporter, secret: t}}\n  - {name: u, kind: ascii}",
    )
    with pytest.raises(AccessDenied):
        text(resolver(store, other, sessions={"exporter": pinned}), "$$SCONE::t$$")


def test_totp_accepts_the_current_and_previous_step_only() -> None:
    shared = base64.b32encode(b"0123456789abcdef").decode()
    otp = lib.totp_now(shared, NOW)
    assert lib.totp_verify(shared, otp, NOW)
    assert lib.totp_verify(shared, otp, NOW + timedelta(seconds=30))
    assert not lib.totp_verify(shared, otp, NOW + timedelta(seconds=90))
    assert not lib.totp_verify(shared, "12345", NOW)
    assert not lib.totp_verify(shared, "abcdef", NOW)
