"""The CAS's key hierarchy on disk, M-of-N recovery of the store key, backup and restore.

Key hierarchy::

    store key (32 bytes, AES-256)  sealed to the CAS's TEE; in simulation the file store.key
      ├─ seals every value in the database (store._seal)
      ├─ derives the chain MAC key and the state signing key (store._chain.derive)
      ├─ derives the backup key
      └─ split M-of-N (Shamir over GF(256)); share i sealed (HPKE, X25519) to recovery key i

Recovery never puts the store key in one holder's hands: the recovering CAS makes an ephemeral
X25519 key pair and a *request* (the kit plus the ephemeral public key); each holder opens only
their own share and re-seals it to the ephemeral key (``reshare``); the CAS combines M shares,
checks the result against the key identifier in the kit and against the database's MACs.

What it does not do: sealing to a hardware TEE (the simulation key file stands in for it).
"""

from __future__ import annotations

import atexit
import base64
import binascii
import gzip
import hashlib
import json
import logging
import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloister.errors import AccessDenied, ConflictError, Error, StoreError
from cloister.store import (
    Head,
    HeadFile,
    Keyring,
    Store,
    load_or_create_key,
    read_kit_unverified,
    write_key,
)
from cloister.store import derive_key as derive
from cloister.store import shamir as _shamir

log = logging.getLogger(__name__)

KEY_FILE = "store.key"
HEAD_FILE = "state-head"
KIT_FILE = "recovery-kit.json"
EPHEMERAL_FILE = "recovery-ephemeral.key"
DB_FILE = "cas.db"

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_KIT = "cloister-recovery-kit-v1"
_REQUEST = "cloister-recovery-request-v1"
_SHARE = "cloister-recovery-share-v1"
_BACKUP = b"cloister-backup-v1\n"
# Bounds on files handed to these functions (untrusted input).
MAX_DOC_BYTES = 1024 * 1024
MAX_BACKUP_BYTES = 4 * 1024 * 1024 * 1024
MAX_SHARES = 255


def key_id(store_key: bytes) -> str:
    return hashlib.sha256(b"cloister-store-key-id\x00" + store_key).hexdigest()


def db_url(data_dir: Path, url: str | None) -> str:
    return url or f"sqlite:///{data_dir / DB_FILE}"


def open_store(
    data_dir: Path,
    url: str | None,
    *,
    create_key: bool = False,
    head_writable: bool = True,
) -> Store:
    """The store of the CAS in ``data_dir``: its key (simulation: a file), verified at open."""
    path = data_dir / KEY_FILE
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        if not create_key or not _database_is_empty(db_url(data_dir, url)):
            raise StoreError(
                f"no store key at {path} for a database that holds state; recover it with "
                "`cloister cas recover` (or provision this replica with the key and head)",
                reason="no-store-key",
            )
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyring = Keyring.of([load_or_create_key(path)])
    return Store.open(
        db_url(data_dir, url),
        keyring,
        head_file=HeadFile(data_dir / HEAD_FILE, writable=head_writable),
    )


def _database_is_empty(url: str) -> bool:
    probe = Store.open(url, Keyring.of([Keyring.new_key()]), verify=False)
    try:
        return probe.is_empty()
    finally:
        probe.close()


# --- recovery keys --------------------------------------------------------------------------


def format_public(key: x25519.X25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "x25519:" + base64.b64encode(raw).decode()


def parse_public(text: str) -> x25519.X25519PublicKey:
    prefix, _, b64 = text.strip().partition(":")
    if prefix != "x25519":
        raise ValueError("a recovery public key looks like x25519:BASE64")
    try:
        return x25519.X25519PublicKey.from_public_bytes(base64.b64decode(b64, validate=True))
    except (ValueError, binascii.Error):
        raise ValueError("a recovery public key looks like x25519:BASE64") from None


def new_recovery_key(path: Path) -> str:
    """Write a new recovery private key (PEM, mode 0600) to ``path``; return its public key."""
    key = x25519.X25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as f:
        f.write(pem)
    return format_public(key.public_key())


def load_private(path: Path) -> x25519.X25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, MAX_DOC_BYTES), password=None)
    except ValueError:
        raise ValueError(f"{path} is not a PEM private key") from None
    if not isinstance(key, x25519.X25519PrivateKey):
        raise ValueError(f"{path} is not an X25519 recovery key")
    return key


def _read(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data


def _doc(raw: bytes, fmt: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ValueError(f"not a {fmt} document") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ValueError(f"not a {fmt} document")
    return doc


# --- the kit --------------------------------------------------------------------------------


def make_kit(store_key: bytes, recipients: Sequence[str], threshold: int) -> dict[str, Any]:
    """Split the store key M-of-N and seal share i to recovery public key i."""
    keys = [parse_public(r) for r in recipients]
    if len({format_public(k) for k in keys}) != len(keys):
        raise ValueError("each recovery key may be given once")
    if not 1 <= threshold <= len(keys) <= MAX_SHARES:
        raise ValueError("need 1 <= --recovery-threshold <= number of --recovery-key")
    kid = key_id(store_key)
    shares = []
    for (x, y), pub in zip(_shamir.split(store_key, threshold, len(keys)), keys, strict=True):
        info = f"{_KIT}/{kid}/{x}".encode()
        sealed = SUITE.encrypt(bytes([x]) + y, pub, info=info)
        shares.append(
            {"recipient": format_public(pub), "x": x, "sealed": base64.b64encode(sealed).decode()}
        )
    return {"format": _KIT, "threshold": threshold, "key_id": kid, "shares": shares}


def kit_of(data_dir: Path, url: str | None) -> dict[str, Any]:
    """The recovery kit of a CAS, from its database (or the copy in its data directory)."""
    raw = read_kit_unverified(db_url(data_dir, url), "recovery")
    if raw is None and (data_dir / KIT_FILE).exists():
        raw = _read(data_dir / KIT_FILE, MAX_DOC_BYTES)
    if raw is None:
        raise StoreError(
            "this CAS has no recovery kit (it was not initialised with recovery keys)",
            reason="no-recovery-kit",
        )
    return _doc(raw, _KIT)


def request(kit: dict[str, Any], ephemeral_path: Path) -> dict[str, Any]:
    """A recovery request: the kit and a fresh ephemeral public key (private key kept)."""
    eph = x25519.X25519PrivateKey.generate()
    pem = eph.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ephemeral_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(ephemeral_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as f:
        f.write(pem)
    return {"format": _REQUEST, "kit": kit, "ephemeral": format_public(eph.public_key())}


def reshare(request_raw: bytes, holder: x25519.X25519PrivateKey) -> dict[str, Any]:
    """A holder's share, opened with their key and sealed again to the requester's key."""
    req = _doc(request_raw, _REQUEST)
    kit = req.get("kit")
    if not isinstance(kit, dict) or kit.get("format") != _KIT:
        raise ValueError("the request carries no recovery kit")
    me = format_public(holder.public_key())
    mine = [s for s in kit.get("shares", []) if isinstance(s, dict) and s.get("recipient") == me]
    if not mine:
        raise AccessDenied("this recovery key holds no share in the request", reason="no-share")
    share, kid = mine[0], str(kit.get("key_id"))
    x = int(share["x"])
    try:
        opened = SUITE.decrypt(
            base64.b64decode(share["sealed"]), holder, info=f"{_KIT}/{kid}/{x}".encode()
        )
    except (InvalidTag, ValueError, binascii.Error):
        raise AccessDenied("the share does not open with this key", reason="bad-share") from None
    if opened[:1] != bytes([x]):
        raise AccessDenied("the share is not the one it claims to be", reason="bad-share")
    eph = parse_public(str(req.get("ephemeral")))
    info = f"{_SHARE}/{kid}/{req['ephemeral']}".encode()
    return {
        "format": _SHARE,
        "key_id": kid,
        "ephemeral": req["ephemeral"],
        "x": x,
        "sealed": base64.b64encode(SUITE.encrypt(opened, eph, info=info)).decode(),
    }


def combine(
    kit: dict[str, Any], share_docs: Sequence[bytes], ephemeral_path: Path
) -> tuple[bytes, list[int]]:
    """The store key from ``threshold`` re-sealed shares; checked against the kit's key id."""
    eph = load_private(ephemeral_path)
    eph_pub = format_public(eph.public_key())
    kid = str(kit["key_id"])
    shares: dict[int, bytes] = {}
    for raw in share_docs[:MAX_SHARES]:
        doc = _doc(raw, _SHARE)
        if doc.get("key_id") != kid or doc.get("ephemeral") != eph_pub:
            raise AccessDenied(
                "a share was made for another key or another recovery request",
                reason="bad-share",
            )
        try:
            opened = SUITE.decrypt(
                base64.b64decode(doc["sealed"]), eph, info=f"{_SHARE}/{kid}/{eph_pub}".encode()
            )
        except (InvalidTag, ValueError, binascii.Error, KeyError):
            raise AccessDenied("a share does not open", reason="bad-share") from None
        shares[opened[0]] = opened[1:]
    threshold = int(kit["threshold"])
    if len(shares) < threshold:
        raise AccessDenied(
            f"{len(shares)} distinct share(s) given, {threshold} needed", reason="too-few-shares"
        )
    store_key = _shamir.combine(sorted(shares.items())[:threshold])
    if key_id(store_key) != kid:
        raise AccessDenied(
            "the shares do not combine to the store key (a share is wrong)", reason="bad-share"
        )
    return store_key, sorted(shares)


# --- init and recover -----------------------------------------------------------------------


def init(
    data_dir: Path, url: str | None, recipients: Sequence[str], threshold: int
) -> tuple[Store, dict[str, Any]]:
    """Create the store key, the database and the recovery kit of a new CAS."""
    if (data_dir / KEY_FILE).exists():
        store = open_store(data_dir, url)
        if store.get_kit("recovery") is not None:
            store.close()
            raise ConflictError("this CAS is initialised already", reason="initialised")
    else:
        store = open_store(data_dir, url, create_key=True)
    store_key = (data_dir / KEY_FILE).read_bytes()
    kit = make_kit(store_key, recipients, threshold)
    raw = json.dumps(kit, sort_keys=True).encode()
    store.put_kit("recovery", raw)
    (data_dir / KIT_FILE).write_bytes(raw)
    return store, kit


def install_key(data_dir: Path, store_key: bytes) -> None:
    if (data_dir / KEY_FILE).exists():
        raise ConflictError(
            f"{data_dir / KEY_FILE} exists; recovery installs a key only where none is",
            reason="key-exists",
        )
    write_key(data_dir / KEY_FILE, store_key)


def recover(data_dir: Path, url: str | None, share_docs: Sequence[bytes]) -> tuple[Store, Head]:
    """Combine the shares, install the store key, verify the database and adopt its head.

    The database's state is trusted as it is now (its MACs prove it was written by this CAS;
    only the signed head, which is lost with the old hardware, could prove it is the newest).
    """
    kit = kit_of(data_dir, url)
    store_key, xs = combine(kit, share_docs, data_dir / EPHEMERAL_FILE)
    install_key(data_dir, store_key)
    store = Store.open(
        db_url(data_dir, url),
        Keyring.of([store_key]),
        head_file=HeadFile(data_dir / HEAD_FILE),
        verify=False,
    )
    (data_dir / HEAD_FILE).unlink(missing_ok=True)
    head = store.adopt_head()
    (data_dir / EPHEMERAL_FILE).unlink(missing_ok=True)
    log.warning("store key recovered from shares %s; adopted head %d", xs, head.seq)
    return store, head


# --- backup and restore ---------------------------------------------------------------------


def _b(v: Any) -> Any:
    return {"b64": base64.b64encode(v).decode()} if isinstance(v, bytes | memoryview) else v


def _unb(v: Any) -> Any:
    return base64.b64decode(v["b64"]) if isinstance(v, dict) and "b64" in v else v


def backup(store: Store, store_key: bytes, out: Path, *, now: float) -> Head:
    """Write an encrypted, consistent backup of ``store`` to ``out``; return its head."""
    dump = store.dump()
    changes = dump["changes"]
    head = Head(len(changes), bytes(changes[-1]["hash"]) if changes else bytes(32))
    kit_rows = [r for r in dump["kit"] if r["k"] == "recovery"]
    header = {
        "key_id": key_id(store_key),
        "head": {"seq": head.seq, "hash": head.hash.hex()},
        "created_at": now,
        "kit": json.loads(bytes(kit_rows[0]["v"])) if kit_rows else None,
    }
    header_raw = json.dumps(header, sort_keys=True).encode()
    body = gzip.compress(
        json.dumps(
            {t: [{k: _b(v) for k, v in r.items()} for r in rows] for t, rows in dump.items()}
        ).encode()
    )
    nonce = os.urandom(12)
    sealed = AESGCM(derive(store_key, b"backup")).encrypt(nonce, body, _BACKUP + header_raw)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_BACKUP + header_raw + b"\n" + base64.b64encode(nonce + sealed) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(out)
    return head


@dataclass(frozen=True)
class Backup:
    header: dict[str, Any]
    header_raw: bytes
    sealed: bytes

    @classmethod
    def read(cls, path: Path) -> Backup:
        raw = _read(path, MAX_BACKUP_BYTES)
        if not raw.startswith(_BACKUP):
            raise ValueError(f"{path} is not a Cloister backup")
        try:
            header_raw, blob = raw[len(_BACKUP) :].split(b"\n", 1)
            header = json.loads(header_raw)
            sealed = base64.b64decode(blob.strip(), validate=True)
        except (ValueError, binascii.Error):
            raise ValueError(f"{path} is not a readable Cloister backup") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path} is not a readable Cloister backup")
        return cls(header, header_raw, sealed)

    def kit(self) -> dict[str, Any]:
        kit = self.header.get("kit")
        if not isinstance(kit, dict):
            raise StoreError(
                "this backup has no recovery kit: restore it with the store key file",
                reason="no-recovery-kit",
            )
        return kit

    def open(self, store_key: bytes) -> dict[str, list[dict[str, Any]]]:
        if key_id(store_key) != self.header.get("key_id"):
            raise AccessDenied("this backup was made under another store key", reason="bad-key")
        try:
            body = AESGCM(derive(store_key, b"backup")).decrypt(
                self.sealed[:12], self.sealed[12:], _BACKUP + self.header_raw
            )
        except InvalidTag:
            raise StoreError("the backup was altered", reason="backup-tampered") from None
        doc = json.loads(gzip.decompress(body))
        return {t: [{k: _unb(v) for k, v in r.items()} for r in rows] for t, rows in doc.items()}


def restore(
    data_dir: Path, url: str | None, bk: Backup, store_key: bytes, *, accept_older: bool
) -> tuple[Store, Head]:
    """Load a backup into the empty database of a fresh CAS and adopt its head.

    A restore is a deliberate step back in time: it refuses to replace a head this data
    directory already has unless ``accept_older`` says the owner means it.
    """
    dump = bk.open(store_key)
    if (data_dir / HEAD_FILE).exists() and not accept_older:
        raise ConflictError(
            f"{data_dir} already has a state head: restoring would roll this CAS back; "
            "pass --accept-older-state if that is what you mean",
            reason="restore-would-roll-back",
        )
    if (data_dir / KEY_FILE).exists():
        if (data_dir / KEY_FILE).read_bytes() != store_key:
            raise ConflictError(f"{data_dir} holds another store key", reason="key-exists")
    else:
        write_key(data_dir / KEY_FILE, store_key)
    store = Store.open(
        db_url(data_dir, url),
        Keyring.of([store_key]),
        head_file=HeadFile(data_dir / HEAD_FILE),
        verify=False,
    )
    try:
        if not store.is_empty():
            raise ConflictError(
                "the target database is not empty; restore onto a fresh CAS",
                reason="restore-target-not-empty",
            )
        head = store.load(dump)
    except Error:
        store.close()
        raise
    if bk.header.get("kit"):
        (data_dir / KIT_FILE).write_text(json.dumps(bk.header["kit"], sort_keys=True))
    return store, head


def record_start(store: Store, *, simulation: bool) -> None:
    """Audit a CAS start; warn when the store key has no recovery kit."""
    from cloister.cas import audit

    if store.get_kit("recovery") is None:
        log.warning(
            "this CAS has no recovery keys: losing %s loses its state "
            "(see `cloister cas init --recovery-key`)",
            KEY_FILE,
        )
    log_ = audit.AuditLog(store)
    log_.record("cas-start", simulation=simulation, head=store.head().seq, pid=os.getpid())

    stopped = threading.Event()

    def stop() -> None:
        # A clean exit (SIGTERM, Ctrl-C) records the stop; a crash leaves only the start.
        if stopped.is_set():
            return
        stopped.set()
        try:
            log_.record("cas-stop", head=store.head().seq, pid=os.getpid())
        except Error as exc:
            log.info("the stop of this CAS could not be audited: %s", exc.message)

    atexit.register(stop)
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises SIGTERM after its graceful shutdown, which skips atexit: record the
        # stop on the way, then let the signal do what it did before.
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:
            stop()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(signal.SIGTERM, on_term)
