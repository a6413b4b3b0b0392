"""State throughput: session updates and activations per second, per backend and replica count.

Real CAS processes (``cloister cas serve --simulation --workers 1``, rate limits lifted) over
HTTPS; every write extends the store's hash chain and the signed head, every read is checked
against it. Configurations: SQLite (one CAS), PostgreSQL with one CAS, and PostgreSQL with two
CAS replicas sharing the database (the clients alternate between them). PostgreSQL is a
throwaway cluster (initdb/pg_ctl as the ``postgres`` user on a free loopback port).

Updates: each client thread owns one session and updates it in a loop (each update names the
previous hash). Activations: each client thread activates its session's service (nonce,
simulated evidence, activation, unsealing), so every activation reads the session, its secrets
and writes an audit entry. Clients are threads in this process; on a small machine they share
the cores with the CAS, so the numbers are a floor.

A second table times the store alone, in-process (no HTTP, no crypto of the activation), for
the same backends: ``update_session`` and a verified ``current_session`` read.

Usage: ``python benchmarks/store.py [--seconds 6] [--clients 4] [--backends sqlite,postgres]``.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port, wait_port  # noqa: E402

from cloister import protocol  # noqa: E402
from cloister.agent import activation  # noqa: E402
from cloister.agent.evidence import SimulatedProvider  # noqa: E402
from cloister.attestation import simulated  # noqa: E402
from cloister.client import CasClient  # noqa: E402
from cloister.session import Session, public_key_of, signatures  # noqa: E402
from cloister.store import Keyring, Store  # noqa: E402

MEASUREMENT = bytes(range(32))


def session_text(name: str, generation: int, predecessor: str | None) -> str:
    pred = f"predecessor: {predecessor}\n" if predecessor else ""
    return f"""name: {name}
version: "0.3"
security: {{attestation: {{tolerate: [simulation]}}}}
services:
  - name: app
    command: ["/bin/app", "{generation}"]
    environment: {{APP_PASSWORD: $$SCONE::password$$}}
    attestation: [{{tee: simulation, measurement: {MEASUREMENT.hex()}}}]
secrets:
  - {{name: password, kind: ascii, size: 24}}
{pred}"""


def signed(key: ed25519.Ed25519PrivateKey, text: str, op: str) -> protocol.SignedSession:
    digest = Session.from_yaml(text).hash
    sig = signatures.sign(key, op, digest)
    return protocol.SignedSession(
        session=text,
        signatures=[protocol.SessionSignature(public_key=public_key_of(key), signature=sig)],
    )


class Cas:
    def __init__(self, data_dir: Path, db: str | None) -> None:
        self.data_dir, self.db, self.port = data_dir, db, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "cloister", "cas", "serve", "--simulation", "--data-dir",
               str(self.data_dir), "--listen", f"127.0.0.1:{self.port}", "--workers", "1",
               "--session-rate", "1000000", "--session-burst", "1000000",
               "--activation-rate", "1000000", "--activation-burst", "1000000"]  # fmt: skip
        if self.db:
            cmd += ["--db", self.db]
        log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        wait_port(self.port, self.proc, 120)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    def client(self) -> CasClient:
        cert = ssl.get_server_certificate(("127.0.0.1", self.port)).encode()
        return CasClient(f"https://127.0.0.1:{self.port}", cert_pem=cert)


def run_for(seconds: float, clients: int, op: Callable[[int], None]) -> tuple[float, int]:
    """Run ``op(thread)`` in ``clients`` threads for ``seconds``; (ops per second, errors)."""
    done, errors = [0] * clients, [0] * clients
    stop = threading.Event()

    def loop(i: int) -> None:
        while not stop.is_set():
            try:
                op(i)
                done[i] += 1
            except Exception:
                errors[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0), sum(errors)


def bench_cas(cas_list: list[Cas], seconds: float, clients: int) -> tuple[float, int, float, int]:
    key = ed25519.Ed25519PrivateKey.generate()
    conns = [cas_list[i % len(cas_list)].client() for i in range(clients)]
    hashes: list[str] = []
    generation = [0] * clients
    for i, c in enumerate(conns):
        hashes.append(c.create_session(signed(key, session_text(f"s{i}", 0, None), "create")).hash)

    def update(i: int) -> None:
        generation[i] += 1
        text = session_text(f"s{i}", generation[i], hashes[i])
        hashes[i] = conns[i].update_session(f"s{i}", signed(key, text, "update")).hash

    provider = SimulatedProvider(simulated.SimulatedPlatform.generate(), MEASUREMENT)

    def activate(i: int) -> None:
        activation.activate_once(conns[i], provider, f"s{i}", "app")

    upd = run_for(seconds, clients, update)
    act = run_for(seconds, clients, activate)
    for c in conns:
        c.close()
    return upd[0], upd[1], act[0], act[1]


def bench_store(url: str, seconds: float) -> tuple[float, float]:
    store = Store.open(url, Keyring.of([Keyring.new_key()]))
    store.create_session("s", "0" * 64, "owner", b"doc")
    state = {"v": 0}

    def update(_: int) -> None:
        prev = f"{state['v']:064x}"
        state["v"] += 1
        store.update_session("s", prev, f"{state['v']:064x}", b"doc")

    def read(_: int) -> None:
        store.current_session("s")

    ups = run_for(seconds, 1, update)[0]
    reads = run_for(seconds, 1, read)[0]
    store.close()
    return ups, reads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--backends", default="sqlite,postgres")
    args = ap.parse_args()
    backends = args.backends.split(",")
    root = Path(tempfile.mkdtemp(prefix="cloister-bench-store-"))
    cluster = None
    if "postgres" in backends:
        from tests import pg

        try:
            cluster = pg.start_cluster()
        except BaseException as exc:  # pytest's skip is a BaseException
            print(f"PostgreSQL not available: {exc}", file=sys.stderr)
            backends.remove("postgres")
    rows: list[tuple[str, int, float, int, float, int]] = []
    store_rows: list[tuple[str, float, float]] = []
    configs: list[tuple[str, str | None, int]] = []
    if "sqlite" in backends:
        configs.append(("SQLite", None, 1))
    if cluster is not None:
        configs += [("PostgreSQL", "pg", 1), ("PostgreSQL", "pg", 2)]
    try:
        for n, (label, db, replicas) in enumerate(configs):
            url = cluster.new_database() if db and cluster else None
            first = Cas(root / f"cas{n}", url)
            first.start()
            cas_list = [first]
            if replicas == 2:
                other = Cas(root / f"cas{n}b", url)
                other.data_dir.mkdir(mode=0o700)
                for f in ("store.key", "state-head", "simulation-platform.key"):
                    shutil.copy(first.data_dir / f, other.data_dir / f)
                other.start()
                cas_list.append(other)
            try:
                result = bench_cas(cas_list, args.seconds, args.clients)
                rows.append((label, replicas, *result))
            finally:
                for c in cas_list:
                    c.stop()
        if "sqlite" in backends:
            store_rows.append(
                ("SQLite", *bench_store(f"sqlite:///{root / 'store.db'}", args.seconds))
            )
        if cluster is not None:
            store_rows.append(("PostgreSQL", *bench_store(cluster.new_database(), args.seconds)))
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nCAS over HTTPS, {args.clients} client threads, {args.seconds:.0f} s per cell")
    print(f"{'backend':<12}{'replicas':>9}{'updates/s':>12}{'errors':>8}"
          f"{'activations/s':>15}{'errors':>8}")  # fmt: skip
    for label, replicas, ups, uerr, acts, aerr in rows:
        print(f"{label:<12}{replicas:>9}{ups:>12.1f}{uerr:>8}{acts:>15.1f}{aerr:>8}")
    print("\nStore alone, in-process, one thread")
    print(f"{'backend':<12}{'update_session/s':>18}{'verified reads/s':>18}")
    for label, ups, reads in store_rows:
        print(f"{label:<12}{ups:>18.1f}{reads:>18.1f}")


if __name__ == "__main__":
    main()
