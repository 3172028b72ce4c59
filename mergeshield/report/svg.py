"""Tiny inline-SVG charts for the HTML report (no plotting library, nothing external).

Each function returns markup for inside a ``<figure>``: an ``<svg role="img" aria-label=...>`` with
axes, ticks and ``<title>`` tooltips, followed by an HTML legend. All labels are escaped.
"""

from __future__ import annotations

import html

# Okabe-Ito, colour-blind safe; the first is for clean accuracy.
PALETTE = ("#000000", "#E69F00", "#0072B2", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#999933")
_DASHES = ("", "6 3", "2 3", "8 3 2 3")  # cycled after the palette, so lines stay distinguishable
_FONT = 'font-family="system-ui,sans-serif" font-size="11"'

Series = tuple[str, list[tuple[float, float]]]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _style(i: int) -> tuple[str, str]:
    colour = PALETTE[i % len(PALETTE)]
    dash = _DASHES[(i // len(PALETTE)) % len(_DASHES)]
    return colour, (f' stroke-dasharray="{dash}"' if dash else "")


def _ticks(lo: float, hi: float, points: list[float]) -> list[float]:
    unique = sorted(set(points))
    if 2 <= len(unique) <= 11:
        return unique
    return [lo + (hi - lo) * k / 4 for k in range(5)]


def line_chart(
    series: list[Series],
    *,
    label: str,
    marker: float | None = None,
    marker_label: str = "chosen",
    width: int = 640,
    height: int = 320,
) -> str:
    """Lines over x, with y a rate in [0, 1]; ``marker`` draws a dashed vertical line at that x."""
    left, right, top, bottom = 48, 16, 26, 40  # top leaves room for the marker's label
    xs = [x for _, pts in series for x, _ in pts] + ([marker] if marker is not None else [])
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_hi - x_lo < 1e-12:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return top + (1 - min(max(y, 0.0), 1.0)) * plot_h

    out = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{_e(label)}"><title>{_e(label)}</title>',
        f'<g {_FONT} fill="#555">',
    ]
    for k in range(5):  # y grid and ticks: 0%, 25%, ..., 100%
        y = py(k / 4)
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e3e3"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{k * 25}%</text>'
        )
    for x in _ticks(x_lo, x_hi, xs):
        out.append(
            f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" '
            f'stroke="#555"/><text x="{px(x):.1f}" y="{top + plot_h + 16}" '
            f'text-anchor="middle">{x:g}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">λ</text>'
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        f'stroke="#999"/></g>'
    )
    if marker is not None:
        mx = px(marker)
        out.append(
            f'<g {_FONT}><line x1="{mx:.1f}" x2="{mx:.1f}" y1="{top}" y2="{top + plot_h}" '
            f'stroke="#b91c1c" stroke-width="1.5" stroke-dasharray="4 3"/>'
            f'<text x="{min(max(mx, left + 60), width - right - 60):.1f}" y="{top - 8}" '
            f'text-anchor="middle" fill="#b91c1c">'
            f"λ = {marker:g} ({_e(marker_label)})</text></g>"
        )
    legend = []
    for i, (name, pts) in enumerate(series):
        colour, dash = _style(i)
        pts = sorted(pts)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        width_attr = 2.5 if i == 0 else 1.8
        out.append(
            f'<g><title>{_e(name)}</title><polyline points="{path}" fill="none" '
            f'stroke="{colour}" stroke-width="{width_attr}"{dash}/>'
        )
        out += [
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}">'
            f"<title>{_e(name)}: λ = {x:g}, {y:.1%}</title></circle>"
            for x, y in pts
        ]
        out.append("</g>")
        legend.append(
            f'<li><span class="swatch" style="background:{colour}"></span>{_e(name)}</li>'
        )
    out.append("</svg>")
    return "".join(out) + f'<ul class="legend" aria-label="Legend">{"".join(legend)}</ul>'


def _short(name: str, limit: int = 44) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def bar_chart(
    items: list[tuple[str, float]], *, label: str, width: int = 640, row: int = 18
) -> str:
    """Horizontal bars in the given order, scaled to the largest; long names keep their end."""
    label_w, value_w, top = 290, 64, 4
    bar_w = width - label_w - value_w - 8
    biggest = max((v for _, v in items), default=0.0) or 1.0
    height = top * 2 + row * max(len(items), 1)
    out = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{_e(label)}"><title>{_e(label)}</title>'
        f"<g {_FONT}>"
    ]
    for i, (name, value) in enumerate(items):
        y = top + i * row
        w = max(value, 0.0) / biggest * bar_w
        out.append(
            f"<g><title>{_e(name)}: {value:.4g}</title>"
            f'<text x="{label_w - 6}" y="{y + row * 0.7:.1f}" text-anchor="end" fill="#333">'
            f"{_e(_short(name))}</text>"
            f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row - 4}" fill="#0072B2"/>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + row * 0.7:.1f}" fill="#333">'
            f"{value:.3g}</text>"
            "</g>"
        )
    out.append("</g></svg>")
    return "".join(out)
