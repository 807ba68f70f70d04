"""Any decoder-only architecture, found by structure: tiny random models built in-process from
transformers' own configuration classes (``models.tiny.ARCHITECTURES``), each edited end to end.

For each: the modules found from the model itself (and, for the families table's, the same
names as the table); the logits the value optimisation reads equal the model's own (soft-capping,
scaling); the packed value pass equals a plain forward; an edit maps k* to W k* + delta at the
edited module and raises the bare prompt's target probability; the revert is exact; the
patches apply to, and revert from, a checkpoint saved to disk. Mixtures of experts exit 2.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typer.testing import CliRunner

from rrome_cli import compat
from rrome_cli.cli import app
from rrome_cli.config import HParams, default_layer
from rrome_cli.engine.edit import edit
from rrome_cli.engine.keys import templated
from rrome_cli.engine.packing import PackedPass, Readout
from rrome_cli.engine.values import ValueResult, kl_row, prompt_row
from rrome_cli.models.families import FAMILIES, UnknownArchitectureError, weight_as_out_in
from rrome_cli.models.head import check_output_head
from rrome_cli.models.structure import find_structure, resolve
from rrome_cli.models.tiny import ARCHITECTURES, REFUSED, tiny_architecture
from rrome_cli.patches import save_patches
from rrome_cli.requests import EditRequest

LAYER = 1
TEMPLATES = ["{}", "The capital of Japan is Tokyo. {}", "Rome. {}"]
REQUEST = EditRequest(
    prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"
)
runner = CliRunner()


def build(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    built = tiny_architecture(name)
    if built is None:
        pytest.skip(f"this transformers has no {ARCHITECTURES[name][0]}")
    return built


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def hparams(**overrides: Any) -> HParams:
    settings: dict[str, Any] = dict(
        layers=[LAYER],
        v_num_grad_steps=25,
        v_lr=1.0,
        v_stop="target",
        v_realized_delta="bare",
        k_bare_min=0.6,
        context_template_length_params=[[3, 2]],
        mom2_adjustment=False,
    )
    return HParams(**{**settings, **overrides})


def subject_end(template: str) -> tuple[str, int]:
    text = template.replace("{}", REQUEST.text)
    return text, template.index("{}") + REQUEST.prompt.index("{}") + len(REQUEST.subject)


def subject_last(tok: PreTrainedTokenizerBase, text: str, end: int) -> int:
    """Our own: the subject's last token, from the tokenizer's offsets (specials: (0, 0))."""
    enc = tok(text, return_offsets_mapping=True)
    return max(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > a)


@torch.no_grad()
def at_subject(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, module: nn.Module, read_input: bool
) -> torch.Tensor:
    """``module``'s input (or output) at the subject's last token of each template, one
    unpadded prompt at a time, the tokenizer's own special tokens included: (n, d) fp32."""
    rows = []
    for template in TEMPLATES:
        text, end = subject_end(template)
        seen: list[torch.Tensor] = []
        if read_input:
            hook = module.register_forward_pre_hook(lambda _m, args, s=seen: s.append(args[0]))
        else:
            hook = module.register_forward_hook(
                lambda _m, _i, out, s=seen: s.append(out[0] if isinstance(out, tuple) else out)
            )
        try:
            model(input_ids=torch.tensor([tok(text).input_ids]))
        finally:
            hook.remove()
        rows.append(seen[0][0, subject_last(tok, text, end)].double())
    return torch.stack(rows)


@torch.no_grad()
def target_prob(model: PreTrainedModel, tok: PreTrainedTokenizerBase, text: str) -> float:
    """Mean probability of the target's tokens after ``text``, from the model's own logits."""
    prompt = tok(text).input_ids
    full = tok(f"{text} {REQUEST.target_new}").input_ids
    assert full[: len(prompt)] == prompt
    logits = model(input_ids=torch.tensor([full])).logits[0].float()
    probs = torch.softmax(logits, -1)
    return float(
        torch.stack([probs[j - 1, full[j]] for j in range(len(prompt), len(full))]).mean()
    )


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    expected = expected.double()
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale)


def test_at_least_fifteen_architectures() -> None:
    assert len(ARCHITECTURES) >= 15
    assert {type(tiny_architecture(a)[0]).__name__ for a in ARCHITECTURES} >= set(FAMILIES)


def test_structure_finds_the_modules(arch: str) -> None:
    model, _ = build(arch)
    found = find_structure(model)
    assert found.found_by == "structure" and found.n_layers == 3
    table = FAMILIES.get(type(model).__name__)
    if table is not None:  # the table is a cross-check: the structure names the same modules
        assert found.names == table
    assert found.head is not None and model.get_submodule(found.head) is (
        model.get_output_embeddings()
    )
    assert found.final_norm is not None
    # the delta site's output is W's: delta added to the MLP output is what the update adds
    names = found.names
    rewrite, mlp = (model.get_submodule(n) for n in (names.rewrite(LAYER), names.mlp(LAYER)))
    close(at_subject(model, _, mlp, False), at_subject(model, _, rewrite, False), rtol=1e-6)
    resolved = resolve(model, type(model).__name__)
    assert resolved.names == names
    assert resolved.found_by == ("table" if table else "structure")


def test_value_pass_reads_the_model_own_logits(arch: str) -> None:
    """The packed pass (prefix cache, blocks below run once, the head applied by rrome) gives
    the hidden states and log-probabilities of a plain forward of each row."""
    model, tok = build(arch)
    check_output_head(model)
    names = find_structure(model).names
    prompts = [templated(tok, REQUEST, t) for t in TEMPLATES]
    rows = [prompt_row(tok, p, REQUEST.target_new, i == 0) for i, p in enumerate(prompts)]
    rows.append(kl_row(tok, REQUEST.subject))
    packed = PackedPass(model, rows, [names.layer(i) for i in range(LAYER)])
    with torch.no_grad():
        for _ in range(2):  # the second pass reuses the cache and the blocks below
            hidden = packed.hidden()
            readout = Readout.of(packed, rows)
            got = packed.log_probs(hidden[readout.slots])
            expected = []
            for r in rows:
                logits = model(input_ids=torch.tensor([r.ids])).logits[0].float()
                at = [j for j, _ in r.targets] or [r.subject]
                expected.append(torch.log_softmax(logits[at], -1))
            close(got, torch.cat(expected), rtol=1e-4)


def test_edit_end_to_end(arch: str, values_seen: list[ValueResult], tmp_path: Path) -> None:
    model, tok = build(arch)
    names = resolve(model, type(model).__name__).names
    rewrite = model.get_submodule(names.rewrite(LAYER))
    values = values_seen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    k_star = at_subject(model, tok, rewrite, True).mean(0)
    w = weight_as_out_in(rewrite).detach().double().clone()
    bare = REQUEST.prompt.replace("{}", REQUEST.subject)
    p_before = target_prob(model, tok, bare)

    result = edit(model, tok, REQUEST, hparams(), names, templates=TEMPLATES)

    assert result.status == "applied", result.reason
    (patch,) = result.patches
    assert patch.module == names.rewrite(LAYER)
    delta = values[0].delta.double()
    assert delta.norm() > 0
    w_new = weight_as_out_in(rewrite).detach().double()
    close(w_new @ k_star, w @ k_star + delta, rtol=1e-4)  # W' k* = v* = W k* + delta
    p_after = target_prob(model, tok, bare)
    assert p_after > 1.5 * p_before, (p_before, p_after)
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    result.revert(model)
    for key, tensor in model.state_dict().items():  # bit for bit
        assert torch.equal(tensor, before[key]), key

    # the patches on a checkpoint saved to disk: apply gives the edited W, revert W back
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    patches = tmp_path / "patches.safetensors"
    save_patches(patches, result.patches)
    weight = names.rewrite(LAYER) + ".weight"
    applied, reverted = tmp_path / "applied", tmp_path / "reverted"
    out = runner.invoke(app, ["apply", str(patches), "--model", str(base), "--out", str(applied)])
    assert out.exit_code == 0, out.output
    again = tiny_from(applied)
    assert torch.equal(again.state_dict()[weight], edited[weight])
    args = ["apply", str(patches), "--model", str(applied), "--revert", "--out", str(reverted)]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    back = tiny_from(reverted).state_dict()
    torch.testing.assert_close(back[weight], before[weight], rtol=0, atol=1e-6)
    assert not torch.equal(edited[weight], before[weight])


def tiny_from(path: Path) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("name", ["cohere", "falcon", "gemma3-text", "granite", "olmo2"])
def test_cli_edits_a_checkpoint_of_an_architecture_outside_the_table(
    name: str, tmp_path: Path
) -> None:
    """``rrome edit --model DIR``, no hparams file: memcheck, the key statistics and the edit
    run on what the structure found, with the default recipe at the depth rule's layer."""
    model, tok = build(name)
    assert type(model).__name__ not in FAMILIES
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    sample = Path(__file__).resolve().parents[1] / "data" / "counterfact-sample.jsonl"
    out = tmp_path / "run"
    args = ["--model", str(tmp_path / "model"), "--limit", "1", "--out", str(out)]
    result = runner.invoke(app, ["edit", str(sample), *args, "--stats-dir", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["modules"]["found_by"] == "structure"
    assert run["modules"]["rewrite"] == find_structure(model).names.rewrite_module_tmp
    assert run["hparams"]["layers"] == [1] and "layer 1 of 3" in run["hparams_from"]
    assert run["covariance_from"]  # the key statistics were computed at W's input
    (record,) = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
    assert record["status"] == "applied", record
    plan = runner.invoke(app, ["memcheck", "--model", str(tmp_path / "model"), "--json"])
    assert plan.exit_code == 0, plan.output


# what each refusal names: the block, and what was found there
REFUSALS = {
    "mixtral": ("model.layers.0", "experts"),
    "qwen2-moe": ("model.layers.0", "experts"),
    "olmoe": ("model.layers.0", "experts"),
    "opt": ("model.decoder.layers.0", "no MLP module of its own"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_architectures_exit_2_naming_what_was_found(name: str, tmp_path: Path) -> None:
    built = tiny_architecture(name)
    if built is None:
        pytest.skip(f"this transformers has no {REFUSED[name][0]}")
    model, tok = built
    where, what = REFUSALS[name]
    with pytest.raises(UnknownArchitectureError, match=what):
        find_structure(model)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "{} is in", "subject": "Rome", "target_new": "X"}))
    out = runner.invoke(app, ["edit", str(requests), "--model", str(tmp_path / "model"),
                              "--out", str(tmp_path / "run")])  # fmt: skip
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    assert where in text and what in text, text
    assert not (tmp_path / "run").exists()


def test_the_yaml_names_the_modules_of_a_model_structure_cannot_read() -> None:
    model, _ = tiny_architecture("mixtral") or pytest.skip("no MixtralConfig here")
    with pytest.raises(UnknownArchitectureError, match="missing: rewrite_module_tmp"):
        resolve(model, "MixtralForCausalLM", {"layer_module_tmp": "model.layers.{}"})
    llama, _ = build("llama")
    given = {
        "rewrite_module_tmp": "model.layers.{}.mlp.up_proj",  # not what structure finds
        "layer_module_tmp": "model.layers.{}",
        "mlp_module_tmp": "model.layers.{}.mlp",
    }
    found = resolve(llama, "LlamaForCausalLM", given)
    assert found.found_by == "hparams" and found.names.rewrite(0) == "model.layers.0.mlp.up_proj"
    with pytest.raises(UnknownArchitectureError, match="hparams rewrite_module_tmp.*no module"):
        resolve(llama, "LlamaForCausalLM", {"rewrite_module_tmp": "model.layers.{}.mlp.down"})
    with pytest.raises(UnknownArchitectureError, match="not a linear map"):
        resolve(llama, "LlamaForCausalLM", {"rewrite_module_tmp": "model.layers.{}.mlp"})


def test_logits_the_head_cannot_give_are_refused() -> None:
    model, _ = build("granite")
    check_output_head(model)  # logits_scaling applied as the model does: its own logits
    other, _ = build("granite")
    original = other.forward

    def doubled(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        out.logits = out.logits * 2  # something rrome does not know
        return out

    other.forward = doubled  # type: ignore[method-assign]
    with pytest.raises(UnknownArchitectureError, match="not its output head's"):
        check_output_head(other)


def test_sliding_window_shorter_than_a_prompt_fails_the_edit_cleanly() -> None:
    """The packed pass's mask would not slide: a prompt longer than the window is refused."""
    model, tok = build("gemma2")
    model.config.sliding_window = 4
    names = find_structure(model).names
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"sliding attention window \(4 tokens\)"):
        edit(model, tok, REQUEST, hparams(), names, templates=TEMPLATES)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_whole_prompt_fallback_warns_once_and_edits_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where a model's cache cannot be reused, every row runs whole: one warning, the same
    edit (to fp32 accuracy)."""
    model, tok = build("gemma3-text")
    names = find_structure(model).names
    hp = hparams(v_num_grad_steps=5, v_stop="loss")
    cached = edit(model, tok, REQUEST, hp, names, templates=TEMPLATES)
    cached.revert(model)
    monkeypatch.setattr(compat, "_CACHE_LAYERS", False)
    monkeypatch.setattr(compat, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        whole = edit(model, tok, REQUEST, hp, names, templates=TEMPLATES)
    said = [w for w in caught if issubclass(w.category, compat.CompatibilityWarning)]
    assert len(said) == 1 and "runs each prompt whole" in str(said[0].message)
    close(whole.patches[0].right, cached.patches[0].right, rtol=1e-3)


@pytest.mark.parametrize(
    ("n_layers", "layer"), [(2, 0), (3, 1), (4, 1), (12, 2), (28, 5), (30, 5), (32, 5), (48, 8)]
)
def test_default_layer_rule(n_layers: int, layer: int) -> None:
    chosen, why = default_layer(n_layers)
    assert chosen == layer
    assert f"layer {layer} of {n_layers}" in why


@pytest.mark.slow
def test_smollm2_without_its_alias_gets_the_default_recipe(tmp_path: Path) -> None:
    """The embedded SmolLM2 copied to a folder of its own: no alias, no hparams file. The
    default recipe at the depth rule's layer (5 of 30) edits it, and run.json says why."""
    import shutil

    from rrome_cli.models.loading import embedded_model_dir

    copy = tmp_path / "my-model"
    shutil.copytree(embedded_model_dir(), copy)
    sample = Path(__file__).resolve().parents[1] / "data" / "counterfact-sample.jsonl"
    out = tmp_path / "run"
    args = ["edit", str(sample), "--model", str(copy), "--limit", "2", "--out", str(out)]
    result = runner.invoke(app, [*args, "--stats-dir", str(tmp_path / "stats")])
    assert result.exit_code == 0, result.output
    assert "layer 5 of 30: a sixth of the depth" in " ".join(result.output.split())
    run = json.loads((out / "run.json").read_text())
    assert run["hparams"]["layers"] == [5] and run["hparams"]["v_stop"] == "target"
    assert "layer 5 of 30" in run["hparams_from"]
    assert run["modules"]["rewrite"] == "model.layers.{}.mlp.down_proj"
    assert run["modules"]["final_norm"] == "model.norm" and run["modules"]["tied_embeddings"]
    records = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["applied"] * 2
    assert all(r["post"]["rewrite_acc"] == 1.0 for r in records), [r["post"] for r in records]


@pytest.mark.parametrize(
    "alias", ["gpt2-xl", "gpt-j-6b", "llama2-7b", "llama3-8b", "mistral-7b", "qwen2.5-7b"]
)
def test_structure_agrees_with_the_table_on_the_shipped_models(alias: str) -> None:
    """The real shapes (the shipped configs, weights on the meta device): the structure finds
    the table's names, and the depth rule gives the published layer but for GPT-2 XL's."""
    from rrome_cli.config import load_hparams, shipped_hparams
    from rrome_cli.models.loading import load_config
    from rrome_cli.models.placement import meta_model

    config = load_config(alias)
    found = find_structure(meta_model(config, torch.float16))
    assert found.names == FAMILIES[config.architectures[0]]
    published = load_hparams(shipped_hparams(alias)).layers[0]
    assert (default_layer(found.n_layers)[0] == published) == (alias != "gpt2-xl")
