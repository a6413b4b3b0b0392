"""``$$SCONE::name$$`` placeholders: finding them at load time, filling them at activation.

Grammar: ``$$SCONE::<secret>[:<format>[:<format>...]][|<encoding>...]$$``. The legacy suffix
forms ``$$SCONE::<secret>.crt$$``, ``.key``, ``.chain`` and ``.hex`` keep SCONE's old meaning
(``.chain`` is the reversed chain: root first, the certificate itself last).

Every spelling of a format maps to one canonical name (``FORMATS``). Some formats produce
bytes that are not text (``bin``, DER, PKCS#12); those are allowed only in injected files,
which the bundle carries as bytes, and refused at load time in command, environment and pwd.
Encodings (``|escape(json)``) apply to the text a format produced.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from cloister.errors import SessionError

Context = Literal["command", "environment", "pwd", "file"]

_PLACEHOLDER = re.compile(
    r"\$\$SCONE::([A-Za-z0-9_.\-]+?)((?::[a-z0-9\-]+)*)((?:\|[a-z0-9_]+\([a-z0-9_]+\))*)\$\$"
)
_LEGACY_SUFFIXES = {"crt": "crt", "key": "key-pem", "chain": "legacy-chain", "hex": "hex"}
ENCODINGS = frozenset({"escape(json)"})

_BYTES = {"ascii", "binary"}
_BYTE_FORMATS = {
    "raw": "raw",
    "bin": "bin",
    "hex": "hex",
    "base64": "base64",
    "base64url": "base64url",
    "base32": "base32",
    "base32nopad": "base32nopad",
}
_KEY_FORMATS = {
    "key": "key-pem",
    "privatekey": "key-pem",
    "privatekey:pem": "key-pem",
    "privatekey:pkcs8:pem": "key-pem",
    "privatekey:der": "key-der",
    "privatekey:pkcs8:der": "key-der",
}
_CERT_FORMATS = {
    "crt": "crt",
    "cert": "crt",
    "pem": "crt",
    "crt:pem": "crt",
    "crt:der": "crt-der",
    "der": "crt-der",
    "chain": "chain",
    "trust": "trust",
    "pkcs12-with-private-key": "pkcs12",
    **_KEY_FORMATS,
}

# Spelling → canonical format, per kind of secret; the "" entry is the default.
FORMATS: dict[str, dict[str, str]] = {
    "ascii": {"": "raw", **_BYTE_FORMATS},
    "binary": {"": "bin", **{k: v for k, v in _BYTE_FORMATS.items() if k != "raw"}},
    "private-key": {
        "": "key-pem",
        "pem": "key-pem",
        "pkcs8:pem": "key-pem",
        "der": "key-der",
        "pkcs8:der": "key-der",
        **_KEY_FORMATS,
    },
    "x509-ca": {"": "crt", **_CERT_FORMATS},
    "x509": {"": "crt", **_CERT_FORMATS},
    "config-fragment": {},
}
# Formats whose result is not text: only injected files may carry them.
BINARY_FORMATS = frozenset({"bin", "key-der", "crt-der", "pkcs12"})
# An imported secret's kind is known only from its exporter; any spelling passes here and the
# CAS checks it against the exporter's kind when the importing session is uploaded.
IMPORTED = "imported"


@dataclass(frozen=True)
class Placeholder:
    secret: str
    format: str  # canonical name, see FORMATS
    encodings: tuple[str, ...] = ()
    spelled: str = ""  # the format as written, for messages and for imported secrets

    @property
    def binary(self) -> bool:
        return self.format in BINARY_FORMATS


def find(text: str, kinds: Mapping[str, str], context: Context = "file") -> Iterator[Placeholder]:
    """Every placeholder in ``text``, resolved against ``kinds`` (secret name → kind).

    Raises ``SessionError`` naming the placeholder when the secret does not exist, cannot be
    rendered in the requested format, or would put bytes that are not text into ``context``.
    """
    for m in _PLACEHOLDER.finditer(text):
        yield _resolve(m, kinds, context)


def resolve_format(kind: str, spelled: str) -> str | None:
    """The canonical format of ``spelled`` (``:a:b`` or legacy ``.crt``) for ``kind``."""
    if spelled.startswith("."):
        return _legacy(kind, spelled[1:]) if spelled[1:] in _LEGACY_SUFFIXES else None
    return FORMATS.get(kind, {}).get(spelled)


def _resolve(m: re.Match[str], kinds: Mapping[str, str], context: Context) -> Placeholder:
    raw, name, spelled = m.group(0), m.group(1), m.group(2).removeprefix(":")
    encodings = tuple(e for e in m.group(3).split("|") if e)
    fmt: str | None
    if name not in kinds and not spelled:
        base, _, suffix = name.rpartition(".")
        if base in kinds and suffix in _LEGACY_SUFFIXES:
            name, spelled = base, "." + suffix
    if name not in kinds:
        raise SessionError(f"placeholder {raw} names secret {name!r}, which is not defined")
    kind = kinds[name]
    if kind == "config-fragment":
        raise SessionError(
            f"placeholder {raw}: a config-fragment is structured data for access_policy, "
            "security and attestation, not text for a program"
        )
    fmt = spelled if kind == IMPORTED else resolve_format(kind, spelled)
    if fmt is None:
        allowed = ", ".join(sorted(k for k in FORMATS[kind] if k))
        raise SessionError(
            f"placeholder {raw}: a {kind} secret cannot be rendered as {spelled!r} "
            f"(allowed: {allowed})"
        )
    for enc in encodings:
        if enc not in ENCODINGS:
            raise SessionError(f"placeholder {raw}: unknown encoding {enc!r}")
    placeholder = Placeholder(name, fmt, encodings, spelled)
    if placeholder.binary and context != "file":
        raise SessionError(
            f"placeholder {raw} produces bytes that are not text, which the {context} cannot "
            "carry; use it in an injected file, or a text format such as :hex, :base64 or :pem"
        )
    if placeholder.binary and encodings:
        raise SessionError(f"placeholder {raw}: encodings apply to text formats only")
    return placeholder


def _legacy(kind: str, suffix: str) -> str | None:
    fmt = _LEGACY_SUFFIXES[suffix]
    if suffix == "hex":
        return fmt if kind == "binary" else None
    return fmt if kind in ("x509", "x509-ca") else None


def render(text: str, kinds: Mapping[str, str], value: Callable[[Placeholder], str]) -> str:
    """``text`` with every placeholder replaced by ``value(placeholder)``."""

    def sub(m: re.Match[str]) -> str:
        return value(_resolve(m, kinds, "command"))

    return _PLACEHOLDER.sub(sub, text)


def render_bytes(
    text: str, kinds: Mapping[str, str], value: Callable[[Placeholder], bytes]
) -> bytes:
    """``text`` (UTF-8) with every placeholder replaced by the bytes ``value`` gives."""
    out: list[bytes] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        out.append(text[pos : m.start()].encode())
        out.append(value(_resolve(m, kinds, "file")))
        pos = m.end()
    out.append(text[pos:].encode())
    return b"".join(out)


def host_argument_positions(argv: list[str]) -> list[int]:
    """The ``@@N`` host argument positions a command asks for, in order."""
    return [int(m.group(1)) for a in argv for m in _HOST_ARG.finditer(a)]


_HOST_ARG = re.compile(r"(?<![\\@])@@([0-9]+)")
