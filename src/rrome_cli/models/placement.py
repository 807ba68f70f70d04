"""Where a model's weights go, from its configuration alone (a model on the meta device, no weight
read): the accelerate device map an edit uses (all on one device; over several GPUs balanced;
the "cpu" and "disk" of ``--max-memory`` for offload), where each module lands, the bytes of
weights per device, and the memory a device offers. ``rrome memcheck`` plans with it and
``load_model`` loads by it.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from accelerate import infer_auto_device_map, init_empty_weights
from accelerate.utils import convert_file_size_to_int, get_balanced_memory
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from rrome_cli.files import cache_dir


class MemcheckError(ValueError):
    """The plan cannot be made as asked (unknown device size, bad --max-memory, a device map
    that places no module holding a weight)."""


def device_key(device: torch.device) -> int | str:
    """accelerate's name for a device: the GPU index, or "cpu"."""
    if device.type == "cuda":
        return device.index or 0
    return device.type


def device_label(key: int | str) -> str:
    """A device as the plan names it: "cuda:0", "cpu", "disk"."""
    return f"cuda:{key}" if isinstance(key, int) else str(key)


def ram_bytes() -> int:
    """The machine's memory."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


ASSUMED_GPU_BYTES = 24 * 2**30  # the size assumed for a GPU that is neither present nor given


def gpu_present(key: int) -> bool:
    """Whether GPU ``key`` is on this machine."""
    return torch.cuda.is_available() and key < torch.cuda.device_count()


def capacity(key: int | str, max_memory: dict[int | str, int] | None) -> int:
    """Bytes usable on a device: --max-memory, else the GPU's or the machine's memory."""
    if max_memory and key in max_memory:
        return int(max_memory[key])
    if isinstance(key, int):
        if gpu_present(key):
            return int(torch.cuda.get_device_properties(key).total_memory)
        return ASSUMED_GPU_BYTES  # planning for a GPU this machine lacks; the plan says so
    if key == "disk":
        return shutil.disk_usage(cache_dir() if cache_dir().exists() else os.getcwd()).free
    return ram_bytes()


def meta_model(
    config: PretrainedConfig, dtype: torch.dtype, layers: int | None = None
) -> PreTrainedModel:
    """The model on the meta device (tied weights, buffers too), optionally cut to ``layers``."""
    if layers is not None:
        config = copy.deepcopy(config)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if getattr(config, key, None):
                setattr(config, key, layers)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:layers]
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


@contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """accelerate warns once per missing GPU; planning for GPUs we do not have is the point."""
    log = logging.getLogger("accelerate.utils.modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def device_map(
    model: PreTrainedModel, targets: list[int | str], max_memory: dict[int | str, int]
) -> dict[str, int | str]:
    """The placement an edit uses: all on one target; else accelerate's map, balanced over GPUs.

    ``targets`` are accelerate keys (GPU index, "cpu", "disk") in order of preference.
    """
    if len(targets) == 1:
        return {"": targets[0]}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    dtype = next(model.parameters()).dtype
    limits = {k: max_memory[k] for k in targets}
    with _quiet_accelerate():
        if sum(isinstance(k, int) for k in targets) > 1:
            # It balances the GPUs alone, but reads every other key as a torch device, which
            # "disk" is not: the disk's limit goes around it.
            disk = {k: v for k, v in limits.items() if k == "disk"}
            on_devices = {k: v for k, v in limits.items() if k != "disk"}
            balanced = get_balanced_memory(
                model, on_devices, no_split_module_classes=no_split, dtype=dtype
            )
            limits = balanced | disk
        return dict(
            infer_auto_device_map(
                model, max_memory=limits, no_split_module_classes=no_split, dtype=dtype
            )
        )


def placement(name: str, dmap: dict[str, int | str]) -> int | str:
    """Where the module or tensor ``name`` lives under ``dmap`` (longest matching prefix)."""
    best, where = -1, None
    for prefix, target in dmap.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if len(prefix) > best:
                best, where = len(prefix), target
    if where is None:
        raise MemcheckError(f"the device map places no module holding {name!r}")
    return where


def weights_per_device(model: PreTrainedModel, dmap: dict[str, int | str]) -> dict[int | str, int]:
    """Bytes of parameters and buffers on each target (tied weights counted once)."""
    out: dict[int | str, int] = {}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        where = placement(name, dmap)
        out[where] = out.get(where, 0) + tensor.numel() * tensor.element_size()
    return out


def execution_target(dmap: dict[str, int | str]) -> Callable[[int | str], int | str]:
    """Where a module placed at a target runs: offloaded targets ("cpu" under a GPU map,
    "disk") run on the main device, the first GPU (else the CPU), as accelerate dispatches."""
    gpus = sorted(v for v in dmap.values() if isinstance(v, int))
    main: int | str = gpus[0] if gpus else "cpu"
    return lambda where: main if where in ("cpu", "disk") else where


def map_targets(
    devices: list[torch.device], max_memory: dict[int | str, int] | None
) -> list[int | str]:
    """The accelerate keys of ``devices``, then "cpu" and "disk" where ``max_memory`` gives
    them room (offload)."""
    keys = [device_key(d) for d in devices]
    for extra in ("cpu", "disk"):
        if max_memory and extra in max_memory and extra not in keys:
            keys.append(extra)
    return keys


def memory_limits(max_memory: dict[int | str, int | str] | None) -> dict[int | str, int]:
    """accelerate's per-device limits in bytes ("24GiB" read as accelerate reads it)."""
    return {
        k: convert_file_size_to_int(v) if isinstance(v, str) else int(v)
        for k, v in (max_memory or {}).items()
    }


def planned_map(
    config: PretrainedConfig,
    dtype: torch.dtype,
    devices: list[torch.device],
    max_memory: dict[int | str, int],
) -> dict[str, int | str]:
    """The device map an edit of the model of ``config`` in ``dtype`` uses over ``devices``
    (with the "cpu" and "disk" of ``max_memory`` for offload): the map ``rrome memcheck``
    plans, built on the meta model."""
    targets = map_targets(devices, max_memory)
    limits = {k: capacity(k, max_memory) for k in targets}
    return device_map(meta_model(config, dtype), targets, limits)
