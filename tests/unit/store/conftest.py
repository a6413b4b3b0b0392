"""The store suite runs against both backends: SQLite, and PostgreSQL from tests/pg.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests import pg


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cas.db'}"
    return pg.shared_cluster().new_database()
