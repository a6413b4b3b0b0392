"""API fuzzing: schemathesis against the CAS's own OpenAPI document, over HTTPS.

The schema is fetched from a real ``cloister cas serve --simulation`` process (rate limits
lifted, a session in place so that some paths reach deep), and every operation in it gets
generated requests: a fixed seed (hypothesis ``derandomize``) and a bounded number of examples
per operation. Every response must be a non-5xx answer, within a bounded time, with a status
code, content type and body that the document declares (refusals carry ``ErrorBody``).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from requests.adapters import HTTPAdapter
from schemathesis import GenerationMode, checks
from tests.integration.load.agents import TunedCas, create_session, start_cas

from cloister.client import pinned_context

EXAMPLES = 25  # per operation and generation mode
CALL_TIMEOUT = 20.0  # seconds: a response slower than this is a hang


@pytest.fixture(scope="module")
def fuzz_cas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TunedCas]:
    tmp = tmp_path_factory.mktemp("fuzz")
    cas = start_cas(tmp, "--workers", "1", "--activation-rate", "0", "--session-rate", "0")
    try:
        create_session(cas, tmp)
        yield cas
    finally:
        cas.stop()


class _PinnedAdapter(HTTPAdapter):
    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


@pytest.fixture(scope="module")
def pinned_session(fuzz_cas: TunedCas) -> Iterator[requests.Session]:
    s = requests.Session()
    # Exactly the pinned CAS identity, with the same TLS 1.3 context the CLI and agent use.
    s.mount("https://", _PinnedAdapter(pinned_context(fuzz_cas.pin)))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def api_schema(fuzz_cas: TunedCas, pinned_session: requests.Session) -> Any:
    document = pinned_session.get(f"{fuzz_cas.url}/openapi.json", timeout=CALL_TIMEOUT).json()
    return schemathesis.openapi.from_dict(document)


CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # the fixed seed: the same requests on every run
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _operations(api_schema: Any) -> list[Any]:
    return [result.ok() for result in api_schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_answers_every_generated_request_as_documented(
    api_schema: Any, fuzz_cas: TunedCas, pinned_session: requests.Session, mode: GenerationMode
) -> None:
    # One hypothesis run per operation (schemathesis's own pytest loader does not work with
    # this pytest); every finding is collected, then reported together.
    findings: list[str] = []
    operations = _operations(api_schema)
    assert len(operations) >= 10
    for operation in operations:

        @FUZZ
        @given(case=operation.as_strategy(generation_mode=mode))
        def exercise(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=fuzz_cas.url, session=pinned_session, timeout=CALL_TIMEOUT, checks=CHECKS
            )

        try:
            exercise()
        except Unsatisfiable:
            # Negative mode: an operation without parameters (or with only free-form strings)
            # has no request that breaks its schema. Nothing to send, nothing found.
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as exc:
            findings.append(f"{operation.label}: {type(exc).__name__}: {str(exc)[:2000]}")
    assert not findings, "\n\n".join(findings)


def test_the_document_declares_error_bodies_for_refusals(api_schema: Any) -> None:
    raw = api_schema.raw_schema
    assert "ErrorBody" in raw["components"]["schemas"]
    activate = raw["paths"]["/v1/activate"]["post"]["responses"]
    for status in ("400", "403", "404", "409", "413", "429", "503"):
        ref = activate[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody")


def test_the_fuzzing_left_the_cas_healthy(fuzz_cas: TunedCas, tmp_path: Path) -> None:
    assert fuzz_cas.proc is not None and fuzz_cas.proc.poll() is None
    log = fuzz_cas.log.read_text(errors="replace")
    assert "Traceback" not in log and "Exception in ASGI application" not in log
