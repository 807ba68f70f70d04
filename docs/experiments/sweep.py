"""Sweep the SmolLM2 recipe: one ``rrome edit`` run (independent mode) per hyperparameter change.

    python docs/experiments/sweep.py "stop99: v_stop_prob=0.99, v_num_grad_steps=60" \
        "L3: layers=[3]" \
        [--requests data/counterfact-sample.jsonl] [--limit 20] [--base hparams/smollm2-135m.yaml]
        [--phrasings data/counterfact-phrasings.json] [--fluency 50]

Each change is applied on top of the base YAML (values are YAML: ``layers=[3]``), run through
the CLI exactly as a user would, and summarised as one JSON line appended to
``bench/results/sweep.jsonl`` (post-edit rewrite, rephrase, locality, ES/PS/NS, median steps and
seconds per edit) and printed. ``--fluency N``: also fluency pre and post of the first N records
and how many edited continuations say the new object more than twice (the bench's measure,
taken from the run's patches).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import yaml

from rrome_cli.run import guard_layers

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # bench/ is not a package: its modules by path
METRICS = ("rewrite_acc", "rephrase_acc", "locality", "es", "ps", "ns")


def parse_change(spec: str) -> tuple[str, dict]:
    """``"name: key=value, key=value"`` -> (name, {key: yaml value})."""
    name, _, body = spec.partition(":")
    changes = {}
    for part in filter(None, (p.strip() for p in _split(body))):
        key, _, value = part.partition("=")
        changes[key.strip()] = yaml.safe_load(value)
    return name.strip(), changes


def _split(body: str) -> list[str]:
    """Split on commas outside brackets, so ``layers=[3, 4]`` stays whole."""
    parts, depth, current = [], 0, ""
    for ch in body:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def run_one(name: str, changes: dict, args: argparse.Namespace) -> dict:
    out = ROOT / "runs" / "sweep" / name
    out.mkdir(parents=True, exist_ok=True)
    hp = yaml.safe_load(args.base.read_text()) | changes
    hp_path = out / "hparams.yaml"
    hp_path.write_text(yaml.safe_dump(hp, sort_keys=False))
    cmd = [
        sys.executable,
        "-m",
        "rrome_cli.cli",
        "edit",
        str(args.requests),
        "--hparams",
        str(hp_path),
        "--out",
        str(out / "run"),
        "--limit",
        str(args.limit),
        *(["--phrasings", str(args.phrasings)] if args.phrasings else []),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "run" / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "run" / "report.jsonl").read_text().splitlines()]
    edits = [guard_layers(r["guard"]) for r in records if r.get("status") == "applied"]
    post = summary["metrics"]["post"]
    row = {"name": name, "changes": changes, "requests": str(args.requests), "n": len(records)}
    if args.phrasings:
        row["phrasings"] = str(args.phrasings)
    row |= {m: round(post[m]["mean"], 3) for m in METRICS if m in post}
    row["steps"] = statistics.median(sum(g["steps"] for g in layers) for layers in edits)
    seconds = [
        sum(g["seconds_keys"] + g["seconds_values"] + g["seconds_solve"] for g in layers)
        for layers in edits
    ]
    row["seconds_edit"] = round(statistics.median(seconds), 2)
    row |= same_question(records)
    if args.fluency:
        row |= fluency_row(out / "run", args.fluency)
    row["date"] = datetime.now().isoformat(timespec="seconds")
    return row


def same_question(records: list[dict]) -> dict:
    """Rephrase on the CounterFact records whose rephrase asks the same question (both
    readers' labels, bench/counterfact-rephrase-labels.json); {} where none is labelled."""
    from rephrase_split import read_labels, rephrase_by_case, split

    labels, second = read_labels()
    both = split(rephrase_by_case(records, "post"), labels, None, second).get("same, both readers")
    return {"rephrase_same": round(both["mean"], 3), "same_n": both["n"]} if both else {}


def fluency_row(run_dir: Path, limit: int) -> dict:
    """The bench's fluency pass over the run's first ``limit`` records (issue 35)."""
    from bench import fluency  # imports the model stack: only with --fluency
    from rrome_cli.models.loading import load_model

    stats = fluency(load_model("smollm2-135m"), run_dir, limit)
    return {
        "fluency_pre": round(stats["pre"]["mean"], 3),
        "fluency_post": round(stats["post"]["mean"], 3),
        "repeats_over_2": stats["post"]["repeats_over_2"],
        "fluency_n": stats["post"]["repeats_of"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("changes", nargs="+", help='"name: key=value, ..." ("base:" for none)')
    parser.add_argument("--requests", type=Path, default=ROOT / "data" / "counterfact-sample.jsonl")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--phrasings", type=Path, help="passed on to rrome edit --phrasings")
    parser.add_argument("--fluency", type=int, default=0, help="fluency of the first N records")
    parser.add_argument("--base", type=Path, default=ROOT / "hparams" / "smollm2-135m.yaml")
    args = parser.parse_args()
    log = ROOT / "bench" / "results" / "sweep.jsonl"
    for spec in args.changes:
        row = run_one(*parse_change(spec), args)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
