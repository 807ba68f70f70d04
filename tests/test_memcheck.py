"""rrome memcheck: shipped configs, weight placement, the plan's verdicts and fixes, and the
working-set model checked against torch's own accounting of real edits."""

from __future__ import annotations

import dataclasses
import json
import tempfile

import pytest
import torch
from accelerate import dispatch_model
from rich.console import Console

from rrome_cli import memcheck
from rrome_cli.compat import sdpa_shares_kv_heads
from rrome_cli.config import HParams, load_hparams, shipped_hparams
from rrome_cli.engine.edit import edit
from rrome_cli.engine.templates import generate_templates
from rrome_cli.engine.update import KeyCovariance
from rrome_cli.memcheck import (
    GiB,
    MemcheckError,
    edit_working_set,
    geometry_for,
    measure_peak,
    meta_model,
    parse_max_memory,
    plan,
    render,
)
from rrome_cli.models.families import FAMILIES, module_names
from rrome_cli.models.loading import load_config, load_model
from rrome_cli.models.registry import ALIASES
from rrome_cli.models.tiny import tiny_model
from rrome_cli.requests import EditRequest

REQUEST = EditRequest(
    prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"
)
TINY_HPARAMS = HParams(
    layers=[1], v_num_grad_steps=5, context_template_length_params=[[3, 2]], mom2_adjustment=False
)
# Published parameter counts (model cards / papers), to the precision they are usually quoted.
PARAMETERS = {
    "gpt2-xl": 1.5576e9,
    "gpt-j-6b": 6.0509e9,
    "llama2-7b": 6.7384e9,
    "llama3-8b": 8.0303e9,
    "mistral-7b": 7.2417e9,
    "qwen2.5-7b": 7.6156e9,
    "smollm2-135m": 134.5e6,
}

# transformers releases without this switch copy the key/value heads (the same result)
NEEDS_GQA_SWITCH = pytest.mark.skipif(
    not sdpa_shares_kv_heads(), reason="this transformers has no TRANSFORMERS_SDPA_FORCE_GQA"
)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def param_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_every_alias_config_loads_offline_and_has_the_published_size(offline, alias: str) -> None:
    config = load_config(alias)
    assert config.architectures[0] in FAMILIES
    count = sum(p.numel() for p in meta_model(config, torch.bfloat16).parameters())
    assert count == pytest.approx(PARAMETERS[alias], rel=2e-3)


def test_shipped_configs_carry_the_checkpoint_dtype_and_attention_shape(offline) -> None:
    llama2, mistral, smol = (load_config(a) for a in ("llama2-7b", "mistral-7b", "smollm2-135m"))
    assert llama2.dtype == torch.float16 and llama2.num_key_value_heads == 32
    assert mistral.dtype == torch.bfloat16 and mistral.num_key_value_heads == 8
    assert mistral.sliding_window == 4096
    assert smol.dtype == torch.bfloat16 and smol.tie_word_embeddings


# ----------------------------------------------------------------------------------- parsing


def test_parse_max_memory_reads_accelerate_keys_and_sizes() -> None:
    limits = parse_max_memory("0=24GiB, cuda:1=24GB,cpu=64GiB,disk=500GB")
    assert limits == {0: 24 * GiB, 1: 24 * 10**9, "cpu": 64 * GiB, "disk": 500 * 10**9}


@pytest.mark.parametrize("spec", ["0:24GiB", "gpu=24GiB", "0=lots"])
def test_parse_max_memory_names_the_bad_part(spec: str) -> None:
    with pytest.raises(MemcheckError, match="--max-memory"):
        parse_max_memory(spec)


def test_a_gpu_this_machine_lacks_is_planned_at_an_assumed_size_and_said_so() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = plan("llama2-7b", "fp16", "0,1", None, HParams())
    assert [d.capacity for d in result.devices[:2]] == [24 * 2**30] * 2
    assert any(
        "cuda:1 is not on this machine" in n and "--max-memory 1=" in n for n in result.notes
    )
    given = plan("llama2-7b", "fp16", "0", {0: "40GiB"}, HParams())
    assert given.devices[0].capacity == 40 * 2**30
    assert not any("not on this machine" in n for n in given.notes)


# ------------------------------------------------------------------------------------- plans


def test_llama2_fp16_on_two_24gib_cards_splits_the_weights_and_fits(offline) -> None:
    hp = load_hparams(shipped_hparams("llama2-7b"))
    result = plan("llama2-7b", "fp16", "0,1", {0: "24GiB", 1: "24GiB"}, hp)
    weights = {d.device: d.weights for d in result.devices}
    assert set(weights) == {"cuda:0", "cuda:1"} and min(weights.values()) > 5 * GiB
    meta = meta_model(load_config("llama2-7b"), torch.float16)
    assert sum(weights.values()) == param_bytes(meta)
    assert sum(weights.values()) == pytest.approx(13.48e9, rel=1e-3)
    assert result.edit_device == "cuda:0"  # layer 5 is in the first half
    # Layers above 5 on cuda:1 keep activations for backprop there too.
    assert all(d.edit > 0 for d in result.devices)
    assert result.fits and result.fix == ""
    assert json.loads(result.to_json())["fits"] is True


def test_two_cards_with_disk_offload_are_planned(offline) -> None:
    """accelerate balances the GPUs of a map that also offloads to disk (it read "disk" as a
    torch device: an internal error), and the cheapest fix may add a GPU beside a disk."""
    hp = load_hparams(shipped_hparams("llama2-7b"))
    result = plan("llama2-7b", "fp16", "0,1", {0: "4GiB", 1: "4GiB", "disk": "100GiB"}, hp)
    weights = {d.device: d.weights for d in result.devices}
    assert set(weights) == {"cuda:0", "cuda:1", "disk"} and min(weights.values()) > GiB
    assert sum(weights.values()) == param_bytes(meta_model(load_config("llama2-7b"), torch.float16))
    gpt2 = load_hparams(shipped_hparams("gpt2-xl"))
    small = plan("gpt2-xl", "fp32", None, {0: "2GiB", "cpu": "8GiB", "disk": "50GiB"}, gpt2)
    assert not small.fits and small.fix  # trying a second GPU beside the disk


def test_mistral_bf16_on_one_24gib_card_fits_and_16gib_does_not(offline) -> None:
    hp = load_hparams(shipped_hparams("mistral-7b"))
    big = plan("mistral-7b", "bf16", None, parse_max_memory("0=24GiB"), hp)
    (card,) = big.devices
    assert card.device == "cuda:0" and card.weights == param_bytes(
        meta_model(load_config("mistral-7b"), torch.bfloat16)
    )
    # The edit needs more than the Cholesky factor of the 14336 x 14336 key covariance.
    assert card.edit > 14336**2 * 4
    assert big.fits and card.headroom == 24 * GiB - card.total
    small = plan("mistral-7b", "bf16", None, parse_max_memory("0=16GiB"), hp)
    assert not small.fits and "does not fit" in small.verdict()
    assert small.fix  # some change is proposed


def test_the_gpu_reserve_grows_with_the_weights_and_covers_the_measured_7b_run(offline) -> None:
    """On an H200 a batch-1 run of the Llama-2-7B shape in bf16 peaked at 15,486 MiB
    (docs/results.md): a 15 GiB card (a T4's usable memory) must not be planned as fitting,
    while SmolLM2's reserve stays about half a GiB."""
    hp = load_hparams(shipped_hparams("llama2-7b"))
    t4 = plan("llama2-7b", "bf16", None, parse_max_memory("0=15GiB"), hp)
    (card,) = t4.devices
    assert card.reserve == memcheck.cuda_reserve(card.weights) > GiB // 2 + card.weights // 9
    assert not t4.fits and card.total > 15_486 * 2**20
    small = load_hparams(shipped_hparams("smollm2-135m"))
    (smol,) = plan("smollm2-135m", "bf16", "0", {0: "24GiB"}, small).devices
    assert GiB // 2 < smol.reserve < GiB // 2 + 40 * 2**20


def test_llama2_fp32_on_one_24gib_card_does_not_fit_and_half_precision_does(offline) -> None:
    hp = load_hparams(shipped_hparams("llama2-7b"))
    result = plan("llama2-7b", "fp32", None, parse_max_memory("0=24GiB"), hp)
    assert not result.fits
    assert result.devices[0].weights > 24 * GiB
    assert "--bf16" in result.fix or "--fp16" in result.fix


def test_more_templates_cost_more_and_the_weights_do_not_change(offline) -> None:
    hp = load_hparams(shipped_hparams("llama2-7b"))
    few = plan("llama2-7b", "bf16", None, {0: "80GiB"}, hp, n_templates=3)
    many = plan("llama2-7b", "bf16", None, {0: "80GiB"}, hp, n_templates=40)
    assert few.devices[0].weights == many.devices[0].weights
    assert many.components["value_step"] > 5 * few.components["value_step"]


def test_an_edited_layer_offloaded_to_disk_cannot_run() -> None:
    hp = load_hparams(shipped_hparams("tiny-llama"))
    result = plan("tiny-llama", "fp32", "cpu", {"cpu": 100_000, "disk": 10**9}, hp)
    assert any(d.device == "disk" and d.weights > 0 for d in result.devices)
    assert not result.fits and "offloaded" in result.verdict()


def test_render_shows_every_device_and_the_verdict(offline) -> None:
    hp = load_hparams(shipped_hparams("llama2-7b"))
    result = plan("llama2-7b", "fp32", None, parse_max_memory("0=24GiB"), hp)
    console = Console(record=True, width=160)
    render(result, console)
    text = console.export_text()
    assert "cuda:0" in text and "does not fit" in text and "cheapest fix" in text
    assert "Cholesky" in text and "value step" in text


# ---------------------------------------------------------------------------- measuring memory


def test_measure_peak_counts_live_tensor_bytes_exactly() -> None:
    def sequential() -> None:
        a = torch.empty(10_000_000, dtype=torch.uint8)
        del a
        b = torch.empty(20_000_000, dtype=torch.uint8)
        b.view(2, -1)[0].fill_(1)  # views and in-place ops allocate nothing

    def together() -> torch.Tensor:
        a = torch.empty(10_000_000, dtype=torch.uint8)
        b = torch.empty(20_000_000, dtype=torch.uint8)
        return a[:1] + b[:1]

    assert measure_peak(sequential) == 20_000_000
    assert measure_peak(together) == 30_000_000 + 1


def test_measure_peak_ignores_tensors_made_before_and_sees_backward() -> None:
    x = torch.randn(1000, 1000, requires_grad=True)
    w = torch.randn(1000, 1000)

    def step() -> None:
        # y (4 MB) kept for relu's backward, relu output (4 MB) kept for the matmul's, product
        # (4 MB); backward then needs grads of the same sizes while those are freed.
        (x @ w).relu().matmul(w).sum().backward()

    assert measure_peak(step) == 12_000_000 + 8  # plus the 4-byte sum and its gradient


# --------------------------------------------------------------------- predicted vs measured


def _predicted_vs_measured(model, tok, hp: HParams, covariances=None) -> tuple[int, int]:
    names = module_names(type(model).__name__, hp.module_overrides())
    templates = generate_templates(model, tok, hp.context_template_length_params)
    geometry = geometry_for(tok, REQUEST, templates, whole_bare=hp.v_realized_delta == "bare")
    dtype = next(model.parameters()).dtype
    predicted = edit_working_set(model.config, dtype, hp, geometry, names)["in_edit"]
    measured = measure_peak(lambda: edit(model, tok, REQUEST, hp, names, covariances, templates))
    return predicted, measured


@pytest.mark.parametrize("realized", ["off", "bare"])
def test_predicted_edit_working_set_matches_a_tiny_edit(tiny, realized: str) -> None:
    """The trace runs the engine's packed pass on the request's own rows (the bare prompt
    whole under ``bare``, whose share of delta it reads off the keys as the engine does)."""
    model, tok = tiny
    hp = dataclasses.replace(TINY_HPARAMS, v_realized_delta=realized)
    predicted, measured = _predicted_vs_measured(model, tok, hp)
    assert predicted == pytest.approx(measured, rel=0.15)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_predicted_edit_working_set_matches_smollm2(dtype: str) -> None:
    loaded = load_model(None, dtype, "cpu")
    hp = HParams(layers=[5], v_num_grad_steps=2, context_template_length_params=[[5, 4]])
    d_in = loaded.model.config.intermediate_size
    keys = torch.randn(2 * d_in, d_in, generator=torch.Generator().manual_seed(0))
    covariances = {5: KeyCovariance(keys.T @ keys / keys.shape[0], hp.mom2_ridge)}
    predicted, measured = _predicted_vs_measured(loaded.model, loaded.tok, hp, covariances)
    assert predicted == pytest.approx(measured, rel=0.15)


def test_value_step_costs_scale_with_the_batch() -> None:
    config = tiny_model("llama")[0].config
    names = module_names("LlamaForCausalLM")
    small = memcheck.Geometry(rows=3, prefix=10, suffix=4, targets=4, key_tokens=12)
    large = memcheck.Geometry(rows=12, prefix=10, suffix=4, targets=16, key_tokens=12)
    a = memcheck.value_step_costs(config, torch.float32, names, small)
    b = memcheck.value_step_costs(config, torch.float32, names, large)
    # Per-layer costs are per row: four times the rows, four times the bytes (to rounding).
    assert b["backward"].above == pytest.approx(4 * a["backward"].above, rel=0.05)


@NEEDS_GQA_SWITCH
def test_value_step_costs_without_copied_kv_heads() -> None:
    """On CPU (``shared_kv_heads``) a grouped-query layer keeps no copy of its key/value heads
    per query head through backward; on CUDA transformers makes them."""
    config = tiny_model("llama")[0].config  # 4 query heads share 2 key/value heads
    names = module_names("LlamaForCausalLM")
    geo = memcheck.Geometry(rows=3, prefix=10, suffix=4, targets=4, key_tokens=12)
    copied = memcheck.value_step_costs(config, torch.float32, names, geo, kv_in_place=False)
    shared = memcheck.value_step_costs(config, torch.float32, names, geo, kv_in_place=True)
    for phase in ("forward", "head", "backward"):
        assert shared[phase].above < copied[phase].above
    assert shared["step"] == copied["step"] and shared["prefix"] == copied["prefix"]


# --------------------------------------------------------------------------- hybrid placement


def test_an_edit_across_cpu_and_disk_offload_equals_the_single_device_edit() -> None:
    model, tok = tiny_model("llama")
    names = module_names("LlamaForCausalLM")
    templates = generate_templates(model, tok, TINY_HPARAMS.context_template_length_params)
    reference = edit(model, tok, REQUEST, TINY_HPARAMS, names, None, templates)
    hybrid, _ = tiny_model("llama")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "disk",
        "model.layers.1": "cpu",
        "model.layers.2": "disk",
        "model.layers.3": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    with tempfile.TemporaryDirectory() as folder:
        hybrid = dispatch_model(
            hybrid, device_map=device_map, main_device="cpu", offload_dir=folder
        )
        assert hybrid.model.layers[2].mlp.down_proj.weight.device.type == "meta"
        runs: list = []
        measured = measure_peak(
            lambda: runs.append(edit(hybrid, tok, REQUEST, TINY_HPARAMS, names, None, templates))
        )
        edited = hybrid.model.layers[1].mlp.down_proj.weight.detach().clone()
    (result,) = runs
    assert result.status == "applied"
    # Offloaded layers above the edited one stream their weights in, and autograd keeps them.
    geometry = geometry_for(tok, REQUEST, templates)
    planned = plan(
        "tiny-llama",
        "fp32",
        "cpu",
        {"cpu": 10**9, "disk": 10**9},
        TINY_HPARAMS,
        geometry=geometry,
        device_map=device_map,
    )
    (cpu,) = [d for d in planned.devices if d.device == "cpu"]
    assert cpu.edit == pytest.approx(measured, rel=0.15)
    assert cpu.edit > edit_working_set(model.config, torch.float32, TINY_HPARAMS, geometry, names)[
        "in_edit"
    ] + 2 * param_bytes(hybrid.model.layers[2])
    ours, theirs = result.layers[0].patch, reference.layers[0].patch
    torch.testing.assert_close(ours.left, theirs.left)
    torch.testing.assert_close(ours.right, theirs.right)
    torch.testing.assert_close(edited, model.model.layers[1].mlp.down_proj.weight.detach())


def test_relation_phrasings_add_value_rows(offline) -> None:
    """--phrasings: up to max_phrasings more prompts in the value step, nothing else."""
    from rrome_cli.memcheck import estimate_geometry

    hp = load_hparams(shipped_hparams("llama2-7b"))
    assert estimate_geometry(hp, phrasings=6).rows == estimate_geometry(hp).rows + 6
    plain = plan("llama2-7b", "bf16", None, {0: "80GiB"}, hp)
    phrased = plan("llama2-7b", "bf16", None, {0: "80GiB"}, hp, phrasings=6)
    assert phrased.devices[0].weights == plain.devices[0].weights
    assert phrased.components["value_step"] > plain.components["value_step"]


def test_bare_prompt_run_whole_adds_to_the_value_step(offline) -> None:
    """v_realized_delta "bare" runs the bare prompt whole, in place of its cached row: a longer
    row in the value step's packed pass, nothing else."""
    from rrome_cli.memcheck import estimate_geometry

    hp = load_hparams(shipped_hparams("llama2-7b"))
    bare = dataclasses.replace(hp, v_realized_delta="bare")
    assert estimate_geometry(hp).whole == 0
    assert estimate_geometry(bare).whole > estimate_geometry(bare).suffix
    plain = plan("llama2-7b", "bf16", None, {0: "80GiB"}, hp)
    whole = plan("llama2-7b", "bf16", None, {0: "80GiB"}, bare)
    assert whole.devices[0].weights == plain.devices[0].weights
    assert whole.components["value_step"] > plain.components["value_step"]


def test_fewer_templates_fix_keeps_the_phrasing_rows(offline) -> None:
    """The "fewer context templates" fix counts context templates only, and the plan it
    proposes still holds the phrasings' rows."""
    import re

    hp = load_hparams(shipped_hparams("llama2-7b"))
    few = plan("llama2-7b", "bf16", "cpu", {"cpu": "80GiB"}, hp, n_templates=4, phrasings=6)
    limit = {"cpu": few.devices[0].total + 64 * 2**20}
    many = plan("llama2-7b", "bf16", "cpu", limit, hp, n_templates=40, phrasings=6)
    assert not many.fits
    found = re.search(r"fewer context templates: (\d+) instead of (\d+)", many.fix)
    assert found is not None, many.fix
    proposed, current = int(found[1]), int(found[2])
    assert current == 40
    assert plan("llama2-7b", "bf16", "cpu", limit, hp, n_templates=proposed, phrasings=6).fits


def test_a_batch_is_planned_from_traces_of_one_and_two_and_grows_linearly() -> None:
    """Requests in flight together (--batch): one and two are traced as the engine packs
    them; beyond, each adds BATCH_GROWTH times the second's increment, on every device."""
    hp = dataclasses.replace(load_hparams(shipped_hparams("smollm2-135m")), mom2_adjustment=False)

    def edit_bytes(jobs: int) -> int:
        p = memcheck.plan("smollm2-135m", "bf16", "0", {0: "80GiB"}, hp, jobs=jobs)
        assert p.geometry.jobs == jobs
        return next(d for d in p.devices if d.device == p.edit_device).edit

    one, two, five, nine = (edit_bytes(n) for n in (1, 2, 5, 9))
    assert one < two
    step = memcheck.BATCH_GROWTH * (two - one)
    assert five == pytest.approx(one + 4 * step, rel=1e-6)
    assert nine - five == pytest.approx(4 * step, rel=1e-6)


def test_largest_batch_is_the_most_that_fits() -> None:
    """--batch auto: the count memcheck picks fits and one more does not (below the cap);
    more memory never gives fewer; a device that fits no batch still gets 1."""
    hp = dataclasses.replace(load_hparams(shipped_hparams("smollm2-135m")), mom2_adjustment=False)
    picked = {}
    for size in ("3GiB", "6GiB"):
        n = memcheck.largest_batch("smollm2-135m", "bf16", "0", {0: size}, hp)
        fits = [
            memcheck.plan("smollm2-135m", "bf16", "0", {0: size}, hp, jobs=jobs).fits
            for jobs in (n, n + 1)
        ]
        assert fits == [True, False]
        picked[size] = n
    assert 1 < picked["3GiB"] < picked["6GiB"] < 64
    assert memcheck.largest_batch("smollm2-135m", "bf16", "0", {0: "600MiB"}, hp) == 1
