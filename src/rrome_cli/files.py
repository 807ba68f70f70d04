"""Atomic writes that leave what they write as readable as any file the user makes.

safetensors writes its files with mode 0600 and ``tempfile`` makes 0600 files and 0700
directories; renamed into place, they would shut an edited checkpoint, a patch file or the
statistics cache away from the user's group (a teammate, a serving process under another uid).
Each file or folder is therefore first created the plain way (``os.open`` with 0666, ``mkdir``
with 0777), so that the kernel applies the umask, and the mode it got is put back after the
writer has narrowed it. The process-wide umask is never changed, not even for a moment: another
thread creating a file meanwhile would get a world-writable one.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import torch
from safetensors.torch import save_file


def make_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named directory in ``parent`` with the mode ``mkdir`` gives (0777 less
    the umask), where ``tempfile.mkdtemp`` would give 0700."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{parent}: cannot make a new directory named {prefix}...")


def _new_file(parent: Path, prefix: str, suffix: str) -> tuple[Path, int]:
    """A new, uniquely named empty file in ``parent`` and the mode ``open()`` gave it."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return path, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(f"{parent}: cannot make a new file named {prefix}...{suffix}")


def publish(directory: Path) -> None:
    """Give everything under ``directory`` (made by :func:`make_dir`) the mode it would have had
    if created directly: the directory's own mode for folders, less the execute bits for files
    (both are 0777 / 0666 less the same umask)."""
    mode = stat.S_IMODE(directory.stat().st_mode)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod(mode if path.is_dir() else mode & 0o666)


def save_safetensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write to a uniquely named file beside ``path``, then rename: readers (and a concurrent
    writer of the same file) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _new_file(path.parent, f".{path.name}.", ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        tmp.chmod(mode)  # safetensors narrows it to 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
