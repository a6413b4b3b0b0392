"""Intel PCS/PCCS (API v4) and AMD KDS sources against an in-process HTTP server on 127.0.0.1
that serves the vectors' collateral in the services' response formats."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from attestation_vectors import Case, all_cases, make_verifier

from cloister.attestation import Tee, _snp, _x509, collateral, snp
from cloister.errors import BackendUnavailable, CollateralError

DCAP_ACCEPTED = [c for c in all_cases() if c.accept and c.tee in (Tee.SGX, Tee.TDX)]
SNP_VCEK_ACCEPTED = [
    c for c in all_cases("snp") if c.accept and (c.collateral_dir / "vcek.der").exists()
]


class _Vendor(BaseHTTPRequestHandler):
    """Answers like Intel PCS and AMD KDS, from one case's collateral directory."""

    directory: Path
    failures: dict[str, int]
    hex_root_crl = False

    def log_message(self, format: str, *args: object) -> None:  # quiet
        del format, args

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self, name: str) -> bytes | None:
        p = self.directory / name
        return p.read_bytes() if p.exists() else None

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        status = self.failures.get(url.path)
        if status:
            self._send(status, b"")
            return
        route = (
            self._intel(url.path, query)
            if "/certification/v4/" in url.path
            else self._amd(url.path, query)
        )
        if route is None:
            self._send(404, b"")
        else:
            self._send(200, *route)

    def _intel(self, path: str, query: dict[str, str]) -> tuple[bytes, dict[str, str]] | None:
        kind = path.split("/")[1]
        if path.endswith("/tcb"):
            body = self._file("tcb_info_body.json")
            if body is None or json.loads(body)["fmspc"].upper() != query.get("fmspc"):
                return None
            if (json.loads(body).get("id", "SGX") == "TDX") != (kind == "tdx"):
                return None
            sig = self._file("tcb_info_signature.hex") or b""
            chain = self._file("tcb_info_issuer_chain.pem") or b""
            return (
                b'{"tcbInfo":' + body + b',"signature":"' + sig.strip() + b'"}',
                {"TCB-Info-Issuer-Chain": quote(chain.decode())},
            )
        if path.endswith("/qe/identity"):
            body = self._file("qe_identity_body.json")
            if body is None:
                return None
            sig = self._file("qe_identity_signature.hex") or b""
            chain = self._file("qe_identity_issuer_chain.pem") or b""
            return (
                b'{"enclaveIdentity":' + body + b',"signature":"' + sig.strip() + b'"}',
                {"SGX-Enclave-Identity-Issuer-Chain": quote(chain.decode())},
            )
        if path.endswith("/pckcrl"):
            crl = self._file("pck_crl.der")
            if (
                crl is None
                or query.get("encoding") != "der"
                or query.get("ca") not in ("processor", "platform")
            ):
                return None
            chain = self._file("pck_crl_issuer_chain.pem")
            return crl, ({"SGX-PCK-CRL-Issuer-Chain": quote(chain.decode())} if chain else {})
        if path.endswith("/rootcacrl"):
            crl = self._file("root_ca_crl.der")
            if crl is None:
                return None
            return (crl.hex().encode() if self.hex_root_crl else crl), {}
        return None

    def _amd(self, path: str, query: dict[str, str]) -> tuple[bytes, dict[str, str]] | None:
        parts = path.strip("/").split("/")  # vcek, v1, Milan, <hwid> | cert_chain
        if len(parts) != 4 or parts[1] != "v1":
            return None
        ark = self._file("ark.pem")
        if parts[3] == "cert_chain":
            signer = self._file("ask.pem" if parts[0] == "vcek" else "asvk.pem")
            return (signer + ark, {}) if signer and ark else None
        vcek = self._file("vcek.der")
        if parts[0] != "vcek" or vcek is None:
            return None
        ek = _snp.endorsement_key(_x509.load_der_cert(vcek))
        wanted = {
            "blSPL": ek.bootloader,
            "teeSPL": ek.tee,
            "snpSPL": ek.snp,
            "ucodeSPL": ek.microcode,
        }
        if (
            ek.hwid is None
            or parts[3] != ek.hwid.hex()
            or any(query.get(k) != str(v) for k, v in wanted.items())
        ):
            return None
        return vcek, {}


class _Server:
    def __init__(self, directory: Path) -> None:
        handler = type("Handler", (_Vendor,), {"directory": directory, "failures": {}})
        self.handler: type[_Vendor] = handler
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=5.0) as c:
        yield c


@pytest.mark.parametrize("case", DCAP_ACCEPTED, ids=lambda c: c.name)
def test_pcs_source_gives_the_same_claims_as_the_directory(
    case: Case, client: httpx.Client
) -> None:
    with _Server(case.collateral_dir) as server:
        source = collateral.PcsSource(server.url, client=client)
        claims = make_verifier(case.tee, source).verify(case.evidence, now=case.now)
    offline = case.verifier().verify(case.evidence, now=case.now)
    assert claims == offline


def test_pccs_root_crl_in_hex_is_read(client: httpx.Client) -> None:
    case = DCAP_ACCEPTED[0]
    with _Server(case.collateral_dir) as server:
        server.handler.hex_root_crl = True
        source = collateral.PcsSource(server.url, client=client)
        assert make_verifier(case.tee, source).verify(case.evidence, now=case.now).tcb_status


def test_a_cached_verification_does_not_ask_the_service_again(client: httpx.Client) -> None:
    case = DCAP_ACCEPTED[0]
    cache = collateral.CollateralCache()
    with _Server(case.collateral_dir) as server:
        verifier = make_verifier(case.tee, collateral.PcsSource(server.url, client=client), cache)
        verifier.verify(case.evidence, now=case.now)
        server.handler.failures["/sgx/certification/v4/pckcrl"] = 500
        server.handler.failures["/tdx/certification/v4/tcb"] = 500
        server.handler.failures["/sgx/certification/v4/tcb"] = 500
        verifier.verify(case.evidence, now=case.now)  # served from the cache


def test_service_errors_are_backend_unavailable(client: httpx.Client) -> None:
    case = DCAP_ACCEPTED[0]
    with _Server(case.collateral_dir) as server:
        server.handler.failures["/sgx/certification/v4/pckcrl"] = 503
        source = collateral.PcsSource(server.url, client=client)
        with pytest.raises(BackendUnavailable):
            make_verifier(case.tee, source).verify(case.evidence, now=case.now)


def test_unreachable_service_is_backend_unavailable(client: httpx.Client) -> None:
    case = DCAP_ACCEPTED[0]
    with _Server(case.collateral_dir) as server:
        url = server.url
    source = collateral.PcsSource(url, client=client)  # the server is gone: connection refused
    with pytest.raises(BackendUnavailable) as info:
        make_verifier(case.tee, source).verify(case.evidence, now=case.now)
    assert isinstance(info.value.__cause__, httpx.HTTPError)


def test_unknown_fmspc_is_collateral_missing(client: httpx.Client) -> None:
    case = DCAP_ACCEPTED[0]
    other = next(c for c in DCAP_ACCEPTED if c.tee is not case.tee or c.path != case.path)
    with _Server(other.collateral_dir) as server:
        source = collateral.PcsSource(server.url, client=client)
        with pytest.raises(CollateralError) as info:
            make_verifier(case.tee, source).verify(case.evidence, now=case.now)
    assert info.value.reason == "collateral-missing"


def test_signed_bytes_are_cut_out_exactly() -> None:
    body = b'{"tcbInfo":{"a":"}{\\"","b":{"c":1}},"signature":"00"}'
    assert collateral._signed_object(body, b"tcbInfo") == b'{"a":"}{\\"","b":{"c":1}}'
    with pytest.raises(CollateralError):
        collateral._signed_object(b'{"tcbInfo":{"a":1', b"tcbInfo")


def _product(case: Case) -> str:
    product = _snp.product_of_name(
        _x509.load_pem_certs((case.collateral_dir / "ark.pem").read_bytes())[0].subject
    )
    assert product is not None
    return product


@pytest.mark.parametrize("case", SNP_VCEK_ACCEPTED, ids=lambda c: c.name)
def test_kds_source_gives_the_same_claims_as_the_directory(
    case: Case, client: httpx.Client
) -> None:
    with _Server(case.collateral_dir) as server:
        source = collateral.KdsSource(server.url, client=client)
        verifier = snp.SnpVerifier(source, product=_product(case))
        claims = verifier.verify(case.evidence, now=case.now)
    assert claims == case.verifier().verify(case.evidence, now=case.now)


def test_kds_source_needs_a_product_for_v2_reports(client: httpx.Client) -> None:
    case = next(c for c in SNP_VCEK_ACCEPTED if c.evidence[0] == 2)
    with _Server(case.collateral_dir) as server:
        verifier = snp.SnpVerifier(collateral.KdsSource(server.url, client=client))
        with pytest.raises(CollateralError) as info:
            verifier.verify(case.evidence, now=case.now)
    assert info.value.reason == "collateral-missing"
