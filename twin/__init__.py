"""The digital twin: a step-level simulator of vLLM V1 multi-LoRA serving (scheduler, KV blocks, adapter cache, step-time model), its calibration profiles, sweeps and the optimiser. Knows nothing of Kafka or the network.

Public API::

    from adaptwin.twin import ServerConfig, Arrivals, paper_workload, simulate, Engine, load_profile
"""

from adaptwin.twin.config import Arrivals, ConfigError, ServerConfig, paper_workload
from adaptwin.twin.engine import Engine
from adaptwin.twin.profile import Profile, ProfileError, load_profile
from adaptwin.twin.result import SimResult
from adaptwin.twin.sim import simulate

__all__ = ["Arrivals", "ConfigError", "Engine", "Profile", "ProfileError", "ServerConfig", "SimResult",
           "load_profile", "paper_workload", "simulate"]
