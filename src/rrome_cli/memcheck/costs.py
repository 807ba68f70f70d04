"""What one edit holds, per phase and per device: the traced value step scaled to the model's
depth and placement, and the closed-form parts (the key second moment C and its Cholesky factor,
the rank-one update, the key pass, the statistics pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel

from rrome_cli.config import HParams
from rrome_cli.evaluate.tokens import SCORE_BATCH
from rrome_cli.memcheck.trace import Geometry, trace_value_step
from rrome_cli.models.families import ModuleNames, num_layers, weight_as_out_in
from rrome_cli.models.placement import execution_target, meta_model, placement
from rrome_cli.models.structure import resolve

PHASES = ("prefix", "forward", "head", "backward", "step")


@dataclass(frozen=True)
class PhaseCost:
    """Live bytes of a phase: ``fixed`` + ``below`` per layer under the edited one + ``above``
    per layer over it. ``layer`` is the edited layer's own part (inside ``fixed``)."""

    fixed: int
    below: int
    above: int
    layer: int

    def at(self, n_below: int, n_above: int) -> int:
        return self.fixed + n_below * self.below + n_above * self.above


_TRACE_CACHE: dict[tuple[str, str, str, Geometry, bool], dict[str, PhaseCost]] = {}


def value_step_costs(
    config: PretrainedConfig,
    dtype: torch.dtype,
    names: ModuleNames,
    geo: Geometry,
    kv_in_place: bool = False,
) -> dict[str, PhaseCost]:
    """Per-phase costs from traces of three shallow models (edit layer 0 or 1, 1-2 above);
    ``kv_in_place`` as the edit runs on CPU (``trace_value_step``)."""
    key = (config.to_json_string(use_diff=False), str(dtype), repr(names), geo, kv_in_place)
    if key not in _TRACE_CACHE:

        def peaks(below: int, above: int) -> dict[str, int]:
            model = meta_model(config, dtype, below + 1 + above)
            return trace_value_step(model, names, below, geo, kv_in_place)

        p01, p11, p02 = peaks(0, 1), peaks(1, 1), peaks(0, 2)
        costs = {}
        for phase in PHASES:
            below = max(0, p11[phase] - p01[phase])
            above = max(0, p02[phase] - p01[phase])
            fixed = p01[phase] - above
            costs[phase] = PhaseCost(fixed, below, above, min(below, fixed))
        _TRACE_CACHE[key] = costs
    return _TRACE_CACHE[key]


def weight_dims(model: PreTrainedModel, names: ModuleNames, layer: int) -> tuple[int, int, int]:
    """(d_in, d_out, element size) of W at ``layer``, read from the meta model."""
    w = weight_as_out_in(model.get_submodule(names.rewrite(layer)))
    return w.shape[1], w.shape[0], w.element_size()


def stats_peak(
    config: PretrainedConfig, d_in: int, d_out: int, size: int, batch_tokens: int, max_len: int
) -> tuple[int, int]:
    """The statistics pass (engine/stats.py) on W's device, and its eager attention scores.

    Peak: the float64 sum of k k^T plus the larger of one batch's forward at the edited layer
    (residual and normed hidden states; q, k, v and output; three d_in-wide MLP tensors at a
    time) and its keys (captured, masked copy, float64). Attention scores (heads x max_len^2
    per row, in the dtype and as fp32 softmax) count only under eager attention: SDPA's fused
    kernels never materialise them.
    """
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d_out // heads
    rows = max(1, batch_tokens // max_len)
    mom2_sum = d_in * d_in * 8
    attention = batch_tokens * (2 * heads + 2 * kv_heads) * head_dim * size
    scores = rows * heads * max_len * max_len * (4 + size)
    eager = getattr(config, "_attn_implementation", None) == "eager"
    forward = batch_tokens * (2 * d_out + 3 * d_in) * size + attention + (scores if eager else 0)
    keys = batch_tokens * d_in * (2 * size + 8)
    # The last term: sum / T in float64 before it moves to the CPU.
    return mom2_sum + max(forward, keys, mom2_sum), scores


def layer_costs(
    config: PretrainedConfig,
    model: PreTrainedModel,
    names: ModuleNames,
    layer: int,
    geo: Geometry,
    hparams: HParams,
    dmap: dict[str, int | str],
    n_layers: int,
) -> tuple[dict[int | str, int], dict[str, int]]:
    """Edit working set per target for one edited layer, and the components on its device."""
    d_in, d_out, size = weight_dims(model, names, layer)
    dtype = next(model.parameters()).dtype
    run_on = execution_target(dmap)
    # shared_kv_heads: in place when every weight is in RAM (offloaded ones sit on "meta")
    costs = value_step_costs(config, dtype, names, geo, kv_in_place=set(dmap.values()) == {"cpu"})
    edit_at = run_on(placement(names.rewrite(layer), dmap))
    head_at = run_on(placement(f"{_head_name(model)}.weight", dmap))
    layer_at = [placement(names.layer(i), dmap) for i in range(n_layers)]
    # Offloaded layers run on the main device with their weights streamed in; autograd keeps
    # the streamed weights of every layer above the edited one until backward.
    offloaded = [i for i, where in enumerate(layer_at) if run_on(where) != where]
    sizes = {i: _module_bytes(model, names.layer(i)) for i in offloaded}
    pinned = sum(sizes[i] for i in offloaded if i > layer)
    streaming = 2 * max(sizes.values(), default=0)

    value: dict[int | str, int] = {}
    for phase, cost in costs.items():
        share: dict[int | str, int] = {}
        for i, where in enumerate(layer_at):
            per = cost.below if i < layer else cost.above if i > layer else cost.layer
            share[run_on(where)] = share.get(run_on(where), 0) + per
        share[head_at] = share.get(head_at, 0) + cost.fixed - cost.layer
        if offloaded:
            main = run_on("cpu")
            kept = pinned if phase in ("forward", "head", "backward") else 0
            share[main] = share.get(main, 0) + kept + streaming
        for where, n in share.items():
            value[where] = max(value.get(where, 0), n)

    square = d_in * d_in * 4
    cholesky = square if hparams.mom2_adjustment else 0
    # KeyCovariance: a copy of C with the ridge added in place, then the factor
    factorise = 2 * square if hparams.mom2_adjustment else 0
    # apply_update: delta W (fp32) + old W kept for revert + W.float() + delta W (fp32), and
    # alongside the last either W.float() itself or its cast back (neither exists in fp32).
    update = d_out * d_in * (4 + size + 4 + (4 if size != 4 else 0))
    # the key pass of every request joining the batch together (prepare_layer)
    keys = geo.jobs * geo.templates * geo.key_tokens * (4 * d_out + 4 * d_in) * size
    n_below, n_above = layer, n_layers - layer - 1
    value_total = max(c.at(n_below, n_above) for c in costs.values())
    vocab = model.get_output_embeddings().weight.shape[0]
    # Finished edits are evaluated while the others stay in flight: the packed pass's prefix
    # (its KV cache, the traced "prefix" phase) stays alive beside one scoring batch
    # (SCORE_BATCH sequences, full logits in the model's dtype) and one edited W' at a time
    # (rows_patched makes it as apply_update does: the size of ``update``). Shown, not
    # planned: measured on an H200 it stays under the value step at every batch size
    # (docs/results.md), and on tiny models the scoring batch would dwarf the edit.
    eval_width = geo.key_tokens + geo.targets // geo.templates
    scoring = SCORE_BATCH * eval_width * (vocab + 4 * d_out + 3 * d_in) * size
    evaluation = costs["prefix"].at(n_below, n_above) + max(scoring, update)
    components = {
        "key_covariance_C": square if hparams.mom2_adjustment else 0,
        "cholesky_factor": cholesky,
        "factorisation_peak": factorise,
        "value_step": value_total,
        "value_activations": n_below * costs["forward"].below + n_above * costs["forward"].above,
        "logits_target_rows": geo.jobs * (geo.targets + 1) * vocab * (size + 4 + 4),
        "logits_if_full": geo.jobs * geo.rows * (geo.prefix + geo.suffix) * vocab * (size + 8),
        "kl_reference": vocab * 4,
        "adam_delta": 4 * d_out * 4,
        "key_pass": keys,
        "update": update,
        "evaluation": evaluation,  # a run's, beside the edit: not in engine.edit.edit
        "in_edit": max(value_total, update, keys),
    }
    at_edit = max(value.get(edit_at, 0), keys, update)
    value[edit_at] = max(factorise, cholesky + at_edit)
    if edit_at == "cpu" and hparams.mom2_adjustment:
        value[edit_at] += square  # C itself stays in RAM (SecondMoment.mom2) during the edit
    return value, components


def _module_bytes(model: PreTrainedModel, prefix: str) -> int:
    return sum(t.numel() * t.element_size() for t in model.get_submodule(prefix).parameters())


def edit_working_set(
    config: PretrainedConfig,
    dtype: torch.dtype,
    hparams: HParams,
    geometry: Geometry,
    names: ModuleNames | None = None,
) -> dict[str, int]:
    """The parts of one edit at ``hparams.layers[0]`` with everything on one device, in bytes.

    ``in_edit`` is what ``engine.edit.edit`` itself allocates at its peak when the key
    covariances are given (built beforehand): max(value step, key pass, update).
    """
    meta = meta_model(config, dtype)
    if names is None:
        arch = (config.architectures or [type(meta).__name__])[0]
        names = resolve(meta, arch, hparams.module_overrides()).names
    _, components = layer_costs(
        config, meta, names, hparams.layers[0], geometry, hparams, {"": "cpu"}, num_layers(config)
    )
    return components


def _head_name(model: PreTrainedModel) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)
