"""The edits that hit the step cap: where their steps go, and two cuts measured on them.

    python docs/experiments/long_edits.py trajectory runs/bench/full/r-rome___C___zsre \
        [--out traj.json]
    python docs/experiments/long_edits.py tangent -- edit REQUESTS --templates T --out RUN

``trajectory`` reruns every edit of an independent run that stopped at ``v_num_grad_steps``
(same model, hparams, statistics, templates and requests), records the bare prompt's target
probability at each step, then asks of each plateau rule ("less than 0.01 gained over the last
k steps, from step 12") how many steps it would save and how far from the 40-step value it
would stop.

``tangent`` runs ``rrome`` (arguments after ``--``) with the outward radial part of delta's
gradient removed whenever delta sits on the clamp's sphere, so that Adam's steps turn delta
rather than push it out for the clamp to pull back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rrome_cli.engine import values

PLATEAU_GAIN, PLATEAU_FROM = 0.01, 12


def bare_trajectories(run: Path) -> list[dict]:
    """Per capped edit of ``run``: the bare prompt's target probability at each step, the edit
    rerun with the run's own model, hparams, statistics, templates and requests."""
    from rrome_cli.engine.edit import edit
    from rrome_cli.engine.templates import load_templates
    from rrome_cli.models.loading import load_model
    from rrome_cli.requests import read_requests
    from rrome_cli.run import load_run, prepare_covariances

    prov, hp, opts = load_run(run)
    loaded = load_model(prov["model"])
    covariances, _ = prepare_covariances(loaded, hp, opts)
    templates = load_templates(run / "templates.json")
    reqs = list(read_requests(Path(opts.requests), skip_invalid=True, warn=lambda _: None))
    records = [json.loads(line) for line in (run / "report.jsonl").read_text().splitlines()]
    capped = [r["index"] for r in records if r.get("guard", {}).get("steps") == hp.v_num_grad_steps]
    bare: list[float] = []
    reached = values._reached

    def spy(loss: torch.Tensor, nll_each: torch.Tensor, hparams: values.HParams) -> bool:
        bare.append(torch.exp(-nll_each[0].detach()).item())  # row 0: the bare prompt
        return reached(loss, nll_each, hparams)

    values._reached = spy
    out = []
    try:
        for i in capped:
            bare.clear()
            edited = edit(
                loaded.model, loaded.tok, reqs[i], hp, loaded.names, covariances, templates
            )
            edited.revert(loaded.model)
            out.append({"index": i, "bare": list(bare)})
            print(i, " ".join(f"{p:.2f}" for p in bare[::4]), flush=True)
    finally:
        values._reached = reached
    return out


def plateau_stop(bare: list[float], k: int) -> int | None:
    """The step at which "less than PLATEAU_GAIN over k steps" would stop, or None."""
    for t in range(PLATEAU_FROM, len(bare)):
        if bare[t] - bare[t - k] < PLATEAU_GAIN:
            return t
    return None


def plateau_table(trajectories: list[dict]) -> None:
    for k in (4, 6, 8):
        saved, early = 0, []
        for tr in trajectories:
            bare = tr["bare"]
            t = plateau_stop(bare, k)
            if t is None:
                continue
            saved += len(bare) - 1 - t
            if bare[-1] - bare[t] > 0.1:
                early.append(f"{tr['index']} ({bare[t]:.3f} -> {bare[-1]:.3f})")
        print(f"k={k}: saves {saved} steps; stops before a rise of > 0.1 on {early}")


class TangentAdam(torch.optim.Adam):
    """Adam on one parameter (delta) that drops the gradient's outward radial part while delta
    sits on the sphere the value loop's clamp last pulled it back to."""

    def __init__(self, params: list[torch.Tensor], **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.radius: float | None = None
        self.norm_after: float | None = None

    @torch.no_grad()
    def step(self, closure: object = None) -> None:
        (delta,) = self.param_groups[0]["params"]
        norm = delta.norm()
        if self.norm_after is not None and norm < self.norm_after - 1e-6:
            self.radius = norm.item()  # the loop clamped delta back to this norm
        if self.radius is not None and norm >= 0.999 * self.radius and delta.grad is not None:
            unit = delta / norm
            radial = delta.grad @ unit
            if radial < 0:  # descent would leave the sphere outward
                delta.grad.sub_(radial * unit)
        super().step(closure)
        self.norm_after = delta.norm().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    traj = sub.add_parser("trajectory")
    traj.add_argument("run", type=Path)
    traj.add_argument("--out", type=Path)
    tangent = sub.add_parser("tangent")
    tangent.add_argument("rrome_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.command == "trajectory":
        trajectories = bare_trajectories(args.run)
        if args.out:
            args.out.write_text(json.dumps(trajectories))
        plateau_table(trajectories)
        return
    from rrome_cli.cli import app

    torch.optim.Adam = TangentAdam  # values.py builds its optimiser as torch.optim.Adam
    app([a for a in args.rrome_args if a != "--"])


if __name__ == "__main__":
    sys.exit(main())
