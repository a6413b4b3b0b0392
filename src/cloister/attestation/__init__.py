"""Evidence → verified ``Claims``. Says nothing about policy.

One module per TEE behind one ``Verifier`` protocol (``sgx``, ``tdx``, ``snp``,
``simulated``), picked with ``verifier_for(Tee.X, ...)``. The activation binding between
evidence and a workload's key is in ``binding``.
"""

from cloister.attestation import binding, simulated
from cloister.attestation._claims import Claims, ClaimValue, Tee
from cloister.attestation._verifier import Verifier, register, registered, verifier_for

register(Tee.SIMULATION, simulated.SimulatedVerifier)

__all__ = [
    "ClaimValue",
    "Claims",
    "Tee",
    "Verifier",
    "binding",
    "register",
    "registered",
    "simulated",
    "verifier_for",
]
