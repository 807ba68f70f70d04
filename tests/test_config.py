"""Hyperparameter files: EasyEdit's layout loads unchanged; every shipped file loads and fits."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from rrome_cli.config import (
    IGNORED_KEYS,
    HParams,
    HParamsError,
    from_dict,
    load_hparams,
    shipped_hparams,
)
from rrome_cli.models.families import FAMILIES, get_module, module_names, num_layers
from rrome_cli.models.registry import ALIASES, shipped_config
from rrome_cli.models.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
EASYEDIT_LLAMA = Path(__file__).parent / "data" / "easyedit-r-rome-llama-7b.yaml"
SHIPPED = sorted((ROOT / "hparams").glob("*.yaml"))
TINY_SHIPPED = [p for p in SHIPPED if p.stem.startswith("tiny-")]
REAL_SHIPPED = [p for p in SHIPPED if p.stem in ALIASES]


def test_easyedit_layout_loads_unchanged() -> None:
    raw = yaml.safe_load(EASYEDIT_LLAMA.read_text())
    with pytest.warns(UserWarning) as caught:
        hp = load_hparams(EASYEDIT_LLAMA)
    # YAML 1.1 reads 5e-1 as a string: it must come out as the float 0.5.
    assert raw["v_lr"] == "5e-1"
    assert isinstance(hp.v_lr, float) and hp.v_lr == 0.5
    assert hp.v_weight_decay == pytest.approx(1e-3)
    assert isinstance(hp.v_num_grad_steps, int) and hp.v_num_grad_steps == 25
    assert hp.layers == [5]
    assert hp.mom2_adjustment is False
    assert hp.context_template_length_params == [[5, 10], [10, 10]]
    assert hp.rewrite_module_tmp == "model.layers.{}.mlp.down_proj"
    assert hp.stats_dir == "./data/stats"
    # Each ignored EasyEdit key gets its own note naming the file; the keys rrome never read
    # (fact_token, mom2_dtype, ln_f_module, lm_head_module) are among them.
    present = sorted(k for k in raw if k in IGNORED_KEYS)
    assert {"fact_token", "mom2_dtype", "ln_f_module", "lm_head_module"} <= set(present)
    assert not set(present) & set(hp.to_dict())
    messages = [str(w.message) for w in caught]
    for key in present:
        assert any(repr(key) in m and str(EASYEDIT_LLAMA) in m for m in messages), key


def test_unknown_key_suggests_nearest(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(EASYEDIT_LLAMA.read_text().replace("v_lr:", "v_lrr:"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(HParamsError) as err:
            load_hparams(path)
    message = str(err.value)
    assert str(path) in message and "'v_lrr'" in message and "did you mean 'v_lr'" in message


def test_bad_value_names_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    head = "# a comment\nlayers: [5]\n\n"  # the bad key sits on line 4
    path.write_text(head + "v_lr: fast\n")
    with pytest.raises(HParamsError, match=r"bad\.yaml:4: v_lr must be a number"):
        load_hparams(path)
    path.write_text(head + "v_realized_delta: everywhere\n")
    with pytest.raises(HParamsError, match=r"bad\.yaml:4: v_realized_delta must be off"):
        load_hparams(path)
    path.write_text(head + "protect_weight: -1\n")
    with pytest.raises(HParamsError, match=r"bad\.yaml:4: protect_weight must be 0"):
        load_hparams(path)
    path.write_text(head + "v_lr: 1.0\nv_lrr: 1\n")
    with pytest.raises(HParamsError, match=r"bad\.yaml:5: unknown key 'v_lrr'"):
        load_hparams(path)
    with pytest.raises(HParamsError, match=r"^<hparams>: v_stop must be one of"):
        from_dict({"v_stop": "never"})  # no file, no lines: the mapping's name alone


def test_realized_delta_is_off_or_bare(tmp_path: Path) -> None:
    """YAML reads false and off as False: both are "off"; the removed values are refused."""
    path = tmp_path / "h.yaml"
    for text, expected in [("false", "off"), ("off", "off"), ("bare", "bare"), ('"off"', "off")]:
        path.write_text(f"v_realized_delta: {text}\n")
        assert load_hparams(path).v_realized_delta == expected
    assert HParams().v_realized_delta == "off"
    for removed in ("true", "suffix", "answer"):
        path.write_text(f"v_realized_delta: {removed}\n")
        with pytest.raises(HParamsError, match=r"h\.yaml:1: v_realized_delta must be off"):
            load_hparams(path)
    path.write_text("v_stop: every\n")
    with pytest.raises(HParamsError, match=r"h\.yaml:1: v_stop must be one of loss, target"):
        load_hparams(path)


def test_removed_knobs_load_only_at_what_rrome_does(tmp_path: Path) -> None:
    """run.json files and bench results written before the knobs left carry them at their
    defaults: those still load, to the same recipe; any other value is refused."""
    old = HParams().to_dict() | {"v_stop_loss": 0.05, "v_adam_beta2": 0.999, "v_bare_weight": 0}
    old |= {"fact_token": "subject_last", "mom2_dtype": "float32", "lm_head_module": "lm_head"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert from_dict(old, "run.json") == HParams()
    noted = sorted(str(w.message).split("'")[1] for w in caught)
    assert noted == ["fact_token", "lm_head_module", "mom2_dtype"]  # the removed knobs: silent
    path = tmp_path / "h.yaml"
    path.write_text("layers: [5]\nv_stop_loss: 5e-2\n")  # YAML reads 5e-2 as a string
    assert load_hparams(path) == HParams(layers=[5])
    for line in ("v_bare_weight: 0.2", "v_adam_beta2: 0.9", "v_stop_loss: 1000"):
        path.write_text(f"layers: [5]\n{line}\n")
        key = line.split(":")[0]
        with pytest.raises(HParamsError, match=rf"h\.yaml:2: {key} was removed.*got"):
            load_hparams(path)


def test_the_bench_of_record_still_measures_the_shipped_recipe() -> None:
    """bench/results/2026-12-03.json's recipe, written with every knob since removed, is the
    shipped SmolLM2 file's: `make bench` keeps its sections instead of measuring them again."""
    kept = json.loads((ROOT / "bench" / "results" / "2026-12-03.json").read_text())["hparams"]
    assert {"v_bare_weight", "v_adam_beta2", "v_stop_loss", "mom2_dtype"} <= set(kept)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert from_dict(kept) == load_hparams(shipped_hparams("smollm2-135m"))


def test_fact_token_is_ignored_only_at_subject_last(tmp_path: Path) -> None:
    path = tmp_path / "h.yaml"
    path.write_text("fact_token: subject_last\n")
    with pytest.warns(UserWarning, match=r"h\.yaml:1: ignoring 'fact_token'"):
        load_hparams(path)
    path.write_text("layers: [5]\nfact_token: last\n")
    with pytest.raises(HParamsError, match=r"h\.yaml:2: fact_token 'last' is not supported"):
        load_hparams(path)


def test_ships_every_model_and_fixture() -> None:
    names = {p.stem for p in SHIPPED}
    expected = {a for a in ALIASES if a != "smollm2-135m"}  # the lead tunes smollm2's file
    expected |= {
        "tiny-gpt2",
        "tiny-gptj",
        "tiny-gpt-neox",
        "tiny-llama",
        "tiny-mistral",
        "tiny-qwen2",
    }
    assert expected <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_file_loads_quietly(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shipped files carry no ignored keys
        hp = load_hparams(path)
    assert isinstance(hp, HParams)
    assert shipped_hparams(path.stem).resolve() == path.resolve()
    assert path.read_text().startswith("#"), "each file starts with a comment on its source"


@pytest.mark.parametrize("path", REAL_SHIPPED, ids=lambda p: p.name)
def test_real_model_hparams_fit_its_config(path: Path) -> None:
    """Layers exist and the module names agree with the family table for its architecture."""
    hp = load_hparams(path)
    config_path = shipped_config(path.stem)
    assert config_path is not None
    raw = json.loads(config_path.read_text())
    n_layers = raw.get("num_hidden_layers") or raw.get("n_layer")
    assert all(0 <= layer < n_layers for layer in hp.layers)
    architecture = raw["architectures"][0]
    assert module_names(architecture, hp.module_overrides()) == FAMILIES[architecture]
    assert hp.mom2_adjustment is True


@pytest.mark.parametrize("path", TINY_SHIPPED, ids=lambda p: p.name)
def test_tiny_hparams_name_modules_of_the_fixture(path: Path) -> None:
    hp = load_hparams(path)
    model, _ = tiny_model(path.stem.removeprefix("tiny-"))
    names = module_names(type(model).__name__, hp.module_overrides())
    assert all(layer < num_layers(model.config) for layer in hp.layers)
    for layer in hp.layers:
        for name in (names.rewrite(layer), names.mlp(layer), names.layer(layer)):
            get_module(model, name)
    head = model.get_output_embeddings()  # the engine reads the head through it
    assert head.weight.shape[0] == model.config.vocab_size  # the output head, not a hidden layer
    assert (hp.v_num_grad_steps, hp.context_template_length_params) == (10, [[3, 2]])
    assert (hp.mom2_adjustment, hp.mom2_n_samples) == (False, 2000)
