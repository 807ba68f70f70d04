"""What rrome writes atomically (patches, checkpoints, statistics) gets the mode a plain
open() would give it: safetensors and tempfile alone would leave 0600 files and 0700 folders."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from rrome_cli.engine.update import Patch
from rrome_cli.files import save_safetensors_atomic
from rrome_cli.models.loading import load_model, save_model_atomic
from rrome_cli.patches import save_patches


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_patches_and_tensors_are_readable_as_the_umask_allows(umask_022, tmp_path: Path) -> None:
    patch = Patch(1, "m", torch.ones(4), torch.ones(3), "torch.float32", "0")
    save_patches(tmp_path / "patches.safetensors", [patch])
    save_safetensors_atomic(tmp_path / "c.safetensors", {"mom2": torch.eye(2)}, {})
    assert mode(tmp_path / "patches.safetensors") == 0o644
    assert mode(tmp_path / "c.safetensors") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "patches.safetensors"]


def test_a_private_umask_is_kept(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        save_safetensors_atomic(tmp_path / "c.safetensors", {"mom2": torch.eye(2)}, {})
    finally:
        os.umask(old)
    assert mode(tmp_path / "c.safetensors") == 0o600


def test_checkpoint_folder_and_weights_are_readable(umask_022, tmp_path: Path) -> None:
    save_model_atomic(load_model("tiny-llama"), tmp_path / "model")
    assert mode(tmp_path / "model") == 0o755
    files = list((tmp_path / "model").iterdir())
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.name: mode(f) for f in files} == {f.name: 0o644 for f in files}


def test_the_process_umask_is_never_changed(
    umask_022, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the umask by setting it (to 0, for a moment) would let another thread create a
    world-writable file; each file's mode is set where it is created instead."""
    monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("the umask was changed"))
    save_safetensors_atomic(tmp_path / "c.safetensors", {"mom2": torch.eye(2)}, {})
    save_model_atomic(load_model("tiny-llama"), tmp_path / "model")
    assert mode(tmp_path / "c.safetensors") == 0o644
    assert mode(tmp_path / "model") == 0o755
    assert {mode(f) for f in (tmp_path / "model").iterdir()} == {0o644}
