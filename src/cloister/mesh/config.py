"""The mesh configuration: who this service is, its TLS material, and its ingress/egress rules.

The agent writes this document (JSON) from the session and the CAS's answer; ``cloister mesh
run`` and ``python -m cloister.mesh`` read it. The whole document is validated at load time,
one small function per invariant; the proxies never see an invalid configuration.

Invariants:

- plaintext never leaves the workload: an ingress rule forwards only to a loopback address, an
  egress rule listens only on a loopback address (both literal IP addresses: host names are
  resolved through ``/etc/hosts`` and DNS, which Kubernetes controls);
- every ingress rule names at least one allowed caller (an empty ``allow_from`` would refuse
  everyone; that is a configuration error, not a policy);
- no two listeners share a port;
- each piece of TLS material is given exactly once, as a file or as inline PEM.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Any, Final

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from cloister import errors
from cloister.mesh.identity import ServiceIdentity

__all__ = [
    "EgressRule",
    "IngressRule",
    "MeshConfig",
    "MeshLimits",
    "TlsMaterial",
]

MAX_CONFIG_BYTES: Final = 1024 * 1024  # bytes of one mesh configuration document
MAX_PEM_BYTES: Final = 256 * 1024  # bytes of one certificate chain, key or CA bundle
MAX_RULES: Final = 256  # ingress plus egress rules of one service


def _to_identity(value: Any) -> Any:
    if isinstance(value, str):
        return ServiceIdentity.parse(value)
    return value


Identity = Annotated[
    ServiceIdentity,
    BeforeValidator(_to_identity),
    PlainSerializer(lambda ident: ident.dns_name, return_type=str),
]
Port = Annotated[int, Field(ge=0, le=65535)]  # 0 picks a free port (tests)


def _ip(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a literal IP address") from None
    return value


IP = Annotated[
    ipaddress.IPv4Address | ipaddress.IPv6Address,
    BeforeValidator(_ip),
    PlainSerializer(str, return_type=str),
]


def _require_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address, what: str) -> None:
    if not address.is_loopback:
        raise ValueError(f"{what} {address} is not a loopback address: plaintext would leave")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MeshLimits(_Model):
    """Bounds on every connection; the defaults suit a service behind a cluster network."""

    handshake_timeout: float = Field(default=10.0, gt=0, le=300)  # s, accept to authorised
    connect_timeout: float = Field(default=10.0, gt=0, le=300)  # s, to reach the app or peer
    idle_timeout: float = Field(default=300.0, gt=0, le=86400)  # seconds without a byte either way
    max_connections: int = Field(default=1024, ge=1, le=65536)  # open connections per listener


class TlsMaterial(_Model):
    """The service's certificate chain and key, and the session CA bundle.

    Each is a file path or inline PEM. Inline PEM never touches a file system: it is handed to
    OpenSSL through an anonymous memory file. The CA bundle may hold several CA certificates
    (during a CA rotation every listed CA is trusted).
    """

    cert_file: Path | None = None
    cert_pem: str | None = Field(default=None, max_length=MAX_PEM_BYTES)
    key_file: Path | None = None
    key_pem: SecretStr | None = Field(default=None, max_length=MAX_PEM_BYTES)
    ca_file: Path | None = None
    ca_pem: str | None = Field(default=None, max_length=MAX_PEM_BYTES)

    @model_validator(mode="after")
    def _each_given_once(self) -> TlsMaterial:
        for name in ("cert", "key", "ca"):
            given = [getattr(self, f"{name}_file"), getattr(self, f"{name}_pem")]
            if sum(v is not None for v in given) != 1:
                raise ValueError(f"give exactly one of {name}_file and {name}_pem")
        return self


class IngressRule(_Model):
    """Terminate mutual TLS on ``bind:port``; forward authorised callers to the app.

    The app is at ``app_host:app_port``, a loopback address.
    """

    port: Port
    app_port: Annotated[int, Field(ge=1, le=65535)]
    allow_from: tuple[Identity, ...] = Field(min_length=1, max_length=MAX_RULES)
    bind: IP = ipaddress.IPv4Address("0.0.0.0")  # the public side, by design
    app_host: IP = ipaddress.IPv4Address("127.0.0.1")

    @field_validator("app_host")
    @classmethod
    def _app_is_loopback(cls, value: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Any:
        _require_loopback(value, "app_host")
        return value


class EgressRule(_Model):
    """Listen on loopback ``bind:port``; carry each connection over mutual TLS to ``target``.

    ``target`` is ``host:port`` (``[v6]:port`` for IPv6); the host may be any name: DNS is not
    trusted, the peer's certificate is, and it must name ``peer``.
    """

    port: Port
    target: str = Field(min_length=3, max_length=300)
    peer: Identity
    bind: IP = ipaddress.IPv4Address("127.0.0.1")

    @field_validator("bind")
    @classmethod
    def _bind_is_loopback(cls, value: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Any:
        _require_loopback(value, "egress bind")
        return value

    @field_validator("target")
    @classmethod
    def _target_is_host_port(cls, value: str) -> str:
        _split_host_port(value)
        return value

    @property
    def target_host(self) -> str:
        return _split_host_port(self.target)[0]

    @property
    def target_port(self) -> int:
        return _split_host_port(self.target)[1]


def _split_host_port(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"target {text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif ":" in host:
        raise ValueError(f"target {text!r}: write an IPv6 address as [address]:port")
    return host, int(port)


class MeshConfig(_Model):
    """Everything one service's mesh proxies need. See ``docs/mesh.md`` for the JSON form."""

    identity: Identity
    tls: TlsMaterial
    ingress: tuple[IngressRule, ...] = Field(default=(), max_length=MAX_RULES)
    egress: tuple[EgressRule, ...] = Field(default=(), max_length=MAX_RULES)
    limits: MeshLimits = Field(default_factory=MeshLimits)
    metrics_port: Port | None = None  # serves Prometheus text on 127.0.0.1 when set

    @model_validator(mode="after")
    def _has_rules(self) -> MeshConfig:
        if not self.ingress and not self.egress:
            raise ValueError("a mesh configuration needs at least one ingress or egress rule")
        return self

    @model_validator(mode="after")
    def _ports_distinct(self) -> MeshConfig:
        ports = [r.port for r in self.ingress if r.port] + [r.port for r in self.egress if r.port]
        if self.metrics_port:
            ports.append(self.metrics_port)
        dupes = sorted({p for p in ports if ports.count(p) > 1})
        if dupes:
            raise ValueError(f"ports used by more than one listener: {dupes}")
        return self

    @classmethod
    def from_json(cls, text: str | bytes) -> MeshConfig:
        """Load and validate a JSON document; raises ``cloister.errors.SessionError``."""
        if len(text) > MAX_CONFIG_BYTES:
            raise errors.SessionError("mesh configuration is too large", reason="too-large")
        try:
            return cls.model_validate(json.loads(text))
        except ValidationError as exc:
            # Without the input values: a rejected document may hold a private key.
            detail = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(document)'}: {e['msg']}"
                for e in exc.errors(include_input=False, include_url=False)
            )
            raise errors.SessionError(
                f"invalid mesh configuration: {detail}", reason="invalid-mesh-config"
            ) from None
        except ValueError as exc:
            raise errors.SessionError(
                f"mesh configuration is not JSON: {exc}", reason="invalid-mesh-config"
            ) from None

    @classmethod
    def from_file(cls, path: str | Path) -> MeshConfig:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
        return cls.from_json(data)
