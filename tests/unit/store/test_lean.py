"""The activation path's statements on the driver's cursor (``store._lean``), on both backends:
the same rows as SQLAlchemy's own execution, the caller's transaction, SQLAlchemy's errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from cloister.store import _lean, _schema, migrate

_SELECT = (
    sa.select(_schema.sessions_t)
    .where(_schema.sessions_t.c.name == sa.bindparam("name"))
    .order_by(_schema.sessions_t.c.version.desc())
    .limit(1)
)
_INSERT = sa.insert(_schema.sessions_t)


def _row(version: int) -> dict[str, object]:
    return {
        "name": "app",
        "version": version,
        "hash": f"{version:064x}",
        "creator": "owner",
        "created_at": 1700000000.5,
        "document": b"\x00binary\xff" * version,
    }


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    url = db_url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sa.create_engine(url)
    migrate(engine)
    yield engine
    engine.dispose()


def test_the_rows_are_those_sqlalchemy_returns(engine: sa.Engine) -> None:
    insert = _lean.Statement.compile(_INSERT, engine.dialect)
    select = _lean.Statement.compile(_SELECT, engine.dialect)
    with engine.begin() as c:
        _lean.run_many(c, insert, [_row(1), _row(2)])
    with engine.begin() as c:
        lean = _lean.rows(c, select, {"name": "app"})
        core = c.execute(_SELECT, {"name": "app"}).all()
        assert lean == [tuple(r) for r in core]
        assert lean[0][1] == 2 and lean[0][5] == _row(2)["document"]  # LIMIT 1, newest first
        assert isinstance(lean[0][5], bytes)
        assert _lean.rows(c, select, {"name": "nobody"}) == []


def test_the_statements_run_in_the_callers_transaction(engine: sa.Engine) -> None:
    insert = _lean.Statement.compile(_INSERT, engine.dialect)
    with pytest.raises(RuntimeError), engine.begin() as c:
        _lean.run_many(c, insert, [_row(1)])
        raise RuntimeError("roll back")
    with engine.begin() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(_schema.sessions_t)).scalar() == 0


def test_a_driver_error_is_sqlalchemys_without_its_parameters(engine: sa.Engine) -> None:
    insert = _lean.Statement.compile(_INSERT, engine.dialect)
    with engine.begin() as c:
        _lean.run_many(c, insert, [_row(1)])
    secret_looking = dict(_row(1), document=b"do-not-show-me")
    with pytest.raises(sa.exc.IntegrityError) as duplicate, engine.begin() as c:
        _lean.run_many(c, insert, [secret_looking])
    assert "do-not-show-me" not in str(duplicate.value)


def test_a_missing_parameter_is_misuse_not_null(engine: sa.Engine) -> None:
    insert = _lean.Statement.compile(_INSERT, engine.dialect)
    incomplete = {k: v for k, v in _row(1).items() if k != "document"}
    with pytest.raises(ValueError, match="document"):
        insert.bind(incomplete)
    select = _lean.Statement.compile(_SELECT, engine.dialect)
    with pytest.raises(ValueError, match="name"):
        select.bind({})
