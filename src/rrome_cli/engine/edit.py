"""One R-ROME edit, end to end. Reads top to bottom: templates -> keys -> value -> solve -> apply.

Variants (which key stands where; Gupta et al. 2024, "Rebuilding ROME"):
- ``r-rome``: u from k* (keys averaged over templates), and k* in the residual and denominator.
- ``rome``:   u from k*, but the bare prompt's key in the residual and denominator (Meng et al.);
              the mismatch is what lets sequential edits collapse the model.
- ``p-rome``: the bare prompt's key everywhere.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rrome_cli.config import HParams
from rrome_cli.engine.keys import Templated, keys_after_subjects, keys_at, phrased, templated
from rrome_cli.engine.templates import generate_templates
from rrome_cli.engine.update import (
    KeyCovariance,
    Patch,
    apply_update,
    left_vectors,
    restore_weight,
    right_vector,
)
from rrome_cli.engine.values import (
    ValueBatch,
    ValueJob,
    ValueResult,
    ValueSpec,
    kl_prompt,
    optimise_delta,
    value_job,
)
from rrome_cli.models.families import ModuleNames, weight_as_out_in
from rrome_cli.requests import EditRequest


@dataclass
class LayerEdit:
    """What happened at one layer, with the guardrail figures a report carries."""

    layer: int
    module: str
    patch: Patch
    denominator: float  # k*^T C^-1 k* (k_left for p-rome)
    divisor: float  # k_ref . u, what right is divided by: small means a "disabling" edit
    update_ratio: float  # ||delta W||_F / ||W||_F
    delta_ratio: float  # ||delta|| / ||z||
    loss: float
    target_prob: float
    steps: int
    seconds: dict[str, float]

    def guard(self) -> dict[str, float | int | str]:
        return {
            "layer": self.layer,
            "denominator": self.denominator,
            "divisor": self.divisor,
            "update_ratio": self.update_ratio,
            "delta_ratio": self.delta_ratio,
            "loss": self.loss,
            "target_prob": self.target_prob,
            "steps": self.steps,
            **{f"seconds_{k}": round(v, 4) for k, v in self.seconds.items()},
        }


@dataclass
class EditResult:
    status: str  # "applied", "rejected" or "failed"
    layers: list[LayerEdit]
    reason: str = ""
    # (module name, W before the edit) in the order applied, for an exact revert
    originals: list[tuple[str, torch.Tensor]] = field(default_factory=list, repr=False)

    @property
    def patches(self) -> list[Patch]:
        return [e.patch for e in self.layers] if self.status == "applied" else []

    def revert(self, model: PreTrainedModel) -> None:
        """Restore every weight this edit changed, bit for bit."""
        for name, original in reversed(self.originals):
            restore_weight(model.get_submodule(name), original)
        self.originals.clear()


class MissingStatisticsError(ValueError):
    pass


def mean_key(cov: KeyCovariance, keys: torch.Tensor, bare_min: float | None) -> torch.Tensor:
    """k* from the templated prompts' keys (n_templates, d_in), row 0 the bare prompt's.

    Their mean, unless the bare prompt would then receive less than ``bare_min`` of delta:
    then k* = b k_bare + (1 - b) mean, the least b (bisection) that gives it ``bare_min``.
    With u = C^-1 k*, the fraction is (u . k_bare) / (u . k*); it is 1 at b = 1.
    """
    k_bare, k_mean = keys[0], keys.mean(0)
    if bare_min is None:
        return k_mean
    c_bare, c_mean = cov.solve(k_bare), cov.solve(k_mean)  # C^-1 k, (d_in,)

    def fraction(b: float) -> float:
        u = b * c_bare + (1 - b) * c_mean
        return float(u @ k_bare) / float(u @ (b * k_bare + (1 - b) * k_mean))

    if fraction(0.0) >= bare_min:
        return k_mean
    low, high = 0.0, 1.0
    for _ in range(20):  # b to within 1e-6
        mid = (low + high) / 2
        low, high = (low, mid) if fraction(mid) >= bare_min else (mid, high)
    return high * k_bare + (1 - high) * k_mean


def _keys_for_variant(
    k_star: torch.Tensor, k_prompt: torch.Tensor, variant: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(key for u, key for the residual and denominator), from the templates' mean key k* and
    the bare prompt's key."""
    if variant == "r-rome":
        return k_star, k_star
    if variant == "rome":
        return k_star, k_prompt
    return k_prompt, k_prompt  # p-rome


@dataclass
class Prepared:
    """One request at one layer before its value is optimised: its prompts, keys and u."""

    request: EditRequest
    layer: int
    module: str
    prompts: list[Templated]  # prompts[0]: the bare prompt
    phrasings: list[Templated]
    keys: torch.Tensor  # (n_prompts + n_phrasings + 1, d_in): the KL prompt's last
    k_star: torch.Tensor  # (d_in,) the templates' mean key (leaning to the bare one)
    k_prompt: torch.Tensor  # (d_in,) the bare prompt's key
    k_after: torch.Tensor  # (n_after, d_in) keys after the subject in "bare prompt + target"
    k_ref: torch.Tensor  # (d_in,) the key of the residual and denominator (variant)
    u: torch.Tensor  # (d_in,) the left vector
    denominator: float
    seconds: dict[str, float]

    def value_spec(self, hp: HParams) -> ValueSpec:
        """What this request's delta is fitted to; under ``v_realized_delta: bare``, with what
        the update will add at each row."""
        request = self.request
        spec = ValueSpec(self.prompts, request.target_new, request.subject, self.phrasings)
        if hp.v_realized_delta == "bare":
            k_ref = self.k_ref.to(self.u.device)
            spec.row_scale = (self.keys.to(self.u.device) @ self.u) / (k_ref @ self.u)
            spec.read = self.u / (k_ref @ self.u)
        return spec

    def value_job(self, tok: PreTrainedTokenizerBase, hp: HParams, batch: ValueBatch) -> ValueJob:
        """This request's value optimisation, delta at 0, tagged with this object."""
        return value_job(tok, self, self.value_spec(hp), hp, batch.d_out, batch.device)


def prepare_layer(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    hp: HParams,
    names: ModuleNames,
    layer: int,
    cov: KeyCovariance,
    templates: list[str],
) -> list[Prepared]:
    """Keys and left vectors of ``requests`` at ``layer``: one key pass and one solve for all."""
    t0 = time.perf_counter()
    module = names.rewrite(layer)
    prompts = [[templated(tok, r, t) for t in templates] for r in requests]
    # the relation's other phrasings: the value learns them, k* does not average them
    phrasings = [
        [phrased(tok, r.subject, p) for p in r.phrasings[: hp.max_phrasings]] for r in requests
    ]
    # keys of every prompt, phrasing and of the KL prompt: (n + 1, d_in) fp32 per request
    groups = [
        [*p, *ph, kl_prompt(tok, r.subject)]
        for r, p, ph in zip(requests, prompts, phrasings, strict=True)
    ]
    keys = keys_at(model, tok, names, layer, [g for group in groups for g in group])
    keys_each = keys.split([len(group) for group in groups])
    # (n_after, d_in): where "bare prompt + target" reads the new fact out, kept for protection
    after = keys_after_subjects(
        model,
        tok,
        names,
        layer,
        [(p[0], r.target_new) for r, p in zip(requests, prompts, strict=True)],
    )
    k_stars = [mean_key(cov, k[: len(templates)], hp.k_bare_min) for k in keys_each]
    lefts = [
        _keys_for_variant(k_star, k[0], hp.variant)
        for k_star, k in zip(k_stars, keys_each, strict=True)
    ]
    t1 = time.perf_counter()
    u, denominators = left_vectors(cov, torch.stack([k_left for k_left, _ in lefts]))  # (n, d_in)
    t2 = time.perf_counter()
    n = len(requests)
    seconds = {"keys": (t1 - t0) / n, "solve": (t2 - t1) / n}
    return [
        Prepared(
            r,
            layer,
            module,
            prompts[i],
            phrasings[i],
            keys_each[i],
            k_stars[i],
            keys_each[i][0],
            after[i],
            lefts[i][1],
            u[i],
            denominators[i],
            dict(seconds),
        )  # fmt: skip
        for i, r in enumerate(requests)
    ]


def finish_layer(model: PreTrainedModel, prepared: Prepared, value: ValueResult) -> LayerEdit:
    """The patch of ``prepared`` once its value is found, with the guardrail figures."""
    p = prepared
    w = weight_as_out_in(model.get_submodule(p.module))
    t0 = time.perf_counter()
    k_ref = p.k_ref.to(p.u.device)
    right = right_vector(value.delta, k_ref, p.u)  # (d_out,)
    request = p.request
    request_name = str(request.source if request.case_id is None else request.case_id)
    # where the edit writes and where it is read: what a protected sequential run keeps
    written_read = torch.cat([torch.stack([p.k_star, p.k_prompt]), p.k_after]).to(p.u.device)
    patch = Patch(p.layer, p.module, p.u, right, str(w.dtype), request_name, written_read)
    solve = p.seconds["solve"] + time.perf_counter() - t0
    return LayerEdit(
        layer=p.layer,
        module=p.module,
        patch=patch,
        denominator=p.denominator,
        divisor=float(k_ref @ p.u),
        update_ratio=float(right.norm() * p.u.norm() / w.detach().float().norm()),
        delta_ratio=float(value.delta.norm() / value.z.norm()),
        loss=value.loss,
        target_prob=value.target_prob,
        steps=value.steps,
        seconds={
            "keys": p.seconds["keys"],
            "values": value.seconds,
            "solve": solve,
            "step": statistics.median(value.step_seconds) if value.step_seconds else 0.0,
        },
    )


def edit_layer(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    hp: HParams,
    names: ModuleNames,
    layer: int,
    cov: KeyCovariance,
    templates: list[str],
) -> LayerEdit:
    """Compute (but do not apply) the rank-one update of W at ``layer`` for ``request``."""
    (prepared,) = prepare_layer(model, tok, [request], hp, names, layer, cov, templates)
    value = optimise_delta(model, tok, names, layer, hp, prepared.value_spec(hp))
    return finish_layer(model, prepared, value)


def edit_independent(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: Iterable[EditRequest],
    hparams: HParams,
    names: ModuleNames,
    covariances: dict[int, KeyCovariance] | None = None,
    templates: list[str] | None = None,
    max_update_ratio: float | None = None,
    batch: int = 1,
) -> Iterator[tuple[EditRequest, EditResult]]:
    """Independent edits of ``requests``, up to ``batch`` in flight (a one-layer recipe)
    together (continuous batching: a request that stops makes room for the next). Nothing is
    applied to ``model``: each result holds its patch, made against the unedited model.
    Yields (request, result) as each finishes, which need not be in the requests' order; a
    request that fails is yielded with status "failed" and the error as its reason."""
    if templates is None:
        templates = generate_templates(model, tok, hparams.context_template_length_params)
    if len(hparams.layers) > 1:  # each layer's keys depend on the edits below it: one by one
        if batch > 1:
            raise ValueError(f"batched editing needs a one-layer recipe; layers: {hparams.layers}")
        for request in requests:
            try:
                result = edit(
                    model, tok, request, hparams, names, covariances, templates, max_update_ratio
                )
            except (FloatingPointError, ValueError, RuntimeError) as err:
                yield request, _failed(err)
                continue
            result.revert(model)
            yield request, result
        return
    (layer,) = hparams.layers
    cov = _covariance(hparams, covariances, layer)
    values = ValueBatch(model, names, layer, hparams)
    queue = iter(requests)
    while True:
        joining = list(itertools.islice(queue, batch - len(values)))
        yield from _join(model, tok, joining, hparams, names, layer, cov, templates, values)
        if not values:
            return
        try:
            finished = values.step()
        except (FloatingPointError, ValueError, RuntimeError) as err:  # every job in flight
            finished = []
            for job in values.clear():
                yield job.tag.request, _failed(err)  # type: ignore[attr-defined]
        for job in finished:
            prepared: Prepared = job.tag  # type: ignore[assignment]
            layer_edit = finish_layer(model, prepared, job.result())
            reason = _reject_reason(layer_edit, max_update_ratio)
            status = "rejected" if reason else "applied"
            yield prepared.request, EditResult(status=status, layers=[layer_edit], reason=reason)


def _join(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    joining: list[EditRequest],
    hp: HParams,
    names: ModuleNames,
    layer: int,
    cov: KeyCovariance,
    templates: list[str],
    values: ValueBatch,
) -> Iterator[tuple[EditRequest, EditResult]]:
    """Prepare ``joining`` (together; one at a time if that fails, to name the request that
    did) and add them to ``values``; yields the requests that failed."""
    if not joining:
        return
    try:
        prepared = prepare_layer(model, tok, joining, hp, names, layer, cov, templates)
    except (FloatingPointError, ValueError, RuntimeError) as err:
        if len(joining) == 1:
            yield joining[0], _failed(err)
            return
        for request in joining:
            yield from _join(model, tok, [request], hp, names, layer, cov, templates, values)
        return
    for p in prepared:
        values.add(p.value_job(tok, hp, values))


def _failed(err: Exception) -> EditResult:
    return EditResult(status="failed", layers=[], reason=str(err))


def edit(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    hparams: HParams,
    names: ModuleNames,
    covariances: dict[int, KeyCovariance] | None = None,
    templates: list[str] | None = None,
    max_update_ratio: float | None = None,
) -> EditResult:
    """Edit ``model`` in place so that ``request.text`` continues with ``request.target_new``.

    ``covariances`` maps layer -> KeyCovariance (the key statistics C); required when
    ``hparams.mom2_adjustment`` is true. Each layer of ``hparams.layers`` is edited in turn.
    An update that is non-finite, or larger than ``max_update_ratio`` relative to W, is not
    applied: the whole request is rolled back and reported as rejected.
    """
    if templates is None:
        templates = generate_templates(model, tok, hparams.context_template_length_params)
    result = EditResult(status="applied", layers=[])
    for layer in hparams.layers:
        cov = _covariance(hparams, covariances, layer)
        layer_edit = edit_layer(model, tok, request, hparams, names, layer, cov, templates)
        result.layers.append(layer_edit)
        reason = _reject_reason(layer_edit, max_update_ratio)
        if reason:
            result.revert(model)
            return EditResult(status="rejected", layers=result.layers, reason=reason)
        module = model.get_submodule(layer_edit.module)
        t0 = time.perf_counter()
        original = apply_update(module, layer_edit.patch.delta_w(module.weight.device))
        layer_edit.seconds["apply"] = time.perf_counter() - t0
        result.originals.append((layer_edit.module, original))
    return result


def protect_edited_keys(
    patches: list[Patch], covariances: dict[int, KeyCovariance], weight: float
) -> None:
    """Sequential editing: add each applied patch's keys to its layer's C (``protect_weight``),
    so the next edits' updates leave these edits' values (nearly) where they are."""
    for patch in patches:
        if patch.keys is not None and patch.layer in covariances:
            for key in patch.keys:
                covariances[patch.layer].protect(key, weight)


def _covariance(
    hp: HParams, covariances: dict[int, KeyCovariance] | None, layer: int
) -> KeyCovariance:
    if not hp.mom2_adjustment:  # C = I, or the caller's identity with protected keys
        given = (covariances or {}).get(layer)
        return given if given is not None and given.identity else KeyCovariance(None)
    if covariances is None or layer not in covariances:
        raise MissingStatisticsError(
            f"mom2_adjustment is true but no key statistics were given for layer {layer}: "
            "compute them (rrome stats, or rrome_cli.engine.stats.second_moment) or set "
            "mom2_adjustment: false"
        )
    return covariances[layer]


def _reject_reason(e: LayerEdit, max_update_ratio: float | None) -> str:
    figures = (e.update_ratio, e.denominator, e.delta_ratio)
    if not all(math.isfinite(x) for x in figures) or not torch.isfinite(e.patch.right).all():
        return f"non-finite update at layer {e.layer}"
    if max_update_ratio is not None and e.update_ratio > max_update_ratio:
        return (
            f"update ratio {e.update_ratio:.4g} at layer {e.layer} exceeds "
            f"--max-update-ratio {max_update_ratio:g}"
        )
    return ""
