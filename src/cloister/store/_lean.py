"""The activation path's statements, run on the driver's own cursor.

SQLAlchemy defines, migrates and runs every statement of the store. A handful of them run for
every activation: follow the chain, read the newest session, claim a nonce, append to the chain
and to the audit log. For those, SQLAlchemy's execution path (cache-key lookup, parameter
processing, result wrapping, events) costs several times what SQLite takes to run them (about
20 µs against 2.5 µs for the session read here). So they are compiled once per engine by
SQLAlchemy itself, from the same Core constructs as the rest, and run here on the DBAPI cursor
of the SQLAlchemy connection in hand, inside its transaction.

What this module keeps the same: the SQL (SQLAlchemy's, for the engine's dialect), the
transaction (the caller's), and the errors: a driver error is raised as the SQLAlchemy
exception ``Connection.execute`` would raise (``IntegrityError``, ``OperationalError``, …),
without its parameters. What it does not do: type processing. The hot statements bind and
return only ints, floats, strings and bytes, which both drivers (sqlite3, psycopg) map as
SQLAlchemy's types would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect


@dataclass(frozen=True)
class Statement:
    """One statement compiled for one dialect: its SQL and how to bind its parameters."""

    sql: str
    positions: tuple[str, ...] | None  # parameter order for positional styles (SQLite's ``?``)
    fixed: Mapping[str, Any]  # values SQLAlchemy bound itself (e.g. ``LIMIT 1``)
    required: frozenset[str]  # what the caller must give

    @classmethod
    def compile(cls, stmt: sa.Executable, dialect: Dialect) -> Statement:
        assert isinstance(stmt, sa.ClauseElement)
        compiled = stmt.compile(dialect=dialect)
        fixed = {k: v for k, v in compiled.params.items() if v is not None}
        required = frozenset(k for k, v in compiled.params.items() if v is None)
        order = getattr(compiled, "positiontup", None)  # SQLCompiler's, for positional styles
        positions = tuple(order) if order else None
        return cls(compiled.string, positions, fixed, required)

    def bind(self, params: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        missing = self.required - params.keys()
        if missing:
            raise ValueError(f"missing parameters {sorted(missing)} for {self.sql[:60]!r}")
        merged = {**self.fixed, **params}
        if self.positions is None:
            return merged
        return tuple(merged[name] for name in self.positions)


def rows(conn: Connection, stmt: Statement, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """Run ``stmt`` in ``conn``'s transaction and return every row it gives."""
    bound = stmt.bind(params)
    with _cursor(conn, stmt.sql) as cursor:
        cursor.execute(stmt.sql, bound)
        return [tuple(r) for r in cursor.fetchall()] if cursor.description else []


def run(conn: Connection, sql: str) -> None:
    """Run a statement without parameters (``BEGIN``) in ``conn``'s connection."""
    with _cursor(conn, sql) as cursor:
        cursor.execute(sql)


def run_many(conn: Connection, stmt: Statement, params: Iterable[Mapping[str, Any]]) -> None:
    """Run ``stmt`` once for each parameter set, in ``conn``'s transaction."""
    bound = [stmt.bind(p) for p in params]
    with _cursor(conn, stmt.sql) as cursor:
        cursor.executemany(stmt.sql, bound)


@contextlib.contextmanager
def _cursor(conn: Connection, sql: str) -> Any:
    dbapi = conn.dialect.loaded_dbapi
    cursor = conn.connection.cursor()
    try:
        yield cursor
    except dbapi.Error as exc:
        raise sa.exc.DBAPIError.instance(
            sql, None, exc, dbapi.Error, hide_parameters=True, dialect=conn.dialect
        ) from exc
    finally:
        cursor.close()
