"""Module names of the families rrome ships aliases for, and helpers on modules.

ROME edits the output projection of one MLP. ``models.structure`` finds it in any decoder-only
model from the modules themselves; this table of architecture classes
(``config.architectures[0]``) to module-name templates (``{}``: the layer index) is its fast
path and cross-check, never the only way. We never guess from substrings of a checkpoint's name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn


class UnknownArchitectureError(ValueError):
    """The architecture is not in the table and the hparams do not name its modules."""


@dataclass(frozen=True)
class ModuleNames:
    rewrite_module_tmp: str  # W, the MLP output projection: input is the key k, output the value
    layer_module_tmp: str  # the whole decoder block
    mlp_module_tmp: str  # the MLP; delta is added to its output while optimising v*

    def rewrite(self, layer: int) -> str:
        return self.rewrite_module_tmp.format(layer)

    def mlp(self, layer: int) -> str:
        return self.mlp_module_tmp.format(layer)

    def layer(self, layer: int) -> str:
        return self.layer_module_tmp.format(layer)


def _names(prefix: str, mlp: str, proj: str) -> ModuleNames:
    return ModuleNames(
        rewrite_module_tmp=f"{prefix}.{{}}.{mlp}.{proj}",
        layer_module_tmp=f"{prefix}.{{}}",
        mlp_module_tmp=f"{prefix}.{{}}.{mlp}",
    )


_LLAMA_LIKE = _names("model.layers", "mlp", "down_proj")

FAMILIES: dict[str, ModuleNames] = {
    "GPT2LMHeadModel": _names("transformer.h", "mlp", "c_proj"),
    "GPTJForCausalLM": _names("transformer.h", "mlp", "fc_out"),
    "GPTNeoForCausalLM": _names("transformer.h", "mlp", "c_proj"),
    "GPTNeoXForCausalLM": _names("gpt_neox.layers", "mlp", "dense_4h_to_h"),
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
    "GemmaForCausalLM": _LLAMA_LIKE,
    "Gemma2ForCausalLM": _LLAMA_LIKE,
    "Phi3ForCausalLM": _names("model.layers", "mlp", "down_proj"),
}

MODULE_KEYS = tuple(f.name for f in fields(ModuleNames))


def module_names(architecture: str | None, overrides: dict[str, Any] | None = None) -> ModuleNames:
    """Names for ``architecture`` from the table alone; any of ``MODULE_KEYS`` set in
    ``overrides`` (the YAML) win. With the model at hand, ``models.structure.resolve`` also
    reads any architecture the table does not list."""
    overrides = {k: v for k, v in (overrides or {}).items() if k in MODULE_KEYS and v}
    base = FAMILIES.get(architecture or "")
    if base is not None:
        return replace(base, **overrides)
    if set(overrides) == set(MODULE_KEYS):
        return ModuleNames(**overrides)
    missing = ", ".join(k for k in MODULE_KEYS if k not in overrides)
    raise UnknownArchitectureError(
        f"unknown architecture {architecture!r}: rrome knows {', '.join(sorted(FAMILIES))}. "
        f"Name its modules in the hparams YAML instead; missing keys: {missing} "
        "(e.g. rewrite_module_tmp: 'model.layers.{}.mlp.down_proj')."
    )


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise UnknownArchitectureError(f"model has no module {name!r}: {err}") from None


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores W as (in, out); nn.Linear as (out, in)."""
    return type(module).__name__ == "Conv1D"


def weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """W viewed as (d_out, d_in), whatever the layout; a view, not a copy."""
    return module.weight.T if is_conv1d(module) else module.weight


def num_layers(config: Any) -> int:
    if hasattr(config, "get_text_config"):  # a multimodal config's language model
        config = config.get_text_config()
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise UnknownArchitectureError("config names no layer count (num_hidden_layers or n_layer)")


def base_of(model: nn.Module) -> nn.Module:
    """The model without its output head (what returns ``last_hidden_state``). ``base_model``,
    except where a class's ``base_model_prefix`` names no attribute of it (transformers 4.56's
    Gemma3ForCausalLM: "language_model" for its ``model``) and ``base_model`` is the model
    itself: then its decoder, or its one child that is a pretrained model."""
    base = getattr(model, "base_model", model)
    if base is not model:
        return base
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        return decoder
    inner = [m for m in model.children() if hasattr(m, "config") and hasattr(m, "forward")]
    if len(inner) == 1:
        return inner[0]
    raise UnknownArchitectureError(f"{type(model).__name__}: no base model without the head")


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device when its weights are offloaded
    (they then sit on the meta device between calls), else the device of its parameters."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the input embedding's execution device."""
    return execution_device(model.get_input_embeddings())
