"""Token positions from character offsets: the subject's last token and an answer's tokens.

We tokenise the whole text once and read the tokenizer's offset mapping, which stays correct
whatever the tokenizer does with leading spaces (byte-level BPE's "Ġ", SentencePiece's "▁")
instead of re-tokenising pieces and hoping the pieces add up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class Tokenised:
    ids: list[int]
    offsets: list[tuple[int, int]]  # (start, end) characters per token; (0, 0) for specials


def tokenise(tok: PreTrainedTokenizerBase, text: str) -> Tokenised:
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=True)
    return Tokenised(list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])


def _is_special(offset: tuple[int, int]) -> bool:
    return offset[0] == offset[1]


def token_at_char(t: Tokenised, char: int) -> int:
    """Index of the token that covers character ``char``."""
    for i, (start, end) in enumerate(t.offsets):
        if not _is_special((start, end)) and start <= char < end:
            return i
    raise ValueError(f"no token covers character {char}")


def subject_last_token(t: Tokenised, subject_end: int) -> int:
    """Index of the token holding the subject's last character (``subject_end`` is exclusive)."""
    return token_at_char(t, subject_end - 1)


def answer_tokens(t: Tokenised, answer_start: int) -> list[int]:
    """Indices of the tokens of an answer that starts at character ``answer_start``.

    A token that starts with the space before the answer (" English") belongs to the answer.
    """
    return [
        i
        for i, (start, end) in enumerate(t.offsets)
        if not _is_special((start, end)) and end > answer_start
    ]


def pad_id(tok: PreTrainedTokenizerBase) -> int:
    """A token id to fill padding with (always masked out, so any valid id does)."""
    for candidate in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def right_padded(
    rows: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (rows, longest), padded on the right: pads come after
    every real token, so a causal model computes the real positions exactly as unpadded."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)
