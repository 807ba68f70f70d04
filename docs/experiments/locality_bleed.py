"""How much of each edit a locality prompt receives: why an independent edit fails locality.

An R-ROME edit is W' = W + right leftᵀ, so a token whose key (the input of W) is k gets
``(left · k) right`` added to the MLP output: ``left · k`` is its share of the edit (about 1 at
the edited subject's last token). For every applied record of a run this takes the largest
share over the locality prompt's tokens, relative to the largest over the edit's own (bare)
prompt, and prints it for the records that lost their locality prediction, then the relative
shares of the records that kept it against those that lost it.

    python docs/experiments/locality_bleed.py runs/bench/full/r-rome___C___counterfact_2000-2199
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from rrome_cli.engine.hooks import capture_input
from rrome_cli.models.loading import load_model
from rrome_cli.patches import load_patches


@torch.no_grad()
def largest_share(loaded, module: str, left: torch.Tensor, text: str) -> float:
    """max over the tokens of ``text`` but the first of left · k, k the input of ``module``."""
    keys: list[torch.Tensor] = []
    with capture_input(loaded.model.get_submodule(module), lambda k: keys.append(k[0].float())):
        loaded.model(input_ids=loaded.tok(text, return_tensors="pt").input_ids)
    # the first token left out: its keys are outsized in these models (an attention sink), and
    # no prompt's answer depends on it alone
    return (keys[0][1:] @ left.float()).max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.run / "report.jsonl").read_text().splitlines()]
    applied = [r for r in rows if r["status"] == "applied"]
    patches = load_patches(args.run / "patches.safetensors")
    loaded = load_model(None, "fp32", "cpu")
    kept, lost = [], []
    for row, patch in zip(applied, patches, strict=True):
        request = row["request"]
        share = max(
            largest_share(loaded, patch.module, patch.left, prompt)
            for prompt in request["locality_prompt"]
        )
        bare = largest_share(
            loaded, patch.module, patch.left, request["prompt"].replace("{}", request["subject"])
        )
        locality, relative = row["post"].get("locality"), share / bare
        (kept if locality == 1 else lost).append(relative)
        if locality != 1:
            subject = request["subject"]
            shares = f"{share:.2f} / bare {bare:.2f} = {relative:.2f}"
            print(f"{subject!r}: locality {locality}, {shares}")
    for name, shares in (("kept", kept), ("lost", lost)):
        if shares:
            q = statistics.quantiles(shares, n=4) if len(shares) > 1 else [shares[0]] * 3
            quartiles = f"{q[1]:.3f} [q1 {q[0]:.3f}, q3 {q[2]:.3f}]"
            print(f"{name} ({len(shares)}): relative share median {quartiles}")
    for low, high in ((-9.0, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 99.0)):
        n_kept = sum(low <= s < high for s in kept)
        n_lost = sum(low <= s < high for s in lost)
        span = f"[{max(low, 0):.2f}, {min(high, 9):.2f})"
        print(f"relative share in {span}: {n_lost} lost of {n_kept + n_lost}")


if __name__ == "__main__":
    main()
