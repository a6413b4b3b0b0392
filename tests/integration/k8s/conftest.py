"""A real Kubernetes API server for the tests marked ``k8s``.

``cluster`` uses ``$KUBECONFIG`` when it is set (point it at a throwaway cluster: the tests
install CRDs and create namespaces). Otherwise it builds, when needed, and starts
``scripts/k8s-testenv``: etcd, kube-apiserver and kube-controller-manager on loopback, with
their state in a temporary directory, stopped at the end of the session.

In CI (``CI=true``) a cluster that cannot be had is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from k8s_cluster import BUILD_SECONDS, CRDS, TESTENV, Cluster, unavailable


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The session's first k8s test carries the build; give k8s tests room for it.
    for item in items:
        if item.get_closest_marker("k8s") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(BUILD_SECONDS + 300))


def _run(cmd: list[str], env: dict[str, str], timeout: int, log: Path) -> str | None:
    """None on success, else what went wrong (with the tail of the log)."""
    try:
        with log.open("a") as out:
            proc = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout
            )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(cmd)}: {exc}"
    if proc.returncode == 0:
        return None
    tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
    return f"{' '.join(cmd)} exited with {proc.returncode}; log {log}:\n{tail}"


def _start_testenv(run_dir: Path) -> tuple[dict[str, str], str | None]:
    env = dict(os.environ)
    env["K8S_LOCAL_DIR"] = str(run_dir)
    env["K8S_LOCAL_WATCH_PID"] = str(os.getpid())
    log = run_dir.parent / "testenv.log"
    error = _run([str(TESTENV), "build"], env, BUILD_SECONDS, log)
    if error is None:
        error = _run([str(TESTENV), "start"], env, 300, log)
    env["KUBECONFIG"] = str(run_dir / "kubeconfig")
    return env, error


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if shutil.which("kubectl") is None:
        unavailable("kubectl is not on PATH (Debian: apt-get install kubernetes-client)")
    given = os.environ.get("KUBECONFIG")
    if given:
        c = Cluster(kubeconfig=given, env=dict(os.environ))
        probe = c.kubectl("get", "--raw", "/readyz", check=False)
        if probe.returncode != 0:
            unavailable(f"KUBECONFIG={given} does not answer: {probe.stderr.strip()}")
        yield c
        return
    run_dir = tmp_path_factory.mktemp("k8s-testenv") / "run"
    env, error = _start_testenv(run_dir)
    try:
        if error is not None:
            unavailable(error)
        yield Cluster(kubeconfig=env["KUBECONFIG"], env=env)
    finally:
        subprocess.run([str(TESTENV), "stop"], env=env, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Cluster:
    """The cluster, with Cloister's CRDs installed and established."""
    cluster.kubectl("apply", "-f", str(CRDS))
    cluster.kubectl(
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        "crd/cloistersessions.cloister.io",
        "crd/cloistercas.cloister.io",
    )
    return cluster


@pytest.fixture
def namespace(crds: Cluster) -> Iterator[str]:
    name = crds.create_namespace()
    yield name
    crds.delete_namespace(name)
