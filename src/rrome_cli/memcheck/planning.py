"""The memory plan: per device, the weights, the edit's working set and the statistics pass
against what the device offers; when it does not fit, the cheapest change that makes it fit.
``largest_batch``: the most requests in flight together (``rrome edit --batch auto``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from accelerate.utils import convert_file_size_to_int
from transformers import PretrainedConfig, PreTrainedModel

from rrome_cli.config import HParams
from rrome_cli.memcheck.costs import layer_costs, stats_peak, weight_dims
from rrome_cli.memcheck.trace import TYPICAL, Geometry, PromptShape, estimate_geometry
from rrome_cli.models.families import ModuleNames, num_layers
from rrome_cli.models.loading import (
    DTYPES,
    ModelLoadError,
    choose_dtype,
    load_config,
    planned_devices,
)
from rrome_cli.models.placement import (
    ASSUMED_GPU_BYTES,
    MemcheckError,
    capacity,
    device_key,
    device_label,
    device_map,
    execution_target,
    gpu_present,
    map_targets,
    memory_limits,
    meta_model,
    placement,
    ram_bytes,
    weights_per_device,
)
from rrome_cli.models.registry import DEFAULT_MODEL
from rrome_cli.models.structure import resolve

GiB = 1 << 30
# Per GPU, outside the traced tensors (CUDA context, library workspaces, allocator rounding):
# half a GiB plus an eighth of the weights placed there. Measured on an H200 (docs/results.md),
# a whole batch-1 run peaked above weights + traced working set by 0.3 GiB on SmolLM2 and by
# 1.5 GiB (12% of its weights) on the Llama-2-7B shape, which a fixed half GiB missed.
CUDA_RESERVE = GiB // 2
RESERVE_PER_WEIGHT = 1 / 8
# Each request in flight beyond the first adds this many times what the second adds in a
# trace (docs/results.md: measured on an H200, 1.52x for SmolLM2, 0.88x for Llama-2-7B).
BATCH_GROWTH = 1.6
# The statistics pass's defaults (rrome stats --batch-tokens, --max-len)
BATCH_TOKENS = 4096
MAX_LEN = 512


DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def parse_max_memory(spec: str) -> dict[int | str, int]:
    """``"0=24GiB,1=24GiB,cpu=64GiB"`` -> ``{0: bytes, 1: bytes, "cpu": bytes}``.

    Keys are accelerate's: GPU index, "cpu", "disk"; sizes as accelerate reads them (GiB, GB).
    """
    limits: dict[int | str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, size = part.partition("=")
        name = name.strip().removeprefix("cuda:")
        if not sep or not (name.isdigit() or name in ("cpu", "disk")):
            raise MemcheckError(
                f"--max-memory: cannot read {part!r}; write DEVICE=SIZE, e.g. 0=24GiB,cpu=64GiB"
            )
        try:
            bytes_ = convert_file_size_to_int(size.strip())
        except ValueError:
            raise MemcheckError(
                f"--max-memory: {size.strip()!r} is not a size (e.g. 24GiB)"
            ) from None
        limits[int(name) if name.isdigit() else name] = bytes_
    return limits


def cuda_reserve(weights: int) -> int:
    """Bytes a GPU holding ``weights`` bytes of parameters needs beyond what a trace sees."""
    return CUDA_RESERVE + int(weights * RESERVE_PER_WEIGHT)


@dataclass
class DevicePlan:
    device: str  # "cuda:0", "cpu", "disk"
    weights: int
    edit: int  # peak of the edit working set here (beyond the weights)
    stats: int  # peak of the statistics pass here (beyond the weights)
    reserve: int  # CUDA context, workspaces, allocator slack: cuda_reserve(weights)
    capacity: int
    edited_layers: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + max(self.edit, self.stats) + self.reserve

    @property
    def headroom(self) -> int:
        return self.capacity - self.total

    @property
    def fits(self) -> bool:
        return self.headroom >= 0


@dataclass
class MemoryPlan:
    model: str
    dtype: str
    layers: list[int]
    geometry: Geometry
    devices: list[DevicePlan]
    components: dict[str, int]  # the edited layer's device, in bytes; see ``render``
    edit_device: str
    device_map: dict[str, int | str]  # accelerate's map the plan assumes ({"": 0}: all on one)
    batch_tokens: int
    max_len: int
    fix: str = ""
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # reasons it cannot run, memory aside

    @property
    def fits(self) -> bool:
        return not self.problems and all(d.fits for d in self.devices)

    @property
    def predicted_allocated(self) -> dict[str, int]:
        """Per device: weights + edit working set (what torch.cuda.max_memory_allocated sees)."""
        return {d.device: d.weights + d.edit for d in self.devices}

    def verdict(self) -> str:
        if self.problems:
            return "cannot run: " + "; ".join(self.problems)
        if self.fits:
            tight = min(self.devices, key=lambda d: d.headroom)
            return f"fits: {gib(tight.headroom)} GiB headroom on {tight.device} (the tightest)"
        worst = min(self.devices, key=lambda d: d.headroom)
        return (
            f"does not fit: {worst.device} needs {gib(worst.total)} GiB of "
            f"{gib(worst.capacity)} GiB"
        )

    def to_json(self) -> str:
        devices = [
            {
                **asdict(d),
                "total": d.total,
                "headroom": d.headroom,
                "fits": d.fits,
                "total_gib": gib(d.total),
                "capacity_gib": gib(d.capacity),
            }
            for d in self.devices
        ]
        data: dict[str, Any] = {
            "model": self.model,
            "dtype": self.dtype,
            "layers": self.layers,
            "fits": self.fits,
            "verdict": self.verdict(),
            "fix": self.fix,
            "edit_device": self.edit_device,
            "device_map": self.device_map,
            "geometry": asdict(self.geometry),
            "batch_tokens": self.batch_tokens,
            "max_len": self.max_len,
            "devices": devices,
            "components": self.components,
            "notes": self.notes,
            "problems": self.problems,
        }
        return json.dumps(data, indent=2)


def gib(n: int) -> float:
    return round(n / GiB, 2)


@dataclass
class _Model:
    """What the plan needs to know about the model, built once per dtype."""

    name: str
    config: PretrainedConfig
    meta: PreTrainedModel
    names: ModuleNames
    n_layers: int


def _model(
    model: str | None, config: PretrainedConfig, dtype: torch.dtype, hparams: HParams
) -> _Model:
    meta = meta_model(config, dtype)
    arch = (config.architectures or [type(meta).__name__])[0]
    names = resolve(meta, arch, hparams.module_overrides()).names
    n_layers = num_layers(config)
    for layer in hparams.layers:
        if not 0 <= layer < n_layers:
            raise MemcheckError(f"hparams layers: {layer} is outside 0..{n_layers - 1}")
    return _Model(model or DEFAULT_MODEL, config, meta, names, n_layers)


def _grown(one: MemoryPlan, two: MemoryPlan, geo: Geometry) -> MemoryPlan:
    """The plan for ``geo.jobs`` requests in flight together from the traced plans of one and
    two: each request beyond the first adds ``BATCH_GROWTH`` times what the second added.
    (Tracing many packed requests on the meta device overstates them: on an H200 the
    measured growth per request was linear, 0.9-1.5x the traced increment of the second.)"""
    more = (geo.jobs - 1) * BATCH_GROWTH

    def grown(a: int, b: int) -> int:
        return a + round(more * max(0, b - a))

    for d1, d2 in zip(one.devices, two.devices, strict=True):
        d2.edit = grown(d1.edit, d2.edit)
    two.components = {k: grown(one.components[k], v) for k, v in two.components.items()}
    two.geometry = geo
    return two


def _plan(
    m: _Model,
    devices: list[torch.device],
    max_memory: dict[int | str, int],
    hparams: HParams,
    geo: Geometry,
    batch_tokens: int,
    max_len: int,
    given_map: dict[str, int | str] | None = None,
) -> MemoryPlan:
    if geo.jobs > 2:  # traced for one and two requests, grown linearly beyond
        one, two = (
            _plan(m, devices, max_memory, hparams, replace(geo, jobs=jobs), batch_tokens,
                  max_len, given_map)
            for jobs in (1, 2)
        )  # fmt: skip
        return _grown(one, two, geo)
    targets = map_targets(devices, max_memory)
    if given_map:
        targets += [k for k in dict.fromkeys(given_map.values()) if k not in targets]
    limits = {k: capacity(k, max_memory) for k in targets}
    dmap = dict(given_map) if given_map else device_map(m.meta, targets, limits)
    weights = weights_per_device(m.meta, dmap)
    edit: dict[int | str, int] = {}
    stats: dict[int | str, int] = {}
    edited: dict[int | str, list[int]] = {}
    components: dict[str, int] = {}
    originals = 0  # earlier layers' old W, kept for revert while later layers are edited
    problems = []
    run_on = execution_target(dmap)
    for layer in hparams.layers:
        placed = placement(m.names.rewrite(layer), dmap)
        if run_on(placed) != placed:
            problems.append(
                f"layer {layer}'s W would be offloaded to {placed} (accelerate keeps offloaded "
                "weights on the meta device), so the edit could not write it: give the "
                "device it runs on room for it"
            )
        per_target, parts = layer_costs(
            m.config, m.meta, m.names, layer, geo, hparams, dmap, m.n_layers
        )
        where = run_on(placed)
        edited.setdefault(where, []).append(layer)
        per_target[where] += originals
        d_in, d_out, size = weight_dims(m.meta, m.names, layer)
        originals += d_in * d_out * size
        for k, v in per_target.items():
            edit[k] = max(edit.get(k, 0), v)
        peak, scores = stats_peak(m.config, d_in, d_out, size, batch_tokens, max_len)
        if hparams.mom2_adjustment:
            stats[where] = max(stats.get(where, 0), peak)
        parts["stats_attention_scores_eager"] = scores
        if parts["in_edit"] >= components.get("in_edit", -1):
            components = parts  # the layer with the largest edit is the one shown
    for where, layers in edited.items():
        # Every edited layer's Cholesky factor is built before the edit and kept through it.
        edit[where] += (len(layers) - 1) * components["cholesky_factor"]
    plans = [
        DevicePlan(
            device=device_label(k),
            weights=weights.get(k, 0),
            edit=edit.get(k, 0),
            stats=stats.get(k, 0),
            reserve=cuda_reserve(weights.get(k, 0)) if isinstance(k, int) else 0,
            capacity=limits.get(k, 0),
            edited_layers=edited.get(k, []),
        )
        for k in [*targets, *(k for k in weights if k not in targets)]
        if k in weights or k in edit
    ]
    notes = [
        "logits are computed only at the target tokens and the KL position, as the engine "
        f"does; logits over every token would add {gib(components['logits_if_full'])} GiB",
        "the statistics pass (rrome stats) runs once per layer and is cached; attention "
        "scores (heads x max_len^2 per row) count only under eager attention, where they "
        f"would add {gib(components.get('stats_attention_scores_eager', 0))} GiB",
    ]
    for k in targets:
        if isinstance(k, int) and not gpu_present(k) and k not in (max_memory or {}):
            notes.append(
                f"cuda:{k} is not on this machine: assuming {gib(ASSUMED_GPU_BYTES)} GiB "
                f"(give its size with --max-memory {k}=SIZE)"
            )
    if any(k not in targets for k in weights):
        notes.append(
            "the weights do not fit on the devices given: accelerate would put the "
            "rest on disk, which was not allowed (add disk=SIZE to --max-memory)"
        )
    return MemoryPlan(
        model=m.name,
        dtype=DTYPE_NAMES.get(next(m.meta.parameters()).dtype, "?"),
        layers=list(hparams.layers),
        geometry=geo,
        devices=plans,
        components=components,
        edit_device=device_label(run_on(placement(m.names.rewrite(hparams.layers[0]), dmap))),
        device_map=dmap,
        batch_tokens=batch_tokens,
        max_len=max_len,
        notes=notes,
        problems=problems,
    )


def largest_batch(
    model: str | None,
    dtype: str | None,
    devices: str | None,
    max_memory: dict[int | str, int | str] | None,
    hparams: HParams,
    shape: PromptShape = TYPICAL,
    phrasings: int = 0,
    cap: int = 64,
) -> int:
    """The most requests in flight together (``rrome edit --batch``, at most ``cap``) whose
    plan fits (``plan`` with ``jobs``: the value step and key pass of that many requests);
    1 when none does. The model is built once for the search, and no fix is sought."""
    built, targets, limits = _setup(model, dtype, devices, max_memory, hparams)
    geo = estimate_geometry(hparams, None, phrasings, shape)

    def fits(jobs: int) -> bool:
        at = replace(geo, jobs=jobs)
        return _plan(built, targets, limits, hparams, at, BATCH_TOKENS, MAX_LEN).fits

    low, high = 1, 2  # fits(low); is high too many?
    while high <= cap and fits(high):
        low, high = high, 2 * high
    high = min(high, cap + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def plan(
    model: str | None,
    dtype: str | None,
    devices: str | None,
    max_memory: dict[int | str, int | str] | None,
    hparams: HParams,
    batch_tokens: int = BATCH_TOKENS,
    max_len: int = MAX_LEN,
    n_templates: int | None = None,
    *,
    phrasings: int = 0,
    shape: PromptShape = TYPICAL,
    jobs: int = 1,
    geometry: Geometry | None = None,
    device_map: dict[str, int | str] | None = None,
) -> MemoryPlan:
    """Memory per device for editing ``model`` with ``hparams``, and the cheapest fix if it
    does not fit: bf16 instead of fp32, another device, fewer templates, smaller statistics
    batches, CPU offload (in that order).

    ``dtype``: "fp32", "fp16", "bf16" or None (the checkpoint's own; fp32 on a CPU).
    ``devices``: as ``--devices`` ("0,1", "cpu"); None: the GPUs named in ``max_memory``,
    else the first GPU, else the CPU. ``max_memory``: accelerate's per-device limits, which
    also stand for the size of GPUs this machine does not have; "cpu"/"disk" allow offload.
    ``geometry``: the request's exact batch shapes (``geometry_for``) instead of a typical
    request's (``estimate_geometry`` with ``n_templates``, for a request of ``shape``: the
    longest of a run's, ``longest_shape``), ``jobs`` of them in flight together (``--batch``).
    ``device_map``: evaluate this accelerate map instead of the one rrome would infer (its
    targets need sizes too).
    """
    built, targets, limits = _setup(model, dtype, devices, max_memory, hparams)
    geo = replace(geometry or estimate_geometry(hparams, n_templates, phrasings, shape), jobs=jobs)
    result = _plan(built, targets, limits, hparams, geo, batch_tokens, max_len, device_map)
    if not result.fits:
        result.fix = _cheapest_fix(
            result, built, model, targets, limits, hparams, geo, batch_tokens, max_len, phrasings,
            shape,
        )  # fmt: skip
    return result


def _setup(
    model: str | None,
    dtype: str | None,
    devices: str | None,
    max_memory: dict[int | str, int | str] | None,
    hparams: HParams,
) -> tuple[_Model, list[torch.device], dict[int | str, int]]:
    """The model on the meta device in the dtype it will run in, the devices and their
    limits in bytes: what every plan of one command shares."""
    limits = memory_limits(max_memory)
    targets = planned_devices(devices, limits)
    config = load_config(model)
    try:
        torch_dtype = DTYPES[dtype] if dtype else choose_dtype(config, None, targets)
    except KeyError:
        raise MemcheckError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}") from None
    return _model(model, config, torch_dtype, hparams), targets, limits


def _cheapest_fix(
    failed: MemoryPlan,
    built: _Model,
    model: str | None,
    devices: list[torch.device],
    limits: dict[int | str, int],
    hparams: HParams,
    geo: Geometry,
    batch_tokens: int,
    max_len: int,
    phrasings: int = 0,
    shape: PromptShape = TYPICAL,
) -> str:
    """The first change, in order of cost to the user, under which the plan fits.
    ``phrasings``: rows of ``geo`` that are relation phrasings; fewer context templates keeps
    them."""

    def attempt(**changes: Any) -> MemoryPlan | None:
        args: dict[str, Any] = dict(
            m=built,
            devices=devices,
            max_memory=limits,
            hparams=hparams,
            geo=geo,
            batch_tokens=batch_tokens,
            max_len=max_len,
        )
        args.update(changes)
        try:
            candidate = _plan(**args)
        except (MemcheckError, ModelLoadError):
            return None
        return candidate if candidate.fits else None

    def summary(p: MemoryPlan) -> str:
        return ", ".join(f"{d.device} {gib(d.total)}/{gib(d.capacity)} GiB" for d in p.devices)

    if next(built.meta.parameters()).dtype == torch.float32:
        half = _model(model, built.config, torch.bfloat16, hparams)
        if (p := attempt(m=half)) is not None:
            return f"use --bf16 (or --fp16) instead of fp32 (then {summary(p)})"
    gpus = [d for d in devices if d.type == "cuda"]
    if gpus:
        index = max(d.index or 0 for d in gpus) + 1
        size = max(capacity(device_key(d), limits) for d in gpus)
        more = [*devices, torch.device(f"cuda:{index}")]
        if (p := attempt(devices=more, max_memory={**limits, index: size})) is not None:
            listed = ",".join(str(d.index or 0) for d in more)
            return f"add a GPU of {gib(size)} GiB: --devices {listed} (then {summary(p)})"
    context = templates = geo.templates - phrasings
    while templates > 1:
        templates = max(1, templates // 2)
        fewer = replace(estimate_geometry(hparams, templates, phrasings, shape), jobs=geo.jobs)
        if (p := attempt(geo=fewer)) is not None:
            return (
                f"use fewer context templates: {templates} instead of {context} "
                f"(shorter context_template_length_params; then {summary(p)})"
            )
    tokens = batch_tokens
    while tokens // 2 >= max_len:
        tokens //= 2
        if (p := attempt(batch_tokens=tokens)) is not None:
            return f"compute the statistics with --batch-tokens {tokens} (then {summary(p)})"
    if gpus and "cpu" not in limits:
        need = failed.components.get("in_edit", 0) + failed.components.get("cholesky_factor", 0)
        # Room for weights w such that w + need + cuda_reserve(w) <= v.
        shrunk = {
            k: max(0, int((v - need - CUDA_RESERVE) / (1 + RESERVE_PER_WEIGHT)))
            if isinstance(k, int)
            else v
            for k, v in ((device_key(d), capacity(device_key(d), limits)) for d in gpus)
        }
        offload = {**limits, **shrunk, "cpu": ram_bytes()}
        if (p := attempt(max_memory=offload)) is not None:
            spec = ",".join(f"{k}={gib(v)}GiB" for k, v in offload.items() if k != "disk")
            return f"offload layers to the CPU: --max-memory {spec} (slower; {summary(p)})"
    return "no single change makes it fit: use a larger device or several"
