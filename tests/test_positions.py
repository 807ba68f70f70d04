"""Token positions from character offsets, for byte-level (GPT-2) and SentencePiece-style BPE.

The reference for "the subject's last token" is computed another way: tokenise the text up to
the subject's end and count the tokens (valid because each subject here ends at a word
boundary, where both pre-tokenizers split).
"""

from __future__ import annotations

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from rrome_cli.engine.positions import encode_pair, subject_last_token, token_at_char, tokenise
from rrome_cli.models.tiny import tiny_tokenizer

STYLES = ("byte", "sp")
SUBJECT = "Danielle Darrieux"
# (text, subject start): at the start, in the middle, at the end, after leading spaces.
CASES = [
    ("Danielle Darrieux is an actress", 0),
    ("The mother tongue of Danielle Darrieux is", 21),
    ("The mother tongue of Danielle Darrieux", 21),
    ("  Danielle Darrieux is", 2),
    ("The tongue of   Danielle Darrieux is", 16),
]


@pytest.fixture(scope="module", params=STYLES)
def tok(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return tiny_tokenizer(request.param)


def with_bos(style: str) -> PreTrainedTokenizerFast:
    """A tokenizer that prepends <s>, like Llama-2's: offsets (0, 0) mark it special."""
    tok = tiny_tokenizer(style)
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)]
    )
    return tok


def piece(tok: PreTrainedTokenizerFast, token_id: int) -> str:
    """A token's text, with the leading-space markers of either style as a space."""
    return tok.convert_ids_to_tokens(token_id).replace("Ġ", " ").replace("▁", " ")


@pytest.mark.parametrize(("text", "start"), CASES)
def test_subject_last_token(tok: PreTrainedTokenizerFast, text: str, start: int) -> None:
    assert text[start : start + len(SUBJECT)] == SUBJECT
    end = start + len(SUBJECT)
    tokens = tokenise(tok, text)
    expected = len(tok(text[:end]).input_ids) - 1
    assert tok(text).input_ids[: expected + 1] == tok(text[:end]).input_ids

    index = subject_last_token(tokens, end)

    assert index == expected
    assert "Darrieux".endswith(piece(tok, tokens.ids[index]).strip())


@pytest.mark.parametrize("style", STYLES)
def test_special_tokens_are_skipped(style: str) -> None:
    tok = with_bos(style)
    text, start = CASES[1]
    tokens = tokenise(tok, text)
    assert tokens.ids[0] == tok.bos_token_id  # the post-processor did add it
    plain = tokenise(tiny_tokenizer(style), text)
    end = start + len(SUBJECT)
    assert subject_last_token(tokens, end) == subject_last_token(plain, end) + 1
    # Character 0 is the text's first character, not the BOS token (offsets (0, 0)).
    assert token_at_char(tokens, 0) == 1
    pair = encode_pair(tok, "Danielle Darrieux is", "English", [tok.bos_token_id])
    assert pair.input_ids[0] == tok.bos_token_id and pair.answer_start > 1
    assert pair.input_ids == tokenise(tok, pair.text).ids


@pytest.mark.parametrize(
    ("prompt", "answer"),
    [
        ("The mother tongue of Danielle Darrieux is", " English"),
        ("Apple was founded by", " Bill Gates"),
        ("Danielle Darrieux", " is a"),
    ],
)
def test_answer_tokens(tok: PreTrainedTokenizerFast, prompt: str, answer: str) -> None:
    full_text = prompt + answer
    tokens = tokenise(tok, full_text)
    n_prompt = len(tok(prompt).input_ids)
    assert tok(full_text).input_ids[:n_prompt] == tok(prompt).input_ids

    pair = encode_pair(tok, prompt, answer)
    indices = list(range(pair.answer_start, len(pair.input_ids)))

    assert pair.input_ids == tokens.ids
    assert indices == list(range(n_prompt, len(tokens.ids)))
    assert "".join(piece(tok, tokens.ids[i]) for i in indices) == answer


def test_token_at_char_out_of_range(tok: PreTrainedTokenizerFast) -> None:
    tokens = tokenise(tok, "Rome is")
    assert token_at_char(tokens, 6) == len(tokens.ids) - 1
    with pytest.raises(ValueError, match="character 7"):
        token_at_char(tokens, 7)
