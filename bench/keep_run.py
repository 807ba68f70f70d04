"""Copy a run directory so that git keeps it cheaply: a long run measured in pieces over several
sessions (the 1,000-edit sequential run of ``make bench``) is committed as each piece ends.

    python bench/keep_run.py runs/bench/full/sequential bench/results/sequential-1000
    python bench/keep_run.py bench/results/sequential-1000 runs/bench/full/sequential  # continue

The copy holds the report, run.json, templates.json and every applied edit's patches as a
journal file of its own (``patches.d/<index>.safetensors``, never rewritten), not the folded
``patches.safetensors``, which a resume rewrites whole: each piece then adds only its new
edits to the repository. ``rrome edit --resume`` (and ``make bench``) reads either layout.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from rrome_cli.files import done_records
from rrome_cli.patches import journal_edit, reported_patches

FILES = ("report.jsonl", "run.json", "templates.json")


def keep(run: Path, copy: Path) -> int:
    """Copy ``run`` to ``copy`` as described above; returns the number of applied edits."""
    per_edit = len(json.loads((run / "run.json").read_text())["hparams"]["layers"])
    records = done_records(run / "report.jsonl")
    patches = reported_patches(run, records, per_edit)
    copy.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(run / name, copy / name)
    applied = [r["index"] for r in records if r.get("status") == "applied"]
    for i, index in enumerate(applied):
        journal_edit(copy, index, patches[i * per_edit : (i + 1) * per_edit], with_keys=True)
    (copy / "patches.safetensors").unlink(missing_ok=True)
    return len(applied)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("copy", type=Path)
    args = parser.parse_args()
    print(f"{keep(args.run, args.copy)} edits kept in {args.copy}")


if __name__ == "__main__":
    main()
