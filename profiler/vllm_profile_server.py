"""The server ``adaptwin profile vllm`` measures: what it says about itself, and how to start one (``--launch``).

:func:`discover` reads ``/v1/models`` (base model, adapters, context length), ``/version`` (vLLM or ``twin serve``;
the latter's clock speed-up comes from ``/adaptwin/served``) and ``/metrics`` (``vllm:cache_config_info``: KV blocks
and block size; ``vllm:lora_requests_info``: ``max_lora``). :class:`Launched` starts a server command on a free
127.0.0.1 port with ``--max-loras`` / ``--max-lora-rank`` of one experiment, waits until it answers and stops its
whole process group afterwards — the KV-capacity and loading experiments need one start-up per configuration.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from adaptwin.replay.backends.promtext import PromParseError, parse

__all__ = ["ServerInfo", "ServerError", "discover", "Launched", "kv_from_metrics", "free_port"]

log = logging.getLogger("adaptwin.profiler.vllm_profile")

#: vLLM's start-up line with the KV cache size (GPU and CPU builds), for servers whose /metrics lacks cache_config_info
KV_LOG_LINE = re.compile(r"KV cache size:\s*([\d,]+)\s*tokens")


class ServerError(RuntimeError):
    """The server cannot be profiled (unreachable, no adapters, failed start-up); the message says why."""


@dataclass
class ServerInfo:
    """What the profiler learnt about the server before measuring."""

    url: str
    base_model: str | None
    adapters: list[str]
    adapter_ranks: dict[str, int]
    max_model_len: int | None
    version: str
    is_twin: bool
    speedup: float
    max_loras: int | None
    block_size: int | None
    num_gpu_blocks: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def kv_tokens(self) -> int | None:
        if self.block_size and self.num_gpu_blocks:
            return self.block_size * self.num_gpu_blocks
        return None

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("url", "base_model", "adapters", "adapter_ranks", "max_model_len",
                                              "version", "is_twin", "speedup", "max_loras", "block_size",
                                              "num_gpu_blocks", "notes")} | {"kv_tokens": self.kv_tokens}


def kv_from_metrics(text: str) -> tuple[int | None, int | None, int | None]:
    """``(block_size, num_gpu_blocks, max_lora)`` from a /metrics page (None where absent)."""
    try:
        fams = parse(text)
    except PromParseError as err:
        raise ServerError(f"/metrics is not Prometheus text: {err}") from None
    block = blocks = max_lora = None
    for fam in fams.values():
        for s in fam.samples:
            if s.name == "vllm:cache_config_info":
                if s.labels.get("num_gpu_blocks", "").isdigit():
                    blocks = int(s.labels["num_gpu_blocks"])
                if s.labels.get("block_size", "").isdigit():
                    block = int(s.labels["block_size"])
            elif s.name == "vllm:lora_requests_info" and s.labels.get("max_lora", "").isdigit():
                max_lora = int(s.labels["max_lora"])
    return block, blocks, max_lora


def _rank_from_path(path: str | None) -> int | None:
    """An adapter's rank from its peft ``adapter_config.json`` (vLLM lists the adapter path as ``root``)."""
    if not path:
        return None
    cfg = Path(path) / "adapter_config.json"
    try:
        return int(json.loads(cfg.read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def discover(url: str, *, speedup: float | None = None, ranks: list[int] | None = None, api_key: str | None = None,
             timeout_s: float = 30.0) -> ServerInfo:
    """Ask the server what it serves. ``speedup`` None = 1 for vLLM, ``twin serve``'s own for the twin;
    ``ranks`` (adapter k has ``ranks[k mod len]``) overrides ranks read from the adapters' peft configs."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30.0) as c:
        while True:
            try:
                r = c.get("/v1/models")
                if r.status_code == 200:
                    break
                err = f"http {r.status_code}"
            except httpx.HTTPError as exc:
                err = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise ServerError(f"{url} did not answer /v1/models within {timeout_s:g} s ({err}); is it up?")
            time.sleep(0.5)
        data = r.json().get("data", [])
        base = next((m for m in data if not m.get("parent")), None)
        adapters = [m for m in data if m.get("parent")]
        if not adapters:
            raise ServerError(f"{url} serves no LoRA adapters (/v1/models lists none); start it with --enable-lora "
                              "and --lora-modules (vLLM) or --max-cpu-loras (twin serve)")
        try:
            version = str(c.get("/version").json().get("version", "?"))
        except (httpx.HTTPError, ValueError):
            version = "?"
        is_twin = "adaptwin" in version
        if speedup is None:
            speedup = 1.0
            if is_twin:
                speedup = float(c.get("/adaptwin/served", params={"limit": 0}).json()["speedup"])
        block, blocks, max_lora = kv_from_metrics(c.get("/metrics").text)
    notes = []
    names = [m["id"] for m in adapters]
    adapter_ranks: dict[str, int] = {}
    for k, m in enumerate(adapters):
        rank = ranks[k % len(ranks)] if ranks else _rank_from_path(m.get("root"))
        if rank is None:
            rank = 8
            if "rank unknown" not in " ".join(notes):
                notes.append("adapter rank unknown (no readable adapter_config.json, no --ranks): taken as 8")
        adapter_ranks[m["id"]] = int(rank)
    mml = base.get("max_model_len") if base else None
    return ServerInfo(url=url.rstrip("/"), base_model=base["id"] if base else None, adapters=names,
                      adapter_ranks=adapter_ranks, max_model_len=int(mml) if mml else None, version=version,
                      is_twin=is_twin, speedup=float(speedup), max_loras=max_lora, block_size=block,
                      num_gpu_blocks=blocks, notes=notes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launched:
    """A server started from ``command`` for one configuration; a context manager that stops it.

    ``{port}``, ``{max_loras}`` and ``{max_lora_rank}`` in the command are filled in; flags without a placeholder
    are appended (``--port P --max-loras G --max-lora-rank R``; argparse keeps the last occurrence). The process
    leads its own process group (vLLM's engine core runs in a child), which is what :meth:`stop` signals.
    """

    def __init__(self, command: list[str], max_loras: int, max_lora_rank: int, log_path: Path,
                 ready_timeout_s: float = 300.0, env: dict | None = None):
        if not command:
            raise ServerError("--launch needs a server command after '--'")
        self.port = free_port()
        values = {"port": self.port, "max_loras": max_loras, "max_lora_rank": max_lora_rank}
        text = " ".join(command)
        cmd = [part.format(**values) if "{" in part else part for part in command]
        for key, flag in (("port", "--port"), ("max_loras", "--max-loras"), ("max_lora_rank", "--max-lora-rank")):
            if "{" + key + "}" not in text:
                cmd += [flag, str(values[key])]
        self.command, self.log_path = cmd, Path(log_path)
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout_s = ready_timeout_s
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.start_s = 0.0

    def start(self) -> "Launched":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with self.log_path.open("w") as logf:
            logf.write("launch: " + " ".join(self.command) + "\n")
            logf.flush()
            try:
                self.proc = subprocess.Popen(self.command, stdout=logf, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True, env=self.env)
            except OSError as err:
                raise ServerError(f"cannot start {self.command[0]}: {err}") from None
        deadline = t0 + self.ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"the server exited during start-up (status {self.proc.returncode}); "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"the server did not answer within {self.ready_timeout_s:g} s; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.3)
        self.start_s = time.monotonic() - t0
        return self

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kv_tokens_from_log(self) -> int | None:
        try:
            found = KV_LOG_LINE.findall(self.log_path.read_text(errors="replace"))
        except OSError:
            return None
        return int(found[-1].replace(",", "")) if found else None

    def stop(self, grace_s: float = 20.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "Launched":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
