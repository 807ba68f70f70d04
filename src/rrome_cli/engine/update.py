"""The rank-one update: solve for the left vector, form delta W, apply it, revert it.

Everything here is fp32 on the edited module's device; only ``apply_update`` casts, once, to
the weight's own dtype. W is handled as (d_out, d_in) whatever its storage layout
(GPT-2's Conv1D stores (d_in, d_out)). Patch files: ``rrome_cli.patches``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rrome_cli.models.families import weight_as_out_in


class KeyCovariance:
    """Solves (C + lambda I + sum_i w m k_i k_i^T / ||k_i||^2) x = k.

    C comes from the key statistics (``mom2=None`` means C = I, EasyEdit's default); its
    Cholesky factor is computed once per layer. The k_i are keys of earlier edits added by
    ``protect`` (sequential runs): each direction gets w times m, the mean eigenvalue of C, so
    that later left vectors u = C^-1 k* turn away from it and later updates leave the earlier
    edit's value alone. Protected keys join by the Woodbury identity, in float64 (n keys cost
    an (n, n) solve); once there are d_in / 4 of them (about 75 SmolLM2 edits) they are folded
    into a new factor of C + P^T P, since an (n, n) solve at every edit would grow as n^3 (2.2 s
    at 5,000 keys) while a d_in x d_in factor is made once.
    """

    def __init__(
        self, mom2: torch.Tensor | None, ridge: float = 0.0, device: torch.device | None = None
    ):
        self.identity = mom2 is None  # the key statistics are I (protected keys may join)
        self.ridge = 0.0
        self.mean_eigenvalue = 1.0
        self.factor: torch.Tensor | None = None  # None: I, nothing folded in yet
        self.protected: list[torch.Tensor] = []  # sqrt(w m) k_i / ||k_i||, (d_in,) float64
        self.c_inv_protected: list[torch.Tensor] = []  # C^-1 of each, (d_in,) float64
        self.held = 0  # keys protected so far, folded in or not
        self.d_in: int | None = None  # known once a key is protected
        if mom2 is None:
            return
        # One d x d copy of C and its factor: the ridge goes onto the copy's diagonal in place.
        c = mom2.to(device=device, dtype=torch.float32, copy=True)
        scale = c.diagonal().mean().item()
        self.mean_eigenvalue = scale
        self.ridge = ridge * scale
        c.diagonal().add_(self.ridge)
        factor, info = torch.linalg.cholesky_ex(c)
        while info.item() != 0:  # not positive definite in fp32: strengthen the ridge
            extra = max(self.ridge * 9, 1e-8 * scale)
            c.diagonal().add_(extra)
            self.ridge += extra
            factor, info = torch.linalg.cholesky_ex(c)
        del c
        self.factor = factor  # lower triangular L, (C + lambda I) = L L^T

    def protect(self, key: torch.Tensor, weight: float) -> None:
        """Add ``weight`` m k k^T / ||k||^2 to C: later solves turn away from ``key``."""
        if weight <= 0:
            return
        row = key.double() * math.sqrt(weight * self.mean_eigenvalue) / key.double().norm()
        self.protected.append(row)
        self.held, self.d_in = self.held + 1, len(row)
        if len(self.protected) >= max(1, len(row) // 4):
            self._fold()  # a new factor: no C^-1 row to keep for Woodbury
        else:
            self.c_inv_protected.append(self._solve_base(row.float()).double())

    @property
    def fill(self) -> float:
        """Protected keys per key dimension. Past 1 no update can leave every protected key
        alone, and earlier edits wear faster (docs/experiments/sequential.md)."""
        return self.held / self.d_in if self.d_in else 0.0

    def _fold(self) -> None:
        """The protected keys into the factor: L' L'^T = L L^T + P^T P (float64, kept fp32)."""
        p = torch.stack(self.protected)  # (n, d_in)
        if self.factor is None:
            c = torch.eye(p.shape[1], dtype=torch.float64, device=p.device)
        else:
            factor = self.factor.to(p.device, torch.float64)
            c = factor @ factor.T
        c += p.T @ p
        self.factor = torch.linalg.cholesky(c).float()
        self.protected, self.c_inv_protected = [], []

    def _solve_base(self, k: torch.Tensor) -> torch.Tensor:
        """(C + lambda I)^-1 k for k of shape (d_in,) or (n, d_in), fp32 (C with the protected
        keys folded in so far)."""
        if self.factor is None:
            return k.clone()
        factor = self.factor.to(k.device)
        # L y = k, then L^T x = y: the same x as cholesky_solve, which copies the (d, d) factor
        # at every call; those copies, between the small keys a sequential run keeps, fragment
        # the heap (about d x d bytes lost per protected key: 47 MiB an edit on SmolLM2)
        y = torch.linalg.solve_triangular(factor, k.reshape(-1, k.shape[-1]).T, upper=False)
        return torch.linalg.solve_triangular(factor.mT, y, upper=True).T.reshape(k.shape)

    def solve(self, k: torch.Tensor) -> torch.Tensor:
        """C^-1 k for k of shape (d_in,) or (n, d_in) (one solve for every row), fp32 (C with
        any protected keys)."""
        x = self._solve_base(k)
        if not self.protected:
            return x
        # Woodbury, P = rows of protected keys (n, d): (C + P^T P)^-1 k
        #   = x - Z^T (I + P Z^T)^-1 P x, with x = C^-1 k and Z = rows of C^-1 p_i.
        p = torch.stack(self.protected).to(k.device)  # (n, d_in)
        z = torch.stack(self.c_inv_protected).to(k.device)  # (n, d_in)
        inner = torch.eye(len(p), dtype=p.dtype, device=p.device) + p @ z.T  # (n, n)
        xs = x.reshape(-1, x.shape[-1]).double()  # (m, d_in)
        y = torch.linalg.solve(inner, p @ xs.T)  # (n, m)
        return (xs - (z.T @ y).T).float().reshape(x.shape)


def left_vector(cov: KeyCovariance, k_star: torch.Tensor) -> tuple[torch.Tensor, float]:
    """u = C^-1 k* / ||C^-1 k*|| and the denominator k*^T C^-1 k* (a guardrail figure)."""
    u, denominators = left_vectors(cov, k_star[None])
    return u[0], denominators[0]


def left_vectors(cov: KeyCovariance, k_stars: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """``left_vector`` for each row of ``k_stars`` (n, d_in), in one solve: (n, d_in) and n
    denominators."""
    c_inv_k = cov.solve(k_stars)
    denominators = (k_stars * c_inv_k).sum(-1)
    return c_inv_k / c_inv_k.norm(dim=-1, keepdim=True), denominators.tolist()


def right_vector(delta: torch.Tensor, k_ref: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """right = (v* - W k_ref) / (k_ref . u), where v* = W k_ref + delta, so W' k_ref = v*."""
    return delta / (k_ref @ u)


@dataclass
class Patch:
    """One applied rank-one edit: W' = W + right u^T. Enough to re-apply it on the base model."""

    layer: int
    module: str
    left: torch.Tensor  # u, (d_in,) fp32
    right: torch.Tensor  # (d_out,) fp32
    dtype: str  # the weight's dtype, e.g. "torch.bfloat16"
    request: str = ""  # which request made it (case id or source)
    # (n, d_in): k* (the templates' mean key), the bare prompt's key and its keys after the
    # subject: where the edit writes and where it is read; what later edits protect
    # (``protect_weight``). None: not kept.
    keys: torch.Tensor | None = None

    def delta_w(self, device: torch.device) -> torch.Tensor:
        return torch.outer(self.right.to(device), self.left.to(device))  # (d_out, d_in)


@torch.no_grad()
def apply_update(module: nn.Module, delta_w: torch.Tensor) -> torch.Tensor:
    """W <- (W.float() + delta_w).to(W.dtype), in place; returns the old W (for an exact revert)."""
    w = weight_as_out_in(module)  # a view, (d_out, d_in)
    if not torch.isfinite(delta_w).all():
        raise FloatingPointError("refusing to apply a non-finite update")
    original = w.detach().clone()
    w.copy_((w.float() + delta_w.to(w.device)).to(w.dtype))
    return original


@torch.no_grad()
def restore_weight(module: nn.Module, original: torch.Tensor) -> None:
    """Put back the weight saved by ``apply_update``: bit for bit."""
    weight_as_out_in(module).copy_(original)


def apply_patch(model: nn.Module, patch: Patch) -> torch.Tensor:
    module = model.get_submodule(patch.module)
    return apply_update(module, patch.delta_w(module.weight.device))


def revert_patch(model: nn.Module, patch: Patch) -> None:
    """W <- (W.float() - delta W).to(W.dtype): undoes ``apply_patch`` on a model that no longer
    holds the original W, to within one rounding of the weight's dtype. (In a run, edits are
    reverted from the saved W instead, bit for bit.)"""
    module = model.get_submodule(patch.module)
    apply_update(module, -patch.delta_w(module.weight.device))


@contextmanager
def rows_patched(model: nn.Module, row_patches: Sequence[Sequence[Patch]]) -> Iterator[None]:
    """Forwards in which row b of the batch runs on the model that ``apply_patch`` of each of
    ``row_patches[b]`` would make (the same weights, bit for bit), while the weights stay as
    they are: N edited models in one pass. Rows with no patches run on the model as is."""
    handles = []
    for name in sorted({p.module for patches in row_patches for p in patches}):
        groups: dict[tuple[int, ...], list[int]] = {}  # the row's patches here -> its rows
        for row, patches in enumerate(row_patches):
            own = tuple(i for i, p in enumerate(patches) if p.module == name)
            if own:
                groups.setdefault(tuple((row, i) for i in own), []).append(row)
        edits = [([row_patches[r][i] for r, i in key], rows) for key, rows in groups.items()]
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(_patched_rows_hook(edits)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _patched_rows_hook(edits: list[tuple[list[Patch], list[int]]]) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        x, out = args[0], out.clone()
        for patches, rows in edits:
            w = weight_as_out_in(module).detach()
            for p in patches:  # as apply_update makes it: each edit cast to W's dtype in turn
                w = (w.float() + p.delta_w(w.device)).to(w.dtype)
            at = torch.tensor(rows, device=x.device)
            out[at] = _linear(module, w, x[at])
        return out

    return hook


def _linear(module: nn.Module, w_out_in: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``module``'s forward (an nn.Linear or GPT-2's Conv1D) with W replaced by ``w_out_in``."""
    return F.linear(x, w_out_in, module.bias)
