"""Feature checks for the transformers (and torch) releases rrome supports: 4.56 through 5.x.

Each check asks the installed library what it can do (a keyword in a signature, an attribute,
a probe call) instead of comparing version strings, so a release that renames or drops a
feature is met by the same code path as the releases that already differ that way. The
engine calls these, never ``transformers.__version__``.

What differs across the supported releases:
- the keyword under which a model's ``forward`` takes a KV cache: ``past_key_values`` (4.56
  to the early 5.x), ``cache`` (later 5.x);
- whether transformers' SDPA path honours ``TRANSFORMERS_SDPA_FORCE_GQA`` (later 5.x only):
  without it grouped-query attention copies the key/value heads (same result, slower);
- whether ``torch.autocast`` may be entered for the meta device, which 4.x rotary embeddings
  do (memcheck's dry run on meta tensors).

Differences met where they arise, by what the library returns: decoder blocks return a tuple
(4.x) or the tensor (5.x), which ``engine.hooks.blocks_replaced`` copies from what it saw; the
output head is read through ``get_output_embeddings()`` (GPT-NeoX's is ``embed_out`` on 4.x).
The embedded SmolLM2's tokenizer is built from the GGUF's metadata, not by the release's GGUF
conversion, and its converted copy is kept per release (``models.loading``): a cache, keyed by
the release that wrote its config.json, which releases of another format read differently.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

# The names under which releases of transformers take the KV cache, newest first.
_CACHE_KEYWORDS = ("cache", "past_key_values")
_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


class CompatibilityWarning(UserWarning):
    """A feature the engine would use is missing here: it takes a slower path, same result."""


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Say ``message`` once per process (a run's log shows it once, not per request)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, CompatibilityWarning, stacklevel=3)


def cache_keyword(model: nn.Module) -> str | None:
    """The keyword of ``model.forward`` that takes a ``Cache``; None when it takes none."""
    return _cache_keyword(type(model))


@cache
def _cache_keyword(cls: type[nn.Module]) -> str | None:
    params = inspect.signature(cls.forward).parameters
    return next((name for name in _CACHE_KEYWORDS if name in params), None)


def cache_kwargs(model: nn.Module, kv_cache: object) -> dict[str, Any]:
    """Keyword arguments that hand ``kv_cache`` to ``model.forward`` and have it filled."""
    keyword = cache_keyword(model)
    if keyword is None:
        raise TypeError(f"{type(model).__name__}.forward takes no KV cache")
    return {keyword: kv_cache, "use_cache": True}


def _cache_layers_hold_tensors() -> bool:
    """Whether a ``DynamicCache`` exposes per-layer ``keys`` / ``values`` tensors, which the
    packed prefix cache gathers and puts back after each pass."""
    probe = DynamicCache()
    k = torch.zeros(1, 1, 1, 1)
    try:
        probe.update(k, k, 0)
        layer = probe.layers[0]
        return isinstance(layer.keys, torch.Tensor) and isinstance(layer.values, torch.Tensor)
    except (AttributeError, IndexError, TypeError):
        return False


_CACHE_LAYERS = _cache_layers_hold_tensors()


def reuses_prefix_cache(model: nn.Module) -> bool:
    """Whether the value optimisation can run the prompts' prefixes once into a KV cache and
    reuse it each step; if not it runs every prompt whole each step (same result, slower),
    and says so once."""
    keyword = cache_keyword(model)
    if keyword is not None and _CACHE_LAYERS:
        return True
    why = (
        f"{type(model).__name__}.forward takes no KV cache"
        if keyword is None
        else "this transformers' DynamicCache has no per-layer keys / values"
    )
    warn_once(
        f"{why}: the value optimisation runs each prompt whole at every step "
        "(the same result, slower)"
    )
    return False


@cache
def sdpa_shares_kv_heads() -> bool:
    """Whether transformers' SDPA attention honours ``TRANSFORMERS_SDPA_FORCE_GQA=1``: grouped-
    query attention then reads each key/value head in place under a mask. Probed by running
    its SDPA path on a 2-query-head, 1-key/value-head input with the switch set and watching
    whether SDPA is called with ``enable_gqa``."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        return False
    seen: list[bool] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(bool(kwargs.get("enable_gqa", False)))
        return sdpa(*args, **kwargs)

    module = nn.Module()
    module.num_key_value_groups = 2
    module.is_causal = True
    q, kv = torch.zeros(1, 2, 2, 4), torch.zeros(1, 1, 2, 4)
    mask = torch.zeros(1, 1, 2, 2)
    saved = os.environ.get(_FORCE_GQA)
    os.environ[_FORCE_GQA] = "1"
    F.scaled_dot_product_attention = spy
    try:
        sdpa_attention_forward(module, q, kv, kv, mask)
    except Exception:  # noqa: BLE001 - a probe: any failure means "no"
        return False
    finally:
        F.scaled_dot_product_attention = sdpa
        if saved is None:
            del os.environ[_FORCE_GQA]
        else:
            os.environ[_FORCE_GQA] = saved
    return any(seen)


@cache
def _autocast_takes_meta() -> bool:
    try:
        with torch.autocast(device_type="meta", enabled=False):
            pass
    except RuntimeError:
        return False
    return True


@contextmanager
def autocast_tolerates_meta() -> Iterator[None]:
    """While active, ``torch.autocast(device_type="meta", ...)`` is a no-op where this torch
    refuses it: transformers 4.x rotary embeddings enter it, disabled, on whatever device the
    inputs are, and memcheck runs the model on meta tensors (autocast means nothing there)."""
    if _autocast_takes_meta():
        yield
        return
    real = torch.autocast

    def autocast(device_type: str, *args: Any, **kwargs: Any) -> Any:
        if device_type == "meta":
            return nullcontext()
        return real(device_type, *args, **kwargs)

    torch.autocast = autocast  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        torch.autocast = real  # type: ignore[misc]
