"""TCB level selection and status convergence, as Intel's Quote Verification Library does.

Owns: matching the QE against its identity and finding its TCB level by ISVSVN; choosing the
first platform TCB level (Intel orders them newest first) whose SGX components and PCESVN, and
for TDX whose TDX components, the platform meets; matching the TDX module against
``tdxModule`` or ``tdxModuleIdentities``; and merging the platform, QE and module statuses into
one, where ``Revoked`` is a rejection (reason ``tcb-revoked``).
"""

from __future__ import annotations

from collections.abc import Sequence

from cloister.attestation._dcap import PckExtension, SgxReport, TdReport
from cloister.attestation._dcap_collateral import QeIdentity, TcbInfo, TcbLevel
from cloister.errors import CollateralError

UP_TO_DATE = "UpToDate"
OUT_OF_DATE = "OutOfDate"
REVOKED = "Revoked"
RELAUNCH = "TDRelaunchAdvised"
RELAUNCH_CONFIGURATION = "TDRelaunchAdvisedConfigurationNeeded"
_KNOWN_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "Revoked",
        RELAUNCH,
        RELAUNCH_CONFIGURATION,
    }
)


def match_qe_identity(qe: SgxReport, identity: QeIdentity) -> tuple[str, tuple[str, ...]]:
    """QE report against the QE Identity; its TCB status by ISVSVN (QVL ``EnclaveIdentityV2``)."""
    masked = int.from_bytes(
        bytes(a & m for a, m in zip(qe.attributes, identity.attributes_mask, strict=True)), "big"
    )
    expected_attrs = int.from_bytes(
        bytes(a & m for a, m in zip(identity.attributes, identity.attributes_mask, strict=True)),
        "big",
    )
    if (
        qe.mr_signer != identity.mrsigner
        or qe.isv_prod_id != identity.isvprodid
        or qe.misc_select & identity.miscselect_mask
        != identity.miscselect & identity.miscselect_mask
        or masked != expected_attrs
    ):
        raise CollateralError(
            "the quoting enclave does not match the QE Identity", reason="qe-identity-mismatch"
        )
    for isvsvn, status, advisories in identity.levels:
        if isvsvn <= qe.isv_svn:
            return status, advisories
    # QVL: an ISVSVN below every level is a revoked QE.
    return REVOKED, ()


def match_platform_level(tcb: TcbInfo, ext: PckExtension, tee_tcb_svn: bytes | None) -> TcbLevel:
    """The first TCB level (Intel orders them newest first) that the platform meets."""
    for level in tcb.levels:
        if ext.pce_svn < level.pce_svn:
            continue
        if any(p < lv for p, lv in zip(ext.tcb_components, level.sgx_components, strict=True)):
            continue
        if tee_tcb_svn is not None:
            if level.tdx_components is None:
                continue
            # TDX 1.5+: with a TDX module major version (byte 1) above 0, bytes 0 and 1 are the
            # module's SVN and version and are matched by its module identity instead.
            start = 2 if tee_tcb_svn[1] > 0 else 0
            if any(tee_tcb_svn[i] < level.tdx_components[i] for i in range(start, 16)):
                continue
        return level
    raise CollateralError(
        "no TCB level of the TCB Info matches the platform (TCB not supported)",
        reason="no-matching-tcb-level",
    )


def _masked_equal(value: bytes, expected: bytes, mask: bytes) -> bool:
    if len(value) != len(expected) or len(mask) != len(value):
        return False
    return all(v & m == e & m for v, e, m in zip(value, expected, mask, strict=True))


def match_tdx_module(
    tcb: TcbInfo, report: TdReport, tee_tcb_svn: bytes | None = None
) -> tuple[str | None, tuple[str, ...]]:
    """The TDX module against the TCB Info's ``tdxModule`` / ``tdxModuleIdentities``.

    TDX 1.0 modules (TEE_TCB_SVN byte 1 is 0) are matched against ``tdxModule``; later ones
    against the identity ``TDX_<major version>``, whose TCB level gives a status (QVL
    ``TdxModuleCheck``). ``tee_tcb_svn`` defaults to the report's (TEE_TCB_SVN2 may be given).
    """
    svn = report.tee_tcb_svn if tee_tcb_svn is None else tee_tcb_svn
    major = svn[1]
    if major == 0:
        module = tcb.tdx_module
        if module is None:
            raise CollateralError("TCB Info carries no tdxModule", reason="tdx-module-mismatch")
        if report.mr_signer_seam != module.mrsigner or not _masked_equal(
            report.seam_attributes, module.attributes, module.attributes_mask
        ):
            raise CollateralError(
                "the TDX module is not the one TCB Info names", reason="tdx-module-mismatch"
            )
        return None, ()
    wanted = f"TDX_{major:02X}"
    for identity in tcb.tdx_module_identities:
        if identity.id.upper() != wanted:
            continue
        if report.mr_signer_seam != identity.mrsigner or not _masked_equal(
            report.seam_attributes, identity.attributes, identity.attributes_mask
        ):
            raise CollateralError(
                f"the TDX module does not match {wanted}", reason="tdx-module-mismatch"
            )
        for isvsvn, status, advisories in identity.levels:
            if isvsvn <= svn[0]:
                return status, advisories
        raise CollateralError(
            f"no TCB level of {wanted} matches TDX module SVN {svn[0]}",
            reason="no-matching-tcb-level",
        )
    raise CollateralError(
        f"TCB Info has no TDX module identity {wanted}", reason="tdx-module-mismatch"
    )


def converge(platform: str, other: str | None) -> str:
    """Merge a QE or TDX module status into the platform status (QVL status convergence)."""
    if other is None or other == UP_TO_DATE:
        return platform
    if other == REVOKED:
        return REVOKED
    if other == OUT_OF_DATE:
        if platform in ("UpToDate", "SWHardeningNeeded"):
            return OUT_OF_DATE
        if platform in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    return platform


def merge(statuses: Sequence[str | None]) -> str:
    """The platform status (first) with every other component's status converged into it."""
    platform = statuses[0]
    if platform is None:
        raise ValueError("the platform status comes first")
    for other in statuses[1:]:
        platform = converge(platform, other)
    return platform


def check_for_relaunch(launch: str, current: str) -> str:
    """TD 1.5 (QVL ``TDRelaunchCheck``): a TD launched under a TDX module that is now out of
    date, on a platform whose current module (TEE_TCB_SVN2) is not, is advised to relaunch."""
    if launch in ("OutOfDate", "OutOfDateConfigurationNeeded") and current in (
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
    ):
        configuration = launch == "OutOfDateConfigurationNeeded" or "Configuration" in current
        return RELAUNCH_CONFIGURATION if configuration else RELAUNCH
    return launch


def accepted_status(status: str) -> str:
    """A known status that is not ``Revoked``; anything else is a rejection."""
    if status not in _KNOWN_STATUSES:
        raise CollateralError(f"unknown TCB status {status!r}", reason="malformed-collateral")
    if status == REVOKED:
        # The vectors' "accept" requires a matching level whose status is not Revoked.
        raise CollateralError("the platform's TCB is revoked", reason="tcb-revoked")
    return status


def final_status(statuses: Sequence[str | None]) -> str:
    return accepted_status(merge(statuses))
