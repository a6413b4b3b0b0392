"""Collateral: what a verifier needs besides the evidence, where it comes from, and its cache.

Owns:

* the raw collateral values (``DcapCollateral`` for SGX/TDX, ``SnpCollateral`` for SNP) and
  the requests that name them (``DcapRequest`` by TEE, FMSPC, PCE ID and PCK CA;
  ``SnpRequest`` by product, chip and reported TCB);
* one narrow interface, ``CollateralSource``, with three implementations: an offline directory
  in the layout of the test vectors (``DirectorySource``), Intel PCS / PCCS API v4 over HTTP
  (``PcsSource``) and AMD KDS over HTTP (``KdsSource``). HTTP sources wrap every transport
  failure into ``BackendUnavailable``; a 404 is ``CollateralError("collateral-missing")``;
* ``CollateralCache``: verified collateral by request, used only while its validity window
  holds at ``now``, and a bounded memo of signature-verified artifacts (certificate chains,
  CRLs, TCB Info, QE identities) keyed by the digest of their exact bytes, so that a warm
  verification costs only the signatures unique to the evidence.

Does not own: verifying any of it (``sgx``, ``tdx``, ``snp`` do), or policy.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable
from urllib.parse import unquote

import httpx

from cloister import limits
from cloister.attestation import _snp
from cloister.attestation._claims import Tee
from cloister.errors import BackendUnavailable, CollateralError

__all__ = [
    "CollateralCache",
    "CollateralSource",
    "DcapCollateral",
    "DcapRequest",
    "DirectorySource",
    "KdsSource",
    "PcsSource",
    "SnpCollateral",
    "SnpRequest",
]

T = TypeVar("T")


# --- values ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DcapRequest:
    """Names the collateral of one SGX or TDX platform (Intel PCS API v4 parameters)."""

    tee: Tee
    fmspc: str  # 12 uppercase hex digits, from the PCK certificate
    pce_id: str  # 4 uppercase hex digits
    ca: str  # "processor" or "platform": the PCK CA that issued the PCK certificate


@dataclass(frozen=True)
class PckRequest:
    """Names a PCK certificate for quotes whose certification data does not carry it.

    ``cert_data`` is the quote's certification data: for types 2 and 3 the encrypted PPID
    followed by CPUSVN, PCESVN and PCE ID (Intel SGX ECDSA Quote Library API, Table 9).
    """

    tee: Tee
    cert_type: int
    cert_data: bytes


@dataclass(frozen=True)
class DcapCollateral:
    """Intel's collateral for one platform, raw and unverified. ``None`` means absent."""

    tcb_info_body: bytes | None = None  # the exact signed bytes of the inner ``tcbInfo``
    tcb_info_signature: bytes | None = None  # raw r‖s, 64 bytes
    tcb_info_issuer_chain: bytes | None = None  # PEM: TCB signing certificate, root
    qe_identity_body: bytes | None = None
    qe_identity_signature: bytes | None = None
    qe_identity_issuer_chain: bytes | None = None
    pck_crl: bytes | None = None  # DER
    pck_crl_issuer_chain: bytes | None = None  # PEM, optional
    root_ca_crl: bytes | None = None  # DER


@dataclass(frozen=True)
class SnpRequest:
    """Names the endorsement of one SNP report (AMD KDS parameters)."""

    product: str | None  # "Milan", "Genoa", "Turin"; None when the report does not say
    signing_key: str  # "vcek" or "vlek"
    chip_id: bytes
    reported_tcb: int  # the raw 64-bit TCB_VERSION


@dataclass(frozen=True)
class SnpCollateral:
    """AMD's certificates for one report, raw and unverified. ``None`` means absent."""

    vcek: bytes | None = None  # DER
    vlek: bytes | None = None  # DER
    ask: bytes | None = None  # PEM (signs VCEKs)
    asvk: bytes | None = None  # PEM (signs VLEKs)
    ark: bytes | None = None  # PEM


@runtime_checkable
class CollateralSource(Protocol):
    """Where verifiers get collateral. Implementations do IO; verifiers stay pure."""

    def dcap_collateral(self, request: DcapRequest) -> DcapCollateral: ...

    def pck_chain(self, request: PckRequest) -> bytes: ...

    def snp_collateral(self, request: SnpRequest) -> SnpCollateral: ...


def _missing(what: str) -> CollateralError:
    return CollateralError(f"no {what} is available", reason="collateral-missing")


# --- offline directory ----------------------------------------------------------------------


class DirectorySource:
    """Collateral from one directory in the layout of the test vectors' ``collateral/``.

    SGX/TDX: ``tcb_info_body.json``, ``tcb_info_signature.hex``, ``tcb_info_issuer_chain.pem``,
    ``qe_identity_*``, ``pck_crl.der``, ``pck_crl_issuer_chain.pem``, ``root_ca_crl.der``,
    ``pck_chain.pem``. SNP: ``vcek.der`` or ``vlek.der``, ``ask.pem`` or ``asvk.pem``,
    ``ark.pem``. Files are read on every call; wrap the source in a ``CollateralCache``.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def _read(self, name: str) -> bytes | None:
        p = self.path / name
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            return None
        if size > limits.MAX_COLLATERAL_ITEM_BYTES:
            raise CollateralError(
                f"{name} exceeds MAX_COLLATERAL_ITEM_BYTES", reason="collateral-too-large"
            )
        return p.read_bytes()

    def _hex(self, name: str) -> bytes | None:
        raw = self._read(name)
        if raw is None:
            return None
        try:
            return bytes.fromhex(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise CollateralError(f"{name} is not hex", reason="malformed-collateral") from None

    def dcap_collateral(self, request: DcapRequest) -> DcapCollateral:
        del request  # one directory holds the collateral of one platform
        if not self.path.is_dir():
            raise _missing(f"collateral directory {self.path}")
        return DcapCollateral(
            tcb_info_body=self._read("tcb_info_body.json"),
            tcb_info_signature=self._hex("tcb_info_signature.hex"),
            tcb_info_issuer_chain=self._read("tcb_info_issuer_chain.pem"),
            qe_identity_body=self._read("qe_identity_body.json"),
            qe_identity_signature=self._hex("qe_identity_signature.hex"),
            qe_identity_issuer_chain=self._read("qe_identity_issuer_chain.pem"),
            pck_crl=self._read("pck_crl.der"),
            pck_crl_issuer_chain=self._read("pck_crl_issuer_chain.pem"),
            root_ca_crl=self._read("root_ca_crl.der"),
        )

    def pck_chain(self, request: PckRequest) -> bytes:
        del request
        chain = self._read("pck_chain.pem")
        if chain is None:
            raise _missing("PCK certificate chain (pck_chain.pem)")
        return chain

    def snp_collateral(self, request: SnpRequest) -> SnpCollateral:
        del request
        if not self.path.is_dir():
            raise _missing(f"collateral directory {self.path}")
        return SnpCollateral(
            vcek=self._read("vcek.der"),
            vlek=self._read("vlek.der"),
            ask=self._read("ask.pem"),
            asvk=self._read("asvk.pem"),
            ark=self._read("ark.pem"),
        )


# --- HTTP: Intel PCS / PCCS (API v4) and AMD KDS ----------------------------------------------

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
INTEL_ROOT_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
AMD_KDS_URL = "https://kdsintf.amd.com"
_HTTP_TIMEOUT = 10.0


def _signed_object(body: bytes, key: bytes) -> bytes:
    """The exact bytes of the JSON object value of ``key`` in ``body`` (what Intel signed).

    Intel signs the serialized inner object (``tcbInfo``, ``enclaveIdentity``) as it appears
    in the response, so it must be cut out byte for byte, never re-serialized.
    """
    marker = b'"' + key + b'"'
    start = body.find(marker)
    if start < 0:
        raise CollateralError(f"response has no {key.decode()}", reason="malformed-collateral")
    pos = body.find(b"{", start + len(marker))
    if pos < 0 or body[start + len(marker) : pos].strip(b" \t\r\n:") != b"":
        raise CollateralError(f"{key.decode()} is not an object", reason="malformed-collateral")
    depth = 0
    in_string = escaped = False
    for i in range(pos, len(body)):
        c = body[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return body[pos : i + 1]
    raise CollateralError(f"{key.decode()} is truncated", reason="malformed-collateral")


def _signature_hex(body: bytes) -> bytes:
    try:
        value = json.loads(body)["signature"]
        return bytes.fromhex(value)
    except (ValueError, KeyError, TypeError):
        raise CollateralError(
            "response has no hex signature", reason="malformed-collateral"
        ) from None


class _Http:
    """A tiny GET helper over httpx that maps foreign errors into Cloister's."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        client: httpx.Client | None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.Client(timeout=timeout, follow_redirects=False)
        self._headers = headers or {}

    def get(self, url: str, params: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
        if not url.startswith("http"):
            url = self.base_url + url
        try:
            with self._client.stream("GET", url, params=params, headers=self._headers) as response:
                if response.status_code == 404:
                    raise _missing(f"collateral at {url}")
                if response.status_code != 200:
                    raise BackendUnavailable(
                        f"collateral service answered {response.status_code} for {url}",
                        reason="collateral-service",
                    )
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > limits.MAX_COLLATERAL_ITEM_BYTES:
                        raise CollateralError(
                            f"response from {url} exceeds MAX_COLLATERAL_ITEM_BYTES",
                            reason="collateral-too-large",
                        )
                    chunks.append(chunk)
                return b"".join(chunks), {k.lower(): v for k, v in response.headers.items()}
        except httpx.HTTPError as exc:
            raise BackendUnavailable(
                f"collateral service unreachable: {type(exc).__name__}", reason="collateral-service"
            ) from exc

    def close(self) -> None:
        self._client.close()


def _chain_header(headers: dict[str, str], *names: str) -> bytes:
    for name in names:
        if name.lower() in headers:
            return unquote(headers[name.lower()]).encode("ascii", "replace")
    raise CollateralError(f"response lacks the {names[0]} header", reason="malformed-collateral")


def _optional_header(headers: dict[str, str], name: str) -> bytes | None:
    try:
        return _chain_header(headers, name)
    except CollateralError:
        return None


class PcsSource:
    """Intel PCS, or a PCCS speaking the same API v4, over HTTP (``httpx``).

    TCB Info: ``GET /{sgx|tdx}/certification/v4/tcb?fmspc=…`` with the issuer chain in
    ``TCB-Info-Issuer-Chain``; QE identity: ``GET /{sgx|tdx}/certification/v4/qe/identity``
    with ``SGX-Enclave-Identity-Issuer-Chain``; PCK CRL: ``GET
    /sgx/certification/v4/pckcrl?ca=…&encoding=der`` with ``SGX-PCK-CRL-Issuer-Chain``; the
    root CA CRL from ``root_crl_url`` (Intel's certificate service, or a PCCS's
    ``/sgx/certification/v4/rootcacrl``).
    """

    def __init__(
        self,
        base_url: str = INTEL_PCS_URL,
        *,
        root_crl_url: str | None = None,
        api_key: str | None = None,
        timeout: float = _HTTP_TIMEOUT,
        client: httpx.Client | None = None,
    ) -> None:
        headers = {"Ocp-Apim-Subscription-Key": api_key} if api_key else None
        self._http = _Http(base_url, timeout=timeout, client=client, headers=headers)
        self._root_crl_url = root_crl_url or (
            INTEL_ROOT_CRL_URL
            if base_url.rstrip("/") == INTEL_PCS_URL
            else "/sgx/certification/v4/rootcacrl"
        )

    def dcap_collateral(self, request: DcapRequest) -> DcapCollateral:
        kind = "tdx" if request.tee is Tee.TDX else "sgx"
        tcb_body, tcb_headers = self._http.get(
            f"/{kind}/certification/v4/tcb", {"fmspc": request.fmspc.upper()}
        )
        qe_body, qe_headers = self._http.get(f"/{kind}/certification/v4/qe/identity")
        crl, crl_headers = self._http.get(
            "/sgx/certification/v4/pckcrl", {"ca": request.ca, "encoding": "der"}
        )
        root_crl, _ = self._http.get(self._root_crl_url)
        return DcapCollateral(
            tcb_info_body=_signed_object(tcb_body, b"tcbInfo"),
            tcb_info_signature=_signature_hex(tcb_body),
            tcb_info_issuer_chain=_chain_header(
                tcb_headers, "TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"
            ),
            qe_identity_body=_signed_object(qe_body, b"enclaveIdentity"),
            qe_identity_signature=_signature_hex(qe_body),
            qe_identity_issuer_chain=_chain_header(
                qe_headers, "SGX-Enclave-Identity-Issuer-Chain", "Enclave-Identity-Issuer-Chain"
            ),
            pck_crl=crl,
            pck_crl_issuer_chain=_optional_header(crl_headers, "SGX-PCK-CRL-Issuer-Chain"),
            root_ca_crl=root_crl,
        )

    def pck_chain(self, request: PckRequest) -> bytes:
        # Certification data type 3: encrypted PPID (RSA-3072-OAEP) ‖ CPUSVN ‖ PCESVN ‖ PCEID.
        if request.cert_type != 3 or len(request.cert_data) != 384 + 16 + 2 + 2:
            raise _missing(
                f"PCK certificate lookup for certification data type {request.cert_type}"
            )
        data = request.cert_data
        body, headers = self._http.get(
            "/sgx/certification/v4/pckcert",
            {
                "encrypted_ppid": data[:384].hex(),
                "cpusvn": data[384:400].hex(),
                "pcesvn": data[400:402].hex(),
                "pceid": data[402:404].hex(),
            },
        )
        return body.strip() + b"\n" + _chain_header(headers, "SGX-PCK-Certificate-Issuer-Chain")

    def snp_collateral(self, request: SnpRequest) -> SnpCollateral:
        del request
        raise _missing("SNP collateral from Intel PCS")

    def close(self) -> None:
        self._http.close()


def _turin_like(product: str) -> bool:
    return product == "Turin"


class KdsSource:
    """AMD's Key Distribution Service over HTTP (``httpx``).

    VCEK: ``GET /vcek/v1/{product}/{hwid}?blSPL=…&teeSPL=…&snpSPL=…&ucodeSPL=…`` (Turin also
    ``fmcSPL``, with an 8-byte hardware ID); chains: ``GET /{vcek|vlek}/v1/{product}/cert_chain``
    (ASK or ASVK, then ARK). KDS serves no VLEKs: a VLEK comes with the evidence (the extended
    report's certificate table) or from a directory.
    """

    def __init__(
        self,
        base_url: str = AMD_KDS_URL,
        *,
        product: str | None = None,
        timeout: float = _HTTP_TIMEOUT,
        client: httpx.Client | None = None,
    ) -> None:
        self._http = _Http(base_url, timeout=timeout, client=client)
        self._product = product

    def dcap_collateral(self, request: DcapRequest) -> DcapCollateral:
        del request
        raise _missing("Intel collateral from AMD KDS")

    def pck_chain(self, request: PckRequest) -> bytes:
        del request
        raise _missing("a PCK certificate from AMD KDS")

    def snp_collateral(self, request: SnpRequest) -> SnpCollateral:
        product = request.product or self._product
        if product is None:
            raise _missing("SNP collateral without a known product")
        chain, _ = self._http.get(f"/{request.signing_key}/v1/{product}/cert_chain")
        first, _, rest = chain.partition(b"-----END CERTIFICATE-----")
        signer = first + b"-----END CERTIFICATE-----\n"
        ark = rest.lstrip()
        if request.signing_key == "vlek":
            return SnpCollateral(asvk=signer, ark=ark)
        tcb = _snp.TcbVersion.from_raw(request.reported_tcb, turin=_turin_like(product))
        hwid = request.chip_id[:8] if _turin_like(product) else request.chip_id
        params = {
            "blSPL": str(tcb.bootloader),
            "teeSPL": str(tcb.tee),
            "snpSPL": str(tcb.snp),
            "ucodeSPL": str(tcb.microcode),
        }
        if _turin_like(product):
            params["fmcSPL"] = str(tcb.fmc)
        vcek, _ = self._http.get(f"/vcek/v1/{product}/{hwid.hex()}", params)
        return SnpCollateral(vcek=vcek, ask=signer, ark=ark)

    def close(self) -> None:
        self._http.close()


# --- cache ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Windowed:
    value: object
    not_before: datetime
    not_after: datetime  # exclusive


class CollateralCache:
    """Verified collateral by request, within its validity window, and verified artifacts.

    * ``get(key, now)`` returns collateral stored with ``put(key, value, not_before,
      not_after)`` only while ``not_before <= now < not_after``; outside that window the entry
      is dropped and the verifier fetches afresh. Verifiers put collateral only after it
      verified, with the intersection of its items' windows.
    * ``memo(kind, data, build)`` keeps the result of parsing and signature-checking exact
      bytes (a PCK chain, a CRL, a signed TCB Info), keyed by SHA-256 of those bytes. Such a
      result does not depend on time: every window is still checked against ``now`` on each
      verification, so a cached artifact never extends a validity window.

    Both stores are bounded (least recently used entries go first) and thread-safe.
    """

    def __init__(self, *, max_entries: int = 4096) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self._max = max_entries
        self._windowed: OrderedDict[Hashable, _Windowed] = OrderedDict()
        self._memo: OrderedDict[tuple[str, bytes], object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, now: datetime) -> object | None:
        with self._lock:
            entry = self._windowed.get(key)
            if entry is None:
                return None
            if not entry.not_before <= now < entry.not_after:
                del self._windowed[key]
                return None
            self._windowed.move_to_end(key)
            return entry.value

    def put(self, key: Hashable, value: object, not_before: datetime, not_after: datetime) -> None:
        if not not_before < not_after:
            return
        with self._lock:
            self._windowed[key] = _Windowed(value, not_before, not_after)
            self._windowed.move_to_end(key)
            while len(self._windowed) > self._max:
                self._windowed.popitem(last=False)

    def memo(self, kind: str, data: bytes, build: Callable[[], T]) -> T:
        key = (kind, hashlib.sha256(data).digest())
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                self.hits += 1
                return self._memo[key]  # type: ignore[return-value]
        value = build()  # raises on failure: failures are never cached
        with self._lock:
            self.misses += 1
            self._memo[key] = value
            while len(self._memo) > self._max:
                self._memo.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._windowed.clear()
            self._memo.clear()
