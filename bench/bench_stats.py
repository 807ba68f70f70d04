"""Throughput of the key-statistics pass against a full forward over the same tokens.

    python bench/bench_stats.py [--tokens 20000] [--layer 5] [--model smollm2-135m]

The stats pass stops after the edited layer, so it should cost about (layer + 1) / n_layers of
a full forward, plus the float64 k k^T sums. Both passes see the same batches of the shipped
Wikipedia corpus.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from rrome_cli.engine import stats
from rrome_cli.engine.positions import pad_id, right_padded
from rrome_cli.models.families import num_layers
from rrome_cli.models.loading import LoadedModel, load_model


def _full_forward_seconds(
    loaded: LoadedModel, tokens: int, max_len: int, batch_tokens: int
) -> float:
    """Seconds for plain full forwards (logits included) over the stats pass's batches."""
    corpus = stats.open_corpus(None)
    # Tokenised before the clock starts.
    batches = list(stats.batch_stream(loaded.tok, corpus, tokens, max_len, batch_tokens))
    device = loaded.model.get_input_embeddings().weight.device
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            ids, mask = right_padded(batch, pad_id(loaded.tok), device)
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return time.perf_counter() - start


def bench_stats(
    loaded: LoadedModel,
    layer: int,
    tokens: int,
    max_len: int = stats.DEFAULT_MAX_LEN,
    batch_tokens: int = stats.DEFAULT_BATCH_TOKENS,
) -> dict[str, float | int | str]:
    """tokens/s of ``second_moment`` (computed, not cached) and of a full forward; ratio > 1
    means the stats pass is that many times faster per token."""
    with tempfile.TemporaryDirectory() as stats_dir:
        start = time.perf_counter()
        result = stats.second_moment_of(
            loaded,
            layer,
            tokens=tokens,
            max_len=max_len,
            batch_tokens=batch_tokens,
            stats_dir=Path(stats_dir),
            progress=False,
        )
        stats_seconds = time.perf_counter() - start
    full_seconds = _full_forward_seconds(loaded, tokens, max_len, batch_tokens)
    return {
        "model": loaded.model_id,
        "layer": layer,
        "layers": num_layers(loaded.model.config),
        "device": str(loaded.model.get_input_embeddings().weight.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "tokens": result.tokens,
        "stats_seconds": round(stats_seconds, 2),
        "stats_tokens_per_s": round(tokens / stats_seconds, 1),
        "full_forward_seconds": round(full_seconds, 2),
        "full_forward_tokens_per_s": round(tokens / full_seconds, 1),
        "speedup_vs_full_forward": round(full_seconds / stats_seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--devices", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()
    loaded = load_model(args.model, args.dtype, args.devices)
    print(json.dumps(bench_stats(loaded, args.layer, args.tokens), indent=2))


if __name__ == "__main__":
    main()
