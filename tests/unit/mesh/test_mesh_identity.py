"""The naming convention between the CAS's certificates and the mesh's checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloister.mesh import PeerIdentity, ServiceIdentity

label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


def test_dns_and_uri_forms() -> None:
    ident = ServiceIdentity.parse("api.demo")
    assert (ident.service, ident.session) == ("api", "demo")
    assert ident.dns_name == "api.demo" == str(ident)
    assert ident.uri == "cloister://demo/api"


def test_namespaced_sessions_map_slashes_to_dots() -> None:
    ident = ServiceIdentity("api", "org/shop")
    assert ident.dns_name == "api.org.shop"
    assert ident.uri == "cloister://org/shop/api"
    assert ServiceIdentity.parse("api.org.shop") == ident


@settings(max_examples=50)
@given(service=label, session=st.lists(label, min_size=1, max_size=4))
def test_parse_inverts_dns_name(service: str, session: list[str]) -> None:
    ident = ServiceIdentity(service, "/".join(session))
    assert ServiceIdentity.parse(ident.dns_name) == ident


@pytest.mark.parametrize(
    "text", ["api", "api.", ".demo", "API.demo", "a_b.demo", "*.demo", "api.de mo", "-x.demo"]
)
def test_malformed_identities_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        ServiceIdentity.parse(text)


def test_peer_matches_by_dns_name_case_insensitively() -> None:
    peer = PeerIdentity.from_sans([("DNS", "Web.Demo"), ("DNS", "web.example.com")])
    assert peer.is_(ServiceIdentity.parse("web.demo"))
    assert not peer.is_(ServiceIdentity.parse("api.demo"))


def test_a_wildcard_san_never_matches() -> None:
    peer = PeerIdentity.from_sans([("DNS", "*.demo")])
    assert not peer.is_(ServiceIdentity.parse("api.demo"))


def test_a_uri_san_must_agree_with_the_dns_name() -> None:
    web = ServiceIdentity.parse("web.demo")
    db = ServiceIdentity.parse("db.demo")
    # web was (mis)configured with the extra DNS name db.demo; its URI still says "web".
    peer = PeerIdentity.from_sans(
        [("DNS", "web.demo"), ("DNS", "db.demo"), ("URI", "cloister://demo/web")]
    )
    assert peer.is_(web)
    assert not peer.is_(db)


def test_two_cloister_uris_are_ambiguous_and_match_nothing() -> None:
    peer = PeerIdentity.from_sans(
        [("DNS", "web.demo"), ("URI", "cloister://demo/web"), ("URI", "cloister://demo/db")]
    )
    assert not peer.is_(ServiceIdentity.parse("web.demo"))


def test_other_uris_are_ignored() -> None:
    peer = PeerIdentity.from_sans([("DNS", "web.demo"), ("URI", "spiffe://demo/web")])
    assert peer.is_(ServiceIdentity.parse("web.demo"))


def test_first_of_and_describe() -> None:
    peer = PeerIdentity.from_peercert(
        {"subjectAltName": (("DNS", "ops.demo"), ("URI", "cloister://demo/ops"))}
    )
    allowed = [ServiceIdentity.parse("web.demo"), ServiceIdentity.parse("ops.demo")]
    assert peer.first_of(allowed) == allowed[1]
    assert peer.describe() == "cloister://demo/ops"
    assert PeerIdentity.from_peercert(None).describe() == "<no names>"


def test_peer_names_are_bounded() -> None:
    sans = [("DNS", f"n{i}.demo") for i in range(1000)]
    peer = PeerIdentity.from_sans(sans)
    assert len(peer.dns_names) == 64
    assert len(PeerIdentity.from_sans([("DNS", "x" * 300)]).dns_names) == 0
    assert len(peer.describe()) <= 300
