"""The value v*: optimise delta, added to the MLP output at the subject's last token (with
``v_realized_delta: suffix``, at every later position too, scaled as the update will add it).

Loss = mean NLL of the target over all templated prompts and relation phrasings (teacher forcing;
         with v_bare_weight w: w * the bare prompt's + (1 - w) * that mean)
     + kl_factor * KL(edited || unedited) of the next token after the subject in "{subject} is a"
     + v_weight_decay * ||delta|| / ||z||^2          (z: the unedited MLP output, bare prompt)
Adam on delta only; delta is clamped to clamp_norm_factor * ||z|| after each step.

Nothing below layer l, nor at positions before the subject's last token, depends on delta. So
each prompt is split at its subject's last token: the prefix runs once per edit into a KV cache,
and each optimisation step runs only the short suffix (subject token, rest of prompt, target).
The decoder blocks below layer l see no delta either: their output at the suffix is computed on
the first pass and the later passes start above them. Logits are computed only where the loss
reads them, in fp32. The templated prompts share one suffix (the prompt after the subject); a
request's other phrasings do not, so they run as a second batch rather than pad the first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from rrome_cli.config import HParams
from rrome_cli.engine.hooks import blocks_replaced, capture_input, edit_output
from rrome_cli.engine.keys import Templated
from rrome_cli.engine.positions import (
    encode_pair,
    pad_id,
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
class Batch:
    """Prompts split at the subject's last token; the suffix starts at column ``width_prefix``."""

    prefix_ids: torch.Tensor  # (B, P) right-padded
    prefix_mask: torch.Tensor  # (B, P)
    suffix_ids: torch.Tensor  # (B, S) right-padded; column 0 is the subject's last token
    suffix_mask: torch.Tensor  # (B, S)
    suffix_pos: torch.Tensor  # (B, S) true positions of the suffix tokens
    target_rows: torch.Tensor  # (T,) row of each target token to predict
    target_cols: torch.Tensor  # (T,) suffix column whose logits predict it
    target_ids: torch.Tensor  # (T,)
    n_rewrite: int  # rows 0..n_rewrite-1 are rewriting prompts; a last row is the KL prompt


def build_batch(
    tok: PreTrainedTokenizerBase,
    prompts: list[Templated],
    target: str,
    subject: str,
    device: torch.device,
    with_kl: bool = True,
    whole: bool = False,
) -> Batch:
    """``whole``: no prefix; every prompt runs from its first token in the suffix pass (column
    0 is then not the subject's token: only a ``read`` share adds delta to such a batch)."""
    rows: list[tuple[list[int], int]] = []  # (token ids fed to the model, where the suffix starts)
    targets: list[tuple[int, int, int]] = []  # (row, index of the token, token id)
    prefix = special_prefix(tok)
    for r, p in enumerate(prompts):
        # the same tokens evaluation scores: prompt + " " + target, read as a continuation
        full = encode_pair(tok, p.text, target, prefix)
        s = 0 if whole else full.subject_last(p.subject_end)
        answer = range(full.answer_start, len(full.input_ids))
        rows.append((full.input_ids[:-1], s))  # teacher forcing: the last target token is not fed
        targets += [(r, j, full.input_ids[j]) for j in answer]
    if with_kl:
        kl = kl_prompt(tok, subject)
        rows.append((kl.tokens.ids, kl.subject_last))
    width_p = max(s for _, s in rows)
    width_s = max(len(ids) - s for ids, s in rows)
    pad = pad_id(tok)
    prefix_ids = torch.full((len(rows), width_p), pad, dtype=torch.long)
    prefix_mask = torch.zeros_like(prefix_ids)
    suffix_ids = torch.full((len(rows), width_s), pad, dtype=torch.long)
    suffix_mask = torch.zeros_like(suffix_ids)
    suffix_pos = torch.zeros_like(suffix_ids)
    for r, (ids, s) in enumerate(rows):
        prefix_ids[r, :s] = torch.tensor(ids[:s], dtype=torch.long)
        prefix_mask[r, :s] = 1
        suffix_ids[r, : len(ids) - s] = torch.tensor(ids[s:], dtype=torch.long)
        suffix_mask[r, : len(ids) - s] = 1
        suffix_pos[r] = torch.arange(s, s + width_s)
    t_rows = torch.tensor([r for r, _, _ in targets])
    t_cols = torch.tensor([j - 1 - rows[r][1] for r, j, _ in targets])
    t_ids = torch.tensor([t for _, _, t in targets])
    to = {"device": device}
    return Batch(
        prefix_ids.to(**to),
        prefix_mask.to(**to),
        suffix_ids.to(**to),
        suffix_mask.to(**to),
        suffix_pos.to(**to),
        t_rows.to(**to),
        t_cols.to(**to),
        t_ids.to(**to),
        len(prompts),
    )


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


class SuffixRunner:
    """Runs the suffix of every prompt on top of a once-computed prefix KV cache.

    ``blocks_below``: names of the decoder blocks under the edited layer, in order. delta does
    not reach them, so their output at the suffix is computed on the first pass and reused.
    """

    def __init__(
        self, model: PreTrainedModel, batch: Batch, blocks_below: list[str] | None = None
    ) -> None:
        self.model, self.batch = model, batch
        self.blocks_below = blocks_below or []
        self.below_out: torch.Tensor | None = None  # (B, S, d) once the first pass ran
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        self.cache = DynamicCache()  # plain layers: our prompts are far shorter than any window
        if batch.prefix_ids.shape[1] > 0:
            # A row whose prefix is empty would be fully masked (NaN attention); let it see its
            # first slot here only. The suffix pass masks that slot, so nothing reads it.
            mask = batch.prefix_mask.clone()
            mask[mask.sum(1) == 0, 0] = 1
            with torch.no_grad():
                self.base(
                    input_ids=batch.prefix_ids,
                    attention_mask=mask,
                    cache=self.cache,
                    use_cache=True,
                )
        # The prefix keys and values of every layer, put back after each suffix pass.
        self.prefix_kv = [(layer.keys, layer.values) for layer in self.cache.layers]
        self.prefix_len = batch.prefix_ids.shape[1]
        self.mask = torch.cat([batch.prefix_mask, batch.suffix_mask], dim=1)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def hidden(self) -> torch.Tensor:
        """Final hidden states of the suffix tokens: (B, S, d)."""
        with self._blocks_below():
            return self._suffix_pass()

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

    def _suffix_pass(self) -> torch.Tensor:
        b = self.batch
        if self.prefix_len == 0:
            # Nothing cached to reuse (every subject is its prompt's first token). Running with
            # self.cache would leave this pass's keys in it: prefix_kv is empty, so nothing
            # would drop them, and the next pass would attend to them.
            out = self.base(
                input_ids=b.suffix_ids,
                attention_mask=self.mask,
                position_ids=b.suffix_pos,
                use_cache=False,
            )
            return out.last_hidden_state
        out = self.base(
            input_ids=b.suffix_ids,
            attention_mask=self.mask,
            position_ids=b.suffix_pos,
            cache=self.cache,
            use_cache=True,
        )
        for layer, (keys, values) in zip(self.cache.layers, self.prefix_kv, strict=True):
            layer.keys, layer.values = keys, values  # drop the suffix; reuse the prefix
        return out.last_hidden_state

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 log-softmax of the logits of the final hidden states ``h`` (N, d): (N, vocab)."""
        logits = self.head(h.to(execution_device(self.head))).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.log_softmax(logits, dim=-1)


def _nll_per_prompt(logp_targets: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean NLL of the target tokens of each rewriting prompt: (n_rewrite,)."""
    rows = batch.target_rows.to(logp_targets.device)
    total = torch.zeros(batch.n_rewrite, device=logp_targets.device).index_add(
        0, rows, -logp_targets
    )
    count = torch.zeros(batch.n_rewrite, device=logp_targets.device).index_add(
        0, rows, torch.ones_like(logp_targets)
    )
    return total / count


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

    ``phrasings``: other phrasings of the relation, optimised alongside in a batch of their own
    (their suffixes differ in length from the templates', which all share the prompt's).
    ``row_scale`` (n_prompts + n_phrasings + 1,): delta reaches row i as ``row_scale[i] *
    delta`` (prompts, phrasings, then the KL prompt). None adds the same delta everywhere, as
    ROME does; the engine passes (u . k_i) / (u . k_ref) under ``v_realized_delta``, which is
    what the rank-one update will really add at each prompt's subject token.
    ``read`` (d_in,), u / (u . k_ref): delta reaches every suffix column c of every row as
    (read . k_c) delta, the rank-one update's own effect there (``v_realized_delta: suffix``),
    or only the subject's column and the fed answer tokens' (``answer``); ``row_scale`` is then
    unused. ``bare``: the bare prompt also runs whole, uncached, with every position's share
    (its loss and stop test read the edited model itself); the other prompts as under true.
    """
    start = time.perf_counter()
    phrasings = phrasings or []
    mlp, rewrite = model.get_submodule(names.mlp(layer)), model.get_submodule(names.rewrite(layer))
    mlp_device = execution_device(rewrite)
    n_rows = len(prompts) + len(phrasings) + 1
    scale = torch.ones(n_rows) if row_scale is None else row_scale
    scale = scale.to(device=mlp_device, dtype=torch.float32)[:, None, None]  # (rows, 1, 1)
    at_prompts, at_phrasings = len(prompts), len(prompts) + len(phrasings)
    device, below = input_device(model), [names.layer(i) for i in range(layer)]

    with frozen(model):
        main = build_batch(tok, prompts, target, subject, device)  # the KL prompt last
        read = None if read is None else read.to(device=mlp_device, dtype=torch.float32)

        def columns(batch: Batch) -> torch.Tensor | None:
            return _answer_columns(batch) if hp.v_realized_delta == "answer" else None

        # "bare": the cached groups take delta as under true; the bare prompt runs again whole,
        # so that the update's share reaches its positions before the subject too
        exact = hp.v_realized_delta == "bare"
        spread = None if exact else read  # the share of the cached groups' later columns
        runner = SuffixRunner(model, main, below)
        first = _Group(main, runner, _rows(scale, at_prompts), spread, columns(main))
        groups = [first]
        if exact:
            bare = build_batch(tok, prompts[:1], target, subject, device, False, whole=True)
            groups = [_Group(bare, SuffixRunner(model, bare, below), scale[:1], read), first]
            first.skip_rows = 1  # its cached bare prompt gives way to the whole one
        if phrasings:
            batch = build_batch(tok, phrasings, target, subject, device, with_kl=False)
            runner = SuffixRunner(model, batch, below)
            rows = scale[at_prompts:at_phrasings]
            groups.append(_Group(batch, runner, rows, spread, columns(batch)))
        d_out = weight_as_out_in(rewrite).shape[0]
        delta = torch.zeros(d_out, device=mlp_device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.v_lr, betas=(0.9, hp.v_adam_beta2))
        steps, step_times = 0, []
        for _ in range(hp.v_num_grad_steps):
            t_step = time.perf_counter()
            for group in groups:
                group.forward(mlp, rewrite, delta)
            nll_each, kl_log_probs = _read_out(groups, first)
            if steps == 0:
                # delta is still 0: this pass is the unedited model, the KL reference and z
                kl_ref = kl_log_probs.detach()
                z = first.z  # (d_out,) bare prompt, subject's last token
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


def _rows(scale: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """The main batch's row scales: its prompts', then the KL prompt's (the last)."""
    return torch.cat([scale[:n_prompts], scale[-1:]])


@dataclass
class _Group:
    """One padded batch of the value's prompts: its runner, and the scale of delta per row."""

    batch: Batch
    runner: SuffixRunner
    scale: torch.Tensor  # (B, 1, 1) fp32 on the MLP's device
    read: torch.Tensor | None = None  # (d_in,) u / (u . k_ref): each key's share of delta
    columns: torch.Tensor | None = None  # (B, S, 1) with read: 1 where delta's share goes
    hidden: torch.Tensor | None = None  # (B, S, d) of the last pass
    z: torch.Tensor | None = None  # (d_out,) MLP output at row 0's subject on the first pass
    share: torch.Tensor | None = None  # (B, S, 1) share of delta at every suffix column
    skip_rows: int = 0  # leading rows whose NLL another group gives

    def forward(self, mlp: torch.nn.Module, rewrite: torch.nn.Module, delta: torch.Tensor) -> None:
        def add_delta(out: torch.Tensor) -> torch.Tensor:
            # (B, S, d) in the model's dtype; delta (fp32) joins at column 0 of every row, or
            # with ``read`` at every column, as much as the rank-one update will add there
            if self.z is None:  # the first pass runs at delta = 0: the unedited output
                self.z = out[0, 0].detach().float().to(delta.device)
            if self.share is not None:
                return out + (self.share * delta).to(out.dtype)
            scaled = (self.scale * delta).to(out.dtype)
            return torch.cat([out[:, :1] + scaled, out[:, 1:]], dim=1)

        def keep_share(keys: torch.Tensor) -> None:
            # (B, S, d_in): the rewritten module's input, which delta never reaches, so the
            # share is taken on the first pass and kept
            self.share = (keys.detach().float().to(self.read.device) @ self.read)[..., None]
            if self.columns is not None:
                self.share = self.share * self.columns.to(self.share.device)

        with ExitStack() as stack:
            if self.read is not None and self.share is None:
                stack.enter_context(capture_input(rewrite, keep_share))
            stack.enter_context(edit_output(mlp, add_delta))
            self.hidden = self.runner.hidden()

    def at_targets(self) -> torch.Tensor:
        """Final hidden states where the target tokens are predicted: (T, d)."""
        b, device = self.batch, self.hidden.device
        return self.hidden[b.target_rows.to(device), b.target_cols.to(device)]

    def at_kl(self) -> torch.Tensor:
        """Final hidden state after the KL prompt's subject (the batch's last row): (1, d)."""
        return self.hidden[self.batch.n_rewrite, :1]

    def nll_each(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Mean NLL of the target per rewriting prompt, given the log-probs (T, vocab) at
        ``at_targets``: (n_rewrite - skip_rows,)."""
        b = self.batch
        logp_target = log_probs.gather(1, b.target_ids.to(log_probs.device)[:, None])[:, 0]
        return _nll_per_prompt(logp_target, b)[self.skip_rows :]


def _answer_columns(batch: Batch) -> torch.Tensor:
    """(B, S, 1): 1 at column 0 (the subject's last token) and at the fed answer tokens."""
    rows, width = batch.suffix_ids.shape
    first = torch.full((rows,), width, dtype=torch.long)
    first.scatter_reduce_(0, batch.target_rows.cpu(), batch.target_cols.cpu() + 1, reduce="amin")
    cols = torch.arange(width)[None]
    return ((cols == 0) | (cols >= first[:, None])).float()[..., None]


def _read_out(groups: list[_Group], main: _Group) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL of the target per rewriting prompt, the bare prompt first; the log-probs after
    the KL prompt's subject, (1, vocab), read from ``main``, the templated prompts' group).

    Every group's rows go through the head in one call: at a few dozen rows its matmul is bound
    by reading the (vocab, d) weight, so each further call, forward and backward, costs about
    as much as all the rows together (SmolLM2: ~20 ms a step for the KL row on its own)."""
    picked = [g.at_targets() for g in groups] + [main.at_kl()]
    log_probs = main.runner.log_probs(torch.cat(picked)).split([len(p) for p in picked])
    nll_each = torch.cat([g.nll_each(lp) for g, lp in zip(groups, log_probs[:-1], strict=True)])
    return nll_each, log_probs[-1]


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
