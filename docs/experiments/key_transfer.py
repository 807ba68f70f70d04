"""How much of an edit reaches a rephrased prompt, before any value is optimised.

The rank-one update adds ``right * (u . k)`` at a prompt whose key is k, and right is scaled so
that the templated key k* gets all of delta. A rephrased prompt therefore receives the fraction
``(u . k_para) / (u . k*)`` of the edit, and a locality prompt (another subject) should receive
none. This script measures both fractions per layer and per choice of u (key statistics C,
C + lambda I for a few lambda, C = I) on the sample requests of SmolLM2, so that the layer and
the statistics can be chosen from a cheap, direct proxy of generalisation and specificity.

    python docs/experiments/key_transfer.py [--layers 2,3,4,5,6,8,10,12] [--requests FILE]

Prints one JSON line per (layer, u): median fraction at the bare prompt, at the rephrased
prompts, and the largest |fraction| over the tokens of the locality prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from rrome_cli.config import load_hparams, shipped_hparams
from rrome_cli.engine.keys import Templated, keys_at, templated
from rrome_cli.engine.positions import subject_last_token, tokenise
from rrome_cli.engine.stats import second_moment_of
from rrome_cli.engine.templates import generate_templates
from rrome_cli.engine.update import KeyCovariance, left_vector
from rrome_cli.models.loading import load_model
from rrome_cli.requests import EditRequest, read_requests

ROOT = Path(__file__).resolve().parents[2]
RIDGES = {"C": None, "C+0.01": 1e-2, "C+0.1": 1e-1, "C+1": 1.0, "I": "identity"}


def located(tok, texts: list[str], subject: str) -> list[Templated]:  # noqa: ANN001
    """Each of ``texts`` that contains ``subject``, tokenised, the subject's first occurrence
    located."""
    out = []
    for text in texts:
        start = text.find(subject)
        if start < 0:
            continue
        tokens = tokenise(tok, text)
        end = start + len(subject)
        out.append(Templated(text, tokens, end, subject_last_token(tokens, end)))
    return out


def rephrased(tok, request: EditRequest) -> list[Templated]:  # noqa: ANN001
    """The request's rephrased prompts that contain the subject, the subject located."""
    return located(tok, request.rephrase_prompts, request.subject)


def every_token(lm, layer: int, text: str) -> torch.Tensor:  # noqa: ANN001
    """Keys at every token of ``text``: (n_tokens, d_in)."""
    tokens = tokenise(lm.tok, text)
    prompts = [Templated(text, tokens, 0, i) for i in range(len(tokens.ids))]
    return keys_at(lm.model, lm.tok, lm.names, layer, prompts)


def u_for(mom2: torch.Tensor, choice: str, k_star: torch.Tensor) -> torch.Tensor:
    ridge = RIDGES[choice]
    if ridge == "identity":
        return k_star / k_star.norm()
    cov = KeyCovariance(mom2, 1e-6 if ridge is None else float(ridge))
    return left_vector(cov, k_star)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,3,4,5,6,8,10,12")
    parser.add_argument("--requests", type=Path, default=ROOT / "data" / "counterfact-sample.jsonl")
    parser.add_argument("--tokens", type=int, default=20_000)
    args = parser.parse_args()
    lm = load_model()
    hp = load_hparams(shipped_hparams("smollm2-135m"))
    requests = list(read_requests(args.requests))
    templates = generate_templates(lm.model, lm.tok, hp.context_template_length_params)
    for layer in (int(x) for x in args.layers.split(",")):
        mom2 = second_moment_of(lm, layer, tokens=args.tokens).mom2
        per_choice: dict[str, dict[str, list[float]]] = {
            c: {"bare": [], "rephrase": [], "locality_max": []} for c in RIDGES
        }
        for request in requests:
            keys = keys_at(
                lm.model,
                lm.tok,
                lm.names,
                layer,
                [templated(lm.tok, request, t) for t in templates],
            )
            k_star = keys.mean(0)
            paras = rephrased(lm.tok, request)
            k_para = keys_at(lm.model, lm.tok, lm.names, layer, paras) if paras else None
            k_loc = [every_token(lm, layer, p) for p, _ in request.locality]
            for choice, found in per_choice.items():
                u = u_for(mom2, choice, k_star)
                scale = float(u @ k_star)
                found["bare"].append(float(u @ keys[0]) / scale)
                if k_para is not None:
                    found["rephrase"] += ((k_para @ u) / scale).tolist()
                found["locality_max"] += [float((k @ u).abs().max()) / scale for k in k_loc]
        for choice, found in per_choice.items():
            row = {"layer": layer, "u": choice}
            row |= {k: round(statistics.median(v), 3) for k, v in found.items() if v}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
