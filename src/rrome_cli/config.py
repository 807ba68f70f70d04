"""Hyperparameters: plain YAML mapped to a plain dataclass.

EasyEdit's R-ROME YAML files load unchanged: same keys, same meanings. A few keys that are
vestigial there are accepted and ignored with a note; an unknown key is an error that names the
nearest valid one.
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
V_STOPS = ("loss", "target", "every")  # engine.values._reached implements each
# Keys EasyEdit reads but that do nothing for us: the device comes from --devices, the loss is
# always read at the LM head, and sharding comes from the device map.
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
}


class HParamsError(ValueError):
    """A bad hyperparameter file or value; the message names the file, the line and the key."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key  # the offending key, when there is one


REALIZED = ("suffix", "answer", "bare")  # v_realized_delta's values besides true and false
# Numeric hyperparameters, what each must be (NaN and infinities never are), checked at load so
# that a bad value fails with its file and line, not after the model has loaded.
RANGES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("v_num_grad_steps", lambda x: x >= 1 and float(x).is_integer(), "a whole number, 1 or more"),
    ("v_lr", lambda x: x > 0, "greater than 0"),
    ("v_adam_beta2", lambda x: 0 <= x < 1, "in [0, 1)"),
    ("v_weight_decay", lambda x: x >= 0, "0 or more"),
    ("clamp_norm_factor", lambda x: x > 0, "greater than 0"),
    ("kl_factor", lambda x: x >= 0, "0 or more"),
    ("v_stop_loss", lambda x: x >= 0, "0 or more"),
    ("v_stop_prob", lambda x: 0 < x <= 1, "in (0, 1]"),
    ("v_bare_weight", lambda x: 0 <= x < 1, "in [0, 1)"),
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
    layers: list[int] = field(default_factory=lambda: [5])
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    # Adam's second-moment decay. At 0.999 (PyTorch's default) the step's scale remembers the
    # first steps' large gradients through a whole optimisation, so late steps are short.
    v_adam_beta2: float = 0.999
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    # Early stop: "loss" stops when the total loss < v_stop_loss (ROME); "target" stops when
    # the bare prompt, and the templated prompts on average, give the target v_stop_prob;
    # "every" stops when each prompt (bare and every template) gives it v_stop_prob.
    v_stop: str = "loss"
    v_stop_loss: float = 5e-2
    v_stop_prob: float = 0.9
    # The bare prompt's share of the target's NLL in the loss: w * NLL(bare) + (1 - w) * the
    # mean over every prompt. 0 (ROME): the plain mean, where the bare prompt is one row in ~20;
    # the "target" stop waits on it, and once the templates pass v_stop_prob its gradient is
    # all that moves delta, while Adam's step still scales to the earlier, larger gradients.
    v_bare_weight: float = 0.0
    # The least fraction of delta the bare prompt receives, (u . k_bare) / (u . k*). When the
    # subject opens the prompt its key sits at the first positions, far (in C^-1) from the
    # templates' keys, and the plain mean may give it a few percent of the edit. Below this
    # fraction, k* leans from the mean toward k_bare just far enough. None: the plain mean.
    k_bare_min: float | None = None
    # false (ROME, EasyEdit): the same delta at every templated prompt's subject token. true:
    # prompt i gets (u . k_i) / (u . k*) delta there, what the rank-one update adds at that
    # token. "suffix": every position from the subject's last token on gets its own key's share
    # (u . k) / (u . k*): the update's whole effect after the subject, the target's tokens
    # included, so the loss reads the edited model itself (positions before the subject's last
    # token are cached and get none). "answer": that share at the subject's last token and the
    # fed answer tokens only, not at the prompt's own words after the subject (which a rephrase
    # does not share). "bare": the bare prompt, the one the rewrite metric reads, also runs
    # whole and uncached with every position's share (the subject's earlier tokens and the
    # words before it included), so its loss and stop test read the edited model itself; the
    # templated prompts and phrasings as under true. Measured in hparams/smollm2-135m.yaml.
    v_realized_delta: bool | str = False
    # Requests' other phrasings of their relation (``phrasings``, or ``--phrasings`` FILE)
    # join the value's prompts, bare, at most this many per request (each costs a row of the
    # optimisation batch). 0: none are used.
    max_phrasings: int = 6
    mom2_adjustment: bool = True
    mom2_n_samples: int = 100_000  # token budget of the statistics pass
    mom2_dtype: str = "float32"
    mom2_ridge: float = 1e-6  # lambda = mom2_ridge * mean(diag C), for the Cholesky solve
    # Sequential runs: each applied edit's keys (k*, the bare prompt's, and every key after
    # the subject in "bare prompt + target", where the fact is read out) join C as
    # w m k k^T / ||k||^2 (m: C's mean eigenvalue), so later updates turn away from them and
    # leave that edit in place. 0 is R-ROME as published: every later update also moves the
    # earlier edits' keys.
    protect_weight: float = 0.0
    context_template_length_params: list[list[int]] = field(
        default_factory=lambda: [[5, 10], [10, 10]]
    )
    variant: str = "r-rome"
    stats_dir: str | None = None
    rewrite_module_tmp: str | None = None
    layer_module_tmp: str | None = None
    mlp_module_tmp: str | None = None
    ln_f_module: str | None = None
    lm_head_module: str | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise HParamsError(
                f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}", "variant"
            )
        if self.fact_token != "subject_last":
            raise HParamsError(
                f"fact_token {self.fact_token!r} is not supported: use subject_last", "fact_token"
            )
        if self.v_stop not in V_STOPS:
            raise HParamsError(
                f"v_stop must be one of {', '.join(V_STOPS)}, got {self.v_stop!r}", "v_stop"
            )
        realized = self.v_realized_delta
        if not (isinstance(realized, bool) or realized in REALIZED):
            options = "true, false, " + ", ".join(REALIZED[:-1]) + " or " + REALIZED[-1]
            raise HParamsError(
                f"v_realized_delta must be {options}, got {realized!r}", "v_realized_delta"
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
        keys = (
            "rewrite_module_tmp",
            "layer_module_tmp",
            "mlp_module_tmp",
            "ln_f_module",
            "lm_head_module",
        )
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(name: str, value: Any, default: Any, where: str) -> Any:
    """YAML reads ``5e-1`` as a string; numbers are coerced to the field's type."""
    if name == "v_realized_delta":
        return value  # a bool or a name, which HParams checks
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
            warnings.warn(f"{at(name)}: ignoring {name!r} ({IGNORED_KEYS[name]})", stacklevel=2)
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
