"""Patch files: the rank-one patches of a run on disk, and the journal they go through.

A run keeps its edits in ``patches.safetensors`` (one safetensors file, the layout in its
metadata). While it goes, each applied edit is journalled in a file of its own,
``patches.d/<index>.safetensors``, before its report line is written; the journal is folded
into ``patches.safetensors`` when the run ends, is interrupted, or resumes. The report on disk
is the record of what was done: patches beyond its applied records are dropped on a resume.
``rrome eval --patches``, ``rrome apply`` and the PEFT export read the same files.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from rrome_cli.engine.update import Patch
from rrome_cli.files import PATCH_JOURNAL, done_records, save_safetensors_atomic
from rrome_cli.models.families import weight_as_out_in


class PatchFileError(ValueError):
    """A patches file that cannot be read or is not an rrome patches file; names the file."""


def save_patches(path: Path, patches: list[Patch], with_keys: bool = False) -> None:
    """All patches in one safetensors file, written atomically; layout in the metadata.
    ``with_keys`` also stores each patch's keys (what a resumed, protected run needs)."""
    tensors, meta = {}, []
    for i, p in enumerate(patches):
        tensors[f"{i}.left"] = p.left.detach().float().cpu().contiguous()
        tensors[f"{i}.right"] = p.right.detach().float().cpu().contiguous()
        if with_keys and p.keys is not None:
            tensors[f"{i}.keys"] = p.keys.detach().float().cpu().contiguous()
        meta.append({"layer": p.layer, "module": p.module, "dtype": p.dtype, "request": p.request})
    save_safetensors_atomic(path, tensors, {"rrome_patches": json.dumps(meta)})


def load_patches(path: Path) -> list[Patch]:
    """The patches of a ``patches.safetensors`` that ``save_patches`` wrote, in its order."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("rrome_patches", "null"))
        tensors = load_file(str(path))
    except (OSError, SafetensorError, json.JSONDecodeError) as err:
        raise PatchFileError(f"{path}: cannot read patches: {err}") from None
    if not isinstance(meta, list):
        raise PatchFileError(f"{path}: not an rrome patches file (no rrome_patches metadata)")
    try:
        return [
            Patch(
                m["layer"],
                m["module"],
                tensors[f"{i}.left"],
                tensors[f"{i}.right"],
                m["dtype"],
                m.get("request", ""),
                tensors.get(f"{i}.keys"),
            )
            for i, m in enumerate(meta)
        ]
    except (KeyError, TypeError) as err:
        raise PatchFileError(f"{path}: patch layout is damaged (missing {err})") from None


def check_patches_fit(model: nn.Module, patches: list[Patch], path: Path) -> None:
    """Every patch names a module of ``model`` whose W has the patch's shape (patches made on
    another model fail here, before anything is applied)."""
    for i, patch in enumerate(patches, start=1):
        which = f"{path}: patch {i} (request {patch.request or '?'}) edits {patch.module}"
        try:
            module = model.get_submodule(patch.module)
        except AttributeError:
            raise PatchFileError(f"{which}, which this model does not have") from None
        shape = tuple(weight_as_out_in(module).shape)
        if shape != (patch.right.numel(), patch.left.numel()):
            made = (patch.right.numel(), patch.left.numel())
            raise PatchFileError(f"{which}: made for W of {made}, this model's is {shape}")


def run_protocol(patches: Path) -> str | None:
    """How the run that wrote ``patches`` made them, "independent" or "sequential", from the
    run.json beside it; None without one (a patch file copied elsewhere)."""
    run_json = patches.parent / "run.json"
    if not run_json.exists():
        return None
    return json.loads(run_json.read_text()).get("protocol")


def warn_if_independent(patches: Path, n: int, console: Console) -> None:
    """Patches of an independent run were each made on the unedited model: applied together
    (``rrome eval --patches``, ``rrome apply``) they give a model that run never evaluated."""
    if n > 1:
        if run_protocol(patches) == "independent":
            console.print(
                f"[yellow]{patches}: these {n} patches come from an independent run (each made "
                "on the unedited model); here they are applied all together"
            )


def journal_edit(out: Path, index: int, patches: list[Patch], with_keys: bool) -> None:
    """One edit's patches in a file of their own, ``patches.d/<index>.safetensors``, written
    atomically. Rewriting the run's whole patch file after each edit cost O(n) per edit:
    1.2 s an edit by the 2,000th on a 7B model (120 MB)."""
    journal = out / PATCH_JOURNAL
    journal.mkdir(exist_ok=True)
    save_patches(journal / f"{index:07d}.safetensors", patches, with_keys=with_keys)


def fold_journal(out: Path, patches: list[Patch], with_keys: bool) -> None:
    """Every patch of the run in ``patches.safetensors`` (atomically); the journal goes."""
    save_patches(out / "patches.safetensors", patches, with_keys=with_keys)
    clear_journal(out / PATCH_JOURNAL)


# A journal file, or the temporary file it is written through (files.save_safetensors_atomic)
_JOURNAL_FILE = re.compile(r"\.?\d{7}\.safetensors(\..+\.tmp)?")


def clear_journal(journal: Path) -> None:
    """Remove the journal's own files, then the folder if that left it empty: anything else
    found there is not rrome's, and stays."""
    if not journal.is_dir():
        return
    for path in journal.iterdir():
        if _JOURNAL_FILE.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        journal.rmdir()


def applied(records: Sequence[dict[str, Any]]) -> int:
    """How many of a report's ``records`` are applied edits (each made one patch per layer)."""
    return sum(r.get("status") == "applied" for r in records)


def reported_patches(out: Path, records: list[dict[str, Any]], per_edit: int) -> list[Patch]:
    """The patches of the applied edits among a report's ``records``, ``per_edit`` each: those
    folded into ``patches.safetensors``, then the journal's (a run killed outright leaves its
    last edits there). Patches are saved before their report line, so an interruption in
    between leaves one edit more than the report holds: it is left out (a resume makes it
    again)."""
    path = out / "patches.safetensors"
    patches = (load_patches(path) if path.exists() else [])[: applied(records) * per_edit]
    for shard in journal_files(out, records, len(patches), per_edit):
        patches += load_patches(shard)
    return patches


def journal_files(
    out: Path, records: Sequence[dict[str, Any]], folded: int, per_edit: int
) -> list[Path]:
    """The journal files holding the applied edits of ``records`` (report records) past the
    first ``folded`` patches (those in patches.safetensors). The report and the patches never
    disagree: an edit in neither raises, naming what is missing."""
    indices = [r["index"] for r in records if r.get("status") == "applied"]
    needed = len(indices) * per_edit
    shards = [out / PATCH_JOURNAL / f"{i:07d}.safetensors" for i in indices[folded // per_edit :]]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        folded_file = out / "patches.safetensors"
        held = f"holds {folded} of" if folded_file.exists() else "is missing, and with it"
        raise PatchFileError(
            f"{folded_file}: {held} the {needed} patches of the report's {len(indices)} "
            f"applied edits, and the journal {out / PATCH_JOURNAL} lacks {len(missing)} of "
            f"the rest ({missing[0].name}, ...): the run cannot go on with its report and "
            f"patches in step. Put {folded_file.name} back, or start again with a new --out"
        )
    return shards


def check_journal(out: Path, per_edit: int) -> None:
    """Before a resume of the run in ``out`` loads the model: its report and its patches
    (``per_edit`` an edit) are in step (``journal_files``), and none would be dropped for
    want of the report."""
    report, folded = out / "report.jsonl", out / "patches.safetensors"
    count = len(load_patches(folded)) if folded.exists() else 0
    if not report.exists() and count:
        raise FileNotFoundError(
            f"{report}: missing, while {folded} holds {count} patches; a resume would drop "
            "them. Put the report back, or start again with a new --out"
        )
    records = done_records(report)
    journal_files(out, records, min(count, applied(records) * per_edit), per_edit)
