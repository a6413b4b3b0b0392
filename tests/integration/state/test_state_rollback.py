"""Rollback and tamper evidence with real CAS processes: the CAS refuses to serve old state.

An old copy of the SQLite file, a replayed pg_dump, or rows edited under a running CAS: the
CAS exits non-zero at start with "rollback" in its log, or turns unready and refuses requests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from tests import pg
from tests.integration.state.conftest import Owner, StateCas, assert_no_secret_in

from cloister.errors import Error


def _sql(url: str, statement: str) -> None:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1),
                              poolclass=sa.pool.NullPool)  # fmt: skip
    with engine.begin() as c:
        c.execute(sa.text(statement))
    engine.dispose()


def _http(cas: StateCas, path: str) -> httpx.Response:
    with httpx.Client(verify=False) as h:  # noqa: S501 - probes, as a kubelet makes them
        return h.get(cas.url + path)


def test_an_old_copy_of_the_sqlite_file_is_refused_at_start(
    sqlite_cas: StateCas, owner: Owner, tmp_path: Path
) -> None:
    cas = sqlite_cas
    cas.start()
    with cas.client() as c:
        owner.create(c)
        owner.activate(c)
    cas.stop()
    old = tmp_path / "old"
    old.mkdir()
    for f in cas.data_dir.glob("cas.db*"):  # the database file with its WAL, if any
        shutil.copy(f, old / f.name)
    cas.start()
    with cas.client() as c:
        owner.update(c, 1)
        owner.activate(c)
    cas.stop()
    for f in cas.data_dir.glob("cas.db*"):
        f.unlink()
    for f in old.iterdir():
        shutil.copy(f, cas.data_dir / f.name)
    code, out = cas.serve_expecting_refusal()
    assert code == 4
    assert "rollback" in out and "restored to an older state" in out


@pytest.mark.postgres
def test_a_replayed_pg_dump_is_refused_at_start(
    pg_cas: StateCas, pg_cluster: pg.PostgresCluster, owner: Owner, tmp_path: Path
) -> None:
    cas = pg_cas
    assert cas.db is not None
    dbname = cas.db.rsplit("/", 1)[1]
    cas.start()
    with cas.client() as c:
        owner.create(c)
        owner.activate(c)
    dump = pg_cluster.root / f"{dbname}.dump"
    pg_cluster.tool("pg_dump", "-Fc", "-f", str(dump), dbname)  # while the CAS serves
    with cas.client() as c:
        owner.update(c, 1)
    cas.stop()
    pg_cluster.tool("dropdb", dbname)
    pg_cluster.tool("createdb", dbname)
    pg_cluster.tool("pg_restore", "-d", dbname, str(dump))
    code, out = cas.serve_expecting_refusal()
    assert code == 4
    assert "rollback" in out and "restored to an older state" in out


def test_rows_edited_under_a_running_cas_make_it_refuse_and_unready(
    any_cas: StateCas, owner: Owner
) -> None:
    cas = any_cas
    cas.start()
    with cas.client() as c:
        owner.create(c)
        owner.update(c, 1)
        owner.activate(c)
    assert _http(cas, "/readyz").status_code == 200
    url = cas.db or f"sqlite:///{cas.data_dir / 'cas.db'}"
    _sql(url, "delete from sessions where version = 2")  # back to the first version
    with cas.client() as c, pytest.raises(Error) as refused:
        owner.activate(c)
    assert refused.value.reason == "rollback"
    assert _http(cas, "/readyz").status_code == 503
    assert _http(cas, "/healthz").status_code == 200  # alive, but it serves nothing
    assert "cloister_store_intact 0.0" in _http(cas, "/metrics").text
    cas.stop()
    code, out = cas.serve_expecting_refusal()
    assert code == 4 and "rollback" in out and "sessions" in out
    log = cas.log.read_text()
    assert "rollback or tampering detected" in log
    assert_no_secret_in([cas.log], owner.secrets)


def test_metrics_are_prometheus_text(sqlite_cas: StateCas, owner: Owner) -> None:
    cas = sqlite_cas
    cas.start()
    with cas.client() as c:
        owner.create(c)
        owner.activate(c)
        owner.activate(c)
    text = _http(cas, "/metrics").text
    assert 'cloister_activations_total{result="accepted"} 2.0' in text
    assert "cloister_sessions_total 1.0" in text
    assert 'cloister_verification_seconds_count{tee="simulation"} 2.0' in text
    assert 'cloister_store_seconds_bucket{le="0.001",operation="get-secret"}' in text
    assert "# TYPE cloister_refusals_total counter" in text
