"""Small SVG line charts for the adapter-family benchmark (no plotting dependency: a few lines of SVG suffice).

>>> svg = small_multiples([Panel("rank 8", {"lora": [(1, 10.0), (4, 30.0)]})], "distinct adapters", "overhead %")
>>> svg.startswith("<svg") and "lora" in svg
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

__all__ = ["Panel", "small_multiples", "write_svg"]

COLOURS = {"lora": "#1f77b4", "parallel": "#2ca02c", "series": "#d62728", "fused": "#9467bd"}
_FALLBACK = ("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e", "#1f77b4", "#2ca02c", "#d62728", "#9467bd")
PANEL_W, PANEL_H, PAD_L, PAD_B, PAD_T, PAD_R = 300, 220, 52, 40, 28, 12


@dataclass
class Panel:
    """One chart: a title and named series of (x, y) points; x is drawn on a log2 axis."""

    title: str
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2) if start + i * step <= hi + 1e-9 * step]


def _panel_svg(p: Panel, ox: float, oy: float, y_lo: float, y_hi: float, xlabel: str, ylabel: str,
               colours: dict[str, str]) -> list[str]:
    xs = sorted({x for pts in p.series.values() for x, _ in pts})
    lx = [math.log2(x) for x in xs] or [0.0]
    x_lo, x_hi = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1.0
    pw, ph = PANEL_W - PAD_L - PAD_R, PANEL_H - PAD_T - PAD_B

    def sx(x: float) -> float:
        return ox + PAD_L + (math.log2(x) - x_lo) / (x_hi - x_lo) * pw

    def sy(y: float) -> float:
        return oy + PAD_T + (1.0 - (y - y_lo) / (y_hi - y_lo)) * ph

    out = [f'<text x="{ox + PAD_L + pw / 2:.1f}" y="{oy + 16}" text-anchor="middle" font-weight="bold">'
           f'{escape(p.title)}</text>',
           f'<rect x="{ox + PAD_L}" y="{oy + PAD_T}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in _ticks(y_lo, y_hi):
        out.append(f'<line x1="{ox + PAD_L}" x2="{ox + PAD_L + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{ox + PAD_L - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for x in xs:
        out.append(f'<text x="{sx(x):.1f}" y="{oy + PAD_T + ph + 14}" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{ox + PAD_L + pw / 2:.1f}" y="{oy + PANEL_H - 6}" text-anchor="middle">'
               f'{escape(xlabel)}</text>')
    out.append(f'<text transform="translate({ox + 12},{oy + PAD_T + ph / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f'{escape(ylabel)}</text>')
    for name, pts in p.series.items():
        colour = colours[name]
        pts = sorted(pts)
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
    return out


def small_multiples(panels: list[Panel], xlabel: str, ylabel: str, title: str = "") -> str:
    """Panels side by side with one shared y range and one legend; returns the SVG document."""
    ys = [y for p in panels for pts in p.series.values() for _, y in pts if math.isfinite(y)]
    y_lo, y_hi = (min(0.0, min(ys)), max(ys)) if ys else (0.0, 1.0)
    y_hi = y_hi + 0.05 * (y_hi - y_lo or 1.0)
    names = list(dict.fromkeys(n for p in panels for n in p.series))
    # one colour per series name in every panel and the legend, also when panels hold different series
    colours = {n: COLOURS.get(n, _FALLBACK[i % len(_FALLBACK)]) for i, n in enumerate(names)}
    top = 24 if title else 0
    width, height = PANEL_W * max(len(panels), 1), PANEL_H + top + 24
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        out.append(f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>')
    for i, p in enumerate(panels):
        out += _panel_svg(p, i * PANEL_W, top, y_lo, y_hi, xlabel, ylabel, colours)
    for i, name in enumerate(names):
        x = PAD_L + i * 90
        out.append(f'<rect x="{x}" y="{height - 16}" width="12" height="4" fill="{colours[name]}"/>')
        out.append(f'<text x="{x + 16}" y="{height - 11}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_svg(path: str | Path, svg: str) -> Path:
    path = Path(path)
    path.write_text(svg)
    return path
