"""Named bounds on every untrusted input, checked before parsing.

Each limit is generous for honest input and small enough that a hostile input cannot make
the CAS or the agent allocate, parse or loop without bound.
"""

from __future__ import annotations

from typing import Final

MAX_SESSION_BYTES: Final = 1 * 1024 * 1024  # bytes of one session YAML document
MAX_SESSION_SERVICES: Final = 256
MAX_SESSION_SECRETS: Final = 1024
MAX_INJECTED_FILE_BYTES: Final = 1 * 1024 * 1024  # bytes of one injected file's template
MAX_NAME_LENGTH: Final = 128  # characters of a session, service or secret name
MAX_SESSION_NAME_DEPTH: Final = 8  # components of a namespaced name "org/proj/x"

MAX_EVIDENCE_BYTES: Final = 64 * 1024  # bytes of one quote or report, certificates included
MAX_CERT_CHAIN_LENGTH: Final = 5  # certificates in one chain
MAX_COLLATERAL_ITEM_BYTES: Final = 4 * 1024 * 1024  # bytes of one CRL, TCB Info, certificate

MAX_REQUEST_BYTES: Final = 2 * 1024 * 1024  # bytes of one HTTP request body to the CAS
MAX_CSR_BYTES: Final = 16 * 1024

NONCE_BYTES: Final = 32
NONCE_TTL_SECONDS: Final = 120.0  # a nonce not used within this time is refused
MAX_OUTSTANDING_NONCES: Final = 100_000  # a CAS refuses to hand out more than this at once
