"""Teacher-forced scoring of answers given prompts, batched, with an explicit padding side.

An answer is always tokenised as a *continuation*: the model reads ``prompt + " " + answer`` and
the answer's tokens are those of the joined text whose character spans reach into the answer
(the separating space included), found with the fast tokenizer's offset mapping. So byte-level
(``Ġ``) and SentencePiece (``▁``) leading spaces come out exactly as the model sees them in text,
and never as a separately tokenised word.

The shared tokenizer is never mutated: sequences are padded here by hand, on the side the caller
names, and position ids are computed from the attention mask so that left and right padding
give the same logits at every real position.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rrome_cli.engine.positions import Encoded, encode_pair, pad_id, special_prefix
from rrome_cli.engine.update import Patch, rows_patched
from rrome_cli.models.families import input_device

PaddingSide = Literal["left", "right"]
SCORE_BATCH = 32  # sequences per scoring forward (memcheck plans one such batch)


@dataclass
class AnswerScore:
    """What the model does at each answer position under teacher forcing."""

    answer_ids: list[int]  # the answer's tokens, as a continuation of the prompt
    predicted_ids: list[int]  # argmax of the logits one position earlier, per answer token
    token_logprobs: list[float]  # log p(answer token | everything before it), fp32

    @property
    def accuracy(self) -> float:
        """Fraction of answer tokens that are the argmax prediction."""
        hits = sum(p == a for p, a in zip(self.predicted_ids, self.answer_ids, strict=True))
        return hits / len(self.answer_ids)

    @property
    def nll(self) -> float:
        """Length-normalised negative log-likelihood: mean over answer tokens of -log p."""
        return -sum(self.token_logprobs) / len(self.token_logprobs)


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: PaddingSide, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Pad by hand: (input_ids, attention_mask, position_ids) each [batch, max_len], and the
    index where each sequence starts in its row (0 for right padding)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', not {side!r}")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    starts = []
    for row, seq in enumerate(sequences):
        start = width - len(seq) if side == "left" else 0
        input_ids[row, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, start : start + len(seq)] = 1
        starts.append(start)
    # Positions count real tokens only, so a left-padded sequence is seen at positions 0..n-1.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device), starts


@torch.no_grad()
def _score_batch(
    model: nn.Module, batch: Sequence[Encoded], pad_id: int, side: PaddingSide
) -> list[AnswerScore]:
    ids, mask, positions, starts = pad_batch(
        [e.input_ids for e in batch], pad_id, side, input_device(model)
    )
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    rows, cols, lengths = [], [], []
    for row, (enc, start) in enumerate(zip(batch, starts, strict=True)):
        # logits at position t-1 predict token t: answer tokens a..b-1 <- positions a-1..b-2
        first, end = start + enc.answer_start, start + len(enc.input_ids)
        rows += [row] * (end - first)
        cols += list(range(first - 1, end - 1))
        lengths.append(end - first)
    rows_t = torch.tensor(rows, device=logits.device)
    cols_t = torch.tensor(cols, device=logits.device)
    # Only the answer positions go to fp32: [n_answer_tokens, vocab]
    logprobs = logits[rows_t, cols_t].float().log_softmax(-1)
    targets = ids.to(logits.device)[rows_t, cols_t + 1]
    predicted = logprobs.argmax(-1).tolist()
    target_logprobs = logprobs.gather(-1, targets[:, None])[:, 0].tolist()
    target_ids = targets.tolist()
    scores, at = [], 0
    for n in lengths:
        sl = slice(at, at + n)
        scores.append(AnswerScore(target_ids[sl], predicted[sl], target_logprobs[sl]))
        at += n
    return scores


def score_answers(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    padding_side: PaddingSide = "right",
    batch_size: int = SCORE_BATCH,
    patches: Sequence[Sequence[Patch]] | None = None,
) -> list[AnswerScore]:
    """Teacher-forced argmax and log-probabilities of each ``(prompt, answer)``'s answer tokens,
    in ``ceil(len(pairs) / batch_size)`` forward passes. ``patches``: per pair, the edits
    its model has (``rows_patched``); none, the model as it is."""
    prefix = special_prefix(tok)
    encoded = [encode_pair(tok, prompt, answer, prefix) for prompt, answer in pairs]
    pad = pad_id(tok)
    scores: list[AnswerScore] = []
    for at in range(0, len(encoded), batch_size):
        edits = rows_patched(model, patches[at : at + batch_size]) if patches else nullcontext()
        with edits:
            scores += _score_batch(model, encoded[at : at + batch_size], pad, padding_side)
    return scores
