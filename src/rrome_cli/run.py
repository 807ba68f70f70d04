"""A batch of edits: modes (independent, sequential, retrospective), outputs, resume.

Independent (default): each request is evaluated, edited, evaluated again, then reverted
exactly, so every request starts from the unedited model. Sequential: edits accumulate, each
evaluated right after it is made; ``retrospective`` re-evaluates every request on the final
model. Reports are appended and flushed per request, so an interrupted run keeps what it did
and ``resume`` continues it.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from rrome_cli.config import HParams, from_dict
from rrome_cli.engine.edit import EditResult, edit, edit_independent, protect_edited_keys
from rrome_cli.engine.templates import generate_templates, load_templates, save_templates
from rrome_cli.engine.update import KeyCovariance, Patch, apply_patch
from rrome_cli.evaluate import (
    evaluate_edits,
    evaluate_request,
    evaluate_requests,
    first_collapse,
    first_drift,
    first_keys_full,
    probe_entropy,
)
from rrome_cli.files import (
    append_record,
    done_records,
    new_run_dir,
    package_version,
    refuse_finished_run,
    write_json,
    write_jsonl,
)
from rrome_cli.lengths import check_length, max_positions, template_allowance
from rrome_cli.memcheck.trace import TYPICAL, PromptShape, longest_shape
from rrome_cli.models.families import execution_device, weight_as_out_in
from rrome_cli.models.loading import LoadedModel, check_model_target, save_model_atomic
from rrome_cli.patches import (
    applied,
    check_journal,
    fold_journal,
    journal_edit,
    reported_patches,
)
from rrome_cli.requests import (
    EditRequest,
    RequestError,
    read_json_file,
    read_phrasings,
    read_requests,
    request_to_dict,
    with_phrasings,
)

# A fixed probe set for sequential runs: if the model collapses, its generations here turn
# repetitive and their word entropy falls.
PROBE_PROMPTS = (
    "The capital of France is",
    "My favourite food is",
    "In 1969, the first",
    "The best way to learn a language is",
    "Water boils at",
    "The history of the Roman Empire",
    "She opened the door and",
    "Scientists have discovered that",
)


@dataclass
class RunOptions:
    requests: str  # path, or "-" for standard input
    fmt: str = "auto"
    limit: int | None = None
    skip_invalid: bool = False
    out: Path | None = None  # default: runs/<timestamp>
    report: str | None = None  # "-" also writes each report line to standard output
    sequential: bool = False
    retrospective: bool = False
    seed: int = 0
    templates: Path | None = None
    phrasings: str | None = None  # relation phrasings table (JSON); see requests.read_phrasings
    max_update_ratio: float | None = None
    save_model: bool = False
    fluency: bool = False
    probe_every: int = 50  # sequential: generation entropy on the probe set every N edits
    batch: int = 1  # independent runs: requests in flight together
    shard: list[int] | None = None  # [rank, ranks]: edit only the requests index % ranks == rank
    stats: dict[str, Any] = field(default_factory=dict)  # corpus, tokens, stats_dir, ...
    hparams_from: str | None = None  # the file, or the default recipe and why its layer

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass
class RunState:
    """What a run holds while it goes: the model, templates, statistics, open files."""

    loaded: LoadedModel
    hp: HParams
    opts: RunOptions
    out: Path
    templates: list[str]
    covariances: dict[int, KeyCovariance]
    covariance_source: str
    patches: list[Patch] = field(default_factory=list)  # of the edits the report holds
    unreported: dict[int, list[Patch]] = field(default_factory=dict)  # index -> made, unwritten
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # W0 per edited module
    failed: int = 0
    baseline_entropy: float | None = None  # probe-set entropy of the unedited model
    # per layer, what its C was computed from (the cache file and its key): for run.json
    covariance_from: list[dict[str, str]] = field(default_factory=list)


def library_versions() -> dict[str, str]:
    names = ("rrome-cli", "torch", "transformers", "accelerate", "safetensors", "datasets")
    return {n: package_version(n) for n in names} | {"python": platform.python_version()}


def provenance(state: RunState, templates_file: Path) -> dict[str, Any]:
    model = state.loaded.model
    return {
        "model": state.loaded.model_id,
        "revision": state.loaded.revision,
        "dtype": str(state.loaded.dtype).replace("torch.", ""),
        "devices": sorted({str(p.device) for p in model.parameters()}),
        "variant": state.hp.variant,
        "covariance": state.covariance_source,
        "covariance_from": state.covariance_from,
        "protocol": "sequential" if state.opts.sequential else "independent",
        "templates": str(templates_file),
        "hparams": state.hp.to_dict(),
        "hparams_from": state.opts.hparams_from,
        "modules": state.loaded.structure.to_json() if state.loaded.structure else None,
        "options": state.opts.to_json(),
        "versions": library_versions(),
        "seed": state.opts.seed,
        "started": datetime.now().isoformat(timespec="seconds"),
    }


def prepare_templates(loaded: LoadedModel, hp: HParams, opts: RunOptions, out: Path) -> list[str]:
    path = out / "templates.json"
    if path.exists():  # resuming: the same templates as before
        return load_templates(path)
    if opts.templates:
        templates = load_templates(opts.templates)
    else:
        templates = generate_templates(
            loaded.model, loaded.tok, hp.context_template_length_params, seed=opts.seed
        )
    save_templates(templates, path)
    return templates


def prepare_covariances(
    loaded: LoadedModel, hp: HParams, opts: RunOptions, computed_from: list | None = None
) -> tuple[dict[int, KeyCovariance], str]:
    """Key statistics for each edited layer (cached on disk), or C = I. ``computed_from``
    gets, per layer, the statistics file and the key it was computed for (the model's
    identity, the corpus digest, the token budget)."""
    if not hp.mom2_adjustment:  # one C = I per layer, which sequential runs may add keys to
        identity = {layer: KeyCovariance(None) for layer in hp.layers}
        return identity, "identity (mom2_adjustment: false)"
    from rrome_cli.engine.stats import KEY_FIELDS, second_moment_of

    covariances, sources = {}, []
    stats_dir = opts.stats.get("stats_dir") or hp.stats_dir
    for layer in hp.layers:
        w_device = execution_device(loaded.model.get_submodule(loaded.names.rewrite(layer)))
        stats = second_moment_of(
            loaded,
            layer,
            tokens=opts.stats.get("tokens") or hp.mom2_n_samples,
            corpus=opts.stats.get("corpus"),
            stats_dir=Path(stats_dir) if stats_dir else None,
        )
        covariances[layer] = KeyCovariance(stats.mom2, hp.mom2_ridge, device=w_device)
        sources.append(f"{stats.source} ({stats.tokens} tokens)")
        if computed_from is not None:
            key = {k: stats.metadata[k] for k in KEY_FIELDS if k in stats.metadata}
            computed_from.append({"layer": str(layer), "file": str(stats.path), **key})
    return covariances, "second moment: " + "; ".join(sorted(set(sources)))


def _cumulative_ratio(state: RunState, result: EditResult) -> float:
    """max over edited modules of ||W - W0||_F / ||W0||_F (sequential runs)."""
    ratios = []
    for e in result.layers:
        w = weight_as_out_in(state.loaded.model.get_submodule(e.module)).detach().float()
        w0 = state.base_weights[e.module]  # taken before the run's first edit of the module
        ratios.append(float((w - w0).norm() / w0.norm()))
    return max(ratios, default=0.0)


def _key_fill(state: RunState, result: EditResult) -> float:
    """max over edited layers of protected keys / key dimensions (sequential runs)."""
    return round(max(state.covariances[e.layer].fill for e in result.layers), 4)


def edit_one(state: RunState, index: int, request: EditRequest) -> dict[str, Any]:
    """Sequential runs: evaluate, edit (the edit stays), evaluate again. Returns the record."""
    loaded, opts = state.loaded, state.opts
    start = time.perf_counter()
    pre, reference = evaluate_request(
        loaded.model, loaded.tok, request, fluency=opts.fluency, seed=opts.seed + index
    )
    record = _record(index, request) | {"pre": pre}
    for layer in state.hp.layers:  # remember W0 before the first edit of each module
        name = loaded.names.rewrite(layer)
        w = weight_as_out_in(loaded.model.get_submodule(name))
        state.base_weights.setdefault(name, w.detach().float().clone())
    result = edit(
        loaded.model,
        loaded.tok,
        request,
        state.hp,
        loaded.names,
        state.covariances,
        state.templates,
        opts.max_update_ratio,
    )
    record["status"], record["reason"] = result.status, result.reason
    record["guard"] = guard_record(result)
    if result.status == "applied":
        post, _ = evaluate_request(
            loaded.model,
            loaded.tok,
            request,
            reference,
            fluency=opts.fluency,
            seed=opts.seed + index,
        )
        record["post"] = post
        if reason := no_op_reason(result, pre, post):
            result.revert(loaded.model)  # nothing to keep: no patch, the model as it was
            record["status"], record["reason"] = "no-op", reason
    if record["status"] == "applied":
        _made(state, index, result.patches)
        protect_edited_keys(result.patches, state.covariances, state.hp.protect_weight)
        record["guard"]["cumulative_ratio"] = _cumulative_ratio(state, result)
        if state.hp.protect_weight > 0:
            record["guard"]["key_fill"] = _key_fill(state, result)
        if opts.probe_every and (index + 1) % opts.probe_every == 0:
            record["probe_entropy"] = probe_entropy(loaded.model, loaded.tok, PROBE_PROMPTS)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def independent_records(
    state: RunState, todo: Iterable[tuple[int, EditRequest]]
) -> Iterator[dict[str, Any]]:
    """Independent edits of ``todo`` ((index, request) pairs), ``opts.batch`` in flight
    together (``edit_independent``); each is evaluated before and after on its own edited
    model (``evaluate_edits``), nothing applied to the weights. Records come as edits finish,
    which need not be in index order."""
    loaded, opts = state.loaded, state.opts
    index_of: dict[int, int] = {}  # id(request) -> its index, while it is in flight
    started: dict[int, float] = {}

    bad_input: list[RequestError] = []

    def admitted() -> Iterator[EditRequest]:
        try:
            for index, request in todo:
                index_of[id(request)] = index
                started[index] = time.perf_counter()
                yield request
        except RequestError as err:  # read ahead: finish the edits before it, then stop
            bad_input.append(err)

    results = edit_independent(
        loaded.model,
        loaded.tok,
        admitted(),
        state.hp,
        loaded.names,
        state.covariances,
        state.templates,
        opts.max_update_ratio,
        opts.batch,
    )
    finished: list[tuple[int, EditRequest, EditResult]] = []
    for request, result in results:
        finished.append((index_of.pop(id(request)), request, result))
        if len(finished) >= opts.batch:  # evaluated together: one pass for the lot
            yield from _evaluated(state, finished, started)
            finished = []
    yield from _evaluated(state, finished, started)
    if bad_input:
        raise bad_input[0]


def _evaluated(
    state: RunState,
    finished: list[tuple[int, EditRequest, EditResult]],
    started: dict[int, float],
) -> Iterator[dict[str, Any]]:
    loaded, opts = state.loaded, state.opts
    made = [(i, r, res) for i, r, res in finished if res.status != "failed"]
    metrics = evaluate_edits(
        loaded.model,
        loaded.tok,
        [r for _, r, _ in made],
        [res.patches for _, _, res in made],
        fluency=opts.fluency,
        seed=opts.seed,
    )
    pre_post = {i: m for (i, _, _), m in zip(made, metrics, strict=True)}
    for index, request, result in finished:
        record = _record(index, request)
        if result.status == "failed":
            state.failed += 1
            record |= {"status": "failed", "reason": result.reason}
        else:
            pre, post = pre_post[index]
            record |= {"pre": pre, "status": result.status, "reason": result.reason}
            record["guard"] = guard_record(result)
            if post is not None:
                record["post"] = post
                if reason := no_op_reason(result, pre, post):
                    record["status"], record["reason"] = "no-op", reason
                else:
                    _made(state, index, result.patches)
        record["seconds"] = round(time.perf_counter() - started.pop(index), 3)
        yield record


def _record(index: int, request: EditRequest) -> dict[str, Any]:
    return {
        "index": index,
        "case_id": request.case_id,
        "source": request.source,
        "request": request_to_dict(request),
    }


def _made(state: RunState, index: int, patches: list[Patch]) -> None:
    """An edit's patches: journalled now (before its report line), kept until its line is
    written (``run_edits``)."""
    journal_edit(state.out, index, patches, _with_keys(state))
    state.unreported[index] = patches


# An applied edit whose target NLL moved by less than this (relative) did nothing
UNMOVED = 1e-6


def no_op_reason(result: EditResult, pre: dict[str, Any], post: dict[str, Any]) -> str:
    """Why an edit that was applied changed nothing (empty when it did something): its update
    is zero, or the target's probability on the edited prompt did not move. Such an edit is
    reported as "no-op", not "applied": a run of them must not pass as a run of edits."""
    if all(e.update_ratio == 0 for e in result.layers):
        return "the update is zero: the model is unchanged"
    before, after = pre.get("nll_new"), post.get("nll_new")
    if isinstance(before, float) and isinstance(after, float):
        if abs(after - before) <= UNMOVED * max(1.0, abs(before)):
            return f"the target's probability did not move (NLL {before:.6g} before and after)"
    return ""


def guard_record(result: EditResult) -> dict[str, Any]:
    layers = [e.guard() for e in result.layers]
    if len(layers) == 1:
        return dict(layers[0])
    return {"update_ratio": max((g["update_ratio"] for g in layers), default=0.0), "layers": layers}


def guard_layers(guard: dict[str, Any]) -> list[dict[str, Any]]:
    """A report's ``guard`` per edited layer: the record's own figures for a one-layer recipe,
    its ``layers`` for several (what ``guard_record`` writes)."""
    return guard.get("layers", [guard])


def _requests(
    opts: RunOptions, warn: Callable[[str], None], state: RunState | None = None
) -> Iterator[EditRequest]:
    """The run's requests, with their relation phrasings; given the run's ``state``, each
    is also checked against the model's context (a bad one raises, or with --skip-invalid is
    reported and skipped, as a malformed record is)."""
    table = read_phrasings(opts.phrasings) if opts.phrasings else {}
    if state is not None:
        limit = max_positions(state.loaded.model.config)
        allowance = template_allowance(state.loaded.tok, state.hp, state.templates)
    for request in read_requests(
        opts.requests,
        fmt=opts.fmt,
        skip_invalid=opts.skip_invalid,
        limit=opts.limit,
        warn=warn,
    ):
        request = with_phrasings(request, table)
        if state is not None:
            try:
                check_length(state.loaded.tok, request, limit, allowance, opts.fluency)
            except RequestError as err:
                if not opts.skip_invalid:
                    raise
                warn(f"skipped: {err}")
                continue
        yield request


@dataclass
class Survey:
    """What a requests file tells memcheck before the model loads."""

    phrasings: bool  # relation phrasings (--phrasings, or a request's own): more value rows
    shape: PromptShape  # the longest request's, which the plan is for


def survey_requests(
    tok: PreTrainedTokenizerBase,
    config: PretrainedConfig,
    hp: HParams,
    opts: RunOptions,
    resume: Path | None = None,
) -> Survey:
    """Before the model loads, one pass over a requests file: every request fits the model's
    context, its prompt behind the longest context template (the run's own, or a bound from
    ``hp``) with the target (the first that does not raises, naming its file, line and field;
    under --skip-invalid the run reports it at its turn); whether requests bring relation
    phrasings; and the longest request's shape. Standard input is not read twice: the run
    checks each record as it reads it, and memcheck plans a typical request."""
    if opts.requests == "-":
        return Survey(bool(opts.phrasings), TYPICAL)
    saved = resume / "templates.json" if resume else None
    source = saved if saved and saved.exists() else opts.templates
    templates = load_templates(source) if source else None
    limit = max_positions(config)
    allowance = template_allowance(tok, hp, templates)
    table = read_phrasings(opts.phrasings) if opts.phrasings else {}
    fitting = []
    with warnings.catch_warnings():  # the run warns about its records itself, once
        warnings.simplefilter("ignore")
        found = read_requests(  # bad records: refused before (or, skipped, reported later)
            opts.requests, fmt=opts.fmt, skip_invalid=True, limit=opts.limit, on_skip=_ignore
        )
        for request in found:
            try:
                check_length(tok, request, limit, allowance, opts.fluency)
            except RequestError:
                if not opts.skip_invalid:
                    raise
                continue
            fitting.append(with_phrasings(request, table))
    phrasings = bool(opts.phrasings) or any(r.phrasings for r in fitting)
    return Survey(phrasings, longest_shape(tok, fitting))


def _ignore(_: object) -> None:
    return None


def run_edits(
    loaded: LoadedModel,
    hp: HParams,
    opts: RunOptions,
    console: Console,
    resume: Path | None = None,
    after_record: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Run a batch; returns the run directory and the summary."""
    from rrome_cli.evaluate import render_summary, summarise, write_html

    if not resume:
        refuse_finished_run(opts.out)
    # before the run directory is made: a bad corpus (or Ctrl-C here) leaves none behind
    cov_from: list[dict[str, str]] = []
    covariances, cov_source = prepare_covariances(loaded, hp, opts, cov_from)
    out = new_run_dir(resume or opts.out)
    report_path = out / "report.jsonl"
    previous = done_records(report_path) if resume else []
    if resume:
        write_jsonl(report_path, previous)  # drop a torn tail
    templates = prepare_templates(loaded, hp, opts, out)
    state = RunState(loaded, hp, opts, out, templates, covariances, cov_source)
    state.covariance_from = cov_from
    if resume:
        prov = json.loads((out / "run.json").read_text())
    else:
        prov = provenance(state, out / "templates.json")
    if opts.sequential and opts.probe_every and "baseline_entropy" not in prov:
        # measured on the unedited model, before any (re-applied) edit
        prov["baseline_entropy"] = probe_entropy(loaded.model, loaded.tok, PROBE_PROMPTS)
    state.baseline_entropy = prov.get("baseline_entropy")
    write_json(out / "run.json", prov)
    if resume:
        resume_patches(state, previous)
    records = list(previous)
    done = {r["index"] for r in previous}
    stdout = sys.stdout if opts.report == "-" else None
    progress = Progress(
        TextColumn("[bold]edits"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console,
    )

    def warn(message: str) -> None:
        console.print(f"[yellow]{message}")

    requests: list[EditRequest] = []  # every request read, for the retrospective

    def skipped(index: int) -> bool:  # done before, or another rank's (torchrun)
        return index in done or (opts.shard is not None and index % opts.shard[1] != opts.shard[0])

    def todo() -> Iterator[tuple[int, EditRequest]]:
        for index, request in enumerate(_requests(opts, warn, state)):
            requests.append(request)
            if not skipped(index):
                yield index, request

    if opts.sequential:
        made = (_safe_edit(state, index, request, console) for index, request in todo())
    else:
        made = independent_records(state, todo())
    try:
        with report_path.open("a") as report, progress:
            task = progress.add_task("", total=opts.limit, completed=len(done))
            for record in _in_order(made, skipped):
                state.patches.extend(state.unreported.pop(record["index"], []))
                records.append(record)
                append_record(report, record, stdout)
                request = record["request"]
                progress.update(task, description=f"{request['prompt']} -> {request['target_new']}")
                progress.advance(task)
                if after_record:
                    after_record(record)
    finally:  # also on Ctrl-C: patches.safetensors then holds every edit the report holds
        keep_reported_patches(state, report_path)
        save_run_patches(state)
    shown = ("model", "dtype", "devices", "variant", "covariance", "protocol", "templates")
    summary = summarise(records) | {"provenance": {k: prov[k] for k in shown}}
    summary["failed_internal"] = state.failed
    if opts.sequential:
        summary |= sequential_summary(state, records, console)
    retro: list[dict[str, Any]] = []
    if opts.sequential and opts.retrospective:
        retro = retrospective(state, requests, records)
        write_jsonl(out / "retrospective.jsonl", retro)
        retro_summary = summarise([{"status": r["status"], "post": r["retro"]} for r in retro])
        summary["retrospective"] = retro_summary["metrics"]["post"]
    write_json(out / "summary.json", summary)
    write_html(out / "report.html", summary, records, summary["provenance"], retro)
    if opts.save_model:
        save_model_atomic(loaded, out / "model")
    render_summary(summary, summary["provenance"], console)
    if "retrospective" in summary:
        retro_view = {**retro_summary, "metrics": {"pre": {}, "post": summary["retrospective"]}}
        render_summary(retro_view, {"protocol": "retrospective (all edits applied)"}, console)
    return out, summary


def _in_order(
    records: Iterable[dict[str, Any]], skipped: Callable[[int], bool]
) -> Iterator[dict[str, Any]]:
    """``records`` in index order: a record is held back until every earlier index that is
    not ``skipped`` has come."""
    held: dict[int, dict[str, Any]] = {}
    next_index = 0
    for record in records:
        held[record["index"]] = record
        while True:
            while skipped(next_index) and next_index not in held:
                next_index += 1
            if next_index not in held:
                break
            yield held.pop(next_index)
            next_index += 1


def sequential_summary(
    state: RunState, records: list[dict[str, Any]], console: Console
) -> dict[str, Any]:
    """Collapse (entropy drop or update blow-up) and the drift and full-keys warnings of a
    sequential run."""
    collapse = first_collapse(records, state.baseline_entropy)
    drift = first_drift(records)
    full = first_keys_full(records)
    if collapse:
        console.print(
            f"[red]collapse at edit {collapse.index}: {collapse.reason} "
            f"({collapse.value:.4g} vs {collapse.threshold:.4g})"
        )
    if drift:
        console.print(
            f"[yellow]warning: from edit {drift.index} the accumulated change ||W - W0||/||W0|| "
            f"is {drift.value:.3g} (> {drift.threshold:g}); not a collapse by itself"
        )
    if full:
        console.print(
            f"[yellow]warning: from edit {full.index} the protected keys outnumber the edited "
            "layer's key dimensions: later edits wear the earlier ones faster (on SmolLM2 "
            "about 300 edits hold; docs/results.md)"
        )
    return {
        "baseline_entropy": state.baseline_entropy,
        "collapsed": collapse is not None,
        "collapse": asdict(collapse) if collapse else None,
        "drift": asdict(drift) if drift else None,
        "keys_full": asdict(full) if full else None,
    }


def _with_keys(state: RunState) -> bool:
    return state.opts.sequential and state.hp.protect_weight > 0  # a resume needs the keys


def save_run_patches(state: RunState) -> None:
    """Every patch of the run in ``patches.safetensors``; the journal goes."""
    fold_journal(state.out, state.patches, _with_keys(state))


def keep_reported_patches(state: RunState, report: Path) -> None:
    """Drop the patches of an edit whose report line was never written: an interruption
    between the two leaves one edit more in memory than the report holds (a resume makes
    it again). The report on disk is the record of what was done."""
    del state.patches[applied(done_records(report)) * len(state.hp.layers) :]


def resume_patches(state: RunState, previous: list[dict[str, Any]]) -> None:
    """Take back the patches of the records the report holds (``reported_patches``) and fold
    them; a sequential run also re-applies them, bringing the model back to where the
    interrupted run stood."""
    state.patches = reported_patches(state.out, previous, len(state.hp.layers))
    save_run_patches(state)
    if not state.opts.sequential:
        return
    for patch in state.patches:
        w = weight_as_out_in(state.loaded.model.get_submodule(patch.module))
        state.base_weights.setdefault(patch.module, w.detach().float().clone())
        apply_patch(state.loaded.model, patch)
    protect_edited_keys(state.patches, state.covariances, state.hp.protect_weight)


def check_resume(out: Path, hp: HParams, opts: RunOptions) -> None:
    """Before the model loads: ``--resume out`` can keep its report and patches in step, and
    will replace no model folder that rrome did not write."""
    check_journal(out, len(hp.layers))
    if opts.save_model:
        check_model_target(out / "model")


def _safe_edit(
    state: RunState, index: int, request: EditRequest, console: Console
) -> dict[str, Any]:
    try:
        return edit_one(state, index, request)
    except (FloatingPointError, ValueError, RuntimeError) as err:
        state.failed += 1
        console.print(f"[red]request {index} ({request.source}) failed: {err}")
        return _record(index, request) | {"status": "failed", "reason": str(err)}


def retrospective(
    state: RunState, requests: list[EditRequest], records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every request re-evaluated on the final model (sequential runs); locality against the
    unedited model, whose weights are put back briefly to take the reference predictions."""
    model, tok = state.loaded.model, state.loaded.tok
    final = {}
    for name, w0 in state.base_weights.items():
        w = weight_as_out_in(model.get_submodule(name))
        final[name] = w.detach().clone()
        with torch.no_grad():
            w.copy_(w0.to(w.dtype))
    unedited = evaluate_requests(model, tok, requests)
    for name, w in final.items():
        with torch.no_grad():
            weight_as_out_in(model.get_submodule(name)).copy_(w)
    retro = evaluate_requests(model, tok, requests, [ref for _, ref in unedited])
    status = {r["index"]: r.get("status") for r in records}
    return [
        {"index": i, "status": status.get(i), "retro": metrics}
        for i, (metrics, _) in enumerate(retro)
    ]


def load_run(out: Path) -> tuple[dict[str, Any], HParams, RunOptions]:
    """run.json of an earlier run: its provenance, hparams and options (for --resume)."""
    prov = read_json_file(out / "run.json")
    if not isinstance(prov, dict) or not isinstance(prov.get("options"), dict):
        raise RequestError(str(out / "run.json"), None, None, "not an rrome run.json")
    opts = dict(prov["options"])
    for key in ("out", "templates"):
        opts[key] = Path(opts[key]) if opts.get(key) else None
    return prov, from_dict(prov["hparams"], where=str(out / "run.json")), RunOptions(**opts)
