"""How many tokens the key statistics need: the left vector u = C^-1 k* / ||C^-1 k*|| at each
token budget, against u from the largest budget, on the sample requests (SmolLM2, layer 5).

    python docs/experiments/stats_budget.py [--budgets 5000,10000,20000,50000,100000,200000]

Prints, per budget, the median and minimum cosine between u(budget) and u(largest budget) over
the requests, and the same against u(10 x budget) where that budget was measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from rrome_cli.config import load_hparams, shipped_hparams
from rrome_cli.engine.keys import keys_at, templated
from rrome_cli.engine.stats import second_moment
from rrome_cli.engine.templates import generate_templates
from rrome_cli.engine.update import KeyCovariance, left_vector
from rrome_cli.models.loading import load_model
from rrome_cli.requests import read_requests

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="5000,10000,20000,50000,100000,200000")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    lm = load_model()
    hp = load_hparams(shipped_hparams("smollm2-135m"))
    layer = hp.layers[0]
    requests = list(read_requests(ROOT / "data" / "counterfact-sample.jsonl"))
    templates = generate_templates(lm.model, lm.tok, hp.context_template_length_params)
    k_stars = torch.stack(
        [
            keys_at(
                lm.model, lm.tok, lm.names, layer, [templated(lm.tok, r, t) for t in templates]
            ).mean(0)
            for r in requests
        ]
    )  # (n_requests, d_in)
    u = {}
    for budget in budgets:
        mom2 = second_moment(
            lm.model, lm.tok, lm.names, layer, model_id=lm.model_id, tokens=budget
        ).mom2
        cov = KeyCovariance(mom2, hp.mom2_ridge)
        u[budget] = torch.stack([left_vector(cov, k)[0] for k in k_stars])
    largest = budgets[-1]
    rows = []
    for budget in budgets:
        cos_top = (u[budget] * u[largest]).sum(1).tolist()
        row = {
            "tokens": budget,
            "cos_vs_largest_median": statistics.median(cos_top),
            "cos_vs_largest_min": min(cos_top),
        }
        if budget * 10 in u:
            cos10 = (u[budget] * u[budget * 10]).sum(1).tolist()
            row |= {"cos_vs_10x_median": statistics.median(cos10), "cos_vs_10x_min": min(cos10)}
        rows.append(row)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
