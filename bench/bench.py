"""``make bench``: speed, memory and edit quality of R-ROME on the embedded SmolLM2-135M (CPU).

    python bench/bench.py            # the full protocol (hours on a 2-core CPU)
    python bench/bench.py --quick    # a reduced version (minutes)
    python bench/bench.py --only "C=I"   # only the sections whose name has "C=I"
    python bench/bench.py --table        # measure nothing: the table of what is measured

The full bench keeps its runs and finished sections under runs/bench/full (--work DIR): run the
same command again to continue an interrupted bench (a finished section is not measured twice;
a quality run resumes where it stopped), so it can be run in pieces. Delete that folder to
measure everything afresh. The quick bench measures afresh each time.

Prints its tables (``--markdown``: the quality table in Markdown, for docs/results.md) and writes
``bench/results/<date>.json`` with the machine and library versions.
Sections: per-edit time (keys / value optimisation / solve / apply, steps, overhead ratio),
statistics throughput vs a full forward, peak memory of an edit vs memcheck, quality in
independent mode (CounterFact and zsRE; r-rome with statistics, r-rome with C = I, rome; and
r-rome with CounterFact's relation phrasings; the shipped recipe on 200 held-out records of each,
CounterFact 2000-2199 and zsRE 200-399; fluency pre and post from each run's patches, and how
often an edited continuation repeats the new object),
throughput of independent runs by --batch (and 2 torchrun processes against 1) and
a 1,000-edit sequential run (immediate and retrospective metrics, update norms, entropy,
collapse; kept between sessions with bench/keep_run.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PHRASINGS = ROOT / "data" / "counterfact-phrasings.json"
sys.path.insert(0, str(ROOT / "bench"))

from bench_stats import bench_stats  # noqa: E402
from rephrase_split import read_labels, read_rows, rephrase_by_case, split, with_seen_phrasing  # noqa: E402
from throughput import measure  # noqa: E402

from rrome_cli.config import (  # noqa: E402
    HParams,
    HParamsError,
    from_dict,
    load_hparams,
    shipped_hparams,
)
from rrome_cli.engine.edit import edit  # noqa: E402
from rrome_cli.engine.templates import generate_templates  # noqa: E402
from rrome_cli.engine.update import KeyCovariance, Patch, apply_patch, restore_weight  # noqa: E402
from rrome_cli.evaluate import summarise  # noqa: E402
from rrome_cli.evaluate.fluency import generate, n_gram_entropy  # noqa: E402
from rrome_cli.memcheck import geometry_for, measure_peak, plan  # noqa: E402
from rrome_cli.models.loading import LoadedModel, load_model  # noqa: E402
from rrome_cli.patches import load_patches  # noqa: E402
from rrome_cli.requests import EditRequest, read_requests, request_to_dict  # noqa: E402
from rrome_cli.run import (  # noqa: E402
    RunOptions,
    guard_layers,
    library_versions,
    load_run,
    prepare_covariances,
    run_edits,
)

console = Console(stderr=True)
QUIET = Console(stderr=True, quiet=True)


def requests_file(source: Path, fmt: str, start: int, n: int, tmp: Path) -> Path:
    """``n`` requests of a shared data file from record ``start``, as EasyEdit JSONL."""
    reqs = list(
        read_requests(source, fmt=fmt, skip_invalid=True, limit=start + n, warn=lambda m: None)
    )
    path = tmp / f"{source.stem}-{start}-{n}.jsonl"
    path.write_text("".join(json.dumps(request_to_dict(r)) + "\n" for r in reqs[start:]))
    return path


def edit_inputs(loaded: LoadedModel, hp: HParams) -> tuple[dict[int, KeyCovariance], list[str]]:
    """What an edit outside a run needs: each layer's key statistics (cached) and templates."""
    covariances, _ = prepare_covariances(loaded, hp, RunOptions(requests=""))
    templates = generate_templates(loaded.model, loaded.tok, hp.context_template_length_params)
    return covariances, templates


def speed(loaded: LoadedModel, hp: HParams, requests: list[EditRequest]) -> dict[str, Any]:
    """Per-edit time with statistics cached and templates generated once."""
    covariances, templates = edit_inputs(loaded, hp)
    rows = []
    for request in requests:
        result = edit(loaded.model, loaded.tok, request, hp, loaded.names, covariances, templates)
        # a multi-layer recipe edits its layers one after another: their times add up
        seconds = {k: sum(e.seconds[k] for e in result.layers) for k in result.layers[0].seconds}
        steps = sum(e.steps for e in result.layers)
        total = sum(v for k, v in seconds.items() if k != "step")
        loop = sum(e.steps * e.seconds["step"] for e in result.layers)
        if steps:  # per step, over all layers
            seconds["step"] = loop / steps
        rows.append(
            {
                **seconds,
                "total": total,
                "steps": steps,
                "overhead": total / loop if loop else float("nan"),
            }
        )
        result.revert(loaded.model)
    out: dict[str, Any] = {"n": len(rows)}
    for key in ("total", "keys", "values", "solve", "apply", "step", "steps", "overhead"):
        values = [r[key] for r in rows]
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        out[key] = {"median": statistics.median(values), "q1": q[0], "q3": q[2]}
    return out


def memory(loaded: LoadedModel, hp: HParams, request: EditRequest) -> dict[str, Any]:
    """Peak bytes of live tensors during one edit vs memcheck's prediction for that request."""
    covariances, templates = edit_inputs(loaded, hp)
    results = []
    peak = measure_peak(
        lambda: results.append(
            edit(loaded.model, loaded.tok, request, hp, loaded.names, covariances, templates)
        )
    )
    results[0].revert(loaded.model)
    geometry = geometry_for(
        loaded.tok, request, templates, whole_bare=hp.v_realized_delta == "bare"
    )
    predicted = plan(None, None, "cpu", None, hp, geometry=geometry).devices[0].edit
    return {"measured_bytes": peak, "predicted_bytes": predicted, "ratio": peak / predicted}


def quality(
    loaded: LoadedModel, hp: HParams, path: Path, out: Path, labelled: bool = False, **opts: Any
) -> dict:
    """The run's summary, with the median seconds and steps per edit and (independent runs)
    fluency pre and post; ``labelled`` (CounterFact): with rephrase split by whether the
    rephrased prompt asks the same question (bench/counterfact-rephrase-labels.json).
    A run left unfinished in ``out`` (an earlier, interrupted bench) is resumed."""
    if (out / "run.json").exists() and load_run(out)[1].to_dict() != hp.to_dict():
        retire(out, out.parent)  # made with an earlier recipe: kept aside, measured afresh
    resume = out if (out / "report.jsonl").exists() else None
    run_dir, summary = run_edits(
        loaded, hp, RunOptions(requests=str(path), out=out, **opts), QUIET, resume=resume
    )
    rows = read_rows(run_dir / "report.jsonl")
    applied = [r for r in rows if r["status"] == "applied"]
    if applied:  # time per edit (both evaluations included) and value-optimisation steps
        per_layer = [[g["steps"] for g in guard_layers(r["guard"])] for r in applied]
        summary["edit"] = {
            "seconds_median": statistics.median(r["seconds"] for r in applied),
            "steps_median": statistics.median(sum(s) for s in per_layer),
            "capped": sum(max(s) >= hp.v_num_grad_steps for s in per_layer),
        }
    if not opts.get("sequential"):
        for phase, stats in fluency(loaded, run_dir).items():
            summary["metrics"][phase]["fluency"] = stats
    if labelled:
        labels, second = read_labels()
        scores = rephrase_by_case(rows, "post")
        summary["rephrase_by_label"] = split(scores, labels, with_seen_phrasing(rows), second)
    return summary


FLUENCY_RECORDS = 100  # the first records of a run; a post-edit generation takes ~4 s here


def fluency(
    loaded: LoadedModel, run_dir: Path, limit: int = FLUENCY_RECORDS
) -> dict[str, dict[str, float]]:
    """Fluency pre and post edit of an independent run's first ``limit`` records: ROME's n-gram
    entropy of a greedy 50-token generation from each edited prompt, as ``rrome edit
    --fluency`` measures it, taken afterwards from the run's patches so that finished runs need
    not be redone (pre: the prompts in one batch on the unedited model; post: each record's
    patch applied alone, the generation made, the weight restored bit for bit). Rows are kept
    in ``run_dir/fluency.jsonl``, so an interrupted pass continues; a record without a patch
    (runs made before patches were saved per record lost some on a resume) is left out. Each
    row also keeps both texts and how often the post-edit one says the new object; the post
    stats count the continuations that say it more than twice (``repeats_over_2``)."""
    model, tok = loaded.model, loaded.tok
    by_name: dict[str, list[Patch]] = {}
    for patch in load_patches(run_dir / "patches.safetensors"):
        by_name.setdefault(patch.request, []).append(patch)
    path = run_dir / "fluency.jsonl"
    rows = read_rows(path) if path.exists() else []
    done = {r["index"] for r in rows}
    todo = []  # (report record, its patches, its prompt)
    for record in read_rows(run_dir / "report.jsonl")[:limit]:
        patches = by_name.get(str(record["case_id"])) or by_name.get(record["source"], [])
        if record["index"] not in done and record["status"] == "applied" and patches:
            request = record["request"]
            todo.append((record, patches, request["prompt"].replace("{}", request["subject"])))
    pre = generate(model, tok, [prompt for _, _, prompt in todo]) if todo else []
    with path.open("a") as out:
        for (record, patches, prompt), pre_text in zip(todo, pre, strict=True):
            saved = [(p.module, apply_patch(model, p)) for p in patches]
            post_text = generate(model, tok, [prompt])[0]
            for module, weight in reversed(saved):
                restore_weight(model.get_submodule(module), weight)
            row = {"index": record["index"]}
            row |= {"pre": {"fluency": n_gram_entropy([pre_text])}}
            row |= {"post": {"fluency": n_gram_entropy([post_text])}}
            # issue 35: the new object said more than twice in a continuation is a loop
            row |= {"repeats": said(post_text, record["request"]["target_new"])}
            row |= {"pre_text": pre_text, "post_text": post_text}
            out.write(json.dumps(row) + "\n")
            out.flush()
            rows.append(row)
    if not rows:
        return {}
    stats = {phase: table["fluency"] for phase, table in summarise(rows)["metrics"].items()}
    counted = [r["repeats"] for r in rows if "repeats" in r]  # rows of before 2026-12-04: none
    if counted:
        stats["post"] |= {"repeats_over_2": sum(n > 2 for n in counted), "repeats_of": len(counted)}
    return stats


def said(text: str, words: str) -> int:
    """How often ``text`` says ``words`` as words of its own ("Brazil" is not in "Brazilian")."""
    return len(re.findall(rf"(?<!\w){re.escape(words.strip())}(?!\w)", text))


def throughput(
    loaded: LoadedModel, hp: HParams, path: Path, work: Path, batches: list[int], n: int
) -> dict[str, Any]:
    """Edits per second of whole independent runs (``rrome edit --batch N``) over the same
    ``n`` records, side by side; then, at the fastest batch, one process of two threads
    against two torchrun processes of one thread each (both as a user runs them)."""
    prepare_covariances(loaded, hp, RunOptions(requests=""))  # cached before the timed runs
    rows = measure(loaded, hp, path, batches, work / "batches", limit=n)
    best = max(rows, key=lambda row: row["edits_per_second"])["batch"]
    templates = work / "batches" / "templates.json"
    return {"rows": rows, "processes": processes(path, work, best, n, templates)}


def processes(path: Path, work: Path, batch: int, n: int, templates: Path) -> list[dict]:
    """Wall seconds of ``rrome edit`` (model load included) as 1 process x 2 threads and as
    torchrun's 2 processes x 1 thread, run one after the other."""
    edit = ["-m", "rrome_cli.cli", "edit", str(path), "--model", "smollm2-135m",
            "--devices", "cpu", "--limit", str(n), "--batch", str(batch),
            "--templates", str(templates)]  # fmt: skip
    ways = {
        "1 process x 2 threads": (2, [sys.executable, *edit]),
        "2 processes x 1 thread": (
            1,
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *edit],
        ),
    }
    rows = []
    for name, (threads, cmd) in ways.items():
        out = work / _slug(name)
        shutil.rmtree(out, ignore_errors=True)
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        subprocess.run([*cmd, "--out", str(out)], env=env, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        rows.append({"how": name, "batch": batch, "edits": n, "seconds": round(seconds, 1),
                     "edits_per_second": round(n / seconds, 3)})  # fmt: skip
    return rows


def retire(path: Path, work: Path) -> None:
    """Move a section or run measured with an earlier recipe to ``work/earlier/``, named by
    when it was last written: nothing measured is deleted."""
    stamp = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y%m%dT%H%M%S")
    (work / "earlier").mkdir(parents=True, exist_ok=True)
    target, n = work / "earlier" / f"{path.stem}-{stamp}{path.suffix}", 1
    while target.exists():  # two retired within the same second: neither is overwritten
        n += 1
        target = work / "earlier" / f"{path.stem}-{stamp}-{n}{path.suffix}"
    path.rename(target)


def sequential(loaded: LoadedModel, hp: HParams, path: Path, out: Path, n: int) -> dict:
    """The sequential run's summary with its retrospective rewrite of the first edits and its
    entropy and update-norm curves."""
    summary = quality(
        loaded,
        hp,
        path,
        out,
        labelled=True,
        sequential=True,
        retrospective=True,
        probe_every=max(1, n // 10),
    )
    retro = read_rows(out / "retrospective.jsonl")
    first = retro[: max(1, min(100, len(retro) // 3))]
    summary["retro_rewrite_first"] = statistics.mean(r["retro"]["rewrite_acc"] for r in first)
    summary["retro_first_n"] = len(first)
    records = read_rows(out / "report.jsonl")
    summary["entropy_curve"] = [
        (r["index"], r["probe_entropy"]) for r in records if "probe_entropy" in r
    ]
    summary["update_ratio_curve"] = [(r["index"], r["guard"].get("update_ratio")) for r in records]
    return summary


def config(hp: HParams, **changes: Any) -> HParams:
    return HParams(**(hp.to_dict() | changes))


class Section(NamedTuple):
    """One measurement of the bench, not yet run, and the hyperparameters it measures."""

    run: Callable[[], dict]
    recipe: dict[str, Any]


def sections(
    model: Callable[[], LoadedModel], hp: HParams, quick: bool, work: Path
) -> dict[str, Section]:
    """Every measurement of the bench, by name, in the order they run; none runs here.
    ``model`` loads the model when a section first needs it (``--table`` never does)."""
    n_speed, n_quality, n_seq, stats_tokens = (3, 2, 4, 5_000) if quick else (20, 200, 1000, 20_000)
    cf = SHARED / "counterfact" / "counterfact-edit.json"
    zsre = SHARED / "zsre" / "zsre_mend_train-1k.json"
    data = work / "requests"
    data.mkdir(parents=True, exist_ok=True)
    speed_reqs = list(read_requests(requests_file(cf, "counterfact", 1000, n_speed, data)))
    paths = {  # the records the recipe was tuned on
        "counterfact": requests_file(cf, "counterfact", 0, n_quality, data),
        "zsre": requests_file(zsre, "zsre", 0, n_quality, data),
    }
    # records no recipe choice ever saw (issue 35), measured with the shipped recipe only:
    # every choice was measured within CounterFact's first 2,000 and zsRE's first 200
    held_out = {
        f"{fmt} {start}-{start + n_quality - 1}": requests_file(source, fmt, start, n_quality, data)
        for fmt, (source, start) in {"counterfact": (cf, 2000), "zsre": (zsre, 200)}.items()
    }
    variants = {
        "r-rome + C": hp,
        "r-rome, C=I": config(hp, mom2_adjustment=False),
        "rome + C": config(hp, variant="rome"),
    }

    def later(measure: Callable[..., Any], h: HParams, *args: Any, **kwargs: Any) -> Section:
        return Section(lambda: measure(model(), h, *args, **kwargs), h.to_dict())

    todo = {
        "speed": later(speed, hp, speed_reqs),
        "stats": later(lambda loaded, h: bench_stats(loaded, h.layers[0], stats_tokens), hp),
        "memory": later(memory, hp, speed_reqs[0]),
    }
    for name, h in variants.items():
        for dataset, path in paths.items():
            key = f"{name} | {dataset}"
            todo[f"quality: {key}"] = later(
                quality, h, path, work / _slug(key), labelled=dataset == "counterfact"
            )
    for dataset, path in held_out.items():
        key = f"r-rome + C | {dataset}"
        todo[f"quality: {key}"] = later(
            quality, hp, path, work / _slug(key), labelled=dataset.startswith("counterfact")
        )
    key = "r-rome + C, --phrasings | counterfact"
    todo[f"quality: {key}"] = later(
        quality,
        hp,
        paths["counterfact"],
        work / _slug(key),
        labelled=True,
        phrasings=str(PHRASINGS),
    )
    n_through, batches = (8, [1, 4]) if quick else (40, [1, 2, 4, 8, 16])
    through = requests_file(cf, "counterfact", 1000, n_through, data)
    todo["throughput"] = later(throughput, hp, through, work / "throughput", batches, n_through)
    seq_path = requests_file(cf, "counterfact", 0, n_seq, data)
    todo["sequential"] = later(sequential, hp, seq_path, work / "sequential", n_seq)
    return todo


def cpu_model() -> str:
    """The CPU's name (``platform.processor()`` is empty on Linux): step times move with it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-=" else "_" for c in name)


def same_recipe(kept: dict | None, recipe: dict) -> bool:
    """Whether a kept section measured ``recipe``: hyperparameters added since it was
    measured count at their defaults (a new one defaults to the behaviour before it)."""
    try:
        return kept is not None and from_dict(kept).to_dict() == from_dict(recipe).to_dict()
    except HParamsError:  # a hyperparameter since removed
        return False


def run_sections(
    todo: dict[str, Section], work: Path, only: list[str], measure: bool = True
) -> tuple[dict, list[str]]:
    """Each section's result, measured now or read back from an earlier (interrupted) bench,
    and the names of those kept from an earlier recipe (not in the results).

    A finished section is kept in ``work/sections/<name>.json`` with the date it was measured
    and its recipe, so the full protocol (hours) can be run in pieces: ``--only`` picks
    sections by substring. One measured with other hyperparameters than the section's now is
    not reported; measuring it again first moves it (and its run) to ``work/earlier/``.
    """
    done_dir = work / "sections"
    done_dir.mkdir(parents=True, exist_ok=True)
    results, stale = {}, []
    for name, section in todo.items():
        path = done_dir / f"{_slug(name)}.json"
        kept = json.loads(path.read_text()) if path.exists() else None
        current = kept is not None and same_recipe(kept.get("recipe"), section.recipe)
        if measure and not current and (not only or any(o in name for o in only)):
            if kept is not None:
                retire(path, work)
            console.print(f"{name} ...")
            kept = {"measured": datetime.now().isoformat(timespec="seconds"), **section.run()}
            kept["recipe"] = section.recipe
            path.write_text(json.dumps(kept, indent=1, default=str) + "\n")
        elif kept is not None and not current:
            stale.append(name)
            continue
        if kept is not None:
            results[name] = kept
    return results, stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced version (minutes)")
    parser.add_argument(
        "--work",
        type=Path,
        help="where runs and finished sections are kept (default: runs/bench/full; --quick: "
        "a temporary folder); run again to continue an interrupted bench",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run only the sections whose name holds this text (repeatable), e.g. 'C=I' or "
        "'quality: rome' ('rome' alone also picks the r-rome sections)",
    )
    parser.add_argument(
        "--table", action="store_true", help="measure nothing: the table of what is measured"
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print the quality table in Markdown"
    )
    args = parser.parse_args()
    model = cache(lambda: load_model(None))
    hp = load_hparams(shipped_hparams("smollm2-135m"))
    with tempfile.TemporaryDirectory() as tmp:
        # the quick bench measures afresh each time; the full one continues where it stopped
        work = args.work or (Path(tmp) if args.quick else ROOT / "runs" / "bench" / "full")
        todo = sections(model, hp, args.quick, work)
        measured, stale = run_sections(todo, work, args.only, measure=not args.table)
    missing = [name for name in todo if name not in measured]
    results: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_model(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": library_versions(),
        "hparams": hp.to_dict(),
        "sections": measured,
        "missing": missing,
        "earlier_recipe": stale,
    }
    suffix = ("-quick" if args.quick else "") + ("-partial" if missing else "")
    out = ROOT / "bench" / "results" / f"{datetime.now():%Y-%m-%d}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    if args.markdown:
        print(markdown(measured))
    else:
        Console().print(table(results))
        Console(width=max(Console().width, 170)).print(quality_table(measured))  # 11 columns
    dates = sorted(r["measured"] for r in measured.values())
    if dates and (args.work or not args.quick):
        console.print(f"sections measured {dates[0]} .. {dates[-1]}, kept in {work}")
    if stale:
        console.print(
            f"[yellow]measured with an earlier recipe (make bench measures them again)"
            f"[/yellow]: {', '.join(stale)}"
        )
    if new := [name for name in missing if name not in stale]:
        console.print(f"[yellow]not measured yet[/yellow]: {', '.join(new)}")
    console.print(f"written {out}")


def _m(summary: dict, phase: str, metric: str) -> str:
    return _cell(summary["metrics"].get(phase, {}).get(metric), " ")


def _label_rows(t: Table, name: str, summary: dict) -> None:
    """Rephrase post on the labelled records whose rephrase asks the same question / another."""
    for group, r in summary.get("rephrase_by_label", {}).items():
        if group != "all labelled":
            t.add_row(
                f"{name}: rephrase_acc post, {group} (n {r['n']})",
                f"{r['mean']:.3f} [{r['low']:.2f},{r['high']:.2f}]",
            )


def table(results: dict[str, Any]) -> Table:
    """Speed, statistics, memory and the sequential run: what is measured so far."""
    t = Table(title=f"rrome bench ({'quick' if results['quick'] else 'full'}), SmolLM2-135M, CPU")
    t.add_column("what")
    t.add_column("value", justify="right")
    sections = results["sections"]
    if s := sections.get("speed"):
        t.add_row(
            "edit time, median [q1, q3] (s)",
            f"{s['total']['median']:.2f} [{s['total']['q1']:.2f}, {s['total']['q3']:.2f}]",
        )
        for k in ("keys", "values", "solve", "apply", "step"):
            t.add_row(f"  {k} (s)", f"{s[k]['median']:.3f}")
        t.add_row("  steps taken (median)", f"{s['steps']['median']:.0f}")
        t.add_row("  overhead ratio (edit / steps x step)", f"{s['overhead']['median']:.2f}")
    if st := sections.get("stats"):
        t.add_row(
            "stats pass tokens/s (vs full forward)",
            f"{st['stats_tokens_per_s']:.0f} ({st['speedup_vs_full_forward']:.2f}x)",
        )
    if m := sections.get("memory"):
        t.add_row(
            "edit peak / memcheck prediction (MiB)",
            f"{m['measured_bytes'] / 2**20:.0f} / {m['predicted_bytes'] / 2**20:.0f}"
            f" ({m['ratio']:.2f})",
        )
    if tp := sections.get("throughput"):
        for row in tp["rows"]:
            t.add_row(
                f"--batch {row['batch']}: edits/s (x batch 1)",
                f"{row['edits_per_second']:.2f} ({row['speedup']:.2f}x)",
            )
        for row in tp["processes"]:
            what = f"  {row['how']}, batch {row['batch']}: edits/s"
            t.add_row(what, f"{row['edits_per_second']:.2f}")
    if q := sections.get("sequential"):
        _sequential_rows(t, q)
    return t


# quality table: column -> metric of the run summary (post-edit unless the row is "unedited")
QUALITY = {
    "rewrite": "rewrite_acc",
    "rephrase": "rephrase_acc",
    "locality": "locality",
    "ES": "es",
    "PS": "ps",
    "NS": "ns",
    f"fluency, first {FLUENCY_RECORDS}": "fluency",
}
QUALITY_HEADER = ["run", *QUALITY, "same q. / both", "S", "s/edit"]


def quality_rows(sections: dict[str, Any], sep: str = "\n") -> list[list[str]]:
    """One row per quality run (mean, then the 95% interval after ``sep``), after an
    "unedited" row per dataset; "same q. / both": rephrase on the CounterFact records whose
    rephrase asks the same question (first reader / both readers); s/edit: median, both
    evaluations included."""
    by_dataset: dict[str, list[list[str]]] = {}
    for key, summary in sections.items():
        if not key.startswith("quality: "):
            continue
        variant, dataset = key.removeprefix("quality: ").rsplit(" | ", 1)
        if dataset not in by_dataset:
            by_dataset[dataset] = [_quality_row(f"{dataset}: unedited", summary, "pre", sep)]
        by_dataset[dataset].append(_quality_row(f"{dataset}: {variant}", summary, "post", sep))
    return [row for rows in by_dataset.values() for row in rows]


def _quality_row(name: str, summary: dict, phase: str, sep: str) -> list[str]:
    metrics = summary["metrics"].get(phase, {})
    cells = [name] + [_cell(metrics.get(m), sep) for m in QUALITY.values()]
    labels = summary.get("rephrase_by_label", {}) if phase == "post" else {}
    same = [labels[g]["mean"] for g in ("same question", "same, both readers") if g in labels]
    cells.append(" / ".join(f"{v:.3f}" for v in same) or "-")
    score = summary["score"].get(phase)
    cells.append(f"{score:.3f}" if score is not None else "-")
    seconds = summary.get("edit", {}).get("seconds_median") if phase == "post" else None
    cells.append(f"{seconds:.1f}" if seconds is not None else "-")
    return cells


def _cell(m: dict | None, sep: str) -> str:
    if not m:
        return "-"
    return f"{m['mean']:.3f}{sep}[{m['low']:.2f}, {m['high']:.2f}]"


def quality_table(sections: dict[str, Any]) -> Table:
    t = Table(title="quality, independent mode: post-edit mean [95% bootstrap interval]")
    for i, name in enumerate(QUALITY_HEADER):
        t.add_column(name, justify="left" if i == 0 else "right")
    for row in quality_rows(sections):
        t.add_row(*row)
    return t


def markdown(sections: dict[str, Any]) -> str:
    """The quality table in Markdown (docs/results.md)."""
    lines = ["| " + " | ".join(QUALITY_HEADER) + " |", "|" + "---|" * len(QUALITY_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in quality_rows(sections, sep=" ")]
    return "\n".join(lines)


def _sequential_rows(t: Table, q: dict) -> None:
    for metric in ("rewrite_acc", "rephrase_acc", "locality"):
        t.add_row(f"sequential {q['n_records']}: {metric} immediate", _m(q, "post", metric))
    _label_rows(t, "sequential (immediate)", q)
    t.add_row(
        f"sequential: retrospective rewrite, first {q['retro_first_n']}",
        f"{q['retro_rewrite_first']:.3f}",
    )
    for metric in ("rewrite_acc", "rephrase_acc", "locality"):
        t.add_row(
            f"sequential: retrospective {metric}, all {q['n_records']}",
            _cell(q.get("retrospective", {}).get(metric), " "),
        )
    curve = q["entropy_curve"]
    lowest = min((e for _, e in curve), default=None)
    t.add_row(
        "sequential: probe entropy base -> last (lowest)",
        f"{q['baseline_entropy']:.3f} -> {curve[-1][1]:.3f} ({lowest:.3f})" if curve else "-",
    )
    t.add_row("sequential: collapsed", str(q.get("collapsed")))


if __name__ == "__main__":
    main()
