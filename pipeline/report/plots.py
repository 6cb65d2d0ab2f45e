"""Small inline SVG plots: a metric against epoch (with val/acc on a second axis) and a metric against a
hyper-parameter. SVG text in the page costs a few hundred bytes per plot, needs no plotting library at report time
and stays sharp at any zoom; each point carries a <title> tooltip with its exact value."""
from __future__ import annotations

import math
from typing import Sequence

from pipeline.report.page import esc, fmt

W, H = 250, 150
LEFT, RIGHT, TOP, BOTTOM = 44, 30, 20, 22
BLUE, GREY = "#0969da", "#8c959f"


def _range(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 0.5
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.08
    return lo - pad, hi + pad


def _tick(v: float) -> str:
    if v == 0 or 0.01 <= abs(v) < 1e4:
        return f"{v:.3g}"
    return f"{v:.1e}"


def _frame(title: str, x_lo: float, x_hi: float, y_lo: float, y_hi: float, x_label: str,
           right: tuple[float, float, str] | None = None, x_ticks: list[tuple[float, str]] | None = None) -> list[str]:
    """Axes, ticks and labels; `x_ticks` (position, text) replace the numeric end ticks (categories)."""
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    out = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="sans-serif" font-size="9">',
           f'<text x="{W / 2}" y="12" text-anchor="middle" font-size="10" font-weight="600">{esc(title)}</text>',
           f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#d0d7de"/>']
    for frac in (0.0, 0.5, 1.0):
        y = TOP + ph * (1 - frac)
        out.append(f'<text x="{LEFT - 3}" y="{y + 3:.1f}" text-anchor="end" fill="{BLUE}">'
                   f'{_tick(y_lo + frac * (y_hi - y_lo))}</text>')
        if frac == 0.5:
            out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>')
        if right:
            out.append(f'<text x="{LEFT + pw + 3}" y="{y + 3:.1f}" fill="{GREY}">'
                       f'{_tick(right[0] + frac * (right[1] - right[0]))}</text>')
    if x_ticks is None:
        out.append(f'<text x="{LEFT}" y="{H - 6}" fill="#57606a">{_tick(x_lo)}</text>')
        out.append(f'<text x="{LEFT + pw}" y="{H - 6}" text-anchor="end" fill="#57606a">{_tick(x_hi)}</text>')
        out.append(f'<text x="{LEFT + pw / 2}" y="{H - 6}" text-anchor="middle" fill="#57606a">{esc(x_label)}</text>')
    else:
        for pos, text in x_ticks:
            x = LEFT + (0.5 if x_hi == x_lo else (pos - x_lo) / (x_hi - x_lo)) * pw
            out.append(f'<text x="{x:.1f}" y="{H - 6}" text-anchor="middle" fill="#57606a">{esc(text[:14])}</text>')
    if right:
        out.append(f'<text x="{W - 2}" y="{TOP - 4}" text-anchor="end" fill="{GREY}">{esc(right[2])}</text>')
    return out


def _xy(x, y, x_lo, x_hi, y_lo, y_hi) -> tuple[float, float]:
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    fx = 0.5 if x_hi == x_lo else (x - x_lo) / (x_hi - x_lo)
    return LEFT + fx * pw, TOP + ph * (1 - (y - y_lo) / (y_hi - y_lo))


def epoch_plot(title: str, points: dict[int, float], reference: dict[int, float] | None = None,
               reference_name: str = "val/acc") -> str:
    """`title` against epoch (blue, left axis) with `reference` (grey, right axis, 0..1 when it fits)."""
    pts = sorted((e, v) for e, v in points.items() if v is not None and math.isfinite(v))
    if not pts:
        return ""
    ref = sorted((e, v) for e, v in (reference or {}).items() if v is not None and math.isfinite(v))
    epochs = [e for e, _ in pts] + [e for e, _ in ref]
    x_lo, x_hi = min(epochs), max(epochs)
    y_lo, y_hi = _range([v for _, v in pts])
    r_lo, r_hi = (0.0, 1.0) if ref and all(0 <= v <= 1 for _, v in ref) else (_range([v for _, v in ref]) if ref
                                                                            else (0.0, 1.0))
    out = _frame(title, x_lo, x_hi, y_lo, y_hi, "epoch", (r_lo, r_hi, reference_name) if ref else None)
    if len(ref) > 1:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (_xy(e, v, x_lo, x_hi, r_lo, r_hi) for e, v in ref))
        out.append(f'<polyline points="{path}" fill="none" stroke="{GREY}" stroke-dasharray="3,2"/>')
    if len(pts) > 1:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (_xy(e, v, x_lo, x_hi, y_lo, y_hi) for e, v in pts))
        out.append(f'<polyline points="{path}" fill="none" stroke="{BLUE}" stroke-width="1.5"/>')
    for e, v in pts:
        x, y = _xy(e, v, x_lo, x_hi, y_lo, y_hi)
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="{BLUE}"><title>epoch {e}: {fmt(v)}</title>'
                   f'</circle>')
    out.append("</svg>")
    return "".join(out)


def param_plot(title: str, param: str, points: list[tuple[object, float, str]]) -> str:
    """A metric against one hyper-parameter: (value, metric, job label) per job. Numeric values on a linear axis
    (joined in order), anything else as evenly spaced categories."""
    pts = [(x, y, lab) for x, y, lab in points if y is not None and math.isfinite(y)]
    if not pts:
        return ""
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _, _ in pts)
    if numeric:
        xs = [float(x) for x, _, _ in pts]
        cats: list[str] = []
    else:
        cats = list(dict.fromkeys(str(x) for x, _, _ in pts))
        xs = [float(cats.index(str(x))) for x, _, _ in pts]
    x_lo, x_hi = min(xs), max(xs)
    if numeric or len(cats) > 1:
        pad = (x_hi - x_lo) * 0.08 or 0.5
        x_lo, x_hi = x_lo - pad, x_hi + pad
    else:
        x_lo, x_hi = -0.5, 0.5
    y_lo, y_hi = _range([y for _, y, _ in pts])
    if cats:
        ticks = [(float(i), c) for i, c in enumerate(cats)]
    else:  # the swept values themselves, when there are few of them
        values = sorted({(float(x), str(x)) for x, _, _ in pts})
        ticks = values if len(values) <= 5 else None
    out = _frame(title, x_lo, x_hi, y_lo, y_hi, param, x_ticks=ticks)   # the group heading names the parameter
    if numeric and len(pts) > 1:
        line = sorted(zip(xs, (y for _, y, _ in pts)))
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in (_xy(x, y, x_lo, x_hi, y_lo, y_hi) for x, y in line))
        out.append(f'<polyline points="{path}" fill="none" stroke="{BLUE}" stroke-opacity="0.5"/>')
    for x, (raw, y, lab) in zip(xs, pts):
        px, py = _xy(x, y, x_lo, x_hi, y_lo, y_hi)
        out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{BLUE}"><title>{esc(lab)}: {esc(param)}='
                   f'{esc(raw)}, {fmt(y)}</title></circle>')
    out.append("</svg>")
    return "".join(out)
