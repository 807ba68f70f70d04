"""The same edit gives the same patch and the same metrics on every supported transformers.

``tests/data/compat-reference.json`` holds, for the tiny model of each family and for SmolLM2,
the patch, the value optimisation's figures and the CounterFact metrics of one edit as the
newest supported transformers computes them; ``python tests/test_compat.py`` writes it (run it
in the newest release's venv). ``make test-compat`` runs these tests in the venv of the oldest
supported release, where they check that nothing the engine does depends on the release.

The tiny models take their weights from ``fixed_weights``: transformers' own random
initialisation differs between releases (GPT-2's, for one, between 4.57 and 5.5).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from rrome_cli import compat
from rrome_cli.config import HParams, load_hparams, shipped_hparams
from rrome_cli.engine import packing
from rrome_cli.engine import values as values_module
from rrome_cli.engine.edit import edit
from rrome_cli.engine.keys import templated
from rrome_cli.evaluate.metrics import evaluate_edits
from rrome_cli.models.families import module_names
from rrome_cli.models.loading import GGUF_FILE, GGUF_PACKAGE, gguf_tokenizer, load_model
from rrome_cli.models.tiny import FAMILIES, tiny_model
from rrome_cli.requests import EditRequest

REFERENCE = Path(__file__).parent / "data" / "compat-reference.json"
REQUEST = EditRequest(
    prompt="The mother tongue of {} is",
    subject="Danielle Darrieux",
    target_new="English",
    ground_truth="French",
    rephrase_prompts=["Where Danielle Darrieux is from, people speak the language of"],
    locality=[("Michel Rocard is a native speaker of", "French")],
    case_id=0,
)
# Fixed context templates: sampled ones would depend on generate()'s release too.
TEMPLATES = ["{}", "The capital of Japan is Tokyo. {}", "Rome. {}"]
SMOLLM2 = "smollm2-135m"
# fp32 tolerance after an optimisation of delta: relative to the largest entry
RTOL = 1e-4


def fixed_weights(model: nn.Module) -> None:
    """Weights from one seeded generator, in the order the parameters are registered (the
    same in every release; ``test_compat`` checks their shapes against the reference)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif p.ndim == 1:  # a norm's scale
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def edit_case(model: nn.Module, tok: Any, hp: HParams) -> dict[str, Any]:
    """One edit of REQUEST (then reverted) and its metrics on the model with its patches."""
    names = module_names(type(model).__name__, hp.module_overrides())
    result = edit(model, tok, REQUEST, hp, names, templates=TEMPLATES)
    assert result.status == "applied", result.reason
    result.revert(model)
    patches = [layer.patch for layer in result.layers]
    ((pre, post),) = evaluate_edits(model, tok, [REQUEST], [patches])
    return {
        "shapes": [list(p.shape) for p in model.parameters()],
        "patches": [
            {"module": p.module, "left": p.left.tolist(), "right": p.right.tolist()}
            for p in patches
        ],
        "steps": [layer.steps for layer in result.layers],
        "loss": [layer.loss for layer in result.layers],
        "target_prob": [layer.target_prob for layer in result.layers],
        "pre": pre,
        "post": post,
    }


def tiny_case(family: str) -> dict[str, Any]:
    model, tok = tiny_model(family)
    fixed_weights(model)
    return edit_case(model, tok, load_hparams(shipped_hparams(f"tiny-{family}")))


def smollm2_case() -> dict[str, Any]:
    loaded = load_model(SMOLLM2, dtype="fp32", devices="cpu")
    hp = load_hparams(shipped_hparams(SMOLLM2))
    # C = I: the key statistics take minutes; they are the same computation on any release
    hp = dataclasses.replace(hp, mom2_adjustment=False)
    return edit_case(loaded.model, loaded.tok, hp)


def _close(actual: list[float], expected: list[float], what: str) -> None:
    a, e = torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    scale = float(e.abs().max())
    torch.testing.assert_close(a, e, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{what}: {m}")


def assert_same(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual["shapes"] == expected["shapes"], "the model's parameters differ"
    assert actual["steps"] == expected["steps"]
    assert len(actual["patches"]) == len(expected["patches"])
    for a, e in zip(actual["patches"], expected["patches"], strict=True):
        assert a["module"] == e["module"]
        _close(a["left"], e["left"], f"{a['module']} u")
        _close(a["right"], e["right"], f"{a['module']} right vector")
    _close(actual["loss"], expected["loss"], "loss")
    _close(actual["target_prob"], expected["target_prob"], "target_prob")
    for when in ("pre", "post"):
        assert set(actual[when]) == set(expected[when]), when
        for key, value in expected[when].items():
            assert math.isclose(actual[when][key], value, rel_tol=RTOL, abs_tol=1e-5), (when, key)


def _reference() -> dict[str, Any]:
    return json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_edit_equals_the_newest_release(family: str) -> None:
    assert_same(tiny_case(family), _reference()["cases"][f"tiny-{family}"])


@pytest.mark.slow
@pytest.mark.compat
def test_smollm2_edit_equals_the_newest_release() -> None:
    assert_same(smollm2_case(), _reference()["cases"][SMOLLM2])


def test_the_reference_catches_a_different_patch() -> None:
    """The comparison fails on a patch off by more than fp32 noise."""
    expected = _reference()["cases"]["tiny-llama"]
    actual = json.loads(json.dumps(expected))
    actual["patches"][0]["right"][0] += 1e-2 * max(map(abs, expected["patches"][0]["right"]))
    with pytest.raises(AssertionError):
        assert_same(actual, expected)


# --------------------------------------------------------------------- the feature checks


class _TakesPast(nn.Module):
    def forward(self, x: torch.Tensor, past_key_values: object = None) -> torch.Tensor:
        return x


class _TakesNone(nn.Module):
    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return x


def test_cache_keyword_is_read_off_the_forward_signature(family: str) -> None:
    assert compat.cache_keyword(_TakesPast()) == "past_key_values"
    assert compat.cache_keyword(_TakesNone()) is None
    with pytest.raises(TypeError, match="takes no KV cache"):
        compat.cache_kwargs(_TakesNone(), object())
    model, _ = tiny_model(family)
    assert compat.cache_keyword(model.base_model) in ("cache", "past_key_values")
    assert compat.reuses_prefix_cache(model.base_model)


def test_without_prefix_cache_prompts_run_whole_for_the_same_delta(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the KV cache cannot be reused, every prompt runs whole at each step: the same
    delta, and one warning however many passes."""
    model, tok = tiny_model("llama")
    names = module_names(type(model).__name__)
    hp = load_hparams(shipped_hparams("tiny-llama"))
    prompts = [templated(tok, REQUEST, t) for t in TEMPLATES]

    def delta() -> torch.Tensor:
        spec = values_module.ValueSpec(prompts, REQUEST.target_new, REQUEST.subject)
        return values_module.optimise_delta(model, tok, names, hp.layers[0], hp, spec).delta

    cached = delta()
    monkeypatch.setattr(compat, "_CACHE_LAYERS", False)
    monkeypatch.setattr(compat, "_warned", set())
    passes: list[int] = []
    real_lay_out = packing._lay_out

    def lay_out(rows: list[packing.Row]) -> Any:
        passes.append(sum(r.split for r in rows))
        return real_lay_out(rows)

    monkeypatch.setattr(packing, "_lay_out", lay_out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        whole = delta()
        delta()
    assert passes and not any(passes)  # nothing left to a cache
    notes = [w for w in caught if issubclass(w.category, compat.CompatibilityWarning)]
    assert len(notes) == 1 and "whole" in str(notes[0].message)
    scale = float(cached.abs().max())
    assert scale > 0
    torch.testing.assert_close(whole, cached, rtol=RTOL, atol=RTOL * scale)


def test_the_embedded_tokenizer_is_the_gguf_s_on_every_release() -> None:
    """Built from the GGUF's metadata, not by the release's own conversion: no BOS, the
    file's EOS, ids as transformers 5.25 converts them."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    assert spec is not None and spec.submodule_search_locations
    tok = gguf_tokenizer(Path(spec.submodule_search_locations[0]) / GGUF_FILE)
    text = "The mother tongue of Danielle Darrieux is English"
    ids = tok(text)["input_ids"]
    assert ids == [504, 3379, 10663, 282, 10789, 290, 9117, 3153, 4808, 314, 2321]
    assert tok.decode(ids) == text
    assert set(tok(text)) == {"input_ids", "attention_mask"}  # what generate(**encoded) takes
    digits = [788, 216, 33, 41, 40, 39, 28, 37366, 216, 2]  # a token a digit
    assert tok("In 1987, café <|im_end|>")["input_ids"] == digits
    specials = (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token)
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")


def test_autocast_on_meta_only_inside_the_context() -> None:
    with compat.autocast_tolerates_meta():
        with torch.autocast(device_type="meta", enabled=False):
            pass
        with torch.autocast(device_type="cpu", enabled=False):  # other devices as before
            pass
    assert torch.autocast is torch.amp.autocast_mode.autocast


def write_reference() -> None:
    """Compute every case here and write REFERENCE (run in the newest release's venv)."""
    torch.set_num_threads(1)
    cases = {f"tiny-{family}": tiny_case(family) for family in FAMILIES}
    cases[SMOLLM2] = smollm2_case()
    doc = {
        "written_by": {"transformers": transformers.__version__, "torch": torch.__version__},
        "cases": cases,
    }
    REFERENCE.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    sys.exit(write_reference())
