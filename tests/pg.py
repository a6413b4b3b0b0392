"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl as the postgres user.

``PostgresCluster.start()`` makes a cluster in a fresh directory on a free loopback port and
``new_database()`` hands out empty databases in it. Where PostgreSQL is not installed the tests
that need it skip and say why; with ``CI=true`` they fail instead, so that CI runs both backends.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port


def _bindir() -> Path | None:
    env = os.environ.get("CLOISTER_PG_BINDIR")
    candidates = [Path(env)] if env else []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        candidates += sorted(root.glob("*/bin"), reverse=True)
    for d in candidates:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def unavailable(reason: str) -> None:
    """Skip, saying why; on CI (CI=true) fail instead: both backends must run there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL tests cannot run on CI: {reason}")
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


@dataclass
class PostgresCluster:
    bindir: Path
    root: Path
    port: int
    user: str
    databases: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)

    def start(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                  "postgres", "--no-sync", "-E", "UTF8")  # fmt: skip
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-l",
                  str(self.root / "server.log"), "-o",
                  f"-p {self.port} -k {self.root} -h 127.0.0.1 -c fsync=on -c max_connections=200",
                  "start")  # fmt: skip

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")

    def tool(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run(str(self.bindir / name), "-h", "127.0.0.1", "-p", str(self.port),
                         "-U", "postgres", *args)  # fmt: skip

    def url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        self.tool("createdb", name)
        self.databases.append(name)
        return self.url(name)


def start_cluster() -> PostgresCluster:
    bindir = _bindir()
    if bindir is None:
        unavailable("no initdb/pg_ctl found (apt-get install postgresql, or CLOISTER_PG_BINDIR)")
    assert bindir is not None
    user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no postgres user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="cloister-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, user="postgres")
    root.chmod(0o700)
    cluster = PostgresCluster(bindir, root, free_port(), user)
    try:
        cluster.start()
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"the cluster did not start: {exc.stderr.strip()[-300:]}")
    return cluster


_shared: PostgresCluster | None = None


def shared_cluster() -> PostgresCluster:
    """One cluster for the whole test run, started on first use and stopped at exit."""
    global _shared
    if _shared is None:
        import atexit

        _shared = start_cluster()
        cluster = _shared

        def _stop() -> None:
            try:
                cluster.stop()
            finally:
                shutil.rmtree(cluster.root, ignore_errors=True)

        atexit.register(_stop)
    return _shared
