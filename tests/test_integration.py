"""On the embedded SmolLM2-135M: a real fact is rewritten, and reverted exactly."""

from __future__ import annotations

import pytest
import torch

from rrome_cli.config import load_hparams, shipped_hparams
from rrome_cli.engine.edit import edit
from rrome_cli.models.loading import load_model
from rrome_cli.requests import EditRequest

pytestmark = pytest.mark.slow


def greedy(lm, text: str, n: int = 2) -> str:
    ids = lm.tok(text, return_tensors="pt").to(lm.model.device)
    out = lm.model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=2)
    return lm.tok.decode(out[0, ids.input_ids.shape[1] :])


def test_smollm2_edit_takes_and_reverts() -> None:
    lm = load_model()
    hp = load_hparams(shipped_hparams("smollm2-135m"))
    hp.mom2_adjustment = False  # C = I keeps this test free of the statistics pass
    hp.context_template_length_params = [[5, 4]]
    request = EditRequest(prompt="The capital of {} is", subject="Japan", target_new="Kyoto")
    assert greedy(lm, request.text).startswith(" Tokyo")
    weight = lm.model.get_submodule(lm.names.rewrite(hp.layers[0])).weight
    before = weight.detach().clone()

    result = edit(lm.model, lm.tok, request, hp, lm.names)

    assert result.status == "applied"
    assert greedy(lm, request.text).startswith(" Kyoto")
    assert greedy(lm, "The capital of France is").startswith(" Paris")  # a neighbour stays
    result.revert(lm.model)
    assert torch.equal(weight, before)
    assert greedy(lm, request.text).startswith(" Tokyo")
