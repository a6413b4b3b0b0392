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

# The CAS's HTTP server: what a slow or greedy client may hold (see cas/server.py, cas/api.py).
HTTP_HEADER_TIMEOUT_SECONDS: Final = 10.0  # from the first byte of a request to its last header
HTTP_BODY_TIMEOUT_SECONDS: Final = 30.0  # from the last header to the last byte of the body
HTTP_KEEP_ALIVE_SECONDS: Final = 5  # an idle connection between requests is closed after this
MAX_HTTP_CONNECTIONS: Final = 2048  # connections and requests at once, per worker process
MAX_HTTP_HEADER_BYTES: Final = 16 * 1024  # bytes of one request line and its headers

# Per-client token buckets, per worker process (cas/ratelimit.py).
ACTIVATION_RATE_PER_SECOND: Final = 100.0  # nonce and activate requests per client IP
ACTIVATION_BURST: Final = 200
SESSION_RATE_PER_SECOND: Final = 10.0  # session create/update/read and exists per client IP
SESSION_BURST: Final = 20
MAX_RATE_LIMITED_CLIENTS: Final = 65_536  # buckets kept per worker before the oldest go
# Threads per CAS worker for the activation path, within the store's connection pool (15).
STORE_THREADS_PER_WORKER: Final = 12

# Encrypted volumes (volume/_format.py): read from an untrusted disk before authentication.
MAX_VOLUME_MANIFEST_BYTES: Final = 1024 * 1024 * 1024  # bytes of one encrypted manifest file
MAX_VOLUME_PATH_BYTES: Final = 4096  # UTF-8 bytes of one path inside a volume
MAX_VOLUME_NAME_BYTES: Final = 255  # UTF-8 bytes of one path component inside a volume
