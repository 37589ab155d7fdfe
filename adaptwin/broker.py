"""A local single-node Kafka broker, driven through deploy/kafka/kafka.sh (for tests and `adaptwin demo`).

The script owns everything about the broker (jars, config, formatting, pid file); this class only passes it
ports and a data dir and adds what the fault tests need: an unclean kill.

>>> broker = LocalBroker(port=free_port())            # doctest: +SKIP
>>> broker.start(); broker.bootstrap                   # doctest: +SKIP
'127.0.0.1:40123'
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from kafka.errors import KafkaTimeoutError

from adaptwin.cliutil import UserError
from adaptwin.kafka import admin_client, wait_for_broker

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def kafka_script() -> Path:
    """deploy/kafka/kafka.sh of this checkout, or $ADAPTWIN_KAFKA_SH."""
    path = Path(os.environ.get("ADAPTWIN_KAFKA_SH") or REPO_ROOT / "deploy" / "kafka" / "kafka.sh")
    if not path.is_file():
        raise UserError(f"{path} not found: the local broker runs from a source checkout of adaptwin; "
                        "set ADAPTWIN_KAFKA_SH to its deploy/kafka/kafka.sh or use a running broker (--bootstrap)")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalBroker:
    """One KRaft broker+controller on 127.0.0.1:`port`, its state in `data_dir` (kept across restarts)."""

    port: int = 9092
    controller_port: int | None = None        # default port + 1, as kafka.sh does
    data_dir: Path | None = None              # default .cache/kafka/run-<port>
    heap: str = "-Xmx512m"
    start_timeout_s: float = 90.0
    stop_timeout_s: float = 30.0
    script: Path = field(default_factory=kafka_script)

    def __post_init__(self) -> None:
        if self.controller_port is None:
            self.controller_port = self.port + 1
        if self.data_dir is None:
            self.data_dir = REPO_ROOT / ".cache" / "kafka" / f"run-{self.port}"
        self.data_dir = Path(self.data_dir).resolve()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "kafka.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _env(self) -> dict[str, str]:
        return {**os.environ,
                "KAFKA_PORT": str(self.port),
                "KAFKA_CONTROLLER_PORT": str(self.controller_port),
                "KAFKA_DATA_DIR": str(self.data_dir),
                "KAFKA_HEAP": self.heap,
                "KAFKA_START_TIMEOUT": str(int(self.start_timeout_s)),
                "KAFKA_STOP_TIMEOUT": str(int(self.stop_timeout_s))}

    def _run(self, command: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        try:
            # The script's messages go to stderr; capture them so failures can quote them.
            return subprocess.run([str(self.script), command], env=self._env(), text=True,
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(f"`kafka.sh {command}` for {self.bootstrap} took over {timeout_s:g} s; "
                            f"see {self.data_dir}/kafka.log") from None

    def _check(self, command: str, timeout_s: float) -> None:
        res = self._run(command, timeout_s)
        for line in res.stderr.splitlines():
            log.info("%s", line)
        if res.returncode != 0:
            tail = "\n".join(res.stderr.strip().splitlines()[-15:])
            raise UserError(f"`kafka.sh {command}` failed for the broker on {self.bootstrap} "
                            f"(exit {res.returncode}):\n{tail}")

    def start(self) -> "LocalBroker":
        """Start the broker (fetching jars and formatting storage on first use); return once it answers and
        every existing partition has a leader."""
        t0 = time.monotonic()
        self._check("up", self.start_timeout_s + 120)   # + the one-off Maven fetch
        wait_for_broker(self.bootstrap, timeout_s=30)
        self._wait_for_leaders(timeout_s=30)
        log.info("broker on %s ready in %.1f s", self.bootstrap, time.monotonic() - t0)
        return self

    def _wait_for_leaders(self, timeout_s: float) -> None:
        # After a restart the broker answers before its existing partitions have leaders again; a
        # consumer that joins its group in that gap is assigned nothing (kafka-python sees no partitions).
        with admin_client(self.bootstrap, timeout_s) as admin:
            topics = admin.list_topics()
            if topics:
                try:
                    admin.wait_for_topics(topics, timeout_ms=int(timeout_s * 1000))
                except KafkaTimeoutError as e:
                    raise UserError(f"partitions on {self.bootstrap} got no leader after a restart ({e}); "
                                    f"see {self.data_dir}/kafka.log") from None

    def stop(self) -> None:
        """Controlled shutdown (SIGTERM); SIGKILL if it does not exit within stop_timeout_s."""
        self._check("down", self.stop_timeout_s + 15)

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would: no controlled shutdown, nothing flushed by Kafka."""
        pid = self.pid
        if pid is None or not self.is_running():
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (self.data_dir / "kafka.pid").unlink(missing_ok=True)

    def restart(self) -> "LocalBroker":
        self.stop()
        return self.start()

    def is_running(self) -> bool:
        return self._run("status", 10).returncode == 0

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not stat.rpartition(")")[2].strip().startswith("Z")
