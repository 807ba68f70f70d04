"""Rephrase accuracy split by whether the rephrased prompt asks the same question, and by
whether it contains one of the request's relation phrasings (``--phrasings``).

In the EasyEdit CounterFact file, a ``rephrase_prompt`` is not always a paraphrase: on the first
200 records, 88 ask for another attribute ("Thomas Joannes Stieltjes was born in" for an edit of
his mother tongue to "English"), where the edited target is not a fitting answer at all.
``bench/counterfact-rephrase-labels.json`` holds a hand label per record (its ``how`` field says
how they were made); this script reads a run's ``report.jsonl`` (or rows with a top-level
``rephrase_acc``, as ``bench/rephrase_ceiling.py`` writes) and prints the rephrase mean with
95% bootstrap intervals on each side of the label. When the edits were optimised on relation
phrasings, a rephrased prompt may hold one of them ("[other text]. Danielle Darrieux is a native
speaker of"): those records are split out too, as the edit saw that wording.

    python bench/rephrase_split.py runs/sweep/cf200-lr1/run/report.jsonl [--phase post]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rrome_cli.evaluate.summary import bootstrap_interval

LABELS = Path(__file__).resolve().parent / "counterfact-rephrase-labels.json"


def rephrase_by_case(path: Path, phase: str) -> dict[str, float]:
    """case_id -> rephrase accuracy, for every applied record of ``path`` (JSON Lines)."""
    out = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("status", "applied") != "applied":
            continue
        metrics = row.get(phase, row)
        if "rephrase_acc" in metrics:
            out[str(row["case_id"])] = metrics["rephrase_acc"]
    return out


def with_seen_phrasing(path: Path) -> set[str]:
    """case_ids whose rephrased prompt contains one of the request's phrasings, filled."""
    seen = set()
    for line in path.read_text().splitlines():
        row = json.loads(line)
        request = row.get("request", {})
        filled = [p.replace("{}", request.get("subject", "")) for p in request.get("phrasings", [])]
        if any(f in r for f in filled for r in request.get("rephrase_prompt", [])):
            seen.add(str(row["case_id"]))
    return seen


def split(
    scores: dict[str, float], labels: dict[str, bool], seen: set[str] | None = None
) -> dict[str, dict]:
    """Mean and interval of the labelled records, all of them and on each side of the label
    (and, given ``seen``, of the same-question records whose rephrase holds no phrasing)."""
    groups = {
        "all labelled": [s for c, s in scores.items() if c in labels],
        "same question": [s for c, s in scores.items() if labels.get(c) is True],
        "other question": [s for c, s in scores.items() if labels.get(c) is False],
    }
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--phase", default="post", help="pre or post (report.jsonl only)")
    args = parser.parse_args()
    labels = json.loads(LABELS.read_text())["same_question"]
    seen = with_seen_phrasing(args.report)
    result = split(rephrase_by_case(args.report, args.phase), labels, seen)
    for name, r in result.items():
        print(
            f"{name:>15}: n {r['n']:3d}  rephrase {r['mean']:.3f} ({r['low']:.3f}-{r['high']:.3f})"
        )
    print(json.dumps({"report": str(args.report), "phase": args.phase, **result}))


if __name__ == "__main__":
    main()
