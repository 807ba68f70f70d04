"""What one packed call would save: SmolLM2's 25 blocks above the edited layer (5), forward and
backward to their input, on random hidden states shaped like a zsRE value step.

    python bench/packing_proxy.py [--repeats 8]

Three arms, alternating: the templates' batch alone (22 rows x 3 suffix tokens); that batch
and the whole bare prompt (1 x 11, ``v_realized_delta: bare``) as two calls, as the engine
runs them now; and both packed into one sequence of 77 tokens with a block-diagonal causal
mask. No prefix cache (a proxy: the products, which dominate, see the same rows). Prints the
median seconds of each and the ratios to the templates' batch alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from rrome_cli.models.loading import load_model

TEMPLATE_ROWS, SUFFIX, WHOLE, EDITED = 22, 3, 11, 5


def causal(n: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(1, 1, n, n) bool: causal, and with ``rows`` (n,) only within a row."""
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    if rows is not None:
        mask &= rows[:, None] == rows[None, :]
    return mask[None, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    model = load_model(None, "fp32", None).model
    for p in model.parameters():
        p.requires_grad_(False)
    blocks, rotary = model.model.layers[EDITED + 1 :], model.model.rotary_emb
    d = model.config.hidden_size

    def backward_through_blocks(
        shape: tuple[int, int], pos: torch.Tensor, mask: torch.Tensor
    ) -> None:
        h = torch.randn(*shape, d, requires_grad=True)
        x, cos_sin = h, rotary(h, pos)
        for block in blocks:
            x = block(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
            x = x[0] if isinstance(x, tuple) else x
        x.sum().backward()

    suffix_pos = torch.arange(SUFFIX)[None].expand(TEMPLATE_ROWS, SUFFIX)
    packed_rows = torch.cat(
        [torch.arange(TEMPLATE_ROWS).repeat_interleave(SUFFIX), torch.full((WHOLE,), TEMPLATE_ROWS)]
    )
    packed_pos = torch.cat([torch.arange(SUFFIX).repeat(TEMPLATE_ROWS), torch.arange(WHOLE)])[None]
    n = TEMPLATE_ROWS * SUFFIX + WHOLE

    def templates() -> None:
        backward_through_blocks((TEMPLATE_ROWS, SUFFIX), suffix_pos, causal(SUFFIX))

    def two_calls() -> None:
        templates()
        backward_through_blocks((1, WHOLE), torch.arange(WHOLE)[None], causal(WHOLE))

    def packed() -> None:
        backward_through_blocks((1, n), packed_pos, causal(n, packed_rows))

    arms: dict[str, Callable[[], None]] = {
        "templates": templates,
        "two calls": two_calls,
        "packed": packed,
    }
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for arm in arms.values():  # warm-up
        arm()
    for _ in range(args.repeats):
        for name, arm in arms.items():
            start = time.perf_counter()
            arm()
            seconds[name].append(time.perf_counter() - start)
    alone = statistics.median(seconds["templates"])
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:10s} {median:.3f} s  {median / alone:.2f}x the templates' batch alone")


if __name__ == "__main__":
    main()
