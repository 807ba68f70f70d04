"""rrome against EasyEdit's R-ROME in one process, on the same model, records and machine.

    python bench/easyedit_compare.py --easyedit /path/to/EasyEdit [--limit 10]

``--easyedit``: a checkout of https://github.com/zjunlp/EasyEdit (the folder holding
``easyeditor/``); it is imported, not installed: only its R-ROME modules are loaded, so none of
its other requirements are needed. Three arms edit each record in turn, the order rotated from
record to record so that a drifting machine slows each arm alike:

- ``easyedit``: EasyEdit's ``apply_r_rome_to_model`` with its llama-7b R-ROME values at layer 5
  (25 steps, lr 0.5, C = I, stop at a total loss of 0.05), fp32;
- ``rrome-same``: rrome with those same values (EasyEdit's YAML loads unchanged);
- ``rrome``: rrome with the shipped SmolLM2 recipe (hparams/smollm2-135m.yaml; ``--hparams``
  names another, to measure a candidate recipe the same way);
- ``rrome --batch N`` (``--batch``, default 4, the best batch on a 2-core CPU; 0 leaves it out):
  the shipped recipe over all the records with N in flight together, after the three arms above.
  Its time per edit is the whole pass over the records divided by their number (a batched edit
  has no time of its own); each edit is then scored on its own edited model, as a batched run
  scores it.

Each edit is timed from request to applied weights (keys, value optimisation, solve, apply; no
evaluation), then scored with rrome's own metrics against the unedited model, then reverted.
Context templates are made once per arm before the first timed edit. Results (per record and
medians, per-arm ratios against EasyEdit) go to ``bench/results/<date>-easyedit.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch

from bench import edit_inputs  # bench/bench.py, beside this script
from rrome_cli.config import from_dict, load_hparams
from rrome_cli.engine.edit import edit, edit_independent
from rrome_cli.evaluate.metrics import evaluate_edits, evaluate_request
from rrome_cli.models.loading import LoadedModel, load_model
from rrome_cli.requests import EditRequest, read_requests
from rrome_cli.run import library_versions

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("rewrite_acc", "rephrase_acc", "locality", "es")
# EasyEdit's hparams/R-ROME/llama-7b.yaml at layer 5, with SmolLM2's loss layer (30 layers)
EASYEDIT_VALUES: dict[str, Any] = {
    "alg_name": "R-ROME",
    "model_name": "smollm2-135m",
    "stats_dir": "./data/stats",
    "device": "cpu",
    "layers": [5],
    "fact_token": "subject_last",
    "v_num_grad_steps": 25,
    "v_lr": 0.5,
    "v_loss_layer": 29,
    "v_weight_decay": 1e-3,
    "clamp_norm_factor": 4,
    "kl_factor": 0.0625,
    "mom2_adjustment": False,
    "context_template_length_params": [[5, 10], [10, 10]],
    "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
    "layer_module_tmp": "model.layers.{}",
    "mlp_module_tmp": "model.layers.{}.mlp",
    "attn_module_tmp": "model.layers.{}.self_attn",
    "ln_f_module": "model.norm",
    "lm_head_module": "lm_head",
    "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000,
    "mom2_dtype": "float32",
}

Arm = Callable[[EditRequest], Callable[[], None]]  # edits in place; returns the revert


def import_easyedit(root: Path) -> types.ModuleType:
    """EasyEdit's r_rome_main without running its package __init__ files (they import every
    method and their requirements); matplotlib, imported but unused by compute_v, is stubbed."""
    for name, folder in (
        ("easyeditor", "easyeditor"),
        ("easyeditor.util", "easyeditor/util"),
        ("easyeditor.models", "easyeditor/models"),
        ("easyeditor.models.rome", "easyeditor/models/rome"),
    ):
        package = types.ModuleType(name)
        package.__path__ = [str(root / folder)]
        sys.modules[name] = package
    if "matplotlib" not in sys.modules:
        style = types.ModuleType("matplotlib.style")
        style.context = contextlib.nullcontext  # type: ignore[attr-defined]
        sys.modules["matplotlib"] = types.ModuleType("matplotlib")
        sys.modules["matplotlib.style"] = style
    from easyeditor.models.r_rome import r_rome_main  # type: ignore[import-not-found]

    return r_rome_main


def easyedit_commit(root: Path) -> str:
    found = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return found.stdout.strip() or "unknown (not a git checkout)"


def easyedit_arm(loaded: LoadedModel, root: Path) -> Arm:
    main = import_easyedit(root)
    hp = main.R_ROMEHyperParams(**EASYEDIT_VALUES)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every step
        main.get_context_templates(loaded.model, loaded.tok, hp.context_template_length_params)

    def run(request: EditRequest) -> Callable[[], None]:
        # EasyEdit's request: the prompt with "{}", and the target without its leading space
        as_dict = {
            "prompt": request.prompt,
            "subject": request.subject,
            "target_new": request.target_new,
        }
        with contextlib.redirect_stdout(io.StringIO()):
            _, originals = main.apply_r_rome_to_model(
                loaded.model, loaded.tok, [as_dict], hp, return_orig_weights=True
            )

        def revert() -> None:
            with torch.no_grad():
                for name, weight in originals.items():
                    loaded.model.get_parameter(name)[...] = weight

        return revert

    return run


def rrome_arm(loaded: LoadedModel, raw: dict[str, Any]) -> Arm:
    hp = from_dict(raw)
    covariances, templates = edit_inputs(loaded, hp)

    def run(request: EditRequest) -> Callable[[], None]:
        result = edit(loaded.model, loaded.tok, request, hp, loaded.names, covariances, templates)
        return lambda: result.revert(loaded.model)

    return run


def compare(loaded: LoadedModel, arms: dict[str, Arm], requests: list[EditRequest]) -> list[dict]:
    names, rows = list(arms), []
    for i, request in enumerate(requests):
        pre, reference = evaluate_request(loaded.model, loaded.tok, request)
        row: dict[str, Any] = {"case_id": request.case_id, "pre": _metrics(pre)}
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            revert = arms[name](request)
            seconds = time.perf_counter() - start
            post, _ = evaluate_request(loaded.model, loaded.tok, request, reference)
            revert()
            row[name] = {"seconds": round(seconds, 2)} | _metrics(post)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def batched(
    loaded: LoadedModel, raw: dict[str, Any], requests: list[EditRequest], batch: int
) -> tuple[float, list[dict]]:
    """Seconds per edit of rrome's batched pass over ``requests`` and each edit's metrics on
    its own edited model against the unedited one (``evaluate_edits``, the weights untouched,
    as a batched run scores its edits)."""
    hp = from_dict(raw)
    covariances, templates = edit_inputs(loaded, hp)
    model, tok = loaded.model, loaded.tok
    start = time.perf_counter()
    results = dict(  # by request identity: a batch finishes out of order
        (id(request), result)
        for request, result in edit_independent(
            model, tok, requests, hp, loaded.names, covariances, templates, batch=batch
        )
    )
    per_edit = (time.perf_counter() - start) / len(requests)
    patches = [results[id(request)].patches for request in requests]
    scored = evaluate_edits(model, tok, requests, patches)  # no patch: the unedited model's
    return per_edit, [_metrics(post if post is not None else pre) for pre, post in scored]


def _metrics(scores: dict[str, float]) -> dict[str, float]:
    return {m: scores[m] for m in METRICS if m in scores}


def summarise(rows: list[dict], arms: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = [r["easyedit"]["seconds"] for r in rows]
    for arm in arms:
        seconds = [r[arm]["seconds"] for r in rows]
        out[arm] = {
            "seconds_median": round(statistics.median(seconds), 2),
            "seconds_mean": round(statistics.mean(seconds), 2),
            "speedup_median": round(statistics.median(base) / statistics.median(seconds), 2),
            "speedup_mean": round(statistics.mean(base) / statistics.mean(seconds), 2),
            "speedup_paired_median": round(
                statistics.median(b / s for b, s in zip(base, seconds, strict=True)), 2
            ),
        } | {m: round(statistics.mean(r[arm][m] for r in rows), 3) for m in METRICS}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--easyedit", type=Path, required=True, help="an EasyEdit checkout")
    parser.add_argument("--requests", default="../shared/data/counterfact/counterfact-edit.json")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--hparams", type=Path, default=ROOT / "hparams" / "smollm2-135m.yaml", help="rrome arm"
    )
    parser.add_argument("--batch", type=int, default=4, help="rrome --batch arm (0: none)")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(None, "fp32", None)
    requests = list(read_requests(args.requests, limit=args.limit))
    shipped = load_hparams(args.hparams).to_dict()
    arms = {
        "easyedit": easyedit_arm(loaded, args.easyedit),
        "rrome-same": rrome_arm(loaded, EASYEDIT_VALUES),
        "rrome": rrome_arm(loaded, shipped),
    }
    rows = compare(loaded, arms, requests)
    summary = summarise(rows, list(arms))
    if args.batch:
        per_edit, scores = batched(loaded, shipped, requests, args.batch)
        base = summary["easyedit"]
        summary[f"rrome --batch {args.batch}"] = {
            "seconds_per_edit": round(per_edit, 2),
            "speedup_median": round(base["seconds_median"] / per_edit, 2),
            "speedup_mean": round(base["seconds_mean"] / per_edit, 2),
        } | {m: round(statistics.mean(s[m] for s in scores), 3) for m in METRICS}
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "versions": library_versions(),
        "requests": f"{args.requests}, first {len(requests)}",
        "easyedit_commit": easyedit_commit(args.easyedit),
        "easyedit_values": EASYEDIT_VALUES,
        "rrome_hparams": str(args.hparams),
        "summary": summary,
        "records": rows,
    }
    out = args.out or ROOT / "bench" / "results" / f"{result['date']}-easyedit.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
