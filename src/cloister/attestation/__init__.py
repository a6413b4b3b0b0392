"""Evidence → verified ``Claims``. Says nothing about policy.

One module per TEE behind one ``Verifier`` protocol (``sgx``, ``tdx``, ``snp``,
``simulated``), picked with ``verifier_for(Tee.X, ...)``. Hardware verifiers take a
``collateral`` source (``collateral.DirectorySource``, ``PcsSource``, ``KdsSource``) and
optionally a shared ``collateral.CollateralCache``. The activation binding between evidence
and a workload's key is in ``binding``.
"""

from cloister.attestation import binding, collateral, sgx, simulated, snp, tdx
from cloister.attestation._claims import Claims, ClaimValue, Tee
from cloister.attestation._verifier import Verifier, register, registered, verifier_for

register(Tee.SIMULATION, simulated.SimulatedVerifier)
register(Tee.SGX, sgx.SgxVerifier)
register(Tee.TDX, tdx.TdxVerifier)
register(Tee.SNP, snp.SnpVerifier)

__all__ = [
    "ClaimValue",
    "Claims",
    "Tee",
    "Verifier",
    "binding",
    "collateral",
    "register",
    "registered",
    "sgx",
    "simulated",
    "snp",
    "tdx",
    "verifier_for",
]
