"""Hardware evidence providers for the agent: Gramine's ``/dev/attestation`` and configfs-tsm.

Owns getting evidence out of the TEE the agent runs in, bound to caller-chosen report data:

* ``GramineProvider`` (SGX under Gramine): writes the 64 bytes of report data to
  ``/dev/attestation/user_report_data`` and reads the DCAP quote from
  ``/dev/attestation/quote``; ``/dev/attestation/attestation_type`` must say ``dcap``.
* ``TsmProvider`` (TDX and SEV-SNP on Linux ≥ 6.7): creates a report entry under
  ``/sys/kernel/config/tsm/report``, writes ``inblob`` (and ``privlevel`` for SNP), reads
  ``outblob`` and, for SNP, ``auxblob`` (the certificate table: VCEK/VLEK, ASK, ARK), checks
  ``generation`` so that a concurrent writer to the same entry is detected and retried
  (Documentation/ABI/testing/configfs-tsm), and removes the entry.
* ``detect()``: the provider for the TEE present, or ``None``.

Every root path is a constructor argument so that tests run these providers against a
temporary directory tree. The evidence is returned as the TEE emits it (an SNP report is
followed by its certificate table when the host supplies one, which ``attestation.snp``
reads). This module imports nothing from the CAS side.

Does not own: verifying evidence (``attestation``), or the activation protocol (``activation``).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from pathlib import Path

from cloister import limits
from cloister.attestation import Tee
from cloister.errors import BackendUnavailable, BindingError

__all__ = ["GRAMINE_ROOT", "TSM_REPORT_ROOT", "GramineProvider", "TsmProvider", "detect"]

log = logging.getLogger(__name__)

GRAMINE_ROOT = Path("/dev/attestation")
TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
REPORT_DATA_SIZE = 64
_TSM_PROVIDERS = {"tdx_guest": Tee.TDX, "sev_guest": Tee.SNP}
_TSM_RETRIES = 3
_SNP_REPORT_SIZE = 1184
_SNP_REPORT_DATA = slice(0x50, 0x90)


def _check_report_data(report_data: bytes) -> None:
    if len(report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report data is {REPORT_DATA_SIZE} bytes, got {len(report_data)}")


def _unavailable(message: str, exc: OSError | None = None) -> BackendUnavailable:
    detail = f": {exc.strerror or exc}" if exc is not None else ""
    return BackendUnavailable(f"{message}{detail}", reason="tee-unavailable")


def _read_bounded(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limits.MAX_EVIDENCE_BYTES + 1)
    if len(data) > limits.MAX_EVIDENCE_BYTES:
        raise _unavailable(f"{path} holds more than MAX_EVIDENCE_BYTES")
    return data


def _dcap_report_data(quote: bytes) -> bytes | None:
    """Report data of an SGX (v3/v4) or TDX (v4/v5) quote, or ``None`` if the layout is unknown."""
    if len(quote) < 48:
        return None
    version = int.from_bytes(quote[0:2], "little")
    tee_type = int.from_bytes(quote[4:8], "little")
    if tee_type == 0 and version in (3, 4):
        offset = 48 + 320
    elif tee_type == 0x81 and version == 4:
        offset = 48 + 520
    elif version == 5:
        offset = 54 + (320 if tee_type == 0 else 520)
    else:
        return None
    return quote[offset : offset + 64] if len(quote) >= offset + 64 else None


class GramineProvider:
    """SGX DCAP quotes from Gramine's pseudo-files under ``root`` (``/dev/attestation``)."""

    tee: Tee = Tee.SGX

    def __init__(self, root: Path = GRAMINE_ROOT) -> None:
        self.root = Path(root)

    @staticmethod
    def available(root: Path = GRAMINE_ROOT) -> bool:
        try:
            kind = (Path(root) / "attestation_type").read_text().strip()
        except OSError:
            return False
        return kind == "dcap"

    def evidence(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        try:
            kind = (self.root / "attestation_type").read_text().strip()
        except OSError as exc:
            raise _unavailable("Gramine attestation is not available", exc) from exc
        if kind != "dcap":
            raise _unavailable(f"Gramine attestation type is {kind!r}, not 'dcap'")
        try:
            with open(self.root / "user_report_data", "wb") as f:
                f.write(report_data)
            quote = _read_bounded(self.root / "quote")
        except OSError as exc:
            raise _unavailable("Gramine did not produce a quote", exc) from exc
        # Gramine binds what was last written; a stale quote would bind other data.
        if _dcap_report_data(quote) != report_data:
            raise BindingError(
                "the quote does not carry the requested report data", reason="binding-mismatch"
            )
        return quote


class TsmProvider:
    """TDX quotes or SNP reports through Linux configfs-tsm under ``root``.

    ``privlevel`` is the SNP VMPL to request (``None`` leaves the kernel default).
    """

    def __init__(
        self, root: Path = TSM_REPORT_ROOT, *, tee: Tee | None = None, privlevel: int | None = None
    ) -> None:
        self.root = Path(root)
        self.privlevel = privlevel
        self.tee: Tee = tee if tee is not None else self._probe()

    # --- the filesystem side, one small method per operation -----------------------------------

    def _create_entry(self) -> Path:
        entry = self.root / f"cloister-{os.getpid()}-{secrets.token_hex(4)}"
        entry.mkdir()
        return entry

    def _remove_entry(self, entry: Path) -> None:
        try:
            entry.rmdir()
        except OSError as exc:
            log.warning("could not remove configfs-tsm entry %s: %s", entry, exc)

    def _write_attr(self, entry: Path, name: str, data: bytes) -> None:
        with open(entry / name, "wb") as f:
            f.write(data)

    def _read_attr(self, entry: Path, name: str) -> bytes:
        return _read_bounded(entry / name)

    # --- the protocol ----------------------------------------------------------------------------

    def _probe(self) -> Tee:
        try:
            entry = self._create_entry()
        except OSError as exc:
            raise _unavailable(f"cannot create a report under {self.root}", exc) from exc
        try:
            name = self._read_attr(entry, "provider").decode("ascii", "replace").strip()
        except OSError as exc:
            raise _unavailable("configfs-tsm has no provider", exc) from exc
        finally:
            self._remove_entry(entry)
        tee = _TSM_PROVIDERS.get(name)
        if tee is None:
            raise _unavailable(f"configfs-tsm provider {name!r} is not supported")
        return tee

    def evidence(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        for attempt in range(_TSM_RETRIES):
            try:
                result = self._once(report_data)
            except OSError as exc:
                raise _unavailable("configfs-tsm did not produce a report", exc) from exc
            if result is not None:
                return result
            log.info("configfs-tsm entry was written concurrently; retrying (%d)", attempt + 1)
        raise _unavailable("configfs-tsm entry kept changing while it was read")

    def _once(self, report_data: bytes) -> bytes | None:
        entry = self._create_entry()
        try:
            provider = self._read_attr(entry, "provider").decode("ascii", "replace").strip()
            if _TSM_PROVIDERS.get(provider) is not self.tee:
                raise _unavailable(
                    f"configfs-tsm provider is {provider!r}, expected {self.tee.value}"
                )
            if self.privlevel is not None and self.tee is Tee.SNP:
                self._write_attr(entry, "privlevel", str(self.privlevel).encode())
            start = self._generation(entry)
            self._write_attr(entry, "inblob", report_data)
            out = self._read_attr(entry, "outblob")
            aux = b""
            if self.tee is Tee.SNP:
                try:
                    aux = self._read_attr(entry, "auxblob")
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ENODATA, errno.EINVAL):
                        raise
            # configfs-tsm: ``generation`` counts writes to the entry; a value other than ours
            # means someone else changed inblob between our write and our read.
            if self._generation(entry) != start + 1:
                return None
        finally:
            self._remove_entry(entry)
        return self._checked(out, aux, report_data)

    def _generation(self, entry: Path) -> int:
        raw = self._read_attr(entry, "generation").decode("ascii", "replace").strip()
        try:
            return int(raw)
        except ValueError:
            raise _unavailable(f"configfs-tsm generation {raw!r} is not a number") from None

    def _checked(self, out: bytes, aux: bytes, report_data: bytes) -> bytes:
        if self.tee is Tee.SNP:
            if len(out) < _SNP_REPORT_SIZE:
                raise _unavailable("configfs-tsm returned a short SNP report")
            report = out[:_SNP_REPORT_SIZE]
            if report[_SNP_REPORT_DATA] != report_data:
                raise BindingError(
                    "the report does not carry the requested report data", reason="binding-mismatch"
                )
            return report + aux if aux.strip(b"\0") else report
        if _dcap_report_data(out) != report_data:
            raise BindingError(
                "the quote does not carry the requested report data", reason="binding-mismatch"
            )
        return out


def detect(
    *,
    gramine_root: Path = GRAMINE_ROOT,
    tsm_root: Path = TSM_REPORT_ROOT,
    tsm_provider: type[TsmProvider] = TsmProvider,
) -> GramineProvider | TsmProvider | None:
    """The evidence provider of the TEE this process runs in, or ``None`` outside any TEE.

    Gramine first (an SGX enclave may run on a host that also has configfs-tsm), then
    configfs-tsm, whose ``provider`` attribute says TDX or SNP.
    """
    if GramineProvider.available(gramine_root):
        return GramineProvider(gramine_root)
    if Path(tsm_root).is_dir():
        try:
            return tsm_provider(tsm_root)
        except BackendUnavailable as exc:
            log.info("configfs-tsm present but unusable: %s", exc.message)
    return None
