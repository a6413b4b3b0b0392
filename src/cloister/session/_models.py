"""The session language's document model (pydantic v2, frozen, unknown keys refused).

Follows SCONE's session language v0.3 where it applies. Cross-references between parts of a
document are checked in ``_checks.py``, one small function per invariant; this module only
says what each part may look like.
"""

from __future__ import annotations

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

SecretKind = Literal["ascii", "binary", "private-key", "x509-ca", "x509"]


class Secret(Model):
    name: str
    kind: SecretKind
    size: int | None = Field(default=None, ge=1, le=65536)
    value: str | None = None
    # private-key
    key_type: Literal["P-256", "P-384", "Ed25519", "RSA-2048", "RSA-3072"] | None = None
    # x509 and x509-ca
    issuer: str | None = None
    private_key: str | None = None
    common_name: str | None = None
    dns: list[str] = Field(default_factory=list)
    ip: list[str] = Field(default_factory=list)
    endpoint: Literal["server", "client", "server-client"] | None = None
    valid_for: str | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return _name(v, "secret name")

    @field_validator("dns", "ip", mode="before")
    @classmethod
    def _to_list(cls, v: Any) -> Any:
        return _listify(v)

    @model_validator(mode="after")
    def _check(self) -> Secret:
        x509_only = {"issuer", "common_name", "dns", "ip", "endpoint", "valid_for", "private_key"}
        if self.kind not in ("x509", "x509-ca"):
            used = {k for k in x509_only if getattr(self, k)}
            if used:
                raise ValueError(
                    f"{', '.join(sorted(used))} apply only to x509 and x509-ca secrets"
                )
        if self.kind == "x509" and self.issuer is None:
            raise ValueError("an x509 secret needs an issuer (the name of an x509-ca secret)")
        if self.kind == "x509-ca" and self.issuer is not None:
            raise ValueError("an x509-ca is self-signed here; intermediate CAs are not supported")
        if self.size is not None and self.kind not in ("ascii", "binary"):
            raise ValueError("size applies only to ascii and binary secrets")
        if self.value is not None and self.kind not in ("ascii", "binary"):
            raise ValueError("explicit values are supported for ascii and binary secrets")
        if self.kind == "binary" and self.value is not None:
            _hex(self.value, "a binary secret's explicit value")
        if self.key_type is not None and self.kind != "private-key":
            raise ValueError("key_type applies only to private-key secrets")
        if self.valid_for is not None:
            parse_duration(self.valid_for)
        return self


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


# --- services and images -------------------------------------------------------------------


class Service(Model):
    name: str
    image_name: str | None = None
    command: str | list[str] | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    pwd: str | None = None
    attestation: list[Attestation] = Field(default_factory=list)

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

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return _name(v, "image name")


# --- access policy and security ------------------------------------------------------------


class AccessPolicy(Model):
    read: list[str] = Field(default_factory=lambda: ["CREATOR"])
    update: list[str] = Field(default_factory=lambda: ["CREATOR"])

    @field_validator("read", "update", mode="before")
    @classmethod
    def _to_list(cls, v: Any) -> Any:
        return _listify(v)


class AttestationSecurity(Model):
    tolerate: list[str] = Field(default_factory=list)
    ignore_advisories: list[str] = Field(default_factory=list)

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


class SessionDocument(Model):
    name: str
    version: str
    predecessor: str | None = None
    access_policy: AccessPolicy = Field(default_factory=AccessPolicy)
    security: Security = Field(default_factory=Security)
    services: list[Service] = Field(default_factory=list)
    secrets: list[Secret] = Field(default_factory=list)
    images: list[Image] = Field(default_factory=list)

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
