"""``$$SCONE::name$$`` placeholders: finding them at load time, filling them at activation.

Grammar: ``$$SCONE::<secret>$$`` or ``$$SCONE::<secret>:<format>$$``. The legacy suffix form
``$$SCONE::<secret>.crt$$`` (also ``.key`` and ``.chain``) means ``<secret>:crt``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from cloister.errors import SessionError

_PLACEHOLDER = re.compile(r"\$\$SCONE::([A-Za-z0-9_.\-]+?)(?::([a-z0-9\-]+))?\$\$")
_LEGACY_SUFFIXES = ("crt", "key", "chain")

# The formats each kind of secret can be rendered in; the first is the default.
FORMATS: dict[str, tuple[str, ...]] = {
    "ascii": ("raw", "hex", "base64"),
    "binary": ("hex", "base64"),
    "private-key": ("key", "privatekey", "pem"),
    "x509-ca": ("crt", "cert", "pem", "chain", "key", "privatekey"),
    "x509": ("crt", "cert", "pem", "chain", "key", "privatekey"),
}


@dataclass(frozen=True)
class Placeholder:
    secret: str
    format: str


def find(text: str, kinds: Mapping[str, str]) -> Iterator[Placeholder]:
    """Every placeholder in ``text``, resolved against ``kinds`` (secret name → kind).

    Raises ``SessionError`` naming the placeholder when the secret does not exist or cannot
    be rendered in the requested format.
    """
    for m in _PLACEHOLDER.finditer(text):
        yield _resolve(m.group(1), m.group(2), kinds, m.group(0))


def _resolve(name: str, fmt: str | None, kinds: Mapping[str, str], raw: str) -> Placeholder:
    if name not in kinds and fmt is None:
        base, _, suffix = name.rpartition(".")
        if base in kinds and suffix in _LEGACY_SUFFIXES:
            name, fmt = base, suffix
    if name not in kinds:
        raise SessionError(f"placeholder {raw} names secret {name!r}, which is not defined")
    allowed = FORMATS[kinds[name]]
    fmt = fmt or allowed[0]
    if fmt not in allowed:
        raise SessionError(
            f"placeholder {raw}: a {kinds[name]} secret cannot be rendered as {fmt!r} "
            f"(allowed: {', '.join(allowed)})"
        )
    return Placeholder(name, fmt)


def render(text: str, kinds: Mapping[str, str], value: Callable[[Placeholder], str]) -> str:
    """``text`` with every placeholder replaced by ``value(placeholder)``."""

    def sub(m: re.Match[str]) -> str:
        return value(_resolve(m.group(1), m.group(2), kinds, m.group(0)))

    return _PLACEHOLDER.sub(sub, text)
