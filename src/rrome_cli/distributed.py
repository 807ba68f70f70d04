"""``torchrun --nproc_per_node K rrome edit ...``: independent edits split across processes.

Each rank edits the requests whose index % K is its rank, as a run of its own under
``OUT/ranks/<rank>/`` (report, patch journal, resume: each rank's run keeps every guarantee of
a single run), with the context templates rank 0 made and the key statistics all ranks share
(computed once, split across the ranks as ``rrome stats`` does, or read from the cache). When
every rank is done, rank 0 merges their runs into ``OUT/report.jsonl`` (request order),
``OUT/patches.safetensors``, ``OUT/summary.json`` and ``OUT/report.html``. A killed rank's run
resumes with ``--resume OUT`` under the same torchrun command, and the merge is made again.

The ranks exchange nothing but barriers, so the process group is gloo's (on CPU and GPU alike);
with several nodes, OUT and the statistics cache must be on a file system every node sees.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.distributed as dist
from rich.console import Console

from rrome_cli.config import HParams
from rrome_cli.engine.update import Patch
from rrome_cli.evaluate import render_summary, summarise, write_html
from rrome_cli.files import done_records, write_json, write_jsonl
from rrome_cli.models.loading import LoadedModel
from rrome_cli.patches import load_patches, save_patches
from rrome_cli.run import RunOptions, prepare_templates, run_edits


def ranks_from_env() -> tuple[int, int, int]:
    """(rank, ranks, local rank) that torchrun set; (0, 1, 0) outside torchrun."""
    env = os.environ
    return (
        int(env.get("RANK", "0")),
        int(env.get("WORLD_SIZE", "1")),
        int(env.get("LOCAL_RANK", "0")),
    )


def rank_dir(out: Path, rank: int) -> Path:
    return out / "ranks" / str(rank)


def edit_ranks(
    loaded: LoadedModel,
    hp: HParams,
    opts: RunOptions,
    console: Console,
    out: Path,
    resume: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """This rank's share of the run in ``out``, then (rank 0) the merge; every rank returns
    the merged summary's path and, on rank 0, the summary (others: {})."""
    rank, ranks, _ = ranks_from_env()
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="gloo")
    try:
        if rank == 0:  # one set of templates for every rank
            out.mkdir(parents=True, exist_ok=True)
            prepare_templates(loaded, hp, opts, out)
        dist.barrier()
        share = replace(
            opts, out=rank_dir(out, rank), templates=out / "templates.json", shard=[rank, ranks]
        )
        mine = rank_dir(out, rank)
        run_edits(loaded, hp, share, console, resume=mine if resume and mine.exists() else None)
        dist.barrier()
        summary = merge_ranks(out, ranks, hp) if rank == 0 else {}
        if rank == 0:
            render_summary(summary, summary["provenance"] | {"ranks": ranks}, console)
        dist.barrier()
        return out, summary
    finally:
        if created:
            dist.destroy_process_group()


def merge_ranks(out: Path, ranks: int, hp: HParams) -> dict[str, Any]:
    """Every rank's run in ``out/ranks/`` as one run in ``out``: the report in request order,
    the patches in that order, the summary of all records, rank 0's run.json."""
    records: list[dict[str, Any]] = []
    patches: dict[int, list[Patch]] = {}  # request index -> its patches
    failed = 0
    for rank in range(ranks):
        run = rank_dir(out, rank)
        own = done_records(run / "report.jsonl")
        made = load_patches(run / "patches.safetensors")
        for record in (r for r in own if r.get("status") == "applied"):
            patches[record["index"]], made = made[: len(hp.layers)], made[len(hp.layers) :]
        records += own
        failed += json.loads((run / "summary.json").read_text()).get("failed_internal", 0)
    records.sort(key=lambda r: r["index"])
    write_jsonl(out / "report.jsonl", records)
    ordered = [p for r in records for p in patches.get(r["index"], [])]
    save_patches(out / "patches.safetensors", ordered, with_keys=False)
    first = rank_dir(out, 0)
    shutil.copyfile(first / "run.json", out / "run.json.tmp")
    (out / "run.json.tmp").replace(out / "run.json")
    provenance = json.loads((first / "summary.json").read_text())["provenance"]
    summary = summarise(records) | {"provenance": provenance, "ranks": ranks}
    summary["failed_internal"] = failed
    write_json(out / "summary.json", summary)
    write_html(out / "report.html", summary, records, provenance)
    return summary
