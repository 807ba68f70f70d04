"""A run's report with some records replaced by those of a rerun: the independent-mode metrics
of a recipe change that only touches some records.

In independent mode each edit starts from the unedited model, so a change that provably leaves
a record's computation as it was (``k_bare_min`` keeps the plain k* wherever the bare prompt
already receives that fraction of the edit) needs rerunning only on the records it touches.

    python docs/experiments/overlay.py runs/sweep/cf200-lr1/run/report.jsonl \
        runs/sweep/cf200-bare-min60/run/report.jsonl [--out merged.jsonl]

Prints the post-edit means with 95% bootstrap intervals, ES = 1 counts and the S score of the
merged records; ``--out`` writes them as a report (``bench/rephrase_split.py`` reads it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sweep import METRICS  # docs/experiments/ is this script's directory, first on sys.path

from rrome_cli.evaluate.summary import summarise


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def overlay(base: list[dict], reruns: list[dict]) -> list[dict]:
    """``base`` in its order, each record whose case_id was rerun replaced by the rerun's."""
    by_case = {r["case_id"]: r for r in reruns}
    missing = set(by_case) - {r["case_id"] for r in base}
    if missing:
        raise SystemExit(f"rerun case_ids not in the base report: {sorted(missing)[:5]}")
    return [by_case.get(r["case_id"], r) for r in base]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("reruns", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    merged = overlay(read(args.base), read(args.reruns))
    summary = summarise(merged)
    post = summary["metrics"]["post"]
    row = {m: [round(post[m][k], 3) for k in ("mean", "low", "high")] for m in METRICS}
    row["es_1"] = sum(r["post"]["es"] == 1 for r in merged if r.get("status") == "applied")
    row["n"] = len(merged)
    row["S"] = round(summary["score"]["post"], 3)
    print(json.dumps(row))
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in merged))


if __name__ == "__main__":
    main()
