"""Token positions from character offsets: the subject's last token and an answer's tokens.

We tokenise the whole text once and read the tokenizer's offset mapping, which stays correct
whatever the tokenizer does with leading spaces (byte-level BPE's "Ġ", SentencePiece's "▁")
instead of re-tokenising pieces and hoping the pieces add up.

One tokenisation serves the keys, the value optimisation and the evaluation: the tokenizer's
leading special tokens (BOS), then the text's own tokens; an answer is read as a continuation
of its prompt (``encode_pair``), so the edit is optimised on exactly what is later measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class Tokenised:
    ids: list[int]
    offsets: list[tuple[int, int]]  # (start, end) characters per token; (0, 0) for specials


def special_prefix(tok: PreTrainedTokenizerBase) -> list[int]:
    """The tokens the tokenizer puts before any text (BOS for Llama-style tokenizers, else none)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            prefix = list(full[:start])
            break
    else:
        prefix = []
    if not prefix and getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None:
        prefix = [tok.bos_token_id]
    return prefix


def tokenise(
    tok: PreTrainedTokenizerBase, text: str, prefix: Sequence[int] | None = None
) -> Tokenised:
    """``text`` as the model reads it: ``prefix`` (default: the tokenizer's leading special
    tokens) then the text's tokens, with their character spans ((0, 0) for the specials)."""
    prefix = special_prefix(tok) if prefix is None else list(prefix)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [tuple(o) for o in enc["offset_mapping"]]
    return Tokenised(prefix + list(enc["input_ids"]), [(0, 0)] * len(prefix) + spans)


@dataclass
class Encoded:
    input_ids: list[int]  # special prefix (BOS) + tokens of "prompt answer"
    answer_start: int  # index in input_ids of the first answer token (>= 1)
    text: str  # "prompt answer" as tokenised (the prompt's trailing spaces dropped)
    offsets: list[tuple[int, int]] | None  # character spans in ``text``; None: slow tokenizer

    def subject_last(self, subject_end: int) -> int:
        """The subject's last token in "prompt answer" (``subject_end``: in the prompt)."""
        return subject_last_token(Tokenised(self.input_ids, self.offsets or []), subject_end)


def encode_pair(
    tok: PreTrainedTokenizerBase, prompt: str, answer: str, prefix: Sequence[int] = ()
) -> Encoded:
    """Tokenise ``prompt`` followed by ``answer`` as a continuation (one space between them).

    Trailing spaces of the prompt and leading spaces of the answer are dropped first, so
    ``"English"`` and ``" English"`` give the same tokens. The answer's first token is the
    first whose span reaches past the prompt (the separating space belongs to it).
    """
    context, answer = prompt.rstrip(), answer.lstrip()
    if not answer:
        raise ValueError(f"empty answer for prompt {prompt!r}")
    text = f"{context} {answer}"
    offsets = None
    if tok.is_fast:
        t = tokenise(tok, text, prefix)
        ids, offsets = t.ids, t.offsets
        first = next(
            i for i, span in enumerate(offsets) if not _is_special(span) and span[1] > len(context)
        )
    else:  # no offsets: the answer starts where the prompt's own tokens stop matching
        ids = list(prefix) + list(tok(text, add_special_tokens=False)["input_ids"])
        context_ids = list(prefix) + list(tok(context, add_special_tokens=False)["input_ids"])
        first = len(prefix)
        while first < min(len(ids) - 1, len(context_ids)) and ids[first] == context_ids[first]:
            first += 1
    if first == 0:
        raise ValueError(
            f"prompt {prompt!r} is empty and the tokenizer adds no BOS: "
            "the first answer token has nothing to be predicted from"
        )
    return Encoded(ids, first, text, offsets)


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
