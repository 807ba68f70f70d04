"""Atomic writes that leave what they write as readable as any file the user makes.

safetensors writes its files with mode 0600 and ``tempfile`` makes 0600 files and 0700
directories; renamed into place, they would shut an edited checkpoint, a patch file or the
statistics cache away from the user's group (a teammate, a serving process under another uid).
``publish`` gives them the mode a plain ``open()`` or ``mkdir`` would have, under the umask."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def publish(path: Path) -> None:
    """Set ``path`` (a file, or a directory and everything under it) to 0666 / 0777 less the
    umask: the mode it would have had if created directly."""
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def save_safetensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write to a uniquely named file beside ``path``, then rename: readers (and a concurrent
    writer of the same file) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        publish(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
