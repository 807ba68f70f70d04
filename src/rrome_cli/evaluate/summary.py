"""Run summaries: metric means with bootstrap intervals, edit outcome counts, and the S score.

Records are report.jsonl lines: ``{"pre": {...}, "post": {...}, "status": "applied" | "no-op"
| "rejected" | "failed", ...}`` of ``rrome edit``, or ``"status": "evaluated"`` of ``rrome eval``
(nothing edited: "post" is the patched or the second model). Pre-edit metrics are summarised over
every record that has them; post-edit metrics over applied edits and evaluations only (a no-op,
rejected or failed edit left the model as it was, so its "post" would only repeat "pre").
Intervals are 95% percentile-bootstrap intervals of the mean.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from rrome_cli.evaluate.counterfact import harmonic_mean

PHASES = ("pre", "post")
METRIC_ORDER = (
    "rewrite_acc",
    "rephrase_acc",
    "locality",
    "portability",
    "es",
    "ps",
    "ns",
    "em",
    "pm",
    "nm",
    "nll_new",
    "nll_true",
    "fluency",
)
STATUSES = ("applied", "no-op", "rejected", "failed")  # of an edit
EVALUATED = "evaluated"  # rrome eval: measured, nothing edited
SCORED_AFTER = ("applied", EVALUATED)  # the records whose "post" a summary counts
PROVENANCE_KEYS = ("model", "variant", "covariance", "dtype", "protocol")


def bootstrap_interval(
    values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (deterministic for ``seed``)."""
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    resampled_means = data[rng.integers(0, len(data), size=(n_boot, len(data)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(resampled_means, [tail, 100 - tail])
    return float(low), float(high)


def metric_names(dicts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Numeric keys present in ``dicts``: the known metrics in their order, then the rest."""
    present = {k for d in dicts for k, v in d.items() if isinstance(v, int | float)}
    known = [m for m in METRIC_ORDER if m in present]
    return known + sorted(present - set(known))


def phase_values(records: Sequence[Mapping[str, Any]], phase: str) -> list[Mapping[str, Any]]:
    """The metric dicts of ``phase`` that the summary counts (post: applied edits only)."""
    out = []
    for record in records:
        if phase == "post" and record.get("status", "applied") not in SCORED_AFTER:
            continue
        metrics = record.get(phase)
        if isinstance(metrics, Mapping):
            out.append(metrics)
    return out


def summarise(records: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """``{"n_records", "counts": {status: n}, "metrics": {phase: {name: {"mean", "low", "high",
    "n"}}}, "score": {phase: S or None}}``; S is the harmonic mean of the ES, PS, NS means.
    The counts list every edit status (0 where none) unless the records are evaluations only."""
    counts = Counter(r.get("status", "applied") for r in records)
    edits = not counts or any(s in counts for s in STATUSES)
    summary: dict[str, Any] = {
        "n_records": len(records),
        "counts": dict.fromkeys(STATUSES if edits else (), 0) | dict(counts),
        "metrics": {},
        "score": {},
    }
    for phase in PHASES:
        dicts = phase_values(records, phase)
        table: dict[str, dict[str, float]] = {}
        for name in metric_names(dicts):
            values = [float(d[name]) for d in dicts if isinstance(d.get(name), int | float)]
            low, high = bootstrap_interval(values, n_boot, seed)
            table[name] = {
                "mean": float(np.mean(values)),
                "low": low,
                "high": high,
                "n": len(values),
            }
        summary["metrics"][phase] = table
        parts = [table[m]["mean"] for m in ("es", "ps", "ns") if m in table]
        summary["score"][phase] = harmonic_mean(parts) if len(parts) == 3 else None
    return summary


def _cell(stats: Mapping[str, float] | None) -> str:
    if not stats:
        return "-"
    return f"{stats['mean']:.3f} [{stats['low']:.3f}, {stats['high']:.3f}]"


def render_summary(summary: dict, provenance: dict, console: Console) -> None:
    """Print the provenance header and the pre/post metric table with intervals."""
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    keys = [k for k in PROVENANCE_KEYS if k in provenance]
    keys += sorted(k for k in provenance if k not in PROVENANCE_KEYS)
    for key in keys:
        header.add_row(key, str(provenance[key]))
    counts = summary["counts"]
    header.add_row(
        "edits" if any(s in counts for s in STATUSES) else "records",
        f"{summary['n_records']} requests: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
    )
    console.print(header)

    table = Table(title="Metrics: mean [95% bootstrap interval]")
    table.add_column("metric")
    table.add_column("n", justify="right")
    for phase in PHASES:
        table.add_column(phase, justify="right")
    pre, post = summary["metrics"]["pre"], summary["metrics"]["post"]
    for name in metric_names([dict.fromkeys(pre, 0.0), dict.fromkeys(post, 0.0)]):
        n = max(pre.get(name, {}).get("n", 0), post.get(name, {}).get("n", 0))
        table.add_row(name, str(n), _cell(pre.get(name)), _cell(post.get(name)))
    scores = summary["score"]
    if any(v is not None for v in scores.values()):
        table.add_row(
            "S", "", *(f"{scores[p]:.3f}" if scores.get(p) is not None else "-" for p in PHASES)
        )
    console.print(table)
