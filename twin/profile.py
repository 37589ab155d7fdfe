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

__all__ = ["Profile", "ProfileError", "StepTimeModel", "AdapterFamilyTable", "load_profile", "known_profiles",
           "DEFAULT_GPU", "ADAPTER_FAMILIES"]

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
#: optional step-time coefficients (0 when a profile predates them)
OPTIONAL_STEP_FIELDS = {
    "kv_read_ms_per_ktoken": "each 1000 context tokens the step's decoding requests attend to (KV-cache reads)",
    "decode_knee_seqs": "decoding requests up to which the per-sequence cost is decode_ms_per_seq alone",
    "decode_ms_per_seq_above_knee": "extra per decoding request beyond decode_knee_seqs (compute-bound batch)",
    "lora_adapter_rank_scale": "relative increase of lora_ms_per_adapter per 16-wide block of max_lora_rank beyond the "
                               "first (vLLM's LoRA kernels tile the rank by 16)",
    **{f"lora_rank_block_ms_{term}{regime}":
       f"LoRA kernels, measured (profiler/gpu_lora_kernels.py): per 16-wide block of max_lora_rank beyond the first, "
       f"{what}, in steps of {size} lora_rank_block_split_tokens tokens"
       for term, what in (("per_adapter", "each distinct adapter"),
                          ("per_slot", "each GPU adapter slot (max_loras + 1)"),
                          ("per_slot_ktoken", "each slot times each 1000 tokens of the step"))
       for regime, size in (("", "fewer than"), ("_large", "at least"))},
    "lora_rank_block_split_tokens": "step size (tokens) at which vLLM's LoRA kernels switch tiling (0.8.5: 128)",
}
SCHED_FIELDS = {
    "base_ms": "every step",
    "ms_per_running": "each running request",
    "ms_per_waiting_skipped": "each waiting request times max(0, 1 - max_loras/served)",
}


class ProfileError(ValueError):
    """A profile file that is missing, malformed or physically impossible."""


#: adapter families the twin prices (``twin run --adapter-family``); ``lora`` is the reference
ADAPTER_FAMILIES = ("lora", "parallel", "series", "fused")


def _log2_pos(grid: tuple[int, ...], value: float) -> tuple[int, int, float]:
    """Neighbours of ``value`` in ``grid`` and its fraction between them in log2, clamped to the grid's ends."""
    v = min(max(float(value), grid[0]), grid[-1])
    j = 0
    while j + 1 < len(grid) - 1 and grid[j + 1] <= v:
        j += 1
    if len(grid) == 1:
        return 0, 0, 0.0
    lo, hi = grid[j], grid[j + 1]
    return j, j + 1, (math.log2(v) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))


@dataclass(frozen=True)
class AdapterFamilyTable:
    """Cost of adapter families relative to gathered LoRA, measured by ``adaptwin profile adapters``.

    A family's LoRA step-time terms are LoRA's times ``multiplier[family](k, max_lora_rank)``, k = distinct adapters
    in the step: bilinear in (log2 rank, log2 k) between measured points, clamped to the grid's ends
    (docs/adapters.md has the model and how it is measured).
    """

    ranks: tuple[int, ...]
    distinct: tuple[int, ...]
    multiplier: Mapping[str, tuple[tuple[float, ...], ...]]
    measured_on: str

    def multipliers(self, family: str, max_lora_rank: int, max_k: int) -> list[float]:
        """Multiplier for k = 0 … max_k distinct adapters (index k; k = 0 has no LoRA term and gets 1)."""
        m = self.multiplier[family]
        i0, i1, fr = _log2_pos(self.ranks, max_lora_rank)
        row = [(1.0 - fr) * a + fr * b for a, b in zip(m[i0], m[i1])]
        out = [1.0]
        for k in range(1, max_k + 1):
            j0, j1, fk = _log2_pos(self.distinct, k)
            out.append((1.0 - fk) * row[j0] + fk * row[j1])
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "AdapterFamilyTable":
        where = f"{where} adapter_family"
        if not isinstance(d, Mapping):
            raise ProfileError(f"profile {where} must be a JSON object (the table of `adaptwin profile adapters`)")
        for key in ("measured_on", "ranks", "distinct", "multiplier"):
            if key not in d:
                raise ProfileError(f"profile {where}: field '{key}' is missing; rebuild it with "
                                   "`adaptwin profile adapters` (docs/adapters.md)")
        if not isinstance(d["measured_on"], str) or not d["measured_on"]:
            raise ProfileError(f"profile {where}.measured_on must name the device, e.g. \"cpu\" or \"cuda\"")
        axes = {}
        for key in ("ranks", "distinct"):
            vals = d[key]
            if (not isinstance(vals, list) or not vals
                    or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals)
                    or vals != sorted(set(vals))):
                raise ProfileError(f"profile {where}.{key} must be increasing positive integers, got {vals!r}")
            axes[key] = tuple(vals)
        mult = d["multiplier"]
        if not isinstance(mult, Mapping) or "lora" not in mult:
            raise ProfileError(f"profile {where}.multiplier must map families to tables and include 'lora'")
        table = {}
        for fam, rows in mult.items():
            if fam not in ADAPTER_FAMILIES:
                raise ProfileError(f"profile {where}: unknown adapter family {fam!r} "
                                   f"(known: {', '.join(ADAPTER_FAMILIES)})")
            shape = (len(axes["ranks"]), len(axes["distinct"]))
            if (not isinstance(rows, list) or len(rows) != shape[0]
                    or any(not isinstance(r, list) or len(r) != shape[1] for r in rows)):
                raise ProfileError(f"profile {where}.multiplier.{fam} must be {shape[0]} rows (ranks) of "
                                   f"{shape[1]} values (distinct adapters)")
            vals = tuple(tuple(_num({"v": v}, "v", f"{where}.multiplier.{fam}") for v in r) for r in rows)
            if fam == "lora" and any(v != 1.0 for r in vals for v in r):
                raise ProfileError(f"profile {where}.multiplier.lora must be 1 everywhere (it is the reference)")
            table[fam] = vals
        return cls(ranks=axes["ranks"], distinct=axes["distinct"], multiplier=table, measured_on=d["measured_on"])


def _num(obj: Mapping[str, Any], key: str, where: str, *, allow_negative: bool = False) -> float:
    if key not in obj:
        raise ProfileError(f"profile {where}: field '{key}' is missing")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProfileError(f"profile {where}.{key} must be a finite number, got {value!r}")
    if value < 0 and not allow_negative:
        raise ProfileError(f"profile {where}.{key} is negative ({value}); latencies and capacities must be >= 0")
    return float(value)


def rank_blocks(max_lora_rank: int) -> int:
    """16-wide blocks of ``max_lora_rank`` beyond the first: 0 up to rank 16, 1 at 32, 3 at 64."""
    return max(0, -(-max_lora_rank // 16) - 1)


RankKernelTerms = tuple[float, tuple[float, float, float], tuple[float, float, float]]


def price_rank_kernel(terms: RankKernelTerms, tokens: float, n_adapters: float) -> float:
    """:meth:`StepTimeModel.rank_kernel_terms` ``terms`` at a step of ``tokens`` tokens and ``n_adapters`` adapters
    (the tiling chosen by the tokens); the one formula the step-time model, the engine and the gauges share."""
    split, below, above = terms
    c = below if tokens < split else above
    return c[0] + c[1] * n_adapters + c[2] * tokens * 1e-3


@dataclass(frozen=True)
class StepTimeModel:
    """Latency of one engine step (ms) as a sum of per-operation terms (Vidur-style).

    ``step_ms = base + decode·n_decode + decode_above_knee·max(0, n_decode − decode_knee) + prefill·n_prefill
    + kv_read·context_tokens/1000
    + [LoRA in batch]·rank_factor·(lora_base + lora_seq·n_decode + lora_prefill·n_prefill
    + lora_adapter·adapter_rank_factor·A + lora_adapter_ktoken·A·(n_decode + n_prefill)/1000)``
    plus adapter loads, scheduler overhead and :meth:`rank_kernel_ms` (max_loras-dependent), which the engine adds.
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
    # decode attention reads every context token's K and V once per step: memory-bound, linear in the batch's
    # context tokens (measured on an H100, profiler/measured/h100), independent of LoRA
    kv_read_ms_per_ktoken: float = 0.0
    # a small decode batch is bound by reading the weights, a large one by compute: the per-sequence cost is lower up
    # to the knee than above it (est_default_latency.csv: a straight line is 1 ms high mid-range; profiler/fit.py)
    decode_knee_seqs: float = 0.0
    decode_ms_per_seq_above_knee: float = 0.0
    # vLLM's LoRA kernels tile the rank in blocks of 16: per adapter, rank 32 launches more work than 8 or 16
    lora_adapter_rank_scale: float = 0.0
    # the same, measured on the kernels (rank_kernel_ms): what each further rank block adds, in the two tilings vLLM
    # picks by step size (a split-K shrink below the split, where the rank's programs cost most)
    lora_rank_block_ms_per_adapter: float = 0.0
    lora_rank_block_ms_per_slot: float = 0.0
    lora_rank_block_ms_per_slot_ktoken: float = 0.0
    lora_rank_block_ms_per_adapter_large: float = 0.0
    lora_rank_block_ms_per_slot_large: float = 0.0
    lora_rank_block_ms_per_slot_ktoken_large: float = 0.0
    lora_rank_block_split_tokens: float = 128.0

    def decode_ms(self, n_decode: float) -> float:
        """The non-LoRA decode part of a step with ``n_decode`` decoding requests: base, per sequence, knee."""
        return (self.base_ms + self.decode_ms_per_seq * n_decode
                + self.decode_ms_per_seq_above_knee * max(0.0, n_decode - self.decode_knee_seqs))

    def rank_factor(self, max_lora_rank: int) -> float:
        """Scale of the LoRA terms for a server started with ``--max-lora-rank``."""
        return max(0.0, 1.0 + self.lora_rank_slope * math.log2(max(max_lora_rank, 8) / 8.0))

    def adapter_rank_factor(self, max_lora_rank: int) -> float:
        """Extra scale of the per-adapter term: 1 up to rank 16, + lora_adapter_rank_scale per further 16."""
        return 1.0 + self.lora_adapter_rank_scale * rank_blocks(max_lora_rank)

    def rank_kernel_terms(self, max_lora_rank: int, max_loras: int) -> RankKernelTerms:
        """For a server's max_lora_rank and max_loras: (split tokens, (per step, per adapter, per 1000 tokens) below
        the split, the same from it) of :meth:`rank_kernel_ms`."""
        b, slots = rank_blocks(max_lora_rank), max_loras + 1
        return (self.lora_rank_block_split_tokens,
                (b * slots * self.lora_rank_block_ms_per_slot, b * self.lora_rank_block_ms_per_adapter,
                 b * slots * self.lora_rank_block_ms_per_slot_ktoken),
                (b * slots * self.lora_rank_block_ms_per_slot_large, b * self.lora_rank_block_ms_per_adapter_large,
                 b * slots * self.lora_rank_block_ms_per_slot_ktoken_large))

    def rank_kernel_ms(self, max_lora_rank: int, max_loras: int, tokens: float, n_adapters: int) -> float:
        """LoRA kernel time a step of ``tokens`` tokens and ``n_adapters`` adapters spends beyond what it would at
        max_lora_rank 16 (0 without the measured ``lora_rank_block_*`` terms, or up to rank 16)."""
        if n_adapters <= 0:
            return 0.0
        return price_rank_kernel(self.rank_kernel_terms(max_lora_rank, max_loras), tokens, n_adapters)

    def step_ms(self, n_decode: int, n_prefill: int, n_adapters: int, rank_factor: float = 1.0,
                context_tokens: int = 0, adapter_rank_factor: float = 1.0) -> float:
        ms = (self.decode_ms(n_decode) + self.prefill_ms_per_token * n_prefill
              + self.kv_read_ms_per_ktoken * context_tokens * 1e-3)
        if n_adapters > 0:
            ms += rank_factor * (self.lora_base_ms + self.lora_ms_per_seq * n_decode
                                 + self.lora_ms_per_prefill_token * n_prefill
                                 + self.lora_ms_per_adapter * adapter_rank_factor * n_adapters
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
    adapter_family: AdapterFamilyTable | None = None
    # share of requests that end at EOS before max_tokens (ignore_eos false); applied to length-table workloads
    early_stop_fraction: float = 0.0

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
            if self.adapter_family is not None and family in self.adapter_family.multiplier:
                return 1.0  # priced per step by family_multipliers
            known = ", ".join(sorted(set(self.families) | set(self.adapter_family.multiplier
                                                               if self.adapter_family else ())))
            raise ProfileError(f"adapter family {family!r} is not in profile {self.path or self.model} "
                               f"(it has: {known}); profile it first or use --adapter-family lora")
        return float(self.families[family].get("compute_scale", 1.0))

    def family_multipliers(self, family: str, max_lora_rank: int, max_k: int) -> list[float]:
        """Multiplier of the LoRA terms per number of distinct adapters in a step (index 0 … max_k), from the
        ``adapter_family`` table; all 1 for ``lora`` (so LoRA results are unchanged) or a family without a table."""
        self.family_scale(family)  # a clear error for a family the profile does not price
        if family == "lora" or self.adapter_family is None or family not in self.adapter_family.multiplier:
            return [1.0] * (max_k + 1)
        return self.adapter_family.multipliers(family, max_lora_rank, max_k)

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
                                for k in STEP_FIELDS},
                             **{k: _num(st, k, f"{where} step_time") for k in OPTIONAL_STEP_FIELDS if k in st})
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
        afam = AdapterFamilyTable.from_dict(d["adapter_family"], where) if "adapter_family" in d else None
        gen = d.get("generation", {})
        early = _num(gen, "early_stop_fraction", f"{where} generation") if "early_stop_fraction" in gen else 0.0
        if early > 1:
            raise ProfileError(f"profile {where}: generation.early_stop_fraction must be in [0, 1], got {early}")
        return cls(
            model=str(d["model"]), gpu=str(d["gpu"]), step=step,
            sched_base_ms=_num(sc, "base_ms", f"{where} scheduler"),
            sched_ms_per_running=_num(sc, "ms_per_running", f"{where} scheduler"),
            sched_ms_per_waiting_skipped=_num(sc, "ms_per_waiting_skipped", f"{where} scheduler"),
            loading_ms=loading, kv_table=table, kv_failed=failed,
            kv_intercept=_num(kv["linear"], "intercept", f"{where} kv_capacity.linear"),
            kv_per_slot_rank=_num(kv["linear"], "tokens_per_slot_rank", f"{where} kv_capacity.linear"),
            max_model_len=int(_num(lim, "max_model_len", f"{where} limits")),
            client_max_waiting=cmw, families=families, meta=dict(d["meta"]), path=path, adapter_family=afam,
            early_stop_fraction=early,
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
