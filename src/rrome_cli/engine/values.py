"""The value v*: optimise delta, added to the MLP output at the subject's last token (with
``v_realized_delta`` ``suffix`` / ``answer`` / ``bare``, at other positions too, scaled as the
update will add it there).

Loss = mean NLL of the target over all templated prompts and relation phrasings (teacher forcing;
         with v_bare_weight w: w * the bare prompt's + (1 - w) * that mean)
     + kl_factor * KL(edited || unedited) of the next token after the subject in "{subject} is a"
     + v_weight_decay * ||delta|| / ||z||^2          (z: the unedited MLP output, bare prompt)
Adam on delta only; delta is clamped to clamp_norm_factor * ||z|| after each step.

Nothing below layer l, nor at positions before the subject's last token, depends on delta. So
each prompt is split at its subject's last token: the prefix runs once per edit into a KV cache,
and each optimisation step runs only the rest (subject token, rest of prompt, target).
The decoder blocks below layer l see no delta either: their output is computed on the first
pass and the later passes start above them. Every row (templated prompts, phrasings, the KL
prompt, the bare prompt run whole under ``bare``) goes through the model in one packed call
(``PackedPass``), and logits are computed only where the loss reads them, in fp32.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from rrome_cli.config import HParams
from rrome_cli.engine.hooks import (
    blocks_replaced,
    capture_input,
    edit_output,
    shared_kv_heads,
    weights_on_cpu,
)
from rrome_cli.engine.keys import Templated
from rrome_cli.engine.positions import (
    encode_pair,
    special_prefix,
    subject_last_token,
    tokenise,
)
from rrome_cli.models.families import (
    ModuleNames,
    execution_device,
    input_device,
    weight_as_out_in,
)

KL_TEMPLATE = "{} is a"


def kl_prompt(tok: PreTrainedTokenizerBase, subject: str) -> Templated:
    """The KL prompt "{subject} is a", its subject located (the batch's last row)."""
    text = KL_TEMPLATE.replace("{}", subject)
    tokens = tokenise(tok, text)
    return Templated(text, tokens, len(subject), subject_last_token(tokens, len(subject)))


@dataclass
class ValueResult:
    delta: torch.Tensor  # (d_out,) fp32 on the MLP's device
    z: torch.Tensor  # (d_out,) unedited MLP output at the subject's last token (bare prompt)
    loss: float
    nll: float
    target_prob: float  # mean over prompts of the mean target-token probability
    steps: int
    seconds: float
    step_seconds: list[float]  # wall time of each optimisation step


@dataclass
class Row:
    """One prompt as the value step feeds it: its first ``split`` tokens run once into the KV
    cache (delta cannot reach them), the rest at every step."""

    ids: list[int]  # the prompt's tokens, then the target's but its last (teacher forcing)
    split: int
    subject: int  # index in ids of the subject's last token: where delta is added
    targets: list[tuple[int, int]]  # (index whose output predicts the token, its token id)


def prompt_row(
    tok: PreTrainedTokenizerBase, prompt: Templated, target: str, whole: bool = False
) -> Row:
    """``prompt`` + " " + ``target``, the same tokens evaluation scores; ``whole``: nothing
    cached, every position runs at each step."""
    full = encode_pair(tok, prompt.text, target, special_prefix(tok))
    subject = full.subject_last(prompt.subject_end)
    ids = full.input_ids
    targets = [(j - 1, ids[j]) for j in range(full.answer_start, len(ids))]
    return Row(ids[:-1], 0 if whole else subject, subject, targets)


def kl_row(tok: PreTrainedTokenizerBase, subject: str) -> Row:
    """The KL prompt "{subject} is a" up to the subject's last token: the KL term reads the
    next-token distribution there, which the later tokens cannot change."""
    kl = kl_prompt(tok, subject)
    return Row(kl.tokens.ids[: kl.subject_last + 1], kl.subject_last, kl.subject_last, [])


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


@contextmanager
def frozen(model: PreTrainedModel) -> Iterator[None]:
    """No gradients for the weights: backward computes d loss / d delta only."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


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
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.kv_in_place = weights_on_cpu(model)
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
                cache=batch,
                use_cache=True,
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
            cache=self.cache,
            use_cache=True,
        )
        for layer, (keys, values) in zip(self.cache.layers, self.prefix_kv, strict=True):
            layer.keys, layer.values = keys, values  # drop this pass's; reuse the prefix
        return out.last_hidden_state

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 log-softmax of the logits of the final hidden states ``h`` (N, d): (N, vocab)."""
        logits = self.head(h.to(execution_device(self.head))).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.log_softmax(logits, dim=-1)


def optimise_delta(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    names: ModuleNames,
    layer: int,
    prompts: list[Templated],
    target: str,
    subject: str,
    hp: HParams,
    row_scale: torch.Tensor | None = None,
    phrasings: list[Templated] | None = None,
    read: torch.Tensor | None = None,
) -> ValueResult:
    """Find delta for the MLP output at ``layer``; ``prompts[0]`` is the bare prompt ("{}").

    ``phrasings``: other phrasings of the relation, optimised alongside the prompts.
    ``row_scale`` (n_prompts + n_phrasings + 1,): delta reaches row i as ``row_scale[i] *
    delta`` (prompts, phrasings, then the KL prompt). None adds the same delta everywhere, as
    ROME does; the engine passes (u . k_i) / (u . k_ref) under ``v_realized_delta``, which is
    what the rank-one update will really add at each prompt's subject token.
    ``read`` (d_in,), u / (u . k_ref): delta reaches a position whose key is k as (read . k)
    delta, the rank-one update's own effect there: at every uncached position of every row
    (``v_realized_delta: suffix``), at the subject's and the fed answer tokens (``answer``),
    or at every position of the bare prompt, run whole, uncached (``bare``: its loss and stop
    test read the edited model itself; the other rows as under true).
    """
    start = time.perf_counter()
    phrasings = phrasings or []
    mlp, rewrite = model.get_submodule(names.mlp(layer)), model.get_submodule(names.rewrite(layer))
    mlp_device = execution_device(rewrite)
    mode = hp.v_realized_delta
    rows = [
        prompt_row(tok, p, target, whole=mode == "bare" and i == 0) for i, p in enumerate(prompts)
    ]
    rows += [prompt_row(tok, p, target) for p in phrasings]
    rows.append(kl_row(tok, subject))  # the last row
    scale = torch.ones(len(rows)) if row_scale is None else row_scale

    with frozen(model):
        packed = PackedPass(model, rows, [names.layer(i) for i in range(layer)])
        site = delta_site(packed, rows, scale, read, mode)
        site.to(mlp_device)
        readout = Readout.of(packed, rows)
        d_out = weight_as_out_in(rewrite).shape[0]
        delta = torch.zeros(d_out, device=mlp_device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.v_lr, betas=(0.9, hp.v_adam_beta2))
        steps, step_times = 0, []
        for _ in range(hp.v_num_grad_steps):
            t_step = time.perf_counter()
            hidden = site.forward(packed, mlp, rewrite, delta)
            nll_each, kl_log_probs = readout.read(packed, hidden)
            if steps == 0:
                # delta is still 0: this pass is the unedited model, the KL reference and z
                kl_ref = kl_log_probs.detach()
                z = site.z  # (d_out,) bare prompt, subject's last token
                max_norm = hp.clamp_norm_factor * z.norm()
            loss = _value_loss(nll_each, kl_log_probs, kl_ref, delta, z, hp)
            if _reached(loss, nll_each, hp):
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
            step_times.append(time.perf_counter() - t_step)
    probs = torch.exp(-nll_each)
    return ValueResult(
        delta.detach(),
        z,
        loss.item(),
        nll_each.mean().item(),
        probs.mean().item(),
        steps,
        time.perf_counter() - start,
        step_times,
    )


@dataclass
class DeltaSite:
    """Where delta joins the MLP output at the edited layer, and how much of it, per slot of
    the packed pass: ``fixed`` (a row's scale at its subject's last token) plus, at the slots
    in ``reads``, (read . k) with k the rewritten module's input there, taken on the first
    pass (delta never reaches it)."""

    fixed: torch.Tensor  # (N,) fp32
    reads: torch.Tensor  # (N,) bool
    read: torch.Tensor | None  # (d_in,) u / (u . k_ref)
    z_slot: int  # the bare prompt's subject's last token
    share: torch.Tensor | None = None  # (N, 1) fp32 once known
    z: torch.Tensor | None = None  # (d_out,) the unedited MLP output at z_slot

    def to(self, device: torch.device) -> None:
        self.fixed, self.reads = self.fixed.to(device), self.reads.to(device)
        self.read = None if self.read is None else self.read.to(device, torch.float32)

    def forward(
        self, packed: PackedPass, mlp: nn.Module, rewrite: nn.Module, delta: torch.Tensor
    ) -> torch.Tensor:
        """One pass with ``share * delta`` added: the final hidden states (N, d)."""

        def add_delta(out: torch.Tensor) -> torch.Tensor:  # (lines, width, d), model's dtype
            if self.z is None:  # the first pass runs at delta = 0: the unedited output
                self.z = out.flatten(0, 1)[self.z_slot].detach().float().to(delta.device)
            if self.share is None:
                self.share = self.fixed[:, None]
            return out + (self.share * delta).view(out.shape).to(out.dtype)

        def keep_share(keys: torch.Tensor) -> None:  # (lines, width, d_in)
            k = keys.detach().flatten(0, 1).float().to(self.read.device)
            self.share = (self.fixed + self.reads * (k @ self.read))[:, None]

        with ExitStack() as stack:
            if self.read is not None and self.share is None:
                stack.enter_context(capture_input(rewrite, keep_share))
            stack.enter_context(edit_output(mlp, add_delta))
            return packed.hidden()


def delta_site(
    packed: PackedPass,
    rows: list[Row],
    scale: torch.Tensor,
    read: torch.Tensor | None,
    mode: object,
) -> DeltaSite:
    """The share of delta per slot for ``v_realized_delta`` ``mode``; ``scale``: per row."""
    n = packed.shape[0] * packed.shape[1]
    fixed, reads = torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    for i, r in enumerate(rows):
        at = _read_positions(r, i, mode) if read is not None else []
        if at:
            reads[[packed.slot(i, j) for j in at]] = True
        else:
            fixed[packed.slot(i, r.subject)] = float(scale[i])
    return DeltaSite(fixed, reads, read, packed.slot(0, rows[0].subject))


def _read_positions(row: Row, i: int, mode: object) -> list[int]:
    """Positions of ``row`` (the ``i``-th) whose share of delta is read off their keys."""
    if mode == "suffix":
        return list(range(row.split, len(row.ids)))
    if mode == "answer":  # the subject's last token and the fed answer tokens
        answer = min((j + 1 for j, _ in row.targets), default=len(row.ids))
        return [row.subject, *range(answer, len(row.ids))]
    if mode == "bare" and i == 0:  # the bare prompt, run whole
        return list(range(len(row.ids)))
    return []


@dataclass
class Readout:
    """What the loss reads from a pass: the target tokens' slots, and the KL slot (the last)."""

    slots: torch.Tensor  # (T + 1,)
    target_ids: torch.Tensor  # (T,)
    owner: torch.Tensor  # (T,) which rewriting row each target token belongs to
    n_rewrite: int

    @classmethod
    def of(cls, packed: PackedPass, rows: list[Row]) -> Readout:
        *rewrite, kl = rows
        at = [(i, packed.slot(i, j), t) for i, r in enumerate(rewrite) for j, t in r.targets]
        slots = [s for _, s, _ in at] + [packed.slot(len(rewrite), kl.subject)]
        return cls(
            torch.tensor(slots),
            torch.tensor([t for _, _, t in at]),
            torch.tensor([i for i, _, _ in at]),
            len(rewrite),
        )

    def read(self, packed: PackedPass, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean NLL of the target per rewriting row, the bare prompt first; the log-probs
        after the KL prompt's subject, (1, vocab)). Every slot goes through the head in one
        call: its matmul, too, is bound by reading the (vocab, d) weight."""
        log_probs = packed.log_probs(hidden[self.slots.to(hidden.device)])
        device = log_probs.device
        logp = log_probs[:-1].gather(1, self.target_ids.to(device)[:, None])[:, 0]
        owner = self.owner.to(device)
        total = torch.zeros(self.n_rewrite, device=device).index_add(0, owner, -logp)
        count = torch.zeros(self.n_rewrite, device=device).index_add(
            0, owner, torch.ones_like(logp)
        )
        return total / count, log_probs[-1:]


def _value_loss(
    nll_each: torch.Tensor,
    kl_log_probs: torch.Tensor,
    kl_ref: torch.Tensor,
    delta: torch.Tensor,
    z: torch.Tensor,
    hp: HParams,
) -> torch.Tensor:
    """NLL (the mean, ``v_bare_weight`` of it the bare prompt's) + kl_factor * KL(edited ||
    unedited) after the KL prompt + weight decay."""
    kl = F.kl_div(kl_ref, kl_log_probs, log_target=True, reduction="batchmean")
    decay = hp.v_weight_decay * delta.norm() / z.norm() ** 2
    w = hp.v_bare_weight
    nll = nll_each.mean() if w == 0 else w * nll_each[0] + (1 - w) * nll_each.mean()
    return nll + hp.kl_factor * kl.to(nll_each.device) + decay.to(nll_each.device)


def _reached(loss: torch.Tensor, nll_each: torch.Tensor, hp: HParams) -> bool:
    """v_stop "loss": ROME's stop, the total loss below v_stop_loss. "target": the target's
    mean token probability is v_stop_prob or more on the bare prompt (row 0) and on average
    over the other prompts (templated, and phrasings), whatever the KL term says. "every": it
    is v_stop_prob or more on each prompt."""
    if hp.v_stop == "loss":
        return loss.item() < hp.v_stop_loss
    prob = torch.exp(-nll_each)  # (n_rewrite,)
    if hp.v_stop == "every":
        return prob.min().item() >= hp.v_stop_prob
    return prob[0].item() >= hp.v_stop_prob and prob.mean().item() >= hp.v_stop_prob
