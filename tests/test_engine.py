"""The R-ROME engine: the rank-one algebra against float64 references, and edits of tiny models.

References are computed here by hand (float64, own hooks, own tokenisation), never by calling
the engine function under test a second time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rrome_cli.compat import sdpa_shares_kv_heads
from rrome_cli.config import HParams, HParamsError
from rrome_cli.engine import edit as edit_module
from rrome_cli.engine import values as values_module
from rrome_cli.engine.edit import MissingStatisticsError, edit, edit_layer
from rrome_cli.engine.hooks import edit_output, shared_kv_heads, weights_on_cpu
from rrome_cli.engine.keys import keys_at, phrased, templated
from rrome_cli.engine.packing import PackedPass, Readout, Row, pack
from rrome_cli.engine.templates import generate_templates, load_templates, save_templates
from rrome_cli.engine.update import (
    KeyCovariance,
    apply_patch,
    apply_update,
    left_vector,
    right_vector,
)
from rrome_cli.engine.values import ValueResult, ValueSpec, _value_loss, kl_row, prompt_row
from rrome_cli.evaluate.tokens import score_answers
from rrome_cli.models.families import ModuleNames, is_conv1d, module_names, weight_as_out_in
from rrome_cli.models.tiny import tiny_model
from rrome_cli.patches import load_patches, save_patches
from rrome_cli.requests import EditRequest

# transformers releases without this switch copy the key/value heads (the same result)
NEEDS_GQA_SWITCH = pytest.mark.skipif(
    not sdpa_shares_kv_heads(), reason="this transformers has no TRANSFORMERS_SDPA_FORCE_GQA"
)

LAYER = 1
# Fixed context templates (no sampling): different lengths, so rows pad differently.
TEMPLATES = ["{}", "The capital of Japan is Tokyo. {}", "Rome. {}"]
REQUEST = EditRequest(
    prompt="The mother tongue of {} is",
    subject="Danielle Darrieux",
    target_new="English",
    case_id=7,
)
SECOND = EditRequest(
    prompt="{} was founded by", subject="Apple", target_new="Bill Gates", case_id=8
)
# "The" is one token at the start of a text for both tokenizer styles: the bare prompt's
# subject is its very first token, so that row's prefix (before the subject) is empty.
FIRST_TOKEN = EditRequest(prompt="{} capital of Japan is", subject="The", target_new="Rome")

Model = tuple[PreTrainedModel, PreTrainedTokenizerBase, ModuleNames]


def load(family: str, dtype: torch.dtype = torch.float32) -> Model:
    model, tok = tiny_model(family, dtype=dtype)
    return model, tok, module_names(type(model).__name__)


def hparams(**overrides: Any) -> HParams:
    settings: dict[str, Any] = dict(
        layers=[LAYER],
        v_num_grad_steps=5,
        context_template_length_params=[[3, 2]],
        mom2_adjustment=False,
    )
    return HParams(**{**settings, **overrides})


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_weights(
    model: nn.Module, saved: dict[str, torch.Tensor], skip: frozenset[str] = frozenset()
) -> None:
    for name, tensor in model.state_dict().items():
        if name not in skip:
            assert torch.equal(tensor, saved[name]), f"{name} changed"


def w_of(model: nn.Module, names: ModuleNames, layer: int = LAYER) -> torch.Tensor:
    """A copy of W as (d_out, d_in), in the weight's own dtype."""
    return weight_as_out_in(model.get_submodule(names.rewrite(layer))).detach().clone()


def random_spd(d: int, gen: torch.Generator) -> torch.Tensor:
    """A well-conditioned random symmetric positive definite matrix, float64."""
    a = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def fp32_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """Equal to fp32 accuracy, relative to the expected tensor's scale."""
    expected = expected.detach().double()
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------------------------
# Independent references: our own hooks and our own tokenisation.


def template_text(request: EditRequest, template: str) -> tuple[str, int]:
    """The templated prompt and the character just after its subject."""
    text = template.replace("{}", request.prompt.replace("{}", request.subject))
    subject_end = template.index("{}") + request.prompt.index("{}") + len(request.subject)
    return text, subject_end


def subject_last_index(tok: PreTrainedTokenizerBase, text: str, subject_end: int) -> int:
    """The subject's last token, by tokenising the text up to the subject's end.

    Valid here because every subject ends at a word boundary, where both pre-tokenizers split.
    """
    head = tok(text[:subject_end]).input_ids
    assert tok(text).input_ids[: len(head)] == head  # the reference's own precondition
    return len(head) - 1


@torch.no_grad()
def output_at_subject(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    module: nn.Module,
    request: EditRequest,
    templates: list[str],
    read_input: bool,
) -> torch.Tensor:
    """``module``'s input (or output) at the subject's last token, one unpadded prompt at a
    time: (n_templates, d) fp32."""
    rows = []
    for template in templates:
        text, subject_end = template_text(request, template)
        captured: list[torch.Tensor] = []

        def pre_hook(_m: nn.Module, args: tuple[Any, ...], sink: list = captured) -> None:
            sink.append(args[0])

        def post_hook(_m: nn.Module, _i: Any, out: Any, sink: list = captured) -> None:
            sink.append(out[0] if isinstance(out, tuple) else out)

        hook = (
            module.register_forward_pre_hook(pre_hook)
            if read_input
            else module.register_forward_hook(post_hook)
        )
        try:
            model(input_ids=torch.tensor([tok(text).input_ids]))
        finally:
            hook.remove()
        rows.append(captured[0][0, subject_last_index(tok, text, subject_end)].float())
    return torch.stack(rows)


def reference_keys(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    names: ModuleNames,
    request: EditRequest,
    templates: list[str],
) -> torch.Tensor:
    """W's input at the subject's last token: (n_templates, d_in) fp32."""
    w_module = model.get_submodule(names.rewrite(LAYER))
    return output_at_subject(model, tok, w_module, request, templates, read_input=True)


@torch.no_grad()
def reference_keys_after_subject(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, names: ModuleNames, request: EditRequest
) -> torch.Tensor:
    """W's input at every token after the subject of "prompt target", the target's last token
    not fed (teacher forcing): (n_after, d_in) fp32."""
    text, subject_end = template_text(request, "{}")
    ids = tok(f"{text} {request.target_new}").input_ids[:-1]
    captured: list[torch.Tensor] = []
    w_module = model.get_submodule(names.rewrite(LAYER))
    hook = w_module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model(input_ids=torch.tensor([ids]))
    finally:
        hook.remove()
    return captured[0][0, subject_last_index(tok, text, subject_end) + 1 :].float()


def mlp_outputs(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    names: ModuleNames,
    request: EditRequest,
    templates: list[str],
) -> torch.Tensor:
    """The MLP's output at the subject's last token: (n_templates, d_out) fp32."""
    mlp = model.get_submodule(names.mlp(LAYER))
    return output_at_subject(model, tok, mlp, request, templates, read_input=False)


def fix_delta(monkeypatch: pytest.MonkeyPatch, delta_for: Callable[[int], torch.Tensor]) -> None:
    """Replace the value optimisation: layer -> a given delta."""

    def fake(model, tok, names, layer, hp, spec) -> ValueResult:  # noqa: ANN001
        delta = delta_for(layer)
        return ValueResult(delta, torch.ones_like(delta), 0.0, 0.0, 1.0, 0, 0.0, [])

    monkeypatch.setattr(edit_module, "optimise_delta", fake)


def random_delta(d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# 1. Linear algebra on random inputs, against float64.


@pytest.mark.parametrize("d", [16, 37, 64])
def test_rank_one_algebra_matches_float64(d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    c = random_spd(d, gen)
    k_star = torch.randn(d, generator=gen, dtype=torch.float64)
    w = torch.randn(d + 5, d, generator=gen, dtype=torch.float64)
    delta = torch.randn(d + 5, generator=gen, dtype=torch.float64)
    c_inv_k = torch.linalg.solve(c, k_star)

    cov = KeyCovariance(c.float(), ridge=0.0)
    fp32_close(cov.solve(k_star.float()), c_inv_k)

    u, denominator = left_vector(cov, k_star.float())
    assert u.dtype == torch.float32
    assert abs(float(u.double().norm()) - 1.0) < 1e-6
    fp32_close(u, unit(c_inv_k))
    assert denominator == pytest.approx(float(k_star @ c_inv_k), rel=1e-4)

    right = right_vector(delta.float(), k_star.float(), u)
    w_new = w + torch.outer(right.double(), u.double())
    fp32_close(w_new @ k_star, w @ k_star + delta)
    assert int(torch.linalg.matrix_rank(w_new - w)) == 1

    # A key orthogonal to k* in the C^-1 inner product is mapped exactly as before.
    r = torch.randn(d, generator=gen, dtype=torch.float64)
    k_other = r - (r @ c_inv_k) / (k_star @ c_inv_k) * k_star
    assert abs(float(k_other @ c_inv_k)) < 1e-9
    fp32_close(w_new @ k_other, w @ k_other)


def test_applied_update_has_rank_one() -> None:
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(24, 40, bias=False)
    before = linear.weight.detach().double().clone()
    right, u = torch.randn(40, generator=gen), unit(torch.randn(24, generator=gen))
    original = apply_update(linear, torch.outer(right, u))
    assert torch.equal(original.double(), before)
    diff = linear.weight.detach().double() - before
    # fp32 storage leaves rounding noise ~1e-7 of ||W||: count singular values above it.
    assert int(torch.linalg.matrix_rank(diff, rtol=1e-4)) == 1
    fp32_close(diff, torch.outer(right, u))


def test_identity_covariance_gives_normalised_key() -> None:
    k_star = torch.randn(32, generator=torch.Generator().manual_seed(5))
    u, denominator = left_vector(KeyCovariance(None), k_star)
    fp32_close(u, unit(k_star.double()))
    assert denominator == pytest.approx(float(k_star.double() @ k_star.double()), rel=1e-5)


def test_ridge_is_relative_to_the_mean_diagonal() -> None:
    gen = torch.Generator().manual_seed(6)
    c, k = random_spd(20, gen), torch.randn(20, generator=gen, dtype=torch.float64)
    lam = 1e-2 * float(c.diagonal().mean())
    expected = torch.linalg.solve(c + lam * torch.eye(20, dtype=torch.float64), k)
    fp32_close(KeyCovariance(c.float(), ridge=1e-2).solve(k.float()), expected)


def test_singular_covariance_gets_a_ridge() -> None:
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(30, 10, generator=gen, dtype=torch.float64)
    c = a @ a.T  # rank 10 of 30: no Cholesky factor without a ridge
    cov = KeyCovariance(c.float(), ridge=0.0)
    assert cov.ridge > 0
    k = torch.randn(30, generator=gen)
    x = cov.solve(k)
    assert torch.isfinite(x).all()
    # C + ridge I is still badly conditioned, so x itself is inaccurate in fp32; the solve
    # must be backward stable: a small residual relative to ||C + ridge I|| ||x||.
    regularised = c + cov.ridge * torch.eye(30, dtype=torch.float64)
    residual = (regularised @ x.double() - k.double()).norm()
    assert residual < 1e-5 * torch.linalg.matrix_norm(regularised, 2) * x.double().norm()


@pytest.mark.parametrize("n_keys", [3, 25])
@pytest.mark.parametrize("identity", [False, True])
def test_protected_keys_match_float64(identity: bool, n_keys: int) -> None:
    """protect(k, w) solves against C + w m k k^T / ||k||^2, m = mean eigenvalue of C; with
    25 keys of 40 dimensions, 20 of them are folded into the factor (at 10 and 20) and the
    other 5 join by Woodbury."""
    d, weight = 40, 30.0
    gen = torch.Generator().manual_seed(21)
    c = torch.eye(d, dtype=torch.float64) if identity else random_spd(d, gen)
    cov = KeyCovariance(None if identity else c.float(), ridge=0.0)
    earlier = [torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(n_keys)]
    for k in earlier:
        cov.protect(k.float(), weight)
    assert len(cov.protected) == n_keys % (d // 4)
    assert cov.held == n_keys and cov.fill == pytest.approx(n_keys / d)  # folded keys count too
    assert cov.identity == identity  # the base statistics, whatever is folded in
    cov.protect(earlier[0].float(), 0.0)  # weight 0: nothing added
    m = float(c.diagonal().mean())
    c_eff = c + sum(weight * m * torch.outer(k, k) / (k @ k) for k in earlier)
    k_star = torch.randn(d, generator=gen, dtype=torch.float64)
    fp32_close(cov.solve(k_star.float()), torch.linalg.solve(c_eff, k_star))


def test_strongly_protected_keys_are_left_alone_and_the_edit_still_holds() -> None:
    d = 48
    gen = torch.Generator().manual_seed(22)
    c = random_spd(d, gen)
    w = torch.randn(d + 3, d, generator=gen, dtype=torch.float64)
    earlier = [torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(5)]
    k_star = torch.randn(d, generator=gen, dtype=torch.float64)
    delta = torch.randn(d + 3, generator=gen, dtype=torch.float64)
    plain_u, _ = left_vector(KeyCovariance(c.float(), ridge=0.0), k_star.float())
    cov = KeyCovariance(c.float(), ridge=0.0)
    for k in earlier:
        cov.protect(k.float(), 1e9)
    u, _ = left_vector(cov, k_star.float())
    w_new = w + torch.outer(right_vector(delta.float(), k_star.float(), u).double(), u.double())
    fp32_close(w_new @ k_star, w @ k_star + delta)  # the new edit is exact
    for k in earlier:  # earlier keys: moved by ~1e-9 of the edit, against ~0.1-1 unprotected
        unprotected = abs(float(plain_u.double() @ k)) / abs(float(plain_u.double() @ k_star))
        protected = abs(float(u.double() @ k)) / abs(float(u.double() @ k_star))
        assert protected < 1e-4 < 1e-2 < unprotected


# ---------------------------------------------------------------------------------------------
# 2. Edits of real tiny models, every family.


def test_keys_at_matches_unpadded_forwards(family: str) -> None:
    model, tok, names = load(family)
    prompts = [templated(tok, REQUEST, t) for t in TEMPLATES]
    keys = keys_at(model, tok, names, LAYER, prompts)
    assert keys.dtype == torch.float32
    fp32_close(keys, reference_keys(model, tok, names, REQUEST, TEMPLATES), rtol=1e-5)


def test_r_rome_edit_maps_k_star_to_w_k_star_plus_delta(
    family: str, values_seen: list[ValueResult]
) -> None:
    model, tok, names = load(family)
    values = values_seen
    keys = reference_keys(model, tok, names, REQUEST, TEMPLATES)
    k_star = keys.mean(0).double()
    outputs_before = mlp_outputs(model, tok, names, REQUEST, TEMPLATES)
    before, w = snapshot(model), w_of(model, names).double()

    result = edit(model, tok, REQUEST, hparams(), names, templates=TEMPLATES)

    assert result.status == "applied" and len(values) == 1
    delta = values[0].delta.double()
    (layer_edit,) = result.layers
    patch = layer_edit.patch
    assert (patch.layer, patch.module) == (LAYER, names.rewrite(LAYER))
    assert (patch.dtype, patch.request) == ("torch.float32", "7")
    u, right = patch.left.double(), patch.right.double()
    w_new = w_of(model, names).double()
    fp32_close(w_new - w, torch.outer(right, u), rtol=1e-5)
    fp32_close(u, unit(k_star))  # C = I
    fp32_close(w_new @ k_star, w @ k_star + delta)
    assert layer_edit.denominator == pytest.approx(float(k_star @ k_star), rel=1e-4)
    expected_ratio = torch.outer(right, u).norm() / w.norm()
    assert layer_edit.update_ratio == pytest.approx(float(expected_ratio), rel=1e-4)
    z = values[0].z.double()
    assert layer_edit.delta_ratio == pytest.approx(float(delta.norm() / z.norm()), rel=1e-4)
    # The edited model itself: its MLP output moves by delta on average over the templates.
    change = mlp_outputs(model, tok, names, REQUEST, TEMPLATES) - outputs_before
    fp32_close(change.double().mean(0), delta, rtol=1e-3)
    assert_same_weights(model, before, skip=frozenset({names.rewrite(LAYER) + ".weight"}))


def test_rome_edit_maps_the_prompt_key(family: str, values_seen: list[ValueResult]) -> None:
    model, tok, names = load(family)
    values = values_seen
    keys = reference_keys(model, tok, names, REQUEST, TEMPLATES).double()
    k_star, k_prompt = keys.mean(0), keys[0]
    z_reference = mlp_outputs(model, tok, names, REQUEST, ["{}"])[0]
    w = w_of(model, names).double()

    result = edit(model, tok, REQUEST, hparams(variant="rome"), names, templates=TEMPLATES)

    assert result.status == "applied"
    delta, z = values[0].delta.double(), values[0].z
    fp32_close(z, z_reference, rtol=1e-5)  # z: the unedited output at the bare prompt
    u = result.layers[0].patch.left.double()
    fp32_close(u, unit(k_star))
    fp32_close(w_of(model, names).double() @ k_prompt, w @ k_prompt + delta)
    # End to end: the bare prompt's MLP output is now z + delta.
    after = mlp_outputs(model, tok, names, REQUEST, ["{}"])[0]
    fp32_close(after, z_reference.double() + delta, rtol=1e-4)


def test_variants_share_u_but_not_the_right_vector(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok, names = load(family)
    keys = reference_keys(model, tok, names, REQUEST, TEMPLATES).double()
    k_star, k_prompt = keys.mean(0), keys[0]
    d_in, d_out = keys.shape[1], w_of(model, names).shape[0]
    c = random_spd(d_in, torch.Generator().manual_seed(11))
    cov = KeyCovariance(c.float())
    delta = random_delta(d_out)
    fix_delta(monkeypatch, lambda _layer: delta)

    def solve(variant: str) -> tuple[torch.Tensor, torch.Tensor]:
        hp = hparams(variant=variant, mom2_adjustment=True)
        patch = edit_layer(model, tok, REQUEST, hp, names, LAYER, cov, TEMPLATES).patch
        return patch.left.double(), patch.right.double()

    u_r, right_r = solve("r-rome")
    u_rome, right_rome = solve("rome")
    u_p, right_p = solve("p-rome")
    fp32_close(u_rome, u_r, rtol=1e-6)
    fp32_close(u_r, unit(torch.linalg.solve(c, k_star)))
    fp32_close(u_p, unit(torch.linalg.solve(c, k_prompt)))
    # Same delta, different denominators: k*.u (r-rome) against k_prompt.u (rome).
    fp32_close(right_rome * (k_prompt @ u_r), right_r * (k_star @ u_r))
    fp32_close(right_r * (k_star @ u_r), delta)
    fp32_close(right_p * (k_prompt @ u_p), delta)
    assert not torch.allclose(right_rome, right_r, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# 3-5. Storage layouts, half precision, revert.


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_update_lands_in_either_weight_layout(family: str) -> None:
    model, tok, names = load(family)
    module = model.get_submodule(names.rewrite(LAYER))
    before = module.weight.detach().clone()
    patch = edit(model, tok, REQUEST, hparams(), names, templates=TEMPLATES).patches[0]
    assert is_conv1d(module) == (family == "gpt2")
    # Conv1D stores (d_in, d_out); nn.Linear stores (d_out, d_in).
    expected = (
        torch.outer(patch.left, patch.right)
        if is_conv1d(module)
        else torch.outer(patch.right, patch.left)
    )
    assert module.weight.shape == expected.shape
    fp32_close(module.weight.detach() - before, expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_half_precision_edit_casts_once(family: str, dtype: torch.dtype) -> None:
    model, tok, names = load(family, dtype)
    w = w_of(model, names)
    result = edit(model, tok, REQUEST, hparams(), names, templates=TEMPLATES)
    assert result.status == "applied", result.reason
    patch = result.patches[0]
    assert patch.left.dtype == patch.right.dtype == torch.float32
    assert patch.dtype == str(dtype)
    w_new = w_of(model, names)
    assert w_new.dtype == dtype
    assert torch.equal(w_new, (w.float() + torch.outer(patch.right, patch.left)).to(dtype))
    assert not torch.equal(w_new, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_revert_restores_bit_for_bit(family: str, dtype: torch.dtype) -> None:
    model, tok, names = load(family, dtype)
    before = snapshot(model)
    result = edit(model, tok, REQUEST, hparams(), names, templates=TEMPLATES)
    weight = names.rewrite(LAYER) + ".weight"
    assert result.status == "applied"
    assert not torch.equal(model.state_dict()[weight], before[weight])
    result.revert(model)
    assert_same_weights(model, before)
    result.revert(model)  # a second revert changes nothing
    assert_same_weights(model, before)


# ---------------------------------------------------------------------------------------------
# 6. Guardrails: an update that is not finite, or too large, is never applied.


def test_non_finite_delta_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok, names = load("llama")
    delta = random_delta(64)
    delta[3] = float("nan")
    fix_delta(monkeypatch, lambda _layer: delta)
    before = snapshot(model)
    result = edit(model, tok, REQUEST, hparams(), names, templates=TEMPLATES)
    assert result.status == "rejected"
    assert "non-finite" in result.reason and f"layer {LAYER}" in result.reason
    assert result.patches == []
    assert_same_weights(model, before)


def test_rejection_at_a_later_layer_rolls_back_the_earlier_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, tok, names = load("gpt2")
    bad = torch.full((64,), float("inf"))
    fix_delta(monkeypatch, lambda layer: bad if layer == 2 else random_delta(64))
    before = snapshot(model)
    result = edit(model, tok, REQUEST, hparams(layers=[1, 2]), names, templates=TEMPLATES)
    assert result.status == "rejected" and "layer 2" in result.reason
    assert [e.layer for e in result.layers] == [1, 2]
    assert_same_weights(model, before)


def test_update_ratio_limit_rejects(family: str) -> None:
    model, tok, names = load(family)
    before = snapshot(model)
    result = edit(model, tok, REQUEST, hparams(), names, templates=TEMPLATES, max_update_ratio=1e-6)
    assert result.status == "rejected"
    assert "update ratio" in result.reason and "1e-06" in result.reason
    assert result.layers[0].update_ratio > 1e-6
    assert_same_weights(model, before)


def test_apply_update_refuses_non_finite() -> None:
    linear = nn.Linear(4, 3)
    before = linear.weight.detach().clone()
    bad = torch.zeros(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(FloatingPointError):
        apply_update(linear, bad)
    assert torch.equal(linear.weight, before)


# ---------------------------------------------------------------------------------------------
# 7. The value pass: prefix KV cache + suffix == one plain forward with delta added.


@torch.no_grad()
def reference_hidden(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    names: ModuleNames,
    rows: list[list[int]],
    subject_at: list[int],
    delta: torch.Tensor,
) -> torch.Tensor:
    """Final hidden states of right-padded full rows, no cache, delta added by our own hook."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1

    def add_delta(_m: nn.Module, _i: Any, out: Any) -> Any:
        first = (out[0] if isinstance(out, tuple) else out).clone()
        first[torch.arange(len(rows)), torch.tensor(subject_at)] += delta.to(first.dtype)
        return (first, *out[1:]) if isinstance(out, tuple) else first

    hook = model.get_submodule(names.mlp(LAYER)).register_forward_hook(add_delta)
    try:
        out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        return out.last_hidden_state
    finally:
        hook.remove()


def expected_rows(
    tok: PreTrainedTokenizerBase, request: EditRequest, templates: list[str]
) -> tuple[list[list[int]], list[int], list[tuple[int, int, int]]]:
    """(token rows fed to the model, subject's last token per row, (row, position, id) targets).

    Teacher forcing: each row is the prompt + " target" without its last token, and the token at
    position j is predicted by the logits at j - 1. The last row is "{subject} is a".
    """
    rows, subject_at, targets = [], [], []
    for r, template in enumerate(templates):
        text, subject_end = template_text(request, template)
        full = tok(f"{text} {request.target_new}").input_ids
        n_prompt = len(tok(text).input_ids)
        rows.append(full[:-1])
        subject_at.append(subject_last_index(tok, text, subject_end))
        targets += [(r, j - 1, full[j]) for j in range(n_prompt, len(full))]
    kl_text = f"{request.subject} is a"
    rows.append(tok(kl_text).input_ids)
    subject_at.append(subject_last_index(tok, kl_text, len(request.subject)))
    return rows, subject_at, targets


def value_rows(
    tok: PreTrainedTokenizerBase, request: EditRequest, templates: list[str], whole: bool = False
) -> list[Row]:
    """The engine's rows: one per template (the first run whole if ``whole``), the KL prompt."""
    prompts = [templated(tok, request, t) for t in templates]
    rows = [prompt_row(tok, p, request.target_new, whole and i == 0) for i, p in enumerate(prompts)]
    return [*rows, kl_row(tok, request.subject)]


def add_at_subjects(packed: PackedPass, rows: list[Row], delta: torch.Tensor) -> Any:
    """A forward hook adding delta at every row's subject's last token, by packed slot."""
    slots = torch.tensor([packed.slot(i, r.subject) for i, r in enumerate(rows)])

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
        flat = out.flatten(0, 1).clone()
        flat[slots] += delta
        return flat.view(out.shape)

    return hook


def check_packed_pass(
    family: str,
    request: EditRequest,
    templates: list[str],
    passes: int,
    whole: bool = False,
    attention: str = "sdpa",
) -> None:
    model, tok, names = load(family)
    model.set_attn_implementation(attention)
    rows = value_rows(tok, request, templates, whole)
    full, subject_at, targets = expected_rows(tok, request, templates)
    delta = random_delta(model.config.hidden_size, seed=4)
    expected = reference_hidden(model, tok, names, full, subject_at, delta)
    plain = reference_hidden(model, tok, names, full, subject_at, torch.zeros_like(delta))
    assert (expected - plain).abs().max() > 1e-2  # delta does reach the final layer

    assert [t for r in rows for _, t in r.targets] == [t for _, _, t in targets]
    assert [r.subject for r in rows] == subject_at
    # the blocks below the edited layer run on the first pass only; later passes reuse them
    packed = PackedPass(model, rows, [names.layer(i) for i in range(LAYER)])
    if whole:  # the whole row is the widest: shorter rows share lines
        assert packed.shape[0] < len(rows)
    block0_calls: list[int] = []
    hook0 = model.get_submodule(names.layer(0)).register_forward_pre_hook(
        lambda *_: block0_calls.append(1)
    )
    for _ in range(passes):  # the cache must be reset between passes
        mlp = model.get_submodule(names.mlp(LAYER))
        hook = mlp.register_forward_hook(add_at_subjects(packed, rows, delta))
        try:
            with torch.no_grad():
                hidden = packed.hidden()
        finally:
            hook.remove()
        for i, r in enumerate(rows):
            fed = range(r.split, len(r.ids))
            got = hidden[[packed.slot(i, j) for j in fed]]
            fp32_close(got, expected[i, r.split : len(r.ids)], rtol=1e-4)
        readout = Readout.of(packed, rows)
        logp = packed.log_probs(hidden[readout.slots[:-1]])
        at = torch.tensor([[r, p] for r, p, _ in targets])
        logits = model.get_output_embeddings()(expected[at[:, 0], at[:, 1]]).float()
        fp32_close(logp, torch.log_softmax(logits, -1), rtol=1e-4)
    hook0.remove()
    assert len(block0_calls) == 1
    assert isinstance(
        model.get_submodule(names.layer(0)), type(model.get_submodule(names.layer(LAYER)))
    )


def test_packed_pass_matches_full_forward(family: str) -> None:
    check_packed_pass(family, REQUEST, TEMPLATES, passes=2)


def test_packed_pass_with_a_whole_row_sharing_lines(family: str) -> None:
    """The bare prompt run whole (``bare``) is the widest row: the others pack beside each
    other in its width, each seeing only its own prefix and tokens."""
    check_packed_pass(family, REQUEST, TEMPLATES, passes=2, whole=True)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_pass_under_eager_attention(family: str) -> None:
    """Eager attention adds the mask to the scores: the packed mask is additive, not bool."""
    check_packed_pass(family, REQUEST, TEMPLATES, passes=1, whole=True, attention="eager")


def test_packed_pass_with_subject_first_in_the_prompt(family: str) -> None:
    model, tok, _ = load(family)
    assert subject_last_index(tok, FIRST_TOKEN.text, len("The")) == 0  # empty prefix row
    check_packed_pass(family, FIRST_TOKEN, TEMPLATES, passes=2)


def test_pack_takes_the_width_with_the_fewest_slots() -> None:
    assert pack([3, 3, 3]) == [[0], [1], [2]]  # equal rows: a line each, in order (9 slots)
    # width 11: [0], [1, 2, 3, 5], [4] is 33 slots; width 12: 24, the least two lines can take
    assert pack([11, 3, 3, 3, 3, 1]) == [[0, 5], [1, 2, 3, 4]]
    # width 5: [1], [2, 0], [3] is 15 slots; width 6: 12; one line of 11 would take twice 5
    assert pack([2, 5, 3, 1]) == [[1, 3], [2, 0]]


def test_packed_pass_skips_the_blocks_below(family: str) -> None:
    """Edited layer 3 of 4: blocks 0-2 run once; later passes (delta changing at layer 3)
    equal a pass that computes every block."""
    model, tok, names = load(family)
    rows = value_rows(tok, REQUEST, TEMPLATES, whole=True)
    fast = PackedPass(model, rows, [names.layer(i) for i in range(3)])
    full = PackedPass(model, rows)
    block0_calls: list[int] = []
    handle = model.get_submodule(names.layer(0)).register_forward_pre_hook(
        lambda *_: block0_calls.append(1)
    )
    mlp = model.get_submodule(names.mlp(3))
    try:
        for seed in (1, 2, 3):
            delta = random_delta(model.config.hidden_size, seed=seed)
            with torch.no_grad(), edit_output(mlp, lambda out, d=delta: out + d):
                calls = len(block0_calls)
                got = fast.hidden()
                assert len(block0_calls) == calls + (seed == 1)  # only the first pass
                fp32_close(got, full.hidden(), rtol=1e-5)
    finally:
        handle.remove()
    assert type(model.get_submodule(names.layer(0))) is type(model.get_submodule(names.layer(3)))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_pass_when_every_prefix_is_empty(family: str) -> None:
    check_packed_pass(family, FIRST_TOKEN, ["{}"], passes=2)


# ---------------------------------------------------------------------------------------------
# 9. Templates.


def test_generate_templates(tmp_path: Path) -> None:
    model, tok, _ = load("llama")
    rng_before = torch.random.get_rng_state()
    templates = generate_templates(model, tok, [[3, 2], [2, 3]], seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    assert templates == generate_templates(model, tok, [[3, 2], [2, 3]], seed=0)
    assert templates != generate_templates(model, tok, [[3, 2], [2, 3]], seed=1)
    assert len(templates) == 1 + 2 + 3
    assert templates[0] == "{}"
    assert all(t.count("{}") == 1 for t in templates)

    path = tmp_path / "templates.json"
    save_templates(templates, path)
    assert load_templates(path) == templates


@pytest.mark.parametrize(
    "content", ['{"a": "{}"}', '["{}", "no slot"]', '["{} and {}"]', '["{}", 3]']
)
def test_load_templates_rejects_a_bad_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "templates.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="templates.json"):
        load_templates(path)


# ---------------------------------------------------------------------------------------------
# 10-12. Patches, several layers, key statistics.


@pytest.mark.parametrize(
    ("family", "dtype"),
    [("gpt2", torch.float32), ("llama", torch.float32), ("llama", torch.bfloat16)],
)
def test_saved_patches_reproduce_sequential_edits(
    family: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    model, tok, names = load(family, dtype)
    patches = []
    for request in (REQUEST, SECOND):
        result = edit(model, tok, request, hparams(), names, templates=TEMPLATES)
        assert result.status == "applied", result.reason
        patches += result.patches
    path = tmp_path / "patches.safetensors"
    save_patches(path, patches, with_keys=True)
    loaded = load_patches(path)
    assert [(p.layer, p.module, p.dtype, p.request) for p in loaded] == [
        (p.layer, p.module, p.dtype, p.request) for p in patches
    ]
    for saved, original in zip(loaded, patches, strict=True):
        assert torch.equal(saved.left, original.left) and torch.equal(saved.right, original.right)
        assert torch.equal(saved.keys, original.keys)

    save_patches(tmp_path / "compact.safetensors", patches)  # keys only when asked for
    assert all(p.keys is None for p in load_patches(tmp_path / "compact.safetensors"))

    fresh, _, _ = load(family, dtype)
    for patch in loaded:
        apply_patch(fresh, patch)
    assert_same_weights(fresh, snapshot(model))


def test_sequential_edits_with_protection_keep_the_first_value() -> None:
    """With the first edit's keys protected (k*, the bare prompt's and those after the subject
    in "prompt target"), the second edit leaves W at those keys where the first edit put it."""
    model, tok, names = load("llama")
    keys1 = reference_keys(model, tok, names, REQUEST, TEMPLATES).double()  # [0]: bare ("{}")
    after = reference_keys_after_subject(model, tok, names, REQUEST).double()
    assert len(after) >= 1  # " is" at least
    c = random_spd(keys1.shape[1], torch.Generator().manual_seed(23))
    covariances = {LAYER: KeyCovariance(c.float())}
    hp = hparams(mom2_adjustment=True)
    first = edit(model, tok, REQUEST, hp, names, covariances=covariances, templates=TEMPLATES)
    fp32_close(first.patches[0].keys, torch.cat([torch.stack([keys1.mean(0), keys1[0]]), after]))
    w1 = w_of(model, names).double()
    edit_module.protect_edited_keys(first.patches, covariances, 1e9)
    second = edit(model, tok, SECOND, hp, names, covariances=covariances, templates=TEMPLATES)
    assert second.status == "applied"
    w2 = w_of(model, names).double()
    for k in (keys1.mean(0), keys1[0], *after):
        moved = (w2 @ k - w1 @ k).norm() / ((w2 - w1).norm() * k.norm())
        assert moved < 1e-5


def test_load_patches_rejects_other_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"other": json.dumps([])})
    with pytest.raises(ValueError, match="weights.safetensors"):
        load_patches(path)


def test_several_layers_are_edited_in_turn() -> None:
    model, tok, names = load("llama")
    before = snapshot(model)
    result = edit(model, tok, REQUEST, hparams(layers=[1, 2]), names, templates=TEMPLATES)
    assert result.status == "applied"
    assert [p.module for p in result.patches] == [names.rewrite(1), names.rewrite(2)]
    changed = {names.rewrite(layer) + ".weight" for layer in (1, 2)}
    for name in changed:
        assert not torch.equal(model.state_dict()[name], before[name])
    assert_same_weights(model, before, skip=frozenset(changed))
    result.revert(model)
    assert_same_weights(model, before)


def test_missing_statistics_is_an_error() -> None:
    model, tok, names = load("llama")
    before = snapshot(model)
    hp = hparams(mom2_adjustment=True)
    with pytest.raises(MissingStatisticsError, match=f"layer {LAYER}"):
        edit(model, tok, REQUEST, hp, names, templates=TEMPLATES)
    other_layer = {LAYER + 1: KeyCovariance(torch.eye(128))}
    with pytest.raises(MissingStatisticsError, match="mom2_adjustment"):
        edit(model, tok, REQUEST, hp, names, covariances=other_layer, templates=TEMPLATES)
    assert_same_weights(model, before)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edit_with_key_statistics_solves_against_c(family: str) -> None:
    model, tok, names = load(family)
    k_star = reference_keys(model, tok, names, REQUEST, TEMPLATES).mean(0).double()
    c = random_spd(k_star.shape[0], torch.Generator().manual_seed(13))
    covariances = {LAYER: KeyCovariance(c.float(), ridge=0.0)}
    result = edit(
        model,
        tok,
        REQUEST,
        hparams(mom2_adjustment=True),
        names,
        covariances=covariances,
        templates=TEMPLATES,
    )
    assert result.status == "applied"
    c_inv_k = torch.linalg.solve(c, k_star)
    fp32_close(result.patches[0].left, unit(c_inv_k))
    assert result.layers[0].denominator == pytest.approx(float(k_star @ c_inv_k), rel=1e-4)


@pytest.mark.parametrize("realized", ["off", "bare"])
def test_realized_delta_scales_each_prompt_by_its_key(
    monkeypatch: pytest.MonkeyPatch, realized: str
) -> None:
    """v_realized_delta: prompt i sees (u.k_i)/(u.k*) delta, which averages to exactly 1 over
    the templates under r-rome (k* is their mean key); off, no scale is passed at all."""
    model, tok = tiny_model("llama")
    names = module_names(type(model).__name__)
    seen: list[torch.Tensor | None] = []
    real = edit_module.optimise_delta

    def spy(*args: Any, **kwargs: Any) -> ValueResult:
        seen.append(args[5].row_scale)  # the ValueSpec
        return real(*args, **kwargs)

    monkeypatch.setattr(edit_module, "optimise_delta", spy)
    hp = HParams(
        layers=[1],
        v_num_grad_steps=2,
        context_template_length_params=[[3, 3]],
        mom2_adjustment=False,
        v_realized_delta=realized,
    )
    request = EditRequest(prompt="The capital of {} is", subject="Japan", target_new="Paris")
    edit(model, tok, request, hp, names)
    if realized == "off":
        assert seen == [None]
        return
    (scale,) = seen
    assert scale.shape == (5,)  # 4 templated prompts + the KL prompt
    assert scale[:-1].mean().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(scale, torch.ones_like(scale))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bare_realized_delta_reads_the_edited_model_on_the_bare_prompt(family: str) -> None:
    """v_realized_delta "bare": the bare prompt's loss, the one its stop test reads, is exactly
    the edited model's NLL of the target, though the subject is not the prompt's first token (the
    update also moves the positions before the subject's last token, which the other rows
    cache); and it is not counted twice."""
    model, tok, names = load(family)
    rewrite = model.get_submodule(names.rewrite(LAYER))
    d_out, d_in = weight_as_out_in(rewrite).shape
    u, k_ref = random_delta(d_in, seed=2), random_delta(d_in, seed=3)
    read = (u if float(u @ k_ref) > 0 else -u) / abs(float(u @ k_ref))
    prompts = [templated(tok, REQUEST, t) for t in TEMPLATES]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (delta, NLL per prompt) of each pass
    real = values_module._value_loss

    def spy(nll_each: torch.Tensor, kl: Any, kl_ref: Any, delta: torch.Tensor, *rest: Any) -> Any:
        seen.append((delta.detach().clone(), nll_each.detach().clone()))
        return real(nll_each, kl, kl_ref, delta, *rest)

    hp = hparams(v_realized_delta="bare", v_num_grad_steps=3, v_lr=0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(values_module, "_value_loss", spy)
        spec = ValueSpec(prompts, REQUEST.target_new, REQUEST.subject, read=read)
        values_module.optimise_delta(model, tok, names, LAYER, hp, spec)
    delta, nll_each = seen[-1]
    assert nll_each.shape == (len(TEMPLATES),)
    assert delta.norm() > 0
    apply_update(rewrite, torch.outer(delta, read))
    (score,) = score_answers(model, tok, [(REQUEST.text, REQUEST.target_new)])
    edited = -sum(score.token_logprobs) / len(score.token_logprobs)
    assert nll_each[0].item() == pytest.approx(edited, rel=1e-4)


def test_bare_gives_the_update_its_later_share_on_the_bare_prompt_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under "bare" the templated prompts and the relation phrasings take delta at their
    subject's token, scaled (no ``read``); only the whole, uncached bare prompt gets the share."""
    model, tok, names = load("llama")
    made: list[tuple[PackedPass, list[Row], Any]] = []
    real = values_module.delta_site_of

    def spy(packed: PackedPass, jobs: list[Any], *args: Any) -> Any:
        site = real(packed, jobs, *args)
        ((rows, _, _),) = jobs
        made.append((packed, rows, site))
        return site

    monkeypatch.setattr(values_module, "delta_site_of", spy)
    d_in = weight_as_out_in(model.get_submodule(names.rewrite(LAYER))).shape[1]
    prompts = [templated(tok, REQUEST, t) for t in TEMPLATES]
    phrasings = [phrased(tok, REQUEST.subject, "{} grew up speaking")]
    hp = hparams(v_realized_delta="bare", v_num_grad_steps=1)
    read = random_delta(d_in, seed=2)
    spec = ValueSpec(prompts, REQUEST.target_new, REQUEST.subject, phrasings, read=read)
    values_module.optimise_delta(model, tok, names, LAYER, hp, spec)
    ((packed, rows, site),) = made
    assert len(rows) == len(TEMPLATES) + 1 + 1  # the bare prompt once (whole), the KL prompt
    assert rows[0].split == 0 and all(r.split > 0 for r in rows[1:])
    whole = [packed.slot(0, j) for j in range(len(rows[0].ids))]
    assert site.reads.nonzero()[:, 0].tolist() == sorted(whole)
    subjects = [packed.slot(i, r.subject) for i, r in enumerate(rows) if i > 0]
    assert site.fixed.nonzero()[:, 0].tolist() == sorted(subjects)


def test_stop_rules() -> None:
    from rrome_cli.engine.values import _reached

    nll = -torch.log(torch.tensor([0.5, 0.99, 0.99]))  # bare prompt 0.5, others 0.99
    tiny_loss = torch.tensor(0.01)
    assert _reached(tiny_loss, nll, HParams(v_stop="loss"))  # ROME: the loss alone decides
    assert not _reached(tiny_loss, nll, HParams(v_stop="target", v_stop_prob=0.9))
    good = -torch.log(torch.tensor([0.95, 0.9, 0.9]))
    assert _reached(torch.tensor(3.0), good, HParams(v_stop="target", v_stop_prob=0.9))
    # mean 0.9 with one template at 0.8: enough for "target"
    uneven = -torch.log(torch.tensor([0.95, 0.95, 0.8]))
    assert _reached(torch.tensor(3.0), uneven, HParams(v_stop="target", v_stop_prob=0.9))


def test_k_bare_min_must_be_a_fraction() -> None:
    with pytest.raises(HParamsError, match="k_bare_min"):
        HParams(k_bare_min=0)
    with pytest.raises(HParamsError, match="k_bare_min"):
        HParams(k_bare_min=1.5)


def test_mean_key_leans_to_the_bare_prompt_until_it_gets_its_fraction() -> None:
    """k_bare_min: against a float64 solve, the bare prompt receives at least bare_min of the
    edit ((u . k_bare) / (u . k*), u = C^-1 k*), and not much more (the least lean); a key mix
    that already gives it that keeps the plain mean."""
    from rrome_cli.engine.edit import mean_key

    d, gen = 16, torch.Generator().manual_seed(7)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    spread = torch.logspace(2, -2, d, dtype=torch.float64)  # variance along each basis vector
    c = basis @ torch.diag(spread) @ basis.T
    cov = KeyCovariance(c.float())
    # the bare key in the high-variance directions (C^-1 shrinks it), templates in the low ones
    k_bare = basis[:, :3] @ torch.tensor([30.0, 20.0, 10.0], dtype=torch.float64)
    k_templates = basis[:, 8:] @ torch.randn(d - 8, 10, generator=gen, dtype=torch.float64)
    keys = torch.cat([k_bare[None], k_templates.T + 0.1 * k_bare]).float()  # (11, d)

    def fraction(k_star: torch.Tensor) -> float:
        u = torch.linalg.solve(c, k_star.double())
        return float(u @ k_bare / (u @ k_star.double()))

    assert torch.equal(mean_key(cov, keys, None), keys.mean(0))
    plain = fraction(keys.mean(0))
    assert plain < 0.2
    for bare_min in (0.5, 0.9):
        k_star = mean_key(cov, keys, bare_min)
        assert bare_min - 1e-4 <= fraction(k_star) <= bare_min + 1e-3
    assert torch.equal(mean_key(cov, keys, plain * 0.9), keys.mean(0))


def test_phrasings_join_the_value_prompts_but_not_k_star(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request's other phrasings are optimised with the value, bare, each row scaled by what
    the update will add there; k* (so u) is the templates' mean as without them; max_phrasings
    caps how many are used."""
    model, tok, names = load("llama")
    phrasings = ["{} is a native speaker of", "Where {} is from, people speak", "{} spoke"]
    with_them = EditRequest(**{**vars(REQUEST), "phrasings": phrasings})
    seen: list[tuple[list[str], torch.Tensor]] = []

    def fake(model, tok, names, layer, hp, spec):  # noqa: ANN001, ANN202
        assert spec.read is not None  # "bare": the bare prompt reads its shares off its keys
        seen.append(([p.text for p in [*spec.prompts, *spec.phrasings]], spec.row_scale))
        delta = torch.ones(model.config.hidden_size)
        return ValueResult(delta, torch.ones_like(delta), 0.0, 0.0, 1.0, 0, 0.0, [])

    monkeypatch.setattr(edit_module, "optimise_delta", fake)
    hp = hparams(v_realized_delta="bare", max_phrasings=2)
    plain = edit(model, tok, REQUEST, hp, names, templates=TEMPLATES)
    plain.revert(model)
    phrased_edit = edit(model, tok, with_them, hp, names, templates=TEMPLATES)
    phrased_edit.revert(model)

    (texts_plain, _), (texts, scale) = seen
    bare_phrasings = [p.replace("{}", REQUEST.subject) for p in phrasings[:2]]
    assert texts == [*texts_plain, *bare_phrasings]
    fp32_close(phrased_edit.patches[0].left, plain.patches[0].left, rtol=1e-6)
    # each phrasing's row gets (u . k_phrasing) / (u . k*): its key read at its subject
    u = phrased_edit.patches[0].left
    k_star = reference_keys(model, tok, names, REQUEST, TEMPLATES).mean(0)
    k_phrasings = keys_at(
        model, tok, names, LAYER, [phrased(tok, REQUEST.subject, p) for p in phrasings[:2]]
    )
    expected = (k_phrasings @ u) / (k_star @ u)
    assert scale.shape == (len(TEMPLATES) + 2 + 1,)  # templates, phrasings, the KL prompt
    fp32_close(scale[len(TEMPLATES) : -1], expected, rtol=1e-4)
    assert seen[1][0][len(TEMPLATES)] == "Danielle Darrieux is a native speaker of"


def test_phrased_prompt_locates_the_subject() -> None:
    _, tok, _ = load("gpt2")
    p = phrased(tok, "Danielle Darrieux", "Where {} is from, people speak")
    assert p.text == "Where Danielle Darrieux is from, people speak"
    assert p.subject_last == subject_last_index(tok, p.text, p.subject_end)
    assert p.text[: p.subject_end].endswith("Darrieux")


def test_max_phrasings_is_a_count() -> None:
    with pytest.raises(HParamsError, match="max_phrasings"):
        HParams(max_phrasings=-1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_phrasings_optimise_as_the_same_prompts_given_as_templates(family: str) -> None:
    """Phrasings (longer rows than the templates', packed into lines of their own): delta and
    the per-prompt NLL come out as when they are passed as templated prompts (same rows, same
    order, same row scales)."""
    from rrome_cli.engine.values import optimise_delta

    model, tok, names = load(family)
    prompts = [templated(tok, REQUEST, t) for t in TEMPLATES]
    texts = ["{} is a native speaker of", "Where {} is from, people speak the language"]
    phrasings = [phrased(tok, REQUEST.subject, p) for p in texts]
    scale = torch.linspace(0.5, 1.5, len(prompts) + len(phrasings) + 1)
    hp = hparams(v_num_grad_steps=3, v_lr=0.5)
    args = (model, tok, names, LAYER, hp)
    apart = optimise_delta(*args, ValueSpec(prompts, "English", REQUEST.subject, phrasings, scale))
    together = optimise_delta(
        *args, ValueSpec([*prompts, *phrasings], "English", REQUEST.subject, row_scale=scale)
    )
    assert apart.steps == together.steps == 3
    fp32_close(apart.delta, together.delta, rtol=1e-4)
    assert apart.nll == pytest.approx(together.nll, rel=1e-4)
    assert apart.loss == pytest.approx(together.loss, rel=1e-4)


def test_value_loss_by_hand() -> None:
    """The value's loss: mean NLL + kl_factor * KL(edited || unedited) + decay."""
    nll_each = torch.tensor([2.0, 0.5, 0.25, 1.25])  # the bare prompt first; mean 1.0
    kl_ref = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0]]), -1)
    kl_log_probs = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0]]), -1)
    kl = float((kl_log_probs.exp() * (kl_log_probs - kl_ref)).sum())  # KL(edited || unedited)
    delta, z = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])  # decay: 5 / 4 of its factor
    terms = dict(kl_factor=0.5, v_weight_decay=0.1)
    plain = _value_loss(nll_each, kl_log_probs, kl_ref, delta, z, hparams(**terms))
    assert plain.item() == pytest.approx(1.0 + 0.5 * kl + 0.1 * 5 / 4)


def test_every_group_is_read_through_the_head_in_one_call_per_pass() -> None:
    """The templates, the phrasings, the whole bare prompt and the KL row share one head call
    a pass: a call per group reads the (vocab, d) weight once more, forward and backward."""
    model, tok, names = load("llama")
    calls: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, _i, out: calls.append(out.shape[0])
    )
    passes: list[int] = []  # calls of the top decoder block
    top = model.get_submodule(names.layer(model.config.num_hidden_layers - 1))
    top_hook = top.register_forward_hook(lambda *_: passes.append(1))
    d_in = weight_as_out_in(model.get_submodule(names.rewrite(LAYER))).shape[1]
    prompts = [templated(tok, REQUEST, t) for t in TEMPLATES]
    phrasings = [phrased(tok, REQUEST.subject, "{} grew up speaking")]
    hp = hparams(v_realized_delta="bare", v_num_grad_steps=3, v_stop="target", v_stop_prob=1.0)
    try:
        read = random_delta(d_in, seed=2)
        spec = ValueSpec(prompts, REQUEST.target_new, REQUEST.subject, phrasings, read=read)
        result = values_module.optimise_delta(model, tok, names, LAYER, hp, spec)
    finally:
        hook.remove()
        top_hook.remove()
    assert result.steps == 3 and len(calls) == 3  # p = 1 is never reached: 3 passes

    def targets(group: list[Any]) -> int:
        return sum(len(prompt_row(tok, p, REQUEST.target_new).targets) for p in group)

    # the templates' targets (the bare prompt's once, whole), the phrasings', the KL row
    assert calls == [targets(prompts) + targets(phrasings) + 1] * 3
    assert len(passes) == 1 + 3  # the prefix pass, then one call of the model a pass


def _optimise(family: str) -> tuple[torch.Tensor, list[bool]]:
    """delta after 3 steps on ``family``'s tiny model, and SDPA's ``enable_gqa`` per call."""
    model, tok, names = load(family)
    prompts = [templated(tok, REQUEST, t) for t in TEMPLATES]
    hp = hparams(v_num_grad_steps=3, v_stop="target", v_stop_prob=1.0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa: list[bool] = []

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        gqa.append(kwargs.get("enable_gqa", False))
        return sdpa(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        spec = ValueSpec(prompts, REQUEST.target_new, REQUEST.subject)
        result = values_module.optimise_delta(model, tok, names, LAYER, hp, spec)
    return result.delta, gqa


@NEEDS_GQA_SWITCH
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_value_passes_read_shared_kv_heads_in_place(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the grouped-query models' value passes call SDPA with ``enable_gqa`` rather
    than a copy of each key/value head per query head, for the same delta; the switch is put
    back after each pass, and a switch the user set is left alone."""
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    in_place, gqa = _optimise(family)
    assert gqa and all(gqa)
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "0")
    copied, gqa = _optimise(family)
    assert gqa and not any(gqa)
    assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "0"
    assert in_place.norm() > 0
    torch.testing.assert_close(in_place, copied, rtol=1e-5, atol=1e-7)


@NEEDS_GQA_SWITCH
def test_shared_kv_heads_only_when_every_weight_is_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A masked ``enable_gqa`` call falls back to SDPA's slowest kernel on CUDA."""
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    split = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    assert not weights_on_cpu(split) and weights_on_cpu(split[0])
    with shared_kv_heads(False):
        assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    with shared_kv_heads(True):
        assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
