"""The CAS's TLS server context: TLS 1.3 only, its identity pinned by clients, no tickets."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from cloister.cas import server
from cloister.cas.service import Cas
from cloister.client import pinned_context


@pytest.fixture
def cas(in_process: Cas) -> Cas:
    return in_process


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A real handshake and one request/response exchange over memory BIOs."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    cli = client_ctx.wrap_bio(c_in, c_out)
    for _ in range(10):
        done = 0
        for side, out, peer_in in ((cli, c_out, s_in), (srv, s_out, c_in)):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            peer_in.write(out.read())
        if done == 2:
            break
    cli.write(b"ping")
    s_in.write(c_out.read())
    assert srv.read() == b"ping"
    srv.write(b"pong")
    c_in.write(s_out.read())
    assert cli.read() == b"pong"
    return srv, cli


def test_the_pinned_client_completes_tls13_and_gets_no_session_ticket(cas: Cas) -> None:
    srv, cli = _handshake(server.tls_context(cas.identity), pinned_context(cas.identity.cert_pem()))
    assert cli.version() == srv.version() == "TLSv1.3"
    # Agents are new processes and never resume: the CAS makes no tickets for them.
    assert cli.session is not None and not cli.session.has_ticket


def test_a_client_pinning_another_key_is_refused(cas: Cas, tmp_path: Path) -> None:
    other = server.build(server.Settings(data_dir=tmp_path / "other", simulation=True))
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(server.tls_context(cas.identity), pinned_context(other.identity.cert_pem()))
    finally:
        other.store.close()
