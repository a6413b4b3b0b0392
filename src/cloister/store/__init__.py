"""Encrypted, rollback-evident, crash-safe state of the CAS: SQLite by default, PostgreSQL for HA.

One ``Store`` over SQLAlchemy Core serves both backends with the same schema, created and
migrated by the Alembic revisions in ``migrations/``; the few statements every activation runs
are compiled by SQLAlchemy once and run on the driver's cursor (``_lean``). Every value is sealed
(``_seal.Keyring``) with the row's identity as associated data; names and hashes stay in clear
so that the database can index them. Writes are single transactions; SQLite runs in WAL mode
with ``synchronous=FULL`` so an acknowledged write survives a crash.

Rollback and tamper evidence (``_chain``): every change to a protected row appends an entry to
a MAC'd hash chain in the same transaction. ``open`` replays the whole chain, checks every row
against it and against the signed head kept outside the database (``HeadFile``); every read
that matters checks the row it returns against the verified chain and first follows the chain
forward (changes made by other replicas), checking that it still contains the head this
process knows. Any mismatch raises ``RollbackError`` and the store refuses every later call:
it never hands out an old or edited value.

What it does not do: decide anything. Access control, predecessors and policy live in the CAS;
the store only makes their outcome durable, atomic and evident (e.g. exactly one update wins a
race). Nonces are not chained: they are short-lived and a replayed nonce only lets a request
that is bound to an ephemeral key be answered again, sealed to that same key.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from cloister._files import write_private
from cloister.errors import BackendUnavailable, ConflictError, NotFound, RollbackError
from cloister.store import _audit, _chain, _lean
from cloister.store._chain import ChainKeys, ChainState, Entry, Head, HeadFile, tampered
from cloister.store._chain import derive as derive_key
from cloister.store._schema import (
    PROTECTED,
    audit_t,
    changes_t,
    kit_t,
    meta_t,
    metadata,
    nonces_t,
    secrets_t,
    sessions_t,
)
from cloister.store._seal import KEY_BYTES, Keyring

__all__ = [
    "KEY_BYTES",
    "AuditRecord",
    "Claim",
    "Head",
    "HeadFile",
    "Keyring",
    "SessionRecord",
    "Store",
    "derive_key",
    "load_or_create_key",
    "metadata",
    "read_kit_unverified",
    "write_key",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often one read or write starts over because another writer moved the chain meanwhile.
_MAX_ATTEMPTS = 200
# Used nonces are purged at most this often, once they expired this long ago.
_NONCE_PURGE_INTERVAL_SECONDS = 10.0
_NONCE_PURGE_MARGIN_SECONDS = 60.0
_MAX_NONCE_KEY = 128  # the nonces table's key column


@dataclass(frozen=True)
class SessionRecord:
    name: str
    version: int
    hash: str
    creator: str
    document: bytes


@dataclass(frozen=True)
class AuditRecord:
    """One audit entry: its body (JSON object), hash and signature."""

    body: dict[str, Any]
    hash: bytes
    signature: bytes


def write_key(path: Path, key: bytes) -> None:
    """Write a store key file (mode 0600) atomically, fsynced."""
    write_private(path, key)


def load_or_create_key(path: Path) -> bytes:
    """The store key in ``path``, created (mode 0600, atomically) when missing."""
    if path.exists():
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise ValueError(f"{path} does not hold a {KEY_BYTES}-byte store key")
        return key
    key = Keyring.new_key()
    write_key(path, key)
    return key


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # The driver's own transaction handling is off: we say BEGIN ourselves (below), so that a
    # read transaction is one snapshot and a write transaction takes the write lock up front.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    write = conn.get_execution_options().get("cloister_write", False)
    _lean.run(conn, "BEGIN IMMEDIATE" if write else "BEGIN")


def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 10, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if url.startswith("postgresql://"):
        url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    if not url.startswith("postgresql+psycopg://"):
        raise ValueError("the store URL must be sqlite:///PATH or postgresql://...")
    engine = sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)
    event.listen(engine, "begin", _pg_begin)
    return engine


# Every write transaction appends to the one chain: writers of all CAS replicas queue for it
# in the server (a transaction-scoped advisory lock) instead of racing for the next sequence
# number and starting over.
_PG_WRITERS_LOCK = 0x636C6F6973746572  # "cloister"


def _pg_begin(conn: Connection) -> None:
    if conn.get_execution_options().get("cloister_write", False):
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_WRITERS_LOCK})")


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision; safe when several CAS start at once."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    with engine.connect() as conn:
        conn.execution_options(cloister_write=True)
        with conn.begin():
            if engine.dialect.name == "postgresql":
                # One migrator at a time across replicas; released at commit.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7262011)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")


class _ChainMoved(Exception):
    """Another writer extended the chain first; sync and try again."""


class _Retry(Exception):
    """This read's snapshot predates a change another thread already verified."""


class _Overtaken(Exception):
    """A compare-and-set's row changed between its read and its write."""


@dataclass(frozen=True)
class _Put:
    table: str
    key: str
    digest: bytes
    statements: tuple[
        sa.Executable
        | tuple[sa.Executable, Mapping[str, Any]]
        | tuple[_lean.Statement, Mapping[str, Any]],
        ...,
    ]


class _WriterQueue:
    """Write transactions of one SQLite database wait for each other here, in the kernel.

    SQLite lets one writer in at a time; the others poll in its busy handler, which sleeps
    for growing intervals (up to 100 ms) and so leaves the lock idle while writers wait. CAS
    worker processes that share a database instead queue on an exclusive ``flock`` of a file
    beside it (and threads of one process on a mutex first: a ``flock`` is held per open
    file), and the kernel hands the lock on as soon as it is released. PostgreSQL queues
    writers itself; there this is a no-op.
    """

    def __init__(self, path: Path | None) -> None:
        self._mutex = threading.Lock()
        self._fd = None if path is None else os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    @classmethod
    def for_database(cls, engine: Engine) -> _WriterQueue:
        database = engine.url.database
        if engine.dialect.name != "sqlite" or not database or database == ":memory:":
            return cls(None)
        return cls(Path(database + "-writers.lock"))

    def __enter__(self) -> None:
        if self._fd is not None:
            self._mutex.acquire()
            fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._mutex.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class Claim:
    """A nonce to record as used together with an audit entry, and the entry to write
    instead if it was used before."""

    nonce: str
    expires_at: float
    instead: Mapping[str, Any]


@dataclass
class _Pending:
    """One audit entry waiting for its group commit."""

    event: Mapping[str, Any]
    now: float
    claim: Claim | None
    record: AuditRecord | None = None
    claimed: bool = True
    error: BaseException | None = None
    done: bool = False


def _checked_event(event_: Mapping[str, Any]) -> Mapping[str, Any]:
    if "seq" in event_ or "prev" in event_:
        raise ValueError("seq and prev are the log's own fields")
    return event_


# The statements of the hot paths, built once: building a statement costs SQLAlchemy more
# than SQLite takes to run it.
_FOLLOW_CHAIN = (
    sa.select(changes_t)
    .where(changes_t.c.seq >= sa.bindparam("from_seq"))
    .order_by(changes_t.c.seq)
)
_NEWEST_SESSION = (
    sa.select(sessions_t)
    .where(sessions_t.c.name == sa.bindparam("name"))
    .order_by(sessions_t.c.version.desc())
    .limit(1)
)
_INSERT_CHANGES = sa.insert(changes_t)
_INSERT_AUDIT = sa.insert(audit_t)


def _claim_statement(dialect: Any) -> sa.Executable:
    """Insert a used nonce unless it is there; a row comes back only if it was added."""
    stmt: sa.Executable = (
        dialect.insert(nonces_t)
        .values(nonce=sa.bindparam("nonce"), expires_at=sa.bindparam("expires_at"), used=sa.true())
        .on_conflict_do_nothing(index_elements=[nonces_t.c.nonce])
        .returning(nonces_t.c.nonce)
    )
    return stmt


_CLAIM = {"sqlite": _claim_statement(sqlite), "postgresql": _claim_statement(postgresql)}


class _Hot:
    """The statements every activation runs, compiled for one engine (see ``_lean``)."""

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        self.follow_chain = _lean.Statement.compile(_FOLLOW_CHAIN, dialect)
        self.newest_session = _lean.Statement.compile(_NEWEST_SESSION, dialect)
        self.insert_changes = _lean.Statement.compile(_INSERT_CHANGES, dialect)
        self.insert_audit = _lean.Statement.compile(_INSERT_AUDIT, dialect)
        self.claim = _lean.Statement.compile(_CLAIM[dialect.name], dialect)


@dataclass(frozen=True)
class _SessionRow:
    """A ``sessions`` row as ``_NEWEST_SESSION`` returns it (its columns, in order)."""

    name: str
    version: int
    hash: str
    creator: str
    created_at: float
    document: bytes


def _session_key(name: str, version: int) -> str:
    return json.dumps([name, version], ensure_ascii=True)


def _secret_key(session: str, name: str) -> str:
    return json.dumps([session, name], ensure_ascii=True)


def _digest_of(table: str, row: Any) -> tuple[str, bytes]:
    """The chain key and digest of a row of a protected table, as read from the database."""
    if table == "meta":
        key, fields = row.k, [row.v]
    elif table == "kit":
        key, fields = row.k, [row.v]
    elif table == "sessions":
        key = _session_key(row.name, row.version)
        fields = [row.hash, row.creator, repr(float(row.created_at)), row.document]
    elif table == "secrets":
        key, fields = _secret_key(row.session, row.name), [row.kind, row.value]
    elif table == "audit":
        key, fields = f"{row.seq}/{row.hash}", [row.body]
    else:  # pragma: no cover - PROTECTED lists the tables above
        raise ValueError(table)
    return key, _chain.row_digest(table, key, fields)


_TABLES: dict[str, sa.Table] = {
    "meta": meta_t,
    "kit": kit_t,
    "sessions": sessions_t,
    "secrets": secrets_t,
    "audit": audit_t,
}


class Store:
    """The CAS's persistent state. Thread-safe; share one per process."""

    def __init__(
        self, engine: Engine, keyring: Keyring, *, head_file: HeadFile | None = None
    ) -> None:
        self._engine = engine
        self._keys = keyring
        self._chain_keys = ChainKeys(keyring.keys)
        self._head_file = head_file
        self._state = ChainState()
        self._lock = threading.Lock()  # guards _state and the head file
        self._write_lock = threading.Lock()  # one chained writer per process
        self._queue_lock = threading.Lock()  # guards _queue: audit entries to group-commit
        self._queue: list[_Pending] = []
        self._next_purge = 0.0  # when to forget expired used nonces next (store time)
        self._pg = engine.dialect.name == "postgresql"
        self._writers = _WriterQueue.for_database(engine)
        self._hot = _Hot(engine)
        self.failure: str | None = None
        # Called with (operation, seconds) after every database transaction (metrics).
        self.observe: Callable[[str, float], None] | None = None

    @classmethod
    def open(
        cls,
        url: str,
        keyring: Keyring,
        *,
        head_file: HeadFile | Path | None = None,
        verify: bool = True,
    ) -> Store:
        """Open the database at ``url``: migrate its schema, verify its chain and every row.

        ``head_file`` is the signed head this CAS keeps outside the database; without one
        (e.g. in unit tests) only the database's internal consistency is checked.
        """
        engine = _engine(url)
        try:
            migrate(engine)
        except (OperationalError, InterfaceError) as exc:
            engine.dispose()
            raise BackendUnavailable(f"cannot open the store: {exc.orig}") from None
        if isinstance(head_file, Path):
            head_file = HeadFile(head_file)
        store = cls(engine, keyring, head_file=head_file)
        if verify:
            try:
                store.verify()
            except BaseException:
                engine.dispose()
                raise
        return store

    @classmethod
    def sqlite(cls, path: Path, keyring: Keyring, *, head_file: Path | None = None) -> Store:
        return cls.open(f"sqlite:///{path}", keyring, head_file=head_file)

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    def close(self) -> None:
        self._engine.dispose()
        self._writers.close()

    # --- transactions ------------------------------------------------------------------------

    @contextmanager
    def _tx(self, op: str, *, write: bool) -> Iterator[Connection]:
        t0 = time.perf_counter()
        try:
            with (
                self._writers if write else contextlib.nullcontext(),
                self._engine.connect() as conn,
            ):
                if write:
                    conn.execution_options(cloister_write=True)
                elif self._pg:
                    # One snapshot for the chain and the rows it vouches for.
                    conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    yield conn
        except (OperationalError, InterfaceError) as exc:
            raise BackendUnavailable(f"the store is unavailable: {exc.orig}") from None
        finally:
            if self.observe is not None:
                self.observe(op, time.perf_counter() - t0)

    def _refuse_if_failed(self) -> None:
        if self.failure is not None:
            raise RollbackError(f"the store refuses to serve: {self.failure}", reason="rollback")

    def _fail(self, exc: RollbackError) -> RollbackError:
        if self.failure is None:
            self.failure = exc.message
            log.error("%s; the CAS refuses to serve", exc.message)
        return exc

    def health(self) -> None:
        """Raise unless the store is intact and reachable (for readiness probes)."""
        self._refuse_if_failed()
        with self._tx("health", write=False) as c:
            c.execute(sa.select(sa.literal(1))).scalar_one()

    # --- the chain ---------------------------------------------------------------------------

    def verify(self) -> Head:
        """Replay the whole chain, check every protected row and the signed head; keep it."""
        try:
            return self._verify()
        except RollbackError as exc:
            raise self._fail(exc) from None

    def _verify(self) -> Head:
        state = ChainState()
        # The head file first: whatever head it names was committed before it was written, so
        # the snapshot taken after this holds it, even while other processes keep writing.
        signed = None if self._head_file is None else self._head_file.read(self._chain_keys)
        with self._tx("verify", write=False) as c:
            for row in c.execute(sa.select(changes_t).order_by(changes_t.c.seq)):
                state.apply(Entry(*row), self._chain_keys)
            seen: set[tuple[str, str]] = set()
            for table in PROTECTED:
                for row in c.execute(sa.select(_TABLES[table])):
                    key, digest = _digest_of(table, row)
                    known = state.rows.get((table, key))
                    if known is None:
                        raise tampered(f"a {table} row that no change recorded ({_show(key)})")
                    if known[1] != digest:
                        raise tampered(f"the {table} row {_show(key)} was edited or replaced")
                    seen.add((table, key))
            missing = set(state.rows) - seen
            if missing:
                table, key = sorted(missing)[0]
                raise tampered(f"{len(missing)} row(s) were deleted, e.g. {table} {_show(key)}")
        self._check_head(state, signed)
        with self._lock:
            self._state = state
            self._save_head()
        log.info("store verified: %d changes, head %s", state.head_seq, state.head_hash.hex()[:16])
        return Head(state.head_seq, state.head_hash)

    def _check_head(self, state: ChainState, head: Head | None) -> None:
        if self._head_file is None:
            return
        if head is None:
            if state.head_seq > 0:
                raise tampered(
                    f"the database holds {state.head_seq} changes but there is no state head at "
                    f"{self._head_file.path} (restore it, or recover this CAS explicitly)"
                )
            return
        if state.head_seq < head.seq:
            raise tampered(
                f"the database ends at change {state.head_seq}, but this CAS has seen change "
                f"{head.seq}: the database was restored to an older state"
            )
        if state.hash_at(head.seq) != head.hash:
            raise tampered(
                f"change {head.seq} in the database is not the one this CAS signed: "
                "the database was replaced or forked"
            )

    def _save_head(self) -> None:
        # Caller holds self._lock.
        if self._head_file is not None:
            self._head_file.write(
                Head(self._state.head_seq, self._state.head_hash), self._chain_keys
            )

    def head(self) -> Head:
        with self._lock:
            return Head(self._state.head_seq, self._state.head_hash)

    def _sync(self, c: Connection) -> int:
        """Follow the chain forward within ``c``'s snapshot; return the snapshot's head seq."""
        with self._lock:
            known_seq, known_hash = self._state.head_seq, self._state.head_hash
        found = _lean.rows(c, self._hot.follow_chain, {"from_seq": max(known_seq, 1)})
        rows = [Entry(*r) for r in found]  # the columns of ``changes``, in Entry's order
        if known_seq > 0:
            if not rows or rows[0].seq != known_seq or rows[0].hash != known_hash:
                raise tampered(
                    f"the database no longer holds change {known_seq} that this CAS has seen: "
                    "it was restored to an older state or replaced"
                )
            rows = rows[1:]
        if rows:
            with self._lock:
                for e in rows:
                    if e.seq <= self._state.head_seq:
                        if self._state.hash_at(e.seq) != e.hash:
                            raise tampered(f"change {e.seq} differs between two reads")
                        continue
                    self._state.apply(e, self._chain_keys)
                self._save_head()
            return rows[-1].seq
        return known_seq

    def _expect(self, table: str, key: str, snap: int, digest: bytes | None) -> None:
        """Check a row (its digest, or None if absent) against the verified chain."""
        with self._lock:
            known = self._state.rows.get((table, key))
        if known is None:
            if digest is not None:
                raise tampered(f"a {table} row that no change recorded ({_show(key)})")
            return
        seq, want = known
        if seq > snap:
            raise _Retry
        if digest is None:
            raise tampered(f"the {table} row {_show(key)} was deleted")
        if digest != want:
            raise tampered(f"the {table} row {_show(key)} was edited, replaced or rolled back")

    def _read(self, op: str, fn: Callable[[Connection, int], T]) -> T:
        self._refuse_if_failed()
        try:
            for _ in range(_MAX_ATTEMPTS):
                try:
                    with self._tx(op, write=False) as c:
                        snap = self._sync(c)
                        return fn(c, snap)
                except _Retry:
                    continue
        except RollbackError as exc:
            raise self._fail(exc) from None
        raise BackendUnavailable("the store changed too fast to read a consistent view")

    def _write(self, op: str, puts: Callable[[Connection], Sequence[_Put]]) -> None:
        """Apply ``puts`` and their chain entries in one transaction, as the chain's next links.

        ``puts`` is called again for every attempt (the audit log links to the newest entry),
        within the transaction, before the chain entries are written: it may execute
        statements of its own that are not chained (nonce claims). An ``IntegrityError`` of
        the rows themselves reaches the caller; the chain's own conflicts (another replica
        wrote first) are retried after following the chain.
        """
        self._refuse_if_failed()
        with self._write_lock:
            self._write_locked(op, puts)

    def _write_locked(self, op: str, puts: Callable[[Connection], Sequence[_Put]]) -> None:
        try:
            for _ in range(_MAX_ATTEMPTS):
                try:
                    with self._tx(op, write=True) as c:
                        # Follow the chain to its newest entry (other replicas' writes),
                        # then link this batch after it.
                        self._sync(c)
                        with self._lock:
                            seq, prev = self._state.head_seq, self._state.head_hash
                        batch = puts(c)
                        entries = []
                        for p in batch:
                            seq += 1
                            e = self._chain_keys.entry(seq, prev, p.table, p.key, p.digest)
                            entries.append(e)
                            prev = e.hash
                        try:
                            _lean.run_many(
                                c,
                                self._hot.insert_changes,
                                [
                                    {
                                        "seq": e.seq,
                                        "prev": e.prev,
                                        "tbl": e.table,
                                        "key": e.key,
                                        "digest": e.digest,
                                        "hash": e.hash,
                                        "mac": e.mac,
                                    }
                                    for e in entries
                                ],
                            )
                        except IntegrityError:
                            raise _ChainMoved from None
                        for p in batch:
                            for stmt in p.statements:
                                if not isinstance(stmt, tuple):
                                    c.execute(stmt)
                                elif isinstance(stmt[0], _lean.Statement):
                                    _lean.run_many(c, stmt[0], [stmt[1]])
                                else:
                                    c.execute(stmt[0], stmt[1])
                except _ChainMoved:
                    continue
                with self._lock:
                    for e in entries:
                        if e.seq > self._state.head_seq:
                            self._state.apply(e, self._chain_keys)
                    self._save_head()
                return
        except RollbackError as exc:
            raise self._fail(exc) from None
        raise BackendUnavailable("too many concurrent writers; try again")

    # --- meta: the CAS's own keys and settings -----------------------------------------------

    def get_meta(self, k: str) -> bytes | None:
        def read(c: Connection, snap: int) -> bytes | None:
            row = c.execute(sa.select(meta_t).where(meta_t.c.k == k)).first()
            self._expect("meta", k, snap, None if row is None else _digest_of("meta", row)[1])
            return None if row is None else self._keys.open(row.v, f"meta/{k}".encode())

        return self._read("get-meta", read)

    def get_or_create_meta(self, k: str, make: Callable[[], bytes]) -> bytes:
        existing = self.get_meta(k)
        if existing is not None:
            return existing
        sealed = self._keys.seal(make(), f"meta/{k}".encode())
        digest = _chain.row_digest("meta", k, [sealed])
        try:
            self._write(
                "create-meta",
                lambda _c: [_Put("meta", k, digest, (sa.insert(meta_t).values(k=k, v=sealed),))],
            )
        except IntegrityError:
            pass  # another process created it first; theirs is the value
        value = self.get_meta(k)
        assert value is not None
        return value

    # --- sessions ----------------------------------------------------------------------------

    def _aad(self, name: str, version: int) -> bytes:
        return f"sessions/{name}/{version}".encode()

    def _session_put(
        self, name: str, version: int, hash_: str, creator: str, document: bytes
    ) -> _Put:
        created_at = time.time()
        sealed = self._keys.seal(document, self._aad(name, version))
        key = _session_key(name, version)
        digest = _chain.row_digest(
            "sessions", key, [hash_, creator, repr(float(created_at)), sealed]
        )
        stmt = sa.insert(sessions_t).values(
            name=name,
            version=version,
            hash=hash_,
            creator=creator,
            created_at=created_at,
            document=sealed,
        )
        return _Put("sessions", key, digest, (stmt,))

    def create_session(self, name: str, hash_: str, creator: str, document: bytes) -> None:
        put = self._session_put(name, 1, hash_, creator, document)
        try:
            self._write("create-session", lambda _c: [put])
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
        put = self._session_put(name, version, hash_, current.creator, document)
        try:
            self._write("update-session", lambda _c: [put])
        except IntegrityError:
            # The primary key (name, version) let another update of the same predecessor win.
            raise ConflictError(
                f"session {name!r} was updated concurrently; fetch it and retry",
                reason="stale-predecessor",
            ) from None
        return version

    def current_session(self, name: str) -> SessionRecord | None:
        def read(c: Connection, snap: int) -> SessionRecord | None:
            found = _lean.rows(c, self._hot.newest_session, {"name": name})
            row = _SessionRow(*found[0]) if found else None
            with self._lock:
                newest = self._state.versions.get(name)
            if newest is not None and newest[0] > snap:
                raise _Retry
            if row is None:
                if newest is not None:
                    raise tampered(f"session {name!r} was deleted")
                return None
            if newest is None or newest[1] != row.version:
                raise tampered(
                    f"session {name!r} is at version {row.version} in the database, but the "
                    f"chain says {newest[1] if newest else 'it does not exist'}"
                )
            key, digest = _digest_of("sessions", row)
            self._expect("sessions", key, snap, digest)
            doc = self._keys.open(row.document, self._aad(row.name, row.version))
            return SessionRecord(row.name, row.version, row.hash, row.creator, doc)

        return self._read("read-session", read)

    def session_names(self) -> list[str]:
        with self._tx("session-names", write=False) as c:
            return [r[0] for r in c.execute(sa.select(sessions_t.c.name).distinct())]

    def count_sessions(self) -> int:
        with self._lock:
            return len(self._state.versions)

    # --- secrets -----------------------------------------------------------------------------

    def get_secret(self, session: str, name: str) -> tuple[str, bytes] | None:
        def read(c: Connection, snap: int) -> tuple[str, bytes] | None:
            row = c.execute(
                sa.select(secrets_t).where(secrets_t.c.session == session, secrets_t.c.name == name)
            ).first()
            key = _secret_key(session, name)
            self._expect(
                "secrets", key, snap, None if row is None else _digest_of("secrets", row)[1]
            )
            if row is None:
                return None
            aad = f"secrets/{session}/{name}/{row.kind}".encode()
            return row.kind, self._keys.open(row.value, aad)

        return self._read("get-secret", read)

    def _secret_put(
        self, session: str, name: str, kind: str, value: bytes, *, replace: bool
    ) -> _Put:
        aad = f"secrets/{session}/{name}/{kind}".encode()
        sealed = self._keys.seal(value, aad)
        key = _secret_key(session, name)
        where = (secrets_t.c.session == session, secrets_t.c.name == name)
        ins = sa.insert(secrets_t).values(session=session, name=name, kind=kind, value=sealed)
        stmts: tuple[sa.Executable, ...] = (
            (sa.delete(secrets_t).where(*where), ins) if replace else (ins,)
        )
        return _Put("secrets", key, _chain.row_digest("secrets", key, [kind, sealed]), stmts)

    def create_secret(self, session: str, name: str, kind: str, make: Callable[[], bytes]) -> bytes:
        """The value of a secret, created by ``make`` exactly once across all CAS processes."""
        existing = self.get_secret(session, name)
        if existing is not None and existing[0] == kind:
            return existing[1]
        # A changed kind (an update of the session) gets a new value; otherwise only an insert,
        # so that of several racing creators exactly one wins on the primary key.
        put = self._secret_put(session, name, kind, make(), replace=existing is not None)
        try:
            self._write("create-secret", lambda _c: [put])
        except IntegrityError:
            pass  # another process won the race; use its value
        stored = self.get_secret(session, name)
        assert stored is not None
        return stored[1]

    def replace_secret(self, session: str, name: str, kind: str, value: bytes) -> None:
        """Store a renewed value (e.g. a certificate reissued before it expires)."""
        put = self._secret_put(session, name, kind, value, replace=True)
        self._write("replace-secret", lambda _c: [put])

    def compare_and_replace_secret(
        self, session: str, name: str, kind: str, expected: bytes | None, value: bytes
    ) -> bool:
        """Store ``value`` only if the secret is still ``expected`` (``None``: absent).

        Atomic across CAS processes: the row read is pinned to its verified chain entry, and
        the write goes through only if that entry is still the newest for the row when the
        write takes the chain's next link (e.g. a volume's root tag: a stale report loses).
        Returns ``False``, changing nothing, when the value differs or changed meanwhile.
        """
        key = _secret_key(session, name)

        def read(c: Connection, snap: int) -> tuple[bytes | None, bytes | None]:
            row = c.execute(
                sa.select(secrets_t).where(secrets_t.c.session == session, secrets_t.c.name == name)
            ).first()
            digest = None if row is None else _digest_of("secrets", row)[1]
            self._expect("secrets", key, snap, digest)
            if row is None or row.kind != kind:
                return None, digest
            return self._keys.open(row.value, f"secrets/{session}/{name}/{kind}".encode()), digest

        current, seen = self._read("compare-secret", read)
        if current != expected:
            return False
        put = self._secret_put(session, name, kind, value, replace=seen is not None)

        def puts(_c: Connection) -> list[_Put]:
            with self._lock:
                known = self._state.rows.get(("secrets", key))
            if (None if known is None else known[1]) != seen:
                raise _Overtaken
            return [put]

        try:
            self._write("compare-and-replace-secret", puts)
        except (_Overtaken, IntegrityError):
            return False
        return True

    # --- the audit log -----------------------------------------------------------------------

    def append_audit(self, event_: Mapping[str, Any], *, now: float) -> AuditRecord:
        """Append one entry to the audit log (chained, signed, sealed) and return it."""
        pending = self._append(_Pending(_checked_event(event_), now, None))
        assert pending.record is not None
        return pending.record

    def append_audit_claiming(
        self, event_: Mapping[str, Any], claim: Claim, *, now: float
    ) -> tuple[AuditRecord, bool]:
        """Record a nonce's single use and an audit entry in one transaction.

        Returns the entry and whether the nonce was new. If it was used before, the entry
        written is ``claim.instead`` (the refusal), not ``event_``.
        """
        _checked_event(claim.instead)
        pending = self._append(_Pending(_checked_event(event_), now, claim))
        assert pending.record is not None
        return pending.record, pending.claimed

    def _append(self, pending: _Pending) -> _Pending:
        """Group commit: whoever takes the write lock commits every entry queued until then.

        Threads that append at once share one transaction, one fsync and one head write; each
        still returns only once its own entry is durable. The order of the log is the order
        in which entries joined the queue.
        """
        self._refuse_if_failed()
        with self._queue_lock:
            self._queue.append(pending)
        with self._write_lock:
            if not pending.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                try:
                    self._write_locked("audit", functools.partial(self._audit_puts, batch))
                except BaseException as exc:
                    for p in batch:
                        p.error = exc
                    raise
                finally:
                    for p in batch:
                        p.done = True
        if pending.error is not None:
            # Another thread's transaction failed with this entry in it.
            if isinstance(pending.error, RollbackError):
                raise RollbackError(pending.error.message, reason=pending.error.reason)
            raise BackendUnavailable(f"the audit log could not be written: {pending.error}")
        return pending

    def _audit_puts(self, batch: Sequence[_Pending], c: Connection) -> list[_Put]:
        with self._lock:
            aseq, ahash = self._state.audit_head
        now = max(p.now for p in batch)
        if now >= self._next_purge:
            # Used nonces are remembered until they expire, and a while longer for clocks
            # that differ between replicas; an expired nonce is refused before it is claimed.
            cutoff = now - _NONCE_PURGE_MARGIN_SECONDS
            c.execute(sa.delete(nonces_t).where(nonces_t.c.expires_at <= cutoff))
            self._next_purge = now + _NONCE_PURGE_INTERVAL_SECONDS
        out = []
        for p in batch:
            event_ = p.event
            p.claimed = True
            if p.claim is not None:
                p.claimed = self._claim(c, p.claim.nonce, p.claim.expires_at)
                if not p.claimed:
                    event_ = p.claim.instead
            aseq += 1
            body = {**event_, "seq": aseq, "prev": ahash.hex(), "time": p.now}
            h = _audit.entry_hash(body)
            p.record = AuditRecord(body, h, self._chain_keys.sign(h))
            payload = json.dumps({"body": body, "sig": p.record.signature.hex()}).encode()
            sealed = self._keys.seal(payload, f"audit/{aseq}".encode())
            key = f"{aseq}/{h.hex()}"
            row = (self._hot.insert_audit, {"seq": aseq, "hash": h.hex(), "body": sealed})
            out.append(_Put("audit", key, _chain.row_digest("audit", key, [sealed]), (row,)))
            ahash = h
        return out

    def audit_records(self) -> list[AuditRecord]:
        """Every audit entry in order, each checked against the chain."""

        def read(c: Connection, snap: int) -> list[AuditRecord]:
            out = []
            for row in c.execute(sa.select(audit_t).order_by(audit_t.c.seq)):
                key, digest = _digest_of("audit", row)
                self._expect("audit", key, snap, digest)
                doc = json.loads(self._keys.open(row.body, f"audit/{row.seq}".encode()))
                out.append(
                    AuditRecord(doc["body"], bytes.fromhex(row.hash), bytes.fromhex(doc["sig"]))
                )
            return out

        return self._read("audit-export", read)

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` with the CAS's state key (heads, audit trailers)."""
        return self._chain_keys.sign(message)

    def audit_public_key(self) -> bytes:
        """The raw Ed25519 public key that signs audit entries and state heads."""
        from cryptography.hazmat.primitives import serialization

        return self._chain_keys.signer.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    # --- the recovery kit (in clear: needed when the store key is lost) ----------------------

    def put_kit(self, k: str, v: bytes) -> None:
        digest = _chain.row_digest("kit", k, [v])

        def puts(_c: Connection) -> list[_Put]:
            stmts = (sa.delete(kit_t).where(kit_t.c.k == k), sa.insert(kit_t).values(k=k, v=v))
            return [_Put("kit", k, digest, stmts)]

        self._write("kit", puts)

    def get_kit(self, k: str) -> bytes | None:
        def read(c: Connection, snap: int) -> bytes | None:
            row = c.execute(sa.select(kit_t).where(kit_t.c.k == k)).first()
            self._expect("kit", k, snap, None if row is None else _digest_of("kit", row)[1])
            return None if row is None else bytes(row.v)

        return self._read("kit", read)

    # --- backup and restore (sealed rows, as they are) ---------------------------------------

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """Every protected row and the chain, from one consistent snapshot, each row verified."""

        def read(c: Connection, snap: int) -> dict[str, list[dict[str, Any]]]:
            out: dict[str, list[dict[str, Any]]] = {}
            for table in PROTECTED:
                rows = []
                for row in c.execute(sa.select(_TABLES[table])):
                    key, digest = _digest_of(table, row)
                    self._expect(table, key, snap, digest)
                    rows.append(dict(row._mapping))
                out[table] = rows
            out["changes"] = [
                dict(r._mapping)
                for r in c.execute(
                    sa.select(changes_t).where(changes_t.c.seq <= snap).order_by(changes_t.c.seq)
                )
            ]
            return out

        return self._read("backup", read)

    def is_empty(self) -> bool:
        with self._tx("is-empty", write=False) as c:
            return c.execute(sa.select(changes_t.c.seq).limit(1)).first() is None

    def load(self, dump: Mapping[str, Sequence[Mapping[str, Any]]]) -> Head:
        """Restore ``dump`` into this empty database, then verify it as at start."""
        with self._write_lock, self._tx("restore", write=True) as c:
            if c.execute(sa.select(changes_t.c.seq).limit(1)).first() is not None:
                raise ConflictError(
                    "the target database is not empty; restore onto a fresh CAS",
                    reason="restore-target-not-empty",
                )
            for table in (*PROTECTED, "changes"):
                rows = list(dump.get(table, ()))
                if rows:
                    c.execute(sa.insert(_TABLES.get(table, changes_t)), rows)
        # The restored state is adopted explicitly: the head file is replaced, not compared.
        if self._head_file is not None:
            self._head_file.path.unlink(missing_ok=True)
            saved, self._head_file = self._head_file, None
            try:
                head = self.verify()
            finally:
                self._head_file = saved
            with self._lock:
                self._save_head()
            return head
        return self.verify()

    def adopt_head(self) -> Head:
        """Verify the database's own consistency and sign its head as this CAS's new head.

        For explicit, audited owner actions only (recovery on new hardware, joining a replica):
        it trusts the database's newest state as it is now.
        """
        saved, self._head_file = self._head_file, None
        try:
            head = self.verify()
        finally:
            self._head_file = saved
        with self._lock:
            self._save_head()
        return head

    # --- nonces (not chained: see the module docstring) --------------------------------------

    def _claim(self, c: Connection, nonce: str, expires_at: float) -> bool:
        # A row comes back only if this insert added it (rowcount is not portable here).
        return bool(_lean.rows(c, self._hot.claim, {"nonce": nonce, "expires_at": expires_at}))

    def claim_nonce(self, nonce: str, expires_at: float) -> bool:
        """Record ``nonce`` as used until ``expires_at``; ``False`` if it was used before.

        The caller has checked that the nonce is genuine and unexpired (``cas.nonces``).
        """
        if len(nonce) > _MAX_NONCE_KEY:
            raise ValueError("a nonce key is at most 128 characters")
        with self._tx("nonce", write=True) as c:
            return self._claim(c, nonce, expires_at)

    def count_claimed_nonces(self) -> int:
        """Used nonces still remembered (for tests and metrics)."""
        with self._tx("nonce", write=False) as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(nonces_t)).scalar_one())


def read_kit_unverified(url: str, k: str) -> bytes | None:
    """A recovery-kit row read without the store key (which is what it helps to recover).

    Unverified by design: whatever it yields is checked once the key is back (``open``).
    """
    engine = _engine(url)
    try:
        with engine.connect() as c:
            if not sa.inspect(c).has_table("kit"):
                return None
            row = c.execute(sa.select(kit_t.c.v).where(kit_t.c.k == k)).first()
    except (OperationalError, InterfaceError) as exc:
        raise BackendUnavailable(f"cannot read the store: {exc.orig}") from None
    finally:
        engine.dispose()
    return None if row is None else bytes(row[0])


def _show(key: str) -> str:
    return key[:200]
