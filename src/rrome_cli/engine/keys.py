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
    pad_id,
    right_padded,
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
    prompt_text = template.replace("{}", request.text)
    subject_start = template.index("{}") + request.prompt.index("{}")
    subject_end = subject_start + len(request.subject)
    tokens = tokenise(tok, prompt_text)
    return Templated(prompt_text, tokens, subject_end, subject_last_token(tokens, subject_end))


@torch.no_grad()
def keys_at(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    names: ModuleNames,
    layer: int,
    prompts: list[Templated],
) -> torch.Tensor:
    """The key at each prompt's subject last token: (n_prompts, d_in), fp32 on W's device."""
    w_module = model.get_submodule(names.rewrite(layer))
    device = input_device(model)
    # Right padding keeps every real token at its own position; causal attention means the
    # padding after a prompt cannot change the keys we read.
    ids, mask = right_padded([p.tokens.ids for p in prompts], pad_id(tok), device)
    captured: list[torch.Tensor] = []
    with (
        capture_input(w_module, captured.append),
        stop_after(model.get_submodule(names.layer(layer))),
    ):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    k_all = captured[0]  # (batch, seq, d_in), model dtype
    rows = torch.arange(len(prompts), device=k_all.device)
    cols = torch.tensor([p.subject_last for p in prompts], device=k_all.device)
    w_device = execution_device(w_module)
    return k_all[rows, cols].float().to(w_device)
