"""Per-request metrics, before and after an edit.

Token metrics (EasyEdit's definitions, teacher-forced; see ``tokens.py`` for the tokenisation):

- ``rewrite_acc``: fraction of ``target_new``'s tokens that are the argmax after the prompt;
- ``rephrase_acc``: the same on each rephrased prompt, averaged;
- ``portability``: the same for each (prompt, answer) portability pair, averaged;
- ``locality``: for each locality (prompt, answer), the fraction of answer positions whose argmax
  token is the same after the edit as before it, averaged. Before the edit it is 1.0 by
  definition; the pre-edit call returns a ``Reference`` holding those argmax tokens.

CounterFact scores (``counterfact.py``): ``nll_new``/``nll_true`` on the prompt, ``es``/``em``,
``ps``/``pm`` (when the request has a ``ground_truth``), ``ns``/``nm`` (when it also has locality
pairs, whose answers are then taken as the neighbours' true answers).

``fluency`` (``fluency.py``): n-gram entropy of a generation from the prompt, when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from rrome_cli.engine.update import Patch, rows_patched
from rrome_cli.evaluate import counterfact
from rrome_cli.evaluate.fluency import generate, n_gram_entropy
from rrome_cli.evaluate.tokens import AnswerScore, PaddingSide, score_answers
from rrome_cli.requests import EditRequest


@dataclass
class Reference:
    """What the post-edit evaluation needs from the unedited model."""

    locality_argmax: list[list[int]] = field(default_factory=list)  # per pair, per answer token
    locality_answer_ids: list[list[int]] = field(default_factory=list)  # to check alignment

    def to_dict(self) -> dict[str, Any]:
        return {
            "locality_argmax": self.locality_argmax,
            "locality_answer_ids": self.locality_answer_ids,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reference:
        return cls(
            [list(x) for x in data["locality_argmax"]],
            [list(x) for x in data["locality_answer_ids"]],
        )


def token_accuracy(predicted: list[int], target: list[int]) -> float:
    """Fraction of positions where the prediction is the target token."""
    if len(predicted) != len(target) or not target:
        raise ValueError(f"cannot compare {len(predicted)} predictions with {len(target)} targets")
    return sum(p == t for p, t in zip(predicted, target, strict=True)) / len(target)


def locality_agreement(pre: list[int], post: list[int]) -> float:
    """Fraction of positions whose argmax token is unchanged by the edit."""
    return token_accuracy(post, pre)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _pairs(request: EditRequest) -> list[tuple[str, str, str]]:
    """(role, prompt, answer) for every sequence the request's metrics need."""
    new, true = request.target_new, request.ground_truth
    pairs = [("rewrite", request.text, new)]
    pairs += [("rephrase", p, new) for p in request.rephrase_prompts]
    pairs += [("locality", p, a) for p, a in request.locality]
    pairs += [("portability", p, a) for p, a in request.portability]
    if true:
        pairs.append(("rewrite_true", request.text, true))
        pairs += [("rephrase_true", p, true) for p in request.rephrase_prompts]
        pairs += [("locality_new", p, new) for p, _ in request.locality]
    return pairs


def _locality(
    scores: list[AnswerScore], reference: Reference | None, request: EditRequest
) -> float:
    if reference is None:
        return 1.0
    if [s.answer_ids for s in scores] != reference.locality_answer_ids:
        raise ValueError(
            f"request {request.case_id!r} ({request.source or 'no source'}): the reference's "
            "locality answers do not match this request's (was it made for another request?)"
        )
    return _mean(
        [
            locality_agreement(pre, s.predicted_ids)
            for pre, s in zip(reference.locality_argmax, scores, strict=True)
        ]
    )


def _counterfact(by_role: dict[str, list[AnswerScore]]) -> dict[str, float]:
    out: dict[str, float] = {}
    if not by_role.get("rewrite_true"):
        return out
    nll_new, nll_true = by_role["rewrite"][0].nll, by_role["rewrite_true"][0].nll
    out["nll_new"], out["nll_true"] = nll_new, nll_true
    out["es"], out["em"] = counterfact.rewrite_scores([nll_new], [nll_true])
    if by_role.get("rephrase"):
        out["ps"], out["pm"] = counterfact.rewrite_scores(
            [s.nll for s in by_role["rephrase"]], [s.nll for s in by_role["rephrase_true"]]
        )
    if by_role.get("locality"):
        out["ns"], out["nm"] = counterfact.neighbourhood_scores(
            [s.nll for s in by_role["locality_new"]], [s.nll for s in by_role["locality"]]
        )
    return out


def _request_metrics(
    request: EditRequest,
    pairs: list[tuple[str, str, str]],
    scores: list[AnswerScore],
    reference: Reference | None,
) -> tuple[dict[str, float], Reference]:
    by_role: dict[str, list[AnswerScore]] = {}
    for (role, _, _), score in zip(pairs, scores, strict=True):
        by_role.setdefault(role, []).append(score)
    metrics: dict[str, float] = {"rewrite_acc": by_role["rewrite"][0].accuracy}
    if by_role.get("rephrase"):
        metrics["rephrase_acc"] = _mean([s.accuracy for s in by_role["rephrase"]])
    locality = by_role.get("locality", [])
    if locality:
        metrics["locality"] = _locality(locality, reference, request)
    if by_role.get("portability"):
        metrics["portability"] = _mean([s.accuracy for s in by_role["portability"]])
    metrics.update(_counterfact(by_role))
    if reference is None:
        reference = Reference([s.predicted_ids for s in locality], [s.answer_ids for s in locality])
    return metrics, reference


def evaluate_requests(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    references: Sequence[Reference | None] | None = None,
    fluency: bool = False,
    seed: int = 0,
    *,
    padding_side: PaddingSide = "right",
    max_new_tokens: int = 50,
    sample: bool = False,
    batch_size: int = 32,
) -> list[tuple[dict[str, float], Reference]]:
    """``evaluate_request`` for many requests, their prompts batched together (``batch_size``
    sequences per forward, one generation batch per ``batch_size`` requests)."""
    if references is None:
        references = [None] * len(requests)
    if len(references) != len(requests):
        raise ValueError(f"{len(references)} references for {len(requests)} requests")
    pairs = [_pairs(r) for r in requests]
    flat = [(p, a) for request_pairs in pairs for _, p, a in request_pairs]
    scores = score_answers(model, tok, flat, padding_side, batch_size)
    results, at = [], 0
    for request, request_pairs, reference in zip(requests, pairs, references, strict=True):
        own = scores[at : at + len(request_pairs)]
        at += len(request_pairs)
        results.append(_request_metrics(request, request_pairs, own, reference))
    if fluency:
        unedited = [[] for _ in requests]
        texts = _generations(model, tok, requests, unedited, seed, max_new_tokens, sample)
        for (metrics, _), text in zip(results, texts, strict=True):
            metrics["fluency"] = n_gram_entropy([text])
    return results


def evaluate_edits(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    patches: Sequence[Sequence[Patch]],
    fluency: bool = False,
    seed: int = 0,
) -> list[tuple[dict[str, float], dict[str, float] | None]]:
    """(pre, post) metrics of independent edits, the weights untouched: "pre" on the model as
    it is, "post" on the model with the request's own ``patches`` (None where it has none),
    locality against its pre. Every sequence of both goes through the same batched passes."""
    edited = [i for i, own in enumerate(patches) if own]
    both = [*requests, *(requests[i] for i in edited)]
    row_patches = [*([] for _ in requests), *(patches[i] for i in edited)]
    pairs = [_pairs(r) for r in both]
    flat = [(p, a) for request_pairs in pairs for _, p, a in request_pairs]
    owners = [row_patches[i] for i, request_pairs in enumerate(pairs) for _ in request_pairs]
    scores = score_answers(model, tok, flat, patches=owners)
    pre, post, at = [], {}, 0
    for n, (request, request_pairs) in enumerate(zip(both, pairs, strict=True)):
        own = scores[at : at + len(request_pairs)]
        at += len(request_pairs)
        if n < len(requests):
            pre.append(_request_metrics(request, request_pairs, own, None))
        else:
            i = edited[n - len(requests)]
            post[i] = _request_metrics(request, request_pairs, own, pre[i][1])[0]
    if fluency:
        texts = _generations(model, tok, both, row_patches, seed)
        for n, text in enumerate(texts):
            metrics = pre[n][0] if n < len(requests) else post[edited[n - len(requests)]]
            metrics["fluency"] = n_gram_entropy([text])
    return [(metrics, post.get(i)) for i, (metrics, _) in enumerate(pre)]


def _generations(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    row_patches: Sequence[Sequence[Patch]],
    seed: int,
    max_new_tokens: int = 50,
    sample: bool = False,
    batch_size: int = 32,
) -> list[str]:
    """Each request's continuation of its prompt, ``batch_size`` per generation batch, each on
    the model with its ``row_patches``."""
    texts: list[str] = []
    for first in range(0, len(requests), batch_size):
        prompts = [r.text for r in requests[first : first + batch_size]]
        with rows_patched(model, row_patches[first : first + batch_size]):
            texts += generate(model, tok, prompts, max_new_tokens, seed, sample)
    return texts


def evaluate_request(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    reference: Reference | None = None,
    fluency: bool = False,
    seed: int = 0,
    *,
    padding_side: PaddingSide = "right",
    max_new_tokens: int = 50,
    sample: bool = False,
) -> tuple[dict[str, float], Reference]:
    """All metrics of ``request`` on ``model`` in one batched forward (plus one generation).

    Call it once before the edit (``reference=None``) and keep the returned ``Reference``; pass it
    to the call after the edit, which then scores locality against it. Keys that do not apply
    (no rephrases, no ground truth, ...) are absent.
    """
    (result,) = evaluate_requests(
        model,
        tok,
        [request],
        [reference],
        fluency,
        seed,
        padding_side=padding_side,
        max_new_tokens=max_new_tokens,
        sample=sample,
    )
    return result
