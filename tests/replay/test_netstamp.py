"""``adaptwin.replay.netstamp``: readers that keep when their bytes arrived, down to the kernel's receive time."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import sys
import threading
import time

import pytest

from adaptwin.replay import netstamp
from adaptwin.replay.netstamp import StampedReader, open_stamped_connection

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_TIMESTAMPNS is Linux's")


def test_stamped_reader_keeps_when_the_bytes_arrived(loop):
    async def go():
        reader = StampedReader()
        before = time.perf_counter()
        reader.feed_data(b"POST / HTTP/1.1\r\n\r\n")
        fed = time.perf_counter()
        await asyncio.sleep(0.03)  # the loop is busy elsewhere before the parse
        head = await reader.readuntil(b"\r\n\r\n")
        return head, before, fed, reader.arrived

    head, before, fed, arrived = loop.run_until_complete(go())
    assert head.startswith(b"POST")
    assert before <= arrived <= fed  # the feed's time, not the parse's 30 ms later


class _Peer:
    """A plain blocking TCP server in a thread: runs ``talk(conn)`` on the first connection."""

    def __init__(self, talk):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(talk,), daemon=True)
        self.thread.start()

    def _run(self, talk):
        conn, _ = self.sock.accept()
        with conn:
            self.result = talk(conn)
        self.sock.close()


@linux
def test_kernel_stamp_is_when_the_bytes_reached_the_host_not_when_the_process_read_them(loop):
    def talk(conn):
        conn.recv(16)
        time.sleep(0.02)
        wrote = time.perf_counter()
        conn.sendall(b"token\n")
        conn.recv(16)  # wait for the client's "bye" before closing
        return wrote

    peer = _Peer(talk)

    async def go():
        reader, writer = await open_stamped_connection("127.0.0.1", peer.port, limit=1 << 16)
        writer.write(b"hello")
        time.sleep(0.12)  # the event loop is busy: the token, written 20 ms in, waits in the socket for 100 ms
        line = await reader.readline()
        read = time.perf_counter()
        writer.write(b"bye")
        writer.close()
        return line, reader.arrived, read

    line, arrived, read = loop.run_until_complete(go())
    peer.thread.join(5)
    assert line == b"token\n"
    wrote = peer.result
    assert wrote <= arrived + 1e-4  # not before the peer wrote it (clock conversion within 0.1 ms)
    assert arrived < wrote + 0.05 < read  # the kernel's time, not the read's 100 ms later


@linux
def test_stamped_connection_sends_large_writes_whole_and_sees_the_end(loop):
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB: more than the socket buffers, so part of it waits

    def talk(conn):
        got = bytearray()
        while len(got) < len(payload):
            time.sleep(0.001)
            got += conn.recv(1 << 16)
        conn.sendall(hashlib.sha256(got).hexdigest().encode())
        return len(got)  # then close: the client sees the end of the stream

    peer = _Peer(talk)

    async def go():
        reader, writer = await open_stamped_connection("localhost", peer.port, limit=1 << 16)
        writer.write(payload)
        digest = await reader.read()  # up to EOF
        assert reader.at_eof()
        writer.close()
        return digest, writer.is_closing()

    digest, closing = loop.run_until_complete(go())
    assert digest == hashlib.sha256(payload).hexdigest().encode()
    assert closing and peer.result == len(payload)


@linux
def test_stamped_connection_refused_raises_oserror(loop):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused

    async def go():
        await open_stamped_connection("127.0.0.1", port, limit=1024)

    with pytest.raises(OSError):
        loop.run_until_complete(go())


def test_without_kernel_stamps_the_connection_is_an_asyncio_stream(loop, monkeypatch):
    """TLS, or not Linux: the same call gives an asyncio stream whose reader keeps when the loop received the bytes."""
    monkeypatch.setattr(netstamp, "KERNEL_STAMPS", False)

    def talk(conn):
        conn.recv(16)
        conn.sendall(b"token\n")

    peer = _Peer(talk)

    async def go():
        reader, writer = await netstamp.open_stamped_connection("127.0.0.1", peer.port, limit=1 << 16)
        writer.write(b"hello")
        line = await reader.readline()
        read = time.perf_counter()
        writer.close()
        return line, reader.arrived, read, writer

    line, arrived, read, writer = loop.run_until_complete(go())
    assert line == b"token\n" and 0 < arrived <= read
    assert isinstance(writer, asyncio.StreamWriter)
