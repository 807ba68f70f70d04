"""Context templates: ``"{}"`` plus short prefixes sampled from the unedited model.

The key k* and the value v* are averaged over the templates so the edit generalises beyond the
exact prompt. They are generated once per run (seeded), saved into the run directory, and kept
fixed through a sequential run so every edit sees the same contexts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rrome_cli.engine.positions import pad_id
from rrome_cli.models.families import input_device
from rrome_cli.requests import RequestError, read_json_file

STARTERS = ("The", "Therefore", "Because", "I", "You")


def generate_templates(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    length_params: list[list[int]],
    seed: int = 0,
) -> list[str]:
    """``["{}"]`` + for each ``[length, n]``: n samples of ``length`` new tokens, as "... {}"."""
    device = input_device(model)
    templates = ["{}"]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for length, n in length_params:
            starters = [STARTERS[i % len(STARTERS)] for i in range(n)]
            for text in _sample(model, tok, starters, length, device):
                templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


def _sample(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    starters: list[str],
    length: int,
    device: torch.device,
) -> list[str]:
    """Top-5 samples of exactly ``length`` new tokens, one batched ``generate`` call."""
    rows = [tok(s).input_ids for s in starters]
    width = max(len(r) for r in rows)
    pad = pad_id(tok)
    # Left padding by hand (the shared tokenizer's padding side is never touched).
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    out = model.generate(
        ids,
        attention_mask=mask,
        do_sample=True,
        top_k=5,
        max_new_tokens=length,
        min_new_tokens=length,
        pad_token_id=pad,
    )
    return [" ".join(t.split()) for t in tok.batch_decode(out, skip_special_tokens=True)]


def save_templates(templates: list[str], path: Path) -> None:
    path.write_text(json.dumps(templates, indent=1, ensure_ascii=False) + "\n")


def load_templates(path: Path) -> list[str]:
    """A ``templates.json``: a JSON list of strings, each with one ``{}`` (the prompt)."""
    name, templates = str(path), read_json_file(path)
    if not isinstance(templates, list) or not templates:
        raise RequestError(
            name, None, None, "expected a JSON list of templates, each with one '{}'"
        )
    for number, t in enumerate(templates, start=1):
        if not (isinstance(t, str) and t.count("{}") == 1):
            raise RequestError(name, None, None, f"template {number} ({t!r}): needs one '{{}}'")
    return templates
