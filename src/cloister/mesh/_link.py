"""One proxied connection: a TLS leg on the network, a plaintext leg on loopback.

The TLS leg is a plain TCP transport with an ``ssl.SSLObject`` over memory BIOs, not asyncio's
own TLS transport, for three reasons:

1. Authorisation sits between the handshake and the first decrypted byte. When OpenSSL reports
   the handshake complete, reading stops; the peer's certificate is checked against the rule;
   only then is anything decrypted (records that arrived early stay encrypted in the BIO) and,
   on the ingress side, only then is the application even connected to.
2. Half-close works both ways: the app's FIN becomes a TLS ``close_notify`` (RFC 8446 §6.1)
   and a received ``close_notify`` becomes a FIN to the app, so request/response protocols that
   shut down their write side keep working. asyncio's TLS transport cannot half-close.
3. Fewer copies and layers: one 256 KiB read from the socket is decrypted and written out in
   one call, with flow control straight between the two transports.

A TCP FIN from the network without a preceding ``close_notify`` is a truncation: the app's
connection is reset, never closed cleanly, so it cannot mistake a cut stream for a complete one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from cloister.mesh._tls import refusal_reason
from cloister.mesh.identity import PeerIdentity, ServiceIdentity

if TYPE_CHECKING:
    from cloister.mesh.proxy import Listener

logger = logging.getLogger("cloister.mesh")

RECV_SIZE: Final = 256 * 1024  # bytes asked of the kernel per read
ENCRYPT_PIECE: Final = 64 * 1024  # plaintext bytes encrypted per call
DECRYPT_BATCH: Final = 1024 * 1024  # plaintext bytes decrypted before they are written out
WRITE_HIGH_WATER: Final = 1024 * 1024  # bytes buffered for a socket before the other pauses
WRITE_LOW_WATER: Final = 256 * 1024

_HANDSHAKE, _AUTHORISING, _OPEN, _CLOSED = "handshake", "authorising", "open", "closed"


class Scratch:
    """Buffers shared by every connection on one event loop.

    Reads are synchronous (``get_buffer``, ``recv_into``, ``buffer_updated`` in one call), so
    one receive buffer serves all sockets, and decrypted bytes are assembled in one buffer and
    copied out once per batch. This keeps large reads free of per-read allocations.
    """

    def __init__(self) -> None:
        self.recv = memoryview(bytearray(RECV_SIZE))
        self.plain = memoryview(bytearray(DECRYPT_BATCH))


class _Leg(asyncio.BufferedProtocol):
    link: Link

    def __init__(self, link: Link) -> None:
        self.link = link

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.link.scratch.recv


class _NetLeg(_Leg):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.link.net_made(transport)

    def buffer_updated(self, nbytes: int) -> None:
        self.link.net_data(self.link.scratch.recv[:nbytes])

    def eof_received(self) -> bool:
        return self.link.net_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.leg_lost("net", exc)

    def pause_writing(self) -> None:
        self.link.net_full(True)

    def resume_writing(self) -> None:
        self.link.net_full(False)


class _PlainLeg(_Leg):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.link.plain_made(transport)

    def buffer_updated(self, nbytes: int) -> None:
        self.link.plain_data(self.link.scratch.recv[:nbytes])

    def eof_received(self) -> bool:
        return self.link.plain_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.leg_lost("plain", exc)

    def pause_writing(self) -> None:
        self.link.plain_full(True)

    def resume_writing(self) -> None:
        self.link.plain_full(False)


class Link:
    """The state of one connection through a proxy. Driven by its two legs and its listener."""

    def __init__(
        self,
        owner: Listener,
        sslobj: ssl.SSLObject,
        bio_in: ssl.MemoryBIO,
        bio_out: ssl.MemoryBIO,
        scratch: Scratch,
    ) -> None:
        self.owner = owner
        self.scratch = scratch
        self._loop = owner.loop
        self._ssl = sslobj
        self._in = bio_in
        self._out = bio_out
        self.net_leg = _NetLeg(self)
        self.plain_leg = _PlainLeg(self)
        self.net: asyncio.Transport | None = None
        self.plain: asyncio.Transport | None = None
        self.state = _HANDSHAKE
        self.peer: PeerIdentity | None = None
        self.authorised_as: ServiceIdentity | None = None
        self.remote = "?"
        self.pending: asyncio.Task[None] | None = None
        self.sent = 0  # plaintext bytes from the app, sent encrypted
        self.received = 0  # plaintext bytes delivered to the app
        self._setup_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last = self._loop.time()
        self._net_full = False  # the network socket's write buffer is above its high water
        self._plain_full = False
        self._plain_eof = False  # the app shut down its write side
        self._close_notify_due = False  # ... and its close_notify waits for the BIO to drain
        self._close_notify_sent = False
        self._close_notify_got = False
        self._net_fin = False

    # -- set-up ---------------------------------------------------------------------------

    def arm_setup_timer(self, seconds: float) -> None:
        self._setup_timer = self._loop.call_later(seconds, self._setup_expired)

    def _setup_expired(self) -> None:
        self._setup_timer = None
        if self.state == _HANDSHAKE:
            self.refuse("handshake-timeout", "no complete handshake in time")
        elif self.state == _AUTHORISING:
            self.upstream_failed(TimeoutError("connect timed out"))

    def net_made(self, transport: asyncio.Transport) -> None:
        if self.state == _CLOSED:
            transport.abort()
            return
        self.net = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.owner.net_made(self)

    def plain_made(self, transport: asyncio.Transport) -> None:
        if self.state == _CLOSED:
            transport.abort()
            return
        self.plain = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.owner.plain_made(self)

    def handshake_step(self) -> None:
        """Advance the handshake; on completion stop reading and ask the listener."""
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()  # OpenSSL's alert tells an honest peer why: close, do not reset
            detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
            self.refuse(refusal_reason(exc), str(detail or exc), reset=False)
            return
        self._flush()
        self.state = _AUTHORISING
        assert self.net is not None
        self.net.pause_reading()
        self.peer = PeerIdentity.from_peercert(self._ssl.getpeercert())
        self.owner.authorise(self)

    def start(self) -> None:
        """Both legs are connected and the peer is authorised: relay from now on."""
        if self.state != _AUTHORISING:
            return
        assert self.net is not None and self.plain is not None
        self.state = _OPEN
        if self._setup_timer is not None:
            self._setup_timer.cancel()
            self._setup_timer = None
        self._last = self._loop.time()
        self._idle_timer = self._loop.call_later(self.owner.idle_timeout, self._idle_check)
        self.owner.opened(self)
        self.net.resume_reading()
        self.plain.resume_reading()
        self._decrypt()

    def refuse(self, reason: str, detail: str, *, reset: bool = True) -> None:
        """Count, log and end the connection; ``reset`` sends a TCP RST instead of a FIN."""
        if self.state == _CLOSED:
            return
        self.owner.refused(self, reason, detail)
        # The app's side is always reset: an empty clean stream would read as "no answer".
        self.close(abort=True, graceful_net=not reset)

    def upstream_failed(self, exc: BaseException) -> None:
        if self.state == _CLOSED:
            return
        self.owner.upstream_failed(self, exc)
        self.close(abort=True)

    # -- relaying -------------------------------------------------------------------------

    def _flush(self) -> None:
        if self._out.pending and self.net is not None:
            self.net.write(self._out.read())

    def plain_data(self, data: memoryview) -> None:
        if self.state != _OPEN or self._close_notify_sent:
            return
        self._last = self._loop.time()
        try:
            # In pieces: OpenSSL's memory BIO slows down when it holds much more than this.
            for start in range(0, len(data), ENCRYPT_PIECE):
                self._ssl.write(data[start : start + ENCRYPT_PIECE])
                self._flush()
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self.sent += len(data)

    def net_data(self, data: memoryview) -> None:
        self._in.write(data)
        if self.state == _HANDSHAKE:
            self.handshake_step()
        elif self.state == _OPEN:
            self._last = self._loop.time()
            self._decrypt()
        # While authorising, records wait in the BIO, still encrypted.

    def _decrypt(self) -> None:
        if self.state != _OPEN or self._plain_full:
            return
        assert self.plain is not None
        buf = self.scratch.plain
        size = len(buf)
        filled = 0
        eof = False
        # With a buffer, read() returns a count (typeshed only knows the bytes form).
        read_into = cast(Callable[[int, memoryview], int], self._ssl.read)
        try:
            while True:
                n = read_into(size - filled, buf[filled:])
                if not n:
                    eof = True
                    break
                filled += n
                if filled == size:
                    self._deliver(buf)
                    buf = self.scratch.plain  # _deliver may have handed the old one over
                    filled = 0
                if not self._in.pending and not self._ssl.pending():
                    # Nothing left to decrypt: the next read would only raise SSLWantReadError,
                    # and building that exception costs more than this check.
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            eof = True  # close_notify, reported this way once ours was sent
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        if filled:
            self._deliver(buf[:filled])
        self._flush()  # post-handshake messages (key updates) may want an answer
        if eof and not self._close_notify_got:
            self._close_notify_got = True
            if self.plain.can_write_eof():
                self.plain.write_eof()
        if self._close_notify_due and not self._in.pending:
            self._send_close_notify()
        if self._net_fin and not self._close_notify_got and not self._in.pending:
            self._fail(ConnectionError("TCP FIN without close_notify: stream truncated"))
            return
        self._maybe_finish()

    def _deliver(self, data: memoryview) -> None:
        """Write decrypted bytes from the shared scratch buffer to the app, copying only if needed.

        A transport that cannot send everything at once may keep a reference to the rest
        (asyncio does since Python 3.12). So: behind data already queued, write a copy; into an
        empty queue, write the view itself, and if any of it stayed queued, give the scratch
        buffer to the transport and take a fresh one.
        """
        plain = self.plain
        assert plain is not None
        self.received += len(data)
        if plain.get_write_buffer_size():
            plain.write(bytes(data))
            return
        plain.write(data)
        if plain.get_write_buffer_size():
            self.scratch.plain = memoryview(bytearray(DECRYPT_BATCH))

    def plain_eof(self) -> bool:
        self._plain_eof = True
        if self.state != _OPEN:
            return True
        if self._in.pending:
            # unwrap() would read (and choke on) records still waiting in the BIO.
            self._close_notify_due = True
        else:
            self._send_close_notify()
        self._maybe_finish()
        return True

    def _send_close_notify(self) -> None:
        self._close_notify_due = False
        if self._close_notify_sent:
            return
        self._close_notify_sent = True
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent ours; the peer's comes later, through _decrypt
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._flush()

    def net_eof(self) -> bool:
        if self.state in (_HANDSHAKE, _AUTHORISING):
            self.refuse("handshake-eof", "the peer closed during the handshake")
            return False
        self._net_fin = True
        self._decrypt()
        return True

    def _maybe_finish(self) -> None:
        if self.state == _OPEN and self._close_notify_got and self._close_notify_sent:
            self.close(abort=False)

    def net_full(self, full: bool) -> None:
        self._net_full = full
        if self.state == _OPEN and self.plain is not None and not self._plain_eof:
            if full:
                self.plain.pause_reading()
            else:
                self.plain.resume_reading()

    def plain_full(self, full: bool) -> None:
        self._plain_full = full
        if self.state != _OPEN or self.net is None:
            return
        if full:
            self.net.pause_reading()
        else:
            self.net.resume_reading()
            self._decrypt()

    # -- ending ---------------------------------------------------------------------------

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.state != _OPEN:
            return
        idle = self.owner.idle_timeout
        left = self._last + idle - self._loop.time()
        if left > 0:
            self._idle_timer = self._loop.call_later(left, self._idle_check)
            return
        self.owner.idle_closed(self)
        self.close(abort=False)

    def _fail(self, exc: BaseException) -> None:
        logger.info("mesh %s: connection from %s ended: %s", self.owner.name, self.remote, exc)
        self.close(abort=True)

    def leg_lost(self, leg: str, exc: Exception | None) -> None:
        if self.state == _CLOSED:
            return
        if self.state != _OPEN:
            self.close(abort=True)
            return
        if leg == "plain" and exc is None and not self._close_notify_sent:
            if self._in.pending:
                self._close_notify_sent = True  # cannot send it cleanly; the FIN follows
            else:
                self._send_close_notify()
        clean = exc is None and (leg == "plain" or self._close_notify_got)
        self.close(abort=not clean)

    def close(self, *, abort: bool, graceful_net: bool = False) -> None:
        if self.state == _CLOSED:
            return
        was_open = self.state == _OPEN
        self.state = _CLOSED
        for timer in (self._setup_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._setup_timer = self._idle_timer = None
        if self.pending is not None and not self.pending.done():
            self.pending.cancel()
        self.pending = None
        for transport, reset in ((self.plain, abort), (self.net, abort and not graceful_net)):
            if transport is not None and not transport.is_closing():
                if reset:
                    _reset(transport)
                else:
                    transport.close()
        self.owner.closed(self, was_open)


_LINGER_RESET: Final = struct.pack("ii", 1, 0)


def _reset(transport: asyncio.Transport) -> None:
    """Close with a TCP RST, so the other end sees an error and never a clean end of stream."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()
