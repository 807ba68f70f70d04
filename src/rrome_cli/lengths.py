"""Requests against the model's context: a request whose longest sequence (the prompt behind
the longest context template, with the target) is longer than the model's positions is bad
input, refused with its file, line and field before any edit allocates for it.

Today's failures without the check: a 20,000-token prompt asks for 9.5 GB, a 4,000-token one
runs for minutes at 4 GB, and on a 256-position model a long prompt is an internal error.
"""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from rrome_cli.config import HParams
from rrome_cli.engine.positions import encode_pair, special_prefix, tokenise
from rrome_cli.requests import EditRequest, RequestError

# A sampled context template's tokens beyond its length: the starter word, ". " and the
# merges of a retokenised text (engine.templates.generate_templates).
TEMPLATE_MARGIN = 6
FLUENCY_TOKENS = 50  # evaluate.metrics.evaluate_request generates this many for --fluency
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")


def max_positions(config: PretrainedConfig) -> int | None:
    """The most tokens the model takes in one sequence, as its configuration says (None: it
    does not say)."""
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def template_allowance(
    tok: PreTrainedTokenizerBase, hp: HParams, templates: list[str] | None = None
) -> int:
    """Tokens the longest context template puts in front of a prompt: counted for given
    templates (``--templates``), else bounded from ``context_template_length_params``."""
    if templates:
        return max(len(tokenise(tok, t.replace("{}", ""), prefix=()).ids) for t in templates)
    lengths = [length for length, count in hp.context_template_length_params if count]
    return max(lengths, default=-TEMPLATE_MARGIN) + TEMPLATE_MARGIN


def longest_sequence(
    tok: PreTrainedTokenizerBase, request: EditRequest, allowance: int, fluency: bool = False
) -> tuple[int, str]:
    """(tokens, field) of the longest sequence an edit and its evaluation run for
    ``request``: the prompt behind ``allowance`` template tokens with the target, each
    rephrasing, phrasing, locality and portability prompt with its answer."""
    prefix = special_prefix(tok)

    def pair(prompt: str, answer: str) -> int:
        return len(encode_pair(tok, prompt, answer, prefix).input_ids)

    target = request.target_new
    sizes = [(pair(request.text, target) + allowance, "prompt")]
    if fluency:
        sizes.append((len(tokenise(tok, request.text).ids) + FLUENCY_TOKENS, "prompt"))
    rephrased = enumerate(request.rephrase_prompts)
    sizes += [(pair(p, target), f"rephrase_prompt[{i}]") for i, p in rephrased]
    sizes += [
        (pair(p.replace("{}", request.subject), target), f"phrasings[{i}]")
        for i, p in enumerate(request.phrasings)
    ]
    sizes += [(pair(p, a), f"locality[{i}]") for i, (p, a) in enumerate(request.locality)]
    sizes += [(pair(p, a), f"portability[{i}]") for i, (p, a) in enumerate(request.portability)]
    return max(sizes, key=lambda size: size[0])


def check_length(
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    limit: int | None,
    allowance: int,
    fluency: bool = False,
) -> None:
    """Raise a RequestError naming the request's file, line and field when its longest
    sequence does not fit in ``limit`` positions (None: no limit known)."""
    if limit is None:
        return
    tokens, field = longest_sequence(tok, request, allowance, fluency)
    if tokens > limit:
        file, _, line = request.source.rpartition(":")
        what = "with the longest context template and the target" if field == "prompt" else ""
        raise RequestError(
            file or request.source,
            int(line) if line.isdigit() else None,
            field,
            f"{tokens} tokens {what}; the model takes at most {limit}".replace("  ", " "),
        )
