"""Generation fluency: n-gram entropy of generated text, and word entropy for collapse probes.

Words come from a built-in regex tokenizer (no NLTK data to download): runs of word characters
(letters, digits, underscore; apostrophes inside words kept, as in "don't") and single
punctuation marks; case is kept. Entropies are in bits.

``n_gram_entropy`` follows ROME's fluency measure: for each text, the entropies ``H2`` and ``H3``
of its bigram and trigram frequency distributions are combined as
``(2/3 * H2 + 4/3 * H3) / (2/3 + 4/3)``; a list of texts scores the mean over texts. Repetitive,
looping generations score low.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rrome_cli.engine.positions import pad_id
from rrome_cli.evaluate.tokens import input_device, pad_batch, special_prefix

WORD = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)


def words(text: str) -> list[str]:
    """The words and punctuation marks of ``text``, in order."""
    return WORD.findall(text)


def entropy_bits(counts: Counter[tuple[str, ...]] | Counter[str]) -> float:
    """Shannon entropy (bits) of the distribution given by ``counts``; 0 for an empty one."""
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def text_n_gram_entropy(
    text: str,
    orders: Sequence[int] = NGRAM_ORDERS,
    weights: Sequence[float] = NGRAM_WEIGHTS,
) -> float:
    """Weighted mean of the n-gram entropies of one text (ROME: bigrams 2/3, trigrams 4/3)."""
    tokens = words(text)
    entropies = []
    for n in orders:
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        entropies.append(entropy_bits(grams))
    return sum(w * h for w, h in zip(weights, entropies, strict=True)) / sum(weights)


def n_gram_entropy(texts: Sequence[str]) -> float:
    """Mean over ``texts`` of their weighted bigram/trigram entropy."""
    if not texts:
        raise ValueError("n-gram entropy of no texts")
    return sum(text_n_gram_entropy(t) for t in texts) / len(texts)


def normalised_word_entropy(texts: Sequence[str]) -> float:
    """Entropy of the unigram word distribution pooled over ``texts``, divided by the largest
    it could be for that many distinct words (``log2(#distinct)``): 1 for all-different words,
    near 0 when the generations collapse onto a few repeated words; 0 with <= 1 distinct word."""
    counts = Counter(w for t in texts for w in words(t))
    if len(counts) <= 1:
        return 0.0
    return entropy_bits(counts) / math.log2(len(counts))


@torch.no_grad()
def generate(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 50,
    seed: int = 0,
    sample: bool = False,
    top_k: int = 5,
) -> list[str]:
    """The continuations (prompt excluded) of ``prompts``, in one left-padded batch.

    Greedy by default; with ``sample`` it draws from the top ``top_k`` tokens using a generator
    seeded with ``seed`` (the global RNG state is restored afterwards).
    """
    device = input_device(model)
    prefix = special_prefix(tok)
    sequences = [prefix + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad = pad_id(tok)
    ids, mask, _, _ = pad_batch(sequences, pad, "left", device)
    options = dict(do_sample=True, top_k=top_k) if sample else dict(do_sample=False)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,  # a fixed length keeps entropies comparable
            pad_token_id=pad,
            **options,
        )
    new_tokens = out[:, ids.shape[1] :]
    return tok.batch_decode(new_tokens, skip_special_tokens=True)


def probe_entropy(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 30,
    seed: int = 0,
) -> float:
    """Normalised word entropy of greedy generations on a fixed probe set (collapse probe)."""
    return normalised_word_entropy(generate(model, tok, prompts, max_new_tokens, seed))
