"""One R-ROME edit, end to end. Reads top to bottom: templates -> keys -> value -> solve -> apply.

Variants (which key stands where; Gupta et al. 2024, "Rebuilding ROME"):
- ``r-rome``: u from k* (keys averaged over templates), and k* in the residual and denominator.
- ``rome``:   u from k*, but the bare prompt's key in the residual and denominator (Meng et al.);
              the mismatch is what lets sequential edits collapse the model.
- ``p-rome``: the bare prompt's key everywhere.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rrome_cli.config import REALIZED, HParams
from rrome_cli.engine.keys import keys_after_subject, keys_at, phrased, templated
from rrome_cli.engine.templates import generate_templates
from rrome_cli.engine.update import (
    KeyCovariance,
    Patch,
    apply_update,
    left_vector,
    restore_weight,
    right_vector,
)
from rrome_cli.engine.values import kl_prompt, optimise_delta
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
    status: str  # "applied" or "rejected"
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
    module_name = names.rewrite(layer)
    w = weight_as_out_in(model.get_submodule(module_name))
    t0 = time.perf_counter()
    prompts = [templated(tok, request, t) for t in templates]  # prompts[0]: the bare prompt
    # the relation's other phrasings: the value learns them, k* does not average them
    phrasings = [phrased(tok, request.subject, p) for p in request.phrasings[: hp.max_phrasings]]
    # keys of every prompt, phrasing and of the KL prompt: (n + 1, d_in) fp32
    kl = kl_prompt(tok, request.subject)
    keys = keys_at(model, tok, names, layer, [*prompts, *phrasings, kl])
    k_star, k_prompt = mean_key(cov, keys[: len(prompts)], hp.k_bare_min), keys[0]
    # (n_after, d_in): where "bare prompt + target" reads the new fact out, kept for protection
    k_after = keys_after_subject(model, tok, names, layer, prompts[0], request.target_new)
    k_left, k_ref = _keys_for_variant(k_star, k_prompt, hp.variant)
    t1 = time.perf_counter()
    u, denominator = left_vector(cov, k_left)  # (d_in,)
    row_scale = (keys @ u) / (k_ref @ u) if hp.v_realized_delta else None
    read = u / (k_ref @ u) if hp.v_realized_delta in REALIZED else None
    t2 = time.perf_counter()
    value = optimise_delta(
        model, tok, names, layer, prompts, request.target_new, request.subject, hp, row_scale,
        phrasings, read,
    )  # fmt: skip
    t3 = time.perf_counter()
    right = right_vector(value.delta, k_ref.to(u.device), u)  # (d_out,)
    t4 = time.perf_counter()
    request_name = str(request.source if request.case_id is None else request.case_id)
    # where the edit writes and where it is read: what a protected sequential run keeps
    written_read = torch.cat([torch.stack([k_star, k_prompt]), k_after]).to(u.device)
    patch = Patch(layer, module_name, u, right, str(w.dtype), request_name, written_read)
    return LayerEdit(
        layer=layer,
        module=module_name,
        patch=patch,
        denominator=denominator,
        divisor=float(k_ref.to(u.device) @ u),
        update_ratio=float(right.norm() * u.norm() / w.detach().float().norm()),
        delta_ratio=float(value.delta.norm() / value.z.norm()),
        loss=value.loss,
        target_prob=value.target_prob,
        steps=value.steps,
        seconds={
            "keys": t1 - t0,
            "values": t3 - t2,
            "solve": (t2 - t1) + (t4 - t3),
            "step": statistics.median(value.step_seconds) if value.step_seconds else 0.0,
        },
    )


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
