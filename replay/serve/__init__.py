"""``adaptwin twin serve``: a vLLM-compatible HTTP server (OpenAI completions, LoRA endpoints, Prometheus
metrics with vLLM's names) backed by the twin in scaled real time, with fault injection for the fault tests.

    from adaptwin.replay.serve import ServeConfig, Faults, TwinServer, ServerThread
"""

from adaptwin.replay.serve.config import FaultError, Faults, ServeConfig
from adaptwin.replay.serve.server import ServerThread, TwinServer

__all__ = ["FaultError", "Faults", "ServeConfig", "ServerThread", "TwinServer"]
