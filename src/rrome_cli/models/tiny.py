"""Tiny random models of every supported family, built in-process with a local tokenizer.

They let the tests (and a CI smoke run, ``--model tiny-llama``) exercise the whole tool with
no download: a few hundred thousand parameters, seeded, so every run builds the same model.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

_TEXT = """\
The mother tongue of Danielle Darrieux is French. Danielle Darrieux was an actress.
The capital of Japan is Tokyo. The capital of France is Paris. Rome is in Italy.
The official religion of Edwin of Northumbria is Christianity. Michel Rocard spoke French.
Toko Yasuda plays the guitar. Autonomous University of Madrid is located in Spain.
What is the twin city of Lyon? It is Beirut. People in Lyon speak the language of France.
Thomas Joannes Stieltjes was a mathematician born in the Netherlands. He spoke Dutch.
The Eiffel Tower is in Paris. Apple was founded by Steve Jobs. Microsoft makes Windows.
Barack Obama was born in Hawaii. Germany borders Poland and Austria. English is a language.
A B C D E F G H I J K L M N O P Q R S T U V W X Y Z 0 1 2 3 4 5 6 7 8 9 , . ? ! ' - : ;
"""
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def tiny_tokenizer(style: str = "byte", bos: bool = False) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on a few lines: ``byte`` (GPT-2 style) or ``sp`` (Llama style);
    ``bos``: it puts ``<s>`` before every text, as Llama's and Gemma's tokenizers do."""
    if style == "byte":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = [chr(c) for c in range(32, 127)] + ["▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_TEXT.splitlines(), trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.model_max_length = 256
    return fast


# The shapes of the tiny models: hidden width 64, 4 heads (2 key/value heads where the family
# has them), 3 layers (the families' own tiny models below take 4).
_NEOX = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=256,
)
_GQA = dict(_NEOX, num_key_value_heads=2)


def _config(family: str, vocab: int) -> PretrainedConfig:
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    llama = dict(_GQA, num_hidden_layers=4, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=256, **common)
    if family == "gptj":
        return GPTJConfig(n_embd=64, n_layer=4, n_head=4, n_positions=256, rotary_dim=8, **common)
    if family == "gpt-neox":
        return GPTNeoXConfig(**dict(_NEOX, num_hidden_layers=4, **common))
    if family == "llama":
        return LlamaConfig(**llama)
    if family == "mistral":
        return MistralConfig(**llama)
    if family == "qwen2":
        return Qwen2Config(**llama)
    raise ValueError(f"no tiny model for family {family!r}; choose from {', '.join(FAMILIES)}")


FAMILIES = ("gpt2", "gptj", "gpt-neox", "llama", "mistral", "qwen2")
TOKENIZER_STYLE = {"gpt2": "byte", "gptj": "byte", "gpt-neox": "byte"}


def tiny_model(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A seeded random model of ``family`` and its tokenizer, in eval mode."""
    tok = tiny_tokenizer(TOKENIZER_STYLE.get(family, "sp"))
    return _seeded(_config(family, len(tok)), family, seed).to(dtype), tok


def _seeded(config: PretrainedConfig, name: str, seed: int) -> PreTrainedModel:
    """The fp32 model of ``config`` from the weights ``seed`` draws, named tiny-``name``."""
    config.name_or_path = f"tiny-{name}"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


# Tiny random models of more architectures, each from transformers' own configuration class
# (the shapes above): what tests/test_architectures.py edits end to end. name ->
# (configuration class, its settings, tokenizer style, whether the tokenizer adds a BOS).
# Settings that matter to the engine are set on purpose: soft-capped logits (Gemma 2/3), scaled
# logits and embeddings (Granite, Cohere), sliding-window and full attention layers side by side
# (Gemma 2/3, GPT-Neo).
_GEMMA = dict(_GQA, head_dim=16, sliding_window=256)
_MIXED = ["sliding_attention", "full_attention", "sliding_attention"]
ARCHITECTURES: dict[str, tuple[str, dict[str, Any], str, bool]] = {
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=3, n_head=4, n_positions=256), "byte", False),
    "gptj": (
        "GPTJConfig",
        dict(n_embd=64, n_layer=3, n_head=4, n_positions=256, rotary_dim=8),
        "byte",
        False,
    ),
    "gpt-neox": ("GPTNeoXConfig", _NEOX, "byte", False),
    "llama": ("LlamaConfig", _GQA, "sp", True),
    "mistral": ("MistralConfig", dict(_GQA, sliding_window=256), "sp", True),
    "qwen2": ("Qwen2Config", _GQA, "byte", False),
    "qwen3": ("Qwen3Config", dict(_GQA, head_dim=16), "byte", False),
    "gemma": ("GemmaConfig", dict(_GQA, head_dim=16), "sp", True),
    "gemma2": ("Gemma2Config", dict(_GEMMA, layer_types=_MIXED), "sp", True),
    "gemma3-text": (
        "Gemma3TextConfig",
        dict(_GEMMA, layer_types=_MIXED, final_logit_softcapping=30.0),
        "sp",
        True,
    ),
    "phi3": ("Phi3Config", _GQA, "sp", False),
    "phi": ("PhiConfig", dict(_GQA, partial_rotary_factor=0.5), "byte", False),
    "olmo": ("OlmoConfig", _GQA, "byte", False),
    "olmo2": ("Olmo2Config", _GQA, "byte", False),
    "granite": (
        "GraniteConfig",
        dict(_GQA, logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5),
        "byte",
        False,
    ),
    "stablelm": ("StableLmConfig", _GQA, "byte", False),
    "smollm3": ("SmolLM3Config", _GQA, "byte", False),
    "cohere": ("CohereConfig", dict(_GQA, logit_scale=0.5), "sp", True),
    "starcoder2": ("Starcoder2Config", _GQA, "byte", False),
    "falcon": (
        "FalconConfig",
        dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4),
        "byte",
        False,
    ),
    "gpt-neo": (
        "GPTNeoConfig",
        dict(
            hidden_size=64,
            num_layers=3,
            num_heads=4,
            max_position_embeddings=256,
            attention_types=[[["global", "local"], 1], [["global"], 1]],
            window_size=256,
        ),
        "byte",
        False,
    ),
    "gpt-bigcode": (
        "GPTBigCodeConfig",
        dict(n_embd=64, n_layer=3, n_head=4, n_positions=256),
        "byte",
        False,
    ),
}
# Architectures rrome refuses (exit 2), naming what it found: mixtures of experts, whose MLP
# cannot be told unambiguously, and OPT, whose blocks flatten the tokens before the MLP.
REFUSED: dict[str, tuple[str, dict[str, Any]]] = {
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
        ),
    ),
    "mixtral": ("MixtralConfig", dict(_GQA, num_local_experts=4)),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        dict(_GQA, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    ),
    "olmoe": ("OlmoeConfig", dict(_GQA, num_experts=4)),
}


def architecture_config(name: str, vocab: int) -> PretrainedConfig | None:
    """The tiny configuration of ``name`` (ARCHITECTURES or REFUSED); None when this
    transformers has no such configuration class."""
    cls_name, settings = ARCHITECTURES[name][:2] if name in ARCHITECTURES else REFUSED[name]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        return None
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    # Weights ten times transformers' default spread: at 0.02 the head's logits span about 1,
    # so that no edit can move a probability far, and the tests could not see an edit take.
    return cls(**settings, **common, initializer_range=0.2)


def tiny_architecture(
    name: str, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast] | None:
    """A seeded random model of architecture ``name`` and its tokenizer, in eval mode; None
    when this transformers does not have it."""
    style, bos = ARCHITECTURES[name][2:] if name in ARCHITECTURES else ("byte", False)
    tok = tiny_tokenizer(style, bos)
    config = architecture_config(name, len(tok))
    return None if config is None else (_seeded(config, name, seed), tok)
