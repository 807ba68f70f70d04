"""The rank-one update: solve for the left vector, form delta W, apply it, revert it, save it.

Everything here is fp32 on the edited module's device; only ``apply_update`` casts, once, to
the weight's own dtype. W is handled as (d_out, d_in) whatever its storage layout
(GPT-2's Conv1D stores (d_in, d_out)).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rrome_cli.models.families import weight_as_out_in


class KeyCovariance:
    """Solves (C + lambda I) x = k by a Cholesky factor computed once per layer.

    ``mom2=None`` means C = I (``mom2_adjustment: false``, EasyEdit's default): x = k.
    """

    def __init__(
        self, mom2: torch.Tensor | None, ridge: float = 0.0, device: torch.device | None = None
    ):
        self.identity = mom2 is None
        self.ridge = 0.0
        if mom2 is None:
            return
        # One d x d copy of C and its factor: the ridge goes onto the copy's diagonal in place.
        c = mom2.to(device=device, dtype=torch.float32, copy=True)
        scale = c.diagonal().mean().item()
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

    def solve(self, k: torch.Tensor) -> torch.Tensor:
        """C^-1 k for k of shape (d_in,), fp32."""
        if self.identity:
            return k.clone()
        factor = self.factor.to(k.device)
        return torch.cholesky_solve(k[:, None], factor)[:, 0]


def left_vector(cov: KeyCovariance, k_star: torch.Tensor) -> tuple[torch.Tensor, float]:
    """u = C^-1 k* / ||C^-1 k*|| and the denominator k*^T C^-1 k* (a guardrail figure)."""
    c_inv_k = cov.solve(k_star)
    return c_inv_k / c_inv_k.norm(), float(k_star @ c_inv_k)


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


def save_patches(path: Path, patches: list[Patch]) -> None:
    """All patches in one safetensors file, written atomically; layout in the metadata."""
    tensors, meta = {}, []
    for i, p in enumerate(patches):
        tensors[f"{i}.left"] = p.left.detach().float().cpu().contiguous()
        tensors[f"{i}.right"] = p.right.detach().float().cpu().contiguous()
        meta.append({"layer": p.layer, "module": p.module, "dtype": p.dtype, "request": p.request})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"rrome_patches": json.dumps(meta)})
    tmp.replace(path)


def load_patches(path: Path) -> list[Patch]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("rrome_patches", "null"))
    if not isinstance(meta, list):
        raise ValueError(f"{path}: not an rrome patches file (no rrome_patches metadata)")
    tensors = load_file(str(path))
    return [
        Patch(
            m["layer"],
            m["module"],
            tensors[f"{i}.left"],
            tensors[f"{i}.right"],
            m["dtype"],
            m.get("request", ""),
        )
        for i, m in enumerate(meta)
    ]
