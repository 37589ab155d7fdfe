"""Reading a trace file line by line as bytes, so one bad line never aborts the file.

Lines are split from 1 MiB blocks (fast, and memory stays bounded: of a line longer than the limit only
its head is kept). Decoding to text happens per line, so a stray non-UTF-8 byte costs one row, not the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from adaptwin.ingest.readers.base import Reason, TraceFormatError

_BLOCK = 1 << 20
_MAGIC = {  # binary formats people hand us by mistake
    b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"%PDF": "a PDF document",
    b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "gzip-compressed data", b"(\xb5/\xfd": "zstd-compressed data",
    b"PAR1": "a Parquet file", b"\x7fELF": "an executable",
}


class LineError(Exception):
    """A line that cannot be turned into text; ``.reason`` and ``str()`` feed the dead letter."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason


def iter_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes without the newline). A line over ``max_line_bytes`` comes back
    as its first ``max_line_bytes + 1`` bytes, so ``len(raw) > max_line_bytes`` tells the caller."""
    keep = max_line_bytes + 1
    line = 0
    pending = b""  # head of the line that the previous block did not finish
    pending_len = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            parts = block.split(b"\n")
            tail = parts.pop()
            if not parts:  # no newline in this block: the pending line grows
                if len(pending) < keep:
                    pending += tail[: keep - len(pending)]
                pending_len += len(tail)
                continue
            if pending_len:
                parts[0] = (pending + parts[0])[:keep]
            for raw in parts:
                line += 1
                if raw[-1:] == b"\r":
                    raw = raw[:-1]
                yield line, raw
            pending, pending_len = tail[:keep], len(tail)
    if pending_len:  # last line without a newline
        raw = pending[:-1] if pending[-1:] == b"\r" else pending
        yield line + 1, raw


def decode(raw: bytes, max_line_bytes: int) -> str:
    """The line as text, or LineError (too long, not UTF-8)."""
    if len(raw) > max_line_bytes:
        raise LineError(Reason.LINE_TOO_LONG, f"line is longer than {max_line_bytes} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LineError(Reason.BAD_ENCODING,
                        f"byte 0x{raw[err.start]:02x} at column {err.start + 1} is not UTF-8") from None


def sniff(path: Path, size: int = 4096) -> bytes:
    """The first bytes of a file, for format detection; TraceFormatError when it is empty or binary."""
    try:
        with open(path, "rb") as f:
            head = f.read(size)
    except IsADirectoryError:
        raise TraceFormatError(path, "is a directory", "a trace file (or a ServeGen directory with --format servegen)")
    except OSError as err:
        raise TraceFormatError(path, f"cannot be read ({err.strerror})") from None
    if not head.strip():
        raise TraceFormatError(path, "is empty", "a trace with at least one request")
    what = binary_kind(head)
    if what:
        raise TraceFormatError(path, f"is {what}, not a trace", "a CSV, JSONL or Parquet request trace")
    return head


def binary_kind(head: bytes) -> str | None:
    """What binary thing ``head`` looks like, or None when it reads as text."""
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return what
    # A clean first line (header or first row) means a text trace, where a stray bad byte later is one
    # bad row for the dead-letter topic; otherwise a sample full of odd bytes is not a trace at all.
    first = head.split(b"\n", 1)[0]
    if len(first) < len(head) and _clean_text(first):
        return None
    text = head.decode("utf-8", "replace")
    odd = text.count("\ufffd") + sum(1 for c in text if c < " " and c not in "\t\n\r")
    if odd > max(8, len(text) // 20) or "\x00" in first.decode("utf-8", "replace"):
        return "binary data (not UTF-8 text)"
    return None


def _clean_text(line: bytes) -> bool:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(text.strip()) and not any(c < " " and c not in "\t\r" for c in text)


def first_lines(path: Path, n: int, max_line_bytes: int) -> list[str]:
    """Up to ``n`` non-blank, decodable first lines (format detection)."""
    found: list[str] = []
    for _, raw in iter_lines(path, max_line_bytes):
        try:
            text = decode(raw, max_line_bytes)
        except LineError:
            continue
        if text.strip():
            found.append(text)
            if len(found) == n:
                break
    return found
