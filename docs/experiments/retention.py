"""How a sequential run's first edits hold after its first N: the unedited model plus the run's
first N patches, its first K requests evaluated against the unedited model (as ``rrome edit
--retrospective`` does on the final model). For runs that are still going, or to read two runs
at the same point.

    python docs/experiments/retention.py RUN_DIR [RUN_DIR ...] --after 300 --first 100

Prints one JSON line per run (rewrite, rephrase, locality, ES of the first K after N edits).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rrome_cli.engine.update import apply_patch
from rrome_cli.evaluate import evaluate_requests
from rrome_cli.files import done_records
from rrome_cli.models.loading import load_model
from rrome_cli.patches import reported_patches
from rrome_cli.requests import read_requests
from rrome_cli.run import load_run

METRICS = ("rewrite_acc", "rephrase_acc", "locality", "es")


def retention(run_dir: Path, after: int, first: int) -> dict:
    prov, hp, opts = load_run(run_dir)
    records = done_records(run_dir / "report.jsonl")
    if len(records) < after or any(r.get("status") != "applied" for r in records[:after]):
        raise SystemExit(f"{run_dir}: fewer than {after} edits, or some not applied")
    patches = reported_patches(run_dir, records[:after], len(hp.layers))
    requests = list(read_requests(opts.requests, limit=first))
    loaded = load_model(prov["model"])  # the run's model (alias, path or hub id)
    unedited = evaluate_requests(loaded.model, loaded.tok, requests)
    for patch in patches:
        apply_patch(loaded.model, patch)
    edited = evaluate_requests(loaded.model, loaded.tok, requests, [ref for _, ref in unedited])
    means = {m: round(sum(e[m] for e, _ in edited) / len(edited), 3) for m in METRICS}
    return {"run": str(run_dir), "after": after, "first": first, **means}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--after", type=int, required=True, help="edits applied (N)")
    parser.add_argument("--first", type=int, default=100, help="requests evaluated (K)")
    args = parser.parse_args()
    for run_dir in args.runs:
        print(json.dumps(retention(run_dir, args.after, args.first)), flush=True)


if __name__ == "__main__":
    main()
