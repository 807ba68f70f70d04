"""The packed pass: every row of a value optimisation through the model in one call.

Nothing below layer l, nor at positions before the subject's last token, depends on delta. So
each prompt (a ``Row``) is split at its subject's last token: the prefix runs once per edit into
a KV cache, and each optimisation step runs only the rest (subject token, rest of prompt,
target). The decoder blocks below layer l see no delta either: their output is computed on the
first pass and the later passes start above them. Every row (templated prompts, phrasings, the
KL prompt, the bare prompt run whole under ``bare``) goes through the model in one packed call
(``PackedPass``); ``DeltaSite`` says where delta joins the MLP output and how much of it, and
``Readout`` which slots the loss reads, so that logits are computed only there, in fp32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from rrome_cli.compat import cache_kwargs, reuses_prefix_cache
from rrome_cli.engine.hooks import (
    blocks_replaced,
    capture_input,
    edit_output,
    shared_kv_heads,
    weights_on_cpu,
)
from rrome_cli.models.families import base_of, input_device
from rrome_cli.models.head import head_logits


@dataclass
class Row:
    """One prompt as the value step feeds it: its first ``split`` tokens run once into the KV
    cache (delta cannot reach them), the rest at every step."""

    ids: list[int]  # the prompt's tokens, then the target's but its last (teacher forcing)
    split: int
    subject: int  # index in ids of the subject's last token: where delta is added
    targets: list[tuple[int, int]]  # (index whose output predicts the token, its token id)


def pack(lengths: list[int]) -> list[list[int]]:
    """Rows (by index) into lines, first fit, longest first, at the line width from the longest
    row to twice it that needs the fewest slots (lines x width; a wider line also makes every
    token attend over more cached prefixes). Rows of one length, as the templated prompts'
    are, get a line each: the padded batch."""
    longest = max(lengths)
    layouts = [_first_fit(lengths, width) for width in range(longest, 2 * longest + 1)]
    return min(layouts, key=lambda lines: len(lines) * _width(lines, lengths))


def _first_fit(lengths: list[int], width: int) -> list[list[int]]:
    lines: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        q = next((q for q, free in enumerate(room) if free >= lengths[i]), len(lines))
        if q == len(lines):
            lines.append([])
            room.append(width)
        lines[q].append(i)
        room[q] -= lengths[i]
    return lines


def _width(lines: list[list[int]], lengths: list[int]) -> int:
    return max(sum(lengths[i] for i in line) for line in lines)


@dataclass
class _Layout:
    """Rows packed into lines: what one pass feeds, and where each row's slots are."""

    ids: torch.Tensor  # (lines, width) uncached tokens side by side; padding: any id, unseen
    positions: torch.Tensor  # (lines, width) each token's position in its own prompt
    seen: torch.Tensor  # (lines, width, cached + width) bool: which cache slots and tokens
    gather: torch.Tensor  # (lines, cached) each line's cache slots, in the prefix pass's
    prefix_width: int  # the prefix pass's width: the longest prefix
    start: list[int]  # per row: flat slot of its index 0 (its first uncached token at split)


def _lay_out(rows: list[Row]) -> _Layout:
    lengths = [len(r.ids) - r.split for r in rows]
    lines = pack(lengths)
    width, prefix_width = _width(lines, lengths), max(r.split for r in rows)
    cached = max(sum(rows[i].split for i in line) for line in lines)  # cache slots a line
    ids = torch.zeros(len(lines), width, dtype=torch.long)
    positions = torch.zeros_like(ids)
    seen = torch.zeros(len(lines), width, cached + width, dtype=torch.bool)
    gather = torch.zeros(len(lines), cached, dtype=torch.long)
    start = [0] * len(rows)
    for q, line in enumerate(lines):
        col = at = 0  # next free column; next free cache slot
        for i in line:
            r, n = rows[i], lengths[i]
            ids[q, col : col + n] = torch.tensor(r.ids[r.split :])
            positions[q, col : col + n] = torch.arange(r.split, len(r.ids))
            seen[q, col : col + n, at : at + r.split] = True
            seen[q, col : col + n, cached + col : cached + col + n] = torch.ones(n, n).tril()
            gather[q, at : at + r.split] = i * prefix_width + torch.arange(r.split)
            start[i] = q * width + col - r.split
            col, at = col + n, at + r.split
        idle = torch.arange(col, width)
        seen[q, idle, cached + idle] = True  # padding sees itself: no row of NaNs
    return _Layout(ids, positions, seen, gather, prefix_width, start)


class PackedPass:
    """Runs the uncached tokens of every row in one forward on top of a once-computed KV cache.

    At a few dozen tokens a block's matmul is bound by reading its weight, so a second call
    costs nearly what the first did (SmolLM2, ``bare``'s whole bare prompt as a call of its
    own: 1.38x a step; packed: 1.05x).
    So the rows are packed side by side into lines (``pack``), each line's prefixes laid end to
    end in its cache, and a block-causal mask keeps each row to its own prefix and tokens. Slots
    of the flattened (lines * width) output are addressed by ``slot(row, index in row.ids)``.

    ``blocks_below``: names of the decoder blocks under the edited layer, in order. delta does
    not reach them, so their output is computed on the first pass and reused.
    """

    def __init__(
        self, model: PreTrainedModel, rows: list[Row], blocks_below: list[str] | None = None
    ) -> None:
        self.model, self.blocks_below = model, blocks_below or []
        self.below_out: torch.Tensor | None = None  # (lines, width, d) once the first pass ran
        self.base = base_of(model)
        self.kv_in_place = weights_on_cpu(model)
        _check_window(model, rows)
        if not reuses_prefix_cache(self.base):  # then every row runs whole, nothing cached
            rows = [replace(r, split=0) for r in rows]
        layout = _lay_out(rows)
        self.shape, self.start = layout.ids.shape, layout.start
        device, dtype = input_device(model), model.dtype
        self.ids, self.positions = layout.ids.to(device), layout.positions.to(device)
        seen = layout.seen
        blocked = torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, torch.finfo(dtype).min)
        self.mask = blocked[:, None].to(device)  # (lines, 1, width, cached + width) additive
        cached = layout.gather.shape[1] > 0
        self.cache = self._prefix_cache(rows, layout) if cached else None
        # The prefix keys and values of every layer, put back after each pass.
        self.prefix_kv = [(x.keys, x.values) for x in self.cache.layers] if self.cache else []

    def slot(self, row: int, index: int) -> int:
        """Flat slot of the output at ``index`` of ``rows[row].ids`` (index >= its split)."""
        return self.start[row] + index

    def _prefix_cache(self, rows: list[Row], layout: _Layout) -> DynamicCache:
        """Every row's prefix in one padded batch, then each line's rows' slots end to end."""
        gather = layout.gather  # indexes the (rows * prefix_width) slots of this batch
        ids = torch.zeros(len(rows), layout.prefix_width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : r.split] = torch.tensor(r.ids[: r.split], dtype=torch.long)
            mask[i, : r.split] = 1
        # A row whose prefix is empty would be fully masked (NaN attention); let it see its
        # first slot here only. No line gathers that slot.
        mask[mask.sum(1) == 0, 0] = 1
        device = input_device(self.model)
        batch = DynamicCache()  # plain layers: our prompts are far shorter than any window
        with torch.no_grad(), shared_kv_heads(self.kv_in_place):
            self.base(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                **cache_kwargs(self.base, batch),
            )
        cache = DynamicCache()
        for i, layer in enumerate(batch.layers):
            # (rows, heads, width, hd) -> (heads, rows * width, hd) -> (lines, heads, slots, hd)
            keys, values = (
                t.transpose(0, 1).flatten(1, 2)[:, gather.to(t.device)].transpose(0, 1)
                for t in (layer.keys, layer.values)
            )
            cache.update(keys.contiguous(), values.contiguous(), i)
        return cache

    def hidden(self) -> torch.Tensor:
        """Final hidden states of every slot: (lines * width, d)."""
        with self._blocks_below(), shared_kv_heads(self.kv_in_place):
            return self._pass().flatten(0, 1)

    @contextmanager
    def _blocks_below(self) -> Iterator[None]:
        if not self.blocks_below:
            yield
        elif self.below_out is None:
            last = self.model.get_submodule(self.blocks_below[-1])
            with edit_output(last, self._keep_below):
                yield
        else:
            with blocks_replaced(self.model, self.blocks_below, self.below_out):
                yield

    def _keep_below(self, out: torch.Tensor) -> torch.Tensor:
        self.below_out = out.detach()
        return out

    def _pass(self) -> torch.Tensor:
        if self.cache is None:  # nothing cached (every subject is its prompt's first token)
            out = self.base(
                input_ids=self.ids,
                attention_mask=self.mask,
                position_ids=self.positions,
                use_cache=False,
            )
            return out.last_hidden_state
        out = self.base(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=self.positions,
            **cache_kwargs(self.base, self.cache),
        )
        for layer, (keys, values) in zip(self.cache.layers, self.prefix_kv, strict=True):
            layer.keys, layer.values = keys, values  # drop this pass's; reuse the prefix
        return out.last_hidden_state

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 log-softmax of the logits of the final hidden states ``h`` (N, d): (N, vocab)."""
        return F.log_softmax(head_logits(self.model, h), dim=-1)


def sliding_window(config: object) -> int | None:
    """The smallest attention window of the model's sliding-window layers; None: none."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2: a window it does not use
        return None
    window = getattr(config, "sliding_window", None)
    if window is None and "local" in (getattr(config, "attention_layers", None) or []):
        window = getattr(config, "window_size", None)  # GPT-Neo's local attention
    return window if isinstance(window, int) and window > 0 else None


def _check_window(model: PreTrainedModel, rows: list[Row]) -> None:
    """The packed pass's own block-causal mask is given to every layer, sliding-window layers
    too (transformers takes a 4-D mask as it is): exact while every row fits in the window,
    as prompts do (the smallest window of the supported families is 256 tokens)."""
    window = sliding_window(model.config)
    longest = max(len(r.ids) for r in rows)
    if window is not None and longest > window:
        raise ValueError(
            f"a value prompt of {longest} tokens is longer than the model's sliding attention "
            f"window ({window} tokens): shorten the prompt or the context templates"
        )


@dataclass
class DeltaSite:
    """Where delta joins the MLP output at the edited layer, and how much of it, per slot of
    the packed pass: ``fixed`` (a row's scale at its subject's last token) plus, at the slots
    in ``reads``, (read . k) with k the rewritten module's input there, taken on the first
    pass (delta never reaches it). Each slot carries its ``owner`` job's delta."""

    fixed: torch.Tensor  # (N,) fp32
    reads: torch.Tensor  # (N,) bool
    read: torch.Tensor | None  # (jobs, d_in) each job's u / (u . k_ref); None: no job reads
    z_slots: torch.Tensor  # (jobs,) each job's bare prompt's subject's last token
    owner: torch.Tensor  # (N,) the job whose delta a slot carries (0 where its share is 0)
    share: torch.Tensor | None = None  # (N, 1) fp32 once known
    z: torch.Tensor | None = None  # (jobs, d_out) the unedited MLP output at z_slots

    def to(self, device: torch.device) -> None:
        self.fixed, self.reads = self.fixed.to(device), self.reads.to(device)
        self.owner = self.owner.to(device)
        self.read = None if self.read is None else self.read.to(device, torch.float32)

    def forward(
        self, packed: PackedPass, mlp: nn.Module, rewrite: nn.Module, deltas: torch.Tensor
    ) -> torch.Tensor:
        """One pass with each slot's ``share * delta`` of its owner added: the final hidden
        states (N, d). ``deltas``: (jobs, d_out), or (d_out,) for one job."""
        deltas = deltas.view(-1, deltas.shape[-1])

        def add_delta(out: torch.Tensor) -> torch.Tensor:  # (lines, width, d), model's dtype
            if self.z is None:  # the MLP output does not depend on delta: the unedited one
                flat = out.flatten(0, 1)
                self.z = flat[self.z_slots.to(flat.device)].detach().float().to(deltas.device)
            if self.share is None:
                self.share = self.fixed[:, None]
            added = self.share * deltas[self.owner] if len(deltas) > 1 else self.share * deltas
            return out + added.view(out.shape).to(out.dtype)

        def keep_share(keys: torch.Tensor) -> None:  # (lines, width, d_in)
            assert self.read is not None
            k = keys.detach().flatten(0, 1).float().to(self.read.device)
            along = (k * self.read[self.owner]).sum(-1) if len(self.read) > 1 else k @ self.read[0]
            self.share = (self.fixed + self.reads * along)[:, None]

        with ExitStack() as stack:
            if self.read is not None and self.share is None:
                stack.enter_context(capture_input(rewrite, keep_share))
            stack.enter_context(edit_output(mlp, add_delta))
            return packed.hidden()


def delta_site(
    packed: PackedPass, rows: list[Row], scale: torch.Tensor, read: torch.Tensor | None
) -> DeltaSite:
    """The share of delta per slot for one job's ``rows``; ``scale``: per row."""
    return delta_site_of(packed, [(rows, scale, read)])


def delta_site_of(
    packed: PackedPass, jobs: list[tuple[list[Row], torch.Tensor, torch.Tensor | None]]
) -> DeltaSite:
    """The share of delta per slot for ``jobs`` (each: rows, scale per row, read), whose rows
    ``packed`` holds in job order. A job given ``read`` reads its bare prompt's (its first
    row's) shares off the keys at every position; every other row gets its scale at its
    subject's last token."""
    n = packed.shape[0] * packed.shape[1]
    fixed, reads = torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    owner = torch.zeros(n, dtype=torch.long)
    z_slots, i = [], 0  # i: the row's index in the packed pass
    for j, (rows, scale, read) in enumerate(jobs):
        z_slots.append(packed.slot(i, rows[0].subject))
        for local, r in enumerate(rows):
            at = list(range(len(r.ids))) if read is not None and local == 0 else []
            slots = [packed.slot(i, p) for p in at] if at else [packed.slot(i, r.subject)]
            owner[slots] = j
            if at:
                reads[slots] = True
            else:
                fixed[slots] = float(scale[local])
            i += 1
    reading = [read for _, _, read in jobs if read is not None]
    stacked = None
    if reading:
        zero = torch.zeros(reading[0].shape[0])
        stacked = torch.stack([zero if read is None else read.cpu() for _, _, read in jobs])
    return DeltaSite(fixed, reads, stacked, torch.tensor(z_slots), owner)


@dataclass
class Readout:
    """What the loss reads from a pass: the target tokens' slots, then each job's KL slot."""

    slots: torch.Tensor  # (T + jobs,)
    target_ids: torch.Tensor  # (T,)
    owner: torch.Tensor  # (T,) which rewriting row (over all jobs) each target token is of
    n_rewrite: int  # rewriting rows over all jobs
    rows_of: list[slice]  # each job's rewriting rows in the (n_rewrite,) NLL

    @classmethod
    def of(cls, packed: PackedPass, rows: list[Row]) -> Readout:
        """For one job's ``rows`` (the KL row last)."""
        return cls.of_jobs(packed, [rows])

    @classmethod
    def of_jobs(cls, packed: PackedPass, jobs: list[list[Row]]) -> Readout:
        """For several jobs' rows, packed in this order, each job's KL row its last."""
        at, kl_slots, rows_of = [], [], []
        i = n_rewrite = 0  # i: row index in the pass; n_rewrite: rewriting rows so far
        for rows in jobs:
            *rewrite, kl = rows
            for r in rewrite:
                at += [(n_rewrite, packed.slot(i, j), t) for j, t in r.targets]
                i, n_rewrite = i + 1, n_rewrite + 1
            kl_slots.append(packed.slot(i, kl.subject))
            i += 1
            rows_of.append(slice(n_rewrite - len(rewrite), n_rewrite))
        return cls(
            torch.tensor([s for _, s, _ in at] + kl_slots),
            torch.tensor([t for _, _, t in at]),
            torch.tensor([r for r, _, _ in at]),
            n_rewrite,
            rows_of,
        )

    def read(self, packed: PackedPass, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean NLL of the target per rewriting row, each job's bare prompt first; the
        log-probs after each job's KL prompt's subject, (jobs, vocab)). Every slot goes through
        the head in one call: its matmul, too, is bound by reading the (vocab, d) weight."""
        log_probs = packed.log_probs(hidden[self.slots.to(hidden.device)])
        device = log_probs.device
        n_targets = len(self.target_ids)
        logp = log_probs[:n_targets].gather(1, self.target_ids.to(device)[:, None])[:, 0]
        owner = self.owner.to(device)
        total = torch.zeros(self.n_rewrite, device=device).index_add(0, owner, -logp)
        count = torch.zeros(self.n_rewrite, device=device).index_add(
            0, owner, torch.ones_like(logp)
        )
        return total / count, log_probs[n_targets:]
