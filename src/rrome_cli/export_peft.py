"""A run's patches as a PEFT LoRA adapter: what transformers + PEFT and LoRA-serving engines load.

A rank-one edit W' = W + right leftᵀ at a module is a rank-1 LoRA with A = leftᵀ (1, d_in),
B = right (d_out, 1) and scaling 1; n edits at one module, stacked in the order applied, are a
rank-n LoRA whose B A is their sum. PEFT computes W x + (alpha / r) B A x, so every module gets
alpha = r. The directory is written without importing ``peft``: ``adapter_config.json`` with
the keys ``peft.LoraConfig`` reads, ``adapter_model.safetensors`` with PEFT's key names, and a
README saying where it came from.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from rrome_cli.engine.update import Patch
from rrome_cli.files import publish
from rrome_cli.models.families import is_conv1d
from rrome_cli.patches import PatchFileError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EACH_INDEX = "adapters.json"  # what ``--each`` writes beside its adapter folders

SUM_OF_INDEPENDENT = (
    "these edits come from an independent run: each was made on the unedited model, and this "
    "adapter adds them all up; a sum of independent edits is not what a sequential run would "
    "make (it was never evaluated). --each writes one adapter per edit."
)


@dataclass
class ModuleFactors:
    """The LoRA factors of one module: B A = the sum of its edits' delta W (d_out, d_in)."""

    module: str
    a: torch.Tensor  # lora_A, (r, d_in), fp32
    b: torch.Tensor  # lora_B, (d_out, r), fp32
    edits: int
    compressed: bool = False

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the module's W."""
        return self.b.shape[0], self.a.shape[1]


@dataclass
class BaseModel:
    """What the adapter needs to know of the model the patches were made on."""

    name_or_path: str  # base_model_name_or_path: a hub id or a local checkpoint
    revision: str | None
    fan_in_fan_out: bool  # GPT-2's Conv1D stores W as (d_in, d_out)


@dataclass
class Adapter:
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    factors: list[ModuleFactors]
    notes: list[str] = field(default_factory=list)  # said in the README and the command output


def stack_patches(patches: list[Patch]) -> list[ModuleFactors]:
    """Per module, in the order each module was first edited: the edits' left vectors as rows
    of A and right vectors as columns of B, in the order applied. A module with at least as
    many edits as min(d_out, d_in) is compressed exactly (``compress``)."""
    by_module: dict[str, list[Patch]] = {}
    for patch in patches:
        by_module.setdefault(patch.module, []).append(patch)
    factors = []
    for module, edits in by_module.items():
        a = torch.stack([p.left.detach().float().cpu() for p in edits])
        b = torch.stack([p.right.detach().float().cpu() for p in edits], dim=1)
        stacked = ModuleFactors(module, a, b, len(edits))
        factors.append(compress(stacked) if len(edits) >= min(*stacked.shape) else stacked)
    return factors


def compress(factors: ModuleFactors) -> ModuleFactors:
    """The same B A at rank min(d_out, d_in): B = Qb Rb and Aᵀ = Qa Ra (QR, float64), the small
    core Rb Raᵀ = U S Vᵀ (SVD), then B' = Qb U √S and A' = √S Vᵀ Qaᵀ. Nothing is truncated; √S
    on both sides keeps the two factors' magnitudes alike (what a half-precision cast needs)."""
    qb, rb = torch.linalg.qr(factors.b.double())  # (d_out, k), (k, n)
    qa, ra = torch.linalg.qr(factors.a.double().T)  # (d_in, k'), (k', n)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # rank <= min(k, k')
    root = s.sqrt()
    b = (qb @ u) * root
    a = root[:, None] * (vh @ qa.T)
    return ModuleFactors(factors.module, a.float(), b.float(), factors.edits, compressed=True)


def build_adapter(
    patches: list[Patch], base: BaseModel, dtype: torch.dtype = torch.float32
) -> Adapter:
    """``patches`` as one LoRA adapter: its ``adapter_config.json`` dict and its tensors (in
    ``dtype``; fp32 unless asked). Scaling is 1 everywhere: r = lora_alpha per module."""
    if not patches:
        raise ValueError("no patches: an adapter needs at least one edit")
    factors = stack_patches(patches)
    tensors = {}
    for f in factors:
        prefix = f"base_model.model.{f.module}"
        tensors[f"{prefix}.lora_A.weight"] = f.a.to(dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = f.b.to(dtype).contiguous()
    notes = [
        f"{f.module}: {f.edits} edits, at least min(d_out, d_in) = {min(*f.shape)}: "
        f"compressed exactly (QR and SVD) to rank {f.rank}"
        for f in factors
        if f.compressed
    ]
    return Adapter(lora_config(factors, base), tensors, factors, notes)


def lora_config(factors: list[ModuleFactors], base: BaseModel) -> dict[str, Any]:
    """The keys of ``peft.LoraConfig`` that matter, with scaling alpha / r = 1 for every module.

    r = lora_alpha = the largest rank, so that an engine that reads only the global pair (and
    takes each module's rank from its tensors) scales by 1 too; modules at several layers, or
    of different ranks, get ``rank_pattern`` / ``alpha_pattern`` entries with equal values
    (PEFT sizes each module's A and B from ``rank_pattern``). Keys are module names; PEFT
    matches a pattern as a suffix of the module's name, and a full name matches only itself."""
    top = max(f.rank for f in factors)
    several = len(factors) > 1
    pattern = {f.module: f.rank for f in factors} if several else {}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.name_or_path,
        "revision": base.revision,
        "inference_mode": True,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": [f.module for f in factors],
        "fan_in_fan_out": base.fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,  # rsLoRA would scale by alpha / sqrt(r)
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def edits_of(patches: list[Patch]) -> list[list[Patch]]:
    """The patches grouped by edit, in order: an edit's patches (one per edited layer) are
    consecutive, share their request, and name each module once."""
    edits: list[list[Patch]] = []
    for patch in patches:
        current = edits[-1] if edits else None
        if (
            current is not None
            and current[0].request == patch.request
            and patch.module not in {p.module for p in current}
        ):
            current.append(patch)
        else:
            edits.append([patch])
    return edits


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def edit_folder_names(edits: list[list[Patch]]) -> list[str]:
    """A folder per edit: its case id when every edit has a distinct one that is a safe file
    name, else ``edit-<index>`` (from 1) for all, so one run's folders read one way."""
    ids = [e[0].request for e in edits]
    if all(_SAFE_NAME.match(i) for i in ids) and len(set(ids)) == len(ids):
        return ids
    width = len(str(len(edits)))
    return [f"edit-{i:0{width}d}" for i in range(1, len(edits) + 1)]


def readme(adapter: Adapter, base: BaseModel, provenance: str, requests: list[str]) -> str:
    """A model card: front matter for the hub, the provenance line, what is inside."""
    hub = not Path(base.name_or_path).is_absolute() and "/" in base.name_or_path
    front = ["---", "library_name: peft"]
    if hub:
        front.append(f"base_model: {base.name_or_path}")
    front += ["tags:", "- lora", "- rrome", "- model-editing", "---", ""]
    modules = "\n".join(
        f"- `{f.module}`: rank {f.rank} ({f.edits} edits{', compressed' if f.compressed else ''})"
        for f in adapter.factors
    )
    more = len(requests) - 20
    shown = ", ".join(requests[:20]) + (f" and {more} more" if more > 0 else "")
    body = [
        "# R-ROME edits as a LoRA adapter",
        "",
        provenance,
        "",
        f"Base model: `{base.name_or_path}`. Scaling is 1 (lora_alpha = r for every module): "
        "loaded on that base model, the adapter gives the model `rrome apply` would write "
        "from the same patches, to within floating-point rounding.",
        "",
        f"Edits ({len(requests)}): {shown}",
        "",
        "Modules:",
        modules,
    ]
    if adapter.notes:
        body += ["", "Notes:", *(f"- {n}" for n in adapter.notes)]
    return "\n".join(front + body) + "\n"


def provenance_line(patches_file: Path, n_edits: int) -> str:
    try:
        ours = version("rrome-cli")
    except PackageNotFoundError:
        ours = "(source tree)"
    when = datetime.now().isoformat(timespec="seconds")
    return (
        f"Written by rrome-cli {ours} (`rrome apply --format peft`) on {when} from "
        f"`{patches_file.resolve()}`: {n_edits} edits."
    )


def write_adapter_files(directory: Path, adapter: Adapter, card: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2) + "\n")
    save_file(adapter.tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / "README.md").write_text(card)


@dataclass
class Written:
    """What ``write_adapter`` or ``write_each`` wrote, for the command's output."""

    path: Path
    adapters: list[tuple[str, Adapter]]  # (folder, adapter); folder "" for a single adapter
    notes: list[str]  # compressions, and what the adapters are not


def write_adapter(
    target: Path,
    patches: list[Patch],
    base: BaseModel,
    patches_file: Path,
    dtype: torch.dtype = torch.float32,
    independent: bool = False,
) -> Written:
    """One adapter of every patch, written as a directory at ``target`` atomically.
    ``independent``: the patches come from an independent run (said in the README)."""
    adapter = build_adapter(patches, base, dtype)
    edits = edits_of(patches)
    if independent and len(edits) > 1:
        adapter.notes.append(SUM_OF_INDEPENDENT)
    card = readme(adapter, base, provenance_line(patches_file, len(edits)), requests_of(edits))
    with _atomic_directory(target) as tmp:
        write_adapter_files(tmp, adapter, card)
    return Written(target, [("", adapter)], adapter.notes)


def write_each(
    target: Path,
    patches: list[Patch],
    base: BaseModel,
    patches_file: Path,
    dtype: torch.dtype = torch.float32,
    sequential: bool = False,
) -> Written:
    """One adapter per edit, each in a folder of its own under ``target`` (the form a
    multi-adapter server picks per request), with ``adapters.json`` listing them; all written
    at once, atomically. ``sequential``: edit k was made on top of edits 1..k-1 (the README
    of each says so)."""
    edits = edits_of(patches)
    names = edit_folder_names(edits)
    line = provenance_line(patches_file, len(edits))
    written: list[tuple[str, Adapter]] = []
    index: list[dict[str, Any]] = []
    notes: list[str] = []
    with _atomic_directory(target) as tmp:
        for number, (name, edit) in enumerate(zip(names, edits, strict=True), start=1):
            adapter = build_adapter(edit, base, dtype)
            notes += [f"{name}: {n}" for n in adapter.notes]
            if sequential and number > 1:
                adapter.notes.append(
                    f"edit {number} of a sequential run: it was made on the model holding "
                    f"edits 1 to {number - 1}; alone on the base model it is not what the run "
                    "evaluated"
                )
            card = readme(adapter, base, f"{line} This adapter: edit {number}.", [name])
            write_adapter_files(tmp / name, adapter, card)
            written.append((name, adapter))
            modules = [f.module for f in adapter.factors]
            index.append({"adapter": name, "edit": number, "request": edit[0].request,
                          "modules": modules})  # fmt: skip
        (tmp / EACH_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "README.md").write_text(
            f"# R-ROME edits, one LoRA adapter per edit\n\n{line}\n\n"
            f"Base model: `{base.name_or_path}`. Folders: {', '.join(names)} "
            f"(listed in `{EACH_INDEX}`).\n"
        )
    if sequential and len(edits) > 1:
        notes.append(
            "these edits come from a sequential run: each after the first was made on the "
            "model holding the earlier ones, so alone on the base model it is not what the "
            "run evaluated (its README says so)"
        )
    return Written(target, written, notes)


def requests_of(edits: list[list[Patch]]) -> list[str]:
    return [f"`{e[0].request}`" if e[0].request else f"edit {i}" for i, e in enumerate(edits, 1)]


@contextmanager
def _atomic_directory(target: Path) -> Iterator[Path]:
    """A temporary directory beside ``target`` to fill, renamed onto ``target`` when filled
    (replacing what is there: the caller decided it may go); removed if filling fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".adapter-"))
    try:
        yield tmp
        publish(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fan_in_fan_out(model: nn.Module, patches: list[Patch], path: Path) -> bool:
    """True when the edited modules are Conv1D (GPT-2), which store W as (d_in, d_out);
    ``model`` may hold no weights (the meta device)."""
    layouts = {is_conv1d(model.get_submodule(p.module)) for p in patches}
    if len(layouts) > 1:  # PEFT has one fan_in_fan_out per adapter
        raise PatchFileError(f"{path}: edits both Linear and Conv1D modules: one adapter cannot")
    return layouts == {True}


def export(
    patches_file: Path,
    model: str | None,
    out: Path,
    dtype: torch.dtype = torch.float32,
    each: bool = False,
) -> Written:
    """``rrome apply --format peft``: the patches of ``patches_file`` as one adapter at
    ``out`` (``each``: one per edit, in folders under ``out``) for ``model``, whose weights
    are never loaded. A bad patches file, or one made for another model, fails first."""
    from rrome_cli.models.loading import load_skeleton
    from rrome_cli.patches import check_patches_fit, load_patches, run_protocol

    patches = load_patches(patches_file)
    if not patches:
        raise PatchFileError(f"{patches_file}: holds no patches (no edit was applied)")
    net, source, revision = load_skeleton(model)
    check_patches_fit(net, patches, patches_file)
    base = BaseModel(source, revision, fan_in_fan_out(net, patches, patches_file))
    protocol = run_protocol(patches_file)
    if each:
        return write_each(out, patches, base, patches_file, dtype, protocol == "sequential")
    return write_adapter(out, patches, base, patches_file, dtype, protocol == "independent")
