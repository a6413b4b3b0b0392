"""Encrypted volumes, agent side: create or open each volume, verify it, mount it, report tags.

For every volume in the bundle the agent (before the program starts):

1. ``ephemeral``: empties the volume's directory and creates a new volume under the key the
   CAS made for this start alone; nothing is reported.
2. ``rollback_protection`` without an expected tag (first use): creates the volume and reports
   generation 1 to the CAS. A directory that already holds a volume is admitted only at
   generation 1 (an agent that crashed between creating and reporting); anything later means
   the CAS lost track of it, and the agent refuses.
3. mounts the volume with FUSE in a child process (``volume.mount`` with
   ``expected_root_tag``): the volume is opened and checked against the tag *before* the mount
   exists, so a rolled-back, forked or foreign volume never appears and the program never
   starts. ``no_rollback_protection`` mounts without a tag (every check but freshness).
4. reports every new root tag (each commit: ``fsync``, periodic commits, unmount) to the CAS,
   signed with the activation's TLS key (``POST /v1/volumes/tag``); ``fsync`` returns only
   once the CAS acknowledged it.

This module does not decide policy (the CAS does) and does not know the volume format (the
``volume`` package does). See ``docs/volumes-in-sessions.md``.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import logging
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from cloister import errors, protocol, volume
from cloister.client import CasClient

log = logging.getLogger(__name__)

MOUNT_WAIT_SECONDS: Final = 60.0  # for a mount to appear (the check reads the manifest first)
UNMOUNT_WAIT_SECONDS: Final = 60.0  # for the final commit and its report
REPORT_ATTEMPTS: Final = 3
_MAX_CHILD_MESSAGE: Final = 4096
_PR_SET_PDEATHSIG: Final = 1


class TagClient(CasClient):
    """The CAS client a mount process reports tags with."""

    def report_volume_tag(self, report: protocol.VolumeTagReport) -> protocol.VolumeTagAccepted:
        return self._call(
            "POST", "/v1/volumes/tag", protocol.VolumeTagAccepted, json=report.model_dump()
        )


ClientFactory = Callable[[], TagClient]


@dataclass
class Reporter:
    """``on_sync`` for one volume: sign (activation, session, volume, previous, new) and send.

    ``previous`` is the last tag the CAS acknowledged. Raising leaves the commit on disk; the
    volume reports it again before its next commit.
    """

    bundle: protocol.Bundle
    volume: str
    key: ec.EllipticCurvePrivateKey
    clients: ClientFactory
    previous: str | None
    sleep: Callable[[float], None] = time.sleep
    _client: TagClient | None = field(default=None, repr=False)

    def drop_client(self) -> None:
        self._client = None

    def __call__(self, tag: str) -> None:
        if tag == self.previous:
            return  # already acknowledged (a re-report after an answer that got lost)
        if self.bundle.activation_id is None:
            raise errors.AccessDenied("this activation cannot report tags", reason="no-activation")
        message = protocol.volume_tag_message(
            self.bundle.activation_id, self.bundle.session, self.volume, self.previous, tag
        )
        report = protocol.VolumeTagReport(
            activation_id=self.bundle.activation_id,
            session=self.bundle.session,
            volume=self.volume,
            previous=self.previous,
            tag=tag,
            signature=base64.b64encode(self.key.sign(message, ec.ECDSA(hashes.SHA256()))).decode(),
        )
        if self._client is None:
            self._client = self.clients()
        for attempt in range(1, REPORT_ATTEMPTS + 1):
            try:
                self._client.report_volume_tag(report)
                break
            except (errors.BackendUnavailable, errors.RateLimited) as exc:
                if attempt == REPORT_ATTEMPTS:
                    raise
                log.warning("volume %s: tag report failed (%s); retrying", self.volume, exc.reason)
                self.sleep(0.5 * attempt)
        self.previous = tag


@dataclass
class Mounted:
    """A volume mounted by a child process (``pid``) at ``path``."""

    name: str
    path: Path
    pid: int

    def unmount(self) -> bool:
        """Commit, report and unmount; True if the mount process ended cleanly."""
        with contextlib.suppress(OSError):
            if os.path.ismount(self.path):
                volume.umount(str(self.path))
        deadline = time.monotonic() + UNMOUNT_WAIT_SECONDS
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status) == 0
            time.sleep(0.05)
        log.error("volume %s: the mount process did not finish; stopping it", self.name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        os.waitpid(self.pid, 0)
        return False


def _is_volume(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())


def _refuse(name: str, exc: errors.VolumeIntegrityError) -> errors.VolumeIntegrityError:
    return errors.VolumeIntegrityError(
        f"volume {name!r} refused: {exc.message}", reason=exc.reason, path=exc.path
    )


def prepare(
    spec: protocol.BundleVolume, directory: Path, reporter: Reporter
) -> tuple[bytes, str | None]:
    """Steps (1) and (2): the key and the tag to mount with; creates what must be created."""
    key = base64.b64decode(spec.key, validate=True)
    if spec.policy == "ephemeral":
        # Empty the directory, not remove it: it may be a mount point itself (a PVC).
        for entry in directory.iterdir() if directory.is_dir() else ():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        vol = volume.create(str(directory), key)
        tag = vol.root_tag
        vol.close()
        return key, tag
    if spec.policy == "no_rollback_protection":
        if not _is_volume(directory):
            volume.create(str(directory), key).close()
        return key, None
    if spec.policy != "rollback_protection":
        raise errors.SessionError(f"volume {spec.name!r}: unknown policy {spec.policy!r}")
    if spec.expected_tag is not None:
        return key, spec.expected_tag
    if not _is_volume(directory):
        vol = volume.create(str(directory), key, on_sync=reporter)  # reports generation 1
        vol.close()
        return key, vol.root_tag
    try:
        vol = volume.open_volume(str(directory), key, read_only=True)
    except errors.VolumeIntegrityError as exc:
        raise _refuse(spec.name, exc) from None
    tag = vol.root_tag
    vol.close()
    if not tag.startswith("1:"):
        raise errors.VolumeIntegrityError(
            f"volume {spec.name!r}: the CAS holds no tag for it, but its directory holds "
            f"generation {tag.partition(':')[0]}; refusing a volume whose freshness is unknown",
            reason="root-tag-mismatch",
        )
    reporter(tag)  # the crash window between creating and reporting
    return key, tag


def _die_with_parent() -> None:
    # A mount outliving its agent would keep the volume locked; SIGTERM unmounts cleanly.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _child(
    directory: Path,
    mountpoint: Path,
    key: bytes,
    tag: str | None,
    reporter: Reporter | None,
    out: int,
) -> int:
    os.setpgid(0, 0)  # the terminal's ^C goes to the program; the agent unmounts after it
    _die_with_parent()
    if reporter is not None:
        reporter.drop_client()  # never share the parent's connection across fork
    try:
        volume.mount(str(directory), str(mountpoint), key, expected_root_tag=tag, on_sync=reporter)
    except errors.Error as exc:
        os.write(out, f"{exc.reason}\n{exc.message}".encode()[:_MAX_CHILD_MESSAGE])
        return 3
    except (OSError, RuntimeError, ValueError) as exc:
        os.write(out, f"mount-failed\ncannot mount: {exc}".encode()[:_MAX_CHILD_MESSAGE])
        return 5
    return 0


def _spawn(
    name: str,
    directory: Path,
    mountpoint: Path,
    key: bytes,
    tag: str | None,
    reporter: Reporter | None,
) -> Mounted:
    mountpoint.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the mount process
        os.close(read_end)
        code = 5
        try:
            code = _child(directory, mountpoint, key, tag, reporter, write_end)
        finally:
            os._exit(code)
    os.close(write_end)
    mounted = Mounted(name, mountpoint, pid)
    try:
        _wait_mounted(mounted, read_end)
    finally:
        os.close(read_end)
    return mounted


def _wait_mounted(mounted: Mounted, pipe: int) -> None:
    deadline = time.monotonic() + MOUNT_WAIT_SECONDS
    while time.monotonic() < deadline:
        if os.path.ismount(mounted.path):
            return
        ready, _, _ = select.select([pipe], [], [], 0.05)
        if ready:
            text = os.read(pipe, _MAX_CHILD_MESSAGE).decode(errors="replace")
            if text:
                os.waitpid(mounted.pid, 0)
                reason, _, message = text.partition("\n")
                raise errors.VolumeIntegrityError(
                    f"volume {mounted.name!r} refused: {message}", reason=reason or "mount-failed"
                )
        pid, status = os.waitpid(mounted.pid, os.WNOHANG)
        if pid:
            raise errors.VolumeIntegrityError(
                f"volume {mounted.name!r}: the mount process ended "
                f"(status {os.waitstatus_to_exitcode(status)})",
                reason="mount-failed",
            )
    mounted.unmount()
    raise errors.BackendUnavailable(f"volume {mounted.name!r} did not mount in time")


def mount_all(
    bundle: protocol.Bundle,
    key: ec.EllipticCurvePrivateKey,
    clients: ClientFactory,
    *,
    volumes_root: Path,
    files_root: Path = Path("/"),
) -> list[Mounted]:
    """Create or open, verify and mount every volume of the bundle; all or none.

    A volume ``name`` keeps its encrypted files in ``volumes_root/name`` (the untrusted disk)
    and appears, in plaintext, at its path under ``files_root``.
    """
    mounted: list[Mounted] = []
    try:
        for spec in bundle.volumes:
            directory = volumes_root / spec.name
            mountpoint = files_root / spec.path.lstrip("/")
            tagged = spec.policy == "rollback_protection"
            reporter = Reporter(bundle, spec.name, key, clients, previous=spec.expected_tag)
            vol_key, tag = prepare(spec, directory, reporter)
            mounted.append(
                _spawn(spec.name, directory, mountpoint, vol_key, tag, reporter if tagged else None)
            )
            log.info("volume %s mounted at %s (%s)", spec.name, spec.path, spec.policy)
    except BaseException:
        unmount_all(mounted)
        raise
    return mounted


def unmount_all(mounted: list[Mounted]) -> bool:
    """Unmount in reverse order; True if every final commit was made and reported."""
    clean = True
    for m in reversed(mounted):
        try:
            ok = m.unmount()
        except OSError as exc:
            if exc.errno != errno.ECHILD:
                raise
            ok = False
        if not ok:
            log.error("volume %s: the final commit or its report failed", m.name)
        clean = clean and ok
    mounted.clear()
    return clean
