from __future__ import annotations

import pytest

from rrome_cli.models.tiny import FAMILIES, tiny_model


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny(family: str):
    """(model, tokenizer) of a tiny random model of each supported family."""
    return tiny_model(family)
