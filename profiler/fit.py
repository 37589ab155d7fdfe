"""Fit a twin profile (``twin/profiles/<gpu>__<model>.json``) from profiling CSVs (``adaptwin twin fit``).

Input: the folder of calibration CSVs (``est_default_latency.csv``, ``est_latency_overhead.csv``,
``est_loading_time.csv``, ``est_kv_capacity.csv``, ``est_scheduler_overhead.csv``, optionally
``estimator_constants.json``). Every fit is numpy least squares; each one's error on its own points is stored in
the profile's ``meta.fits`` so the number a reader sees is the number the fit made. docs/twin.md explains each form.

Terms that the profiling runs cannot identify (the LoRA cost of prefill tokens, the rank dependence) can be set from
real runs with ``--real-params FILE`` (a JSON with those fields, written by ``benchmarks/twin_fidelity.py --fit``,
which reports their leave-one-workload-out error); without it they are 0.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("adaptwin.profiler.fit")

__all__ = ["fit_profile", "write_profile", "FitError"]

#: what the CSVs do not say: the model's default context (vLLM refuses to start when KV < max_model_len).
DEFAULT_MAX_MODEL_LEN = {"llama-3.1-8b-instruct": 131072, "qwen-2.5-7b-instruct": 32768}
#: mean prompt tokens of the ShareGPT pool (twin/lengths), used to estimate prefill work in the scheduler runs.
POOL_MEAN_PROMPT = 221.0
#: mean context a decoding ShareGPT request attends to (prompt + output/2, weighted by output: twin/lengths)
POOL_DECODE_CONTEXT = 362.0
#: the GPU measurement that prices attention over the context (decode ITL vs context length at a fixed batch)
KV_READ_SOURCE = Path(__file__).resolve().parent / "measured" / "h100" / "gpu_profile_fragment.json"


class FitError(ValueError):
    """The calibration data cannot support a fit (missing file, too few points)."""


def _read(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FitError(f"calibration file {path} is missing")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _f(row: dict[str, str], key: str) -> float:
    v = row.get(key, "")
    return float(v) if v not in ("", None) else math.nan


def _lstsq(x: np.ndarray, y: np.ndarray, nonneg: bool = True) -> np.ndarray:
    """Least squares; with ``nonneg`` a coefficient that comes out negative is pinned at 0 and the rest refitted."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if not nonneg or (sol >= 0).all():
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


def _errors(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    err = p - y
    return {"n": int(y.size), "rmse": float(np.sqrt(np.mean(err ** 2))), "max_abs": float(np.max(np.abs(err))),
            "mape_pct": float(100 * np.mean(np.abs(err) / np.abs(y))),
            "r2": float(1 - np.sum(err ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-12))}


def kv_read_term(model: str, source: Path | None = KV_READ_SOURCE) -> tuple[float, dict]:
    """Attention cost per 1000 context tokens of a decode step (ms), from a GPU measurement of decode ITL against
    context length at a fixed batch (``profiler/gpu_measure.py``); 0 when no measurement is there."""
    if source is None:
        return 0.0, {"form": "off: 0 (the measured value is in profiler/measured/h100; docs/twin.md §Fidelity)"}
    if not Path(source).is_file():
        return 0.0, {"form": "not measured: 0", "source": str(source)}
    frag = json.loads(Path(source).read_text())
    m = frag.get("models", {}).get(model, {})
    dvc = m.get("default_latency", {}).get("decode_vs_context")
    batch = m.get("attention", {}).get("decode_probe_shape", {}).get("batch", 64)
    if not dvc:
        return 0.0, {"form": "not measured: 0", "source": str(source)}
    per_ktoken = float(dvc["constant_0"]) / batch * 1000.0
    return per_ktoken, {
        "form": "kv_read_ms_per_ktoken = d(ITL)/d(context) at batch B / B * 1000 (decode attention reads every "
                "context token's K and V once per step: memory-bound, linear in the batch's context tokens)",
        "source": f"{Path(source).parent.name}/{Path(source).name} ({frag.get('metadata', {}).get('gpu_name', '?')}, "
                  f"torch, contiguous KV; batch {batch})", "r2": float(dvc.get("r2", math.nan)),
        "n": int(dvc.get("n_points", 0))}


#: candidate knees of the decode fit (decoding requests): the fit keeps the one with the smallest RMSE
DECODE_KNEES = tuple(range(100, 451, 50))


def decode_ms(decode: dict, n):
    """The non-LoRA decode step of :func:`fit_decode`'s terms at ``n`` decoding requests (array or float)."""
    above = np.maximum(0.0, n - decode.get("decode_knee_seqs", 0.0))
    return decode["base_ms"] + decode["decode_ms_per_seq"] * n + decode.get("decode_ms_per_seq_above_knee", 0.0) * above


def fit_decode(rows: list[dict], model: str, kv_read: float = 0.0) -> tuple[dict, dict]:
    """``ITL = base + decode·N + above_knee·max(0, N − knee) + kv_read·N·context``: the decode runs (prompt of I
    tokens, O output tokens) hold a mean context of I + (O+1)/2 tokens per request, so their attention share is removed
    before the fit — the twin prices the context of its own requests (ShareGPT: ~360 tokens) with
    ``kv_read_ms_per_ktoken``.
    A small batch is bound by reading the weights and a large one by compute, so the cost per sequence rises past a
    knee: a straight line is ~1 ms high between 170 and 370 sequences on both models. The knee is the one of
    :data:`DECODE_KNEES` with the smallest RMSE; none when no knee beats the line."""
    pts = [r for r in rows if r["model"] == model and r["experiment"] == "decode" and r["status"] == "ok"]
    if len(pts) < 3:
        raise FitError(f"est_default_latency.csv has {len(pts)} decode points for {model}; need >= 3")
    n = np.array([_f(r, "mean_batch_size") for r in pts])
    ctx = np.array([_f(r, "set_input_length") + (_f(r, "set_output_length") + 1) / 2 for r in pts])
    attn = kv_read * 1e-3 * n * ctx
    y = np.array([_f(r, "mean_itl_ms") for r in pts])

    def rmse(terms: dict) -> float:
        return float(np.sqrt(np.mean((decode_ms(terms, n) + attn - y) ** 2)))

    c = _lstsq(np.c_[np.ones_like(n), n], y - attn)
    terms = {"base_ms": c[0], "decode_ms_per_seq": c[1], "decode_knee_seqs": 0.0, "decode_ms_per_seq_above_knee": 0.0}
    line_rmse = rmse(terms)
    for knee in DECODE_KNEES if len(pts) >= 5 else ():
        c = _lstsq(np.c_[np.ones_like(n), n, np.maximum(0.0, n - knee)], y - attn)
        kneed = {"base_ms": c[0], "decode_ms_per_seq": c[1], "decode_knee_seqs": float(knee),
                 "decode_ms_per_seq_above_knee": c[2]}
        if c[2] > 0 and rmse(kneed) < rmse(terms):
            terms = kneed
    return (terms,
            {"form": "itl_ms = base_ms + decode_ms_per_seq * N + decode_ms_per_seq_above_knee * max(0, N - "
                     "decode_knee_seqs) + kv_read * N * context (no LoRA, N = mean batch size, context = input + "
                     "(output+1)/2; knee from " + ", ".join(map(str, DECODE_KNEES)) + ", smallest RMSE)",
             "source": "est_default_latency.csv experiment=decode", "straight_line_rmse": line_rmse,
             **_errors(y, decode_ms(terms, n) + attn)})


def fit_prefill(rows: list[dict], model: str) -> tuple[dict, dict]:
    pts = [r for r in rows if r["model"] == model and r["experiment"] == "prefill" and r["status"] == "ok"]
    if len(pts) < 2:
        raise FitError(f"est_default_latency.csv has {len(pts)} prefill points for {model}; need >= 2")
    tok = np.array([_f(r, "total_input_tokens") for r in pts])
    dur = np.array([_f(r, "duration") for r in pts]) * 1000.0
    coef = _lstsq(np.c_[np.ones_like(tok), tok], dur)
    return ({"prefill_ms_per_token": coef[1]},
            {"form": "benchmark_duration_ms = fixed + prefill_ms_per_token * total_input_tokens "
                     "(all prompts sent at once, output 1 token: the server runs full prefill steps back to back)",
             "source": "est_default_latency.csv experiment=prefill", **_errors(dur, coef[0] + coef[1] * tok)})


def fit_lora(rows: list[dict], sched_rows: list[dict], model: str, decode: dict, prefill: dict,
             kv_read: float = 0.0) -> tuple[dict, dict]:
    """LoRA cost above the no-LoRA step: ``lora_base + lora_seq·N + lora_adapter·A`` (ms).

    Points: the overhead runs (N≈200 decodes, A = distinct adapters per step from the server log) and the light-load
    runs of the scheduler study (no queue, N < 30), which pin the intercept the overhead runs cannot separate from N.
    """
    per_tok = prefill["prefill_ms_per_token"]
    xs, ys, tags = [], [], []
    for r in rows:
        if r["model"] != model or r["experiment"] != "overhead_small" or r["status"] != "ok":
            continue
        a = _f(r, "mean_loras_by_batch")
        if math.isnan(a):
            continue
        n = _f(r, "mean_batch_size")
        attn = kv_read * 1e-3 * n * (_f(r, "set_input_length") + (_f(r, "set_output_length") + 1) / 2)
        xs.append((1.0, n, a)); ys.append(_f(r, "mean_itl_ms") - (decode_ms(decode, n) + attn)); tags.append("overhead")
    for r in sched_rows:
        n, w, a = _f(r, "avg_batch_size"), _f(r, "avg_waiting_queue"), _f(r, "mean_loras_by_batch")
        if not (w < 1.0 and n < 30 and a > 0 and _f(r, "steps") > 0):
            continue
        prefill_ms = _f(r, "completed_requests") * POOL_MEAN_PROMPT * per_tok / _f(r, "steps")
        attn = kv_read * 1e-3 * n * POOL_DECODE_CONTEXT
        xs.append((1.0, n, a)); ys.append(_f(r, "mean_itl_ms") - (decode_ms(decode, n) + attn) - prefill_ms)
        tags.append("light")
    if len(xs) < 4:
        raise FitError(f"too few LoRA overhead points for {model} ({len(xs)})")
    x, y = np.array(xs), np.array(ys)
    coef = _lstsq(x, y)
    p = x @ coef
    tags_a = np.array(tags)
    return ({"lora_base_ms": coef[0], "lora_ms_per_seq": coef[1], "lora_ms_per_adapter": coef[2]},
            {"form": "itl_ms - no_lora_step(N) = lora_base_ms + lora_ms_per_seq*N + lora_ms_per_adapter*A",
             "source": "est_latency_overhead.csv (overhead_small with server log) + est_scheduler_overhead.csv "
                       "(no queue, N<30; model not recorded there, taken as representative)",
             "overhead_points": _errors(y[tags_a == "overhead"] + 0, p[tags_a == "overhead"]),
             "light_points": _errors(y[tags_a == "light"] + 0, p[tags_a == "light"]) if (tags_a == "light").any() else {},
             **{k: v for k, v in _errors(y, p).items() if k in ("n", "rmse", "max_abs")}})


def fit_scheduler(rows: list[dict]) -> tuple[dict, dict]:
    x, y = [], []
    for r in rows:
        g, c = _f(r, "gpu_loras"), _f(r, "cpu_loras")
        skipped = _f(r, "avg_waiting_queue") * max(0.0, 1.0 - g / c) if c > 0 else 0.0
        x.append((1.0, _f(r, "avg_batch_size"), skipped)); y.append(_f(r, "scheduling_time_per_step_ms"))
    xa, ya = np.array(x), np.array(y)
    ok = np.isfinite(xa).all(axis=1) & np.isfinite(ya)
    coef = _lstsq(xa[ok], ya[ok])
    err = _errors(ya[ok], xa[ok] @ coef)
    err.pop("mape_pct")
    return ({"base_ms": coef[0], "ms_per_running": coef[1], "ms_per_waiting_skipped": coef[2]},
            {"form": "sched_ms = base_ms + ms_per_running*N + ms_per_waiting_skipped*W*max(0, 1 - max_loras/served)",
             "source": "est_scheduler_overhead.csv (788 runs, rank 8)", **err})


def fit_loading(rows: list[dict], model: str) -> tuple[dict, dict]:
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["model"] != model or r["status"] != "ok":
            continue
        table.setdefault(str(int(_f(r, "max_lora_rank"))), {})[str(int(_f(r, "adapter_rank")))] = _f(r, "mean_activation_time_ms")
    if not table:
        raise FitError(f"est_loading_time.csv has no points for {model}")
    return table, {"form": "lookup [max_lora_rank][adapter_rank], ms per CPU->GPU activation (measured means)",
                   "source": "est_loading_time.csv", "n": sum(len(v) for v in table.values())}


def fit_kv(rows: list[dict], model: str) -> tuple[dict, dict]:
    table, failed, xs, ys = [], [], [], []
    for r in rows:
        if r["model"] != model:
            continue
        ml, mr = int(_f(r, "max_loras")), int(_f(r, "max_lora_rank"))
        if r["status"] == "ok":
            table.append({"max_loras": ml, "max_lora_rank": mr, "kv_cache_tokens": int(_f(r, "kv_cache_tokens"))})
            xs.append(ml * mr); ys.append(_f(r, "kv_cache_tokens"))
        else:
            failed.append([ml, mr])
    if len(xs) < 2:
        raise FitError(f"est_kv_capacity.csv has {len(xs)} successful start-ups for {model}; need >= 2")
    x, y = np.array(xs, float), np.array(ys)
    coef, *_ = np.linalg.lstsq(np.c_[np.ones_like(x), -x], y, rcond=None)
    table.sort(key=lambda e: (e["max_loras"], e["max_lora_rank"]))
    return ({"table": table, "failed": sorted(failed),
             "linear": {"intercept": float(coef[0]), "tokens_per_slot_rank": float(coef[1])}},
            {"form": "measured table; elsewhere kv_tokens = intercept - tokens_per_slot_rank*max_loras*max_lora_rank",
             "source": "est_kv_capacity.csv", **_errors(y, coef[0] - coef[1] * x)})


def fit_profile(calibration: str | Path, model: str, gpu: str = "h100-64gb", *,
                max_model_len: int | None = None, real_params: dict[str, Any] | None = None,
                kv_read_source: Path | None = None) -> dict[str, Any]:
    """The profile dict for ``model`` from the CSVs in ``calibration`` (see the module docstring)."""
    cal = Path(calibration)
    if not cal.is_dir():
        raise FitError(f"calibration folder {cal} does not exist")
    if (cal / "profile_vllm.json").is_file():  # written by `adaptwin profile vllm`: stock-vLLM forms, own module
        from adaptwin.profiler.vllm_profile_fit import fit_vllm_profile

        return fit_vllm_profile(cal, model, gpu, max_model_len=max_model_len)
    lat = _read(cal / "est_default_latency.csv")
    if not any(r["model"] == model for r in lat):
        known = sorted({r["model"] for r in lat})
        raise FitError(f"no calibration data for model {model!r} in {cal}; it has {', '.join(known)}")
    sched_rows = _read(cal / "est_scheduler_overhead.csv")
    # The attention term is measured (kv_read_source=KV_READ_SOURCE) but off in the shipped profiles: with the LoRA
    # terms fitted on the real runs' gauges it made the cross-validated throughput worse (docs/twin.md §Fidelity).
    # A real-params file can set it ("kv_read_ms_per_ktoken"); the decode fit then prices it too.
    if kv_read_source is None and "kv_read_ms_per_ktoken" in (real_params or {}):
        kv_read, kv_read_fit = float(real_params["kv_read_ms_per_ktoken"]), {"form": "set by --real-params"}
    else:
        kv_read, kv_read_fit = kv_read_term(model, kv_read_source)
    decode, decode_fit = fit_decode(lat, model, kv_read)
    prefill, prefill_fit = fit_prefill(lat, model)
    lora, lora_fit = fit_lora(_read(cal / "est_latency_overhead.csv"), sched_rows, model, decode, prefill, kv_read)
    sched, sched_fit = fit_scheduler(sched_rows)
    loading, loading_fit = fit_loading(_read(cal / "est_loading_time.csv"), model)
    kv, kv_fit = fit_kv(_read(cal / "est_kv_capacity.csv"), model)
    client_cap, client_src = 25500, "paper twin's network-collapse cap (estimator_constants.json)"
    consts = cal / "estimator_constants.json"
    if consts.is_file():
        fixed = json.loads(consts.read_text()).get("twin_fixed_parameters", {})
        client_cap = int(fixed.get("network_collapse_waiting_cap_training_grid", client_cap))
    mml = max_model_len or DEFAULT_MAX_MODEL_LEN.get(model)
    if mml is None:
        raise FitError(f"max_model_len of {model!r} is not known; pass --max-model-len")
    real = dict(real_params or {})
    early_stop = float(real.pop("early_stop_fraction", 0.0))
    step = {**decode, **prefill, **lora,
            "lora_ms_per_prefill_token": float(real.pop("lora_ms_per_prefill_token", 0.0)),
            "lora_ms_per_adapter_ktoken": float(real.pop("lora_ms_per_adapter_ktoken", 0.0)),
            "lora_rank_slope": float(real.pop("lora_rank_slope", 0.0)), "kv_read_ms_per_ktoken": kv_read}
    for key in list(real):
        if key in step:
            step[key] = float(real.pop(key))
    sources = {
        "base_ms": "decode fit", "decode_ms_per_seq": "decode fit", "decode_knee_seqs": "decode fit",
        "decode_ms_per_seq_above_knee": "decode fit", "prefill_ms_per_token": "prefill fit",
        "kv_read_ms_per_ktoken": "GPU measurement (kv_read fit)" if kv_read else "off: 0 (see fits.kv_read)",
        **{k: ("real runs (--real-params), replacing the lora fit" if real_params and k in real_params else "lora fit")
           for k in ("lora_base_ms", "lora_ms_per_seq", "lora_ms_per_adapter")},
        "lora_ms_per_prefill_token": "real runs (--real-params)" if real_params and "lora_ms_per_prefill_token" in real_params else "not identifiable from profiling: 0",
        "lora_rank_slope": "real runs (--real-params)" if real_params and "lora_rank_slope" in real_params else "not identifiable from profiling: 0",
        "lora_ms_per_adapter_ktoken": "real runs (--real-params)" if real_params and "lora_ms_per_adapter_ktoken" in real_params else "not identifiable from profiling: 0",
        "scheduler": "scheduler fit", "loading_ms": "loading table", "kv_capacity": "kv table + linear fit",
        "client_max_waiting": client_src, "max_model_len": "model config (Llama-3.1: 128k, Qwen-2.5: 32k)",
    }
    if "lora_adapter_rank_scale" in real:  # twin_fidelity --rank-form adapter-blocks
        step["lora_adapter_rank_scale"] = float(real.pop("lora_adapter_rank_scale"))
        sources["lora_adapter_rank_scale"] = "real runs (--real-params): fitted on their served runs"
    for key in [k for k in real if k.startswith("lora_rank_block_")]:  # twin_fidelity --rank-form kernel
        step[key] = float(real.pop(key))
        sources[key] = "LoRA-kernel measurement (profiler/gpu_lora_kernels.py), via --real-params"
    if real_params:
        sources["real_params"] = {k: v for k, v in real_params.items()}
    return {
        "schema": 1, "model": model, "gpu": gpu,
        "meta": {"vllm_version": "0.8.5", "engine": "V1", "gpu": "NVIDIA H100 64GB (63.43 GiB)", "dtype": "bfloat16",
                 "gpu_memory_utilization": 0.9, "block_size": 16, "max_num_batched_tokens": 2048,
                 "max_num_seqs": 2048, "prefix_caching": False, "calibration": str(cal.name),
                 "fitted_by": "adaptwin twin fit (adaptwin.profiler.fit)", "sources": sources,
                 "fits": {"kv_read": kv_read_fit, "decode": decode_fit, "prefill": prefill_fit, "lora": lora_fit, "scheduler": sched_fit,
                          "loading": loading_fit, "kv_capacity": kv_fit}},
        "step_time": {k: float(v) for k, v in step.items()},
        "scheduler": {k: float(v) for k, v in sched.items()},
        "loading_ms": loading,
        "kv_capacity": kv,
        "limits": {"max_model_len": int(mml), "client_max_waiting": client_cap},
        "families": {"lora": {"compute_scale": 1.0}},
        "generation": {"early_stop_fraction": early_stop,
                       "source": "real runs (--real-params): output tokens generated / max_tokens sent"
                       if "early_stop_fraction" in (real_params or {}) else "not measured: 0"},
    }


def write_profile(profile: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_round(profile), indent=1, sort_keys=False) + "\n")
    return out


def _round(obj: Any) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.8g}")
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v) for v in obj]
    return obj
