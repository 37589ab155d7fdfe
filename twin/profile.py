"""Calibration profiles: everything the twin knows about one (GPU, model) pair, as data.

A profile is a JSON file (``twin/profiles/<gpu>__<model>.json``) written by ``adaptwin twin fit``
(:mod:`adaptwin.profiler.fit`) from profiling CSVs. A new model or GPU is a new file, never new code.
This module reads and checks it; :class:`StepTimeModel` turns it into step latencies.

>>> p = load_profile("llama-3.1-8b-instruct")
>>> p.model, p.gpu, p.meta["vllm_version"]
('llama-3.1-8b-instruct', 'h100-64gb', '0.8.5')
>>> p.kv_capacity_tokens(16, 8)
301520
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

__all__ = ["Profile", "ProfileError", "StepTimeModel", "load_profile", "known_profiles", "DEFAULT_GPU"]

DEFAULT_GPU = "h100-64gb"
SCHEMA_VERSION = 1

#: step-time coefficients (ms) every profile must carry, with what each multiplies.
STEP_FIELDS = {
    "base_ms": "every step",
    "decode_ms_per_seq": "each decode token (running request) in the step",
    "prefill_ms_per_token": "each prompt (or recompute) token in the step",
    "lora_base_ms": "a step with at least one LoRA request",
    "lora_ms_per_seq": "each LoRA decode token",
    "lora_ms_per_prefill_token": "each LoRA prefill token",
    "lora_ms_per_adapter": "each distinct adapter in the step",
    "lora_ms_per_adapter_ktoken": "each distinct adapter times each 1000 tokens in the step",
    "lora_rank_slope": "relative change of the LoRA terms per doubling of max_lora_rank above 8",
}
SCHED_FIELDS = {
    "base_ms": "every step",
    "ms_per_running": "each running request",
    "ms_per_waiting_skipped": "each waiting request times max(0, 1 - max_loras/served)",
}


class ProfileError(ValueError):
    """A profile file that is missing, malformed or physically impossible."""


def _num(obj: Mapping[str, Any], key: str, where: str, *, allow_negative: bool = False) -> float:
    if key not in obj:
        raise ProfileError(f"profile {where}: field '{key}' is missing")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProfileError(f"profile {where}.{key} must be a finite number, got {value!r}")
    if value < 0 and not allow_negative:
        raise ProfileError(f"profile {where}.{key} is negative ({value}); latencies and capacities must be >= 0")
    return float(value)


@dataclass(frozen=True)
class StepTimeModel:
    """Latency of one engine step (ms) as a sum of per-operation terms (Vidur-style).

    ``step_ms = base + decode·n_decode + prefill·n_prefill
    + [LoRA in batch]·rank_factor·(lora_base + lora_seq·n_decode + lora_prefill·n_prefill + lora_adapter·A
    + lora_adapter_ktoken·A·(n_decode + n_prefill)/1000)``
    plus adapter loads and scheduler overhead, which the engine adds (they depend on its state).
    """

    base_ms: float
    decode_ms_per_seq: float
    prefill_ms_per_token: float
    lora_base_ms: float
    lora_ms_per_seq: float
    lora_ms_per_prefill_token: float
    lora_ms_per_adapter: float
    lora_ms_per_adapter_ktoken: float
    lora_rank_slope: float

    def rank_factor(self, max_lora_rank: int) -> float:
        """Scale of the LoRA terms for a server started with ``--max-lora-rank``."""
        return max(0.0, 1.0 + self.lora_rank_slope * math.log2(max(max_lora_rank, 8) / 8.0))

    def step_ms(self, n_decode: int, n_prefill: int, n_adapters: int, rank_factor: float = 1.0) -> float:
        ms = self.base_ms + self.decode_ms_per_seq * n_decode + self.prefill_ms_per_token * n_prefill
        if n_adapters > 0:
            ms += rank_factor * (self.lora_base_ms + self.lora_ms_per_seq * n_decode
                                 + self.lora_ms_per_prefill_token * n_prefill + self.lora_ms_per_adapter * n_adapters
                                 + self.lora_ms_per_adapter_ktoken * n_adapters * (n_decode + n_prefill) * 1e-3)
        return ms


@dataclass(frozen=True)
class Profile:
    """One (GPU, model) calibration: step time, scheduler overhead, adapter loading, KV capacity, limits."""

    model: str
    gpu: str
    step: StepTimeModel
    sched_base_ms: float
    sched_ms_per_running: float
    sched_ms_per_waiting_skipped: float
    loading_ms: Mapping[int, Mapping[int, float]]  # [max_lora_rank][adapter_rank] -> ms per CPU->GPU load
    kv_table: Mapping[tuple[int, int], int]  # (max_loras, max_lora_rank) -> KV tokens (measured)
    kv_failed: frozenset  # (max_loras, max_lora_rank) that failed at start-up
    kv_intercept: float
    kv_per_slot_rank: float
    max_model_len: int
    client_max_waiting: int | None
    families: Mapping[str, Mapping[str, float]]
    meta: Mapping[str, Any] = field(default_factory=dict, repr=False)
    path: str = ""

    # ---- derived quantities -------------------------------------------------------------------------
    def kv_capacity_tokens(self, max_loras: int, max_lora_rank: int) -> int:
        """KV cache tokens vLLM reports at start-up: the measured value, else the linear fit in max_loras·rank."""
        key = (int(max_loras), int(max_lora_rank))
        if key in self.kv_table:
            return int(self.kv_table[key])
        return max(0, int(self.kv_intercept - self.kv_per_slot_rank * max_loras * max_lora_rank))

    def load_ms(self, max_lora_rank: int, adapter_rank: int) -> float:
        """CPU->GPU activation cost of one adapter (ms); nearest measured entry when not measured."""
        rows = self.loading_ms
        mr = min(rows, key=lambda r: (abs(r - max_lora_rank), -r))
        row = rows[mr]
        ar = min(row, key=lambda r: (abs(r - adapter_rank), -r))
        return float(row[ar])

    def family_scale(self, family: str) -> float:
        """Compute multiplier of the LoRA terms for an adapter family (``lora`` = 1)."""
        if family not in self.families:
            known = ", ".join(sorted(self.families))
            raise ProfileError(f"adapter family {family!r} is not in profile {self.path or self.model} "
                               f"(it has: {known}); profile it first or use --adapter-family lora")
        return float(self.families[family].get("compute_scale", 1.0))

    # ---- (de)serialisation --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str = "") -> "Profile":
        where = path or "<dict>"
        if not isinstance(d, Mapping):
            raise ProfileError(f"profile {where} must be a JSON object")
        if d.get("schema") != SCHEMA_VERSION:
            raise ProfileError(f"profile {where}: unknown schema {d.get('schema')!r} (this build reads {SCHEMA_VERSION})")
        for key in ("model", "gpu", "step_time", "scheduler", "loading_ms", "kv_capacity", "limits", "meta"):
            if key not in d:
                raise ProfileError(f"profile {where}: field '{key}' is missing")
        st = d["step_time"]
        step = StepTimeModel(**{k: _num(st, k, f"{where} step_time", allow_negative=(k == "lora_rank_slope"))
                                for k in STEP_FIELDS})
        sc = d["scheduler"]
        loading: dict[int, dict[int, float]] = {}
        for mr, row in d["loading_ms"].items():
            loading[int(mr)] = {int(ar): _num(row, ar, f"{where} loading_ms.{mr}") for ar in row}
        if not loading or not all(loading.values()):
            raise ProfileError(f"profile {where}: loading_ms is empty")
        kv = d["kv_capacity"]
        table = {}
        for item in kv.get("table", []):
            if item["kv_cache_tokens"] <= 0:
                raise ProfileError(f"profile {where}: KV capacity must be positive, got {item}")
            table[(int(item["max_loras"]), int(item["max_lora_rank"]))] = int(item["kv_cache_tokens"])
        failed = frozenset((int(a), int(b)) for a, b in kv.get("failed", []))
        lim = d["limits"]
        cmw = lim.get("client_max_waiting")
        if cmw is not None and (not isinstance(cmw, int) or cmw < 1):
            raise ProfileError(f"profile {where}: limits.client_max_waiting must be a positive integer or null")
        families = d.get("families", {"lora": {"compute_scale": 1.0}})
        return cls(
            model=str(d["model"]), gpu=str(d["gpu"]), step=step,
            sched_base_ms=_num(sc, "base_ms", f"{where} scheduler"),
            sched_ms_per_running=_num(sc, "ms_per_running", f"{where} scheduler"),
            sched_ms_per_waiting_skipped=_num(sc, "ms_per_waiting_skipped", f"{where} scheduler"),
            loading_ms=loading, kv_table=table, kv_failed=failed,
            kv_intercept=_num(kv["linear"], "intercept", f"{where} kv_capacity.linear"),
            kv_per_slot_rank=_num(kv["linear"], "tokens_per_slot_rank", f"{where} kv_capacity.linear"),
            max_model_len=int(_num(lim, "max_model_len", f"{where} limits")),
            client_max_waiting=cmw, families=families, meta=dict(d["meta"]), path=path,
        )


def _profiles_dir():
    return resources.files("adaptwin.twin").joinpath("profiles")


def known_profiles() -> list[str]:
    """Shipped profile names (``<gpu>__<model>``), sorted."""
    return sorted(p.name[:-5] for p in _profiles_dir().iterdir() if p.name.endswith(".json"))


_CACHE: dict[str, Profile] = {}


def load_profile(model: str | None = None, path: str | Path | None = None, gpu: str = DEFAULT_GPU) -> Profile:
    """The profile in ``path``, or the shipped one for ``(gpu, model)``; ProfileError says what is wrong."""
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as err:
            raise ProfileError(f"cannot read profile {p}: {err.strerror}") from None
        where = str(p)
    else:
        if not model:
            raise ProfileError("give a model name or a profile file")
        name = f"{gpu}__{model}"
        if name in _CACHE:
            return _CACHE[name]
        res = _profiles_dir().joinpath(f"{name}.json")
        if not res.is_file():
            known = ", ".join(n.split("__", 1)[1] for n in known_profiles() if n.startswith(gpu + "__")) or "none"
            raise ProfileError(f"unknown model {model!r} on {gpu}: shipped profiles are for {known}; "
                               "pass --profile FILE for another model")
        text = res.read_text()
        where = f"{name}.json"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ProfileError(f"profile {where} is not valid JSON: {err}") from None
    prof = Profile.from_dict(data, path=where)
    if model and prof.model != model:
        raise ProfileError(f"profile {where} is for model {prof.model!r}, not {model!r}")
    if path is None:
        _CACHE[f"{gpu}__{model}"] = prof
    return prof
