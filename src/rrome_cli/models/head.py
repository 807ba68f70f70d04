"""The logits a model gives from its final hidden states: its output head, then what some
families do to the head's output.

The value optimisation reads logits only where its loss needs them (``engine.packing``), so it
applies the head itself instead of running the model's whole LM forward. Families that change
the head's output say so in their configuration: Gemma 2/3 soft-cap the logits
(``final_logit_softcapping``: c·tanh(x/c)), Granite divides them (``logits_scaling``), Cohere
multiplies them (``logit_scale``). Before a model is edited ``check_output_head`` compares
these logits with the model's own on a few tokens: a family that does something else is
refused (exit 2) rather than edited against the wrong distribution.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from rrome_cli.models.families import (
    UnknownArchitectureError,
    base_of,
    execution_device,
    input_device,
)

_CHECKED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _setting(config: Any, key: str) -> float | None:
    """``key`` of the configuration (or of its language model's, for a multimodal one)."""
    for source in (config, getattr(config, "text_config", None)):
        value = getattr(source, key, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits (fp32) from its final hidden states ``hidden`` (..., d)."""
    head = model.get_output_embeddings()
    logits = head(hidden.to(execution_device(head))).float()
    config = model.config
    cap = _setting(config, "final_logit_softcapping")
    if cap:
        logits = torch.tanh(logits / cap) * cap
    divide = _setting(config, "logits_scaling")
    if divide and divide != 1.0:
        logits = logits / divide
    multiply = _setting(config, "logit_scale")
    if multiply is not None and multiply != 1.0:
        logits = logits * multiply
    return logits


@torch.no_grad()
def check_output_head(model: nn.Module, rewrite: str | None = None, tokens: int = 4) -> None:
    """On a few tokens (once per model): ``head_logits`` of the final hidden states give the
    model's own logits, and the module ``rewrite`` (W at some layer) sees its input as
    (batch, tokens, width), as the engine reads keys; else UnknownArchitectureError, naming
    what differs."""
    if _CHECKED.get(model):
        return
    head = model.get_output_embeddings()
    if head is None:
        raise UnknownArchitectureError(f"{type(model).__name__} has no output head to edit for")
    vocab = head.weight.shape[0]
    ids = torch.arange(1, min(tokens, vocab - 1) + 1, device=input_device(model))[None]
    shapes: list[tuple[int, ...]] = []
    hook = (
        model.get_submodule(rewrite).register_forward_pre_hook(
            lambda _m, args: shapes.append(tuple(args[0].shape))
        )
        if rewrite
        else None
    )
    try:
        own = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        if hook is not None:
            hook.remove()
    if rewrite and shapes and shapes[0][:2] != tuple(ids.shape):
        raise UnknownArchitectureError(
            f"{type(model).__name__}: {rewrite} sees {tuple(ids.shape)} tokens as "
            f"{shapes[0]}, not (batch, tokens, width): its blocks reshape the tokens before "
            "the MLP, which rrome's key and value passes do not follow"
        )
    hidden = base_of(model)(input_ids=ids, use_cache=False).last_hidden_state
    ours = head_logits(model, hidden).to(own.device)
    scale = max(own.abs().max().item(), 1.0)
    tolerance = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    differ = (own - ours).abs().max().item()
    if not differ <= tolerance * scale:  # NaN fails too
        raise UnknownArchitectureError(
            f"{type(model).__name__}: its logits are not its output head's of the final hidden "
            f"states (largest difference {differ:.3g}, logits up to {scale:.3g}), even with "
            "the soft-capping and scaling that rrome knows (final_logit_softcapping, "
            "logits_scaling, logit_scale): rrome cannot optimise an edit against them"
        )
    _CHECKED[model] = True
