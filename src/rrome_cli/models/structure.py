"""Where the edited pieces live, read off the model itself (no list of architecture names).

A decoder-only transformer, as transformers builds it, is a ``ModuleList`` of decoder blocks
(one per layer) between the input embeddings and a final norm, then the output head
(``get_output_embeddings()``). ROME edits one block's MLP output projection W: the linear map
from the MLP's hidden width back to the residual width. Found here by what the modules are:

- the blocks: the ``ModuleList`` with as many members as the configuration has layers (the
  shallowest, should there be two), each holding linear maps;
- the MLP of a block: a module whose own linear maps are one output projection (width F to
  the residual width d) and input projections from d that feed it: one of width F (GPT-2),
  two (gated: Llama's gate and up) or one fused of 2F (Phi-3's gate_up), beside an
  activation-function module (which attention, whose maps can have the same widths, lacks).
  ``nn.Linear`` (or a subclass) and GPT-2's ``Conv1D`` count as linear maps. A block that
  holds these maps itself, with no MLP module (OPT), is refused;
- the final norm (reported): the last module beside the blocks whose parameters are all vectors;
  the head:
  ``get_output_embeddings()``, tied when its weight is the input embeddings'.

Every block must give the same names. A block with expert weights (3-D parameters), or with
several MLPs (experts, a shared expert), is a mixture of experts: refused, naming what was
found, rather than guessed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from rrome_cli.models.families import (
    FAMILIES,
    MODULE_KEYS,
    ModuleNames,
    UnknownArchitectureError,
    num_layers,
)

NAME_HINT = (
    "name the modules in the hparams YAML (rewrite_module_tmp, layer_module_tmp, "
    "mlp_module_tmp; '{}' for the layer number): docs/architectures.md"
)


@dataclass(frozen=True)
class Structure:
    """What was found, with the names for the report and the patches."""

    names: ModuleNames
    layers: str  # the blocks' ModuleList, e.g. "model.layers"
    n_layers: int
    final_norm: str | None  # None: none found (reported only; the base model applies it)
    head: str | None  # the output head (get_output_embeddings()); None: the model has none
    tied: bool  # the head's weight is the input embeddings'
    found_by: str  # "structure", "table" (the families table), "hparams" (the YAML)

    def to_json(self) -> dict[str, Any]:
        return {
            "found_by": self.found_by,
            "layers": self.layers,
            "n_layers": self.n_layers,
            "rewrite": self.names.rewrite_module_tmp,
            "mlp": self.names.mlp_module_tmp,
            "block": self.names.layer_module_tmp,
            "final_norm": self.final_norm,
            "head": self.head,
            "tied_embeddings": self.tied,
        }


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def widths(module: nn.Module) -> tuple[int, int]:
    """(input, output) width of a linear map: nn.Linear stores W as (out, in), Conv1D (in, out)."""
    rows, cols = module.weight.shape
    return (rows, cols) if type(module).__name__ == "Conv1D" else (cols, rows)


def _is_activation(module: nn.Module) -> bool:
    """A parameter- and buffer-free leaf that is neither dropout nor identity: an activation
    function module (transformers' ACT2FN gives modules; so do torch's nn.GELU, nn.SiLU...)."""
    if isinstance(module, nn.modules.dropout._DropoutNd | nn.Identity):
        return False
    return (
        not list(module.children())
        and not list(module.parameters(recurse=False))
        and not list(module.buffers(recurse=False))
    )


def mlp_projection(module: nn.Module, width: int) -> str | None:
    """The name (a child of ``module``) of its MLP output projection, if ``module`` is an MLP
    on a residual stream of ``width``: see the module docstring. None otherwise."""
    children = dict(module.named_children())
    linear = {n: widths(m) for n, m in children.items() if is_linear(m)}
    if not any(_is_activation(m) for m in children.values()):
        return None
    found = []
    for name, (f, d) in linear.items():
        inputs = [w for n, w in linear.items() if n != name]
        if d == width and all(w_in == d for w_in, _ in inputs) and sorted(w for _, w in inputs) in (
            [f],
            [f, f],
            [2 * f],
        ):
            found.append(name)
    return found[0] if len(found) == 1 else None


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks' ModuleList."""
    try:
        expected: int | None = num_layers(_text_config(model))
    except UnknownArchitectureError:
        expected = None
    lists = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and len(mod) > 0
        and all(any(is_linear(m) for m in block.modules()) for block in mod)
    ]
    if expected is not None:
        lists = [(n, m) for n, m in lists if len(m) == expected]
    if not lists:
        counted = f" of {expected}" if expected is not None else ""
        raise UnknownArchitectureError(
            f"{type(model).__name__}: no list{counted} decoder blocks holding linear maps was "
            f"found; {NAME_HINT}"
        )
    # the shallowest (experts' lists sit inside the blocks), then the longest
    return min(lists, key=lambda item: (item[0].count("."), -len(item[1])))


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _describe(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "")


def residual_width(model: nn.Module) -> int:
    """The residual stream's width: the configuration's hidden size, else the embeddings'."""
    width = getattr(_text_config(model), "hidden_size", None)
    if isinstance(width, int):
        return width
    return int(model.get_input_embeddings().weight.shape[1])


def _block_mlp(block: nn.Module, where: str, width: int) -> tuple[str, str]:
    """(MLP, its output projection), relative to ``block``, whose name is ``where``."""
    experts = [
        f"{n} {tuple(p.shape)}" for n, p in block.named_parameters() if p.dim() >= 3
    ]
    if experts:
        raise UnknownArchitectureError(
            f"{where}: a mixture-of-experts block (expert weights stacked in 3-D: "
            f"{_describe(experts)}): rrome edits one dense MLP, and this block's cannot be "
            "told unambiguously"
        )
    found = []
    for name, mod in block.named_modules():
        proj = mlp_projection(mod, width)
        if proj is not None:
            found.append((name, f"{name}.{proj}" if name else proj))
    if len(found) > 1:
        listed = _describe([p for _, p in found])
        raise UnknownArchitectureError(
            f"{where}: several candidate MLP output projections ({listed}): a mixture of "
            f"experts or an MLP rrome cannot tell unambiguously; {NAME_HINT}"
        )
    if not found:
        maps = [f"{n} {widths(m)[0]}->{widths(m)[1]}" for n, m in block.named_modules()
                if is_linear(m)]  # fmt: skip
        raise UnknownArchitectureError(
            f"{where}: no MLP found (linear maps: {_describe(maps, 8)}); {NAME_HINT}"
        )
    mlp, proj = found[0]
    if not mlp:
        raise UnknownArchitectureError(
            f"{where}: the block holds its MLP's linear maps itself ({proj} and its input), no "
            "MLP module of its own (OPT's blocks also flatten the tokens before them, which "
            f"rrome's passes do not follow); {NAME_HINT}"
        )
    return mlp, proj


def _final_norm(model: nn.Module, layers: str) -> str | None:
    """The last module beside the blocks whose parameters are all vectors (a norm; OLMo's has
    none, and no buffers either: rotary embeddings hold theirs)."""
    trunk_name = layers.rpartition(".")[0]
    trunk = model.get_submodule(trunk_name)
    norms = [
        name
        for name, mod in trunk.named_children()
        if all(p.dim() == 1 for p in mod.parameters())
        and (list(mod.parameters()) or _is_activation(mod))  # OLMo's norm has no parameters
    ]
    if not norms:
        return None
    return f"{trunk_name}.{norms[-1]}" if trunk_name else norms[-1]


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, mod in model.named_modules() if mod is target), None)


def find_structure(model: nn.Module) -> Structure:
    """The blocks, the MLP and its output projection, the final norm and the head of ``model``
    (loaded, or on the meta device). Raises UnknownArchitectureError, naming what was found,
    where they cannot be told unambiguously."""
    layers, blocks = _blocks(model)
    width = residual_width(model)
    per_block = [_block_mlp(block, f"{layers}.{i}", width) for i, block in enumerate(blocks)]
    differ = [i for i, found in enumerate(per_block) if found != per_block[0]]
    if differ:
        mlp, proj = per_block[differ[0]]
        raise UnknownArchitectureError(
            f"{type(model).__name__}: the blocks differ: block 0's MLP output projection is "
            f"{per_block[0][1]!r}, block {differ[0]}'s {proj!r} (blocks {differ[:8]} differ); "
            f"{NAME_HINT}"
        )
    mlp, proj = per_block[0]
    names = ModuleNames(
        rewrite_module_tmp=f"{layers}.{{}}.{proj}",
        layer_module_tmp=f"{layers}.{{}}",
        mlp_module_tmp=f"{layers}.{{}}.{mlp}",
    )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = (
        head is not None
        and embeddings is not None
        and getattr(head, "weight", None) is getattr(embeddings, "weight", False)
    )
    return Structure(
        names, layers, len(blocks), _final_norm(model, layers), _name_of(model, head), tied,
        "structure",
    )  # fmt: skip


def resolve(
    model: nn.Module, architecture: str | None = None, overrides: dict[str, Any] | None = None
) -> Structure:
    """The module names to edit ``model`` with: the families table's for an architecture it
    lists (a fast path, cross-checked against the structure), else the structure's; any of
    ``MODULE_KEYS`` set in ``overrides`` (the hparams YAML) win. Where the structure cannot
    be read, the YAML must name all three."""
    given = {k: v for k, v in (overrides or {}).items() if k in MODULE_KEYS and v}
    try:
        found: Structure | None = find_structure(model)
        failure: UnknownArchitectureError | None = None
    except UnknownArchitectureError as err:
        found, failure = None, err
    table = FAMILIES.get(architecture or "")
    if table is not None and _exists(model, table):
        if found is not None and found.names != table:
            warnings.warn(
                f"{architecture}: the families table names {table.rewrite_module_tmp!r}, the "
                f"model's structure {found.names.rewrite_module_tmp!r}; using the table's",
                stacklevel=2,
            )
        base, by = table, "table"
    elif found is not None:
        base, by = found.names, "structure"
    elif set(given) == set(MODULE_KEYS):
        base, by = ModuleNames(**given), "hparams"
    else:
        missing = ", ".join(k for k in MODULE_KEYS if k not in given)
        raise UnknownArchitectureError(f"{failure} (missing: {missing})") from None
    names = replace(base, **given)
    if given:
        by = "hparams"
    layers = names.layer_module_tmp.rsplit(".{}", 1)[0]
    n_layers = len(model.get_submodule(layers)) if _exists_list(model, layers) else 0
    _check(model, names, n_layers or num_layers(_text_config(model)), given)
    if found is not None and found.layers == layers:
        return replace(found, names=names, found_by=by)
    return Structure(names, layers, n_layers, None, None, False, by)


def _exists(model: nn.Module, names: ModuleNames) -> bool:
    try:
        model.get_submodule(names.rewrite(0))
    except AttributeError:
        return False
    return True


def _exists_list(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), nn.ModuleList)
    except AttributeError:
        return False


def _check(model: nn.Module, names: ModuleNames, n_layers: int, given: dict[str, Any]) -> None:
    """Every layer has the named modules, and W is a linear map."""
    for key in MODULE_KEYS:
        template = getattr(names, key)
        source = f"hparams {key}" if key in given else key
        if "{}" not in template:
            raise UnknownArchitectureError(f"{source} {template!r}: no '{{}}' for the layer")
        for layer in range(n_layers):
            try:
                module = model.get_submodule(template.format(layer))
            except AttributeError:
                raise UnknownArchitectureError(
                    f"{source} {template!r}: {type(model).__name__} has no module "
                    f"{template.format(layer)!r}"
                ) from None
            if key == "rewrite_module_tmp" and not is_linear(module):
                raise UnknownArchitectureError(
                    f"{source} {template!r}: {template.format(layer)!r} is a "
                    f"{type(module).__name__}, not a linear map (nn.Linear or Conv1D)"
                )
