"""Service identities and how the mesh reads them from a peer's certificate.

This module owns the naming convention between the CAS (which issues certificates) and the mesh
(which checks them). It does not parse certificates itself: OpenSSL has already verified the
chain to the session CA when these functions run; they only read the subject alternative names
that the verified certificate carries.

Convention (what the CAS issues for service ``api`` of session ``demo``):

- a DNS SAN ``api.demo`` (``<service>.<session>``). It is **required**: it is what the egress
  proxy asks OpenSSL to match inside the handshake (RFC 6125 host name check), and what ordinary
  TLS clients check. Namespaced sessions map ``/`` to ``.``: service ``api`` of session
  ``org/shop`` is ``api.org.shop``.
- a URI SAN ``cloister://demo/api`` (``cloister://<session>/<service>``). It is **optional**, and
  recommended: when a certificate carries any ``cloister://`` URI, the mesh requires exactly one
  and requires it to name the same service as the DNS SAN being matched. That closes the one gap
  of DNS names: a session owner who gives service ``web`` the extra DNS name ``db.demo`` would
  otherwise let ``web`` pass as ``db``.

Matching is exact and case-insensitive for DNS names; wildcard SANs never match an identity
(``*`` is not a valid service name, and the comparison is literal).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cloister import limits

__all__ = ["PeerIdentity", "ServiceIdentity"]

URI_SCHEME: Final = "cloister://"
# A DNS label (RFC 1123), lower case: the mesh compares identities as DNS names.
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_PEER_NAMES: Final = 64  # SANs of one peer certificate that the mesh looks at
MAX_DNS_NAME_LENGTH: Final = 253  # characters of a DNS name (RFC 1035)


def _check_label(value: str, what: str) -> None:
    if not _LABEL.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not a DNS label (lower-case letters, digits and '-', "
            "at most 63 characters)"
        )


@dataclass(frozen=True, order=True)
class ServiceIdentity:
    """Service ``service`` of session ``session``: who a certificate says it is.

    ``session`` may be namespaced (``org/shop``); each component must be a DNS label so that
    the DNS form is unambiguous.
    """

    service: str
    session: str

    def __post_init__(self) -> None:
        _check_label(self.service, "service name")
        parts = self.session.split("/")
        if len(parts) > limits.MAX_SESSION_NAME_DEPTH:
            raise ValueError(f"session name {self.session!r} is nested too deeply")
        for part in parts:
            _check_label(part, "session name component")
        if len(self.dns_name) > MAX_DNS_NAME_LENGTH:
            raise ValueError(f"identity {self.dns_name!r} is longer than a DNS name may be")

    @classmethod
    def parse(cls, text: str) -> ServiceIdentity:
        """Read ``<service>.<session>`` (the DNS form), e.g. ``api.demo`` or ``api.org.shop``."""
        service, dot, session = text.strip().partition(".")
        if not dot or not session:
            raise ValueError(f"identity {text!r} is not of the form <service>.<session>")
        return cls(service=service, session=session.replace(".", "/"))

    @property
    def dns_name(self) -> str:
        """The DNS SAN the CAS puts in this service's certificate."""
        return f"{self.service}.{self.session.replace('/', '.')}"

    @property
    def uri(self) -> str:
        """The (optional) URI SAN the CAS puts in this service's certificate."""
        return f"{URI_SCHEME}{self.session}/{self.service}"

    def __str__(self) -> str:
        return self.dns_name


@dataclass(frozen=True)
class PeerIdentity:
    """The names a verified peer certificate carries, as far as the mesh is concerned."""

    dns_names: frozenset[str]
    cloister_uris: tuple[str, ...]

    @classmethod
    def from_sans(cls, sans: Iterable[tuple[str, str]]) -> PeerIdentity:
        """Collect DNS names and ``cloister://`` URIs from ``(type, value)`` SAN pairs."""
        dns: set[str] = set()
        uris: list[str] = []
        for count, (kind, value) in enumerate(sans):
            if count >= MAX_PEER_NAMES:
                break
            if kind == "DNS" and len(value) <= MAX_DNS_NAME_LENGTH:
                dns.add(value.lower())
            elif kind == "URI" and value[: len(URI_SCHEME)].lower() == URI_SCHEME:
                uris.append(value)
        return cls(dns_names=frozenset(dns), cloister_uris=tuple(uris))

    @classmethod
    def from_peercert(cls, cert: Mapping[str, Any] | None) -> PeerIdentity:
        """Read the SANs of ``ssl.SSLObject.getpeercert()`` (the decoded form)."""
        sans = (cert or {}).get("subjectAltName", ())
        pairs = [
            (str(item[0]), str(item[1]))
            for item in sans
            if isinstance(item, tuple) and len(item) == 2
        ]
        return cls.from_sans(pairs)

    def is_(self, identity: ServiceIdentity) -> bool:
        """True if this peer is ``identity`` under the convention in the module docstring."""
        if identity.dns_name not in self.dns_names:
            return False
        if not self.cloister_uris:
            return True
        return len(self.cloister_uris) == 1 and self.cloister_uris[0] == identity.uri

    def first_of(self, allowed: Iterable[ServiceIdentity]) -> ServiceIdentity | None:
        """The first identity in ``allowed`` that this peer is, or None."""
        return next((ident for ident in allowed if self.is_(ident)), None)

    def describe(self) -> str:
        """A bounded, printable summary for logs: the URI if any, else the DNS names."""
        names = list(self.cloister_uris) or sorted(self.dns_names)
        if not names:
            return "<no names>"
        text = ",".join(names[:4]) + (",..." if len(names) > 4 else "")
        return text.encode("ascii", "backslashreplace").decode("ascii")[:300]
