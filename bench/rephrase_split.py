"""Rephrase accuracy split by whether the rephrased prompt asks the same question, and by
whether it contains one of the request's relation phrasings (``--phrasings``).

In the EasyEdit CounterFact file, a ``rephrase_prompt`` is not always a paraphrase: on the first
200 records, 88 ask for another attribute ("Thomas Joannes Stieltjes was born in" for an edit of
his mother tongue to "English"), where the edited target is not a fitting answer at all.
``bench/counterfact-rephrase-labels.json`` holds a hand label per record by two readers, the
second blind to the first (their ``how`` fields say how they were made; they agree on 185 of
200, kappa 0.85; on the held-out records 2000-2199, 200 of 200); this script reads a run's
``report.jsonl`` (or rows with a top-level ``rephrase_acc``, as
``docs/experiments/rephrase_ceiling.py`` writes) and prints the rephrase mean with 95% bootstrap
intervals on each side of the label. When the edits were optimised on relation phrasings, a
rephrased prompt may hold one of them ("[other text]. Danielle Darrieux is a native speaker
of"): those records are split out too, as the edit saw that wording.

    python bench/rephrase_split.py runs/sweep/cf200-lr1/run/report.jsonl [--phase post]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rrome_cli.evaluate.summary import SCORED_AFTER, bootstrap_interval

LABELS = Path(__file__).resolve().parent / "counterfact-rephrase-labels.json"


def read_labels() -> tuple[dict[str, bool], dict[str, bool]]:
    """case_id -> same question?, by the first reader and by the second (blind) reader."""
    labels = json.loads(LABELS.read_text())
    return labels["same_question"], labels["second_reader"]["same_question"]


def read_rows(path: Path) -> list[dict]:
    """The rows of a report (JSON Lines)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def rephrase_by_case(rows: list[dict], phase: str) -> dict[str, float]:
    """case_id -> rephrase accuracy, for every applied (or, of rrome eval, evaluated) record
    of a report."""
    out = {}
    for row in rows:
        if row.get("status", "applied") not in SCORED_AFTER:
            continue
        metrics = row.get(phase, row)
        if "rephrase_acc" in metrics:
            out[str(row["case_id"])] = metrics["rephrase_acc"]
    return out


def with_seen_phrasing(rows: list[dict]) -> set[str]:
    """case_ids whose rephrased prompt contains one of the request's phrasings, filled."""
    seen = set()
    for row in rows:
        request = row.get("request", {})
        filled = [p.replace("{}", request.get("subject", "")) for p in request.get("phrasings", [])]
        if any(f in r for f in filled for r in request.get("rephrase_prompt", [])):
            seen.add(str(row["case_id"]))
    return seen


def split(
    scores: dict[str, float],
    labels: dict[str, bool],
    seen: set[str] | None = None,
    second: dict[str, bool] | None = None,
) -> dict[str, dict]:
    """Mean and interval of the labelled records, all of them and on each side of the label
    (given ``second``, another reader's labels: also the records both call the same question;
    given ``seen``: the same-question records whose rephrase holds no phrasing)."""
    groups = {
        "all labelled": [s for c, s in scores.items() if c in labels],
        "same question": [s for c, s in scores.items() if labels.get(c) is True],
        "other question": [s for c, s in scores.items() if labels.get(c) is False],
    }
    if second:
        groups["same, both readers"] = [
            s for c, s in scores.items() if labels.get(c) is True and second.get(c) is True
        ]
    if seen:
        groups["phrasing seen"] = [s for c, s in scores.items() if c in seen]
        groups["phrasing unseen"] = [s for c, s in scores.items() if c not in seen]
        groups["same, unseen"] = [
            s for c, s in scores.items() if labels.get(c) is True and c not in seen
        ]
    result = {}
    for name, values in groups.items():
        if values:
            low, high = bootstrap_interval(values)
            result[name] = {"n": len(values), "mean": statistics.mean(values)}
            result[name] |= {"low": low, "high": high}
    return result


def ceiling(labels: dict[str, bool], second: dict[str, bool]) -> dict[str, float]:
    """What an editor scores that answers every same-question rephrase with the target and no
    other: the share of same-question records, by the first reader, by either, by both."""
    cases = set(labels) & set(second)
    same = {
        "first reader": {c for c in cases if labels[c]},
        "either reader": {c for c in cases if labels[c] or second[c]},
        "both readers": {c for c in cases if labels[c] and second[c]},
    }
    return {name: len(group) / len(cases) for name, group in same.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--phase", default="post", help="pre or post (report.jsonl only)")
    args = parser.parse_args()
    labels, second = read_labels()
    rows = read_rows(args.report)
    scores = rephrase_by_case(rows, args.phase)
    result = split(scores, labels, with_seen_phrasing(rows), second)
    for name, r in result.items():
        print(
            f"{name:>18}: n {r['n']:3d}  rephrase {r['mean']:.3f} ({r['low']:.3f}-{r['high']:.3f})"
        )
    bound = ceiling(labels, second)
    print(
        "a correct editor's ceiling (every same-question rephrase, no other): "
        + ", ".join(f"{v:.3f} ({k})" for k, v in bound.items())
    )
    summary = {"report": str(args.report), "phase": args.phase, **result, "ceiling": bound}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
