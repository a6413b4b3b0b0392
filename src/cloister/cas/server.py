"""Assembling and serving a CAS: data directory, store, identity, verifiers, TLS 1.3 server."""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn

from cloister.attestation import Tee, Verifier, simulated
from cloister.cas import api
from cloister.cas.identity import Identity, SimulatedSelf
from cloister.cas.service import Cas, cas_measurement
from cloister.errors import BackendUnavailable
from cloister.store import Keyring, Store, load_or_create_key

log = logging.getLogger(__name__)

SIMULATION_BANNER = (
    "SIMULATION MODE: this CAS runs without a TEE. Its state, keys and evidence protect "
    "nothing. Use it for development and tests only."
)


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    simulation: bool
    db_url: str | None = None
    hostnames: Sequence[str] = ()


def hardware_tee_present() -> bool:
    return Path("/dev/attestation").exists() or Path("/sys/kernel/config/tsm/report").exists()


def build(settings: Settings, *, now: datetime | None = None) -> Cas:
    """A ready ``Cas`` over the data directory (created with mode 0700 when missing)."""
    now = now or datetime.now(UTC)
    if not settings.simulation:
        if not hardware_tee_present():
            raise BackendUnavailable(
                "no TEE found (neither /dev/attestation nor configfs-tsm); "
                "pass --simulation to run an unprotected development CAS"
            )
        raise BackendUnavailable(
            "sealing the store key to a hardware TEE is not available in this version; "
            "pass --simulation to run an unprotected development CAS"
        )
    log.warning(SIMULATION_BANNER)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyring = Keyring.of([load_or_create_key(settings.data_dir / "store.key")])
    url = settings.db_url or f"sqlite:///{settings.data_dir / 'cas.db'}"
    store = Store.open(url, keyring)
    identity = Identity.load_or_create(store, hostnames=settings.hostnames, now=now)
    platform = simulated.SimulatedPlatform.load_or_create(
        settings.data_dir / "simulation-platform.key"
    )
    verifiers: dict[Tee, Verifier] = {Tee.SIMULATION: simulated.SimulatedVerifier()}
    verifiers.update(_hardware_verifiers())
    return Cas(
        store,
        identity,
        verifiers,
        self_evidence=SimulatedSelf(platform, cas_measurement()),
    )


def _hardware_verifiers() -> dict[Tee, Verifier]:
    """Verifiers for real TEEs, where the attestation package provides them."""
    from cloister import attestation

    out: dict[Tee, Verifier] = {}
    for tee in (Tee.SGX, Tee.TDX, Tee.SNP):
        if tee in attestation.registered():
            try:
                out[tee] = attestation.verifier_for(tee)
            except (TypeError, ValueError) as exc:
                log.info("no %s verifier configured: %s", tee.value, exc)
    return out


def tls_context(identity: Identity) -> ssl.SSLContext:
    """TLS 1.3 only, with the CAS's identity key. The key touches only a memory-backed file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # mkdtemp makes a private 0700 directory; /dev/shm keeps the key off the disk.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert.write_bytes(identity.cert_pem())
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "wb") as f:
            f.write(identity.key_pem())
        ctx.load_cert_chain(cert, key)
    return ctx


class _TLSConfig(uvicorn.Config):
    """uvicorn's config with our own TLS 1.3 context instead of one built from files."""

    def __init__(self, app: Any, context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._context = context

    def load(self) -> None:
        super().load()
        self.ssl = self._context


def make_server(cas: Cas, host: str, port: int) -> uvicorn.Server:
    config = _TLSConfig(
        api.create_app(cas),
        tls_context(cas.identity),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,
        limit_concurrency=2048,
    )
    return uvicorn.Server(config)


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)
