"""Tiny random models of every supported family, built in-process with a local tokenizer.

They let the tests (and a CI smoke run, ``--model tiny-llama``) exercise the whole tool with
no download: a few hundred thousand parameters, seeded, so every run builds the same model.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
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


def tiny_tokenizer(style: str = "byte") -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on a few lines: ``byte`` (GPT-2 style) or ``sp`` (Llama style)."""
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
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.model_max_length = 256
    return fast


def _config(family: str, vocab: int) -> PretrainedConfig:
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    llama = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=256, **common)
    if family == "gptj":
        return GPTJConfig(n_embd=64, n_layer=4, n_head=4, n_positions=256, rotary_dim=8, **common)
    if family == "gpt-neox":
        return GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=256,
            **common,
        )
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
    config = _config(family, len(tok))
    config.name_or_path = f"tiny-{family}"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype).eval(), tok
