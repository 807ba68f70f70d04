"""``rrome eval``: evaluate requests on a model as is, on a base model plus patches, or on a
second model against the first. Writes the same report.jsonl / summary.json as ``rrome edit``,
each record's status "evaluated": nothing is edited here.

Protocol: "pre" is always ``--model`` as loaded; "post" is the patched model (``--patches``) or
the ``--compare`` model, with locality measured against "pre".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from rrome_cli.engine.update import apply_patch
from rrome_cli.evaluate.html_report import write_html
from rrome_cli.evaluate.metrics import evaluate_requests
from rrome_cli.evaluate.summary import EVALUATED, render_summary, summarise
from rrome_cli.files import new_run_dir, refuse_finished_run, write_json, write_jsonl
from rrome_cli.lengths import check_length, max_positions
from rrome_cli.models.loading import load_model
from rrome_cli.patches import check_patches_fit, load_patches, warn_if_independent
from rrome_cli.requests import EditRequest, read_requests, request_to_dict


@dataclass
class EvalOptions:
    requests: str
    model: str | None = None
    patches: Path | None = None
    compare: str | None = None
    dtype: str | None = None
    devices: str | None = None
    out: Path | None = None
    fmt: str = "auto"
    limit: int | None = None
    seed: int = 0
    skip_invalid: bool = False
    fluency: bool = False
    html: Path | None = None


def run_eval(opts: EvalOptions, console: Console) -> dict:
    refuse_finished_run(opts.out, resumable=False)  # its report and summary would be replaced
    requests: list[EditRequest] = list(
        read_requests(
            opts.requests,
            fmt=opts.fmt,
            skip_invalid=opts.skip_invalid,
            limit=opts.limit,
            warn=lambda m: console.print(f"[yellow]{m}"),
        )
    )
    patches = load_patches(opts.patches) if opts.patches else []  # before the long part
    base = load_model(opts.model, opts.dtype, opts.devices)
    positions = max_positions(base.model.config)
    for request in requests:  # before any forward allocates for it
        check_length(base.tok, request, positions, 0, opts.fluency)
    if opts.patches:
        check_patches_fit(base.model, patches, opts.patches)
    console.print(f"evaluating {len(requests)} requests on {base.model_id}")
    pre = evaluate_requests(base.model, base.tok, requests, fluency=opts.fluency, seed=opts.seed)
    post_model, protocol = None, "as is"
    if opts.patches:
        warn_if_independent(opts.patches, len(patches), console)
        for patch in patches:
            apply_patch(base.model, patch)
        post_model, protocol = base, f"base + {len(patches)} patches ({opts.patches})"
    elif opts.compare:
        post_model = load_model(opts.compare, opts.dtype, opts.devices)
        protocol = f"{base.model_id} vs {post_model.model_id}"
    post = None
    if post_model is not None:  # locality against the predictions of the first model
        references = [r for _, r in pre]
        post = evaluate_requests(
            post_model.model, post_model.tok, requests, references, opts.fluency, opts.seed
        )
    records = []
    for i, request in enumerate(requests):
        record = {
            "index": i,
            "case_id": request.case_id,
            "source": request.source,
            "request": request_to_dict(request),
            "status": EVALUATED,  # nothing was edited here
            "pre": pre[i][0],
        }
        if post is not None:
            record["post"] = post[i][0]
        records.append(record)
    out = new_run_dir(opts.out)
    write_jsonl(out / "report.jsonl", records)
    summary = summarise(records)
    provenance = {
        "model": base.model_id,
        "dtype": str(base.dtype).replace("torch.", ""),
        "protocol": protocol,
    }
    write_json(out / "summary.json", summary | {"provenance": provenance})
    render_summary(summary, provenance, console)
    if opts.html:
        write_html(opts.html, summary, records, provenance)
        console.print(f"HTML report: {opts.html}")
    console.print(f"report written to [bold]{out}[/bold]")
    return summary
