"""`rrome apply --format peft`: the adapter PEFT loads gives the model `rrome apply` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel
from typer.testing import CliRunner

from rrome_cli.cli import app
from rrome_cli.engine.update import Patch, apply_patch
from rrome_cli.export_peft import (
    SUM_OF_INDEPENDENT,
    BaseModel,
    build_adapter,
    edit_folder_names,
    edits_of,
)
from rrome_cli.models.families import FAMILIES as ARCHITECTURES
from rrome_cli.models.families import weight_as_out_in
from rrome_cli.models.tiny import tiny_model
from rrome_cli.patches import save_patches

peft = pytest.importorskip("peft")

DATA = Path(__file__).resolve().parents[1] / "data"
SAMPLE = DATA / "counterfact-sample.jsonl"
PROMPT = "The mother tongue of Danielle Darrieux is"
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def said(result) -> str:  # rich wraps long lines anywhere
    return " ".join(result.stderr.split())


def rewrite_module(model: PreTrainedModel, layer: int) -> str:
    return ARCHITECTURES[type(model).__name__].rewrite(layer)


def synthetic_patches(
    model: PreTrainedModel, per_layer: dict[int, int], seed: int = 0, scale: float = 1.0
) -> list[Patch]:
    """Edits in the form a run writes: edit i has one patch per layer that still has edits
    left (``per_layer``: layer -> edits), unit left vectors, random right vectors."""
    gen = torch.Generator().manual_seed(seed)
    patches = []
    for i in range(max(per_layer.values())):
        for layer, count in per_layer.items():
            if i >= count:
                continue
            module = rewrite_module(model, layer)
            d_out, d_in = weight_as_out_in(model.get_submodule(module)).shape
            left = torch.randn(d_in, generator=gen)
            right = torch.randn(d_out, generator=gen) * scale
            patches.append(Patch(layer, module, left / left.norm(), right, "torch.float32", str(i)))
    return patches


def logits(model: PreTrainedModel, tok, text: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(tok(text, return_tensors="pt").input_ids).logits


def with_adapter(family: str, adapter: Path) -> PreTrainedModel:
    base, _ = tiny_model(family)
    return peft.PeftModel.from_pretrained(base, str(adapter)).eval()


def assert_same_model(family: str, adapter: Path, checkpoint: Path) -> None:
    """The base model + adapter gives the checkpoint's logits; merged, its weights."""
    base, tok = tiny_model(family)
    edited = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    want = logits(edited, tok)
    assert (want - logits(base, tok)).abs().max() > 0.05  # the edits move the logits
    adapted = with_adapter(family, adapter)
    torch.testing.assert_close(logits(adapted, tok), want, rtol=0, atol=1e-4)
    merged = adapted.merge_and_unload().state_dict()
    for name, weight in edited.state_dict().items():
        torch.testing.assert_close(merged[name], weight, rtol=0, atol=1e-5, msg=name)


def test_adapter_gives_the_applied_checkpoint_on_every_family(tmp_path: Path, family: str) -> None:
    """Edits at two layers, three at one and two at the other: target_modules with a
    rank_pattern; GPT-2's Conv1D with fan_in_fan_out."""
    model, _ = tiny_model(family)
    patches = synthetic_patches(model, {1: 3, 2: 2})
    path = tmp_path / "patches.safetensors"
    save_patches(path, patches)
    checkpoint, adapter = tmp_path / "ckpt", tmp_path / "adapter"
    result = run("apply", path, "--model", f"tiny-{family}", "--out", checkpoint)
    assert result.exit_code == 0, result.stderr
    result = run("apply", path, "--model", f"tiny-{family}", "--out", adapter, "--format", "peft")
    assert result.exit_code == 0, result.stderr
    config = json.loads((adapter / "adapter_config.json").read_text())
    one, two = rewrite_module(model, 1), rewrite_module(model, 2)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == [one, two]
    assert config["rank_pattern"] == config["alpha_pattern"] == {one: 3, two: 2}
    assert config["r"] == config["lora_alpha"] == 3
    assert config["fan_in_fan_out"] is (family == "gpt2")
    assert config["base_model_name_or_path"] == f"tiny-{family}"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    a = tensors[f"base_model.model.{one}.lora_A.weight"]
    assert a.dtype == torch.float32 and a.shape[0] == 3
    torch.testing.assert_close(a[2], patches[4].left)  # stacked in the order applied
    assert "rrome apply --format peft" in (adapter / "README.md").read_text()
    assert_same_model(family, adapter, checkpoint)


def test_more_edits_than_the_matrix_holds_are_compressed_exactly(tmp_path: Path) -> None:
    """70 edits at a (64, 128) module: rank 64, the same delta W, and the command says so."""
    model, _ = tiny_model("llama")
    patches = synthetic_patches(model, {1: 70}, scale=0.1)
    module = patches[0].module
    adapter = build_adapter(patches, BaseModel("tiny-llama", None, False))
    [factors] = adapter.factors
    assert factors.compressed and factors.rank == 64 and factors.edits == 70
    want = sum(torch.outer(p.right.double(), p.left.double()) for p in patches)
    torch.testing.assert_close(factors.b.double() @ factors.a.double(), want, rtol=0, atol=1e-5)
    assert adapter.config["r"] == adapter.config["lora_alpha"] == 64
    path = tmp_path / "patches.safetensors"
    save_patches(path, patches)
    target = tmp_path / "adapter"
    result = run("apply", path, "--model", "tiny-llama", "--out", target, "--format", "peft")
    assert result.exit_code == 0, result.stderr
    assert f"{module}: 70 edits" in said(result) and "compressed exactly" in said(result)
    assert "compressed" in (target / "README.md").read_text()
    assert run("apply", path, "--model", "tiny-llama", "--out", tmp_path / "ckpt").exit_code == 0
    assert_same_model("llama", target, tmp_path / "ckpt")


def test_fewer_edits_than_the_matrix_holds_are_stacked_as_they_are() -> None:
    model, _ = tiny_model("gpt2")  # c_proj: W (64, 256)
    patches = synthetic_patches(model, {1: 63})
    [factors] = build_adapter(patches, BaseModel("tiny-gpt2", None, True)).factors
    assert not factors.compressed and factors.rank == 63
    assert torch.equal(factors.a, torch.stack([p.left for p in patches]))
    assert torch.equal(factors.b, torch.stack([p.right for p in patches], dim=1))


@pytest.fixture(scope="module")
def independent_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real independent run of two requests on tiny-llama."""
    out = tmp_path_factory.mktemp("independent") / "run"
    result = run("edit", SAMPLE, "--model", "tiny-llama", "--limit", "2", "--out", out)
    assert result.exit_code == 0, result.stderr
    return out


def test_each_edit_of_an_independent_run_is_its_own_adapter(
    tmp_path: Path, independent_run: Path
) -> None:
    from rrome_cli.patches import load_patches

    path = independent_run / "patches.safetensors"
    patches = load_patches(path)
    out = tmp_path / "each"
    args = ("--model", "tiny-llama", "--format", "peft")
    result = run("apply", path, *args, "--each", "--out", out)
    assert result.exit_code == 0, result.stderr
    index = json.loads((out / "adapters.json").read_text())
    assert [e["adapter"] for e in index] == [p.request for p in patches] == ["0", "1"]
    _, tok = tiny_model("llama")
    for patch, entry in zip(patches, index, strict=True):
        alone, _ = tiny_model("llama")  # the base model with this one edit, as apply makes it
        apply_patch(alone, patch)
        adapted = with_adapter("llama", out / entry["adapter"])
        torch.testing.assert_close(logits(adapted, tok), logits(alone, tok), rtol=0, atol=1e-4)
        merged = adapted.merge_and_unload().get_submodule(patch.module).weight
        torch.testing.assert_close(merged, alone.get_submodule(patch.module).weight, atol=1e-6,
                                   rtol=0)  # fmt: skip
    # all together: the command and the README say what a sum of independent edits is not
    combined = tmp_path / "combined"
    result = run("apply", path, *args, "--out", combined)
    assert result.exit_code == 0, result.stderr
    assert "a sum of independent edits is not what a sequential run would make" in said(result)
    assert SUM_OF_INDEPENDENT in (combined / "README.md").read_text()


def test_each_of_a_sequential_run_says_later_edits_stand_on_earlier_ones(tmp_path: Path) -> None:
    model, _ = tiny_model("qwen2")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_patches(run_dir / "patches.safetensors", synthetic_patches(model, {1: 2, 3: 2}))
    (run_dir / "run.json").write_text(json.dumps({"protocol": "sequential"}))
    out = tmp_path / "each"
    result = run(
        "apply", run_dir / "patches.safetensors", "--model", "tiny-qwen2", "--format", "peft",
        "--each", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "sequential run" in said(result)
    assert "made on the model holding edits 1 to 1" in (out / "1" / "README.md").read_text()
    assert "made on the model holding" not in (out / "0" / "README.md").read_text()
    config = json.loads((out / "1" / "adapter_config.json").read_text())
    assert config["r"] == 1 and len(config["target_modules"]) == 2  # one edit, two layers
    combined = tmp_path / "combined"
    args = ("--model", "tiny-qwen2", "--format", "peft", "--out", combined)
    result = run("apply", run_dir / "patches.safetensors", *args)
    assert result.exit_code == 0 and "independent" not in said(result)


def test_half_precision_factors_when_asked(tmp_path: Path) -> None:
    model, _ = tiny_model("gpt-neox")
    patches = synthetic_patches(model, {1: 2})
    path = tmp_path / "patches.safetensors"
    save_patches(path, patches)
    out = tmp_path / "adapter"
    args = ("--model", "tiny-gpt-neox", "--format", "peft", "--bf16", "--out", out)
    result = run("apply", path, *args)
    assert result.exit_code == 0, result.stderr
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_edits_are_grouped_and_named_per_request() -> None:
    def patch(module: str, request: str) -> Patch:
        return Patch(0, module, torch.ones(2), torch.ones(2), "torch.float32", request)

    patches = [patch("a", "7"), patch("b", "7"), patch("a", "7"), patch("a", "x.jsonl:3")]
    edits = edits_of(patches)  # the same request twice in a row: two edits (module a again)
    assert [[p.module for p in e] for e in edits] == [["a", "b"], ["a"], ["a"]]
    assert edit_folder_names(edits) == ["edit-1", "edit-2", "edit-3"]  # "7" twice; a path
    assert edit_folder_names(edits_of([patch("a", "7"), patch("a", "case-9")])) == ["7", "case-9"]


def test_bad_combinations_and_targets_exit_2(tmp_path: Path, monkeypatch) -> None:
    import rrome_cli.models.loading as loading

    model, _ = tiny_model("llama")
    path = tmp_path / "patches.safetensors"
    save_patches(path, synthetic_patches(model, {1: 1}))
    base = ("apply", path, "--model", "tiny-llama")
    result = run(*base, "--format", "peft", "--revert", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "unload the adapter" in said(result)
    result = run(*base, "--each", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "it needs --format peft" in said(result)
    result = run(*base, "--format", "gguf", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "choose checkpoint or peft" in said(result)
    assert not (tmp_path / "a").exists()
    # --out: never a directory that is not an adapter; an adapter only with --overwrite
    peft_out = ("--format", "peft", "--out")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    result = run(*base, *peft_out, other)
    assert result.exit_code == 2 and "is not an adapter" in said(result)
    assert (other / "notes.txt").read_text() == "keep me"
    adapter = tmp_path / "adapter"
    assert run(*base, *peft_out, adapter).exit_code == 0
    result = run(*base, *peft_out, adapter)
    assert result.exit_code == 2 and "--overwrite replaces it" in said(result)
    assert run(*base, *peft_out, adapter, "--overwrite", "--each").exit_code == 0
    assert (adapter / "adapters.json").exists() and not (adapter / "adapter_config.json").exists()
    # a patches file made for another model fails before anything is written
    result = run("apply", path, "--model", "tiny-gpt2", *peft_out, tmp_path / "b")
    assert result.exit_code == 2 and "which this model does not have" in said(result)
    assert not (tmp_path / "b").exists()
    # an unreadable one before the model is even looked at
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    monkeypatch.setattr(loading, "load_skeleton", lambda *a: pytest.fail("the model loaded"))
    result = run("apply", junk, "--model", "tiny-llama", *peft_out, tmp_path / "c")
    assert result.exit_code == 2 and "cannot read patches" in said(result)


@pytest.mark.slow
def test_smollm2_sequential_edits_as_an_adapter(tmp_path: Path) -> None:
    """Two real sequential edits of the embedded SmolLM2: PEFT on the base model gives the
    logits of `rrome apply`'s checkpoint, and merged, its weights."""
    from rrome_cli.config import load_hparams, shipped_hparams
    from rrome_cli.engine.edit import edit
    from rrome_cli.models.loading import load_model
    from rrome_cli.requests import EditRequest

    lm = load_model()
    hp = load_hparams(shipped_hparams("smollm2-135m"))
    hp.mom2_adjustment = False  # C = I keeps this test free of the statistics pass
    hp.context_template_length_params = [[5, 4]]
    patches = []
    for subject, new in (("Japan", "Kyoto"), ("Italy", "Milan")):
        request = EditRequest(prompt="The capital of {} is", subject=subject, target_new=new)
        result = edit(lm.model, lm.tok, request, hp, lm.names)
        assert result.status == "applied"
        patches += result.patches
    path = tmp_path / "patches.safetensors"
    save_patches(path, patches)
    adapter, checkpoint = tmp_path / "adapter", tmp_path / "ckpt"
    assert run("apply", path, "--format", "peft", "--out", adapter).exit_code == 0
    assert run("apply", path, "--out", checkpoint).exit_code == 0
    del lm
    base = load_model()
    edited = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    prompt = "The capital of Japan is"
    want, before = logits(edited, base.tok, prompt), logits(base.model, base.tok, prompt)
    assert (want - before).abs().max() > 1.0
    adapted = peft.PeftModel.from_pretrained(base.model, str(adapter)).eval()
    torch.testing.assert_close(logits(adapted, base.tok, prompt), want, rtol=0, atol=2e-4)
    merged = adapted.merge_and_unload().state_dict()
    for name, weight in edited.state_dict().items():
        torch.testing.assert_close(merged[name], weight, rtol=0, atol=1e-6, msg=name)
