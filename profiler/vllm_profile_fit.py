"""Fit a twin profile from ``adaptwin profile vllm``'s CSVs (``adaptwin twin fit`` calls this when the calibration
folder holds ``profile_vllm.json``).

The forms are the twin's step-time terms (``adaptwin.twin.profile.StepTimeModel``), fitted by least squares:

* LoRA decode, all rows of ``est_latency_overhead.csv`` (``decode_lora`` + ``overhead_small``):
  ``itl = c0 + c1·N + a·A [+ k·A·N]`` (k only when A was varied at two or more N). Without no-LoRA runs (the
  server serves adapters only) ``base_ms = c0``, ``decode_ms_per_seq = c1`` and ``lora_base_ms = lora_ms_per_seq = 0``
  — the same step times for every LoRA batch, which is all the twin runs; with them ``base_ms`` / ``decode_ms_per_seq``
  come from ``experiment=decode`` and the LoRA terms are the differences.
* ``lora_ms_per_adapter = a``, ``lora_ms_per_adapter_ktoken = 1000·k``.
* prefill: slope of the fastest TTFT (client and HTTP overhead only add) vs prompt tokens (base model → ``prefill_ms_per_token``; adapter →
  ``lora_ms_per_prefill_token`` = the difference, or all of it without base-model runs).
* scheduler: stock vLLM reports no scheduler time, so ``scheduler.base_ms`` and ``ms_per_running`` are 0 (inside
  ``base_ms`` / ``decode_ms_per_seq``); ``ms_per_waiting_skipped`` = slope of the server's mean ITL against the
  waiting requests that every step skips (the scheduler experiment).
* loading table and KV capacity as measured (KV linear law by least squares over the start-ups, when 2+).

Bad input is refused with :class:`~adaptwin.profiler.fit.FitError` naming the file, row and field; the result is
checked by :meth:`adaptwin.twin.profile.Profile.from_dict` (missing fields, negative constants).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from adaptwin.profiler.fit import FitError, _errors, _lstsq

__all__ = ["fit_vllm_profile", "META_FILE"]

META_FILE = "profile_vllm.json"


def _rows(path: Path, required: tuple[str, ...], positive: tuple[str, ...] = (),
          experiments: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Rows with status ok (or no status) [of these ``experiments``]; the ``required`` fields present and numeric,
    ``positive`` ones > 0."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise FitError(f"{path.name} lacks column(s) {', '.join(missing)}; re-run `adaptwin profile vllm`")
        out = []
        for line, row in enumerate(reader, start=2):
            if row.get("status", "ok") not in ("ok", ""):
                continue
            if experiments is not None and row.get("experiment") not in experiments:
                continue
            rec: dict[str, Any] = dict(row)
            for c in required:
                try:
                    v = float(row[c])
                except (TypeError, ValueError):
                    raise FitError(f"{path.name} line {line}: {c} = {row[c]!r} is not a number") from None
                if not math.isfinite(v):
                    raise FitError(f"{path.name} line {line}: {c} is not finite ({row[c]!r})")
                if c in positive and v <= 0:
                    raise FitError(f"{path.name} line {line}: {c} = {v:g} must be > 0 (a latency or size cannot "
                                   "be zero or negative); the measurement is broken, re-run it")
                rec[c] = v
            out.append(rec)
    return out


def _fit_lora_decode(rows: list[dict]) -> tuple[dict, dict]:
    if len(rows) < 3:
        raise FitError(f"est_latency_overhead.csv has {len(rows)} LoRA decode rows; need >= 3 (decode_lora at "
                       "several N and overhead_small at several A)")
    n = np.array([r["mean_batch_size"] for r in rows])
    a = np.array([r["adapters_with_traffic"] for r in rows])
    y = np.array([r["mean_itl_ms"] for r in rows])
    if len(set(n.tolist())) < 2:
        raise FitError("the LoRA decode rows all have the same batch size; vary N (--decode-batches)")
    varied = {r["mean_batch_size"] for r in rows if r["adapters_with_traffic"] > 1}
    cols = [np.ones_like(n), n, a]
    with_k = len(varied) >= 2
    if with_k:
        cols.append(a * n)
    if len(set(a.tolist())) < 2:
        cols = cols[:2]  # a single adapter count: the per-adapter term is not identifiable
    x = np.column_stack(cols)
    coef = _lstsq(x, y)
    full = np.zeros(4)
    full[:len(coef)] = coef
    form = "itl_ms = c0 + c1*N + a*A" + (" + k*A*N" if with_k else "") + " (LoRA runs, N running, A adapters)"
    return ({"c0": full[0], "c1": full[1], "a": full[2], "k": full[3]},
            {"form": form, "source": "est_latency_overhead.csv (decode_lora + overhead_small)",
             "per_adapter_identified": len(cols) >= 3, "k_identified": with_k, **_errors(y, x @ coef)})


def _slope(rows: list[dict], what: str) -> tuple[float, float, dict]:
    x = np.array([r["set_input_length"] for r in rows])
    y = np.array([r["min_ttft_ms"] for r in rows])
    if len(set(x.tolist())) < 2:
        raise FitError(f"est_default_latency.csv has {what} rows at {len(set(x.tolist()))} prompt length(s); "
                       "need >= 2 (--prefill-tokens)")
    coef = _lstsq(np.c_[np.ones_like(x), x], y)
    return float(coef[0]), float(coef[1]), _errors(y, coef[0] + coef[1] * x)


def fit_vllm_profile(calibration: str | Path, model: str | None = None, gpu: str = "cpu",
                     max_model_len: int | None = None) -> dict[str, Any]:
    """The twin profile (dict) from a folder written by ``adaptwin profile vllm``."""
    from adaptwin.twin.profile import Profile, ProfileError

    cal = Path(calibration)
    try:
        meta = json.loads((cal / META_FILE).read_text())
    except (OSError, ValueError) as err:
        raise FitError(f"cannot read {cal / META_FILE}: {err}") from None
    if model and model != meta.get("model"):
        raise FitError(f"{cal} was profiled as model {meta.get('model')!r}, not {model!r}; pass --model "
                       f"{meta.get('model')}")
    model = meta["model"]
    sources: dict[str, Any] = {}
    fits: dict[str, Any] = {}

    lat_dec = _rows(cal / "est_default_latency.csv", ("mean_batch_size", "mean_itl_ms"),
                    ("mean_batch_size", "mean_itl_ms"), ("decode",))
    lora_rows = _rows(cal / "est_latency_overhead.csv", ("mean_batch_size", "adapters_with_traffic", "mean_itl_ms"),
                      ("mean_batch_size", "adapters_with_traffic", "mean_itl_ms"), ("decode_lora", "overhead_small"))
    lora, fits["lora_decode"] = _fit_lora_decode(lora_rows)
    step = {"lora_ms_per_adapter": lora["a"], "lora_ms_per_adapter_ktoken": 1000.0 * lora["k"],
            "lora_rank_slope": 0.0}
    if len(lat_dec) >= 2:
        n = np.array([r["mean_batch_size"] for r in lat_dec])
        y = np.array([r["mean_itl_ms"] for r in lat_dec])
        c = _lstsq(np.c_[np.ones_like(n), n], y)
        fits["decode"] = {"form": "itl_ms = base_ms + decode_ms_per_seq*N (base model, no LoRA)",
                          "source": "est_default_latency.csv experiment=decode", **_errors(y, c[0] + c[1] * n)}
        step.update(base_ms=c[0], decode_ms_per_seq=c[1], lora_base_ms=max(0.0, lora["c0"] - c[0]),
                    lora_ms_per_seq=max(0.0, lora["c1"] - c[1]))
        sources.update(base_ms="decode fit (base model)", decode_ms_per_seq="decode fit (base model)",
                       lora_base_ms="LoRA decode fit minus the no-LoRA fit (clipped at 0)",
                       lora_ms_per_seq="LoRA decode fit minus the no-LoRA fit (clipped at 0)")
    else:
        step.update(base_ms=lora["c0"], decode_ms_per_seq=lora["c1"], lora_base_ms=0.0, lora_ms_per_seq=0.0)
        sources.update(base_ms="LoRA decode fit (the server served no base-model runs)",
                       decode_ms_per_seq="LoRA decode fit (the server served no base-model runs)",
                       lora_base_ms="0: inside base_ms (no no-LoRA runs to separate it)",
                       lora_ms_per_seq="0: inside decode_ms_per_seq (no no-LoRA runs to separate it)")
    sources["lora_ms_per_adapter"] = "LoRA decode fit, A varied with controlled adapter mixes"
    sources["lora_ms_per_adapter_ktoken"] = ("LoRA decode fit" if fits["lora_decode"]["k_identified"] else
                                             "0: A was varied at one batch size only (not identifiable)")
    sources["lora_rank_slope"] = "0: constants measured at this server's --max-lora-rank"
    step["kv_read_ms_per_ktoken"] = 0.0
    sources["kv_read_ms_per_ktoken"] = ("0: decode measured at one short context (prompt "
                                        f"{meta.get('settings', {}).get('prompt_tokens', '?')} tokens); its attention "
                                        "cost is inside decode_ms_per_seq")

    pre_rows = _rows(cal / "est_default_latency.csv", ("set_input_length", "min_ttft_ms"),
                     ("set_input_length", "min_ttft_ms"), ("prefill", "prefill_lora"))
    lora_pre = [r for r in pre_rows if r["experiment"] == "prefill_lora"]
    base_pre = [r for r in pre_rows if r["experiment"] == "prefill"]
    if not lora_pre:
        raise FitError("est_default_latency.csv has no prefill_lora rows; run the prefill experiment")
    _, s_lora, fits["prefill_lora"] = _slope(lora_pre, "prefill_lora")
    if len(base_pre) >= 2:
        _, s_base, fits["prefill"] = _slope(base_pre, "prefill")
        step.update(prefill_ms_per_token=s_base, lora_ms_per_prefill_token=max(0.0, s_lora - s_base))
        sources.update(prefill_ms_per_token="TTFT slope, base model",
                       lora_ms_per_prefill_token="TTFT slope with an adapter minus the base model's (clipped at 0)")
    else:
        step.update(prefill_ms_per_token=s_lora, lora_ms_per_prefill_token=0.0)
        sources.update(prefill_ms_per_token="TTFT slope with an adapter (no base-model runs)",
                       lora_ms_per_prefill_token="0: inside prefill_ms_per_token")
    fits["prefill_lora"]["form"] = "min_ttft_ms = fixed + slope * prompt_tokens (one request at a time, idle server)"

    sched = {"base_ms": 0.0, "ms_per_running": 0.0, "ms_per_waiting_skipped": 0.0}
    srows = _rows(cal / "est_scheduler_overhead.csv", ("avg_waiting_queue", "mean_itl_ms"), ("mean_itl_ms",))
    if len({r["avg_waiting_queue"] for r in srows}) >= 2:
        w = np.array([r["avg_waiting_queue"] for r in srows])
        y = np.array([r["mean_itl_ms"] for r in srows])
        c = _lstsq(np.c_[np.ones_like(w), w], y)
        # a cost below the noise of the measurement can come out slightly negative: the twin takes >= 0
        sched["ms_per_waiting_skipped"] = max(0.0, float(c[1]))
        fits["scheduler"] = {"form": "itl_ms = itl_0 + ms_per_waiting_skipped * W (max_loras holders + 1 probe "
                                     "running, W requests of other adapters waiting per vllm:num_requests_waiting; "
                                     "itl from vllm:inter_token_latency_seconds while the probe ran)",
                             "source": "est_scheduler_overhead.csv",
                             **_errors(y, c[0] + c[1] * w)}
        sources["scheduler"] = ("base_ms and ms_per_running: 0, inside the step terms (stock vLLM logs no scheduler "
                                "time); ms_per_waiting_skipped: ITL increase per skipped waiting request")
    else:
        sources["scheduler"] = "0: no scheduler experiment (stock vLLM logs no scheduler time)"

    loading: dict[str, dict[str, float]] = {}
    for r in _rows(cal / "est_loading_time.csv", ("adapter_rank", "max_lora_rank", "mean_activation_time_ms")):
        # a load cheaper than the noise of the TTFT difference shows up as a small negative number: clip to 0
        loading.setdefault(str(int(r["max_lora_rank"])), {})[str(int(r["adapter_rank"]))] = \
            max(0.0, r["mean_activation_time_ms"])
    if not loading:
        loading = {str(meta["max_lora_rank"]): {str(meta["max_lora_rank"]): 0.0}}
        sources["loading_ms"] = "not measured (no loading rows): 0"
    else:
        sources["loading_ms"] = "TTFT forcing a load minus TTFT with the adapter resident, per (max rank, rank)"

    kv_rows = _rows(cal / "est_kv_capacity.csv", ("max_loras", "max_lora_rank", "kv_cache_tokens"),
                    ("kv_cache_tokens",))
    if not kv_rows:
        raise FitError("est_kv_capacity.csv has no successful start-up; the server's /metrics had no "
                       "vllm:cache_config_info and no log line")
    table = sorted(({"max_loras": int(r["max_loras"]), "max_lora_rank": int(r["max_lora_rank"]),
                     "kv_cache_tokens": int(r["kv_cache_tokens"])} for r in kv_rows),
                   key=lambda e: (e["max_loras"], e["max_lora_rank"]))
    failed = []
    with (cal / "est_kv_capacity.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            if r.get("status", "ok") not in ("ok", ""):
                failed.append([int(float(r["max_loras"])), int(float(r["max_lora_rank"]))])
    xs = np.array([e["max_loras"] * e["max_lora_rank"] for e in table], float)
    ys = np.array([e["kv_cache_tokens"] for e in table], float)
    if len(set(xs.tolist())) >= 2:
        c, *_ = np.linalg.lstsq(np.c_[np.ones_like(xs), -xs], ys, rcond=None)
        linear = {"intercept": float(c[0]), "tokens_per_slot_rank": max(0.0, float(c[1]))}
    else:
        linear = {"intercept": float(ys.mean()), "tokens_per_slot_rank": 0.0}
    sources["kv_capacity"] = ("vllm:cache_config_info num_gpu_blocks x block_size per start-up; linear law over "
                              "max_loras*max_lora_rank" if len(table) > 1 else
                              "one start-up (vllm:cache_config_info): the same capacity for every configuration")

    server = meta.get("server", {})
    mml = max_model_len or server.get("max_model_len")
    if not mml:
        raise FitError("the server did not report max_model_len; pass --max-model-len")
    sources["client_max_waiting"] = "null: a live server has no client-side cap"
    profile = {
        "schema": 1, "model": model, "gpu": gpu,
        "meta": {"vllm_version": server.get("version", "?"), "engine": "V1", "gpu": gpu,
                 "block_size": server.get("block_size") or 16, "calibration": cal.name,
                 "fitted_by": "adaptwin twin fit (adaptwin.profiler.vllm_profile_fit) from adaptwin profile vllm",
                 "server": {k: server.get(k) for k in ("url", "version", "is_twin", "speedup", "adapters",
                                                       "adapter_ranks", "max_loras")},
                 "profiled_max_loras": meta.get("max_loras"), "profiled_max_lora_rank": meta.get("max_lora_rank"),
                 "notes": meta.get("notes", []), "sources": sources, "fits": fits},
        "step_time": {k: float(v) for k, v in step.items()},
        "scheduler": sched,
        "loading_ms": loading,
        "kv_capacity": {"table": table, "failed": sorted(failed), "linear": linear},
        "limits": {"max_model_len": int(mml), "client_max_waiting": None},
        "families": {"lora": {"compute_scale": 1.0}},
    }
    try:
        Profile.from_dict(json.loads(json.dumps(profile)), path=str(cal))
    except ProfileError as err:
        raise FitError(f"the fitted profile is not usable: {err}") from None
    return profile
