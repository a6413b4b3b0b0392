"""Encrypted, crash-safe state of the CAS: SQLite by default, PostgreSQL for availability.

One ``Store`` over SQLAlchemy Core serves both backends with the same schema. Every value is
sealed (``_seal.Keyring``) with the row's identity as associated data; names and hashes stay
in clear so that the database can index them. Writes are single transactions; SQLite runs in
WAL mode with ``synchronous=FULL`` so an acknowledged write survives a crash.

What it does not do: decide anything. Access control, predecessors and policy live in the CAS;
the store only makes their outcome durable and atomic (e.g. exactly one update wins a race).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from cloister.errors import BackendUnavailable, ConflictError, NotFound
from cloister.store._seal import KEY_BYTES, Keyring

__all__ = ["KEY_BYTES", "Keyring", "SessionRecord", "Store", "load_or_create_key"]

metadata = sa.MetaData()

meta_t = sa.Table(
    "meta",
    metadata,
    sa.Column("k", sa.String(128), primary_key=True),
    sa.Column("v", sa.LargeBinary, nullable=False),
)
sessions_t = sa.Table(
    "sessions",
    metadata,
    sa.Column("name", sa.String(512), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("creator", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("document", sa.LargeBinary, nullable=False),
)
secrets_t = sa.Table(
    "secrets",
    metadata,
    sa.Column("session", sa.String(512), primary_key=True),
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("value", sa.LargeBinary, nullable=False),
)
nonces_t = sa.Table(
    "nonces",
    metadata,
    sa.Column("nonce", sa.String(128), primary_key=True),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("used", sa.Boolean, nullable=False, default=False),
)


@dataclass(frozen=True)
class SessionRecord:
    name: str
    version: int
    hash: str
    creator: str
    document: bytes


def load_or_create_key(path: Path) -> bytes:
    """The store key in ``path``, created (mode 0600, atomically) when missing."""
    if path.exists():
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise ValueError(f"{path} does not hold a {KEY_BYTES}-byte store key")
        return key
    key = Keyring.new_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return key


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Store:
    """The CAS's persistent state. Thread-safe; share one per process."""

    def __init__(self, engine: Engine, keyring: Keyring) -> None:
        self._engine = engine
        self._keys = keyring

    @classmethod
    def open(cls, url: str, keyring: Keyring) -> Store:
        """Open (and create the schema of) the database at ``url``."""
        if url.startswith("sqlite"):
            engine = sa.create_engine(url, connect_args={"timeout": 10})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            url = url.replace("postgresql://", "postgresql+psycopg://", 1)
            engine = sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)
        try:
            metadata.create_all(engine)
        except OperationalError as exc:
            raise BackendUnavailable(f"cannot open the store: {exc.orig}") from None
        return cls(engine, keyring)

    @classmethod
    def sqlite(cls, path: Path, keyring: Keyring) -> Store:
        return cls.open(f"sqlite:///{path}", keyring)

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except OperationalError as exc:
            raise BackendUnavailable(f"the store is unavailable: {exc.orig}") from None

    # --- meta: the CAS's own keys and settings ---------------------------------------------

    def get_meta(self, k: str) -> bytes | None:
        with self._tx() as c:
            row = c.execute(sa.select(meta_t.c.v).where(meta_t.c.k == k)).first()
        return None if row is None else self._keys.open(row[0], f"meta/{k}".encode())

    def get_or_create_meta(self, k: str, make: Callable[[], bytes]) -> bytes:
        existing = self.get_meta(k)
        if existing is not None:
            return existing
        try:
            with self._tx() as c:
                c.execute(
                    sa.insert(meta_t).values(k=k, v=self._keys.seal(make(), f"meta/{k}".encode()))
                )
        except IntegrityError:
            pass  # another process created it first; theirs is the value
        value = self.get_meta(k)
        assert value is not None
        return value

    # --- sessions --------------------------------------------------------------------------

    def _aad(self, name: str, version: int) -> bytes:
        return f"sessions/{name}/{version}".encode()

    def create_session(self, name: str, hash_: str, creator: str, document: bytes) -> None:
        try:
            with self._tx() as c:
                c.execute(
                    sa.insert(sessions_t).values(
                        name=name,
                        version=1,
                        hash=hash_,
                        creator=creator,
                        created_at=time.time(),
                        document=self._keys.seal(document, self._aad(name, 1)),
                    )
                )
        except IntegrityError:
            raise ConflictError(
                f"session {name!r} exists already", reason="session-exists"
            ) from None

    def update_session(self, name: str, predecessor: str, hash_: str, document: bytes) -> int:
        """Append a version; exactly one of several racing updates of one predecessor wins."""
        current = self.current_session(name)
        if current is None:
            raise NotFound(f"session {name!r} does not exist", reason="no-such-session")
        if current.hash != predecessor:
            raise ConflictError(
                f"session {name!r} is at {current.hash}, not at predecessor {predecessor}",
                reason="stale-predecessor",
            )
        version = current.version + 1
        try:
            with self._tx() as c:
                c.execute(
                    sa.insert(sessions_t).values(
                        name=name,
                        version=version,
                        hash=hash_,
                        creator=current.creator,
                        created_at=time.time(),
                        document=self._keys.seal(document, self._aad(name, version)),
                    )
                )
        except IntegrityError:
            # The primary key (name, version) let another update of the same predecessor win.
            raise ConflictError(
                f"session {name!r} was updated concurrently; fetch it and retry",
                reason="stale-predecessor",
            ) from None
        return version

    def current_session(self, name: str) -> SessionRecord | None:
        with self._tx() as c:
            row = c.execute(
                sa.select(sessions_t)
                .where(sessions_t.c.name == name)
                .order_by(sessions_t.c.version.desc())
                .limit(1)
            ).first()
        if row is None:
            return None
        doc = self._keys.open(row.document, self._aad(row.name, row.version))
        return SessionRecord(row.name, row.version, row.hash, row.creator, doc)

    def session_names(self) -> list[str]:
        with self._tx() as c:
            return [r[0] for r in c.execute(sa.select(sessions_t.c.name).distinct())]

    # --- secrets ---------------------------------------------------------------------------

    def get_secret(self, session: str, name: str) -> tuple[str, bytes] | None:
        with self._tx() as c:
            row = c.execute(
                sa.select(secrets_t.c.kind, secrets_t.c.value).where(
                    secrets_t.c.session == session, secrets_t.c.name == name
                )
            ).first()
        if row is None:
            return None
        return row.kind, self._keys.open(row.value, f"secrets/{session}/{name}/{row.kind}".encode())

    def create_secret(self, session: str, name: str, kind: str, make: Callable[[], bytes]) -> bytes:
        """The value of a secret, created by ``make`` exactly once across all CAS processes."""
        existing = self.get_secret(session, name)
        if existing is not None and existing[0] == kind:
            return existing[1]
        aad = f"secrets/{session}/{name}/{kind}".encode()
        value = make()
        try:
            with self._tx() as c:
                if existing is not None:  # the kind changed in an update: a new value
                    c.execute(
                        sa.delete(secrets_t).where(
                            secrets_t.c.session == session, secrets_t.c.name == name
                        )
                    )
                c.execute(
                    sa.insert(secrets_t).values(
                        session=session, name=name, kind=kind, value=self._keys.seal(value, aad)
                    )
                )
        except IntegrityError:
            pass  # another process won the race; use its value
        stored = self.get_secret(session, name)
        assert stored is not None
        return stored[1]

    def replace_secret(self, session: str, name: str, kind: str, value: bytes) -> None:
        """Store a renewed value (e.g. a certificate reissued before it expires)."""
        aad = f"secrets/{session}/{name}/{kind}".encode()
        with self._tx() as c:
            c.execute(
                sa.update(secrets_t)
                .where(secrets_t.c.session == session, secrets_t.c.name == name)
                .values(kind=kind, value=self._keys.seal(value, aad))
            )

    # --- nonces ----------------------------------------------------------------------------

    def add_nonce(self, nonce: str, expires_at: float) -> None:
        with self._tx() as c:
            c.execute(sa.insert(nonces_t).values(nonce=nonce, expires_at=expires_at, used=False))

    def consume_nonce(self, nonce: str, now: float) -> bool:
        """Mark ``nonce`` used; ``False`` if unknown, expired or used before (single use)."""
        with self._tx() as c:
            res = c.execute(
                sa.update(nonces_t)
                .where(
                    nonces_t.c.nonce == nonce,
                    nonces_t.c.used.is_(False),
                    nonces_t.c.expires_at > now,
                )
                .values(used=True)
            )
            return res.rowcount == 1

    def purge_nonces(self, now: float) -> int:
        with self._tx() as c:
            return c.execute(sa.delete(nonces_t).where(nonces_t.c.expires_at <= now)).rowcount

    def count_live_nonces(self, now: float) -> int:
        with self._tx() as c:
            return int(
                c.execute(
                    sa.select(sa.func.count())
                    .select_from(nonces_t)
                    .where(nonces_t.c.expires_at > now)
                ).scalar_one()
            )
