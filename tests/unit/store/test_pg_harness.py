"""Without PostgreSQL the backend's tests skip and say why; on CI they fail instead."""

from __future__ import annotations

import pytest
from tests import pg


def test_without_postgresql_tests_skip_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL tests skipped: no initdb"):
        pg.unavailable("no initdb")


def test_on_ci_they_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="cannot run on CI: no initdb"):
        pg.unavailable("no initdb")


def test_a_missing_server_binary_directory_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(pg, "_bindir", lambda: None)
    with pytest.raises(pytest.skip.Exception, match="apt-get install postgresql"):
        pg.start_cluster()
