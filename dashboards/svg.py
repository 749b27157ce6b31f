"""Tiny inline-SVG charts for the offline preview: lines, horizontal bars, heat and state strips.

Pure functions from numbers to SVG text; no library, no script. Every chart is `W` x `H` units and
scales to its box. Series are `(name, colour, [(x, y | None)...])` with x in Unix milliseconds;
legends are left to the page (HTML wraps long names better than SVG).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Final

W: Final = 560
H: Final = 200
PAD: Final = 36
PALETTE: Final = ("#3274d9", "#e0752d", "#56a64b", "#e02f44", "#8f3bb8", "#f2cc0c", "#1f9fb0", "#a16629")
STATE_COLORS: Final = {0: "#56a64b", 1: "#ff9830", 2: "#e02f44", 3: "#8e8e8e"}

Point = tuple[float, float | None]
Series = tuple[str, str, Sequence[Point]]
COLORS: Final = {"green": "#56a64b", "red": "#e02f44", "orange": "#ff9830", "blue": "#3274d9",
                 "yellow": "#f2cc0c", "purple": "#8f3bb8"}
"""Grafana's named colours used by the boards' overrides."""


def color(name: str | None, index: int) -> str:
    """A Grafana colour name as hex, or the palette's `index`-th colour."""
    return COLORS.get(name or "", name or "") or PALETTE[index % len(PALETTE)]


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def number(value: float | None, unit: str | None = None) -> str:
    """A short human number in the panel's unit (the few units the boards use)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if unit == "percentunit":
        return f"{100 * value:.1f}%"
    suffix = {"watt": " W", "kwatth": " kWh", "celsius": " °C", "s": " s", "bytes": " B", "MHz": " MHz"}.get(
        unit or "", (unit or "").removeprefix("suffix:") if (unit or "").startswith("suffix:") else "")
    magnitude = abs(value)
    for size, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= size and unit != "celsius":
            return f"{value / size:.3g}{prefix}{suffix}"
    return f"{value:.3g}{suffix}"


def _frame(body: str, height: int = H) -> str:
    return f'<svg viewBox="0 0 {W} {height}" xmlns="http://www.w3.org/2000/svg" role="img">{body}</svg>'


def lines(series: Sequence[Series], unit: str | None = None, marks: Sequence[float] = (),
          bars: bool = False) -> str:
    """A line (or, for `bars`, a stem per point) per series over a shared time axis; `marks` are
    horizontal threshold lines. Sparse series get a dot per point so a single point shows."""
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts if y is not None] + list(marks)
    if not xs or not ys:
        return _frame('<text x="10" y="20">no numbers</text>')
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, *ys), max(ys)
    y1 = y1 if y1 > y0 else y0 + 1

    def sx(x: float) -> float:
        return PAD + (x - x0) / ((x1 - x0) or 1) * (W - 2 * PAD)

    def sy(y: float) -> float:
        return H - 16 + (y0 - y) / (y1 - y0) * (H - 32)

    parts = [f'<line x1="{PAD}" y1="{sy(y0):.1f}" x2="{W - PAD}" y2="{sy(y0):.1f}" stroke="#999"/>',
             f'<text x="2" y="{sy(y1) + 4:.1f}" font-size="10">{_esc(number(y1, unit))}</text>',
             f'<text x="2" y="{sy(y0):.1f}" font-size="10">{_esc(number(y0, unit))}</text>']
    for m in marks:
        parts.append(f'<line x1="{PAD}" y1="{sy(m):.1f}" x2="{W - PAD}" y2="{sy(m):.1f}" stroke="#e02f44" '
                     f'stroke-dasharray="4 3"><title>{_esc(number(m, unit))}</title></line>')
    for name, hue, pts in series:
        shown = [(sx(x), sy(y), y) for x, y in pts if y is not None]
        if bars:
            parts.extend(f'<line x1="{x:.1f}" y1="{sy(y0):.1f}" x2="{x:.1f}" y2="{y:.1f}" stroke="{hue}" '
                         f'stroke-width="3"><title>{_esc(name)}: {_esc(number(v, unit))}</title></line>'
                         for x, y, v in shown if v)
            continue
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in shown)
        parts.append(f'<polyline fill="none" stroke="{hue}" stroke-width="1.5" points="{points}">'
                     f"<title>{_esc(name)}</title></polyline>")
        if len(shown) <= 30:
            parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{hue}"><title>{_esc(name)}: '
                         f"{_esc(number(v, unit))}</title></circle>" for x, y, v in shown)
    return _frame("".join(parts))


def bars(items: Sequence[tuple[str, Sequence[float | None]]], names: Sequence[str], colors: Sequence[str],
         unit: str | None = None) -> str:
    """Horizontal bars, one row per item, stacked when an item has several values (waterfall-style);
    the label shows each value."""
    totals = [sum(v or 0 for v in values) for _, values in items]
    top = max([*totals, 0.0]) or 1.0
    row = 22
    height = max(row * len(items) + 10, 40)
    parts = []
    for r, (label, values) in enumerate(items):
        x = 150.0
        y = 5 + r * row
        parts.append(f'<text x="4" y="{y + 14}" font-size="11">{_esc(str(label)[:24])}</text>')
        for i, v in enumerate(values):
            width = max(0.0, (v or 0) / top * (W - 320))
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{row - 6}" '
                         f'fill="{colors[i]}"><title>{_esc(names[i])}: {_esc(number(v, unit))}</title></rect>')
            x += width
        shown = " / ".join(number(v, unit) for v in values)
        parts.append(f'<text x="{x + 4:.1f}" y="{y + 14}" font-size="11">{_esc(shown)}</text>')
    return _frame("".join(parts), height)


def heat(series: Sequence[Series], unit: str | None = None, states: bool = False) -> str:
    """One strip per series; colour by value (0..max) or, for `states`, by health state."""
    xs = sorted({x for _, _, pts in series for x, _ in pts})
    if not xs:
        return _frame('<text x="10" y="20">no points</text>')
    top = max([y for _, _, pts in series for _, y in pts if y is not None] + [1e-9])
    row = 16
    height = max(row * len(series) + 10, 40)
    step = (W - 160) / len(xs)
    index = {x: i for i, x in enumerate(xs)}
    parts = []
    for r, (name, _, pts) in enumerate(series):
        y = 5 + r * row
        parts.append(f'<text x="4" y="{y + 12}" font-size="10">{_esc(name[:24])}</text>')
        for x, v in pts:
            if v is None:
                continue
            if states:
                fill = STATE_COLORS.get(int(v), "#8e8e8e")
            else:
                fill = f"rgba(224,117,45,{0.1 + 0.9 * max(0.0, min(1.0, v / top)):.2f})"
            parts.append(f'<rect x="{150 + index[x] * step:.1f}" y="{y}" width="{step + 0.5:.1f}" '
                         f'height="{row - 3}" fill="{fill}"><title>{_esc(number(v, unit))}</title></rect>')
    return _frame("".join(parts), height)
