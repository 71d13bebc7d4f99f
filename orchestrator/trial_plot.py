"""The per-trial figure logged to MLflow: robust accuracy against ε_test, ε_train marked.

Written as a hand-made SVG rather than with matplotlib: importing matplotlib in every Ray worker
(~0.4 s) and drawing a PNG (~70 ms) dominated the orchestration overhead of short trials, while the
string below takes under a millisecond and MLflow's artifact viewer previews SVG. The study-level
report (orchestrator.report) still uses matplotlib; only this small, fixed-layout figure is drawn here.
"""
from __future__ import annotations

import math
import numbers
import re

WIDTH, HEIGHT = 500, 350
# The axes box, in pixels, with room for the title above and tick and axis labels left and below.
LEFT, RIGHT, TOP, BOTTOM = 62, 485, 32, 300
# matplotlib's tab10, so the figure reads like the study report's.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
DASH = "6,3"
FONT = "DejaVu Sans, Arial, Helvetica, sans-serif"
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")  # not allowed in XML 1.0 even when escaped


def trial_curve_svg(records: list[dict], config: dict) -> str:
    """The figure as SVG text: a line per norm (and per defence and attack), ε_train dashed."""
    series = _series(records, config)
    eps_train = _number(config.get("eps_train"))
    xs = [x for _, points, *_ in series for x, _ in points] + ([eps_train] if eps_train is not None else [])
    lo, hi = min([0.0, *xs]), max([0.0, *xs])
    if hi - lo < 1e-12:  # nothing to span (no points, or everything at one ε): show a unit range
        hi = lo + 1.0
    pad = 0.05 * (hi - lo)  # matplotlib's default margin, so end points are not on the frame
    lo, hi = lo - pad, hi + pad

    def px(x):
        return LEFT + (x - lo) / (hi - lo) * (RIGHT - LEFT)

    def py(y):
        return BOTTOM - y * (BOTTOM - TOP)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="{FONT}">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           # Curves stay inside the axes (plus a marker's radius), whatever the values.
           f'<clipPath id="axes"><rect x="{LEFT - 4}" y="{TOP - 4}" width="{RIGHT - LEFT + 8}" '
           f'height="{BOTTOM - TOP + 8}"/></clipPath>']
    grid = ['<g class="grid" stroke="#e5e5e5" stroke-width="1">']
    xticks, yticks = ['<g class="xticks" font-size="10">'], ['<g class="yticks" font-size="10">']
    for x in _nice_ticks(lo, hi):
        grid.append(f'<line x1="{_f(px(x))}" y1="{TOP}" x2="{_f(px(x))}" y2="{BOTTOM}"/>')
        xticks.append(f'<line x1="{_f(px(x))}" y1="{BOTTOM}" x2="{_f(px(x))}" y2="{BOTTOM + 4}" stroke="black"/>'
                      f'<text x="{_f(px(x))}" y="{BOTTOM + 16}" text-anchor="middle">{_g(x)}</text>')
    for i in range(6):
        y = i / 5
        grid.append(f'<line x1="{LEFT}" y1="{_f(py(y))}" x2="{RIGHT}" y2="{_f(py(y))}"/>')
        yticks.append(f'<line x1="{LEFT - 4}" y1="{_f(py(y))}" x2="{LEFT}" y2="{_f(py(y))}" stroke="black"/>'
                      f'<text x="{LEFT - 7}" y="{_f(py(y) + 3.5)}" text-anchor="end">{_g(y)}</text>')
    out += [*grid, '</g>', *xticks, '</g>', *yticks, '</g>']

    legend = []  # (label, colour, dashed, marker), in drawing order as matplotlib's legend would list them
    out.append('<g clip-path="url(#axes)" fill="none" stroke-width="1.5">')
    for label, points, colour, dashed, marker in series:
        coords = [(px(x), py(y)) for x, y in points]
        dash = f' stroke-dasharray="{DASH}"' if dashed else ""
        out.append(f'<g class="series" stroke="{colour}"><title>{_text(label)}</title>'
                   f'<polyline points="{" ".join(f"{_f(a)},{_f(b)}" for a, b in coords)}"{dash}/>')
        for a, b in coords:
            if marker == "o":
                out.append(f'<circle cx="{_f(a)}" cy="{_f(b)}" r="3.5" fill="{colour}" stroke="none"/>')
            else:
                out.append(f'<path d="M{_f(a - 3.5)},{_f(b - 3.5)}L{_f(a + 3.5)},{_f(b + 3.5)}'
                           f'M{_f(a - 3.5)},{_f(b + 3.5)}L{_f(a + 3.5)},{_f(b - 3.5)}"/>')
        out.append('</g>')
        legend.append((label, colour, dashed, marker))
    if eps_train is not None:
        label = f"ε_train = {_g(eps_train)}"
        out.append(f'<line class="eps-train" x1="{_f(px(eps_train))}" y1="{TOP}" x2="{_f(px(eps_train))}" '
                   f'y2="{BOTTOM}" stroke="grey" stroke-dasharray="{DASH}"><title>{_text(label)}</title></line>')
        legend.append((label, "grey", True, None))
    out.append('</g>')

    out.append(f'<rect class="axes" x="{LEFT}" y="{TOP}" width="{RIGHT - LEFT}" height="{BOTTOM - TOP}" '
               'fill="none" stroke="black" stroke-width="1"/>')
    out.append(f'<text x="{(LEFT + RIGHT) / 2:g}" y="{BOTTOM + 36}" font-size="12" text-anchor="middle">ε_test</text>')
    out.append(f'<text transform="translate(16,{(TOP + BOTTOM) / 2:g}) rotate(-90)" font-size="12" '
               'text-anchor="middle">robust accuracy</text>')
    title = (f"λ = {_g(config.get('ssl_weight'))}, {config.get('attack_variant')}, {config.get('init')}, "
             f"seed {config.get('seed')}")
    out.append(f'<text class="title" x="{(LEFT + RIGHT) / 2:g}" y="{TOP - 10}" font-size="12" '
               f'text-anchor="middle">{_text(title)}</text>')
    if legend:
        out.append(_legend(legend))
    out.append('</svg>\n')
    return "\n".join(out)


def _series(records, config):
    """(label, [(eps, acc), ...] sorted by eps, colour, dashed, marker) per curve, in legend order."""
    found = []
    for norm in config.get("eval_norms") or ():
        plain = _points(r for r in records if _missing(r.get("corruption")) and r.get("norm") == norm
                        and not _defended(r))
        if plain:
            found.append((f"PGD {norm}", plain, False, "o"))
        # Behind a test-time defence: one curve per attack; the ε = 0 row (attack "none") starts both.
        defended = [r for r in records if _defended(r) and r.get("norm") == norm]
        for name in dict.fromkeys(r["defence"] for r in defended):  # first-seen order, deterministic
            for attack, dashed in (("pgd", False), ("pgd_adaptive", True)):
                points = _points(r for r in defended if r["defence"] == name and r.get("attack") in (attack, "none"))
                if len(points) > 1:
                    found.append((f"{name}, {attack} {norm}", points, dashed, "x"))
    return [(label, points, PALETTE[i % len(PALETTE)], dashed, marker)
            for i, (label, points, dashed, marker) in enumerate(found)]


def _points(rows):
    points = ((_number(r.get("eps_test")), _number(r.get("robust_acc"))) for r in rows)
    return sorted((x, y) for x, y in points if x is not None and y is not None)


def _legend(entries):
    # Top right inside the axes, where falling robustness curves usually leave room. The box width
    # comes from a per-character estimate: there is no font metric without a renderer.
    size, row, sample = 10, 15, 22
    width = 8 + sample + 6 + max(len(label) for label, *_ in entries) * 0.6 * size + 6
    height = 6 + row * len(entries)
    x0, y0 = RIGHT - 6 - width, TOP + 6
    out = [f'<g class="legend" font-size="{size}">',
           f'<rect x="{_f(x0)}" y="{y0}" width="{_f(width)}" height="{height}" rx="3" fill="white" '
           'fill-opacity="0.85" stroke="#cccccc"/>']
    for i, (label, colour, dashed, marker) in enumerate(entries):
        y = y0 + 3 + row * i + row / 2
        a, b = x0 + 8, x0 + 8 + sample
        dash = f' stroke-dasharray="{DASH}"' if dashed else ""
        out.append(f'<line x1="{_f(a)}" y1="{_f(y)}" x2="{_f(b)}" y2="{_f(y)}" stroke="{colour}" '
                   f'stroke-width="1.5"{dash}/>')
        m = (a + b) / 2
        if marker == "o":
            out.append(f'<circle cx="{_f(m)}" cy="{_f(y)}" r="3.5" fill="{colour}"/>')
        elif marker == "x":
            out.append(f'<path d="M{_f(m - 3.5)},{_f(y - 3.5)}L{_f(m + 3.5)},{_f(y + 3.5)}M{_f(m - 3.5)},'
                       f'{_f(y + 3.5)}L{_f(m + 3.5)},{_f(y - 3.5)}" stroke="{colour}" stroke-width="1.5"/>')
        out.append(f'<text x="{_f(b + 6)}" y="{_f(y + 3.5)}">{_text(label)}</text>')
    out.append('</g>')
    return "\n".join(out)


def _nice_ticks(lo, hi, target=5):
    """Ticks at multiples of 1, 2 or 5 × 10^k inside [lo, hi]: the step whose tick count is nearest
    `target` (the larger step on a tie, so that labels have room)."""
    k = math.floor(math.log10((hi - lo) / target))
    best = None
    for step in sorted(m * 10.0 ** e for e in (k - 1, k, k + 1) for m in (1, 2, 5)):
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        if best is None or abs(last - first + 1 - target) <= abs(best[2] - best[1] + 1 - target):
            best = (step, first, last)
    step, first, last = best
    # Rounded, so that 3 × 0.1 is labelled 0.3, not 0.30000000000000004; + 0.0 turns -0.0 into 0.
    return [round(i * step, 12) + 0.0 for i in range(first, last + 1)]


def _number(value):
    """A finite float, or None for what results can hold instead (None, NaN from pandas, strings)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _missing(value):
    return value is None or (isinstance(value, float) and math.isnan(value))


def _defended(record):
    value = record.get("defence")  # None, NaN (a pandas round trip) and "none" all mean no defence
    return not _missing(value) and bool(value) and value != "none"


def _g(value):
    return f"{value:g}" if _number(value) is not None else str(value)


def _f(value):
    # Fixed precision: byte-identical output for identical input, and a short file.
    return f"{value:.2f}"


def _text(value):
    # By hand: xml.sax.saxutils.escape would import urllib.request and http.client, ~40 ms per worker.
    text = _NOT_XML.sub("", str(value))
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
