"""Model-collapse signals for sequential editing runs.

Each per-edit record (a report.jsonl line) may carry ``"index"`` (edit number, from 0),
``"guard": {"update_ratio": ‖ΔW‖/‖W‖, "cumulative_ratio": ‖W - W0‖/‖W0‖}`` and, every N edits,
``"probe_entropy"`` (``normalised_word_entropy`` of generations on a fixed probe set).

The rule (an edit is flagged when any part holds):

1. entropy: ``probe_entropy < (1 - entropy_drop) * baseline_entropy``, the baseline being the
   probe-set entropy of the unedited model (default drop: 10%);
2. update blow-up: ``update_ratio > blowup * median(update_ratio of the earlier edits)``, once at
   least ``min_history`` earlier edits exist (default: 10x the median of >= 3 edits): one update
   far larger than the run's typical update;
3. drift: ``cumulative_ratio > cumulative_limit`` (default 1.0: the accumulated change is as
   large as the original weight matrix itself);
4. keys full: ``key_fill >= 1`` (``"guard": {"key_fill": protected keys / key dimensions}``,
   runs with ``protect_weight``): the earlier edits' protected keys outnumber the layer's key
   dimensions.

Only 1 and 2 mean collapse (``first_collapse``): 1 is the definition (generations lose their
diversity), 2 is the signature of ROME's "disabling" edits. Drift alone is a warning
(``first_drift``): healthy R-ROME edits on SmolLM2 grow ||W - W0|| / ||W0|| like a random walk,
about 0.1 sqrt(n), so it passes 1.0 near the hundredth edit with no entropy drop (measured).
So is 4 (``first_keys_full``): from there no update can leave every earlier edit's keys alone,
and on SmolLM2 earlier edits wore several times faster past it (about edit 300; measured).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CollapseSignal:
    index: int  # the record's "index" (its position in the list when absent)
    reason: str  # "entropy", "update blow-up", "drift" or "keys full"
    value: float  # the measured quantity
    threshold: float  # what it crossed


def _index(record: Mapping[str, Any], position: int) -> int:
    return int(record.get("index", position))


def collapse_signals(
    records: Sequence[Mapping[str, Any]],
    baseline_entropy: float | None = None,
    entropy_drop: float = 0.10,
    blowup: float = 10.0,
    min_history: int = 3,
    cumulative_limit: float = 1.0,
) -> list[CollapseSignal]:
    """Every collapse signal in ``records`` (in edit order), per the module's rule."""
    signals: list[CollapseSignal] = []
    history: list[float] = []  # update ratios of the edits before the current one
    for position, record in enumerate(records):
        at = _index(record, position)
        entropy = record.get("probe_entropy")
        if entropy is not None and baseline_entropy is not None:
            floor = (1 - entropy_drop) * baseline_entropy
            if entropy < floor:
                signals.append(CollapseSignal(at, "entropy", float(entropy), floor))
        guard = record.get("guard") or {}
        ratio = guard.get("update_ratio")
        if ratio is not None:
            if len(history) >= min_history:
                limit = blowup * statistics.median(history)
                if ratio > limit:
                    signals.append(CollapseSignal(at, "update blow-up", float(ratio), limit))
            history.append(float(ratio))
        cumulative = guard.get("cumulative_ratio")
        if cumulative is not None and cumulative > cumulative_limit:
            signals.append(CollapseSignal(at, "drift", float(cumulative), cumulative_limit))
        fill = guard.get("key_fill")
        if fill is not None and fill >= 1.0:
            signals.append(CollapseSignal(at, "keys full", float(fill), 1.0))
    return signals


COLLAPSE_REASONS = ("entropy", "update blow-up")


def _first(
    records: Sequence[Mapping[str, Any]],
    reasons: tuple[str, ...],
    baseline_entropy: float | None = None,
    **rule: Any,
) -> CollapseSignal | None:
    signals = collapse_signals(records, baseline_entropy, **rule)
    return next((s for s in signals if s.reason in reasons), None)


def first_collapse(
    records: Sequence[Mapping[str, Any]], baseline_entropy: float | None = None, **rule: Any
) -> CollapseSignal | None:
    """The earliest entropy or update blow-up signal, or None if the run never collapsed."""
    return _first(records, COLLAPSE_REASONS, baseline_entropy, **rule)


def first_drift(records: Sequence[Mapping[str, Any]], **rule: Any) -> CollapseSignal | None:
    """The earliest edit whose accumulated change passed the drift limit (a warning)."""
    return _first(records, ("drift",), **rule)


def first_keys_full(records: Sequence[Mapping[str, Any]]) -> CollapseSignal | None:
    """The earliest edit after which the protected keys outnumber the key dimensions (a
    warning)."""
    return _first(records, ("keys full",))
