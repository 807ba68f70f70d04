"""``rrome memcheck``: will an edit fit, on which device, and what to change if it does not.

Everything is computed from the model's configuration: the model is built on the meta device
(``accelerate.init_empty_weights``), so no weight is read and nothing is allocated.

- Weights: placed by the accelerate device map an edit would use (``device_map``): one device
  holds everything; several devices get a balanced ``infer_auto_device_map``.
- The value step (optimising delta, the largest part of an edit) is *traced*: the engine's own
  ``PackedPass``, ``DeltaSite`` and ``Readout`` and two optimisation steps run on meta tensors
  at the planned batch geometry (a request's own rows when given), and a dispatch mode counts
  the bytes of every tensor alive at each moment (attention as a fused kernel keeps it: q, k,
  v, output, log-sum-exp). Three shallow
  copies of the model (edit layer plus 0-1 layers below and 1-2 above) give, per phase, the
  bytes of the fixed part and of each layer below / above the edited one; the real depth and
  the device of every layer then give the peak per device. Like the engine, the trace computes
  logits only where the loss reads them (one row per target token and the KL row); the bytes
  that full logits (batch x tokens x vocab) would take are reported beside it, not counted.
- Offloaded layers (accelerate "cpu" under a GPU map, "disk") run on the main device: their
  activations count there, and so do the streamed-in weights of every offloaded layer above
  the edited one, which autograd keeps until backward (offloading upper layers does not
  lower the peak). An edited layer that would be offloaded is reported as a problem.
- The rest is closed-form (fp32 unless said): the key second moment C (d_in^2, on the CPU) and
  its Cholesky factor (d_in^2, on W's device, one per edited layer), the factorisation peak
  (a copy of C + lambda I, the factor), the rank-one update (outer product, old W kept for
  revert, W in fp32), the key pass, and the statistics pass (float64 sum, keys of one batch,
  one layer's forward; heads x max_len^2 attention scores only under eager attention, since
  SDPA's fused kernels never materialise them).

``measure_peak`` measures what the model predicts: the peak bytes of live tensors while a
function runs (torch's own accounting, not the process RSS).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import infer_auto_device_map, init_empty_weights
from accelerate.utils import convert_file_size_to_int, get_balanced_memory
from rich.console import Console
from rich.table import Table
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rrome_cli.compat import autocast_tolerates_meta
from rrome_cli.config import HParams
from rrome_cli.engine.hooks import shared_kv_heads
from rrome_cli.engine.keys import phrased, templated
from rrome_cli.engine.values import (
    PackedPass,
    Readout,
    Row,
    delta_site,
    frozen,
    kl_row,
    prompt_row,
)
from rrome_cli.models.families import ModuleNames, module_names, num_layers, weight_as_out_in
from rrome_cli.models.loading import (
    DTYPES,
    ModelLoadError,
    cache_dir,
    choose_dtype,
    load_config,
    parse_devices,
)
from rrome_cli.models.registry import DEFAULT_MODEL
from rrome_cli.requests import EditRequest

GiB = 1 << 30
# Per GPU, outside the tensors: CUDA context, cuBLAS workspaces, allocator rounding.
CUDA_RESERVE = GiB // 2
# A typical request, in tokens (about the 90th percentile of CounterFact): the prompt up to and
# including the subject's last token, the prompt after it, the target. Templates add a starter
# word and ". " to their sampled length.
PROMPT_TO_SUBJECT = 8
PROMPT_AFTER_SUBJECT = 5
TARGET_TOKENS = 3
TEMPLATE_EXTRA = 3
PHASES = ("prefix", "forward", "head", "backward", "step")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class MemcheckError(ValueError):
    """The plan cannot be made as asked (unknown device size, bad --max-memory)."""


# ---------------------------------------------------------------------------- measuring memory


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages made while active and still alive; peak overall and per phase.

    A storage counts once, when an op first returns it: views and in-place results alias an
    input's storage and add nothing. A weakref finalizer subtracts it when torch frees it.
    Storages that existed before (weights, inputs) never count.

    On the meta device it also answers the two data-dependent questions a forward asks, so a
    model runs without data: ``.item()`` gives 0 (for "is every position a real token?": no,
    as in a padded batch), ``nonzero`` finds nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.phase = ""
        self.phase_peaks: dict[str, int] = {}
        self._sizes: dict[int, int] = {}
        self._finalizers: list[weakref.finalize] = []

    def set_phase(self, name: str) -> None:
        self.phase = name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "meta" for t in inputs):
            if func is torch.ops.aten._local_scalar_dense.default:
                return 0
            if func is torch.ops.aten.nonzero.default:
                return torch.empty(0, args[0].dim(), dtype=torch.long, device="meta")
        out = func(*args, **kwargs)
        aliased = {t.untyped_storage()._cdata for t in inputs}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage(), aliased)
        return out

    def _track(self, storage: torch.UntypedStorage, aliased: set[int]) -> None:
        key = storage._cdata
        if key in aliased or key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        if self.phase:
            self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.current)
        self._finalizers.append(weakref.finalize(storage, self._free, key))

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)

    def close(self) -> None:
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers.clear()


@contextmanager
def live_tensor_bytes() -> Iterator[LiveTensorBytes]:
    tracker = LiveTensorBytes()
    try:
        with tracker:
            yield tracker
    finally:
        tracker.close()


def measure_peak(fn: Callable[[], object], device: torch.device | str | None = None) -> int:
    """Peak bytes of tensors allocated (and alive at once) while ``fn()`` runs.

    On a CUDA ``device``: the caching allocator's own peak (``max_memory_allocated``) above what
    was allocated before. Otherwise: ``LiveTensorBytes`` (every tensor made by torch ops on any
    device, CPU and meta included; a Python op hook per call, so a few percent slower).
    """
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with live_tensor_bytes() as tracker:
        fn()
    return tracker.peak


# ------------------------------------------------------------------------------ sizes and devices


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


def _key(device: torch.device) -> int | str:
    """accelerate's name for a device: the GPU index, or "cpu"."""
    if device.type == "cuda":
        return device.index or 0
    return device.type


def _label(key: int | str) -> str:
    return f"cuda:{key}" if isinstance(key, int) else str(key)


def _ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


ASSUMED_GPU_BYTES = 24 * 2**30  # the size assumed for a GPU that is neither present nor given


def _gpu_present(key: int) -> bool:
    return torch.cuda.is_available() and key < torch.cuda.device_count()


def capacity(key: int | str, max_memory: dict[int | str, int] | None) -> int:
    """Bytes usable on a device: --max-memory, else the GPU's or the machine's memory."""
    if max_memory and key in max_memory:
        return int(max_memory[key])
    if isinstance(key, int):
        if _gpu_present(key):
            return int(torch.cuda.get_device_properties(key).total_memory)
        return ASSUMED_GPU_BYTES  # planning for a GPU this machine lacks; the plan says so
    if key == "disk":
        return shutil.disk_usage(cache_dir() if cache_dir().exists() else os.getcwd()).free
    return _ram()


def meta_model(
    config: PretrainedConfig, dtype: torch.dtype, layers: int | None = None
) -> PreTrainedModel:
    """The model on the meta device (tied weights, buffers too), optionally cut to ``layers``."""
    if layers is not None:
        config = copy.deepcopy(config)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if getattr(config, key, None):
                setattr(config, key, layers)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:layers]
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


@contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """accelerate warns once per missing GPU; planning for GPUs we do not have is the point."""
    log = logging.getLogger("accelerate.utils.modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def device_map(
    model: PreTrainedModel, targets: list[int | str], max_memory: dict[int | str, int]
) -> dict[str, int | str]:
    """The placement an edit uses: all on one target; else accelerate's map, balanced over GPUs.

    ``targets`` are accelerate keys (GPU index, "cpu", "disk") in order of preference.
    """
    if len(targets) == 1:
        return {"": targets[0]}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    dtype = next(model.parameters()).dtype
    limits = {k: max_memory[k] for k in targets}
    with _quiet_accelerate():
        if sum(isinstance(k, int) for k in targets) > 1:
            limits = get_balanced_memory(
                model, limits, no_split_module_classes=no_split, dtype=dtype
            )
        return dict(
            infer_auto_device_map(
                model, max_memory=limits, no_split_module_classes=no_split, dtype=dtype
            )
        )


def placement(name: str, dmap: dict[str, int | str]) -> int | str:
    """Where the module or tensor ``name`` lives under ``dmap`` (longest matching prefix)."""
    best, where = -1, None
    for prefix, target in dmap.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if len(prefix) > best:
                best, where = len(prefix), target
    if where is None:
        raise MemcheckError(f"the device map places no module holding {name!r}")
    return where


def weights_per_device(model: PreTrainedModel, dmap: dict[str, int | str]) -> dict[int | str, int]:
    """Bytes of parameters and buffers on each target (tied weights counted once)."""
    out: dict[int | str, int] = {}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        where = placement(name, dmap)
        out[where] = out.get(where, 0) + tensor.numel() * tensor.element_size()
    return out


# --------------------------------------------------------------------------------- the value step


@dataclass(frozen=True)
class Geometry:
    """Shapes of one edit's batches (see engine/values.py: prompts split at the subject)."""

    rows: int  # value batch rows: every templated prompt plus the KL prompt
    prefix: int  # prefix width: tokens before the subject's last token (run once, KV cached)
    suffix: int  # suffix width: subject's last token, rest of the prompt, target but its last
    targets: int  # target tokens over all rewriting prompts: the logit rows the loss reads
    key_tokens: int  # longest templated prompt: the key pass
    whole: int = 0  # v_realized_delta "bare": the bare prompt's tokens, run again uncached
    # a real request's rows (tokens, split, subject, targets) as the engine feeds them, KL last
    exact: tuple[tuple[int, int, int, int], ...] = ()

    @property
    def templates(self) -> int:
        return self.rows - 1


def estimate_geometry(
    hparams: HParams, n_templates: int | None = None, phrasings: int = 0
) -> Geometry:
    """A typical request's geometry for ``hparams``' context templates (BOS included), with
    ``phrasings`` more rows when requests bring relation phrasings (``--phrasings``)."""
    lengths = [length for length, n in hparams.context_template_length_params for _ in range(n)]
    templates = (n_templates if n_templates is not None else 1 + len(lengths)) + phrasings
    longest = max(lengths, default=0) + TEMPLATE_EXTRA if templates > 1 else 0
    prefix = 1 + longest + PROMPT_TO_SUBJECT - 1
    suffix = 1 + PROMPT_AFTER_SUBJECT + TARGET_TOKENS - 1
    return Geometry(
        rows=templates + 1,
        prefix=prefix,
        suffix=suffix,
        targets=templates * TARGET_TOKENS,
        key_tokens=prefix + 1 + PROMPT_AFTER_SUBJECT,
        whole=PROMPT_TO_SUBJECT + suffix if hparams.v_realized_delta == "bare" else 0,
    )


def geometry_for(
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    templates: list[str],
    max_phrasings: int = 0,
    whole_bare: bool = False,
) -> Geometry:
    """The exact geometry of ``request`` with ``templates``, as the engine batches it;
    ``whole_bare``: with the bare prompt run again whole (``v_realized_delta: bare``)."""
    prompts = [templated(tok, request, t) for t in templates]
    prompts += [phrased(tok, request.subject, p) for p in request.phrasings[:max_phrasings]]
    target = request.target_new
    rows = [prompt_row(tok, p, target) for p in prompts]
    whole = prompt_row(tok, prompts[0], target, whole=True)
    fed = [whole, *rows[1:]] if whole_bare else rows
    return Geometry(
        rows=len(rows) + 1,
        prefix=max(r.split for r in rows),
        suffix=max(len(r.ids) - r.split for r in rows),
        targets=sum(len(r.targets) for r in rows),
        key_tokens=max(len(p.tokens.ids) for p in prompts),
        whole=len(whole.ids) if whole_bare else 0,
        exact=tuple(
            (len(r.ids), r.split, r.subject, len(r.targets))
            for r in [*fed, kl_row(tok, request.subject)]
        ),
    )


def _meta_rows(geo: Geometry) -> list[Row]:
    """Rows of ``geo``'s shapes, as the engine builds them (``engine/values.py``): the bare
    prompt (run whole under ``bare``), the other templates, then the KL prompt; a real
    request's own rows where ``geo`` has them."""

    def row(length: int, split: int, subject: int, targets: int) -> Row:
        return Row([0] * length, split, subject, [(length - 1 - t, 0) for t in range(targets)])

    if geo.exact:
        return [row(*shape) for shape in geo.exact]
    per_row = geo.targets // geo.templates
    rows = [row(geo.prefix + geo.suffix, geo.prefix, geo.prefix, per_row)] * geo.templates
    if geo.whole:
        rows[0] = row(geo.whole, 0, geo.whole - geo.suffix, per_row)
    return [*rows, row(geo.prefix + 1, geo.prefix, geo.prefix, 0)]


_SDPA = F.scaled_dot_product_attention


def _fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """SDPA as a fused kernel runs it (CPU flash, CUDA flash / memory-efficient): it keeps q, k,
    v, the output and a log-sum-exp for backward, never the scores. On meta tensors torch
    would take the math path instead, which upcasts and keeps heads x queries x keys scores.
    ``enable_gqa``: k and v keep their fewer heads, read in place (CPU flash)."""
    if query.device.type != "meta":
        return _SDPA(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(
            attn_mask.logical_not(), float("-inf")
        )
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out


@contextmanager
def _fused_attention_on_meta() -> Iterator[None]:
    """Send ``F.scaled_dot_product_attention`` (transformers calls it) to ``_fused_attention``."""
    F.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


def trace_value_step(
    model: PreTrainedModel, names: ModuleNames, layer: int, geo: Geometry, kv_in_place: bool
) -> dict[str, int]:
    """Peak live bytes per phase of one optimisation step of delta, on a meta ``model``.

    Runs engine/values.py's own pieces on rows of ``geo``'s shapes: the prefix pass into a
    KV cache and the packed pass (``PackedPass``), the kept output of the blocks below the edit
    and the KL reference, then optimisation steps: forward with delta's share added
    (``DeltaSite``; under ``v_realized_delta: bare``, ``geo.whole``, the bare prompt packed in
    whole), fp32 log-softmax at the target slots and the KL slot (one head call, ``Readout``),
    backward into delta, Adam. ``kv_in_place``: grouped-query attention without copied
    key/value heads, as on CPU (``shared_kv_heads``).
    """
    mlp, rewrite = model.get_submodule(names.mlp(layer)), model.get_submodule(names.rewrite(layer))
    head = model.get_output_embeddings()
    d_out, vocab = head.weight.shape[1], head.weight.shape[0]
    dtype = head.weight.dtype
    with (
        live_tensor_bytes() as tracker,
        frozen(model),
        _fused_attention_on_meta(),
        autocast_tolerates_meta(),
        shared_kv_heads(kv_in_place),
    ):
        tracker.set_phase("prefix")
        rows = _meta_rows(geo)
        packed = PackedPass(model, rows)
        below_out = torch.zeros(*packed.shape, d_out, dtype=dtype, device="meta")  # noqa: F841
        read = torch.ones(weight_as_out_in(rewrite).shape[1]) if geo.whole else None
        site = delta_site(packed, rows, torch.ones(len(rows)), read, "bare")
        site.to(torch.device("meta"))
        readout = Readout.of(packed, rows)
        kl_ref = torch.zeros(1, vocab, device="meta")
        z = torch.ones(d_out, device="meta")
        delta = torch.zeros_like(z, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=0.5)

        # Two steps: from the second on, Adam's state exists and the previous step's hidden
        # states and log-probs stay referenced until the new ones replace them.
        for _ in range(2):
            tracker.set_phase("forward")
            hidden = site.forward(packed, mlp, rewrite, delta)
            tracker.set_phase("head")
            nll_each, kl_log_probs = readout.read(packed, hidden)
            kl = F.kl_div(kl_ref, kl_log_probs, log_target=True, reduction="batchmean")
            loss = nll_each.mean() + kl + delta.norm() / z.norm() ** 2
            tracker.set_phase("backward")
            opt.zero_grad()
            loss.backward()
            tracker.set_phase("step")
            opt.step()
        tracker.set_phase("")
    return dict(tracker.phase_peaks)


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


# ------------------------------------------------------------------------------------- the plan


@dataclass
class DevicePlan:
    device: str  # "cuda:0", "cpu", "disk"
    weights: int
    edit: int  # peak of the edit working set here (beyond the weights)
    stats: int  # peak of the statistics pass here (beyond the weights)
    reserve: int  # CUDA context and allocator slack
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


def _dims(model: PreTrainedModel, names: ModuleNames, layer: int) -> tuple[int, int, int]:
    """(d_in, d_out, element size) of W at ``layer``, read from the meta model."""
    w = weight_as_out_in(model.get_submodule(names.rewrite(layer)))
    return w.shape[1], w.shape[0], w.element_size()


def _stats_peak(
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


def _layer_costs(
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
    d_in, d_out, size = _dims(model, names, layer)
    dtype = next(model.parameters()).dtype
    run_on = _execution(dmap)
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
    keys = geo.templates * geo.key_tokens * (4 * d_out + 4 * d_in) * size
    n_below, n_above = layer, n_layers - layer - 1
    value_total = max(c.at(n_below, n_above) for c in costs.values())
    vocab = model.get_output_embeddings().weight.shape[0]
    components = {
        "key_covariance_C": square if hparams.mom2_adjustment else 0,
        "cholesky_factor": cholesky,
        "factorisation_peak": factorise,
        "value_step": value_total,
        "value_activations": n_below * costs["forward"].below + n_above * costs["forward"].above,
        "logits_target_rows": (geo.targets + 1) * vocab * (size + 4 + 4),
        "logits_if_full": geo.rows * (geo.prefix + geo.suffix) * vocab * (size + 4 + 4),
        "kl_reference": vocab * 4,
        "adam_delta": 4 * d_out * 4,
        "key_pass": keys,
        "update": update,
        "in_edit": max(value_total, update, keys),
    }
    at_edit = max(value.get(edit_at, 0), keys, update)
    value[edit_at] = max(factorise, cholesky + at_edit)
    if edit_at == "cpu" and hparams.mom2_adjustment:
        value[edit_at] += square  # C itself stays in RAM (SecondMoment.mom2) during the edit
    return value, components


def _execution(dmap: dict[str, int | str]) -> Callable[[int | str], int | str]:
    """Where a module placed at a target runs: offloaded targets ("cpu" under a GPU map,
    "disk") run on the main device, the first GPU (else the CPU), as accelerate dispatches."""
    gpus = sorted(v for v in dmap.values() if isinstance(v, int))
    main: int | str = gpus[0] if gpus else "cpu"
    return lambda where: main if where in ("cpu", "disk") else where


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
        names = module_names(arch, hparams.module_overrides())
    _, components = _layer_costs(
        config, meta, names, hparams.layers[0], geometry, hparams, {"": "cpu"}, num_layers(config)
    )
    return components


def _head_name(model: PreTrainedModel) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def _targets(
    devices: list[torch.device], max_memory: dict[int | str, int] | None
) -> list[int | str]:
    keys = [_key(d) for d in devices]
    for extra in ("cpu", "disk"):
        if max_memory and extra in max_memory and extra not in keys:
            keys.append(extra)
    return keys


def _devices(devices: str | None, max_memory: dict[int | str, int] | None) -> list[torch.device]:
    if devices:
        return parse_devices(devices)
    gpus = sorted(k for k in (max_memory or {}) if isinstance(k, int))
    if gpus:
        return [torch.device(f"cuda:{k}") for k in gpus]
    if max_memory and "cpu" in max_memory:
        return [torch.device("cpu")]
    return parse_devices(None)


@dataclass
class _Model:
    """What the plan needs to know about the model, built once per dtype."""

    name: str
    config: PretrainedConfig
    meta: PreTrainedModel
    names: ModuleNames
    n_layers: int


def _model(model: str | None, dtype: torch.dtype, hparams: HParams) -> _Model:
    config = load_config(model)
    meta = meta_model(config, dtype)
    arch = (config.architectures or [type(meta).__name__])[0]
    names = module_names(arch, hparams.module_overrides())
    n_layers = num_layers(config)
    for layer in hparams.layers:
        if not 0 <= layer < n_layers:
            raise MemcheckError(f"hparams layers: {layer} is outside 0..{n_layers - 1}")
    return _Model(model or DEFAULT_MODEL, config, meta, names, n_layers)


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
    targets = _targets(devices, max_memory)
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
    run_on = _execution(dmap)
    for layer in hparams.layers:
        placed = placement(m.names.rewrite(layer), dmap)
        if run_on(placed) != placed:
            problems.append(
                f"layer {layer}'s W would be offloaded to {placed} (accelerate keeps offloaded "
                "weights on the meta device), so the edit could not write it: give the "
                "device it runs on room for it"
            )
        per_target, parts = _layer_costs(
            m.config, m.meta, m.names, layer, geo, hparams, dmap, m.n_layers
        )
        where = run_on(placed)
        edited.setdefault(where, []).append(layer)
        per_target[where] += originals
        d_in, d_out, size = _dims(m.meta, m.names, layer)
        originals += d_in * d_out * size
        for k, v in per_target.items():
            edit[k] = max(edit.get(k, 0), v)
        peak, scores = _stats_peak(m.config, d_in, d_out, size, batch_tokens, max_len)
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
            device=_label(k),
            weights=weights.get(k, 0),
            edit=edit.get(k, 0),
            stats=stats.get(k, 0),
            reserve=CUDA_RESERVE if isinstance(k, int) else 0,
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
        if isinstance(k, int) and not _gpu_present(k) and k not in (max_memory or {}):
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
        edit_device=_label(run_on(placement(m.names.rewrite(hparams.layers[0]), dmap))),
        device_map=dmap,
        batch_tokens=batch_tokens,
        max_len=max_len,
        notes=notes,
        problems=problems,
    )


def largest_batch(memory_plan: MemoryPlan, cap: int = 64) -> int:
    """The most requests in flight together (``rrome edit --batch``) whose edit working sets
    fit beside the weights on the edited layer's device: the working set grows about in
    proportion to the requests (their rows of the packed value pass and of the head)."""
    device = next(d for d in memory_plan.devices if d.device == memory_plan.edit_device)
    room = device.capacity - device.weights - device.reserve
    return max(1, min(cap, room // max(device.edit, 1)))


def plan(
    model: str | None,
    dtype: str | None,
    devices: str | None,
    max_memory: dict[int | str, int | str] | None,
    hparams: HParams,
    batch_tokens: int = 4096,
    max_len: int = 512,
    n_templates: int | None = None,
    *,
    phrasings: int = 0,
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
    request's (``estimate_geometry`` with ``n_templates``). ``device_map``: evaluate this
    accelerate map instead of the one rrome would infer (its targets need sizes too).
    """
    limits = {
        k: convert_file_size_to_int(v) if isinstance(v, str) else int(v)
        for k, v in (max_memory or {}).items()
    }
    targets = _devices(devices, limits)
    config = load_config(model)
    try:
        torch_dtype = DTYPES[dtype] if dtype else choose_dtype(config, None, targets)
    except KeyError:
        raise MemcheckError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}") from None
    geo = geometry or estimate_geometry(hparams, n_templates, phrasings)
    built = _model(model, torch_dtype, hparams)
    result = _plan(built, targets, limits, hparams, geo, batch_tokens, max_len, device_map)
    if not result.fits:
        result.fix = _cheapest_fix(
            result, built, model, targets, limits, hparams, geo, batch_tokens, max_len, phrasings
        )
    return result


# ---------------------------------------------------------------------------------------- fixes


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
        half = _model(model, torch.bfloat16, hparams)
        if (p := attempt(m=half)) is not None:
            return f"use --bf16 (or --fp16) instead of fp32 (then {summary(p)})"
    gpus = [d for d in devices if d.type == "cuda"]
    if gpus:
        index = max(d.index or 0 for d in gpus) + 1
        size = max(capacity(_key(d), limits) for d in gpus)
        more = [*devices, torch.device(f"cuda:{index}")]
        if (p := attempt(devices=more, max_memory={**limits, index: size})) is not None:
            listed = ",".join(str(d.index or 0) for d in more)
            return f"add a GPU of {gib(size)} GiB: --devices {listed} (then {summary(p)})"
    context = templates = geo.templates - phrasings
    while templates > 1:
        templates = max(1, templates // 2)
        if (p := attempt(geo=estimate_geometry(hparams, templates, phrasings))) is not None:
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
        shrunk = {
            k: max(0, v - need - CUDA_RESERVE) if isinstance(k, int) else v
            for k, v in ((_key(d), capacity(_key(d), limits)) for d in gpus)
        }
        offload = {**limits, **shrunk, "cpu": _ram()}
        if (p := attempt(max_memory=offload)) is not None:
            spec = ",".join(f"{k}={gib(v)}GiB" for k, v in offload.items() if k != "disk")
            return f"offload layers to the CPU: --max-memory {spec} (slower; {summary(p)})"
    return "no single change makes it fit: use a larger device or several"


# ---------------------------------------------------------------------------------------- render


def render(plan: MemoryPlan, console: Console) -> None:
    """A table of the devices, the edit's working set on the edited layer's device, the verdict."""
    table = Table(title=f"rrome memcheck: {plan.model} ({plan.dtype}), layers {plan.layers}")
    for column in (
        "device",
        "weights",
        "edit working set",
        "stats pass peak",
        "reserve",
        "total",
        "capacity",
        "headroom",
    ):
        table.add_column(column, justify="left" if column == "device" else "right")
    for d in plan.devices:
        layers = f" (edits {', '.join(map(str, d.edited_layers))})" if d.edited_layers else ""
        colour = "green" if d.fits else "red"
        table.add_row(
            d.device + layers,
            _g(d.weights),
            _g(d.edit),
            _g(d.stats),
            _g(d.reserve),
            _g(d.total),
            _g(d.capacity),
            f"[{colour}]{_g(d.headroom)}[/{colour}]",
        )
    console.print(table)
    parts = Table(title=f"edit working set on {plan.edit_device} (GiB)", show_header=False)
    parts.add_column("part")
    parts.add_column("GiB", justify="right")
    c, geo = plan.components, plan.geometry
    rows = [
        ("key covariance C (fp32, in RAM)", c["key_covariance_C"]),
        ("Cholesky factor of C + lambda I (fp32)", c["cholesky_factor"]),
        ("factorisation peak (C + lambda I copy, factor)", c["factorisation_peak"]),
        (
            f"value step, traced ({geo.rows} prompts x {geo.prefix}+{geo.suffix} tokens)",
            c["value_step"],
        ),
        ("  of which activations kept for backprop and KV cache", c["value_activations"]),
        (
            f"  of which logits + log-softmax at {geo.targets + 1} rows (fp32)",
            c["logits_target_rows"],
        ),
        ("  of which KL reference + Adam state", c["kl_reference"] + c["adam_delta"]),
        ("  (full logits, not computed by the engine)", c["logits_if_full"]),
        ("key pass", c["key_pass"]),
        ("rank-one update (outer product, old W, W in fp32)", c["update"]),
    ]
    for label, value in rows:
        parts.add_row(label, _g(value))
    console.print(parts)
    colour = "green" if plan.fits else "red"
    console.print(f"[bold {colour}]{plan.verdict()}[/bold {colour}]")
    if plan.fix:
        console.print(f"cheapest fix: {plan.fix}")
    for note in plan.notes:
        console.print(f"[dim]note: {note}[/dim]")


def _g(n: int) -> str:
    return f"{n / GiB:.2f}"


__all__ = [
    "DevicePlan",
    "Geometry",
    "LiveTensorBytes",
    "MemcheckError",
    "MemoryPlan",
    "device_map",
    "edit_working_set",
    "estimate_geometry",
    "geometry_for",
    "live_tensor_bytes",
    "measure_peak",
    "meta_model",
    "parse_max_memory",
    "plan",
    "render",
    "trace_value_step",
    "value_step_costs",
    "weights_per_device",
]
