"""Crashed writers and racing replicas: every acknowledged write survives, nothing is corrupt.

A CAS is killed with SIGKILL in the middle of a stream of session updates and activations and
restarted: it must start (its chain verifies), hold every update it acknowledged (at most the
one in flight may have landed too) and hand out the same generated secrets. On PostgreSQL the
same with one of two replicas, while the other keeps serving; and two replicas racing on one
predecessor, or on the first activation, give exactly one winner.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.integration.state.conftest import Owner, StateCas, assert_no_secret_in

from cloister.client import CasClient
from cloister.errors import ConflictError, Error


@dataclass
class Stream:
    """Updates and activations, one after another, over the given CAS processes."""

    owner: Owner
    targets: list[StateCas]
    generation: int = 0  # the newest acknowledged update
    passwords: set[str] = field(default_factory=set)
    acks: int = 0
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    progressed: threading.Condition = field(default_factory=threading.Condition)

    def run(self) -> None:
        clients: dict[int, CasClient] = {}
        try:
            self._run(clients)
        finally:
            for c in clients.values():
                c.close()

    def _run(self, clients: dict[int, CasClient]) -> None:
        i = 0
        while not self.stop.is_set():
            live = [t for t in self.targets if t.proc is not None and t.proc.poll() is None]
            if not live:
                return
            target = live[i % len(live)]
            i += 1
            try:
                c = clients.get(target.port) or clients.setdefault(target.port, target.client())
                if i % 2:
                    self.owner.update(c, self.generation + 1)
                    self.generation += 1
                else:
                    self.passwords.add(self.owner.activate(c)["APP_PASSWORD"])
            except (Error, OSError) as exc:
                # The killed CAS: unacknowledged. Re-learn where the session is and go on.
                self.errors.append(type(exc).__name__)
                dead = clients.pop(target.port, None)
                if dead is not None:
                    dead.close()
                continue
            with self.progressed:
                self.acks += 1
                self.progressed.notify_all()

    def wait_for(self, acks: int) -> None:
        with self.progressed:
            assert self.progressed.wait_for(lambda: self.acks >= acks, timeout=300)


def _check_after_restart(cas: StateCas, owner: Owner, stream: Stream) -> None:
    with cas.client() as c:
        env = owner.activate(c)
    assert owner.last is not None and owner.last.command is not None
    generation = int(owner.last.command[-1])
    # Every acknowledged update is there; at most the one in flight landed as well.
    assert stream.generation <= generation <= stream.generation + 1
    assert stream.passwords == {env["APP_PASSWORD"]}
    owner.hash = owner.last.session_hash
    with cas.client() as c:
        owner.update(c, generation + 1)  # the chain goes on from the state it found


def test_sigkill_in_a_stream_of_writes_loses_nothing_acknowledged(
    sqlite_cas: StateCas, owner: Owner
) -> None:
    cas = sqlite_cas
    cas.start()
    with cas.client() as c:
        owner.create(c)
    stream = Stream(owner, [cas])
    worker = threading.Thread(target=stream.run)
    worker.start()
    try:
        stream.wait_for(24)
        cas.stop(signal.SIGKILL)
    finally:
        stream.stop.set()
        worker.join()
    cas.start()
    _check_after_restart(cas, owner, stream)
    cas.stop()
    assert_no_secret_in([cas.log], owner.secrets)


def _race(n: int, fn: object) -> list[object]:
    out: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)  # type: ignore[operator]
        except Error as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.postgres
def test_two_replicas_on_postgresql_race_and_survive_a_sigkill(
    pg_cas: StateCas, owner: Owner, tmp_path: Path
) -> None:
    a = pg_cas
    a.start()
    b = a.replica(tmp_path, "replica")
    b.start()
    try:
        with a.client() as c:
            owner.create(c)
        created = owner.hash
        # (1) the first activation, on both replicas at once: the secrets are made once
        replicas = [a, b, a, b]

        def activate(i: int) -> dict[str, str]:
            with replicas[i].client() as c:
                return owner.activate(c)

        def update(i: int) -> object:
            with replicas[i].client() as c:
                return c.update_session("app", texts[i])

        envs = _race(4, activate)
        assert all(isinstance(e, dict) for e in envs), envs
        assert len({e["APP_PASSWORD"] for e in envs if isinstance(e, dict)}) == 1
        # (2) four updates of one predecessor over both replicas: exactly one wins
        texts = [owner.signed(owner.text(10 + i), "update") for i in range(4)]
        got = _race(4, update)
        wins = [g for g in got if not isinstance(g, Error)]
        conflicts = [g for g in got if isinstance(g, ConflictError)]
        assert len(wins) == 1 and len(conflicts) == 3, got
        assert {g.reason for g in conflicts} == {"stale-predecessor"}
        owner.hash = wins[0].hash  # type: ignore[union-attr]
        assert owner.hash != created
        # (3) a stream over both; A is killed in the middle, B keeps serving
        stream = Stream(owner, [a, b], generation=10 + got.index(wins[0]))
        worker = threading.Thread(target=stream.run)
        worker.start()
        try:
            stream.wait_for(16)
            a.stop(signal.SIGKILL)
            stream.wait_for(stream.acks + 10)  # on B alone
        finally:
            stream.stop.set()
            worker.join()
        a.start()
        _check_after_restart(a, owner, stream)
        with b.client() as c:  # B follows what A wrote after its restart
            owner.activate(c)
        assert owner.last is not None and owner.last.session_hash == owner.hash
    finally:
        a.stop()
        b.stop()
    assert_no_secret_in([a.log, b.log], owner.secrets)
