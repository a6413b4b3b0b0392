"""Worker processes of ``cloister cas serve``: ``--cpu-affinity`` pins each to its own CPU."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from tests.integration.load.agents import start_cas

from cloister.cas import server


def test_workers_get_the_allowed_cpus_in_order() -> None:
    assert server.worker_cpus(2, [0, 1]) == [0, 1]
    assert server.worker_cpus(2, [2, 5, 7]) == [2, 5]


def test_pinning_that_cannot_help_is_refused_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="cloister.cas.server"):
        assert server.worker_cpus(3, [0, 1]) is None
        assert server.worker_cpus(1, [0, 1, 2, 3]) is None
    assert "3 workers but only 2 CPU(s)" in caplog.text
    assert "a single worker is not pinned" in caplog.text


def _allowed(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def test_cpu_affinity_pins_each_worker_to_its_own_cpu(tmp_path: Path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    workers = 2
    cas = start_cas(tmp_path, "--workers", str(workers), "--cpu-affinity")
    try:
        assert cas.proc is not None
        children = _children(cas.proc.pid)
        assert len(children) == workers
        pinned = [_allowed(pid) for pid in children]
        if len(allowed) >= workers:
            assert sorted(pinned, key=min) == [{cpu} for cpu in allowed[:workers]]
        else:  # this machine cannot give each worker a CPU: none is pinned, and the log says so
            assert all(cpus == set(allowed) for cpus in pinned)
            assert "workers are not pinned" in cas.log.read_text()
        # The parent only supervises; it keeps every CPU it had.
        assert _allowed(cas.proc.pid) == set(allowed)
    finally:
        cas.stop()


def test_without_the_flag_workers_keep_every_cpu(tmp_path: Path) -> None:
    allowed = os.sched_getaffinity(0)
    cas = start_cas(tmp_path, "--workers", "2")
    try:
        assert cas.proc is not None
        assert all(_allowed(pid) == allowed for pid in _children(cas.proc.pid))
    finally:
        cas.stop()
