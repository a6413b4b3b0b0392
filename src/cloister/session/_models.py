"""The session language's document model (pydantic v2, frozen, unknown keys refused).

Follows SCONE's session language v0.3 where it applies. Cross-references between parts of a
document are checked in ``_checks.py``, one small function per invariant; this module only
says what each part may look like.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cloister import limits

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
SESSION_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)*$")
HEX_RE = re.compile(r"^[0-9a-f]+$")

TOLERATIONS = frozenset(
    {
        "debug-mode",
        "outdated-tcb",
        "software-hardening-needed",
        "configuration-needed",
        "hyperthreading",
        "simulation",
        # Cloister: lets ``security.attestation.mode: none`` load (development only).
        "no-attestation",
    }
)


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _name(value: str, what: str) -> str:
    if not value or len(value) > limits.MAX_NAME_LENGTH or not NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-{limits.MAX_NAME_LENGTH} characters of letters, "
            "digits, '_', '.', '-', starting with a letter or digit"
        )
    return value


def _hex(value: str, what: str, size: int | None = None) -> str:
    v = value.lower()
    if not HEX_RE.match(v) or (size is not None and len(v) != 2 * size):
        want = f"{size} bytes of " if size else ""
        raise ValueError(f"{what} must be {want}hex, got {value!r}")
    return v


def _listify(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# --- attestation ---------------------------------------------------------------------------

HexList = Annotated[list[str], Field(min_length=1)]


class Attestation(Model):
    """One alternative of a service's ``attestation`` list: every key in it must hold.

    ``tee`` defaults to ``sgx`` so that SCONE's ``mrenclave`` form keeps its meaning.
    """

    tee: Literal["sgx", "tdx", "snp", "simulation"] = "sgx"
    # SGX (SCONE syntax)
    mrenclave: HexList | None = None
    mrsigner: HexList | None = None
    isvprodid: int | None = Field(default=None, ge=0, le=0xFFFF)
    isvsvn: int | None = Field(default=None, ge=0, le=0xFFFF)
    # TDX
    mrtd: HexList | None = None
    rtmr0: HexList | None = None
    rtmr1: HexList | None = None
    rtmr2: HexList | None = None
    rtmr3: HexList | None = None
    mrconfigid: HexList | None = None
    # SNP and simulation
    measurement: HexList | None = None
    host_data: HexList | None = None
    policy: dict[str, bool | int] | None = None
    min_tcb: dict[str, int] | None = None

    _SIZES: ClassVar[dict[str, int]] = {
        "mrenclave": 32,
        "mrsigner": 32,
        "mrtd": 48,
        "rtmr0": 48,
        "rtmr1": 48,
        "rtmr2": 48,
        "rtmr3": 48,
        "mrconfigid": 48,
        "host_data": 32,
    }
    _BY_TEE: ClassVar[dict[str, set[str]]] = {
        "sgx": {"mrenclave", "mrsigner", "isvprodid", "isvsvn"},
        "tdx": {"mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid"},
        "snp": {"measurement", "host_data", "policy", "min_tcb"},
        "simulation": {"measurement"},
    }
    MEASUREMENT_KEYS: ClassVar[dict[str, set[str]]] = {
        "sgx": {"mrenclave", "mrsigner"},
        "tdx": {"mrtd"},
        "snp": {"measurement"},
        "simulation": {"measurement"},
    }

    @model_validator(mode="before")
    @classmethod
    def _scone_signer(cls, data: Any) -> Any:
        # SCONE writes SGX signer constraints nested: ``signer: {mrsigner, isvprodid,
        # isvsvn_min}``. A floor is what the flat ``isvsvn`` means here.
        if not isinstance(data, dict) or "signer" not in data:
            return data
        signer = data["signer"]
        if not isinstance(signer, dict):
            raise ValueError("signer must be a mapping with mrsigner and isvprodid")
        out = {k: v for k, v in data.items() if k != "signer"}
        for key in signer:
            if key not in ("mrsigner", "isvprodid", "isvsvn", "isvsvn_min"):
                raise ValueError(
                    f"signer.{key} is not supported (give mrsigner, isvprodid and an "
                    "isvsvn_min floor)"
                )
        if "isvsvn" in signer:
            raise ValueError(
                "signer.isvsvn asks for one exact version; write isvsvn_min for a floor"
            )
        out["mrsigner"] = signer.get("mrsigner")
        out["isvprodid"] = signer.get("isvprodid")
        if "isvsvn_min" in signer:
            out["isvsvn"] = signer["isvsvn_min"]
        return out

    @field_validator(
        "mrenclave",
        "mrsigner",
        "mrtd",
        "rtmr0",
        "rtmr1",
        "rtmr2",
        "rtmr3",
        "mrconfigid",
        "measurement",
        "host_data",
        mode="before",
    )
    @classmethod
    def _to_list(cls, v: Any) -> Any:
        return _listify(v)

    @model_validator(mode="after")
    def _check(self) -> Attestation:
        given = {k for k in type(self).model_fields if k != "tee" and getattr(self, k) is not None}
        foreign = given - self._BY_TEE[self.tee]
        if foreign:
            raise ValueError(
                f"key(s) {', '.join(sorted(foreign))} do not apply to tee {self.tee!r}"
            )
        for key in given & set(self._SIZES) | ({"measurement"} & given):
            size = self._SIZES.get(key) or (32 if self.tee == "simulation" else 48)
            for value in getattr(self, key):
                _hex(value, key, size)
        if self.tee == "sgx" and self.mrsigner and self.isvprodid is None:
            raise ValueError("an mrsigner constraint needs isvprodid (and an isvsvn floor)")
        return self

    def normalized(self, key: str) -> list[str]:
        return [v.lower() for v in getattr(self, key) or []]


# --- secrets -------------------------------------------------------------------------------

SecretKind = Literal["ascii", "binary", "private-key", "x509-ca", "x509", "config-fragment"]
KeyType = Literal["P-256", "P-384", "Ed25519", "RSA-2048", "RSA-3072"]
_REMOTE_KEYS = ("cas_url", "cas_key", "cas_software_key")


def _local_only(data: Any, where: str) -> Any:
    if isinstance(data, str):
        raise ValueError(
            f"{where} {data!r}: the SCONE URL short form names sessions on another CAS, which "
            "does not apply here; write session: NAME"
        )
    if isinstance(data, dict):
        remote = [k for k in _REMOTE_KEYS if k in data]
        if remote:
            raise ValueError(
                f"{where}: {', '.join(remote)} name a session on another CAS; sharing across "
                "CAS instances does not apply here"
            )
    return data


class ExportTarget(Model):
    """Who may import a secret: one session (optionally pinned by hash) or a namespace."""

    session: str | None = None
    namespace: str | None = None
    session_hash: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _local(cls, data: Any) -> Any:
        return _local_only(data, "export")

    @model_validator(mode="after")
    def _one(self) -> ExportTarget:
        if (self.session is None) == (self.namespace is None):
            raise ValueError("an export names exactly one of session or namespace")
        if self.namespace is not None and self.session_hash is not None:
            raise ValueError("an export to a namespace cannot pin a session_hash")
        if self.session_hash is not None:
            _hex(self.session_hash, "session_hash", 32)
        return self


class SecretImport(Model):
    session: str
    secret: str
    session_hash: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _local(cls, data: Any) -> Any:
        return _local_only(data, "import")

    @field_validator("secret")
    @classmethod
    def _valid_secret(cls, v: str) -> str:
        return _name(v, "imported secret name")

    @field_validator("session_hash")
    @classmethod
    def _hash(cls, v: str | None) -> str | None:
        return None if v is None else _hex(v, "session_hash", 32)


_SAN_RE = re.compile(r"^(dns|ip):(.+)$")


class Secret(Model):
    name: str
    kind: SecretKind | None = None
    size: int | None = Field(default=None, ge=1, le=65536)
    value: Any = None
    # private-key
    key_type: KeyType | None = None
    migrate: bool = False
    # x509 and x509-ca
    issuer: str | None = None
    private_key: str | None = None
    common_name: str | None = None
    dns: list[str] = Field(default_factory=list)
    ip: list[str] = Field(default_factory=list)
    san: list[str] = Field(default_factory=list)
    endpoint: Literal["server", "client", "server-client"] | None = None
    valid_for: str | None = None
    # sharing between sessions
    export: list[ExportTarget] = Field(default_factory=list)
    export_public: bool = False
    import_: SecretImport | None = Field(default=None, alias="import")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return _name(v, "secret name")

    @field_validator("dns", "ip", "san", "export", mode="before")
    @classmethod
    def _to_list(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return [v]
        return _listify(v)

    @field_validator("san")
    @classmethod
    def _san(cls, v: list[str]) -> list[str]:
        for entry in v:
            if not _SAN_RE.match(entry):
                raise ValueError(f"san entry {entry!r} must be 'dns:NAME' or 'ip:ADDRESS'")
        return v

    @field_validator("ip")
    @classmethod
    def _ips(cls, v: list[str]) -> list[str]:
        for entry in v:
            try:
                ipaddress.ip_address(entry)
            except ValueError:
                raise ValueError(f"ip entry {entry!r} is not an IP address") from None
        return v

    def dns_names(self) -> list[str]:
        return [*self.dns, *(e[4:] for e in self.san if e.startswith("dns:"))]

    def ip_addresses(self) -> list[str]:
        return [*self.ip, *(e[3:] for e in self.san if e.startswith("ip:"))]

    @model_validator(mode="after")
    def _check(self) -> Secret:
        if self.import_ is not None:
            return self._check_import()
        if self.kind is None:
            raise ValueError("kind is required unless the secret is imported")
        x509_only = {
            "issuer", "common_name", "dns", "ip", "san", "endpoint", "valid_for", "private_key"
        }  # fmt: skip
        if self.kind not in ("x509", "x509-ca"):
            used = {k for k in x509_only if getattr(self, k)}
            if used:
                raise ValueError(
                    f"{', '.join(sorted(used))} apply only to x509 and x509-ca secrets"
                )
        if self.kind == "x509-ca" and (self.dns or self.ip or self.san or self.endpoint):
            raise ValueError("dns, ip, san and endpoint apply only to end-entity (x509) secrets")
        if self.kind == "x509" and self.endpoint == "client" and self.dns_names():
            raise ValueError("a client certificate (endpoint: client) carries no DNS names")
        if self.kind == "x509" and self.issuer is None and self.value is None:
            if self.private_key is None:
                raise ValueError(
                    "an x509 secret needs an issuer (an x509-ca secret), or a private_key to "
                    "be self-signed with"
                )
        if self.size is not None and self.kind not in ("ascii", "binary"):
            raise ValueError("size applies only to ascii and binary secrets")
        if self.key_type is not None and self.kind != "private-key":
            raise ValueError("key_type applies only to private-key secrets")
        if self.migrate and self.kind != "private-key":
            raise ValueError("migrate applies only to private-key secrets")
        self._check_value()
        if self.valid_for is not None:
            parse_duration(self.valid_for)
        return self

    def _check_import(self) -> Secret:
        given = sorted(
            k
            for k, f in type(self).model_fields.items()
            if k not in ("name", "kind", "import_")
            and getattr(self, k) != f.get_default(call_default_factory=True)
        )
        if given:
            raise ValueError(
                f"an imported secret takes its value from the exporter; remove {', '.join(given)}"
            )
        return self

    def _check_value(self) -> None:
        v = self.value
        if self.kind == "config-fragment":
            if v is None:
                raise ValueError("a config-fragment needs an explicit value or an import")
            return
        if v is None:
            return
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise ValueError(f"the explicit value of a {self.kind} secret must be a string")
        text = str(v)
        if self.kind == "binary":
            _hex(text, "a binary secret's explicit value")
        elif self.kind == "ascii":
            if "\x00" in text or not text.isascii():
                raise ValueError("an ascii secret's value must be ASCII without NUL bytes")
        elif self.kind == "private-key" and "-----BEGIN PRIVATE KEY-----" not in text:
            raise ValueError("a private-key's explicit value must be a PEM PKCS#8 private key")
        elif self.kind in ("x509", "x509-ca") and "-----BEGIN CERTIFICATE-----" not in text:
            raise ValueError(f"an {self.kind}'s explicit value must be a PEM certificate")

    def explicit_text(self) -> str | None:
        return None if self.value is None else str(self.value)

    def is_workload_bound(self) -> bool:
        """An x509 issued per activation for the workload's own key (Cloister's default)."""
        return (
            self.kind == "x509"
            and self.import_ is None
            and self.private_key is None
            and self.value is None
        )


_DURATION_RE = re.compile(r"^\s*(\d+)\s*(s|m|h|d|seconds?|minutes?|hours?|days?|years?|y)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "y": 365 * 86400}


def parse_duration(text: str) -> int:
    """Seconds in a duration such as ``90 days``, ``12h`` or ``1 year``."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(f"cannot read duration {text!r}; write e.g. '90 days' or '12h'")
    unit = m.group(2)
    key = unit[0] if unit not in ("m", "minute", "minutes") else "m"
    return int(m.group(1)) * _UNIT_SECONDS[key]


# --- encrypted volumes and the mesh --------------------------------------------------------

VolumePolicy = Literal["rollback_protection", "no_rollback_protection", "ephemeral"]


class VolumeImport(Model):
    """SCONE: ``import: {session, volume}`` - use a volume another session exports to us."""

    session: str
    volume: str
    session_hash: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _local(cls, data: Any) -> Any:
        return _local_only(data, "import")

    @field_validator("volume")
    @classmethod
    def _valid_volume(cls, v: str) -> str:
        return _name(v, "imported volume name")

    @field_validator("session_hash")
    @classmethod
    def _hash(cls, v: str | None) -> str | None:
        return None if v is None else _hex(v, "session_hash", 32)


class Volume(Model):
    """An encrypted volume (SCONE ``volumes[]``): the CAS makes its key and keeps its tag.

    ``update_policy``: ``rollback_protection`` (the default) hands the key out only with the
    last reported root tag; ``no_rollback_protection`` skips the freshness check (every other
    check stays); ``ephemeral`` gives a fresh, empty volume at every start.
    """

    name: str
    update_policy: VolumePolicy = "rollback_protection"
    export: list[ExportTarget] = Field(default_factory=list, max_length=64)
    import_: VolumeImport | None = Field(default=None, alias="import")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return _name(v, "volume name")

    @model_validator(mode="after")
    def _import_alone(self) -> Volume:
        if self.import_ is not None and (self.export or "update_policy" in self.model_fields_set):
            raise ValueError(
                "an imported volume takes its policy from the exporter; give only name and import"
            )
        return self


class ImageVolume(Model):
    """Where an image mounts a volume: ``images[].volumes: [{name, path}]``."""

    name: str
    path: str

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        parts = v.split("/")
        if (
            not v.startswith("/")
            or v == "/"
            or "\x00" in v
            or len(v) > 4096
            or any(p in (".", "..") for p in parts)
        ):
            raise ValueError(f"volume path {v!r} must be absolute, not '/', and without '..'")
        return v.rstrip("/")


class MeshIngress(Model):
    """Terminate mutual TLS on ``port``; forward callers named in ``allow_from`` to the app."""

    port: int = Field(ge=1, le=65535)
    app_port: int = Field(ge=1, le=65535)
    # service names of this session, or "service.session" for another session's service
    allow_from: list[str] = Field(min_length=1, max_length=256)


class MeshEgress(Model):
    """Listen on loopback ``port``; carry connections to ``target`` over mutual TLS, accepting
    only ``service`` (a service of this session, or "service.session") at the other end."""

    port: int = Field(ge=1, le=65535)
    target: str = Field(min_length=3, max_length=300)
    service: str = Field(min_length=1, max_length=300)


class ServiceMesh(Model):
    """A service's place in the attested mesh (see ``docs/mesh-in-sessions.md``)."""

    ingress: list[MeshIngress] = Field(default_factory=list, max_length=256)
    egress: list[MeshEgress] = Field(default_factory=list, max_length=256)
    dns: list[str] = Field(default_factory=list, max_length=64)
    ca: str | None = None  # the x509-ca that issues mesh certificates (default: the only one)

    @field_validator("dns")
    @classmethod
    def _dns_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.\-]{0,251}[A-Za-z0-9])?", name):
                raise ValueError(f"mesh dns name {name!r} is not a DNS name")
        return v


# --- services and images -------------------------------------------------------------------


class Service(Model):
    name: str
    image_name: str | None = None
    command: str | list[str] | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    pwd: str | None = None
    attestation: list[Attestation] = Field(default_factory=list)
    # SCONE's legacy form of attestation: a list of accepted MRENCLAVEs (one more alternative).
    mrenclaves: list[str] = Field(default_factory=list, exclude=True)
    one_time_password_shared_secret: str | None = None
    mesh: ServiceMesh | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_mrenclaves(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mrenclaves"):
            out = dict(data)
            alts = out.get("attestation") or []
            if not isinstance(alts, dict | list):
                return data  # the model refuses it with its own message
            alts = [alts] if isinstance(alts, dict) else list(alts)
            mrs = out["mrenclaves"]
            alts.append({"tee": "sgx", "mrenclave": [mrs] if isinstance(mrs, str) else mrs})
            out["attestation"] = alts
            out["mrenclaves"] = []
            return out
        return data

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return _name(v, "service name")

    @field_validator("environment", mode="before")
    @classmethod
    def _env_strings(cls, v: Any) -> Any:
        # SCONE accepts numbers and booleans as environment values; the process sees strings.
        if isinstance(v, dict):
            return {
                str(k): ("true" if x is True else "false" if x is False else str(x))
                for k, x in v.items()
            }
        return v

    @field_validator("attestation", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    def argv(self) -> list[str] | None:
        """The command as a list, or ``None`` when the session names none."""
        if self.command is None:
            return None
        if isinstance(self.command, list):
            return list(self.command)
        import shlex

        return shlex.split(self.command)


class InjectionFile(Model):
    path: str
    content: str = ""
    permission: str | None = None

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/") or "\x00" in v or "/../" in v + "/":
            raise ValueError(f"injection file path {v!r} must be absolute and without '..'")
        return v

    @field_validator("content")
    @classmethod
    def _bounded(cls, v: str) -> str:
        if len(v.encode()) > limits.MAX_INJECTED_FILE_BYTES:
            raise ValueError(f"injected file is larger than {limits.MAX_INJECTED_FILE_BYTES}")
        return v

    @field_validator("permission")
    @classmethod
    def _octal(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"0?[0-7]{3}", v):
            raise ValueError(f"permission {v!r} must be octal like '0600'")
        return v


class Image(Model):
    name: str
    injection_files: list[InjectionFile] = Field(default_factory=list)
    volumes: list[ImageVolume] = Field(default_factory=list, max_length=64)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return _name(v, "image name")


# --- access policy and security ------------------------------------------------------------


AccessEntry = str | dict[str, Any]


def _creator() -> list[AccessEntry]:
    return ["CREATOR"]


class AccessPolicy(Model):
    """Who may read, update, or create sessions below this one (rules: ``_access.py``)."""

    read: list[AccessEntry] = Field(default_factory=lambda: _creator())
    update: list[AccessEntry] = Field(default_factory=lambda: _creator())
    # SCONE: when omitted, whoever may update may create sessions in the namespace.
    create_sessions: list[AccessEntry] | None = None

    @field_validator("read", "update", "create_sessions", mode="before")
    @classmethod
    def _to_list(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return [v]
        return _listify(v)

    def rules_for(self, verb: str) -> list[AccessEntry]:
        if verb == "create_sessions":
            return self.update if self.create_sessions is None else self.create_sessions
        entries: list[AccessEntry] = getattr(self, verb)
        return entries


class AttestationSecurity(Model):
    tolerate: list[str] = Field(default_factory=list)
    ignore_advisories: list[str] = Field(default_factory=list)
    # ``none`` switches attestation off: a development mode that needs the ``no-attestation``
    # toleration and is announced at load and at every activation.
    mode: Literal["hardware", "none"] = "hardware"
    one_time_password_shared_secret: str | None = None

    @field_validator("tolerate", "ignore_advisories", mode="before")
    @classmethod
    def _to_list(cls, v: Any) -> Any:
        return _listify(v)

    @field_validator("tolerate")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in TOLERATIONS]
        if unknown:
            raise ValueError(
                f"unknown toleration(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(TOLERATIONS))}"
            )
        return v


class Security(Model):
    attestation: AttestationSecurity = Field(default_factory=AttestationSecurity)
    service_access_token: str | None = Field(default=None, min_length=1, max_length=1024)


class SessionDocument(Model):
    name: str
    version: str
    predecessor: str | None = None
    access_policy: AccessPolicy = Field(default_factory=AccessPolicy)
    security: Security = Field(default_factory=Security)
    services: list[Service] = Field(default_factory=list)
    secrets: list[Secret] = Field(default_factory=list)
    images: list[Image] = Field(default_factory=list)
    volumes: list[Volume] = Field(default_factory=list, max_length=256)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if (
            len(v) > limits.MAX_NAME_LENGTH
            or not SESSION_NAME_RE.match(v)
            or v.count("/") >= limits.MAX_SESSION_NAME_DEPTH
        ):
            raise ValueError(
                f"session name {v!r} must be letters, digits, '_', '.', '-', in at most "
                f"{limits.MAX_SESSION_NAME_DEPTH} '/'-separated parts"
            )
        return v

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        # `version: 0.3` is a YAML float; SCONE reads it as the string "0.3".
        if isinstance(v, float | int) and not isinstance(v, bool):
            return str(v)
        return v

    @field_validator("version")
    @classmethod
    def _supported(cls, v: str) -> str:
        if v != "0.3":
            raise ValueError(f'session language version {v!r} is not supported (use "0.3")')
        return v

    @field_validator("predecessor", mode="before")
    @classmethod
    def _quoted(cls, v: Any) -> Any:
        if isinstance(v, int | float) and not isinstance(v, bool):
            raise ValueError(
                "write the predecessor hash as a quoted string: YAML read it as a number"
            )
        return v

    @field_validator("predecessor")
    @classmethod
    def _hash(cls, v: str | None) -> str | None:
        return None if v is None else _hex(v, "predecessor", 32)

    @field_validator("services")
    @classmethod
    def _few_services(cls, v: list[Service]) -> list[Service]:
        if len(v) > limits.MAX_SESSION_SERVICES:
            raise ValueError(f"more than {limits.MAX_SESSION_SERVICES} services")
        return v

    @field_validator("secrets")
    @classmethod
    def _few_secrets(cls, v: list[Secret]) -> list[Secret]:
        if len(v) > limits.MAX_SESSION_SECRETS:
            raise ValueError(f"more than {limits.MAX_SESSION_SECRETS} secrets")
        return v
