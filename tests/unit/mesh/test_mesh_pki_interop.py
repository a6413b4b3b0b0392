"""Certificates from Cloister's own CA code (``cloister.pki``) work through the mesh.

This pins the contract between the CAS, which issues service certificates with ``pki.issue``,
and the mesh, which checks them: DNS SAN ``<service>.<session>``, server and client usage.
"""

from __future__ import annotations

import asyncio
import datetime as dt

from cryptography import x509

from cloister import pki
from cloister.mesh import EgressRule, IngressRule, Mesh, MeshConfig, TlsMaterial


def _material(ca_key: pki.CertificateKey, ca_cert: x509.Certificate, identity: str) -> TlsMaterial:
    now = dt.datetime.now(dt.UTC)
    key = pki.new_key()
    cert = pki.issue(
        ca_key=ca_key,
        ca_cert=ca_cert,
        public_key=key.public_key(),
        common_name=identity,
        usage="server-client",
        now=now,
        valid_for=dt.timedelta(days=1),
        dns=[identity],
    )
    return TlsMaterial(
        cert_pem=pki.pem(cert),
        key_pem=pki.key_pem(key),
        ca_pem=pki.pem(ca_cert),
    )


def test_service_certificates_from_cloister_pki_pass_the_mesh() -> None:
    ca_key, ca_cert = pki.new_ca(
        "demo session CA", now=dt.datetime.now(dt.UTC), valid_for=dt.timedelta(days=30)
    )

    async def scenario() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.read(100))
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        app = await asyncio.start_server(echo, "127.0.0.1", 0)
        app_port = app.sockets[0].getsockname()[1]
        server_cfg = MeshConfig(
            identity="api.demo",
            tls=_material(ca_key, ca_cert, "api.demo"),
            ingress=(IngressRule(port=0, app_port=app_port, allow_from=("web.demo",)),),
        )
        try:
            async with Mesh(server_cfg) as ingress:
                client_cfg = MeshConfig(
                    identity="web.demo",
                    tls=_material(ca_key, ca_cert, "web.demo"),
                    egress=(
                        EgressRule(
                            port=0, target=f"127.0.0.1:{ingress.ingress_ports[0]}", peer="api.demo"
                        ),
                    ),
                )
                async with Mesh(client_cfg) as egress:
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", egress.egress_ports[0]
                    )
                    writer.write(b"ping")
                    assert await reader.read(100) == b"ping"
                    writer.close()
                    await writer.wait_closed()
                assert ingress.stats.refusals() == 0
        finally:
            app.close()
            await app.wait_closed()

    asyncio.run(asyncio.wait_for(scenario(), 10))
