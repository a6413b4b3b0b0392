"""256 agents activate at once against one CAS, which is restarted in the middle.

Real parts throughout: a ``cloister cas serve --simulation`` process tree with its default
worker count, HTTPS with the pinned identity, the agent's own activation code with its retries
and backoff, real certificates and sealed bundles. Rate limits are lifted for this CAS: in a
cluster the agents come from distinct pod addresses, here they all come from 127.0.0.1.

Bounded in count (256 agents, one restart) and in time (every wait has a deadline); nothing
here is timed as an assertion.
"""

from __future__ import annotations

import base64
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from tests.integration.load.agents import MEASUREMENT, TunedCas, create_session, start_cas

from cloister.agent import activation
from cloister.agent.evidence import SimulatedProvider
from cloister.attestation import simulated
from cloister.client import CasClient

AGENTS = 256
WEB = 192  # replicas of service "web"; the rest are replicas of "worker"
RESTART_AFTER = 64  # successful activations before the CAS is restarted
DEADLINE = 240.0  # seconds for the whole run


@dataclass
class Outcome:
    service: str
    activated: activation.Activated | None = None
    error: BaseException | None = None
    finished_at: float = 0.0


@pytest.fixture
def load_cas(tmp_path: Path) -> Iterator[TunedCas]:
    cas = start_cas(tmp_path, "--activation-rate", "0", "--session-rate", "0")
    try:
        create_session(cas, tmp_path)
        yield cas
    finally:
        cas.stop()


def _fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_256_agents_at_once_all_activate_across_a_cas_restart(
    load_cas: TunedCas, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="cloister")  # simulation warns on every evidence
    pin = load_cas.pin
    provider = SimulatedProvider(simulated.SimulatedPlatform.generate(), MEASUREMENT)
    outcomes = [Outcome("web" if i < WEB else "worker") for i in range(AGENTS)]
    start = threading.Barrier(AGENTS + 1)
    lock = threading.Lock()
    done = threading.Condition(lock)
    succeeded = 0
    retries = 0

    def counted_sleep(seconds: float) -> None:
        nonlocal retries
        with lock:
            retries += 1
        time.sleep(min(seconds, 5.0))

    def agent(outcome: Outcome) -> None:
        nonlocal succeeded
        start.wait(timeout=60)
        try:
            with CasClient(load_cas.url, cert_pem=pin, timeout=60) as client:
                outcome.activated = activation.activate(
                    client, provider, "load", outcome.service, attempts=12, sleep=counted_sleep
                )
        except BaseException as exc:  # reported by the assertions below
            outcome.error = exc
        outcome.finished_at = time.monotonic()
        with done:
            if outcome.activated is not None:
                succeeded += 1
            done.notify_all()

    threads = [threading.Thread(target=agent, args=(o,), daemon=True) for o in outcomes]
    for t in threads:
        t.start()
    start.wait(timeout=60)
    deadline = time.monotonic() + DEADLINE
    # Restart the CAS in the middle: agents in flight fail over to their retries.
    with done:
        done.wait_for(lambda: succeeded >= RESTART_AFTER, timeout=DEADLINE / 2)
        before_restart = succeeded
    assert before_restart >= RESTART_AFTER, "the agents did not get going"
    # SIGKILL: a crash, not a graceful drain (which would let every request in flight finish).
    # The workers die with their supervisor; the restarted CAS binds the same port.
    load_cas.stop(signal.SIGKILL)
    restarted_at = time.monotonic()
    load_cas.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "agents still running at the deadline"

    failures = [f"{o.service}: {o.error!r}" for o in outcomes if o.activated is None]
    assert not failures, f"{len(failures)} agents failed: {failures[:5]}"
    assert any(o.finished_at > restarted_at for o in outcomes), "nothing ran after the restart"
    assert retries >= 1, "the restart was not in the middle of any activation"

    # Every agent has its own certificate, for its own key, from the one session CA.
    fingerprints = set()
    ca_pems = set()
    for o in outcomes:
        assert o.activated is not None
        bundle = o.activated.bundle
        if o.service != "web":
            continue
        chain = x509.load_pem_x509_certificates(bundle.certificates["tls"].encode())
        leaf = chain[0]
        assert _spki(leaf.public_key()) == _spki(o.activated.tls_key.public_key())
        fingerprints.add(_fingerprint(leaf))
        files = {f.path: base64.b64decode(f.content) for f in bundle.files}
        ca_pems.add(files["/run/web/ca.crt"])
        leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(files["/run/web/ca.crt"]))
    assert len(fingerprints) == WEB
    assert len(ca_pems) == 1  # the CA survived the restart unchanged

    # Generated secrets are the same for every replica, before and after the restart.
    tokens = {o.activated.bundle.environment["API_TOKEN"] for o in outcomes if o.activated}
    assert len(tokens) == 1 and len(next(iter(tokens))) == 64
    web = [o.activated.bundle for o in outcomes if o.activated and o.service == "web"]
    passwords = {b.command[2] for b in web if b.command}
    confs = {next(f.content for f in b.files if f.path == "/run/web/app.conf") for b in web}
    assert len(passwords) == 1 and len(confs) == 1
    assert base64.b64decode(next(iter(confs))).decode() == f"password={next(iter(passwords))}"
