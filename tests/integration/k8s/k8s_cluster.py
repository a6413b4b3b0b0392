"""The helpers behind the ``cluster`` fixture (see conftest.py): paths, and kubectl/helm runners."""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
TESTENV = REPO / "scripts" / "k8s-testenv"
HELM = REPO / "scripts" / "helm"
CRDS = REPO / "src" / "cloister" / "k8s" / "crds"
CHART = REPO / "deploy" / "helm" / "cloister"
DATA = Path(__file__).resolve().parent / "data"

# The first k8s test may have to build kube-apiserver (about 6-10 minutes on 2 vCPUs).
BUILD_SECONDS = 1800
COMMAND_SECONDS = 120


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(message: str) -> None:
    """Fail in CI, skip elsewhere."""
    if in_ci():
        pytest.fail(f"k8s test environment unavailable in CI: {message}", pytrace=False)
    pytest.skip(f"no Kubernetes API server: {message}")


@dataclass
class Cluster:
    kubeconfig: str
    env: dict[str, str]

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["kubectl", *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=COMMAND_SECONDS,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stderr}")
        return proc

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(HELM), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=COMMAND_SECONDS,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
        return proc

    def create_namespace(self) -> str:
        name = f"t-{uuid.uuid4().hex[:10]}"
        self.kubectl("create", "namespace", name)
        return name

    def delete_namespace(self, name: str) -> None:
        self.kubectl("delete", "namespace", name, "--wait=false", check=False)
