"""Cloister: a control plane for confidential computing on Kubernetes.

The packages below this one are layered (see ``docs/architecture.md``): the core
(``attestation``, ``session``, ``policy``, ``pki``, ``secrets``, ``volume``, ``store``) is
synchronous, pure and offline; ``cas``, ``agent``, ``mesh``, ``k8s`` and ``cli`` add IO.
"""

__version__ = "0.1.0"
