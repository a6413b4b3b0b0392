"""Fixtures of the integration tests that need no subprocess."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloister.cas import server
from cloister.cas.service import Cas


@pytest.fixture
def in_process(tmp_path: Path) -> Iterator[Cas]:
    """A simulation CAS built in this process over a fresh data directory (no HTTP server)."""
    cas = server.build(server.Settings(data_dir=tmp_path / "cas", simulation=True))
    try:
        yield cas
    finally:
        cas.store.close()
