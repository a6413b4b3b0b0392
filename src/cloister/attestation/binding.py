"""The binding between evidence and the key a workload activates with (wire format v1).

A workload's evidence must carry, in its 64 bytes of report data, ``SHA-512(nonce ‖ key)``
where ``nonce`` is the single-use value the CAS handed out and ``key`` the raw bytes of the
workload's ephemeral public key. This ties the evidence to this activation (no replay) and to
the key the CAS seals the configuration to (no relay to another key), and it survives
TLS-terminating proxies because it does not depend on the transport.
"""

from __future__ import annotations

import hashlib
import hmac

from cloister.errors import BindingError

BINDING_VERSION = 1


def report_data_for(nonce: bytes, public_key: bytes, *, version: int = BINDING_VERSION) -> bytes:
    """The 64 bytes of report data that bind ``nonce`` and ``public_key``."""
    if version != BINDING_VERSION:
        raise ValueError(f"unknown binding version {version}")
    if not nonce or not public_key:
        raise ValueError("nonce and public key must not be empty")
    return hashlib.sha512(nonce + public_key).digest()


def check_binding(report_data: bytes, nonce: bytes, public_key: bytes) -> None:
    """Raise ``BindingError`` unless ``report_data`` binds exactly this nonce and key."""
    expected = report_data_for(nonce, public_key)
    if not hmac.compare_digest(report_data, expected):
        raise BindingError(
            "the evidence's report data does not bind this nonce and public key",
            reason="binding-mismatch",
        )
