"""A small HTTP/1.1 server on asyncio streams: keep-alive, Content-Length bodies, chunked streamed responses.

Just what an OpenAI-compatible API needs, without a web framework: one coroutine per connection reads
requests in order and hands each to a handler ``async (Request, Responder) -> None``. Streamed responses
(server-sent events) go out with ``Transfer-Encoding: chunked``; the caller may keep writing to the
connection from elsewhere in the event loop (the twin's token emitter does) through :class:`Responder`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from dataclasses import dataclass
from email.utils import formatdate
from typing import Awaitable, Callable

from adaptwin.replay.netstamp import StampedReader

__all__ = ["Request", "Responder", "HttpServer", "REASONS"]

log = logging.getLogger("adaptwin.replay.serve.http")

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 411: "Length Required", 413: "Payload Too Large", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
MAX_HEADER = 64 * 1024
MAX_BODY = 64 * 1024 * 1024


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    received: float = 0.0  # time.perf_counter() when its last bytes reached the process

    def json(self):
        return json.loads(self.body) if self.body else None


class Responder:
    """Writes one response on a connection: either whole (:meth:`send`) or streamed (:meth:`start_stream`,
    :meth:`chunk`, :meth:`end_stream`), or the connection is reset (:meth:`reset`)."""

    def __init__(self, writer: asyncio.StreamWriter, keep_alive: bool):
        self.writer = writer
        self.keep_alive = keep_alive
        self.done = asyncio.get_running_loop().create_future()  # set when the response is complete
        self.started = False
        self.closed = False

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", f"date: {formatdate(usegmt=True)}",
                 "server: adaptwin-twin-serve"]
        lines += [f"{k}: {v}" for k, v in headers]
        if not self.keep_alive:
            lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @property
    def alive(self) -> bool:
        return not self.closed and not self.writer.transport.is_closing()

    def send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        if self.alive:
            self.writer.write(self._head(status, [("content-type", content_type),
                                                  ("content-length", str(len(body)))]) + body)
        self._finish()

    def send_json(self, status: int, obj) -> None:
        self.send(status, json.dumps(obj, separators=(",", ":")).encode())

    def start_stream(self, content_type: str = "text/event-stream; charset=utf-8") -> None:
        self.started = True
        if self.alive:
            self.writer.write(self._head(200, [("content-type", content_type), ("transfer-encoding", "chunked")]))

    def chunk(self, data: bytes) -> bool:
        """One chunk; False when the client has gone away."""
        if not self.alive:
            return False
        self.writer.write(b"%x\r\n%b\r\n" % (len(data), data))
        return True

    def chunks(self, parts: list[bytes]) -> bool:
        """Several chunks in one write (each stays its own chunk and SSE event)."""
        if not self.alive:
            return False
        self.writer.write(b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts))
        return True

    def end_stream(self) -> None:
        if self.alive:
            self.writer.write(b"0\r\n\r\n")
        self._finish()

    def reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), as a crashed proxy or server would."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.writer.transport.abort()
        self.closed = True
        self.keep_alive = False
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


Handler = Callable[[Request, Responder], Awaitable[None]]


class HttpServer:
    """``await HttpServer(handler).start(host, port)``; ``port`` 0 binds a free one (see :attr:`port`)."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.StreamReaderProtocol:  # asyncio.start_server's, with a stamping reader
            return asyncio.StreamReaderProtocol(StampedReader(limit=MAX_HEADER, loop=loop), self._serve, loop=loop)

        self.server = await loop.create_server(protocol, host, port, backlog=4096, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self._conns):
                w.transport.abort()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # client closed between requests
                except asyncio.LimitOverrunError:
                    _plain(writer, 431, b"request headers too large")
                    return
                req, keep_alive, err = _parse_head(head)
                if err:
                    _plain(writer, 400, err.encode())
                    return
                if "chunked" in req.headers.get("transfer-encoding", "").lower():
                    _plain(writer, 411, b"chunked request bodies are not supported; send Content-Length")
                    return
                try:
                    n = int(req.headers.get("content-length", "0"))
                except ValueError:
                    n = -1
                if n < 0 or n > MAX_BODY:
                    _plain(writer, 413 if n > MAX_BODY else 400, b"bad Content-Length")
                    return
                if n:
                    try:
                        req.body = await reader.readexactly(n)
                    except asyncio.IncompleteReadError:
                        return
                req.received = reader.arrived  # the whole request is in
                resp = Responder(writer, keep_alive)
                try:
                    await self.handler(req, resp)
                    await resp.done
                except (ConnectionError, asyncio.IncompleteReadError):
                    return
                except Exception:  # a bug in a handler answers 500, never kills the server
                    log.exception("handler failed for %s %s", req.method, req.path)
                    if not resp.started:
                        resp.send_json(500, {"error": {"message": "internal error in twin serve", "type":
                                                       "InternalServerError", "param": None, "code": 500}})
                    else:
                        resp.reset()
                if not resp.keep_alive or not resp.alive:
                    return
                if writer.transport.get_write_buffer_size() > 1 << 20:
                    await writer.drain()
        except (ConnectionError, OSError):
            return
        except asyncio.CancelledError:  # server shutdown: end quietly (the streams callback logs cancellations)
            return
        finally:
            self._conns.discard(writer)
            if not writer.transport.is_closing():
                writer.close()


def _plain(writer: asyncio.StreamWriter, status: int, text: bytes) -> None:
    writer.write(f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: text/plain\r\n"
                 f"content-length: {len(text)}\r\nconnection: close\r\n\r\n".encode() + text)


def _parse_head(head: bytes) -> tuple[Request, bool, str | None]:
    try:
        text = head.decode("latin-1")
        lines = text.split("\r\n")
        method, target, version = lines[0].split(" ", 2)
    except ValueError:
        return Request("", "", "", {}, b""), False, "malformed request line"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return Request("", "", "", {}, b""), False, "malformed header line"
        headers[name.strip().lower()] = value.strip()
    path, _, query = target.partition("?")
    conn = headers.get("connection", "").lower()
    keep_alive = (version == "HTTP/1.1" and conn != "close") or (version == "HTTP/1.0" and conn == "keep-alive")
    return Request(method.upper(), path, query, headers, b""), keep_alive, None
