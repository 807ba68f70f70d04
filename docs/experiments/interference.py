"""Replay a sequential run's edits with earlier keys protected, and measure what survives.

Keys at the edited layer never change during a run (they are read before the only weight an
edit touches), so a finished sequential run fixes every edit's key k_i and the value v_i its
update wrote there: v_i = W_{i-1} k_i + delta_i. This script re-solves the same sequence of
(k_i, v_i) with ``KeyCovariance.protect`` weight w (each earlier edit's keys added to C as
w m k k^T / ||k||^2, as ``protect_weight`` does; ``--protect`` picks which keys), writes the
final W into the model and evaluates every request on it (the retrospective). It costs one
evaluation per setting instead of a new run of value optimisations. Replayed with the run's own
setting it reproduces the run's final model, a check on the replay (an unprotected run: w = 0;
runs/seq300-protect1, made when only k* and the bare prompt's key were kept: --protect bare,
w = 1). Other settings are an approximation: a real run would re-optimise each delta on the
model it has then (``--immediate`` shows how many edits still take right after they are made
with the replayed values).

    python docs/experiments/interference.py runs/seq200 --weights 0,1,100 [--protect read|bare|star]
        [--value-scales 0.7,1] [--limit 200] [--split 100]

Prints, per weight, rewrite / rephrase / locality of all edits and of the first ``--split``,
and how far later updates moved the earlier keys (median ||W_final k_i - v_i|| / ||delta_i||).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from rrome_cli.config import from_dict
from rrome_cli.engine.keys import keys_after_subject, keys_at, templated
from rrome_cli.engine.stats import second_moment_of
from rrome_cli.engine.templates import load_templates
from rrome_cli.engine.update import KeyCovariance, left_vector
from rrome_cli.evaluate import Reference, evaluate_requests
from rrome_cli.models.families import weight_as_out_in
from rrome_cli.models.loading import LoadedModel, load_model
from rrome_cli.patches import load_patches
from rrome_cli.requests import EditRequest, read_requests


def replay(
    w0: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    protected: list[list[torch.Tensor]],
    cov: KeyCovariance,
    weight: float,
    after_each: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """W after re-solving each (k_i, v_i) in turn, each edit's ``protected`` keys added to C
    with ``weight`` once it is made. ``after_each(i, W before, W after)`` sees every edit."""
    w = w0.clone()
    for i, (k, v, rows) in enumerate(zip(keys, values, protected, strict=True)):
        u, _ = left_vector(cov, k)
        before = w.clone()
        w += torch.outer((v - w @ k) / (k @ u), u)
        if after_each:
            after_each(i, before, w)
        for row in rows:
            cov.protect(row, weight)
    return w


def _rewrite_with(
    lm: LoadedModel, weight_view: torch.Tensor, w: torch.Tensor, request: EditRequest
) -> float:
    """The rewrite accuracy of ``request`` with W set to ``w`` (its other prompts dropped)."""
    with torch.no_grad():
        weight_view.copy_(w)
    bare = replace(request, rephrase_prompts=[], locality=[], portability=[])
    ((metrics, _),) = evaluate_requests(lm.model, lm.tok, [bare])
    return metrics["rewrite_acc"]


@dataclass
class Recorded:
    """A finished sequential run, read back: its keys, values and the unedited references."""

    lm: LoadedModel
    requests: list[EditRequest]
    weight_view: torch.Tensor  # the edited W as (d_out, d_in), a view into the model
    w0: torch.Tensor
    keys: list[torch.Tensor]  # k* of each edit
    bare: list[torch.Tensor]  # the bare prompt's key of each edit
    after: list[torch.Tensor]  # (n, d_in): keys after the subject in "bare prompt + target"
    values: list[torch.Tensor]  # v_i = W_{i-1} k_i + delta_i
    deltas: list[torch.Tensor]
    mom2: torch.Tensor
    ridge: float  # the run's mom2_ridge
    unedited: list[Reference]


def read_run(run: Path, limit: int | None) -> Recorded:
    prov = json.loads((run / "run.json").read_text())
    hp = from_dict(prov["hparams"])
    patches = load_patches(run / "patches.safetensors")[:limit]
    requests = list(read_requests(prov["options"]["requests"], limit=len(patches)))
    templates = load_templates(run / "templates.json")
    lm = load_model()
    (layer,) = hp.layers
    weight_view = weight_as_out_in(lm.model.get_submodule(patches[0].module))
    w0 = weight_view.detach().float().clone()
    keys, bare, after = [], [], []
    for request in requests:
        prompts = [templated(lm.tok, request, t) for t in templates]
        template_keys = keys_at(lm.model, lm.tok, lm.names, layer, prompts)  # [0]: bare prompt
        keys.append(template_keys.mean(0))
        bare.append(template_keys[0])
        after.append(
            keys_after_subject(lm.model, lm.tok, lm.names, layer, prompts[0], request.target_new)
        )
    # the value each edit wrote at its key, on the model as the run had it then
    values, deltas, w_run = [], [], w0.clone()
    for k, p in zip(keys, patches, strict=True):
        deltas.append(p.right * (k @ p.left))
        values.append(w_run @ k + deltas[-1])
        w_run += torch.outer(p.right, p.left)
    mom2 = second_moment_of(lm, layer, tokens=hp.mom2_n_samples).mom2
    unedited = [ref for _, ref in evaluate_requests(lm.model, lm.tok, requests)]
    return Recorded(
        lm,
        requests,
        weight_view,
        w0,
        keys,
        bare,
        after,
        values,
        deltas,
        mom2,
        hp.mom2_ridge,
        unedited,
    )


def measure(
    rec: Recorded,
    ridge: float,
    weight: float,
    scale: float,
    protect: str,
    split: int,
    immediate: bool,
) -> dict[str, Any]:
    """Replay with (ridge, weight), each edit's delta scaled by ``scale``, evaluate the final
    model, put W0 back."""
    # v_i = W_{i-1} k_i + scale * delta_i: a shorter (or longer) push along the run's own delta,
    # a stand-in for stopping the value optimisation earlier (or later)
    values = [v + (scale - 1) * d for v, d in zip(rec.values, rec.deltas, strict=True)]
    protected = [
        {"star": [k], "bare": [k, b], "read": [k, b, *a]}[protect]
        for k, b, a in zip(rec.keys, rec.bare, rec.after, strict=True)
    ]
    bare_after, took = [], []

    def observe(i: int, before: torch.Tensor, after: torch.Tensor) -> None:
        # what edit i did at its bare prompt's key, to compare with the final W
        bare_after.append((after @ rec.bare[i], after @ rec.bare[i] - before @ rec.bare[i]))
        if immediate:  # the edit on the model right after it: does it take?
            took.append(_rewrite_with(rec.lm, rec.weight_view, after, rec.requests[i]))

    cov = KeyCovariance(rec.mom2, ridge)
    w = replay(rec.w0, rec.keys, values, protected, cov, weight, observe)
    with torch.no_grad():
        rec.weight_view.copy_(w)
    metrics = [
        m for m, _ in evaluate_requests(rec.lm.model, rec.lm.tok, rec.requests, rec.unedited)
    ]
    with torch.no_grad():
        rec.weight_view.copy_(rec.w0)
    row: dict[str, Any] = {
        "ridge": ridge,
        "weight": weight,
        "value_scale": scale,
        "protect": protect,
        "edits": len(rec.keys),
        "drift": round(float((w - rec.w0).norm() / rec.w0.norm()), 4),
    }
    for name, part in (("all", metrics), (f"first{split}", metrics[:split])):
        for m in ("rewrite_acc", "rephrase_acc", "locality", "es"):
            row[f"{name}_{m}"] = round(statistics.mean(x[m] for x in part), 4)
    moved = [
        float((w @ k - v).norm() / (scale * d.norm()))
        for k, v, d in zip(rec.keys, values, rec.deltas, strict=True)
    ]
    row["median_key_moved"] = round(statistics.median(moved), 4)
    bare_moved = [
        float((w @ kb - out).norm() / change.norm())
        for kb, (out, change) in zip(rec.bare, bare_after, strict=True)
    ]
    row["median_bare_moved"] = round(statistics.median(bare_moved), 4)
    if took:
        row["immediate_rewrite_acc"] = round(statistics.mean(took), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--weights", default="0,1,100")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--split", type=int, default=100)
    parser.add_argument("--ridges", default=None, help="mom2_ridge values (default: the run's)")
    parser.add_argument(
        "--value-scales", default="1", help="scale each edit's delta (1: the run's own values)"
    )
    parser.add_argument(
        "--immediate", action="store_true", help="also the rewrite right after each edit"
    )
    parser.add_argument(
        "--protect",
        choices=("star", "bare", "read"),
        default="read",
        help="which keys of an edit to protect: k* only; k* and the bare prompt's; those and"
        " every key after the subject in 'bare prompt + target' (rrome's protect_weight)",
    )
    args = parser.parse_args()
    rec = read_run(args.run, args.limit)
    ridges = [float(x) for x in args.ridges.split(",")] if args.ridges else [rec.ridge]
    for ridge in ridges:
        for weight in (float(x) for x in args.weights.split(",")):
            for scale in (float(x) for x in args.value_scales.split(",")):
                row = measure(rec, ridge, weight, scale, args.protect, args.split, args.immediate)
                print(json.dumps({"run": str(args.run), **row}), flush=True)


if __name__ == "__main__":
    main()
