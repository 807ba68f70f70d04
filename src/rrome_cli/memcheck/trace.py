"""The value step, traced on meta tensors: the batch geometry of an edit, the engine's own
value pass run at it without data, and the live bytes at each moment of it.

``LiveTensorBytes`` counts the storages that torch ops make while it is active; ``measure_peak``
measures a real run with it (or with CUDA's own counter), to check the model against.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rrome_cli.compat import autocast_tolerates_meta
from rrome_cli.config import HParams
from rrome_cli.engine.hooks import shared_kv_heads
from rrome_cli.engine.keys import phrased, templated
from rrome_cli.engine.packing import PackedPass, Readout, Row, delta_site_of
from rrome_cli.engine.values import frozen, kl_row, prompt_row
from rrome_cli.models.families import ModuleNames, weight_as_out_in
from rrome_cli.requests import EditRequest

# A typical request, in tokens (about the 90th percentile of CounterFact): the prompt up to and
# including the subject's last token, the prompt after it, the target. Templates add a starter
# word and ". " to their sampled length.
PROMPT_TO_SUBJECT = 8
PROMPT_AFTER_SUBJECT = 5
TARGET_TOKENS = 3
TEMPLATE_EXTRA = 3


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


@dataclass(frozen=True)
class Geometry:
    """Shapes of one edit's batches (see engine/values.py: prompts split at the subject)."""

    rows: int  # value batch rows: every templated prompt plus the KL prompt
    prefix: int  # prefix width: tokens before the subject's last token (run once, KV cached)
    suffix: int  # suffix width: subject's last token, rest of the prompt, target but its last
    targets: int  # target tokens over all rewriting prompts: the logit rows the loss reads
    key_tokens: int  # longest templated prompt: the key pass
    whole: int = 0  # v_realized_delta "bare": the bare prompt's tokens, run again uncached
    jobs: int = 1  # requests of this geometry in flight together (rrome edit --batch)
    # a real request's rows (tokens, split, subject, targets) as the engine feeds them, KL last
    exact: tuple[tuple[int, int, int, int], ...] = ()

    @property
    def templates(self) -> int:
        return self.rows - 1


@dataclass(frozen=True)
class PromptShape:
    """A bare prompt's tokens as the value step splits them (``prompt_row``)."""

    to_subject: int  # BOS and the tokens before the subject's last one: the cached prefix
    rest: int  # the subject's last token, the rest of the prompt, the target but its last
    targets: int  # the target's tokens


TYPICAL = PromptShape(PROMPT_TO_SUBJECT, PROMPT_AFTER_SUBJECT + TARGET_TOKENS, TARGET_TOKENS)


def prompt_shape(tok: PreTrainedTokenizerBase, request: EditRequest) -> PromptShape:
    row = prompt_row(tok, templated(tok, request, "{}"), request.target_new)
    return PromptShape(row.split, len(row.ids) - row.split, len(row.targets))


def longest_shape(tok: PreTrainedTokenizerBase, requests: Iterable[EditRequest]) -> PromptShape:
    """The shape of the request with the most tokens (the largest working set), at least
    a typical one's."""
    shapes = [prompt_shape(tok, r) for r in requests]
    return max([TYPICAL, *shapes], key=lambda s: (s.to_subject + s.rest, s.targets))


def estimate_geometry(
    hparams: HParams,
    n_templates: int | None = None,
    phrasings: int = 0,
    shape: PromptShape = TYPICAL,
) -> Geometry:
    """The geometry of a request of ``shape`` (a typical one's by default) behind
    ``hparams``' context templates, with ``phrasings`` more rows when requests bring relation
    phrasings (``--phrasings``)."""
    lengths = [length for length, n in hparams.context_template_length_params for _ in range(n)]
    templates = (n_templates if n_templates is not None else 1 + len(lengths)) + phrasings
    longest = max(lengths, default=0) + TEMPLATE_EXTRA if templates > 1 else 0
    prefix = longest + shape.to_subject
    after_subject = shape.rest - shape.targets + 1  # the prompt's tokens after the subject
    return Geometry(
        rows=templates + 1,
        prefix=prefix,
        suffix=shape.rest,
        targets=templates * shape.targets,
        key_tokens=prefix + after_subject,
        whole=shape.to_subject + shape.rest if hparams.v_realized_delta == "bare" else 0,
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
    """Peak live bytes per phase of one optimisation step of delta, on a meta ``model``, for
    ``geo.jobs`` requests in flight together (``ValueBatch``).

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
        one = _meta_rows(geo)  # one request's rows; geo.jobs of them packed together
        packed = PackedPass(model, one * geo.jobs)
        below_out = torch.zeros(*packed.shape, d_out, dtype=dtype, device="meta")  # noqa: F841
        read = torch.ones(weight_as_out_in(rewrite).shape[1]) if geo.whole else None
        site = delta_site_of(packed, [(one, torch.ones(len(one)), read)] * geo.jobs)
        site.to(torch.device("meta"))
        readout = Readout.of_jobs(packed, [one] * geo.jobs)
        kl_ref = torch.zeros(geo.jobs, vocab, device="meta")
        z = torch.ones(geo.jobs, d_out, device="meta")
        delta = torch.zeros_like(z, requires_grad=True)  # every job's, each with Adam state
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
