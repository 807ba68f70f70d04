"""Edits per second of ``rrome edit --batch N`` (independent runs), side by side in one process.

Each batch size runs the same requests as a whole run (keys, values, solves, evaluation before
and after, reports and patches written) with the same templates and statistics; the metrics of
each run are kept beside its speed, since a batch must not change them. Used by ``bench.py``'s
``throughput`` section (CPU) and by ``gpu_check.py`` (GPU).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from rrome_cli.config import HParams
from rrome_cli.engine.templates import generate_templates, save_templates
from rrome_cli.models.loading import LoadedModel
from rrome_cli.run import RunOptions, run_edits


def measure(
    loaded: LoadedModel,
    hp: HParams,
    requests: Path,
    batches: list[int],
    work: Path,
    limit: int | None = None,
    templates: Path | None = None,
) -> list[dict[str, Any]]:
    """One run per batch size over ``requests`` (the first ``limit``); a row per run."""
    quiet = Console(stderr=True, quiet=True)
    device = next(loaded.model.parameters()).device
    if templates is None:  # made once, outside the timed runs
        templates = work / "templates.json"
        work.mkdir(parents=True, exist_ok=True)
        made = generate_templates(loaded.model, loaded.tok, hp.context_template_length_params)
        save_templates(made, templates)
    rows = []
    for batch in batches:
        out = work / f"batch-{batch}"
        opts = RunOptions(
            requests=str(requests), limit=limit, out=out, batch=batch, templates=templates
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        _, summary = run_edits(loaded, hp, opts, quiet)
        seconds = time.perf_counter() - start
        post = summary["metrics"]["post"]
        records = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
        rows.append(
            {
                "batch": batch,
                "edits": len(records),
                "seconds": round(seconds, 2),
                "edits_per_second": round(len(records) / seconds, 3),
                "steps": sum(r.get("guard", {}).get("steps", 0) for r in records),
                "peak_mib": round(torch.cuda.max_memory_allocated(device) / 2**20)
                if device.type == "cuda"
                else None,
                "post": {k: round(v["mean"], 4) for k, v in post.items() if "mean" in v},
            }
        )
    base = rows[0]["edits_per_second"]
    for row in rows:
        row["speedup"] = round(row["edits_per_second"] / base, 2)
    return rows


def phase_peaks(
    loaded: LoadedModel, hp: HParams, requests: Path, batch: int, work: Path, limit: int
) -> dict[str, int]:
    """Where a run's memory goes: the peak live tensor bytes (MiB) while keys are taken
    (``prepare_layer``), values optimised (``ValueBatch.step``), updates solved
    (``finish_layer``), finished edits evaluated (``evaluate_edits``) and elsewhere. A
    diagnostic (the tracker slows every op): each phase's peak includes what earlier ones
    left alive."""
    from rrome_cli import run as run_module
    from rrome_cli.engine import edit as edit_module
    from rrome_cli.engine import values
    from rrome_cli.memcheck import live_tensor_bytes

    tracker = None

    def phased(name: str, fn: Any) -> Any:
        def inner(*args: Any, **kwargs: Any) -> Any:
            outer = tracker.phase
            tracker.set_phase(name)
            try:
                return fn(*args, **kwargs)
            finally:
                tracker.set_phase(outer)

        return inner

    patched = [
        (values.ValueBatch, "step", "value"),
        (run_module, "evaluate_edits", "evaluate"),
        (edit_module, "prepare_layer", "keys"),
        (edit_module, "finish_layer", "solve"),
    ]
    originals = [getattr(owner, name) for owner, name, _ in patched]
    opts = RunOptions(
        requests=str(requests), limit=limit, out=work / f"phases-{batch}", batch=batch,
        templates=work / "templates.json",
    )  # fmt: skip
    try:
        for (owner, name, phase), fn in zip(patched, originals, strict=True):
            setattr(owner, name, phased(phase, fn))
        with live_tensor_bytes() as tracker:
            tracker.set_phase("other")
            run_edits(loaded, hp, opts, Console(stderr=True, quiet=True))
    finally:
        for (owner, name, _), fn in zip(patched, originals, strict=True):
            setattr(owner, name, fn)
    peaks = {"batch": batch, "peak": tracker.peak >> 20}
    return peaks | {k: v >> 20 for k, v in tracker.phase_peaks.items() if k}


def without_statistics(hp: HParams) -> HParams:
    """C = I: throughput is measured with statistics out of the way (cached in real runs)."""
    return replace(hp, mom2_adjustment=False)
