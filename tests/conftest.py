from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from rrome_cli.engine import edit as edit_module
from rrome_cli.engine.values import ValueResult
from rrome_cli.models.tiny import FAMILIES, tiny_model


@pytest.fixture(autouse=True)
def threads_for(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny models run faster on one thread (thread start-up outweighs their work); the
    SmolLM2 tests (marked slow) keep torch's default."""
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny(family: str):
    """(model, tokenizer) of a tiny random model of each supported family."""
    return tiny_model(family)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common umask (files 0644, directories 0755), whatever the test runner's."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command loads a model: bad input must fail before that."""
    import rrome_cli.evaluate.run as evaluate_run
    import rrome_cli.models.loading as loading

    def fail(*_args: object, **_kwargs: object) -> None:
        pytest.fail("the model loaded")

    for module in (loading, evaluate_run):  # every module that binds the name
        monkeypatch.setattr(module, "load_model", fail)


@pytest.fixture
def values_seen(monkeypatch: pytest.MonkeyPatch) -> list[ValueResult]:
    """Let ``edit`` optimise delta as usual, and keep each ValueResult it got."""
    seen: list[ValueResult] = []
    real = edit_module.optimise_delta

    def spy(*args: Any, **kwargs: Any) -> ValueResult:
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(edit_module, "optimise_delta", spy)
    return seen
