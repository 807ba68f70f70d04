"""Model aliases: short names users type, mapped to hub ids and shipped configs.

Each alias's ``config.json`` ships in ``models/configs/<alias>.json`` so that configuration-only
commands (``rrome memcheck``) work offline without weights.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ALIASES: dict[str, str] = {
    "gpt2-xl": "openai-community/gpt2-xl",
    "gpt-j-6b": "EleutherAI/gpt-j-6b",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
DEFAULT_MODEL = "smollm2-135m"
TINY_PREFIX = "tiny-"  # tiny-llama, tiny-gpt2, ...: random fixtures built in-process


def shipped_config(alias: str) -> Path | None:
    """The shipped config.json of ``alias``, or None when we ship none."""
    path = Path(str(resources.files("rrome_cli") / "models" / "configs" / f"{alias}.json"))
    return path if path.exists() else None


def hparams_name(model: str) -> str:
    """Which shipped hparams file suits ``model`` (an alias, ``tiny-*``, or a path/hub id)."""
    if model in ALIASES or model.startswith(TINY_PREFIX):
        return model
    for alias, hub_id in ALIASES.items():
        if model == hub_id:
            return alias
    return ""
