"""The enforcing mutual-TLS mesh: ingress and egress proxies run beside an unmodified app.

Services of a session talk TLS 1.3 with the certificates the CAS issued them from the session
CA; since only attested services obtain such certificates, mutual TLS between them is mutual
attestation. For applications that speak plain TCP, these proxies enforce it:

- ingress terminates mutual TLS on the public port and forwards authorised callers (those the
  rule's ``allow_from`` names) to the application on loopback;
- egress accepts the application's plaintext connections on loopback ports and carries them to
  the target over mutual TLS, refusing any peer that is not the expected service.

This package owns the proxies, their configuration and counters. It does not obtain
certificates (the agent does, from the CAS) and does not read sessions (the agent renders a
``MeshConfig`` from one). See ``docs/mesh.md``.

Public surface::

    MeshConfig, IngressRule, EgressRule, TlsMaterial, MeshLimits   configuration (frozen)
    check_material                                                  does OpenSSL take the TLS files?
    ServiceIdentity, PeerIdentity                                   the naming convention
    Mesh, run_mesh, run_ingress, run_egress                         running the proxies
    serve, READY_LINE                                               ... as a process
    MeshStats                                                       counters, Prometheus text
"""

from __future__ import annotations

from cloister.mesh._tls import check_material
from cloister.mesh.config import EgressRule, IngressRule, MeshConfig, MeshLimits, TlsMaterial
from cloister.mesh.identity import PeerIdentity, ServiceIdentity
from cloister.mesh.proxy import READY_LINE, Mesh, run_egress, run_ingress, run_mesh, serve
from cloister.mesh.stats import MeshStats

__all__ = [
    "READY_LINE",
    "EgressRule",
    "IngressRule",
    "Mesh",
    "MeshConfig",
    "MeshLimits",
    "MeshStats",
    "PeerIdentity",
    "ServiceIdentity",
    "TlsMaterial",
    "check_material",
    "run_egress",
    "run_ingress",
    "run_mesh",
    "serve",
]
