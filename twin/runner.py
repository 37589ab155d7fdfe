"""Run one scenario (a row of the scenario CSV, or CLI flags) through the twin: workload, config, simulate."""

from __future__ import annotations

import math
from typing import Any, Sequence

from adaptwin.twin.config import Arrivals, ConfigError, ServerConfig, paper_workload
from adaptwin.twin.profile import Profile, load_profile
from adaptwin.twin.result import SimResult
from adaptwin.twin.sim import simulate

__all__ = ["run_scenario", "parse_list"]


def parse_list(text: Any, kind=float) -> list:
    """'0.1;0.05' or '0.1,0.05' (or a number) into a list; ConfigError when a value is not a number."""
    if isinstance(text, (int, float)):
        return [kind(text)]
    out = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise ConfigError(f"expected a list of numbers, got {text!r}") from None
        if not math.isfinite(v):
            raise ConfigError(f"expected finite numbers, got {text!r}")
        out.append(kind(v) if kind is float else int(v))
    if not out:
        raise ConfigError(f"empty list {text!r}")
    return out


def run_scenario(model: str, rates: Sequence[float], ranks: Sequence[int], served: int, max_loras: int,
                 max_lora_rank: int | None = None, duration: float = 3600.0, seed: int = 0,
                 profile: Profile | None = None, lengths=None, arrivals: Arrivals | None = None,
                 adapter_ranks: Sequence[int] | None = None, window_s: float = 60.0, **server_kw) -> SimResult:
    """The paper's workload (or ``arrivals``) on one configuration; ``server_kw`` go to :class:`ServerConfig`."""
    prof = profile or load_profile(model)
    if any((not math.isfinite(r)) or r < 0 for r in rates):
        raise ConfigError(f"rates must be finite and >= 0 req/s, got {list(rates)}")
    if arrivals is None:
        if lengths is None:
            try:
                from adaptwin.twin.lengths import load_lengths
            except ImportError as err:  # pragma: no cover - the lengths module ships with the twin
                raise ConfigError("no request-length table available (adaptwin.twin.lengths missing); "
                                  "pass explicit arrivals") from err
            lengths = load_lengths(prof.model)
        arrivals, adapter_ranks = paper_workload(rates, ranks, served, duration, seed, lengths)
        # the table's output lengths are max_tokens; the model stops at EOS before them in a share of requests
        from adaptwin.twin.lengths import apply_early_stop

        arrivals = apply_early_stop(arrivals, prof.early_stop_fraction, seed)
    elif adapter_ranks is None:
        adapter_ranks = [ranks[k % len(ranks)] for k in range(served)]
    cfg = ServerConfig(model=prof.model, served=served, max_loras=max_loras, adapter_ranks=tuple(adapter_ranks),
                       max_lora_rank=max_lora_rank, **server_kw)
    return simulate(cfg, arrivals, duration, window_s=window_s, profile=prof)
