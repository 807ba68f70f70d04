"""Forward hooks shared by the key, value and statistics passes, and the value passes'
attention switch (``shared_kv_heads``)."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from rrome_cli.compat import sdpa_shares_kv_heads


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a hook to end a forward pass once the layer we need has run."""


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Abort the forward right after ``module`` runs: no compute is spent above it.

    Use as ``with stop_after(layer): run_forward()``; the StopForward is swallowed here.
    """

    def hook(_mod: nn.Module, _inp: Any, _out: Any) -> None:
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    except StopForward:
        pass
    finally:
        handle.remove()


@contextmanager
def capture_input(module: nn.Module, sink: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Call ``sink`` with the first positional input of ``module`` on each forward."""

    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        sink(args[0])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# Whether a module seen by ``edit_output`` returned a tuple: decoder blocks of transformers 4.x
# return (hidden_states, ...), of 5.x the tensor; a stand-in (``blocks_replaced``) must match.
_RETURNS_TUPLE: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace ``module``'s output (a tensor, or the first item of a tuple) by ``fn(output)``."""

    def hook(mod: nn.Module, _inp: Any, out: Any) -> Any:
        _RETURNS_TUPLE[mod] = isinstance(out, tuple)
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Passthrough(nn.Module):
    """Stands in for a decoder block: returns its input, or a fixed output (the real one), as
    a 1-tuple where the block returns a tuple. Attributes the model's loop reads off its
    blocks (e.g. ``attention_type``) come from the block it stands in for."""

    def __init__(
        self, block: nn.Module, output: torch.Tensor | None = None, as_tuple: bool = False
    ) -> None:
        super().__init__()
        self.output, self.as_tuple = output, as_tuple
        self.__dict__["_block"] = block  # not a submodule: its weights stay out of this one

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_block")
            if block is None:
                raise
            return getattr(block, name)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor]:
        out = self.output
        if out is None:
            out = args[0] if args else kwargs["hidden_states"]
        return (out,) if self.as_tuple else out


@contextmanager
def blocks_replaced(model: nn.Module, blocks: list[str], output: torch.Tensor) -> Iterator[None]:
    """Run forwards without computing ``blocks`` (the first decoder blocks, in order): all but
    the last pass their input on, the last returns ``output``, their real output computed
    before. The models' own loop over blocks is left as it is."""
    originals = [model.get_submodule(name) for name in blocks]
    as_tuple = _RETURNS_TUPLE.get(originals[-1], False)  # seen when ``output`` was kept
    for i, (name, block) in enumerate(zip(blocks, originals, strict=True)):
        kept = output if i == len(blocks) - 1 else None
        model.set_submodule(name, _Passthrough(block, kept, as_tuple))
    try:
        yield
    finally:
        for name, block in zip(blocks, originals, strict=True):
            model.set_submodule(name, block)


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers at every SDPA call


def weights_on_cpu(model: nn.Module) -> bool:
    """Whether every weight of ``model`` is in RAM (offloaded ones sit on "meta")."""
    return all(p.device.type == "cpu" for p in model.parameters())


@contextmanager
def shared_kv_heads(in_place: bool) -> Iterator[None]:
    """With ``in_place`` (for a model whose weights are all on the CPU: ``weights_on_cpu``),
    grouped-query attention reads each key/value head in place (SDPA's ``enable_gqa``)
    instead of a copy per query head.

    Given a mask, as all our passes are, transformers copies the heads (``repeat_kv``) and
    sums the copies' gradients back: on CUDA a masked ``enable_gqa`` call would fall back to
    SDPA's slowest kernel. On CPU the kernel does the same arithmetic without the copies
    (SmolLM2's edits come out bit for bit the same) in about 7% less time a value step;
    forward-only passes gain nothing (the copies cost in backward). A switch the user set is
    left as it is; a transformers that has no such switch copies the heads (same result).
    The switch is process-wide while set: attention run meanwhile by another
    thread (another model) sees it too, correct but on CUDA slower.
    """
    if not in_place or os.environ.get(_FORCE_GQA) is not None or not sdpa_shares_kv_heads():
        yield
        return
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        del os.environ[_FORCE_GQA]
