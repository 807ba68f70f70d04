"""The value v*: optimise delta, added to the MLP output at the subject's last token (with
``v_realized_delta: bare``, scaled as the update will add it there, and at every position of
the bare prompt).

Loss = mean NLL of the target over all templated prompts and relation phrasings (teacher forcing)
     + kl_factor * KL(edited || unedited) of the next token after the subject in "{subject} is a"
     + v_weight_decay * ||delta|| / ||z||^2          (z: the unedited MLP output, bare prompt)
Adam on delta only; delta is clamped to clamp_norm_factor * ||z|| after each step.

Each prompt is a ``Row`` of the packed pass (engine/packing.py): what delta cannot reach runs
once into a KV cache, and every row goes through the model in one call a step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rrome_cli.config import V_STOP_LOSS, HParams
from rrome_cli.engine.keys import Templated
from rrome_cli.engine.packing import DeltaSite, PackedPass, Readout, Row, delta_site_of
from rrome_cli.engine.positions import (
    encode_pair,
    special_prefix,
    subject_last_token,
    tokenise,
)
from rrome_cli.models.families import ModuleNames, execution_device, weight_as_out_in

KL_TEMPLATE = "{} is a"


def kl_prompt(tok: PreTrainedTokenizerBase, subject: str) -> Templated:
    """The KL prompt "{subject} is a", its subject located (the batch's last row)."""
    text = KL_TEMPLATE.replace("{}", subject)
    tokens = tokenise(tok, text)
    return Templated(text, tokens, len(subject), subject_last_token(tokens, len(subject)))


@dataclass
class ValueSpec:
    """What one request's delta is fitted to (``optimise_delta``'s question)."""

    prompts: list[Templated]  # the templated prompts; prompts[0] is the bare prompt ("{}")
    target: str
    subject: str
    phrasings: list[Templated] = field(default_factory=list)  # the relation's other phrasings
    # (n_prompts + n_phrasings + 1,): row i (the KL prompt last) gets row_scale[i] * delta at
    # its subject's last token; None: delta everywhere, as ROME
    row_scale: torch.Tensor | None = None
    # (d_in,) u / (u . k_ref): the bare prompt, run whole, gets (read . k) delta at each
    # position whose key is k; None: the bare prompt as the other prompts
    read: torch.Tensor | None = None


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


def optimise_delta(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    names: ModuleNames,
    layer: int,
    hp: HParams,
    spec: ValueSpec,
) -> ValueResult:
    """Find delta for the MLP output at ``layer``: ROME's compute_v for ``spec``, one job of a
    ``ValueBatch``. The engine passes (u . k_i) / (u . k_ref) as ``spec.row_scale`` and u /
    (u . k_ref) as ``spec.read`` under ``v_realized_delta: bare``: what the rank-one update
    will really add at each prompt, so the bare prompt's loss and stop test read the edited
    model itself."""
    batch = ValueBatch(model, names, layer, hp)
    batch.add(value_job(tok, None, spec, hp, batch.d_out, batch.device))
    while True:
        done = batch.step()
        if done:
            return done[0].result()


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


@dataclass
class ValueJob:
    """One request's value optimisation while it is in flight: its rows, how delta reaches
    them, its own delta and Adam state. ``tag``: the caller's name for it (e.g. its index)."""

    tag: object
    rows: list[Row]  # the rewriting rows (bare prompt first), then the KL row
    scale: torch.Tensor  # (len(rows),) delta's share at each row's subject's last token
    read: torch.Tensor | None  # (d_in,) u / (u . k_ref) under v_realized_delta: bare
    delta: torch.Tensor  # (d_out,) fp32 leaf on the MLP's device
    opt: torch.optim.Optimizer
    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    step_times: list[float] = field(default_factory=list)
    kl_ref: torch.Tensor | None = None  # (1, vocab) after the KL prompt at delta = 0
    z: torch.Tensor | None = None  # (d_out,) the unedited MLP output, bare prompt's subject
    max_norm: torch.Tensor | None = None
    loss: torch.Tensor | None = None  # of the job's last pass
    nll_each: torch.Tensor | None = None  # (n_rewrite,) of the job's last pass

    def result(self) -> ValueResult:
        assert self.loss is not None and self.nll_each is not None and self.z is not None
        return ValueResult(
            self.delta.detach(),
            self.z,
            self.loss.item(),
            self.nll_each.mean().item(),
            torch.exp(-self.nll_each).mean().item(),
            self.steps,
            time.perf_counter() - self.started,
            self.step_times,
        )


def value_job(
    tok: PreTrainedTokenizerBase,
    tag: object,
    spec: ValueSpec,
    hp: HParams,
    d_out: int,
    device: torch.device,
) -> ValueJob:
    """The job of ``spec``'s value optimisation: its rows, delta at 0, Adam."""
    rows = [
        prompt_row(tok, p, spec.target, whole=hp.v_realized_delta == "bare" and i == 0)
        for i, p in enumerate(spec.prompts)
    ]
    rows += [prompt_row(tok, p, spec.target) for p in spec.phrasings]
    rows.append(kl_row(tok, spec.subject))  # the last row
    row_scale, read = spec.row_scale, spec.read
    scale = torch.ones(len(rows)) if row_scale is None else row_scale.float().cpu()
    delta = torch.zeros(d_out, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    return ValueJob(tag, rows, scale, None if read is None else read.float(), delta, opt)


class ValueBatch:
    """Value optimisations of independent requests in flight together (continuous batching).

    Every live job's rows go through one packed forward/backward a step; a row sees only its
    own prefix and tokens, and carries only its own job's delta, so the summed loss gives each
    delta exactly its own gradient, and each job keeps its own Adam state and stop test. A job
    leaves when it stops; ``add`` brings in the next. A batch of one is ``optimise_delta``.
    """

    def __init__(self, model: PreTrainedModel, names: ModuleNames, layer: int, hp: HParams) -> None:
        self.model, self.hp = model, hp
        self.mlp = model.get_submodule(names.mlp(layer))
        self.rewrite = model.get_submodule(names.rewrite(layer))
        self.device = execution_device(self.rewrite)
        self.d_out = weight_as_out_in(self.rewrite).shape[0]
        self.blocks_below = [names.layer(i) for i in range(layer)]
        self.jobs: list[ValueJob] = []
        self._pass: tuple[PackedPass, DeltaSite, Readout] | None = None  # for these jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, job: ValueJob) -> None:
        self.jobs.append(job)
        self._pass = None  # another set of rows: lay them out again

    def clear(self) -> list[ValueJob]:
        """Drop every job in flight (after a failed step); returns them."""
        jobs, self.jobs, self._pass = self.jobs, [], None
        return jobs

    def step(self) -> list[ValueJob]:
        """One forward over every live job, the stop tests, one backward and each live job's
        Adam step; returns the jobs that finished (stopped, or out of steps), now removed."""
        t_step = time.perf_counter()
        if self._pass is None:
            self._pass = self._lay_out()
        packed, site, readout = self._pass
        with frozen(self.model):
            hidden = site.forward(packed, self.mlp, self.rewrite, self._deltas())
            nll_rows, kl_log_probs = readout.read(packed, hidden)
            done, live, total = [], [], None
            for j, job in enumerate(self.jobs):
                if job.kl_ref is None:  # its first pass, at delta = 0: the unedited model
                    job.kl_ref = kl_log_probs[j : j + 1].detach()
                    job.z = site.z[j]
                    job.max_norm = self.hp.clamp_norm_factor * job.z.norm()
                job.nll_each = nll_rows[readout.rows_of[j]]
                job.loss = _value_loss(
                    job.nll_each, kl_log_probs[j : j + 1], job.kl_ref, job.delta, job.z, self.hp
                )
                if _reached(job.loss, job.nll_each, self.hp):
                    done.append(job)
                else:
                    live.append(job)
                    total = job.loss if total is None else total + job.loss
            if total is not None:
                for job in live:
                    job.opt.zero_grad()
                total.backward()
        for job in live:
            job.opt.step()
            job.steps += 1
            with torch.no_grad():
                if job.delta.norm() > job.max_norm:
                    job.delta.mul_(job.max_norm / job.delta.norm())
            job.step_times.append(time.perf_counter() - t_step)
            if job.steps >= self.hp.v_num_grad_steps:
                done.append(job)
        for job in live + done:
            job.nll_each = job.nll_each.detach()
            job.loss = job.loss.detach()
        if done:
            self.jobs = [job for job in self.jobs if all(job is not d for d in done)]
            self._pass = None
        return done

    def _deltas(self) -> torch.Tensor:
        return torch.stack([job.delta for job in self.jobs])  # (jobs, d_out)

    def _lay_out(self) -> tuple[PackedPass, DeltaSite, Readout]:
        rows = [r for job in self.jobs for r in job.rows]
        packed = PackedPass(self.model, rows, self.blocks_below)
        parts = [(job.rows, job.scale, job.read) for job in self.jobs]
        site = delta_site_of(packed, parts)
        site.to(self.device)
        return packed, site, Readout.of_jobs(packed, [job.rows for job in self.jobs])


def _value_loss(
    nll_each: torch.Tensor,
    kl_log_probs: torch.Tensor,
    kl_ref: torch.Tensor,
    delta: torch.Tensor,
    z: torch.Tensor,
    hp: HParams,
) -> torch.Tensor:
    """Mean NLL + kl_factor * KL(edited || unedited) after the KL prompt + weight decay."""
    kl = F.kl_div(kl_ref, kl_log_probs, log_target=True, reduction="batchmean")
    decay = hp.v_weight_decay * delta.norm() / z.norm() ** 2
    return nll_each.mean() + hp.kl_factor * kl.to(nll_each.device) + decay.to(nll_each.device)


def _reached(loss: torch.Tensor, nll_each: torch.Tensor, hp: HParams) -> bool:
    """v_stop "loss": ROME's stop, the total loss below V_STOP_LOSS. "target": the target's
    mean token probability is v_stop_prob or more on the bare prompt (row 0) and on average
    over the other prompts (templated, and phrasings), whatever the KL term says."""
    if hp.v_stop == "loss":
        return loss.item() < V_STOP_LOSS
    prob = torch.exp(-nll_each)  # (n_rewrite,)
    return prob[0].item() >= hp.v_stop_prob and prob.mean().item() >= hp.v_stop_prob


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
