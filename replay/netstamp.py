"""When bytes arrived: stream readers that keep the arrival time of what they hold.

A latency is measured up to when its bytes arrived, not up to when the event loop got round to parsing them:
other connections' work, and on a shared machine the OS scheduler, make that later, and at ``--speedup 10`` every
wall millisecond reads as 10 trace ms. Two levels:

* :class:`StampedReader` notes ``time.perf_counter()`` when its protocol feeds it (the process received the bytes).
  ``twin serve`` stamps its arrivals with it.
* :func:`open_stamped_connection`, the ``vllm`` backend's connections: on plain TCP under Linux it reads the socket
  itself with ``recvmsg`` and the kernel's receive timestamp (``SO_TIMESTAMPNS``), the time the bytes reached this
  host, before this process was even scheduled to read them; over TLS a :class:`StampedReader` on asyncio streams.

When newer bytes came in before the parse, the stamp is theirs: late, never early.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time

__all__ = ["StampedReader", "open_stamped_connection", "KERNEL_STAMPS"]

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # 35 on Linux (x86, arm); Python names it from 3.12 on
KERNEL_STAMPS = sys.platform.startswith("linux")
_ANCILLARY = socket.CMSG_SPACE(16) if KERNEL_STAMPS else 0  # one struct timespec


class StampedReader(asyncio.StreamReader):
    """A stream reader that keeps when its latest bytes arrived (``arrived``, on the ``perf_counter`` clock)."""

    arrived = 0.0

    def feed_data(self, data: bytes, at: float | None = None) -> None:
        self.arrived = time.perf_counter() if at is None else at
        super().feed_data(data)


class _KernelStampedSocket:
    """A connected non-blocking socket read through ``recvmsg`` into a :class:`StampedReader` with the kernel's
    receive time; written like a StreamWriter (``write``, ``close``, ``is_closing``). A failed send or read reaches
    the reader as the exception, as on an asyncio stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, reader: StampedReader):
        self._loop, self._sock, self._reader = loop, sock, reader
        self._fd = sock.fileno()
        self._pending = bytearray()
        self._closed = False
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self._sock.recvmsg(1 << 16, _ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(exc)
            return
        if not data:
            self._loop.remove_reader(self._fd)
            self._reader.feed_eof()
            return
        at = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= 16:
                sec, nsec = struct.unpack("qq", payload[:16])  # CLOCK_REALTIME: moved onto perf_counter's clock
                now = time.perf_counter()
                at = min(now, sec + nsec * 1e-9 - time.time() + now)
        self._reader.feed_data(data, at)

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        if not self._pending:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(exc)
                return
            if sent == len(data):
                return
            self._loop.add_writer(self._fd, self._writable)
            data = data[sent:]
        self._pending += data

    def _writable(self) -> None:
        try:
            sent = self._sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(exc)
            return
        del self._pending[:sent]
        if not self._pending:
            self._loop.remove_writer(self._fd)

    def _fail(self, exc: OSError) -> None:
        self._reader.set_exception(exc)
        self.close()

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._sock.close()
        self._reader.feed_eof()


async def open_stamped_connection(host: str, port: int, *, limit: int, ssl=None) -> tuple[StampedReader, object]:
    """``asyncio.open_connection`` whose reader keeps when bytes arrived: the kernel's receive time on plain TCP under
    Linux (the writer is then a :class:`_KernelStampedSocket`), otherwise when the event loop received them."""
    loop = asyncio.get_running_loop()
    if ssl is not None or not KERNEL_STAMPS:
        reader = StampedReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.create_connection(lambda: protocol, host, port, ssl=ssl)
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
    error: OSError | None = None
    for family, kind, proto, _, addr in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            await loop.sock_connect(sock, addr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        reader = StampedReader(limit=limit, loop=loop)
        return reader, _KernelStampedSocket(loop, sock, reader)
    raise error or OSError(f"cannot resolve {host}:{port}")
