"""Can the value step run every row in one call? Checks, on every tiny family, that one packed
suffix pass (all rows' suffix tokens in one sequence, a block-causal 4D bool mask, the rows'
prefix caches laid end to end) gives the hidden states of the padded pass the engine runs now.

    python bench/packed_pass_check.py

transformers 5 passes a prepared 4D mask through unchanged; this is the evidence that the
packing of README "The bare prompt read off the edited model" is exact on each family. Prints
the largest relative difference per family.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from rrome_cli.engine.keys import templated
from rrome_cli.engine.values import Batch, SuffixRunner, build_batch, frozen
from rrome_cli.models.tiny import FAMILIES, tiny_model
from rrome_cli.requests import EditRequest

REQUEST = EditRequest(prompt="{} was founded by", subject="Apple", target_new="Bill Gates")
TEMPLATES = ["{}", "The capital of Japan is Tokyo. {}", "Rome. {}"]


def packed_inputs(b: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows (N,), cols (N,), ids (1, N), 4D mask (1, 1, N, B*P + N)) of the packed suffixes."""
    n_rows, width_p = b.prefix_ids.shape
    lengths = b.suffix_mask.sum(1).tolist()
    rows = torch.cat([torch.full((n,), r) for r, n in enumerate(lengths)])
    cols = torch.cat([torch.arange(n) for n in lengths])
    # token i sees its own row's real prefix positions, then its row's suffix up to itself
    prefix_row = torch.arange(n_rows).repeat_interleave(width_p)  # (B*P,)
    sees_prefix = (rows[:, None] == prefix_row[None]) & b.prefix_mask.bool().flatten()[None]
    sees_suffix = (rows[:, None] == rows[None]) & (cols[:, None] >= cols[None])
    mask = torch.cat([sees_prefix, sees_suffix], dim=1)[None, None]
    return rows, cols, b.suffix_ids[rows, cols][None], mask


def check(family: str) -> float:
    model, tok = tiny_model(family)
    prompts = [templated(tok, REQUEST, t) for t in TEMPLATES]
    batch = build_batch(tok, prompts, REQUEST.target_new, REQUEST.subject, torch.device("cpu"))
    with frozen(model), torch.no_grad():
        runner = SuffixRunner(model, batch)
        padded = runner.hidden()  # (B, S, d)
        rows, cols, ids, mask = packed_inputs(batch)
        cache = DynamicCache()
        for i, (keys, values) in enumerate(runner.prefix_kv):  # (B, h, P, hd) -> (1, h, B*P, hd)
            cache.update(*(t.transpose(0, 1).flatten(1, 2)[None] for t in (keys, values)), i)
        out = model.base_model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=batch.suffix_pos[rows, cols][None],
            cache=cache,
            use_cache=True,
        )
    want = padded[rows, cols]
    return float((out.last_hidden_state[0] - want).abs().max() / want.abs().max())


def main() -> None:
    for family in FAMILIES:
        print(f"{family:10s} largest relative difference {check(family):.1e}")


if __name__ == "__main__":
    main()
