"""A self-contained HTML report: one file, inline SVG plots and CSS, no scripts, no network.

Sections: provenance, the summary table, a histogram per metric (pre and post side by side) and,
for sequential runs, metrics right after each edit and on the final model (retrospective), update
norms and probe entropy against the number of edits. Every
bar and point carries a ``<title>`` with its value, shown as a tooltip by browsers.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rrome_cli.evaluate.summary import PHASES, PROVENANCE_KEYS, metric_names, phase_values

WIDTH, HEIGHT, MARGIN = 420, 220, 40
COLOURS = ("#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948")
UNIT_RANGE = {"rewrite_acc", "rephrase_acc", "locality", "portability", "es", "ps", "ns"}
MAX_MARKERS = 400  # beyond this many points a series is drawn as a bare line
CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
svg { background: #fafafa; border: 1px solid #ddd; }
svg text { font-size: 11px; }
"""


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _frame(title: str, x_range: tuple[float, float], y_range: tuple[float, float]) -> list[str]:
    """SVG opening, title and axes with their end labels."""
    left, bottom = MARGIN, HEIGHT - MARGIN
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img">',
        f"<title>{_esc(title)}</title>",
        f'<text x="{WIDTH / 2}" y="14" text-anchor="middle">{_esc(title)}</text>',
        f'<line x1="{left}" y1="{bottom}" x2="{WIDTH - 10}" y2="{bottom}" stroke="#444"/>',
        f'<line x1="{left}" y1="{bottom}" x2="{left}" y2="20" stroke="#444"/>',
        f'<text x="{left}" y="{bottom + 14}">{_fmt(x_range[0])}</text>',
        f'<text x="{WIDTH - 10}" y="{bottom + 14}" text-anchor="end">{_fmt(x_range[1])}</text>',
        f'<text x="{left - 4}" y="{bottom}" text-anchor="end">{_fmt(y_range[0])}</text>',
        f'<text x="{left - 4}" y="26" text-anchor="end">{_fmt(y_range[1])}</text>',
    ]


def _span(values: Sequence[float], unit: bool) -> tuple[float, float]:
    low, high = (0.0, 1.0) if unit else (min(values), max(values))
    return (low - 0.5, high + 0.5) if high == low else (low, high)


def _legend(names: Sequence[str]) -> list[str]:
    return [
        f'<text x="{WIDTH - 12}" y="{30 + 13 * i}" text-anchor="end" '
        f'fill="{COLOURS[i % len(COLOURS)]}">{_esc(name)}</text>'
        for i, name in enumerate(names)
    ]


def histogram_svg(title: str, groups: Mapping[str, Sequence[float]], bins: int = 10) -> str:
    """Counts of each group's values in ``bins`` equal bins, groups' bars side by side."""
    values = [v for vs in groups.values() for v in vs]
    low, high = _span(values, title in UNIT_RANGE)
    edges = [low + (high - low) * i / bins for i in range(bins + 1)]
    counts = {
        name: [
            sum(edges[b] <= v < edges[b + 1] or (b == bins - 1 and v == high) for v in vs)
            for b in range(bins)
        ]
        for name, vs in groups.items()
    }
    top = max(max(c) for c in counts.values()) or 1
    plot_w, plot_h = WIDTH - MARGIN - 10, HEIGHT - MARGIN - 20
    bar_w = plot_w / bins / max(len(groups), 1)
    parts = _frame(title, (low, high), (0, top))
    for g, (name, per_bin) in enumerate(counts.items()):
        for b, count in enumerate(per_bin):
            h = plot_h * count / top
            x = MARGIN + plot_w * b / bins + g * bar_w
            parts.append(
                f'<rect x="{x:.1f}" y="{HEIGHT - MARGIN - h:.1f}" width="{bar_w:.1f}" '
                f'height="{h:.1f}" fill="{COLOURS[g % len(COLOURS)]}">'
                f"<title>{_esc(name)} {_esc(title)} [{_fmt(edges[b])}, {_fmt(edges[b + 1])}"
                f"{']' if b == bins - 1 else ')'}: {count}</title></rect>"
            )
    return "\n".join(parts + _legend(list(counts)) + ["</svg>"])


def line_svg(title: str, series: Mapping[str, Sequence[tuple[float, float]]]) -> str:
    """One polyline per series of (x, y) points, with a tooltip per point."""
    points = [p for s in series.values() for p in s]
    x_low, x_high = _span([x for x, _ in points], False)
    y_low, y_high = _span([y for _, y in points], False)
    plot_w, plot_h = WIDTH - MARGIN - 10, HEIGHT - MARGIN - 20

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            MARGIN + plot_w * (x - x_low) / (x_high - x_low),
            HEIGHT - MARGIN - plot_h * (y - y_low) / (y_high - y_low),
        )

    parts = _frame(title, (x_low, x_high), (y_low, y_high))
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in (at(x, y) for x, y in pts))
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}"/>')
        if len(pts) <= MAX_MARKERS:
            for x, y in pts:
                cx, cy = at(x, y)
                parts.append(
                    f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.5" fill="{colour}">'
                    f"<title>{_esc(name)} at edit {_fmt(x)}: {_fmt(y)}</title></circle>"
                )
    return "\n".join(parts + _legend(list(series)) + ["</svg>"])


def _summary_table(summary: Mapping[str, Any]) -> str:
    pre, post = summary["metrics"]["pre"], summary["metrics"]["post"]
    rows = ["<table><tr><th>metric</th><th>n</th><th>pre</th><th>post</th></tr>"]
    for name in metric_names([dict.fromkeys(pre, 0.0), dict.fromkeys(post, 0.0)]):
        cells = []
        for stats in (pre.get(name), post.get(name)):
            cells.append(
                "-"
                if not stats
                else f"{_fmt(stats['mean'])} [{_fmt(stats['low'])}, {_fmt(stats['high'])}]"
            )
        n = max(pre.get(name, {}).get("n", 0), post.get(name, {}).get("n", 0))
        rows.append(
            f"<tr><td>{_esc(name)}</td><td>{n}</td><td>{cells[0]}</td><td>{cells[1]}</td></tr>"
        )
    scores = summary.get("score", {})
    if any(v is not None for v in scores.values()):
        cells = ["-" if scores.get(p) is None else _fmt(scores[p]) for p in PHASES]
        rows.append(f"<tr><td>S</td><td></td><td>{cells[0]}</td><td>{cells[1]}</td></tr>")
    rows.append("</table>")
    counts = ", ".join(f"{n} {_esc(s)}" for s, n in summary.get("counts", {}).items())
    return f"<p>{summary.get('n_records', 0)} requests: {counts}</p>\n" + "\n".join(rows)


def _histograms(records: Sequence[Mapping[str, Any]]) -> list[str]:
    by_phase = {phase: phase_values(records, phase) for phase in PHASES}
    plots = []
    for name in metric_names([d for ds in by_phase.values() for d in ds]):
        groups = {
            phase: [float(d[name]) for d in ds if isinstance(d.get(name), int | float)]
            for phase, ds in by_phase.items()
        }
        groups = {phase: vs for phase, vs in groups.items() if vs}
        plots.append(histogram_svg(name, groups))
    return plots


def _series(
    records: Sequence[Mapping[str, Any]], pick: Any
) -> dict[str, list[tuple[float, float]]]:
    """``{name: [(index, value)]}`` from each record's ``pick(record) -> {name: value}``."""
    out: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        for name, value in (pick(record) or {}).items():
            if isinstance(value, int | float):
                out.setdefault(name, []).append((float(record["index"]), float(value)))
    return out


def running_mean(
    series: Mapping[str, Sequence[tuple[float, float]]], window: int
) -> dict[str, list[tuple[float, float]]]:
    """Each point replaced by the mean of the ``window`` points ending at it: a per-edit metric
    is 0 or 1 on most edits, so its trend over a long run only shows averaged."""
    out = {}
    for name, points in series.items():
        ys = [y for _, y in points]
        out[name] = [
            (x, sum(ys[max(0, i + 1 - window) : i + 1]) / min(window, i + 1))
            for i, (x, _) in enumerate(points)
        ]
    return out


def _unit_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (metrics or {}).items() if k in UNIT_RANGE}


def _sequential(
    records: Sequence[Mapping[str, Any]], retrospective: Sequence[Mapping[str, Any]] = ()
) -> list[str]:
    indexed = sorted((r for r in records if "index" in r), key=lambda r: r["index"])
    window = max(1, len(indexed) // 20)
    averaged = f", mean of the last {window}" if window > 1 else ""
    plots = []
    for title, rows, pick in (
        (f"post-edit metrics against edits{averaged}", indexed, lambda r: r.get("post")),
        (
            f"final model (retrospective) by edit{averaged}",
            sorted(retrospective, key=lambda r: r["index"]),
            lambda r: r.get("retro"),
        ),
    ):
        series = _series(rows, lambda r, pick=pick: _unit_metrics(pick(r)))
        if series:
            plots.append(line_svg(title, running_mean(series, window)))
    charts = [
        (
            "update norms and protected keys (per key dimension) against edits",
            lambda r: {
                k: v
                for k, v in (r.get("guard") or {}).items()
                if k in ("update_ratio", "cumulative_ratio", "key_fill")
            },
        ),
        ("probe entropy against edits", lambda r: {"probe_entropy": r.get("probe_entropy")}),
    ]
    for title, pick in charts:
        series = _series(indexed, pick)
        if series:
            plots.append(line_svg(title, series))
    return plots


def render_html(
    summary: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    provenance: Mapping[str, Any],
    retrospective: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The report page as a string; ``retrospective``: a sequential run's rows of
    ``retrospective.jsonl`` (each request on the final model)."""
    keys = [k for k in PROVENANCE_KEYS if k in provenance]
    keys += sorted(k for k in provenance if k not in PROVENANCE_KEYS)
    header = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(provenance[k])}</td></tr>" for k in keys)
    body = [
        "<h1>rrome evaluation</h1>",
        f"<table>{header}</table>",
        "<h2>Summary (mean [95% bootstrap interval])</h2>",
        _summary_table(summary),
        "<h2>Per-request distributions</h2>",
        '<div class="plots">',
        *_histograms(records),
        "</div>",
    ]
    indexed = sum("index" in r for r in records)
    if provenance.get("protocol", "") != "independent" and indexed >= 2:
        body += [
            "<h2>Sequential editing</h2>",
            '<div class="plots">',
            *_sequential(records, retrospective),
            "</div>",
        ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            "<title>rrome evaluation</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )


def write_html(
    path: str | Path,
    summary: dict,
    records: list[dict],
    provenance: dict,
    retrospective: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Write the report page to ``path``."""
    page = render_html(summary, records, provenance, retrospective)
    Path(path).write_text(page, encoding="utf-8")
