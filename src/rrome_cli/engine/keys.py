"""Keys at the edited layer: the input of W at the subject's last token.

k* (``k_star``) is that input averaged over all context templates. One batched forward,
stopped right after layer l, gives the keys of every template at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rrome_cli.engine.hooks import capture_input, stop_after
from rrome_cli.engine.positions import (
    Tokenised,
    encode_pair,
    pad_id,
    right_padded,
    special_prefix,
    subject_last_token,
    tokenise,
)
from rrome_cli.models.families import ModuleNames, execution_device, input_device
from rrome_cli.requests import EditRequest


@dataclass
class Templated:
    """One templated prompt: its text, tokens, and the subject's last token index."""

    text: str
    tokens: Tokenised
    subject_end: int  # character just after the subject
    subject_last: int  # token index of the subject's last token


def templated(tok: PreTrainedTokenizerBase, request: EditRequest, template: str) -> Templated:
    """``template`` (with "{}") filled with the request's prompt, the subject located."""
    subject_start = template.index("{}") + request.prompt.index("{}")
    text = template.replace("{}", request.text)
    return _located(tok, text, subject_start + len(request.subject))


def phrased(tok: PreTrainedTokenizerBase, subject: str, phrasing: str) -> Templated:
    """Another phrasing of the relation ("{} is a native speaker of") with the subject."""
    text = phrasing.replace("{}", subject)
    return _located(tok, text, phrasing.index("{}") + len(subject))


def _located(tok: PreTrainedTokenizerBase, text: str, subject_end: int) -> Templated:
    tokens = tokenise(tok, text)
    return Templated(text, tokens, subject_end, subject_last_token(tokens, subject_end))


def _w_inputs(
    model: PreTrainedModel, names: ModuleNames, layer: int, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """W's input at every position, (batch, seq, d_in) in the model's dtype; the forward stops
    right after ``layer``."""
    captured: list[torch.Tensor] = []
    with (
        capture_input(model.get_submodule(names.rewrite(layer)), captured.append),
        stop_after(model.get_submodule(names.layer(layer))),
    ):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return captured[0]


@torch.no_grad()
def keys_at(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    names: ModuleNames,
    layer: int,
    prompts: list[Templated],
) -> torch.Tensor:
    """The key at each prompt's subject last token: (n_prompts, d_in), fp32 on W's device."""
    # Right padding keeps every real token at its own position; causal attention means the
    # padding after a prompt cannot change the keys we read.
    ids, mask = right_padded([p.tokens.ids for p in prompts], pad_id(tok), input_device(model))
    k_all = _w_inputs(model, names, layer, ids, mask)
    rows = torch.arange(len(prompts), device=k_all.device)
    cols = torch.tensor([p.subject_last for p in prompts], device=k_all.device)
    w_device = execution_device(model.get_submodule(names.rewrite(layer)))
    return k_all[rows, cols].float().to(w_device)


def keys_after_subject(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    names: ModuleNames,
    layer: int,
    prompt: Templated,
    target: str,
) -> torch.Tensor:
    """The keys at every token after the subject of ``prompt`` followed by ``target``, as
    evaluation feeds it (teacher forcing: the target's last token is not fed): the relation
    (" writes in") and the target's own tokens, where the new fact is read out. (n_after, d_in)
    fp32 on W's device; (0, d_in) when the subject is the last token fed."""
    return keys_after_subjects(model, tok, names, layer, [(prompt, target)])[0]


@torch.no_grad()
def keys_after_subjects(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    names: ModuleNames,
    layer: int,
    pairs: list[tuple[Templated, str]],
) -> list[torch.Tensor]:
    """``keys_after_subject`` for each (prompt, target), in one right-padded forward."""
    prefix = special_prefix(tok)
    fed, firsts = [], []
    for prompt, target in pairs:
        full = encode_pair(tok, prompt.text, target, prefix)
        fed.append(full.input_ids[:-1])
        firsts.append(full.subject_last(prompt.subject_end) + 1)
    ids, mask = right_padded(fed, pad_id(tok), input_device(model))
    k_all = _w_inputs(model, names, layer, ids, mask)
    w_device = execution_device(model.get_submodule(names.rewrite(layer)))
    return [
        k_all[i, first : len(row)].float().to(w_device)
        for i, (first, row) in enumerate(zip(firsts, fed, strict=True))
    ]
