"""Hyperparameters: plain YAML mapped to a plain dataclass.

EasyEdit's R-ROME YAML files load unchanged: same keys, same meanings. A few keys that are
vestigial there are accepted and ignored with a note; a knob rrome removed loads at the one
value it still runs; an unknown key is an error that names the nearest valid one.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

VARIANTS = ("r-rome", "rome", "p-rome")
V_STOPS = ("loss", "target")  # engine.values._reached implements each
V_STOP_LOSS = 5e-2  # v_stop "loss": ROME's compute_v stops once the total loss is below this
REALIZED = ("off", "bare")  # v_realized_delta's values (YAML reads false, and off, as "off")
# Keys EasyEdit's files carry that do nothing here, accepted with a note: the device comes from
# --devices, the loss is always read at the LM head, sharding comes from the device map, and the
# last four are never read (rrome edits at the subject's last token, keeps its statistics in
# float32, and finds the final norm and output head through the model itself).
IGNORED_KEYS = {
    "v_loss_layer": "the value loss is always read at the output head",
    "device": "use --devices",
    "model_parallel": "use --devices 0,1 (accelerate device map)",
    "fp16": "use --fp16 / --bf16",
    "alg_name": "rrome always runs R-ROME (choose --variant for rome / p-rome)",
    "model_name": "use --model",
    "attn_module_tmp": "not needed by R-ROME",
    "mom2_dataset": "use --corpus (rrome stats)",
    "enable_prompt_keys": "use variant: p-rome",
    "enable_random_prefix_keys": "use variant: r-rome",
    "original_implementation": "use variant: rome",
    "fact_token": "rrome always edits at the subject's last token",
    "mom2_dtype": "the key statistics are summed in float64 and kept in float32",
    "ln_f_module": "not needed: the final norm runs inside the model's forward",
    "lm_head_module": "not needed: the output head is the model's own output embeddings",
}
# An ignored key with the one value rrome does: any other asks for what it does not do.
IGNORED_ONLY = {"fact_token": "subject_last"}
# Knobs removed after their study (the findings: docs/recipe.md, "Measured and not shipped").
# run.json files and bench results written before carry them: each loads at the one value
# rrome now always uses (its former default), and is refused at any other.
REMOVED_KEYS = {"v_stop_loss": V_STOP_LOSS, "v_adam_beta2": 0.999, "v_bare_weight": 0.0}


class HParamsError(ValueError):
    """A bad hyperparameter file or value; the message names the file, the line and the key."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key  # the offending key, when there is one


# Numeric hyperparameters, what each must be (NaN and infinities never are), checked at load so
# that a bad value fails with its file and line, not after the model has loaded.
RANGES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("v_num_grad_steps", lambda x: x >= 1 and float(x).is_integer(), "a whole number, 1 or more"),
    ("v_lr", lambda x: x > 0, "greater than 0"),
    ("v_weight_decay", lambda x: x >= 0, "0 or more"),
    ("clamp_norm_factor", lambda x: x > 0, "greater than 0"),
    ("kl_factor", lambda x: x >= 0, "0 or more"),
    ("v_stop_prob", lambda x: 0 < x <= 1, "in (0, 1]"),
    ("k_bare_min", lambda x: 0 < x <= 1, "in (0, 1] (or null: the plain mean)"),
    ("max_phrasings", lambda x: x >= 0 and float(x).is_integer(), "0 (none) or a whole number"),
    ("mom2_n_samples", lambda x: x >= 1 and float(x).is_integer(), "a whole number, 1 or more"),
    ("mom2_ridge", lambda x: x >= 0, "0 or more"),
    ("protect_weight", lambda x: x >= 0, "0 (off) or positive"),
)
OPTIONAL = {"k_bare_min"}  # may be null


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _index(value: Any) -> bool:
    """A whole number, 0 or more (a layer, a length)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class HParams:
    """One edit recipe: EasyEdit's R-ROME keys with their meanings, and rrome's own. Why the
    SmolLM2 recipe has the values it has, with the evidence: docs/recipe.md."""

    layers: list[int] = field(default_factory=lambda: [5])  # the layers whose MLP is edited
    v_num_grad_steps: int = 25  # the cap on the value optimisation's steps
    v_lr: float = 0.5  # Adam's learning rate on delta
    v_weight_decay: float = 1e-3  # the loss's weight on ||delta|| / ||z||^2
    clamp_norm_factor: float = 4.0  # after each step delta is clamped to this many ||z||
    kl_factor: float = 0.0625  # the loss's weight on KL(edited || unedited) after "{} is a"
    v_stop: str = "loss"  # "loss": ROME's, the total loss under V_STOP_LOSS; "target": below
    # "target": stop once the bare prompt, and the prompts on average, give the target this
    v_stop_prob: float = 0.9
    # the bare prompt's least share of delta (k* leans toward its key); None: the plain mean
    k_bare_min: float | None = None
    # "bare": the loss sees what the update will add, the bare prompt run whole; "off": ROME's
    v_realized_delta: str = "off"
    max_phrasings: int = 6  # a request's relation phrasings among the value's prompts, at most
    mom2_adjustment: bool = True  # C: the keys' second moment (rrome stats); false: C = I
    mom2_n_samples: int = 100_000  # token budget of the statistics pass
    mom2_ridge: float = 1e-6  # lambda = mom2_ridge * mean(diag C), for the Cholesky solve
    # sequential runs: each applied edit's keys join C at this weight, to keep it; 0: R-ROME
    protect_weight: float = 0.0
    context_template_length_params: list[list[int]] = field(  # [tokens, count] of prefixes
        default_factory=lambda: [[5, 10], [10, 10]]
    )
    variant: str = "r-rome"  # r-rome, rome (ROME's keys) or p-rome (the prompt's keys)
    stats_dir: str | None = None  # the statistics cache; None: rrome's cache directory
    rewrite_module_tmp: str | None = None  # W, "{}" the layer; None (each below): the family's
    layer_module_tmp: str | None = None  # the decoder block
    mlp_module_tmp: str | None = None  # the MLP, whose output delta joins while it is optimised

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise HParamsError(
                f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}", "variant"
            )
        if self.v_stop not in V_STOPS:
            raise HParamsError(
                f"v_stop must be one of {', '.join(V_STOPS)}, got {self.v_stop!r}", "v_stop"
            )
        if self.v_realized_delta not in REALIZED:
            raise HParamsError(
                f"v_realized_delta must be off (or false) or bare, got {self.v_realized_delta!r}",
                "v_realized_delta",
            )
        for name, allowed, must in RANGES:
            value = getattr(self, name)
            if value is None and name in OPTIONAL:
                continue
            if not _number(value) or not math.isfinite(value) or not allowed(value):
                raise HParamsError(f"{name} must be {must}, got {value!r}", name)
        self._check_layers()
        self._check_template_lengths()

    def _check_layers(self) -> None:
        layers = self.layers
        if not isinstance(layers, list) or not all(_index(x) for x in layers):
            raise HParamsError(f"layers must be a list of layer numbers, got {layers!r}", "layers")
        if not layers:
            raise HParamsError("layers must name at least one layer", "layers")
        if len(set(layers)) != len(layers):
            raise HParamsError(f"layers names a layer twice: {layers}", "layers")

    def _check_template_lengths(self) -> None:
        pairs = self.context_template_length_params
        ok = isinstance(pairs, list) and all(
            isinstance(p, list) and len(p) == 2 and _index(p[0]) and p[0] >= 1 and _index(p[1])
            for p in pairs
        )
        if not ok:
            raise HParamsError(
                "context_template_length_params must be a list of [tokens, count] pairs "
                f"(tokens at least 1, count 0 or more), got {pairs!r}",
                "context_template_length_params",
            )

    def check_layers_within(self, n_layers: int, where: str) -> None:
        """Every edited layer exists in a model of ``n_layers`` layers; ``where`` names the
        hyperparameters' file and line."""
        outside = [layer for layer in self.layers if layer >= n_layers]
        if outside:
            raise HParamsError(
                f"{where}: layers {outside} are outside the model, which has {n_layers} layers "
                f"(0 to {n_layers - 1})",
                "layers",
            )

    def module_overrides(self) -> dict[str, str | None]:
        keys = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(name: str, value: Any, default: Any, where: str) -> Any:
    """YAML reads ``5e-1`` as a string; numbers are coerced to the field's type."""
    if name == "v_realized_delta":
        return "off" if value is False else value  # YAML reads false and off as False
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise HParamsError(f"{where}: {name} must be true or false, got {value!r}", name)
    if isinstance(default, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise HParamsError(f"{where}: {name} must be a number, got {value!r}", name) from None
        if isinstance(default, int) and number.is_integer():
            return int(number)
        return number
    return value


def _check_ignored(name: str, value: Any, where: str) -> None:
    """Notes an ignored key; refuses one that asks for what rrome does not do."""
    if name in IGNORED_ONLY and value != IGNORED_ONLY[name]:
        raise HParamsError(
            f"{where}: {name} {value!r} is not supported: use {IGNORED_ONLY[name]}", name
        )
    warnings.warn(f"{where}: ignoring {name!r} ({IGNORED_KEYS[name]})", stacklevel=3)


def _check_removed(name: str, value: Any, where: str) -> None:
    """A removed knob loads at the value rrome always uses now, and only there."""
    kept = REMOVED_KEYS[name]
    try:  # YAML reads 5e-2 as a string
        same = not isinstance(value, bool) and float(value) == kept
    except (TypeError, ValueError):
        same = False
    if not same:
        raise HParamsError(
            f"{where}: {name} was removed (its study: docs/recipe.md, 'Measured and not "
            f"shipped'); only {kept}, what rrome always does, is accepted, got {value!r}",
            name,
        )


def from_dict(
    raw: dict[str, Any], where: str = "<hparams>", lines: dict[str, int] | None = None
) -> HParams:
    """HParams from a mapping; errors and notes name ``where`` and, given ``lines`` (key ->
    line), the key's line."""
    lines = lines or {}

    def at(key: str | None) -> str:
        return f"{where}:{lines[key]}" if key in lines else where

    known = {f.name: f for f in fields(HParams)}
    defaults = HParams()
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name in IGNORED_KEYS:
            _check_ignored(name, value, at(name))
            continue
        if name in REMOVED_KEYS:
            _check_removed(name, value, at(name))
            continue
        if name not in known:
            near = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise HParamsError(f"{at(name)}: unknown key {name!r}{hint}", name)
        values[name] = _coerce(name, value, getattr(defaults, name), at(name))
    try:
        return HParams(**values)
    except HParamsError as err:
        raise HParamsError(f"{at(err.key)}: {err}", err.key) from None


def _key_lines(text: str) -> dict[str, int]:
    """Each top-level key of a YAML mapping -> its line (1-based), from YAML's own node marks."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value}


def load_hparams(path: str | Path) -> HParams:
    path = Path(path)
    try:
        text = path.read_text()
        raw = yaml.safe_load(text) or {}
    except OSError as err:
        raise HParamsError(f"{path}: cannot read hparams: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise HParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise HParamsError(f"{path}: expected a mapping of keys to values")
    return from_dict(raw, where=str(path), lines=_key_lines(text))


def key_location(path: str | Path, key: str) -> str:
    """``FILE:LINE`` of a top-level key of a YAML file (``FILE`` alone when it is not there)."""
    try:
        lines = _key_lines(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        lines = {}
    return f"{path}:{lines[key]}" if key in lines else str(path)


def shipped_hparams(name: str) -> Path:
    """The YAML shipped for a model alias (``hparams/<alias>.yaml``)."""
    path = Path(str(resources.files("rrome_cli") / "hparams" / f"{name}.yaml"))
    if not path.exists():
        raise HParamsError(f"no shipped hparams for {name!r}; pass --hparams FILE")
    return path


# The edited layer of a model with no shipped hyperparameters: a sixth of the depth, rounded
# (docs/architectures.md). ROME's and EasyEdit's choices sit at 15-35% of the depth (5 of 28-32
# for GPT-J, Llama, Mistral, Qwen2.5; 17 of 48 for GPT-2 XL); SmolLM2's measured layer is 5 of 30.
DEPTH_FRACTION = 1 / 6
DEFAULT_RECIPE = "default"  # hparams/default.yaml: SmolLM2's recipe without its layer and modules


def default_layer(n_layers: int) -> tuple[int, str]:
    """The layer to edit in a model of ``n_layers`` layers, and why."""
    layer = min(n_layers - 1, int(n_layers * DEPTH_FRACTION + 0.5))
    return layer, (
        f"layer {layer} of {n_layers}: a sixth of the depth, rounded (the rule for models "
        "without shipped hparams, docs/architectures.md)"
    )


def default_hparams(n_layers: int) -> tuple[HParams, str]:
    """The shipped recipe (hparams/default.yaml) at the rule's layer, and why that layer."""
    hp = load_hparams(shipped_hparams(DEFAULT_RECIPE))
    layer, why = default_layer(n_layers)
    hp.layers = [layer]
    return hp, why
