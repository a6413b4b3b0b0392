"""Hardware evidence verification: verifications/s and latency per TEE, cold and warm.

Runs on the real vectors in ``../shared/testdata/attestation`` (or ``CLOISTER_TESTDATA``), in
one process on one core. Collateral is loaded into memory first, so the figures are
verification cost, not disk reads.

* cold: a new verifier with an empty ``CollateralCache`` for every verification (every
  certificate, CRL and signed collateral item is parsed and its signature checked);
* warm: one verifier, its cache filled by a first verification (what the CAS does: only the
  signatures unique to the evidence are checked);
* dcap-qvl: the Phala dcap-qvl verifier (Rust core, no cache) on the same SGX and TDX quotes
  and collateral, side by side.

Rates are given per second of this process's CPU time (one core, whatever else the machine
runs) and per second of wall-clock time; latencies are wall clock.

Usage: ``python benchmarks/attestation.py [--seconds 1.0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cloister.attestation import Tee, collateral, sgx, snp, tdx

try:
    import dcap_qvl
except ImportError:  # the comparison is optional
    dcap_qvl = None

TESTDATA = Path(
    os.environ.get(
        "CLOISTER_TESTDATA",
        Path(__file__).resolve().parents[1] / ".." / "shared" / "testdata" / "attestation",
    )
)


@dataclass
class Vector:
    name: str
    tee: Tee
    evidence: bytes
    now: datetime
    directory: Path


class MemorySource:
    """A case's collateral, read once, served from memory."""

    def __init__(self, directory: Path) -> None:
        disk = collateral.DirectorySource(directory)
        self._dcap = disk.dcap_collateral(collateral.DcapRequest(Tee.SGX, "", "", ""))
        self._snp = disk.snp_collateral(collateral.SnpRequest(None, "vcek", b"", 0))

    def dcap_collateral(self, request: collateral.DcapRequest) -> collateral.DcapCollateral:
        return self._dcap

    def pck_chain(self, request: collateral.PckRequest) -> bytes:
        raise collateral._missing("PCK chain")

    def snp_collateral(self, request: collateral.SnpRequest) -> collateral.SnpCollateral:
        return self._snp


def vectors() -> list[Vector]:
    out = []
    for case_json in sorted(TESTDATA.glob("*/*/case.json")):
        spec = json.loads(case_json.read_text())
        if spec["expect"] != "accept":
            continue
        path = case_json.parent
        out.append(
            Vector(
                name=f"{path.parent.name}/{path.name}",
                tee=Tee(spec["tee"]),
                evidence=(path / spec["evidence"]).read_bytes(),
                now=datetime.fromisoformat(spec["verify_at"].replace("Z", "+00:00")),
                directory=path / spec["collateral"],
            )
        )
    return out


def make(tee: Tee, source: object, cache: collateral.CollateralCache) -> object:
    cls = {Tee.SGX: sgx.SgxVerifier, Tee.TDX: tdx.TdxVerifier, Tee.SNP: snp.SnpVerifier}[tee]
    return cls(source, cache=cache)  # type: ignore[arg-type]


@dataclass
class Samples:
    wall: list[float]  # seconds per verification, wall clock
    cpu: float  # seconds of this process's CPU time for all of them


def measure(fn: Callable[[], object], seconds: float) -> Samples:
    fn()  # first call outside the measurement (imports, lazy initialization)
    wall: list[float] = []
    deadline = time.perf_counter() + seconds
    cpu0 = time.process_time()
    while time.perf_counter() < deadline or len(wall) < 20:
        t0 = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
    return Samples(wall, time.process_time() - cpu0)


def qvl_call(v: Vector) -> Callable[[], object] | None:
    if dcap_qvl is None or v.tee is Tee.SNP:
        return None

    def read(name: str) -> bytes:
        p = v.directory / name
        return p.read_bytes() if p.exists() else b""

    col = dcap_qvl.QuoteCollateralV3(
        read("pck_crl_issuer_chain.pem").decode(),
        read("root_ca_crl.der"),
        read("pck_crl.der"),
        read("tcb_info_issuer_chain.pem").decode(),
        read("tcb_info_body.json").decode(),
        bytes.fromhex(read("tcb_info_signature.hex").decode()),
        read("qe_identity_issuer_chain.pem").decode(),
        read("qe_identity_body.json").decode(),
        bytes.fromhex(read("qe_identity_signature.hex").decode()),
    )
    now = int(v.now.timestamp())

    def call() -> object:
        try:
            return dcap_qvl.verify(v.evidence, col, now)
        except ValueError as exc:  # e.g. its fixed MR_SERVICETD policy; the time still counts
            return exc

    return call


def row(label: str, samples: Samples) -> tuple[str, ...]:
    ms = sorted(s * 1e3 for s in samples.wall)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (
        label,
        f"{len(ms) / samples.cpu:,.0f}",
        f"{samples.cpu / len(ms) * 1e3:.3f}",
        f"{len(ms) / sum(samples.wall):,.0f}",
        f"{statistics.median(ms):.3f}",
        f"{p99:.3f}",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args()
    if not TESTDATA.is_dir():
        print(f"test vectors not found at {TESTDATA}; set CLOISTER_TESTDATA", file=sys.stderr)
        return 2
    rows = []
    for v in vectors():
        source = MemorySource(v.directory)

        def cold(v: Vector = v, source: MemorySource = source) -> object:
            return make(v.tee, source, collateral.CollateralCache()).verify(v.evidence, now=v.now)  # type: ignore[attr-defined]

        warm_verifier = make(v.tee, source, collateral.CollateralCache())

        def warm(v: Vector = v, verifier: object = warm_verifier) -> object:
            return verifier.verify(v.evidence, now=v.now)  # type: ignore[attr-defined]

        rows.append(row(f"{v.name} cold", measure(cold, args.seconds)))
        rows.append(row(f"{v.name} warm", measure(warm, args.seconds)))
        qvl = qvl_call(v)
        if qvl is not None:
            rows.append(row(f"{v.name} dcap-qvl", measure(qvl, args.seconds)))
    # CPU columns use this process's CPU time: what one core does, whatever else the machine
    # runs. Wall-clock columns include time the process waited for a core.
    header = ("evidence / mode", "verif/s (CPU)", "CPU ms", "verif/s (wall)", "p50 ms", "p99 ms")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
